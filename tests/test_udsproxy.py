"""udsproxyd: two daemons in-process over real sockets with TLS, and the real shim."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import trio

from offload import pki, proc
from offload.pki import TlsConfig
from offload.protocol.fdpass import MAX_FDS
from offload.protocol.framing import FrameDecoder, encode_frame
from offload.protocol.udsproxy import SHIM_NOT_CARRIED
from offload.udsproxy.daemon import ProxyConfig, serve

NATIVE = Path(__file__).resolve().parent.parent / "offload" / "_native"


@pytest.fixture
async def pair(tmp_path: Path, nursery: trio.Nursery) -> Path:
    """Daemon A (the DPU side, shim socket) and B (the host side, where sockets live)."""
    from offload.net import ConnectionLimits, Transport

    # Five hundred connections at once from one uid and one peer: above the default per-peer limit.
    limits = ConnectionLimits(per_peer=1024)
    pki.init(tmp_path / "pki", pki.HOST_AND_DPU)
    (tmp_path / "remote").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "files").mkdir()
    share = (str(tmp_path / "files"),)
    # These tests connect as root: the host side maps root to root (its default is nobody).
    host = ProxyConfig(
        (f"unix://{tmp_path}/peer.sock",),
        "",
        (str(tmp_path / "remote"),),
        str(tmp_path / "b"),
        "host",
        share,
        user_map=("root=root",),
    )
    dpu = ProxyConfig((), f"unix://{tmp_path}/peer.sock", (str(tmp_path),), str(tmp_path / "a"), "dpu", share)
    await nursery.start(serve, host, Transport(TlsConfig.load(tmp_path / "pki" / "host"), limits=limits))
    await nursery.start(serve, dpu, Transport(TlsConfig.load(tmp_path / "pki" / "dpu"), limits=limits))
    await nursery.start(echo_server, str(tmp_path / "remote" / "echo.sock"), socket.SOCK_STREAM)
    await nursery.start(echo_server, str(tmp_path / "remote" / "packets.sock"), socket.SOCK_SEQPACKET)
    return tmp_path


async def echo_server(path: str, kind: int, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Stream: reads to end of file, then answers "got:" + everything.  Seqpacket: echoes each packet."""
    listener = trio.socket.socket(socket.AF_UNIX, kind)
    await listener.bind(path)
    listener.listen(64)
    task_status.started()

    async def one(conn: trio.socket.SocketType) -> None:
        with conn, contextlib.suppress(OSError):  # a client may vanish (the restart test)
            if kind == socket.SOCK_SEQPACKET:
                while packet := await conn.recv(65536):
                    await conn.send(b"echo:" + packet)
                return
            data = b""
            while chunk := await conn.recv(65536):
                data += chunk
            await conn.send(b"got:" + data)

    async with trio.open_nursery() as nursery:
        while True:
            conn, _ = await listener.accept()
            nursery.start_soon(one, conn)


async def ask(tree: Path, path: str, kind: int = socket.SOCK_STREAM) -> tuple[int, trio.socket.SocketType | None]:
    """Speak the shim's request to daemon A, as libudsproxy.so does."""
    return await ask_via(tree / "a", path, kind)


async def ask_via(
    run_dir: Path, path: str, kind: int = socket.SOCK_STREAM
) -> tuple[int, trio.socket.SocketType | None]:
    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        await sock.connect(str(run_dir / "udsproxy.sock"))
        await sock.send(encode_frame(0x50, 0, struct.pack("!H", kind) + path.encode()))
        data, ancdata, _, _ = await sock.recvmsg(64, socket.CMSG_SPACE(8))
    frame = FrameDecoder()
    frame.receive_data(data)
    reply = frame.next_frame()
    (error,) = struct.unpack("!I", reply.payload)  # type: ignore[union-attr]
    fds = [struct.unpack("i", payload[:4])[0] for _, _, payload in ancdata]
    if not fds:
        return error, None
    return error, trio.socket.from_stdlib_socket(socket.socket(fileno=fds[0]))


async def test_stream_round_trip_with_half_close(pair: Path) -> None:
    with trio.fail_after(20):
        error, sock = await ask(pair, str(pair / "remote" / "echo.sock"))
        assert error == 0 and sock is not None
        with sock:
            await sock.send(b"hello ")
            await sock.send(b"world")
            sock.shutdown(socket.SHUT_WR)  # the server answers only after end of file
            reply = b""
            while chunk := await sock.recv(1024):
                reply += chunk
    assert reply == b"got:hello world"


async def test_seqpacket_keeps_message_boundaries(pair: Path) -> None:
    with trio.fail_after(20):
        error, sock = await ask(pair, str(pair / "remote" / "packets.sock"), socket.SOCK_SEQPACKET)
        assert error == 0 and sock is not None
        with sock:
            await sock.send(b"one")
            await sock.send(b"two")
            assert await sock.recv(100) == b"echo:one"
            assert await sock.recv(100) == b"echo:two"


@pytest.mark.parametrize(
    ("relative", "expected"),
    [
        ("remote/missing.sock", errno.ENOENT),
        ("other/x.sock", errno.EACCES),  # allowed on the DPU side, not on the host side
        ("remote/../remote/echo.sock", errno.EINVAL),
    ],
)
async def test_errors_reach_the_caller(pair: Path, relative: str, expected: int) -> None:
    with trio.fail_after(20):
        error, sock = await ask(pair, f"{pair}/{relative}")
    assert (error, sock) == (expected, None)


async def test_refused_connection(pair: Path) -> None:
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(pair / "remote" / "dead.sock"))  # bound, never listening
    try:
        with trio.fail_after(20):
            assert (await ask(pair, str(pair / "remote" / "dead.sock")))[0] == errno.ECONNREFUSED
    finally:
        dead.close()


async def test_outside_the_local_allowlist_never_leaves(pair: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Not carried here: the shim is told so and connect() keeps its own error (ENOENT, say)."""
    with trio.fail_after(20):
        assert (await ask(pair, "/run/elsewhere.sock"))[0] == SHIM_NOT_CARRIED
    assert "not carrying /run/elsewhere.sock: not under an --allow prefix here" in caplog.text


async def test_five_hundred_connections_at_once(pair: Path) -> None:
    results: list[bytes] = []

    async def one(n: int) -> None:
        error, sock = await ask(pair, str(pair / "remote" / "echo.sock"))
        assert error == 0 and sock is not None
        with sock:
            await sock.send(str(n).encode())
            sock.shutdown(socket.SHUT_WR)
            results.append(await sock.recv(100))

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for n in range(500):
                nursery.start_soon(one, n)
    assert sorted(results) == sorted(f"got:{n}".encode() for n in range(500))


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a private mount namespace")
@pytest.mark.skipif(not (NATIVE / "libudsproxy.so").exists(), reason="the shim is not built (run make setup)")
async def test_real_program_under_the_shim(pair: Path) -> None:
    """In its own mount namespace the socket's directory is empty: the path exists only "on the host"."""
    client = textwrap.dedent(
        """
        import os, socket, sys
        assert not os.path.exists(sys.argv[1])
        s = socket.socket(socket.AF_UNIX)
        s.connect(sys.argv[1])
        s.sendall(b"from the dpu")
        s.shutdown(socket.SHUT_WR)
        print(s.recv(100).decode())
        """
    )
    remote = pair / "remote"
    env = dict(
        os.environ,
        LD_PRELOAD=str(NATIVE / "libudsproxy.so"),
        LD_BIND_NOW="1",
        UDSPROXY_SOCKET=str(pair / "a" / "udsproxy.sock"),
    )
    with trio.fail_after(30):
        result = await trio.run_process(
            proc.with_hidden_dir(remote, [sys.executable, "-c", client, str(remote / "echo.sock")]),
            env=env,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().strip() == "got:from the dpu"


async def test_restart_of_the_peer_daemon(pair: Path, tmp_path: Path) -> None:
    """Connections through a daemon that stops fail cleanly; new ones work once it is back."""
    from offload.net import Transport

    second = ProxyConfig(
        (f"unix://{tmp_path}/peer2.sock",),
        "",
        (str(tmp_path / "remote"),),
        str(tmp_path / "b2"),
        "host2",
        user_map=("root=root",),
    )
    via = ProxyConfig((), f"unix://{tmp_path}/peer2.sock", (str(tmp_path),), str(tmp_path / "a2"), "dpu2")
    host_tls = Transport(TlsConfig.load(tmp_path / "pki" / "host"))
    async with trio.open_nursery() as nursery:
        await nursery.start(serve, via, Transport(TlsConfig.load(tmp_path / "pki" / "dpu")))
        with trio.fail_after(30):
            peer_scope = trio.CancelScope()

            async def run_peer(task_status=trio.TASK_STATUS_IGNORED) -> None:
                with peer_scope:
                    await serve(second, host_tls, task_status=task_status)

            await nursery.start(run_peer)
            error, old = await ask_via(tmp_path / "a2", str(pair / "remote" / "echo.sock"))
            assert error == 0 and old is not None
            await old.send(b"before")
            peer_scope.cancel()
            # The old connection ends (end of file or reset), it does not hang.
            with old:
                try:
                    while await old.recv(100):
                        pass
                except OSError:
                    pass
            assert (await ask_via(tmp_path / "a2", str(pair / "remote" / "echo.sock")))[0] == errno.EHOSTUNREACH
            await nursery.start(serve, second, host_tls)
            error, new = await ask_via(tmp_path / "a2", str(pair / "remote" / "echo.sock"))
            assert error == 0 and new is not None
            with new:
                await new.send(b"after")
                new.shutdown(socket.SHUT_WR)
                assert await new.recv(100) == b"got:after"
        nursery.cancel_scope.cancel()


async def test_uncarriable_fd_passed_without_the_shim_ends_the_connection(
    pair: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Without the shim nobody can fail the sendmsg: the connection ends, loudly, and the fd is closed."""
    with trio.fail_after(20):
        error, sock = await ask(pair, str(pair / "remote" / "echo.sock"))
        assert error == 0 and sock is not None
        one, other = socket.socketpair()  # a socket cannot be carried
        try:
            with sock:
                await sock.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", one.fileno()))])
                with contextlib.suppress(OSError):
                    while await sock.recv(100):
                        pass
        finally:
            one.close()
        # The daemon's copy was closed: the other end sees end of file.
        other.settimeout(5)
        assert other.recv(1) == b""
        other.close()
    assert "cannot be carried; ending the connection" in caplog.text


FD_CLIENT = textwrap.dedent(
    """
    import errno, os, socket, sys
    path, files = sys.argv[1], sys.argv[2]
    assert not os.path.exists(path)
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    s.sendall(b"before;")
    f = os.open(files + "/data.txt", os.O_RDONLY)
    os.lseek(f, 6, os.SEEK_SET)
    to_far_r, to_far_w = os.pipe()  # the far side reads what we write
    from_far_r, from_far_w = os.pipe()  # the far side writes, we read
    assert socket.send_fds(s, [b"fds;"], [f, to_far_r, from_far_w]) == 4
    for fd in (f, to_far_r, from_far_w):
        os.close(fd)
    os.write(to_far_w, b"through the pipe")
    os.close(to_far_w)
    s.sendall(b"after")
    s.shutdown(socket.SHUT_WR)
    reply = b""
    while chunk := s.recv(1000):
        reply += chunk
    print(reply.decode())
    back = b""
    while chunk := os.read(from_far_r, 100):
        back += chunk
    print(back.decode())
    # What cannot be carried fails that sendmsg (EOPNOTSUPP, which Python names ENOTSUP), and the connection goes on.
    for bad in ("socket", "unshared file"):
        s2 = socket.socket(socket.AF_UNIX)
        s2.connect(path)
        other = socket.socketpair()[0] if bad == "socket" else open("/etc/hostname")
        try:
            socket.send_fds(s2, [b"x"], [other.fileno()])
            print(bad, "sent")
        except OSError as exc:
            print(bad, errno.errorcode[exc.errno])
        s2.sendall(b"still works")
        s2.shutdown(socket.SHUT_WR)
        print(s2.recv(1000).decode())
    """
)


def fd_server(path: str, stop: threading.Event) -> threading.Thread:
    """Blocking server in a thread: collects bytes and fds to end of file, uses the fds, answers."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(8)
    listener.settimeout(0.2)

    def one(conn: socket.socket) -> None:
        with conn:
            data, received, with_fds = b"", [], b""
            while True:
                chunk, fds, _, _ = socket.recv_fds(conn, 4096, 16)
                if not chunk:
                    break
                data += chunk
                if fds:
                    received += fds
                    with_fds = data
            if not received:
                conn.sendall(b"got:" + data)
                return
            text = os.read(received[0], 100)
            piped = b""
            while part := os.read(received[1], 100):
                piped += part
            os.write(received[2], b"back through a pipe")
            for fd in received:
                os.close(fd)
            conn.sendall(b"|".join([data, with_fds, text, piped, str(len(received)).encode()]))

    def serve() -> None:
        with listener:
            while not stop.is_set():
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    continue
                conn.settimeout(None)
                threading.Thread(target=one, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a private mount namespace")
@pytest.mark.skipif(not (NATIVE / "libudsproxy.so").exists(), reason="the shim is not built (run make setup)")
async def test_fds_passed_by_a_real_program(pair: Path) -> None:
    """A file and both ends of pipes cross over with the bytes they were sent with; others fail that sendmsg."""
    (pair / "files" / "data.txt").write_bytes(b"0123456789abcdef")
    stop = threading.Event()
    server = fd_server(str(pair / "remote" / "fds.sock"), stop)
    before = open_fds()
    env = dict(
        os.environ,
        LD_PRELOAD=str(NATIVE / "libudsproxy.so"),
        LD_BIND_NOW="1",
        UDSPROXY_SOCKET=str(pair / "a" / "udsproxy.sock"),
    )
    remote = pair / "remote"
    try:
        with trio.fail_after(30):
            result = await trio.run_process(
                proc.with_hidden_dir(
                    remote, [sys.executable, "-c", FD_CLIENT, str(remote / "fds.sock"), str(pair / "files")]
                ),
                env=env,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
            assert result.returncode == 0, result.stderr
            lines = result.stdout.decode().splitlines()
            # All bytes in order; the fds came with the recvmsg that ended with the bytes they were sent with.
            assert lines[0] == "before;fds;after|before;fds;|6789abcdef|through the pipe|3"
            assert lines[1] == "back through a pipe"
            assert lines[2:] == [
                "socket ENOTSUP",
                "got:still works",
                "unshared file ENOTSUP",
                "got:still works",
            ]
            # Every fd the daemons took or made is closed once the connections end.
            while open_fds() - before:
                await trio.sleep(0.05)
    finally:
        stop.set()
        server.join()


async def raw_shim_request(tree: Path, data: bytes, fds: list[int] | None = None) -> bytes:
    """Send bytes (and fds) to daemon A's shim socket as a broken shim might; return the answer."""
    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        await sock.connect(str(tree / "a" / "udsproxy.sock"))
        if fds:
            await sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))])
        else:
            await sock.send(data)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := await sock.recv(100):
            answer += chunk
    return answer


def answer_of(kind: int, code: int) -> bytes:
    return encode_frame(kind, 0, struct.pack("!I", code))


@pytest.mark.parametrize(
    ("request_bytes", "answer", "logged"),
    [
        (b"GET / HTTP/1.0\r\n\r\n", b"", "bad frame magic"),
        (encode_frame(0x50, 0, b"\x00\x01/run/x.sock")[:14], b"", "it ended after 14 bytes"),
        (b"OF\x01\x50\x00\x00\x00\x00\xff\xff\xff\xff", b"", "exceeds the limit"),
        (encode_frame(0x77, 0, b"what"), b"", "frame type 0x77"),
        (encode_frame(0x50, 0, b"\x00"), answer_of(0x51, errno.EINVAL), "connect request of 1 bytes"),
        (encode_frame(0x50, 0, b"\x00\x01/run/a\x00b.sock"), answer_of(0x51, errno.EINVAL), "path contains NUL"),
        (encode_frame(0x50, 0, b"\x00\x01/" + b"x" * 200), answer_of(0x51, errno.EINVAL), "does not fit a sockaddr_un"),
        (encode_frame(0x52, 0, b"data"), answer_of(0x53, errno.EINVAL), "bad fd request from the shim: 0 fds"),
    ],
    ids=["not-a-frame", "truncated", "oversized", "unknown-type", "short", "nul", "too-long", "fds-without-fds"],
)
async def test_malformed_shim_requests(
    pair: Path, caplog: pytest.LogCaptureFixture, request_bytes: bytes, answer: bytes, logged: str
) -> None:
    with trio.fail_after(20):
        assert await raw_shim_request(pair, request_bytes) == answer
        assert logged in caplog.text
        # The daemon goes on serving.
        error, sock = await ask(pair, str(pair / "remote" / "echo.sock"))
        assert error == 0 and sock is not None
        sock.close()


async def test_a_request_sent_a_byte_at_a_time_with_fds_is_cut_off(
    pair: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The daemon holds no more fds than one sendmsg carries while a request arrives in pieces."""
    request = encode_frame(0x52, 0, b"x" * 1000)
    read_end, write_end = os.pipe()
    try:
        with trio.fail_after(20), trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            await sock.connect(str(pair / "a" / "udsproxy.sock"))
            before = open_fds()
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", read_end))]
            sent = 0
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                for at in range(MAX_FDS + 50):
                    await sock.sendmsg([request[at : at + 1]], rights)
                    sent += 1
            assert sent > MAX_FDS
            # Refused well before the request timeout (closed with our bytes unread: a reset),
            # with every fd it received closed.
            try:
                answer = await sock.recv(100)
            except ConnectionResetError:
                answer = b""
            assert answer == b""
            assert "too many fds" in caplog.text
            while open_fds() - before:
                await trio.sleep(0.05)
            error, carried = await ask(pair, str(pair / "remote" / "echo.sock"))
            assert error == 0 and carried is not None
            carried.close()
    finally:
        os.close(read_end)
        os.close(write_end)


async def test_fd_request_for_a_socket_that_was_never_carried(pair: Path) -> None:
    one, other = socket.socketpair()
    read_end, write_end = os.pipe()
    try:
        with trio.fail_after(20):
            answer = await raw_shim_request(pair, encode_frame(0x52, 0, b"x"), [one.fileno(), read_end])
        assert answer == answer_of(0x53, errno.EPIPE)
    finally:
        for fd in (read_end, write_end):
            os.close(fd)
        one.close()
        other.close()


@pytest.mark.parametrize(
    ("kind", "path", "expected"),
    [
        (socket.SOCK_DGRAM, "remote/echo.sock", errno.EPROTOTYPE),  # a type that is not carried
        (socket.SOCK_STREAM, "remote/./../remote/echo.sock", errno.EINVAL),
    ],
)
async def test_refused_requests(pair: Path, kind: int, path: str, expected: int) -> None:
    with trio.fail_after(20):
        assert (await ask(pair, f"{pair}/{path}", kind))[0] == expected


async def speak_to_peer_listener(tree: Path, frames: list[bytes]) -> bytes:
    """Authenticate as the DPU to daemon B, say Hello, then send raw frames; return all it sent back."""
    from offload.net import Transport, parse_address
    from offload.protocol.udsproxy import Hello, UdsProxyConnection

    transport = Transport(TlsConfig.load(tree / "pki" / "dpu"))
    connected = await transport.connect(parse_address(f"unix://{tree}/peer.sock"))
    answer = b""
    async with connected.stream:
        await connected.stream.send_all(UdsProxyConnection(client=True).send(Hello("tester")))
        for frame in frames:
            await connected.stream.send_all(frame)
        with contextlib.suppress(trio.BrokenResourceError):
            while chunk := await connected.stream.receive_some(65536):
                answer += chunk
    return answer


@pytest.mark.parametrize(
    ("payload", "logged"),
    [
        ({"path": "/tmp/../etc/x.sock", "type": "stream", "user": "root"}, "has a '..' component"),
        ({"path": "/" + "x" * 300, "type": "stream", "user": "root"}, "does not fit a sockaddr_un"),
        ({"path": "/tmp/x.sock", "type": "dgram", "user": "root"}, "is not carried"),
        ({"path": 7, "type": "stream", "user": "root"}, "wrong type"),
    ],
    ids=["dotdot", "too-long", "dgram", "not-a-string"],
)
async def test_malformed_requests_from_the_peer(
    pair: Path, caplog: pytest.LogCaptureFixture, payload: dict, logged: str
) -> None:
    from offload.protocol import messages

    with trio.fail_after(20):
        answer = await speak_to_peer_listener(pair, [encode_frame(0x60, 0, messages.dump(payload))])
        assert b"Connected" not in answer and answer.count(b"OF") == 1  # its Hello, then it hung up
        assert logged in caplog.text
        error, sock = await ask(pair, str(pair / "remote" / "echo.sock"))
        assert error == 0 and sock is not None
        sock.close()


async def test_garbage_on_an_open_connection_ends_only_that_connection(
    pair: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from offload.protocol import messages

    connect = encode_frame(
        0x60, 0, messages.dump({"path": str(pair / "remote" / "echo.sock"), "type": "stream", "user": "root"})
    )
    with trio.fail_after(20):
        await speak_to_peer_listener(pair, [connect, encode_frame(0x99, 1, b"??")])
        assert "unknown udsproxy frame type 0x99" in caplog.text
        error, sock = await ask(pair, str(pair / "remote" / "echo.sock"))
        assert error == 0 and sock is not None
        with sock:
            await sock.send(b"fine")
            sock.shutdown(socket.SHUT_WR)
            assert await sock.recv(100) == b"got:fine"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a private mount namespace")
@pytest.mark.skipif(not (NATIVE / "libudsproxy.so").exists(), reason="the shim is not built (run make setup)")
async def test_errors_reach_a_real_program(pair: Path) -> None:
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(pair / "remote" / "dead.sock"))  # bound, never listening
    client = textwrap.dedent(
        """
        import errno, socket, sys
        for path in sys.argv[1:]:
            try:
                socket.socket(socket.AF_UNIX).connect(path)
                print("connected")
            except OSError as exc:
                print(errno.errorcode[exc.errno])
        """
    )
    paths = [
        pair / "remote" / "missing.sock",
        pair / "remote" / "dead.sock",
        pair / "other" / "x.sock",
        Path("/run/x.sock"),
    ]
    env = dict(os.environ, LD_PRELOAD=str(NATIVE / "libudsproxy.so"), UDSPROXY_SOCKET=str(pair / "a" / "udsproxy.sock"))
    try:
        with trio.fail_after(30):
            result = await trio.run_process(
                proc.with_hidden_dir(pair / "remote", [sys.executable, "-c", client, *map(str, paths)]),
                env=env,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
    finally:
        dead.close()
    assert result.returncode == 0, result.stderr
    # Missing and refused over there; refused by the host's allowlist; not carried here (its own ENOENT).
    assert result.stdout.decode().split() == ["ENOENT", "ECONNREFUSED", "EACCES", "ENOENT"]


BULK_PIPE_CLIENT = textwrap.dedent(
    """
    import hashlib, os, socket, sys, threading
    s = socket.socket(socket.AF_UNIX)
    s.connect(sys.argv[1])
    r, w = os.pipe()
    socket.send_fds(s, [b"P"], [r])
    os.close(r)
    block = bytes(range(256)) * 4096  # 1 MiB
    digest = hashlib.sha256()
    def feed():
        for _ in range(24):
            os.write(w, block)
            digest.update(block)
        os.close(w)
    writer = threading.Thread(target=feed)
    writer.start()
    # While the pipe's bytes flow (and the far reader is slow), the socket still answers.
    for n in range(20):
        s.sendall(b"ping%d;" % n)
        assert s.recv(100) == b"pong%d;" % n
    writer.join()
    s.shutdown(socket.SHUT_WR)
    print(s.recv(100).decode() == digest.hexdigest())
    """
)


def bulk_pipe_server(path: str) -> threading.Thread:
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(1)

    def serve() -> None:
        import hashlib
        import time

        conn, _ = listener.accept()
        listener.close()
        with conn:
            _, fds, _, _ = socket.recv_fds(conn, 1, 1)
            digest = hashlib.sha256()

            def drain() -> None:
                while chunk := os.read(fds[0], 65536):
                    digest.update(chunk)
                    time.sleep(0.002)  # a slow reader
                os.close(fds[0])

            reader = threading.Thread(target=drain)
            reader.start()
            while data := conn.recv(100):
                conn.sendall(data.replace(b"ping", b"pong"))
            reader.join()
            conn.sendall(digest.hexdigest().encode())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a private mount namespace")
@pytest.mark.skipif(not (NATIVE / "libudsproxy.so").exists(), reason="the shim is not built (run make setup)")
async def test_a_slow_pipe_reader_does_not_stall_the_socket(pair: Path) -> None:
    server = bulk_pipe_server(str(pair / "remote" / "bulk.sock"))
    env = dict(os.environ, LD_PRELOAD=str(NATIVE / "libudsproxy.so"), UDSPROXY_SOCKET=str(pair / "a" / "udsproxy.sock"))
    with trio.fail_after(60):
        result = await trio.run_process(
            proc.with_hidden_dir(
                pair / "remote", [sys.executable, "-c", BULK_PIPE_CLIENT, str(pair / "remote" / "bulk.sock")]
            ),
            env=env,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    server.join(10)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().strip() == "True"


async def test_fds_passed_by_the_far_program_reach_the_caller(pair: Path, nursery: trio.Nursery) -> None:
    """The side where the socket lives needs no shim: fds its program sends arrive with their bytes."""
    (pair / "files" / "answer.txt").write_bytes(b"the file from over there")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(pair / "remote" / "giver.sock"))
    listener.listen(1)

    def give() -> None:
        conn, _ = listener.accept()
        listener.close()
        with conn:
            read_end, write_end = os.pipe()
            fd = os.open(pair / "files" / "answer.txt", os.O_RDONLY)
            os.lseek(fd, 4, os.SEEK_SET)
            conn.sendall(b"first;")
            socket.send_fds(conn, [b"with fds;"], [fd, read_end])
            for each in (fd, read_end):
                os.close(each)
            os.write(write_end, b"piped from over there")
            os.close(write_end)
            conn.sendall(b"last")

    giver = threading.Thread(target=give, daemon=True)
    giver.start()
    with trio.fail_after(20):
        error, sock = await ask(pair, str(pair / "remote" / "giver.sock"))
        assert error == 0 and sock is not None
        received: list[int] = []
        data = b""
        with sock:
            while True:
                chunk, ancillary, _, _ = await sock.recvmsg(100, socket.CMSG_SPACE(16))
                if not chunk:
                    break
                data += chunk
                for _, _, payload in ancillary:
                    received += list(struct.unpack(f"{len(payload) // 4}i", payload))
                    assert data.endswith(b"with fds;")
        assert data == b"first;with fds;last"
        assert len(received) == 2
        assert os.read(received[0], 100) == b"file from over there"
        piped = b""
        while part := await trio.to_thread.run_sync(os.read, received[1], 100):
            piped += part
        assert piped == b"piped from over there"
        for fd in received:
            os.close(fd)
    giver.join(5)


def test_fds_in_an_empty_packet_are_closed_once_sent() -> None:
    """A zero-length SOCK_SEQPACKET message delivers its fds: the relay closes its copies though it sent no byte."""
    from types import SimpleNamespace

    from offload.udsproxy.relay import Relay

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    read_end, write_end = os.pipe()
    passed = [os.dup(read_end)]
    kept = passed[0]
    with ours, theirs:
        relay = SimpleNamespace(local=ours, _program_gone=lambda: None)
        assert Relay._send_local(relay, b"", passed) == 0  # type: ignore[arg-type]
        assert passed == []
        with pytest.raises(OSError, match="Bad file descriptor"):
            os.fstat(kept)
        _, fds, _, _ = socket.recv_fds(theirs, 10, 1)
        assert len(fds) == 1
        os.close(fds[0])
    os.close(read_end)
    os.close(write_end)


def test_materialize_checks_the_receiving_sides_share(tmp_path: Path) -> None:
    from offload import users
    from offload.fdpass import materialize
    from offload.protocol.fdpass import FdDescription

    root = users.local_user(0, 0, (0,))
    share = tmp_path / "share"
    share.mkdir()
    (tmp_path / "secret").write_text("not shared")
    (share / "ok.txt").write_text("0123456789")
    (share / "other.txt").write_text("another file")
    (share / "escape").symlink_to(tmp_path)  # a directory link leading out of the share
    ok = (share / "ok.txt").stat()
    fd, kept = materialize(
        FdDescription("file", path=str(share / "ok.txt"), offset=3, dev=ok.st_dev, ino=ok.st_ino), (str(share),), root
    )
    assert kept is None and os.read(fd, 3) == b"345"
    os.close(fd)
    refused = (
        share / "escape" / "secret",  # a link out of the share, even for root
        tmp_path / "secret",  # not under the share
        share / "other.txt",  # under the share, but not the file the sender had
    )
    for path in refused:
        with pytest.raises(OSError) as failure:
            materialize(FdDescription("file", path=str(path), dev=ok.st_dev, ino=ok.st_ino), (str(share),), root)
        assert failure.value.errno == errno.EACCES


def test_a_chrooted_senders_files_are_named_as_it_sees_them(tmp_path: Path) -> None:
    """libvirtd runs chrooted in /another_rootfs: its files travel by their path inside that root."""
    from offload.fdpass import prepare

    (tmp_path / "var" / "lib" / "libvirt").mkdir(parents=True)
    image = tmp_path / "var" / "lib" / "libvirt" / "disk.img"
    image.write_bytes(b"x" * 100)
    fd = os.open(image, os.O_RDWR | os.O_APPEND)
    try:
        description, kept = prepare(fd, ("/var/lib/libvirt",), root=str(tmp_path))
        assert (description.path, description.access, description.append, kept) == (
            "/var/lib/libvirt/disk.img",
            "rw",
            True,
            None,
        )
    finally:
        os.close(fd)


def test_a_peer_cannot_make_a_connection_hold_more_pipes_than_its_cap() -> None:
    """Each pipe a peer passes holds an fd of the daemon's: past MAX_PIPES they are refused, and the connection goes on."""
    from offload import users
    from offload.protocol import udsproxy as wire
    from offload.protocol.fdpass import FdDescription
    from offload.udsproxy.relay import MAX_PIPES, PlainCipher, Relay, fds_of

    link, peer_link = socket.socketpair()
    local, program = socket.socketpair()
    relay = Relay(link, PlainCipher(), local, client=False, user=users.local_user(os.getuid(), os.getgid()), name="t")
    thread = threading.Thread(target=relay.run)
    thread.start()
    peer = wire.UdsProxyConnection.opened(client=True)
    before = len(os.listdir("/proc/self/fd"))
    answers: list[str] = []
    try:
        per_message = 8
        for message in range(MAX_PIPES // per_message + 3):
            first = 2 + 2 * per_message * message  # the client numbers even channels
            pipes = tuple(FdDescription("pipe_r", channel=first + 2 * i) for i in range(per_message))
            peer_link.sendall(peer.send(wire.Fds(pipes)) + peer.send(wire.Data(b"x")))
            while True:
                event = peer.next_event()
                if event is wire.NEED_DATA:
                    peer.receive_data(peer_link.recv(65536))
                elif isinstance(event, wire.FdsResult):
                    answers.append(event.error)
                    break
            if not answers[-1]:  # delivered: the program takes its read ends and closes them
                _, ancillary, _, _ = program.recvmsg(16, socket.CMSG_SPACE(4 * per_message))
                for fd in fds_of(ancillary):
                    os.close(fd)
        during = len(os.listdir("/proc/self/fd"))
        peer_link.sendall(peer.send(wire.Data(b"still here")))
        assert program.recv(64) == b"still here"
    finally:
        relay.stop()
        thread.join(10)
        for sock in (peer_link, program):
            sock.close()
    assert answers == [""] * (MAX_PIPES // per_message) + ["EMFILE"] * 3
    assert during - before <= MAX_PIPES


def test_a_message_of_no_bytes_that_carries_fds_is_not_the_end_of_the_stream() -> None:
    """On a SOCK_SEQPACKET socket an empty message may carry fds; what the program sends after it still goes."""
    from offload import users
    from offload.protocol import udsproxy as wire
    from offload.udsproxy.relay import PlainCipher, Relay

    link, peer_link = socket.socketpair()
    local, program = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    user = users.local_user(os.getuid(), os.getgid())
    relay = Relay(link, PlainCipher(), local, client=True, seqpacket=True, user=user, name="t")
    thread = threading.Thread(target=relay.run)
    thread.start()
    peer = wire.UdsProxyConnection.opened(client=False)
    read_end, write_end = os.pipe()
    events: list = []
    try:
        program.sendmsg([b""], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", read_end))])
        program.send(b"after")
        peer_link.settimeout(10)
        while not any(isinstance(e, wire.Data) and bytes(e.data) == b"after" for e in events):
            if any(isinstance(e, wire.Eof) for e in events):
                break
            event = peer.next_event()
            if event is wire.NEED_DATA:
                peer.receive_data(peer_link.recv(65536))
            else:
                events.append(event)
    finally:
        relay.stop()
        thread.join(10)
        for fd in (read_end, write_end):
            os.close(fd)
        for sock in (peer_link, program):
            sock.close()
    kinds = [type(e).__name__ for e in events]
    assert not any(isinstance(e, wire.Eof) for e in events), kinds
    assert isinstance(events[0], wire.Fds) and events[0].fds[0].kind == "pipe_r", kinds
    assert bytes(events[-1].data) == b"after", kinds
