"""The daemons' nursery and guard: one link's failure, single or grouped, never ends the process."""

from __future__ import annotations

import logging

import pytest
import trio
import trio.testing

from offload import aio
from offload.errors import LinkLost, RemoteProtocolError, TransportError


async def fail_together(nursery: trio.Nursery, *errors: BaseException) -> None:
    """Each error raised by a task of its own, all in the same scheduling step."""
    go = trio.Event()

    async def fail(error: BaseException) -> None:
        await go.wait()
        raise error

    for error in errors:
        nursery.start_soon(fail, error)
    await trio.testing.wait_all_tasks_blocked()
    go.set()


async def test_link_failures_in_one_step_surface_as_the_first() -> None:
    errors = (
        LinkLost("nothing received for 7 s"),
        TransportError("receiving from host: connection broken"),
        RemoteProtocolError("bad frame"),
    )
    # Which of them comes first is trio's choice (it shuffles each step).
    with pytest.raises((TransportError, RemoteProtocolError)) as caught:
        async with aio.open_nursery() as nursery:
            await fail_together(nursery, *errors)
    assert caught.value in errors


async def test_a_bug_among_link_failures_stays_a_group() -> None:
    with pytest.RaisesGroup(TransportError, ValueError):
        async with aio.open_nursery() as nursery:
            await fail_together(nursery, TransportError("broken"), ValueError("a bug"))


async def test_guarded_logs_link_failures_and_bugs_and_lets_cancellation_through(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = logging.getLogger("test_aio")

    async def job() -> None:
        async with aio.open_nursery() as nursery:
            await fail_together(nursery, TransportError("broken"), KeyError("a bug"))

    await aio.guarded(log, "session", job)
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "session ended: broken"),
        ("ERROR", "session failed with an internal error"),
    ]
    with trio.move_on_after(0.01) as scope:
        await aio.guarded(log, "session", trio.sleep_forever)
    assert scope.cancelled_caught
