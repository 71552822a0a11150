"""The link core, bytes in and bytes out, on a small protocol declared here."""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from offload.errors import LinkLost, LocalProtocolError, RemoteProtocolError
from offload.protocol.framing import HEADER, MAGIC, VERSION, split_frames
from offload.protocol.link import NEED_DATA, Closed, Connection, Ping, Pong, Registry, Role, Window


@dataclass(frozen=True)
class Hello:
    node: str


@dataclass(frozen=True)
class Open:
    channel: int


@dataclass(frozen=True)
class Data:
    channel: int
    data: bytes


@dataclass(frozen=True)
class Done:
    code: int


class State(enum.Enum):
    IDLE = "idle"
    OPEN = "open"
    DONE = "done"


TOY = Registry("toy", max_payload=64, hello=Hello)
TOY.declare(1, Hello, encode=lambda e: (0, e.node.encode()), decode=lambda c, ch, p: Hello(p.decode("ascii")))
TOY.declare(2, Open, sender=Role.CLIENT, encode=lambda e: (e.channel, b""), decode=lambda c, ch, p: Open(ch))
TOY.declare(3, Data, encode=lambda e: (e.channel, e.data), decode=lambda c, ch, p: Data(ch, p))
TOY.declare(4, Done, sender=Role.SERVER, encode=lambda e: (0, bytes((e.code,))), decode=lambda c, ch, p: Done(p[0]))
TOY.declare_keepalive(5, 6, size=8)


class Toy(Connection):
    registry = TOY
    transitions = {
        (Role.CLIENT, Open, State.IDLE): State.OPEN,
        (Role.CLIENT, Data, State.OPEN): State.OPEN,
        (Role.SERVER, Data, State.OPEN): State.OPEN,
        (Role.SERVER, Done, State.OPEN): State.DONE,
    }

    def __init__(self, role: Role, **keepalive: Any) -> None:
        super().__init__(role, State.IDLE, **keepalive)


def frame(type: int, channel: int, payload: bytes) -> bytes:
    return HEADER.pack(MAGIC, VERSION, type, channel, len(payload)) + payload


# (sender, event, its exact bytes): one table for the encoder and the decoder.
CASES: list[tuple[Role, Any, bytes]] = [
    (Role.CLIENT, Hello("dpu"), frame(1, 0, b"dpu")),
    (Role.CLIENT, Open(7), frame(2, 7, b"")),
    (Role.CLIENT, Data(7, b"abc"), frame(3, 7, b"abc")),
    (Role.SERVER, Ping(bytes(8)), frame(5, 0, bytes(8))),
    (Role.SERVER, Done(3), frame(4, 0, b"\x03")),
]


def pair() -> tuple[Toy, Toy]:
    client, server = Toy(Role.CLIENT), Toy(Role.SERVER)
    client.receive_data(server.send(Hello("host")))
    server.receive_data(client.send(Hello("dpu")))
    assert client.next_event() == Hello("host") and server.next_event() == Hello("dpu")
    return client, server


def events(conn: Connection) -> list[Any]:
    out = []
    while (event := conn.next_event()) is not NEED_DATA:
        out.append(event)
        if isinstance(event, Closed):
            break
    return out


def run_cases() -> bytes:
    """Send every case from its side to the other, which decodes it; the bytes the client sent."""
    client, server = Toy(Role.CLIENT), Toy(Role.SERVER)
    client.receive_data(server.send(Hello("host")))
    assert client.next_event() == Hello("host")
    to_server = b""
    for sender, event, data in CASES:
        conn, peer = (client, server) if sender is Role.CLIENT else (server, client)
        assert conn.send(event) == data
        peer.receive_data(data)
        assert peer.next_event() == event and peer.next_event() is NEED_DATA
        to_server += data if sender is Role.CLIENT else b""
    return to_server


def test_encoder_and_decoder_whole_byte_by_byte_and_with_trailing_bytes() -> None:
    to_server = run_cases()
    expected = [event for sender, event, _ in CASES if sender is Role.CLIENT]
    whole = Toy(Role.SERVER)
    whole.send(Hello("host"))
    whole.receive_data(to_server)
    assert events(whole) == expected
    trickle = Toy(Role.SERVER)
    seen = []
    for byte in to_server:
        trickle.receive_data(bytes([byte]))
        seen += events(trickle)  # NEED_DATA on every partial frame
    assert seen == expected
    trailing = Toy(Role.SERVER)
    trailing.receive_data(to_server + frame(3, 7, b"xyz")[:5])
    assert events(trailing) == expected
    assert trailing.next_event() is NEED_DATA
    trailing.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="truncated"):
        trailing.next_event()


def test_clean_end_of_stream() -> None:
    client, _ = pair()
    client.receive_data(b"")
    assert client.next_event() == Closed() and client.next_event() == Closed()


def refused(conn: Connection, error: type[Exception], action: Callable[[], object], match: str) -> None:
    """``action`` raises ``error``; then the connection is in its ERROR state and every call raises."""
    with pytest.raises(error, match=match):
        action()
    assert conn.error is not None
    for later in (
        conn.next_event,
        lambda: conn.receive_data(b"more"),
        lambda: conn.send(Data(7, b"x")),
        lambda: conn.send_header(Data, 7, 1),
        lambda: conn.poll(0.0),
    ):
        with pytest.raises(LocalProtocolError, match="failed earlier"):
            later()


def fed(data: bytes, role: Role = Role.SERVER) -> Toy:
    conn = pair()[1] if role is Role.SERVER else pair()[0]
    conn.receive_data(data)
    return conn


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"XX\x01\x03" + bytes(8), "bad frame magic"),
        (b"OF\x02\x03" + bytes(8), "unsupported protocol version"),
        (HEADER.pack(MAGIC, VERSION, 3, 7, 65), "exceeds the limit of 64"),  # oversized, refused before its bytes
        (frame(0x77, 0, b""), "unknown toy frame type 0x77"),
        (frame(1, 0, b"again"), "a second Hello"),
        (frame(4, 0, b"\x01"), "Done from the client"),  # the server's frame, from the client
        (frame(3, 7, b"x"), "Data from the client in state idle"),  # not in the transition table
        (frame(5, 0, b"short"), "Ping of 5 bytes"),
        (frame(6, 2, bytes(8)), "Pong on channel 2"),
    ],
)
def test_bad_frames_end_in_the_error_state(data: bytes, match: str) -> None:
    conn = fed(data)
    refused(conn, RemoteProtocolError, conn.next_event, match)


def test_decoder_errors_are_the_peers() -> None:
    client = fed(frame(4, 0, b""), Role.CLIENT)  # Done(p[0]) on an empty payload: IndexError
    client.state = State.OPEN
    refused(client, RemoteProtocolError, client.next_event, "malformed Done")
    server = Toy(Role.SERVER)
    server.receive_data(frame(1, 0, b"\xff"))  # not ASCII: UnicodeDecodeError
    refused(server, RemoteProtocolError, server.next_event, "malformed Hello")


def test_frames_before_hello() -> None:
    server = Toy(Role.SERVER)
    server.receive_data(frame(2, 1, b""))
    refused(server, RemoteProtocolError, server.next_event, "Open before Hello")
    client = Toy(Role.CLIENT)
    refused(client, LocalProtocolError, lambda: client.send(Open(1)), "Open before Hello")


@pytest.mark.parametrize(
    ("role", "event", "match"),
    [
        (Role.SERVER, Open(1), "only the client sends Open"),
        (Role.CLIENT, Data(1, b""), "Data from the client in state idle"),
        (Role.CLIENT, Hello("again"), "Hello sent twice"),
        (Role.CLIENT, Pong, "cannot send"),  # a class, not an event: nothing declared
        (Role.CLIENT, Data(1, b"x" * 65), "exceeds the limit of 64"),
    ],
)
def test_local_violations_end_in_the_error_state(role: Role, event: Any, match: str) -> None:
    client, server = pair()
    conn = client if role is Role.CLIENT else server
    if isinstance(event, Data) and event.data:
        conn.state = State.OPEN
    refused(conn, LocalProtocolError, lambda: conn.send(event), match)


def test_transitions() -> None:
    client, server = pair()
    server.receive_data(client.send(Open(7)) + client.send(Data(7, b"a")))
    assert events(server) == [Open(7), Data(7, b"a")]
    assert client.state is server.state is State.OPEN
    client.receive_data(server.send(Done(0)))
    assert events(client) == [Done(0)] and client.state is State.DONE
    assert client.send_header(Data, 7, 3) == frame(3, 7, b"abc")[:-3]


def test_registry_collisions_refused_at_declaration() -> None:
    registry = Registry("twice", max_payload=64, hello=Hello)
    registry.declare(1, Hello, encode=lambda e: (0, b""), decode=lambda c, ch, p: Hello(""))
    with pytest.raises(LocalProtocolError, match="frame type 0x01 is already declared"):
        registry.declare(1, Open, encode=lambda e: (0, b""), decode=lambda c, ch, p: Open(0))
    with pytest.raises(LocalProtocolError, match="Hello is already declared"):
        registry.declare(2, Hello, encode=lambda e: (0, b""), decode=lambda c, ch, p: Hello(""))
    with pytest.raises(LocalProtocolError, match="out of range"):
        registry.declare(256, Done, encode=lambda e: (0, b""), decode=lambda c, ch, p: Done(0))
    with pytest.raises(LocalProtocolError, match="Ping is already declared"):
        TOY.declare_keepalive(7, 8)
    assert sorted(registry.by_code) == [1]


def test_keepalive_by_the_clock() -> None:
    client = Toy(Role.CLIENT, keepalive=6.0, now=100.0)
    client.send(Hello("dpu"))
    assert client.deadline == 102.0 and client.poll(101.9) == b""
    assert client.poll(102.0) == frame(5, 0, struct.pack("!Q", 1))
    assert client.deadline == 104.0
    client.heard(103.0)  # bytes arrived: the link lives until 109
    assert client.poll(104.0) == frame(5, 0, struct.pack("!Q", 2))
    assert client.deadline == 106.0
    client.poll(106.0)
    assert client.deadline == 108.0
    client.poll(108.0)
    assert client.deadline == 109.0
    with pytest.raises(LinkLost, match=r"nothing heard for 6\.0 s"):
        client.poll(109.0)
    assert isinstance(client.error, LinkLost)
    with pytest.raises(LocalProtocolError, match="failed earlier"):
        client.poll(110.0)
    quiet = Toy(Role.CLIENT)
    assert quiet.deadline == float("inf") and quiet.poll(1e9) == b""


def test_window() -> None:
    window = Window(8)
    window.sent(8)
    with pytest.raises(LocalProtocolError):
        window.sent(1)
    window.granted(4)
    window.sent(4)
    window.received(8)
    with pytest.raises(RemoteProtocolError, match="overran"):
        window.received(1)
    assert window.consumed(3) == 0  # less than half a window taken: nothing to grant yet
    assert window.consumed(1) == 4 and window.allowance == 4
    with pytest.raises(RemoteProtocolError, match="2 GiB"):
        window.granted((1 << 31) + 1)


def test_split_frames_gives_views_whole_byte_by_byte_and_with_trailing_bytes() -> None:
    to_server = run_cases()
    expected = _headers(to_server)
    frames, used = split_frames(memoryview(to_server + frame(3, 7, b"xyz")[:5]), 64)
    assert used == len(to_server)
    assert [(t, c, bytes(p)) for t, c, p in frames] == expected
    assert all(isinstance(p, memoryview) for _, _, p in frames)
    buffer, seen = bytearray(), []
    for byte in to_server:  # a frame appears exactly when its last byte arrives
        buffer.append(byte)
        frames, used = split_frames(memoryview(bytes(buffer)), 64)
        seen += [(t, c, bytes(p)) for t, c, p in frames]
        del buffer[:used]
    assert seen == expected
    for data, match in [
        (b"XX\x01\x03" + bytes(8), "bad frame magic"),
        (b"OF\x02\x03" + bytes(8), "unsupported protocol version"),
        (HEADER.pack(MAGIC, VERSION, 3, 7, 65), "exceeds the limit of 64"),  # before its payload arrives
    ]:
        with pytest.raises(RemoteProtocolError, match=match):
            split_frames(memoryview(data), 64)


def _headers(data: bytes) -> list[tuple[int, int, bytes]]:
    out, at = [], 0
    while at < len(data):
        _, _, type, channel, length = HEADER.unpack_from(data, at)
        out.append((type, channel, data[at + HEADER.size : at + HEADER.size + length]))
        at += HEADER.size + length
    return out


def test_event_of_a_frame_split_by_its_driver() -> None:
    server = pair()[1]
    assert server.event_of(2, 7, b"") == Open(7) and server.state is State.OPEN
    assert server.event_of(3, 7, b"abc") == Data(7, b"abc")
    refused(server, RemoteProtocolError, lambda: server.event_of(4, 0, b"\x01"), "Done from the client")
