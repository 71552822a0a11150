"""The agent's pool of warm links, against a real rexec_server in this process.

A link goes back to the pool when its session ended; the next session takes
it and must get the answer to its own Exec, whatever the last session left
unread.  Judged by effect: each program appends a line to a marker file, so
a program that ran twice, or not at all, shows there.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from offload.config import RexecConfig
from offload.net import Transport, parse_address
from offload.protocol.rexec import Exec, ExecRequest, Exited, Started, State
from offload.rexec.agent import PeerPool
from offload.rexec.server import serve

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the whitelist must be root-owned")


@pytest.fixture
async def pool(tmp_path: Path) -> AsyncIterator[PeerPool]:
    """A pool of the DPU side (no warm links of its own making) whose peer is a host rexec_server."""
    whitelist = tmp_path / "whitelist"
    whitelist.write_text("/bin/sh\n")
    whitelist.chmod(0o400)
    address = f"unix://{tmp_path}/host-peer.sock"
    host = RexecConfig(
        listen=(address,),
        whitelist=str(whitelist),
        insecure=True,
        node="host",
        run_dir=str(tmp_path / "run-host"),
        user_map=("root=root",),
    )
    dpu = RexecConfig(peer=address, insecure=True, node="dpu", run_dir=str(tmp_path / "run-dpu"), warm=0)
    async with trio.open_nursery() as nursery:
        await nursery.start(serve, host, Transport(None))
        yield PeerPool(Transport(None), dpu, nursery)
        nursery.cancel_scope.cancel()


def appending(marker: Path, line: str) -> Exec:
    return Exec(ExecRequest(argv=("/bin/sh", "-c", f"echo {line} >> {marker}"), user="root"))


async def test_a_session_left_unread_does_not_answer_the_next_exec(pool: PeerPool, tmp_path: Path) -> None:
    address = parse_address(pool.config.peer)
    marker = tmp_path / "marker"
    with trio.fail_after(30):
        first = await pool.take(address)
        await first.send(appending(marker, "first"))
        assert isinstance(await first.control.receive(), Started)
        # The program ends and its Exited is queued, but nobody reads it: the
        # stand-in went away, and its session was cancelled as the answer came.
        while first.conn.state is not State.DONE:
            await trio.sleep(0.01)
        assert pool.give_back(address, first)

        second = await pool.take(address)
        assert second is first  # the warm link, reused
        await second.send(appending(marker, "second"))
        assert isinstance(await second.control.receive(), Started)
        assert await second.control.receive() == Exited(code=0)
    assert marker.read_text() == "first\nsecond\n"
