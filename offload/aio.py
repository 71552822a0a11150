"""Small trio helpers shared by the daemons."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import trio

from offload.errors import ConfigError, OffloadError, ProtocolError, TransportError

#: How a link or a connection ends: the stream broke or went silent (TransportError,
#: LinkLost), or one side broke the protocol.  trio's own stream errors count for the
#: code that uses trio streams without the translating seam of `offload.net`.
LINK_FAILURES: tuple[type[Exception], ...] = (
    TransportError,
    ProtocolError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
)


def _leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaves(inner)]
    return [error]


@contextlib.asynccontextmanager
async def open_nursery() -> AsyncIterator[trio.Nursery]:
    """A nursery whose failure surfaces as itself, not as an ExceptionGroup.

    Most of our nurseries are "one job and its helpers", where the failure
    that ended them is what the caller catches (LinkLost, TransportError).
    When a link breaks, every task using it may fail in the same step (the
    receiver finds the stream broken, the keepalive finds it silent): still
    one failure, surfaced as the first.  Any other mix stays a group.
    """
    try:
        async with trio.open_nursery() as nursery:
            yield nursery
    except BaseExceptionGroup as group:
        real = [leaf for leaf in _leaves(group) if not isinstance(leaf, trio.Cancelled)]
        if len(real) == 1 or (real and all(isinstance(leaf, LINK_FAILURES) for leaf in real)):
            raise real[0] from None
        raise


async def guarded(log: logging.Logger, what: str, job: Callable[[], Awaitable[object]]) -> None:
    """Run one connection's or session's job; whatever it raises is logged, never fatal to the daemon.

    A link failure the job left to us ended only that job; anything else is a
    bug, logged with its traceback; either may come alone or grouped with
    others.  Cancellation passes through: it is how the daemon stops.
    """
    try:
        await job()
    except* LINK_FAILURES as group:
        log.warning("%s ended: %s", what, _leaves(group)[0])
    except* Exception as group:
        bugs = _leaves(group)
        log.error("%s failed with an internal error", what, exc_info=bugs[0] if len(bugs) == 1 else group)


def run_service(
    log: logging.Logger, serve: Callable[..., Awaitable[object]], build: Callable[[], tuple[object, ...]]
) -> None:
    """Entry point of a daemon: ``serve(*build())`` under trio, READY=1 once it started.

    ``build`` turns the command line into serve's arguments; a ConfigError
    from it exits with status 2, any other OffloadError with 1 (both logged);
    SIGINT exits quietly.
    """
    import sys

    from offload import sd

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
