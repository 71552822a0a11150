"""Local clients of the daemons: a bounded time for the first request, none for a session after it,
and the agent's bridge of a caller's listener.

In-process daemons (real sockets, real programs): the agent of a DPU-side
rexec_server with a short request timeout, a host-side rexec_server it
reaches, and udsproxyd.
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest
import trio

from offload import pki, proc
from offload.config import RexecConfig
from offload.errors import ConfigError
from offload.net import Transport
from offload.pki import TlsConfig
from offload.protocol import local
from offload.rexec.server import serve as serve_rexec
from offload.udsproxy.daemon import ProxyConfig
from offload.udsproxy.daemon import serve as serve_udsproxy

TIMEOUT = 1.0
#: Far beyond TIMEOUT: how long a test waits for the daemon to close a silent connection.
DEADLINE = 20.0


@pytest.fixture
async def rexec_pair(tmp_path: Path, nursery: trio.Nursery) -> Path:
    """A host rexec_server and a DPU rexec_server whose agent allows TIMEOUT for a request."""
    pki.init(tmp_path / "pki", pki.HOST_AND_DPU)
    whitelist = tmp_path / "whitelist"
    whitelist.write_text(f"/bin/sh\n{sys.executable}\n")
    whitelist.chmod(0o400)
    host = RexecConfig(
        listen=(f"unix://{tmp_path}/peer.sock",),
        whitelist=str(whitelist),
        run_dir=str(tmp_path / "host"),
        node="host",
        user_map=("root=root",),
    )
    dpu = RexecConfig(
        peer=f"unix://{tmp_path}/peer.sock",
        whitelist=str(whitelist),
        run_dir=str(tmp_path / "dpu"),
        node="dpu",
        request_timeout=TIMEOUT,
    )
    await nursery.start(serve_rexec, host, Transport(TlsConfig.load(tmp_path / "pki" / "host")))
    await nursery.start(serve_rexec, dpu, Transport(TlsConfig.load(tmp_path / "pki" / "dpu")))
    return tmp_path


async def closed_by_daemon(path: str, sent: bytes = b"") -> None:
    """Connect to ``path``, send ``sent`` (perhaps half a request), then wait for the daemon to close."""
    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        await sock.connect(path)
        if sent:
            await sock.send(sent)
        with trio.fail_after(DEADLINE):
            try:
                assert await sock.recv(4096) == b""
            except OSError as exc:
                assert exc.errno == errno.ECONNRESET


@pytest.mark.parametrize("sent", [b"", b"half"], ids=["silent", "half-request"])
async def test_agent_closes_a_connection_without_a_request(
    rexec_pair: Path, sent: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    request = local.encode(local.L_REQUEST, {"argv": ["/bin/true"]})
    await closed_by_daemon(str(rexec_pair / "dpu" / "rexec.sock"), sent and request[: len(request) // 2])
    assert "no complete request within" in caplog.text


def stand_in_env(tree: Path) -> dict[str, str]:
    env = dict(os.environ, **{local.AGENT_SOCKET_ENV: str(tree / "dpu" / "rexec.sock")})
    env.pop("CMD_NET_ADDR", None)
    return env


async def test_a_session_outlives_the_request_timeout(rexec_pair: Path) -> None:
    env = stand_in_env(rexec_pair)
    with trio.fail_after(60):
        done = await trio.run_process(
            [*proc.program("rexec"), "/bin/sh", "-c", f"sleep {TIMEOUT + 5:g}; exit 7"],
            env=env,
            check=False,
            stdin=None,
        )
    assert done.returncode == 7


async def test_udsproxy_closes_a_shim_connection_without_a_request(
    tmp_path: Path, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    pki.init(tmp_path / "pki", pki.HOST_AND_DPU)
    config = ProxyConfig((), "", (str(tmp_path),), str(tmp_path / "run"), "dpu", request_timeout=TIMEOUT)
    await nursery.start(serve_udsproxy, config, Transport(TlsConfig.load(tmp_path / "pki" / "dpu")))
    await closed_by_daemon(config.shim_socket)
    await closed_by_daemon(config.shim_socket, b"\x01")
    assert caplog.text.count("no complete request within") == 2


def test_request_timeout_must_be_positive() -> None:
    with pytest.raises(ConfigError):
        RexecConfig(request_timeout=0)
    with pytest.raises(ConfigError):
        ProxyConfig((), "", (), request_timeout=-1)


#: The remote program: serves connection A, closes its listener (so the next
#: bridged connection is refused on the far side), answers A, and when told
#: listens again at the same path and serves one more.
BRIDGED = """
import os, socket, sys
listener = socket.socket(fileno={fd})
path = listener.getsockname()
a, _ = listener.accept()
listener.close()
print("closed", flush=True)
a.sendall(b"remote says " + a.makefile("rb").readline())
a.close()
sys.stdin.readline()
os.unlink(path)
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind(path)
listener.listen(4)
print("again", flush=True)
c, _ = listener.accept()
c.sendall(b"remote says " + c.makefile("rb").readline())
c.close()
"""


async def read_line(stream: trio.abc.ReceiveStream) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        data = await stream.receive_some(1)
        assert data, f"end of output after {line!r}"
        line += data
    return line


async def test_a_refused_bridged_connection_ends_only_itself(rexec_pair: Path, tmp_path: Path) -> None:
    path = str(tmp_path / "monitor.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4)
    fd = listener.fileno()
    program = [*proc.program("rexec"), sys.executable, "-c", textwrap.dedent(BRIDGED.format(fd=fd))]
    try:
        process = await trio.lowlevel.open_process(
            program,
            env=stand_in_env(rexec_pair),
            pass_fds=[fd],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
    finally:
        listener.close()
    assert process.stdin is not None and process.stdout is not None
    try:
        with trio.fail_after(60):
            async with await trio.open_unix_socket(path) as first:
                assert await read_line(process.stdout) == b"closed\n"
                # The far side refuses this one: it ends, alone.
                async with await trio.open_unix_socket(path) as refused:
                    await refused.send_all(b"two\n")
                    assert await refused.receive_some(100) == b""
                await first.send_all(b"one\n")
                assert await read_line(first) == b"remote says one\n"
            await process.stdin.send_all(b"\n")
            assert await read_line(process.stdout) == b"again\n"
            async with await trio.open_unix_socket(path) as third:
                await third.send_all(b"three\n")
                assert await read_line(third) == b"remote says three\n"
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_a_command_run_beside_the_server_keeps_its_exit_status(rexec_pair: Path) -> None:
    # The server collects its programs' orphans in this process.  A command
    # that something else here runs and waits for (subprocess, trio) is no
    # orphan: its status is its waiter's, also when another child's exit
    # makes the server look at its children meanwhile.
    command = subprocess.Popen(["sh", "-c", "exit 7"])
    await trio.sleep(0.2)
    await trio.run_process(["true"])  # another child exits: a SIGCHLD, a scan
    await trio.sleep(0.2)
    assert await trio.to_thread.run_sync(command.wait) == 7


async def test_an_orphan_of_a_program_is_collected(rexec_pair: Path) -> None:
    # `sleep` outlives the shell that started it: the server, the subreaper
    # here, adopts it and collects it once it has exited.
    result = await trio.run_process(["sh", "-c", "sleep 0.3 & echo $!"], capture_stdout=True)
    orphan = int(result.stdout)
    assert orphan in {child.pid for child in psutil.Process().children()}, "the orphan was not adopted"
    with trio.fail_after(10):
        while True:
            try:
                os.waitid(os.P_PID, orphan, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return  # collected: no longer a child of this process, and no zombie left
            await trio.sleep(0.1)


async def test_a_burst_of_orphans_is_all_collected_and_sessions_go_on(rexec_pair: Path) -> None:
    # A program that leaves 200 orphans at once (a flood of daemons that exit
    # at once): every one is collected, none stays a zombie of the server's
    # process, and the server still runs sessions.
    script = "for i in $(seq 200); do (sleep 0.3 & echo $!); done"
    result = await trio.run_process(["sh", "-c", script], capture_stdout=True)
    orphans = {int(pid) for pid in result.stdout.split()}
    assert len(orphans) == 200
    with trio.fail_after(20):
        while orphans & {child.pid for child in psutil.Process().children()}:
            await trio.sleep(0.2)
    with trio.fail_after(60):
        done = await trio.run_process(
            [*proc.program("rexec"), "/bin/sh", "-c", "exit 7"], env=stand_in_env(rexec_pair), check=False, stdin=None
        )
    assert done.returncode == 7
