"""The qtfs protocol, bytes in and bytes out (no sockets)."""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from offload.errors import LocalProtocolError, RemoteProtocolError, errno_name, errno_number
from offload.protocol import qtfs as wire
from offload.protocol.framing import encode_frame

ATTR = wire.Attr(1, 2, 0o100644, 1, 0, 0, 0, 5, 8, 4096, 10, 20, 30)

# (request, the exact bytes of its Request frame with id 7): one table for encoder and decoder.
REQUESTS = [
    (wire.Lookup(b"a/b"), b"\x02" + b"\x00\x00\x00\x03a/b"),
    (wire.Getattr(b"", 9), b"\x03" + b"\x00" * 7 + b"\x09" + b"\x00\x00\x00\x00"),
    (wire.Read(1, 2, 3), b"\x08" + struct.pack("!QQI", 1, 2, 3)),
    (wire.Write(1, 2, b"data"), b"\x09" + struct.pack("!QQ", 1, 2) + b"data"),
    (wire.Rename(b"x", b"y/z", 1), b"\x12" + struct.pack("!I", 1) + b"\x00\x00\x00\x01x\x00\x00\x00\x03y/z"),
    (wire.Mount(b"/var/lib/libvirt"), b"\x01" + b"\x00\x00\x00\x10/var/lib/libvirt"),
    (
        wire.Setxattr(b"f", b"user.k", b"v", 0),
        b"\x18" + struct.pack("!I", 0) + b"\x00\x00\x00\x01f\x00\x00\x00\x06user.k\x00\x00\x00\x01v",
    ),
]
EVERY_REQUEST = [
    wire.Mount(b"/"),
    wire.Lookup(b"x"),
    wire.Getattr(b"x"),
    wire.Setattr(b"x", 0, wire.SET_ALL, 0o644, 1, 2, 3, 4, 5),
    wire.Readlink(b"l"),
    wire.Open(b"f", os.O_RDWR),
    wire.Create(b"f", os.O_WRONLY, 0o600, 1000, 1000),
    wire.Read(1, 0, 4096),
    wire.Write(1, 0, b"x" * 100),
    wire.Release(1),
    wire.Fsync(1, 1),
    wire.Mkdir(b"d", 0o755, 0, 0),
    wire.Mknod(b"s", 0o140755, 0, 0, 0),
    wire.Symlink(b"l", b"../anything/at/all", 0, 0),
    wire.Link(b"a", b"b"),
    wire.Unlink(b"a"),
    wire.Rmdir(b"d"),
    wire.Rename(b"a", b"b"),
    wire.Opendir(b""),
    wire.Readdir(5, 100),
    wire.Releasedir(5),
    wire.Statfs(b""),
    wire.Getxattr(b"f", b"user.x"),
    wire.Setxattr(b"f", b"user.x", b"\x00\xff"),
    wire.Listxattr(b"f"),
    wire.Removexattr(b"f", b"user.x"),
]
REPLIES = [
    (wire.Op.LOOKUP, wire.AttrReply(ATTR.encode())),
    (wire.Op.READ, wire.DataReply(b"\x00" * 10)),
    (wire.Op.WRITE, wire.CountReply(10)),
    (wire.Op.OPEN, wire.HandleReply(77, b"")),
    (wire.Op.OPENDIR, wire.DirReply(0, 1, wire.encode_entry(b"name", ATTR.encode()))),
    (wire.Op.STATFS, wire.StatfsReply(1, 2, 3, 4, 5, 6, 7, 255)),
    (wire.Op.MOUNT, wire.MountReply(ATTR.encode(), wire.MOUNT_READONLY)),
    (wire.Op.UNLINK, wire.Empty()),
]


def pair() -> tuple[wire.QtfsConnection, wire.QtfsConnection]:
    client, server = wire.QtfsConnection(client=True), wire.QtfsConnection(client=False)
    server.receive_data(client.send(wire.Hello("dpu")))
    client.receive_data(server.send(wire.Hello("host", epoch=5)))
    assert server.next_event() == wire.Hello("dpu")
    assert client.next_event() == wire.Hello("host", epoch=5)
    return client, server


def events(conn: wire.QtfsConnection) -> list:
    out = []
    while (event := conn.next_event()) is not wire.NEED_DATA:
        out.append(event)
    return out


@pytest.mark.parametrize(("request_", "body"), REQUESTS)
def test_request_bytes(request_: wire.Message, body: bytes) -> None:
    client, server = pair()
    data = client.send(wire.Call(7, request_))
    assert data == encode_frame(wire.T_REQUEST, 7, body)
    # whole, byte by byte, and with trailing bytes of the next frame
    server.receive_data(data)
    assert events(server) == [wire.Call(7, request_)]
    for byte in data:
        server.receive_data(bytes([byte]))
    assert events(server) == [wire.Call(7, request_)]
    server.receive_data(data + data[:5])
    assert events(server) == [wire.Call(7, request_)]


@pytest.mark.parametrize("request_", EVERY_REQUEST, ids=lambda r: type(r).__name__)
def test_every_request_round_trips(request_: wire.Message) -> None:
    client, server = pair()
    server.receive_data(client.send(wire.Call(1, request_)))
    assert events(server) == [wire.Call(1, request_)]


@pytest.mark.parametrize(("op", "reply"), REPLIES, ids=lambda r: getattr(r, "name", type(r).__name__))
def test_reply_round_trip_byte_by_byte(op: wire.Op, reply: wire.Message) -> None:
    client, server = pair()
    request = next(r for r in EVERY_REQUEST if wire.OP_OF[type(r)] is op)
    client.send(wire.Call(3, request))
    data = server.send(wire.Result(3, reply))
    for byte in data:
        client.receive_data(bytes([byte]))
    assert events(client) == [wire.Result(3, reply)]
    assert not client.pending


def test_read_reply_sent_without_copy() -> None:
    client, server = pair()
    client.send(wire.Call(4, wire.Read(1, 0, 5)))
    client.receive_data(server.send_header(wire.Result, 4, 5) + b"hello")
    assert events(client) == [wire.Result(4, wire.DataReply(b"hello"))]


def test_errors_travel_by_name() -> None:
    client, server = pair()
    client.send(wire.Call(9, wire.Lookup(b"missing")))
    data = server.send(wire.Failure(9, errno_name(2)))
    assert data.endswith(b"ENOENT")
    client.receive_data(data)
    (failure,) = events(client)
    assert failure == wire.Failure(9, "ENOENT") and failure.errno == 2
    assert errno_number(b"ENOSUCHTHING") == 5  # unknown names become EIO


def test_ping_pong_and_entries() -> None:
    client, server = pair()
    token = (42).to_bytes(8, "big")
    server.receive_data(client.send(wire.Ping(token)))
    assert events(server) == [wire.Ping(token)]
    client.receive_data(server.send(wire.Pong(token)))
    assert events(client) == [wire.Pong(token)]
    page = b"".join(wire.encode_entry(n, ATTR.encode()) for n in (b"a", b"bb"))
    assert wire.decode_entries(page) == [(b"a", ATTR), (b"bb", ATTR)]
    with pytest.raises(RemoteProtocolError):
        wire.decode_entries(page[:-1])
    with pytest.raises(RemoteProtocolError):
        wire.decode_entries(wire.encode_entry(b"..", ATTR.encode()))


@pytest.mark.parametrize("path", [b"/abs", b"a/../b", b"..", b"a//b", b"a/", b"./a", b"a\0b"], ids=lambda p: repr(p))
def test_bad_paths_refused_on_both_sides(path: bytes) -> None:
    with pytest.raises(ValueError):
        wire.Lookup(path)
    client, server = pair()
    body = b"\x02" + struct.pack("!I", len(path)) + path
    server.receive_data(encode_frame(wire.T_REQUEST, 5, body) + client.send(wire.Call(6, wire.Lookup(b"ok"))))
    # the bad request is refused alone; the stream stays in step
    bad, good = events(server)
    assert isinstance(bad, wire.BadCall) and bad.id == 5
    assert good == wire.Call(6, wire.Lookup(b"ok"))


def test_mount_path_must_be_absolute_without_dotdot() -> None:
    for path in (b"relative", b"/var/../etc"):
        with pytest.raises(ValueError):
            wire.Mount(path)


def refused(conn: wire.QtfsConnection, error: type[Exception], action: Callable[[], object]) -> None:
    """``action`` raises ``error``; the connection is in its ERROR state and every later call raises."""
    with pytest.raises(error):
        action()
    assert conn.error is not None
    for later in (lambda: conn.receive_data(b"x"), conn.next_event, lambda: conn.send(wire.Ping(bytes(8)))):
        with pytest.raises(LocalProtocolError, match="failed earlier"):
            later()


def test_protocol_violations() -> None:
    client, server = pair()
    refused(server, LocalProtocolError, lambda: server.send(wire.Call(1, wire.Lookup(b"a"))))  # servers do not ask
    client, server = pair()
    client.send(wire.Call(1, wire.Lookup(b"a")))
    refused(client, LocalProtocolError, lambda: client.send(wire.Call(1, wire.Lookup(b"a"))))  # id already pending
    client, server = pair()
    client.receive_data(server.send(wire.Result(2, wire.Empty())))
    refused(client, RemoteProtocolError, client.next_event)  # a reply to nothing
    fresh = wire.QtfsConnection(client=False)
    fresh.receive_data(encode_frame(wire.T_PING, 0, b"\x00" * 8))
    refused(fresh, RemoteProtocolError, fresh.next_event)  # before Hello
    other = wire.QtfsConnection(client=False)
    other.receive_data(encode_frame(wire.T_HELLO, 0, b'{"node":"x","version":99}'))
    refused(other, RemoteProtocolError, other.next_event)
    _, srv = pair()
    srv.receive_data(encode_frame(wire.T_REQUEST, 1, b"\xee"))
    refused(srv, RemoteProtocolError, srv.next_event)  # unknown op
    _, srv = pair()
    srv.receive_data(encode_frame(wire.T_REQUEST, 1, b"\x08\x00"))
    assert isinstance(events(srv)[0], wire.BadCall)  # truncated fields


def test_end_of_stream() -> None:
    _client, server = pair()
    server.receive_data(b"")
    assert isinstance(server.next_event(), wire.Closed)


names = st.binary(min_size=1, max_size=20).filter(lambda b: b"/" not in b and b"\0" not in b and b not in (b".", b".."))
paths = st.lists(names, max_size=5).map(lambda parts: b"/".join(parts))


@settings(max_examples=200, deadline=None)
@given(path=paths, data=st.binary(max_size=3000), offset=st.integers(0, 2**63 - 1), split=st.integers(1, 50))
def test_any_request_survives_any_split(path: bytes, data: bytes, offset: int, split: int) -> None:
    client, server = pair()
    wire_bytes = client.send(wire.Call(1, wire.Lookup(path))) + client.send(wire.Call(2, wire.Write(3, offset, data)))
    for at in range(0, len(wire_bytes), split):
        server.receive_data(wire_bytes[at : at + split])
    assert events(server) == [wire.Call(1, wire.Lookup(path)), wire.Call(2, wire.Write(3, offset, data))]


@settings(max_examples=200, deadline=None)
@given(junk=st.binary(max_size=200))
def test_junk_never_crashes_the_decoder(junk: bytes) -> None:
    _, server = pair()
    server.receive_data(encode_frame(wire.T_REQUEST, 1, junk))
    with contextlib.suppress(RemoteProtocolError):
        events(server)


# (Invalidate, the exact payload of its frame): one table for encoder and decoder.
INVALIDATIONS = [
    (wire.Invalidate(wire.Change.DATA, b"dir/file"), b"\x01dir/file"),
    (wire.Invalidate(wire.Change.ATTR, b""), b"\x02"),
    (wire.Invalidate(wire.Change.ENTRY, b"new"), b"\x03new"),
    (wire.Invalidate(wire.Change.ALL), b"\x04"),
    (wire.Invalidate(wire.Change.UNWATCHED), b"\x05"),
]


@pytest.mark.parametrize(("invalidate", "payload"), INVALIDATIONS, ids=lambda i: repr(i))
def test_invalidate_bytes(invalidate: wire.Invalidate, payload: bytes) -> None:
    client, server = pair()
    data = server.send(invalidate)
    assert data == encode_frame(wire.T_INVALIDATE, 0, payload)
    client.receive_data(data)
    assert events(client) == [invalidate]
    for byte in data:
        client.receive_data(bytes([byte]))
    assert events(client) == [invalidate]
    # between a request and its reply, and with trailing bytes of the next frame
    client.send(wire.Call(8, wire.Lookup(b"x")))
    reply = server.send(wire.Result(8, wire.AttrReply(ATTR.encode())))
    client.receive_data(data + reply + data[:3])
    assert events(client) == [invalidate, wire.Result(8, wire.AttrReply(ATTR.encode()))]


def test_invalidate_violations() -> None:
    client, server = pair()
    refused(client, LocalProtocolError, lambda: client.send(wire.Invalidate(wire.Change.ALL)))  # the server's only
    for bad in (b"/abs", b"a/../b", b"a//b"):
        with pytest.raises(ValueError):
            wire.Invalidate(wire.Change.DATA, bad)
    with pytest.raises(ValueError):
        wire.Invalidate(wire.Change.ENTRY, b"")  # the root is nobody's entry
    for payload in (b"", b"\x09x", b"\x01a/../b", b"\x03"):
        fresh, _ = pair()
        fresh.receive_data(encode_frame(wire.T_INVALIDATE, 0, payload))
        with pytest.raises(RemoteProtocolError):
            events(fresh)
    server.receive_data(encode_frame(wire.T_INVALIDATE, 0, b"\x04"))
    refused(server, RemoteProtocolError, server.next_event)  # a server never receives one
    assert wire.MountReply(ATTR.encode(), wire.MOUNT_WATCHED | wire.MOUNT_READONLY).flags == 3
