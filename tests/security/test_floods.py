"""Floods: a daemon out of fds pauses accepting and goes on; one peer cannot take every slot.

The real daemons run as processes of their own under ``prlimit
--nofile=64:64``, and are flooded with connections that never speak, from
the network (the peer ports, over UNIX sockets here) and from a local user
(rexec_server's agent socket, udsproxyd's shim socket).  Judged by effect:
the same pid is alive afterwards, and a good client gets its work done
(a marker file a program creates, an echoed message, a file read).
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from offload import proc
from offload.config import RexecConfig
from offload.net import ConnectionLimits, Transport, parse_address
from offload.pki import TlsConfig
from offload.protocol import qtfs as qtfs_wire
from offload.protocol.framing import FrameDecoder, encode_frame
from offload.protocol.local import AGENT_SOCKET_ENV
from offload.qtfs.client import Link
from offload.rexec.server import serve as serve_rexec
from tests.conftest import wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the whitelist must be root-owned")

FD_LIMIT = 64
#: Far more connections than the daemon has fds: most wait in its backlog.
FLOOD = 300
#: How long the flood is held: the daemon meets EMFILE again and again meanwhile.
HOLD = 2.0


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    # Through the command line, which both the old and the new pki accept.
    proc.run(
        [*proc.program("offload"), "pki", "init", "--dir", str(tmp_path / "pki"), "--node", "host", "--node", "dpu"]
    )
    whitelist = tmp_path / "whitelist"
    whitelist.write_text("/bin/sh\n")
    whitelist.chmod(0o400)
    (tmp_path / "empty.toml").write_text("")
    return tmp_path


@pytest.fixture
def daemons() -> Iterator[list[subprocess.Popen]]:
    """Processes a test starts; each is ended by its pid, whatever happened."""
    started: list[subprocess.Popen] = []
    try:
        yield started
    finally:
        for process in started:
            process.terminate()
        for process in started:
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def start(daemons: list[subprocess.Popen], log: Path, module: str, *args: str, limit: bool = True) -> subprocess.Popen:
    prefix = ["prlimit", f"--nofile={FD_LIMIT}:{FD_LIMIT}"] if limit else []
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    with log.open("wb") as output:
        process = proc.spawn([*prefix, *proc.run_module(module), *args], stdout=output, stderr=output, env=env)
    daemons.append(process)
    return process


def wait_listening(path: Path, process: subprocess.Popen, log: Path) -> None:
    def ready() -> bool:
        assert process.poll() is None, f"{process.args} exited: {log.read_text()}"
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(str(path))
            except OSError:
                return False
        return True

    wait_for(ready, 30, f"{path} to accept")


@contextlib.contextmanager
def flooded(*paths: Path) -> Iterator[None]:
    """Connections to ``paths`` that say nothing, held for HOLD seconds, then all closed."""
    held: list[socket.socket] = []
    try:
        for path in paths:
            for _ in range(FLOOD):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
                held.append(sock)
                with contextlib.suppress(BlockingIOError):  # the backlog is full
                    sock.connect(str(path))
        time.sleep(HOLD)
        yield
    finally:
        for sock in held:
            sock.close()


def assert_survived(process: subprocess.Popen, pid: int, log: Path) -> None:
    assert process.poll() is None and process.pid == pid, f"the daemon ended: {log.read_text()[-3000:]}"
    assert "pausing until resources are freed" in log.read_text(), "the flood never reached the fd limit"


# -- rexec_server: the peer port (network) and the agent socket (local users) -------------------


def rexec_args(tree: Path, role: str, peer: str) -> list[str]:
    return [
        "--config",
        str(tree / "empty.toml"),
        "--node",
        role,
        "--listen",
        f"unix://{tree}/{role}-peer.sock",
        "--peer",
        f"unix://{tree}/{peer}-peer.sock",
        "--pki",
        str(tree / "pki" / role),
        "--whitelist",
        str(tree / "whitelist"),
        "--run-dir",
        str(tree / f"run-{role}"),
        "--user-map",
        "root=root",
        # A session its peer dropped waits this long to be resumed (holding its fds), then ends.
        "--resume-window",
        "2",
    ]


def standin(tree: Path, role: str, marker: Path) -> subprocess.CompletedProcess:
    """``rexec /bin/sh -c 'touch MARKER'`` through ``role``'s agent: the program runs on the other side."""
    env = dict(os.environ, **{AGENT_SOCKET_ENV: str(tree / f"run-{role}" / "rexec.sock")})
    env.pop("CMD_NET_ADDR", None)
    return proc.run(
        [*proc.program("rexec"), "/bin/sh", "-c", f"touch {marker}"], env=env, check=False, timeout=60, text=True
    )


def test_rexec_server_outlives_floods_of_its_peer_port_and_agent_socket(
    tree: Path, daemons: list[subprocess.Popen]
) -> None:
    host_log, dpu_log = tree / "host.log", tree / "dpu.log"
    host = start(daemons, host_log, "offload.rexec_server", *rexec_args(tree, "host", "dpu"))
    dpu = start(daemons, dpu_log, "offload.rexec_server", *rexec_args(tree, "dpu", "host"), limit=False)
    for path, process, log in (
        (tree / "host-peer.sock", host, host_log),
        (tree / "run-host" / "rexec.sock", host, host_log),
        (tree / "dpu-peer.sock", dpu, dpu_log),
    ):
        wait_listening(path, process, log)
    pid = host.pid
    with flooded(tree / "host-peer.sock", tree / "run-host" / "rexec.sock"):
        assert_survived(host, pid, host_log)
    # The DPU's stand-in runs a program on the host (through the flooded peer
    # port), and the host's stand-in one on the DPU (through its flooded agent socket).
    for role in ("dpu", "host"):
        marker = tree / f"ran-from-{role}"
        done = standin(tree, role, marker)
        assert done.returncode == 0, done.stderr
        assert marker.exists()
    assert_survived(host, pid, host_log)


# -- udsproxyd: the peer port (network) and the shim socket (local users) ----------------------


def echo_server(path: Path) -> socket.socket:
    """A UNIX stream server answering "got:" + whatever one read brought, in a thread."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(16)

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:  # the listener was closed: the test is over
                return
            # A client that leaves before its answer ends only its own connection, not the server.
            with conn, contextlib.suppress(OSError):
                conn.sendall(b"got:" + conn.recv(100))

    threading.Thread(target=serve, daemon=True).start()
    return listener


def ask_shim(shim: Path, path: Path) -> bytes:
    """What the echo server at ``path`` answers "hello" through the shim's socket (as libudsproxy.so asks)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(shim))
        sock.send(encode_frame(0x50, 0, struct.pack("!H", socket.SOCK_STREAM) + os.fsencode(path)))
        data, ancdata, _, _ = sock.recvmsg(64, socket.CMSG_SPACE(8))
    decoder = FrameDecoder()
    decoder.receive_data(data)
    reply = decoder.next_frame()
    (error,) = struct.unpack("!I", reply.payload)  # type: ignore[union-attr]
    assert error == 0 and ancdata, f"the shim's request failed: {os.strerror(error)}"
    with socket.socket(fileno=struct.unpack("i", ancdata[0][2][:4])[0]) as carried:
        carried.settimeout(30)
        carried.sendall(b"hello")
        return carried.recv(100)


def test_udsproxyd_outlives_floods_of_its_peer_port_and_shim_socket(
    tree: Path, daemons: list[subprocess.Popen]
) -> None:
    (tree / "remote").mkdir()
    listener = echo_server(tree / "remote" / "echo.sock")
    common = ["--user-map", "root=root"]
    host_log, dpu_log = tree / "uds-host.log", tree / "uds-dpu.log"
    host = start(
        daemons,
        host_log,
        "offload.udsproxy.daemon",
        *("--node", "host", "--listen", f"unix://{tree}/uds-host.sock", "--pki", str(tree / "pki" / "host")),
        *("--allow", str(tree / "remote"), "--run-dir", str(tree / "uds-b"), *common),
    )
    dpu = start(
        daemons,
        dpu_log,
        "offload.udsproxy.daemon",
        *("--node", "dpu", "--peer", f"unix://{tree}/uds-host.sock", "--pki", str(tree / "pki" / "dpu")),
        *("--allow", str(tree), "--run-dir", str(tree / "uds-a"), *common),
    )
    shim = tree / "uds-a" / "udsproxy.sock"
    try:
        wait_listening(tree / "uds-host.sock", host, host_log)
        wait_listening(shim, dpu, dpu_log)
        host_pid, dpu_pid = host.pid, dpu.pid
        with flooded(tree / "uds-host.sock", shim):
            assert_survived(host, host_pid, host_log)
            assert_survived(dpu, dpu_pid, dpu_log)
        assert ask_shim(shim, tree / "remote" / "echo.sock") == b"got:hello"
        assert_survived(host, host_pid, host_log)
        assert_survived(dpu, dpu_pid, dpu_log)
    finally:
        listener.close()


# -- the qtfs server ---------------------------------------------------------------------------


def read_through_qtfs(tree: Path, export: Path, name: bytes) -> bytes:
    async def main() -> bytes:
        transport = Transport(TlsConfig.load(tree / "pki" / "dpu"))
        link = Link(transport, parse_address(f"unix://{tree}/qtfs.sock"), os.fsencode(export), keepalive=30)
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await nursery.start(link.run)
                opened = await link.call(qtfs_wire.Open(name, os.O_RDONLY))
                assert isinstance(opened, qtfs_wire.HandleReply)
                data = await link.call(qtfs_wire.Read(opened.handle, 0, 100))
                assert isinstance(data, qtfs_wire.DataReply)
                nursery.cancel_scope.cancel()
                return data.data

    return trio.run(main)


def test_qtfs_server_outlives_a_flood(tree: Path, daemons: list[subprocess.Popen]) -> None:
    export = tree / "export"
    export.mkdir()
    (export / "file").write_bytes(b"still served")
    log = tree / "qtfs.log"
    server = start(
        daemons,
        log,
        "offload.qtfs.cli",
        *(
            "serve",
            "--listen",
            f"unix://{tree}/qtfs.sock",
            "--export",
            str(export),
            "--pki",
            str(tree / "pki" / "host"),
        ),
    )
    wait_listening(tree / "qtfs.sock", server, log)
    pid = server.pid
    with flooded(tree / "qtfs.sock"):
        assert_survived(server, pid, log)
    assert read_through_qtfs(tree, export, b"file") == b"still served"
    assert_survived(server, pid, log)


# -- per-peer limits ---------------------------------------------------------------------------


async def test_one_peer_address_gets_256_connections_and_others_are_still_served(
    tree: Path, nursery: trio.Nursery
) -> None:
    """The 257th connection from 127.0.0.2 is closed at once; a DPU at 127.0.0.1 still runs programs."""
    from tests.security.test_identity import try_exec

    config = RexecConfig(
        listen=("tcp://127.0.0.1:0",),
        whitelist=str(tree / "whitelist"),
        run_dir=str(tree / "run"),
        node="host",
        user_map=("root=root",),
    )
    transport = Transport(TlsConfig.load(tree / "pki" / "host"), limits=ConnectionLimits(per_peer=256))
    address = (await nursery.start(serve_rexec, config, transport))[0]
    port = parse_address(address).port

    async def from_flooder() -> trio.socket.SocketType:
        sock = trio.socket.socket()
        await sock.bind(("127.0.0.2", 0))
        await sock.connect(("127.0.0.1", port))
        return sock

    held = []
    try:
        with trio.fail_after(30):
            for _ in range(256):
                held.append(await from_flooder())
            # Accepted and waiting in their handshakes: each holds a slot.
            await trio.sleep(0.5)
            extra = await from_flooder()
            held.append(extra)
            start = trio.current_time()
            with contextlib.suppress(ConnectionResetError):
                assert await extra.recv(10) == b""  # closed, unserved, long before a handshake timeout
            assert trio.current_time() - start < 5
            marker = tree / "served-meanwhile"
            dpu = Transport(TlsConfig.load(tree / "pki" / "dpu"))
            assert await try_exec(dpu, address, marker) == "ran"
            assert marker.exists()
    finally:
        for sock in held:
            sock.close()
