"""Small trio helpers shared by the daemons."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import trio


def _leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaves(inner)]
    return [error]


@contextlib.asynccontextmanager
async def open_nursery() -> AsyncIterator[trio.Nursery]:
    """A nursery whose single failure surfaces as itself, not as a group.

    trio wraps whatever a nursery's tasks raise in an ExceptionGroup.  Most
    of our nurseries are "one job and its helpers", where the one failure
    that ended them is what the caller wants to catch (LinkLost,
    TransportError).  A group with several real failures stays a group.
    """
    try:
        async with trio.open_nursery() as nursery:
            yield nursery
    except BaseExceptionGroup as group:
        real = [leaf for leaf in _leaves(group) if not isinstance(leaf, trio.Cancelled)]
        if len(real) == 1:
            raise real[0] from None
        raise


async def guarded(log: logging.Logger, what: str, job: Callable[[], Awaitable[object]]) -> None:
    """Run one session's job; a bug in it is logged, never fatal to the daemon."""
    try:
        await job()
    except Exception:
        log.exception("%s failed with an internal error", what)


def run_service(
    log: logging.Logger,
    serve: Callable[..., Awaitable[object]],
    build: Callable[[], tuple[object, ...]],
) -> None:
    """Entry point of a daemon: ``serve(*build())`` under trio, READY=1 once it started.

    ``build`` turns the command line into serve's arguments; a ConfigError
    from it exits with status 2, any other OffloadError with 1 (both logged);
    SIGINT exits quietly.
    """
    import sys

    import trio

    from offload import sd
    from offload.errors import ConfigError, OffloadError

    try:
        args = build()
    except ConfigError as exc:
        log.error("%s", exc)
        sys.exit(2)

    async def run() -> None:
        async with open_nursery() as nursery:
            await nursery.start(serve, *args)
            sd.notify("READY=1")

    try:
        trio.run(run)
    except OffloadError as exc:
        log.error("%s", exc)
        sys.exit(1)
    except KeyboardInterrupt:
        pass
