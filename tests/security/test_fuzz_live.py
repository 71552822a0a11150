"""The running daemons' listeners, fuzzed over real sockets for a bounded time.

test_fuzz_decoders.py feeds the sans-io decoders; here the real daemons run
as processes of their own (as in test_floods.py) and every listener gets,
for a few seconds each: (1) garbage before authentication (random bytes,
cut and flipped TLS ClientHellos, frames where TLS belongs, bytes dribbled
slowly, then an abrupt close), and (2) after a real mutual-TLS handshake
with a valid certificate of the right role (or, on the local sockets, as
the local user the socket serves), frames made with the project's own
encoders and then mutated: frame types of any value, flipped bytes, wrong
and oversized length fields, valid headers around JSON of the wrong shape,
fds passed where none are due, all split at random points.

Judged by effect, never by log text: afterwards the daemon's same pid is
alive, a good client still gets real work done (a marker file a program
creates, an echoed message, a file read), its memory did not balloon, and
the connections it served are gone from its fd table once they closed.

The fuzz is seeded: a failure prints ``OFFLOAD_FUZZ_SEED=N``, which
replays the same cases (per worker; their interleaving may differ).
``OFFLOAD_FUZZ_SECONDS`` is each phase's budget per listener.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import ssl
import struct
import subprocess
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import trio

from offload.errors import OffloadError
from offload.net import Transport, parse_address
from offload.pki import TlsConfig
from offload.protocol import local, messages
from offload.protocol import qtfs as qtfs_wire
from offload.protocol import rexec as rexec_wire
from offload.protocol import udsproxy as udsproxy_wire
from offload.protocol.framing import HEADER, HEADER_SIZE, MAGIC, VERSION, encode_frame
from tests.conftest import wait_for
from tests.security.test_floods import (
    ask_shim,
    daemons,
    echo_server,
    read_through_qtfs,
    rexec_args,
    standin,
    start,
    tree,
    wait_listening,
)

__all__ = ["daemons", "tree"]  # the fixtures, shared by import

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the whitelist must be root-owned")

SEED = int(os.environ.get("OFFLOAD_FUZZ_SEED") or random.SystemRandom().randrange(1 << 32))
#: Seconds of each phase (garbage, then authenticated frames) on each listener.
BUDGET = float(os.environ.get("OFFLOAD_FUZZ_SECONDS") or 2.0)
#: Connections in flight at once on one listener.
WORKERS = 3
#: The longest one case may take (a slow dribble included); a case cut short is counted, not failed.
CASE_TIMEOUT = 3.0
#: How much the daemon's resident memory may grow while fuzzed, and how many fds it may keep beyond its start.
RSS_SLACK = 200 << 20
FD_SLACK = 8


# -- what happened -----------------------------------------------------------------------------


@dataclass
class Tally:
    """What one phase on one listener did, so that a vacuous fuzz cannot pass unnoticed."""

    cases: int = 0
    connected: int = 0  # connections made (authenticated, on the TLS listeners)
    answered: int = 0  # connections on which the daemon sent something back
    cut: int = 0  # cases that hit CASE_TIMEOUT
    refused: int = 0  # connects or handshakes that failed
    recent: deque[str] = field(default_factory=lambda: deque(maxlen=12))

    def __str__(self) -> str:
        return (
            f"{self.cases} cases, {self.connected} connected, {self.answered} answered, "
            f"{self.cut} cut at the timeout, {self.refused} refused; last cases: {list(self.recent)}"
        )


@dataclass
class Vitals:
    pid: int
    rss: int
    fds: int

    @classmethod
    def of(cls, process: subprocess.Popen) -> Vitals:
        daemon = psutil.Process(process.pid)
        return cls(process.pid, daemon.memory_info().rss, daemon.num_fds())


def assert_healthy(process: subprocess.Popen, before: Vitals, log: Path, tallies: list[str]) -> None:
    """The same pid lives, its memory is bounded, and the fuzz's connections left no fds behind."""
    context = f"OFFLOAD_FUZZ_SEED={SEED}; {tallies}; log: {log.read_text()[-3000:]}"
    assert process.poll() is None and process.pid == before.pid, f"the daemon ended; {context}"
    os.kill(before.pid, 0)
    daemon = psutil.Process(before.pid)
    grown = daemon.memory_info().rss - before.rss
    assert grown < RSS_SLACK, f"the daemon's memory grew by {grown >> 20} MiB; {context}"
    try:
        wait_for(lambda: daemon.num_fds() <= before.fds + FD_SLACK, 20, "the fuzz's connections to be closed")
    except AssertionError:
        raise AssertionError(
            f"the daemon holds {daemon.num_fds()} fds, {before.fds} before the fuzz; {context}"
        ) from None


# -- the listeners and their samples -----------------------------------------------------------


@dataclass
class Listener:
    name: str
    path: Path
    #: Frames of the protocol, each valid as it stands: what the mutations start from.
    samples: list[bytes]
    #: The frame types the protocol knows (random types are drawn from these and from 0..255).
    types: list[int]
    #: The credentials of a good peer; None for a local socket (no TLS: the kernel names the user).
    transport: Transport | None
    #: Sent first on most authenticated connections, to reach the states past it.
    hello: bytes = b""
    #: The largest payload the listener takes: oversized length fields are drawn above it.
    max_payload: int = 1 << 20
    #: A local socket that takes fds by SCM_RIGHTS: the fuzz passes some where none are due.
    pass_fds: bool = False


def frame_types(module: object) -> list[int]:
    return sorted({value for name, value in vars(module).items() if name.startswith("T_") and isinstance(value, int)})


def control(type: int, document: object, channel: int = 0) -> bytes:
    return encode_frame(type, channel, messages.dump(document))


def rexec_listener(path: Path, transport: Transport, marker_dir: Path) -> Listener:
    """The peer port of the host's rexec_server, as its DPU sees it."""
    w = rexec_wire
    request = w.ExecRequest(
        argv=("/bin/sh", "-c", "exit 3"),
        cwd="/",
        user="root",
        fds=(w.FdSpec(1, w.FdKind.PIPE_OUT, channel=1), w.FdSpec(0, w.FdKind.NULL)),
    )
    shared = w.ExecRequest(
        argv=("/bin/sh", "-c", "exit 0"),
        user="root",
        fds=(w.FdSpec(3, w.FdKind.FILE, path=str(marker_dir / "fz"), access="rw", offset=7),),
        daemon_pidfile=str(marker_dir / "fz.pid"),
    )
    hello = w.RexecConnection(w.Role.CLIENT).send(w.Hello("dpu"))
    samples = [
        hello,
        control(w.T_EXEC, request.to_json()),
        control(w.T_EXEC, shared.to_json()),
        encode_frame(w.T_PING, 0, b"token"),
        encode_frame(w.T_PONG, 0, b"token"),
        control(w.T_SIGNAL, {"signal": "SIGTERM"}),
        control(w.T_SIGNAL, {"signal": "SIGUSR1"}),
        encode_frame(w.T_DATA, 1, b"bytes for the program"),
        encode_frame(w.T_EOF, 1),
        encode_frame(w.T_WINDOW, 1, struct.pack("!I", 4096)),
        control(w.T_OPEN, {"fd": 3}, channel=w.FIRST_BRIDGE_CHANNEL),
        control(w.T_RESET, {"reason": "gone"}, channel=1),
        # The server's own words, from the wrong side.
        control(w.T_STARTED, {"pid": 1}),
        control(w.T_EXITED, {"code": 0}),
        control(w.T_REFUSED, {"code": 126, "reason": "no"}),
        control(w.T_DAEMONIZED, {"code": 0, "pid": 1}),
    ]
    return Listener("rexec peer port", path, samples, frame_types(w), transport, hello=hello)


def agent_listener(path: Path) -> Listener:
    """rexec_server's agent socket, as a local user's stand-in sees it."""
    request = {
        "target": None,
        "argv": ["/bin/sh", "-c", "exit 0"],
        "env": {"LANG": "C"},
        "cwd": "/",
        "umask": 0o22,
        "fds": [{"fd": 0, "type": "null", "passed": True, "access": "r"}],
        "daemon_pidfile": None,
    }
    samples = [
        local.encode(local.L_REQUEST, request),
        local.encode(local.L_REQUEST, {**request, "fds": []}),
        local.encode(local.L_SIGNAL, {"signal": "SIGTERM"}),
        local.encode(local.L_ADOPT, {"pid": 1}),
        local.encode(local.L_STARTED, {"pid": 1}),
    ]
    types = [value for name, value in vars(local).items() if name.startswith("L_") and isinstance(value, int)]
    return Listener("rexec agent socket", path, samples, types, None, max_payload=local.MAX_REQUEST, pass_fds=True)


def udsproxy_listener(path: Path, transport: Transport, echo: Path) -> Listener:
    """The peer port of the host's udsproxyd, as its DPU sees it."""
    w = udsproxy_wire
    hello = w.UdsProxyConnection(client=True).send(w.Hello("dpu"))
    connect = w.Connect(str(echo), "stream", "root")
    opened = w.UdsProxyConnection.opened(client=True)
    samples = [
        hello,
        control(w.T_CONNECT, {"path": connect.path, "type": connect.type, "user": connect.user}),
        control(w.T_CONNECT, {"path": str(echo), "type": "seqpacket", "user": "nobody"}),
        encode_frame(w.T_DATA, w.DATA_CHANNEL, b"hello"),
        encode_frame(w.T_EOF, w.DATA_CHANNEL),
        opened.send(w.Fds((w.FdDescription("null", access="r"), w.FdDescription("pipe_r", channel=2)))),
        opened.send(w.Fds((w.FdDescription("file", path=str(echo.parent / "fz"), access="r", dev=1, ino=2),))),
        opened.send(w.FdsResult()),
        opened.send(w.Window(2, 4096)),
        control(w.T_CONNECTED, {"error": ""}),
    ]
    return Listener(
        "udsproxyd peer port", path, samples, frame_types(w), transport, hello=hello, max_payload=w.MAX_FRAME
    )


def shim_listener(path: Path, echo: Path) -> Listener:
    """udsproxyd's shim socket, as libudsproxy.so in a local program sees it."""
    w = udsproxy_wire
    samples = [
        encode_frame(w.SHIM_CONNECT, 0, struct.pack("!H", socket.SOCK_STREAM) + os.fsencode(echo)),
        encode_frame(w.SHIM_CONNECT, 0, struct.pack("!H", socket.SOCK_SEQPACKET) + os.fsencode(echo)),
        encode_frame(w.SHIM_SEND_FDS, 0, b"bytes sent with fds"),
        encode_frame(w.SHIM_CONNECTED, 0, struct.pack("!I", 0)),
    ]
    types = [w.SHIM_CONNECT, w.SHIM_CONNECTED, w.SHIM_SEND_FDS, w.SHIM_SENT]
    return Listener("udsproxyd shim socket", path, samples, types, None, pass_fds=True)


def qtfs_listener(path: Path, transport: Transport, export: Path) -> Listener:
    """The qtfs server's port, as a DPU's mount sees it.  Nothing here names the file the good client reads."""
    w = qtfs_wire
    client = w.QtfsConnection(client=True)
    hello = client.send(w.Hello("dpu"))
    requests: list[qtfs_wire.Message] = [
        w.Mount(os.fsencode(export)),
        w.Mount(b"/"),
        w.Lookup(b"fz"),
        w.Lookup(b"fz/deeper"),
        w.Getattr(b"fz"),
        w.Open(b"fz", os.O_RDONLY),
        w.Open(b"fz", os.O_RDWR),
        w.Read(1, 0, 4096),
        w.Read(1, 1 << 40, w.MAX_IO),
        w.Write(1, 0, b"fuzz"),
        w.Release(1),
        w.Opendir(b""),
        w.Readdir(1, 0),
        w.Releasedir(1),
        w.Statfs(b""),
        w.Readlink(b"fz"),
        w.Getxattr(b"fz", b"user.x"),
        w.Listxattr(b"fz"),
        w.Mkdir(b"fz", 0o755, 0, 0),
        w.Create(b"fz/new", os.O_RDWR, 0o644, 0, 0),
        w.Unlink(b"fz/new"),
    ]
    samples = [hello, encode_frame(w.T_PING, 0, struct.pack("!Q", 7)), encode_frame(w.T_PONG, 0, struct.pack("!Q", 7))]
    samples += [client.send(w.Call(number, request)) for number, request in enumerate(requests, start=1)]
    samples.append(encode_frame(w.T_ERROR, 1, b"ENOENT"))
    return Listener(
        "qtfs server port", path, samples, frame_types(w), transport, hello=hello, max_payload=w.MAX_PAYLOAD
    )


# -- garbage, before authentication ------------------------------------------------------------


def client_hellos(tls: TlsConfig) -> list[bytes]:
    """The first flight of a real TLS client with our credentials (a few, each with its own randoms)."""
    hellos = []
    for _ in range(4):
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls_object = tls.client_context().wrap_bio(incoming, outgoing, server_side=False)
        with contextlib.suppress(ssl.SSLWantReadError):
            tls_object.do_handshake()
        hellos.append(outgoing.read())
    return hellos


def mutate_bytes(rng: random.Random, data: bytes, rounds: int = 3) -> bytes:
    buffer = bytearray(data)
    for _ in range(rng.randint(1, rounds)):
        action = rng.choice(["flip", "cut", "append", "insert", "duplicate"])
        if action == "flip" and buffer:
            buffer[rng.randrange(len(buffer))] ^= rng.randint(1, 255)
        elif action == "cut":
            del buffer[rng.randint(0, len(buffer)) :]
        elif action == "append":
            buffer += rng.randbytes(rng.randint(1, 64))
        elif action == "insert":
            at = rng.randint(0, len(buffer))
            buffer[at:at] = rng.randbytes(rng.randint(1, 16))
        elif buffer:
            at = rng.randrange(len(buffer))
            buffer[at:at] = buffer[at : at + rng.randint(1, 64)]
    return bytes(buffer)


def garbage(rng: random.Random, listener: Listener, hellos: list[bytes]) -> tuple[str, bytes]:
    kind = rng.choice(["random", "hello-cut", "hello-mutated", "frames", "nothing", "header-only"])
    if kind == "random":
        return kind, rng.randbytes(rng.choice([1, 5, 12, 100, 4096, 70000]))
    if kind == "hello-cut":
        hello = rng.choice(hellos)
        return kind, hello[: rng.randint(0, len(hello) - 1)]
    if kind == "hello-mutated":
        return kind, mutate_bytes(rng, rng.choice(hellos), rounds=6)
    if kind == "frames":  # the protocol in the clear, where TLS belongs (or a local socket's own frames, cut)
        data = b"".join(rng.choices(listener.samples, k=rng.randint(1, 4)))
        return kind, data[: rng.randint(1, len(data))]
    if kind == "header-only":
        return kind, HEADER.pack(MAGIC, VERSION, rng.randrange(256), rng.randrange(1 << 32), rng.randrange(1 << 32))
    return kind, b""


# -- structured frames, mutated ----------------------------------------------------------------


def json_value(rng: random.Random, depth: int = 0) -> object:
    choice = rng.randrange(9 if depth < 3 else 6)
    if choice == 0:
        return None
    if choice == 1:
        return rng.choice([True, False])
    if choice == 2:
        return rng.choice([0, -1, 1, 2**31, 2**63, -(2**63) - 1, 10**30, rng.randint(-1000, 1000)])
    if choice == 3:
        return rng.choice([0.5, -1e308, 1e308])
    if choice == 4:
        return rng.choice(["", "/", "..", "/../etc/passwd", "x" * 5000, "\0", "SIGKILL", "root", "é"])
    if choice == 5:
        return "".join(chr(rng.randrange(32, 0x2FF)) for _ in range(rng.randint(0, 12)))
    if choice in (6, 7):
        return [json_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {rng.choice(["fd", "kind", "path", "x", ""]): json_value(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def wrong_shape(rng: random.Random, payload: bytes) -> bytes:
    """The payload's JSON with a field removed, retyped or added, or another JSON document altogether."""
    try:
        document = json.loads(payload)
    except ValueError:
        document = None
    if isinstance(document, dict) and document and rng.random() < 0.8:
        key = rng.choice(list(document))
        action = rng.choice(["drop", "retype", "add", "nest"])
        if action == "drop":
            del document[key]
        elif action == "retype":
            document[key] = json_value(rng)
        elif action == "add":
            document[rng.choice(["extra", "fds", "argv", "path", "signal"])] = json_value(rng)
        else:
            value = document[key]
            if isinstance(value, list) and value:
                value[rng.randrange(len(value))] = json_value(rng)
            else:
                document[key] = [value, json_value(rng)]
        return json.dumps(document).encode()
    if rng.random() < 0.2:
        depth = rng.choice([100, 1000, 100_000])
        return b"[" * depth + b"]" * depth
    return json.dumps(json_value(rng)).encode()


def one_frame(rng: random.Random, listener: Listener) -> tuple[str, bytes]:
    sample = rng.choice(listener.samples)
    _, _, type, channel, _ = HEADER.unpack_from(sample)
    payload = sample[HEADER_SIZE:]
    kind = rng.choice(["valid", "valid", "mutated", "type", "channel", "shape", "length", "oversized", "header"])
    if kind == "valid":
        return kind, sample
    if kind == "mutated":
        return kind, encode_frame(type, channel, mutate_bytes(rng, payload), max_payload=1 << 30)
    if kind == "type":
        new = rng.choice(listener.types) if rng.random() < 0.5 else rng.randrange(256)
        return f"{kind} {new:#x}", encode_frame(new, channel, payload, max_payload=1 << 30)
    if kind == "channel":
        new = rng.choice([0, 1, 2, 3, 0x10000, 0x7FFFFFFF, 0xFFFFFFFF, rng.randrange(1 << 32)])
        return f"{kind} {new}", encode_frame(type, new, payload, max_payload=1 << 30)
    if kind == "shape":
        return kind, encode_frame(type, channel, wrong_shape(rng, payload), max_payload=1 << 30)
    if kind == "length":  # a header whose length is not the payload's
        length = max(0, len(payload) + rng.choice([-len(payload), -1, 1, 7, 4096]))
        return f"{kind} {length}", HEADER.pack(MAGIC, VERSION, type, channel, length) + payload
    if kind == "oversized":
        length = rng.choice(
            [listener.max_payload + 1, 1 << 31, (1 << 32) - 1, rng.randint(listener.max_payload, 1 << 32)]
        )
        length = min(length, (1 << 32) - 1)
        return f"{kind} {length}", HEADER.pack(MAGIC, VERSION, type, channel, length) + rng.randbytes(
            rng.randint(0, 256)
        )
    magic = rng.choice([MAGIC, b"FO", b"\x16\x03"])
    version = VERSION if magic != MAGIC else rng.choice([0, 2, 255])
    return f"{kind} {magic!r}/{version}", HEADER.pack(magic, version, type, channel, len(payload)) + payload


def splits(rng: random.Random, data: bytes) -> list[bytes]:
    if not data or rng.random() < 0.3:
        return [data]
    cuts = sorted(rng.randint(0, len(data)) for _ in range(rng.randint(1, 6)))
    return [chunk for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True) if (chunk := data[a:b])]


# -- the connections ---------------------------------------------------------------------------


class LocalSocket:
    """A plain connection to a listener (before TLS, or a local socket), passing fds when asked."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock

    async def send(self, data: bytes, fds: list[int] | None = None) -> None:
        view = memoryview(data)
        if fds:
            sent = await self.sock.sendmsg(
                [view], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))]
            )
            view = view[sent:]
        while view:
            view = view[await self.sock.send(view) :]

    async def receive(self) -> bytes:
        data, ancdata, _, _ = await self.sock.recvmsg(65536, socket.CMSG_SPACE(64 * 4))
        for level, kind, payload in ancdata:  # the shim's answer carries a connected socket: ours to close
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                for fd in struct.unpack(f"{len(payload) // 4}i", payload[: len(payload) - len(payload) % 4]):
                    os.close(fd)
        return data


async def connect_plain(path: Path) -> LocalSocket:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.connect(str(path))
    except BaseException:
        sock.close()
        raise
    return LocalSocket(sock)


async def drain(receive: Callable[[], Awaitable[bytes]], seconds: float, tally: Tally) -> None:
    """Take what the daemon answers for ``seconds``, or until it closes the connection."""
    answered = False
    with trio.move_on_after(seconds):
        while await receive():
            answered = True
    tally.answered += answered


async def garbage_case(rng: random.Random, listener: Listener, hellos: list[bytes], tally: Tally) -> None:
    kind, data = garbage(rng, listener, hellos)
    dribble = rng.random() < 0.15
    tally.recent.append(f"{kind} {len(data)} bytes{' dribbled' if dribble else ''}")
    conn = await connect_plain(listener.path)
    tally.connected += 1
    with conn.sock:
        if dribble:
            for at in range(0, min(len(data), 40), 2):
                await conn.send(data[at : at + 2])
                await trio.sleep(rng.uniform(0.005, 0.03))
        else:
            for chunk in splits(rng, data):
                await conn.send(chunk)
        if rng.random() < 0.3:
            await drain(conn.receive, 0.1, tally)
    # Closed here, abruptly, whatever the daemon was waiting for.


def spare_fds(rng: random.Random) -> list[int]:
    """fds a local client passes where none are due: /dev/null, a pipe end, a socket."""
    fds = [os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)]
    if rng.random() < 0.5:
        read, write = os.pipe2(os.O_CLOEXEC)
        fds += [read, write]
    if rng.random() < 0.3:
        a, b = socket.socketpair()
        fds += [a.detach(), b.detach()]
    return fds


async def structured_case(rng: random.Random, listener: Listener, tally: Tally) -> None:
    frames = [one_frame(rng, listener) for _ in range(rng.randint(1, 6))]
    if listener.hello and rng.random() < 0.85:
        frames.insert(0, ("hello", listener.hello))
    tally.recent.append(", ".join(kind for kind, _ in frames))
    data = b"".join(frame for _, frame in frames)
    chunks = splits(rng, data)
    linger = rng.choice([0.0, 0.02, 0.2])
    if listener.transport is None:
        conn = await connect_plain(listener.path)
        tally.connected += 1
        fds = spare_fds(rng) if listener.pass_fds and rng.random() < 0.3 else []
        try:
            with conn.sock:
                for number, chunk in enumerate(chunks):
                    await conn.send(chunk, fds if number == 0 else None)
                    if rng.random() < 0.2:
                        await trio.sleep(0.005)
                await drain(conn.receive, linger, tally)
        finally:
            for fd in fds:
                os.close(fd)
        return
    try:
        connected = await listener.transport.connect(parse_address(f"unix://{listener.path}"), timeout=CASE_TIMEOUT)
    except OffloadError:
        tally.refused += 1
        return
    tally.connected += 1
    stream = connected.stream
    try:
        for chunk in chunks:
            await stream.send_all(chunk)
            if rng.random() < 0.2:
                await trio.sleep(0.005)
        await drain(stream.receive_some, linger, tally)
    finally:
        if rng.random() < 0.5:
            await trio.aclose_forcefully(stream)
        else:
            await stream.aclose()


async def fuzz_phase(listener: Listener, phase: str, hellos: list[bytes]) -> Tally:
    tally = Tally()
    deadline = trio.current_time() + BUDGET

    async def worker(number: int) -> None:
        rng = random.Random(f"{SEED}/{listener.name}/{phase}/{number}")
        while trio.current_time() < deadline:
            tally.cases += 1
            with trio.move_on_after(CASE_TIMEOUT) as scope:
                # The daemon ending a connection, at any point, is its right: only what it does after counts.
                with contextlib.suppress(OSError, OffloadError, trio.BrokenResourceError, trio.ClosedResourceError):
                    if phase == "garbage":
                        await garbage_case(rng, listener, hellos, tally)
                    else:
                        await structured_case(rng, listener, tally)
            tally.cut += scope.cancelled_caught

    async with trio.open_nursery() as nursery:
        for number in range(WORKERS):
            nursery.start_soon(worker, number)
    return tally


def fuzz(listeners: list[Listener], hellos: list[bytes], fuzzed: list[subprocess.Popen]) -> list[str]:
    """Both phases on every listener; what each did, for the messages.

    Each phase must have reached its listener, and the ``fuzzed`` daemons must outlive it.
    """
    print(f"fuzz seed: OFFLOAD_FUZZ_SEED={SEED}, {BUDGET} s per phase and listener")
    summary = []
    for listener in listeners:
        for phase in ("garbage", "authenticated"):
            tally = trio.run(fuzz_phase, listener, phase, hellos)
            summary.append(f"{listener.name}, {phase}: {tally}")
            print(summary[-1])
            for process in fuzzed:
                assert process.poll() is None, (
                    f"OFFLOAD_FUZZ_SEED={SEED}: {process.args} ended (status {process.returncode}) "
                    f"while {listener.name} was fuzzed ({phase}): {tally}"
                )
            assert tally.connected >= 10, f"OFFLOAD_FUZZ_SEED={SEED}: the fuzz barely reached {listener.name}: {tally}"
            if phase == "authenticated":
                # Past the handshake the daemon answers a Hello: proof the frames reached the states past it.
                assert tally.answered, f"OFFLOAD_FUZZ_SEED={SEED}: {listener.name} never answered: {tally}"
    return summary


# -- the daemons -------------------------------------------------------------------------------


def test_rexec_server_outlives_fuzz_of_its_peer_port_and_agent_socket(
    tree: Path, daemons: list[subprocess.Popen]
) -> None:
    host_log, dpu_log = tree / "host.log", tree / "dpu.log"
    host = start(daemons, host_log, "offload.rexec_server", *rexec_args(tree, "host", "dpu"), limit=False)
    dpu = start(daemons, dpu_log, "offload.rexec_server", *rexec_args(tree, "dpu", "host"), limit=False)
    for path, process, log in (
        (tree / "host-peer.sock", host, host_log),
        (tree / "run-host" / "rexec.sock", host, host_log),
        (tree / "dpu-peer.sock", dpu, dpu_log),
        (tree / "run-dpu" / "rexec.sock", dpu, dpu_log),
    ):
        wait_listening(path, process, log)

    def good_clients(when: str) -> None:
        # The DPU's stand-in runs a program on the host (through the host's peer port),
        # and the host's stand-in one on the DPU (through the host's agent socket).
        for role in ("dpu", "host"):
            marker = tree / f"ran-from-{role}-{when}"
            done = standin(tree, role, marker)
            assert done.returncode == 0, f"OFFLOAD_FUZZ_SEED={SEED}: {done.stderr}"
            assert marker.exists()

    good_clients("before")  # the warm links exist before the fds are counted
    before = Vitals.of(host)
    dpu_tls = TlsConfig.load(tree / "pki" / "dpu")
    summary = fuzz(
        [
            rexec_listener(tree / "host-peer.sock", Transport(dpu_tls), tree),
            agent_listener(tree / "run-host" / "rexec.sock"),
        ],
        client_hellos(dpu_tls),
        [host, dpu],
    )
    good_clients("after")
    assert_healthy(host, before, host_log, summary)
    assert dpu.poll() is None, dpu_log.read_text()[-3000:]


def test_udsproxyd_outlives_fuzz_of_its_peer_port_and_shim_socket(tree: Path, daemons: list[subprocess.Popen]) -> None:
    (tree / "remote").mkdir()
    echo = tree / "remote" / "echo.sock"
    listener = echo_server(echo)
    common = ["--user-map", "root=root"]
    host_log, dpu_log = tree / "uds-host.log", tree / "uds-dpu.log"
    host = start(
        daemons,
        host_log,
        "offload.udsproxy.daemon",
        *("--node", "host", "--listen", f"unix://{tree}/uds-host.sock", "--pki", str(tree / "pki" / "host")),
        *("--allow", str(tree / "remote"), "--run-dir", str(tree / "uds-b"), *common),
        limit=False,
    )
    dpu = start(
        daemons,
        dpu_log,
        "offload.udsproxy.daemon",
        *("--node", "dpu", "--peer", f"unix://{tree}/uds-host.sock", "--pki", str(tree / "pki" / "dpu")),
        *("--allow", str(tree), "--run-dir", str(tree / "uds-a"), *common),
        limit=False,
    )
    shim = tree / "uds-a" / "udsproxy.sock"
    try:
        wait_listening(tree / "uds-host.sock", host, host_log)
        wait_listening(shim, dpu, dpu_log)
        assert ask_shim(shim, echo) == b"got:hello"
        before_host, before_dpu = Vitals.of(host), Vitals.of(dpu)
        dpu_tls = TlsConfig.load(tree / "pki" / "dpu")
        summary = fuzz(
            [udsproxy_listener(tree / "uds-host.sock", Transport(dpu_tls), echo), shim_listener(shim, echo)],
            client_hellos(dpu_tls),
            [host, dpu],
        )
        assert ask_shim(shim, echo) == b"got:hello", f"OFFLOAD_FUZZ_SEED={SEED}"
        assert_healthy(host, before_host, host_log, summary)
        assert_healthy(dpu, before_dpu, dpu_log, summary)
    finally:
        listener.close()


def test_qtfs_server_outlives_fuzz_of_its_port(tree: Path, daemons: list[subprocess.Popen]) -> None:
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
        limit=False,
    )
    wait_listening(tree / "qtfs.sock", server, log)
    assert read_through_qtfs(tree, export, b"file") == b"still served"
    before = Vitals.of(server)
    dpu_tls = TlsConfig.load(tree / "pki" / "dpu")
    summary = fuzz([qtfs_listener(tree / "qtfs.sock", Transport(dpu_tls), export)], client_hellos(dpu_tls), [server])
    assert read_through_qtfs(tree, export, b"file") == b"still served", f"OFFLOAD_FUZZ_SEED={SEED}"
    assert_healthy(server, before, log, summary)
