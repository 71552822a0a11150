"""The DPU's qtfs client against a malicious host: replies that break the rules.

A small fake server (`FakeHost`, in this process) speaks the raw qtfs
protocol on a UNIX socket: it mounts like a real server and then answers
chosen requests with what a compromised host could send.  The client is
the real `qtfs mount`, run by a DPU agent (tests/test_qtfs.py) in the
lab's DPU namespace and a private mount namespace of its own.  The
effects checked: the client lives on, its mount stays in place, the DPU's
own directory below the mount never shows through it, and later requests
are served.  The request deadline is checked on the link itself, in-process.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import trio

from offload.errors import RemoteProtocolError
from offload.net import Transport, parse_address
from offload.protocol import qtfs as wire
from offload.protocol.framing import encode_frame
from offload.qtfs.client import Link
from tests.test_qtfs import Agent

pytestmark = pytest.mark.lab


def _attr(ino: int, mode: int, size: int = 0) -> wire.Attr:
    return wire.Attr(ino, 77, mode, 1, 0, 0, 0, size, 0, 4096, 0, 0, 0)


ROOT = _attr(1, stat.S_IFDIR | 0o755)
GOOD = _attr(2, stat.S_IFREG | 0o644, 5)


class FakeHost:
    """A qtfs server that mounts anything and answers lookups by name.

    ``good``: a file; ``bad``: a reply whose attribute block is 5 bytes
    (it decodes as a reply, its content does not fit); ``garbage``: a frame
    of an unknown type (the stream itself is broken); ``silent``: never
    answered.  Everything else: ENOENT.  Each connection has its own thread.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(8)
        self.connections = 0
        self.threads: list[threading.Thread] = []
        self.sockets: list[socket.socket] = []
        self.closed = False
        self.acceptor = threading.Thread(target=self._accept, daemon=True)
        self.acceptor.start()

    @property
    def address(self) -> str:
        return f"unix://{self.path}"

    def _accept(self) -> None:
        while not self.closed:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            self.sockets.append(sock)
            thread = threading.Thread(target=self._serve, args=(sock,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _serve(self, sock: socket.socket) -> None:
        with sock:
            self._converse(sock)
        self.sockets.remove(sock)

    def _converse(self, sock: socket.socket) -> None:
        conn = wire.QtfsConnection(client=False)
        with contextlib.suppress(OSError, RemoteProtocolError):
            while True:
                data = sock.recv(1 << 16)
                if not data:
                    return
                conn.receive_data(data)
                while (event := conn.next_event()) is not wire.NEED_DATA:
                    if isinstance(event, wire.Hello):
                        sock.sendall(conn.send(wire.Hello("fake-host")))
                    elif isinstance(event, wire.Ping):
                        sock.sendall(conn.send(wire.Pong(event.token)))
                    elif isinstance(event, wire.Call):
                        answer = self._answer(conn, event)
                        if answer:
                            sock.sendall(answer)

    def _answer(self, conn: wire.QtfsConnection, call: wire.Call) -> bytes:
        request = call.request
        if isinstance(request, wire.Mount):
            return conn.send(wire.Result(call.id, wire.MountReply(ROOT.encode(), 0)))
        if isinstance(request, wire.Getattr) and request.path == b"":
            return conn.send(wire.Result(call.id, wire.AttrReply(ROOT.encode())))
        if isinstance(request, wire.Lookup | wire.Getattr):
            if request.path == b"good":
                return conn.send(wire.Result(call.id, wire.AttrReply(GOOD.encode())))
            if request.path == b"bad":
                return conn.send(wire.Result(call.id, wire.AttrReply(b"short")))
            if request.path == b"garbage":
                return encode_frame(0x7F, call.id, b"not a qtfs frame")
            if request.path == b"silent":
                return b""
        if isinstance(request, wire.Opendir) and request.path == b"":
            page = wire.encode_entry(b"good", GOOD.encode())
            return conn.send(wire.Result(call.id, wire.DirReply(0, 1, page)))
        return conn.send(wire.Failure(call.id, "ENOENT"))

    def close(self) -> None:
        self.closed = True
        self.listener.close()
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in [self.acceptor, *self.threads]:
            thread.join(10)


@pytest.fixture
def host(work: Path) -> Iterator[FakeHost]:
    fake = FakeHost(work / "fake.sock")
    try:
        yield fake
    finally:
        fake.close()


def _client(mountpoint: str) -> psutil.Process:
    (found,) = [
        p
        for p in psutil.process_iter(["cmdline"])
        if mountpoint in (p.info["cmdline"] or ()) and "mount" in (p.info["cmdline"] or ())
    ]
    return found


def _mounted_on(agent: Agent, mountpoint: str) -> list[str]:
    return agent(  # type: ignore[return-value]
        f"[f[f.index('-') + 1] for f in map(str.split, open('/proc/self/mountinfo')) if f[4] == {mountpoint!r}]"
    )


def _mount(agent: Agent, host: FakeHost, work: Path, keepalive: float = 30) -> str:
    mnt = str(work / "mnt")
    # What only the DPU's own directory holds: never to be seen through the mount.
    (work / "mnt" / "dpu-only").write_text("the DPU's own\n")
    source = host.address + ":/export"
    status, error = agent(f"mount('--insecure', '--keepalive', '{keepalive}', {source!r}, {mnt!r})")  # type: ignore[misc]
    assert status == 0, error
    return mnt


def test_a_malformed_reply_fails_one_call_and_the_mount_stays(work: Path, agent: Agent, host: FakeHost) -> None:
    mnt = _mount(agent, host, work)
    client = _client(mnt)
    assert agent(f"errname(os.stat, {mnt + '/bad'!r})") == "EIO"
    assert client.is_running() and client.status() != psutil.STATUS_ZOMBIE
    assert _mounted_on(agent, mnt) == ["fuse.qtfs"]
    # The DPU's own directory below never shows through the mount point.
    assert agent(f"os.path.exists({mnt + '/dpu-only'!r})") is False
    assert agent(f"sorted(os.listdir({mnt!r}))") == ["good"]
    # and the next request is served as usual
    assert agent(f"os.stat({mnt + '/good'!r}).st_size") == 5
    assert host.connections == 1


def test_a_broken_stream_ends_the_link_and_a_reconnect_serves_on(work: Path, agent: Agent, host: FakeHost) -> None:
    # The lookup is sent again on each new connection (it is idempotent) and
    # broken again, until the reconnect deadline (the keepalive) ends it with EIO.
    mnt = _mount(agent, host, work, keepalive=2)
    client = _client(mnt)
    assert agent(f"errname(os.stat, {mnt + '/garbage'!r})") == "EIO"
    assert client.is_running() and client.status() != psutil.STATUS_ZOMBIE
    assert _mounted_on(agent, mnt) == ["fuse.qtfs"]
    assert agent(f"os.path.exists({mnt + '/dpu-only'!r})") is False
    # A lookup is idempotent: it waits for the new connection and is served there.
    assert agent(f"os.stat({mnt + '/good'!r}).st_size") == 5
    assert host.connections >= 2


def test_an_unanswered_request_fails_with_eio_by_its_deadline_and_the_link_comes_back(
    work: Path, host: FakeHost
) -> None:
    async def main() -> tuple[str, int]:
        link = Link(Transport(None), parse_address(host.address), b"/export", keepalive=30, request_timeout=0.5)
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await nursery.start(link.run)
                try:
                    with pytest.raises(OSError) as caught:
                        await link.call(wire.Lookup(b"silent"), retry=False)
                    reply = await link.call(wire.Lookup(b"good"))
                    assert isinstance(reply, wire.AttrReply)
                    return errno.errorcode[caught.value.errno or 0], wire.Attr.decode_from(reply.attr).size
                finally:
                    nursery.cancel_scope.cancel()

    assert trio.run(main) == ("EIO", 5)
    assert host.connections == 2
