"""Attacks on udsproxyd by an unprivileged user on the DPU, and by a compromised DPU.

Two real daemons run in-process (DPU side "a" with the shim socket, host
side "b" where the sockets live), with the host's defaults: no user map, so
a root caller would act as nobody.  The attacker is ``nobody`` running
/usr/bin/python3 under the real shim, in a user and mount namespace of its
own (``setpriv`` then ``unshare -Urm``): there it hides the host's socket
directory (so connect() fails locally and the shim carries it) and may put
files of its own over a ``--share`` prefix.  Every test judges by effect:
what the root-only server saw, what the attacker received, how the daemon's
memory grew and whether it still serves a good client.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import socket
import struct
import tempfile
import textwrap
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from offload import pki
from offload.pki import TlsConfig
from offload.protocol import udsproxy as wire
from offload.udsproxy.daemon import ProxyConfig, serve
from offload.udsproxy.relay import fds_of

NATIVE = Path(__file__).resolve().parents[2] / "offload" / "_native"
SYSTEM_PYTHON = "/usr/bin/python3"  # the venv's python may not be reachable for nobody
NOBODY = 65534

pytestmark = [
    pytest.mark.skipif(not (NATIVE / "libudsproxy.so").exists(), reason="the shim is not built (run make setup)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="starts root-only servers and an attacker as nobody"),
    pytest.mark.skipif(not Path(SYSTEM_PYTHON).exists(), reason="no /usr/bin/python3 for the attacker"),
]


@dataclass
class Tree:
    base: Path
    seen: list[int] = field(default_factory=list)  # SO_PEERCRED uids of connections to the servers
    received: list[bytes] = field(default_factory=list)  # what the file server read from passed fds

    @property
    def allowed(self) -> Path:
        return self.base / "allowed"

    @property
    def share(self) -> Path:
        return self.base / "share"


@pytest.fixture
async def tree(nursery: trio.Nursery) -> AsyncIterator[Tree]:
    # Under /tmp with mode 0755, not pytest's tmp_path (0700): nobody must reach the shim socket.
    base = Path(tempfile.mkdtemp(prefix="offp-security-", dir="/tmp"))
    try:
        base.chmod(0o755)
        for name in ("allowed", "private", "share", "a", "b"):
            (base / name).mkdir(mode=0o755)
        pki.init(base / "pki", pki.HOST_AND_DPU)
        from offload.net import Transport

        share = (str(base / "share"),)
        # Host defaults: no --user-map.
        host = ProxyConfig((f"unix://{base}/peer.sock",), "", (str(base / "allowed"),), str(base / "b"), "host", share)
        dpu = ProxyConfig((), f"unix://{base}/peer.sock", (str(base),), str(base / "a"), "dpu", share)
        await nursery.start(serve, host, Transport(TlsConfig.load(base / "pki" / "host")))
        await nursery.start(serve, dpu, Transport(TlsConfig.load(base / "pki" / "dpu")))
        yield Tree(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


async def root_server(tree: Tree, path: Path, mode: int, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """A root service: records who connected (SO_PEERCRED) and answers with a secret and that uid."""
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with listener:
        await listener.bind(str(path))
        path.chmod(mode)
        listener.listen(16)
        task_status.started()
        while True:
            conn, _ = await listener.accept()
            with conn:
                _, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
                tree.seen.append(uid)
                with contextlib.suppress(OSError):
                    await conn.send(f"root secret for uid {uid}".encode())


async def file_server(tree: Tree, path: Path, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """A root service that uses the files passed to it: reads each and answers with what it read."""
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with listener:
        await listener.bind(str(path))
        path.chmod(0o666)
        listener.listen(16)
        task_status.started()
        while True:
            conn, _ = await listener.accept()
            with conn:
                contents = []
                while True:
                    data, ancillary, _, _ = await conn.recvmsg(100, socket.CMSG_SPACE(16))
                    for fd in fds_of(ancillary):
                        contents.append(os.pread(fd, 100, 0))
                        os.close(fd)
                    if not data:
                        break
                tree.received.extend(contents)
                with contextlib.suppress(OSError):
                    await conn.send(b"read:" + b"|".join(contents))


async def attack(tree: Tree, script: str, *args: str, shadow: dict[str, str] | None = None) -> str:
    """Run ``script`` as nobody under the shim; ``shadow`` files (name -> text) are put over the share.

    The allowed directory is hidden in the attacker's namespace, so its
    connects fail locally and the shim asks udsproxyd.
    """
    steps = [f"mount -t tmpfs none {shlex.quote(str(tree.allowed))}"]
    if shadow:
        steps.append(f"mount -t tmpfs -o mode=0755 none {shlex.quote(str(tree.share))}")
        for name, text in shadow.items():
            target = shlex.quote(str(tree.share / name))
            steps.append(f"printf %s {shlex.quote(text)} > {target}")
    steps.append(f'exec {SYSTEM_PYTHON} -c "$0" "$@"')
    argv = [
        *("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"),
        *("unshare", "-Urm", "sh", "-ec", "; ".join(steps)),
        textwrap.dedent(script),
        *args,
    ]
    env = {
        "PATH": "/usr/bin:/bin",
        "LD_PRELOAD": str(NATIVE / "libudsproxy.so"),
        "LD_BIND_NOW": "1",
        "UDSPROXY_SOCKET": str(tree.base / "a" / "udsproxy.sock"),
    }
    with trio.fail_after(30):
        result = await trio.run_process(argv, env=env, capture_stdout=True, capture_stderr=True, check=False)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


CONNECT = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except OSError as exc:
    print("refused", exc.errno)
    sys.exit(0)
s.settimeout(5)
print("answer", s.recv(100).decode())
"""


# -- A: symlinks out of --allow, and root-only sockets under it ---------------------


async def test_a_symlink_in_an_allowed_tree_does_not_reach_a_root_only_socket(
    tree: Tree, nursery: trio.Nursery
) -> None:
    """The DPU plants allowed/evil -> a root-only socket outside the prefix (as through a shared qtfs tree)."""
    private = tree.base / "private" / "root.sock"
    await nursery.start(root_server, tree, private, 0o600)
    (tree.allowed / "evil").symlink_to(private)
    out = await attack(tree, CONNECT, str(tree.allowed / "evil"))
    assert tree.seen == [], f"the root-only server got a connection: {out}"
    assert "root secret" not in out and out.startswith("refused")


async def test_a_root_only_socket_under_the_prefix_does_not_answer_nobody(tree: Tree, nursery: trio.Nursery) -> None:
    await nursery.start(root_server, tree, tree.allowed / "root-only.sock", 0o600)
    out = await attack(tree, CONNECT, str(tree.allowed / "root-only.sock"))
    assert tree.seen == [], f"the root-only server got a connection: {out}"
    assert "root secret" not in out and out.startswith("refused")


async def test_a_server_that_trusts_so_peercred_sees_the_caller_not_root(tree: Tree, nursery: trio.Nursery) -> None:
    """Like the D-Bus system bus: a socket anyone may open, whose server decides by the peer's uid."""
    await nursery.start(root_server, tree, tree.allowed / "bus.sock", 0o666)
    out = await attack(tree, CONNECT, str(tree.allowed / "bus.sock"))
    assert tree.seen == [NOBODY], out
    assert out.strip() == f"answer root secret for uid {NOBODY}"


async def test_root_on_the_dpu_acts_as_nobody_unless_mapped(tree: Tree, nursery: trio.Nursery) -> None:
    await nursery.start(root_server, tree, tree.allowed / "bus.sock", 0o666)
    await nursery.start(root_server, tree, tree.allowed / "root-only.sock", 0o600)
    env = {"LD_PRELOAD": str(NATIVE / "libudsproxy.so"), "UDSPROXY_SOCKET": str(tree.base / "a" / "udsproxy.sock")}
    for name in ("bus.sock", "root-only.sock"):
        # Root, in a mount namespace where the host's directory is hidden.
        hide = f'mount -t tmpfs none {shlex.quote(str(tree.allowed))}; exec "$@"'
        argv = ["unshare", "-m", "sh", "-ec", hide, "-", SYSTEM_PYTHON, "-c", textwrap.dedent(CONNECT)]
        with trio.fail_after(30):
            result = await trio.run_process([*argv, str(tree.allowed / name)], env=env, capture_stdout=True)
        assert "root secret" in result.stdout.decode() or name == "root-only.sock"
    assert tree.seen == [NOBODY]  # bus.sock saw nobody; root-only.sock saw no one


# -- B: passed files re-opened by path -------------------------------------------------


SEND_FILE = """
import os, socket, sys
fd = os.open(sys.argv[2], os.O_RDWR)
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
try:
    socket.send_fds(s, [b"a file"], [fd])
except OSError as exc:
    print("refused", exc.errno)
    sys.exit(0)
s.shutdown(socket.SHUT_WR)
s.settimeout(5)
print("answer", s.recv(1000).decode())
"""


async def test_a_shadowed_share_does_not_yield_the_hosts_root_only_file(tree: Tree, nursery: trio.Nursery) -> None:
    """In its own mount namespace nobody owns a file at the path of the host's root-only file and passes it."""
    secret = tree.share / "secret.txt"
    secret.write_text("host root secret")
    secret.chmod(0o600)
    await nursery.start(file_server, tree, tree.allowed / "files.sock")
    out = await attack(
        tree, SEND_FILE, str(tree.allowed / "files.sock"), str(secret), shadow={"secret.txt": "my own file"}
    )
    assert b"host root secret" not in b"".join(tree.received), out
    assert "host root secret" not in out and out.startswith("refused")
    assert secret.read_text() == "host root secret"


async def test_a_shadowed_share_does_not_yield_another_file_of_the_same_path(tree: Tree, nursery: trio.Nursery) -> None:
    """The host's file is one nobody may open too: only the identity (st_dev, st_ino) tells it apart."""
    public = tree.share / "public.txt"
    public.write_text("the host's file")
    public.chmod(0o666)
    await nursery.start(file_server, tree, tree.allowed / "files.sock")
    out = await attack(
        tree, SEND_FILE, str(tree.allowed / "files.sock"), str(public), shadow={"public.txt": "my own file"}
    )
    assert tree.received == [], out
    assert out.startswith("refused")


async def test_nobodys_own_shared_file_still_travels(tree: Tree, nursery: trio.Nursery) -> None:
    mine = tree.share / "mine.txt"
    mine.write_text("nobody's data")
    os.chown(mine, NOBODY, NOBODY)
    mine.chmod(0o600)
    await nursery.start(file_server, tree, tree.allowed / "files.sock")
    out = await attack(tree, SEND_FILE, str(tree.allowed / "files.sock"), str(mine))
    assert tree.received == [b"nobody's data"]
    assert out.strip() == "answer read:nobody's data"


# -- C: a peer that ignores the flow-control window ------------------------------------


def rss() -> int:
    """This process's resident memory in bytes: the daemons run in it."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def sink_server(path: Path, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Takes the passed pipe's read end and never reads it."""
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    kept: list[int] = []
    try:
        with listener:
            await listener.bind(str(path))
            path.chmod(0o666)
            listener.listen(4)
            task_status.started()
            while True:
                conn, _ = await listener.accept()
                _, ancillary, _, _ = await conn.recvmsg(100, socket.CMSG_SPACE(16))
                kept.extend(fds_of(ancillary))
                kept.append(conn.detach())
    finally:
        for fd in kept:
            os.close(fd)


FLOOD = 128 << 20
BOUND = 40 << 20


async def test_a_peer_ignoring_the_pipe_window_is_cut_off(
    tree: Tree, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    """A compromised DPU (valid certificate) opens a pipe channel and sends far beyond its window."""
    from offload.net import Transport, parse_address

    await nursery.start(sink_server, tree.allowed / "sink.sock")
    await nursery.start(root_server, tree, tree.allowed / "bus.sock", 0o666)
    before = rss()
    sent = 0
    with trio.fail_after(120):
        transport = Transport(TlsConfig.load(tree.base / "pki" / "dpu"))
        connected = await transport.connect(parse_address(f"unix://{tree.base}/peer.sock"))
        setup = wire.UdsProxyConnection(client=True)
        async with connected.stream as stream:
            await stream.send_all(setup.send(wire.Hello("attacker")))
            while not isinstance(event := setup.next_event(), wire.Hello):
                setup.receive_data(bytes(await stream.receive_some(65536)))
            await stream.send_all(setup.send(wire.Connect(str(tree.allowed / "sink.sock"), user="nobody")))
            while not isinstance(event := setup.next_event(), wire.Connected):
                if event is wire.NEED_DATA:
                    setup.receive_data(bytes(await stream.receive_some(65536)))
            assert event.error == ""
            # A pipe for the far program to read, then Data frames on its channel, ignoring the window.
            await stream.send_all(
                setup.send(wire.Fds((wire.FdDescription("pipe_r", channel=2),))) + setup.send(wire.Data(b"x"))
            )
            chunk = setup.send(wire.Data(b"f" * wire.MAX_DATA, 2))
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                while sent < FLOOD:
                    await stream.send_all(chunk)
                    sent += wire.MAX_DATA
            await trio.sleep(0.5)  # the daemon has read what the link buffered
            grown = rss() - before
    assert grown < BOUND, f"the daemon grew by {grown >> 20} MiB for {sent >> 20} MiB sent"
    assert sent < FLOOD, "the daemon took the whole flood"
    # The daemon still serves a good client.
    out = await attack(tree, CONNECT, str(tree.allowed / "bus.sock"))
    assert out.strip() == f"answer root secret for uid {NOBODY}"
