"""One side of a qtfs connection: bytes to events and events to bytes.

After Hello both ways the client sends requests, each in one Request frame
whose channel is the request id; the server answers each id exactly once
with a Reply or an Error frame, in any order, so a slow read never holds up
a stat (requests are multiplexed).  Ping/Pong (channel 0) keep the link
proven alive.  Invalidate frames (channel 0, server to client only) say that
something changed on the host behind the client's back, so a client may
cache what the server said until told otherwise.

The client side remembers which op each pending id carries, so replies
decode to their typed form; a reply to an id that is not pending is the
peer's protocol error.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from offload.errors import LocalProtocolError, RemoteProtocolError, errno_name, errno_number
from offload.protocol import messages
from offload.protocol.framing import NEED_DATA, Frame, FrameDecoder, encode_frame, encode_header
from offload.protocol.qtfs.codec import MAX_ID, MAX_PAYLOAD, Message, check_relative
from offload.protocol.qtfs.messages import REPLIES, REQUESTS, Op, Request

T_HELLO = 0x80
T_REQUEST = 0x81
T_REPLY = 0x82
T_ERROR = 0x83
T_PING = 0x84
T_PONG = 0x85
T_INVALIDATE = 0x86

PROTOCOL_VERSION = 1


@dataclass(frozen=True, slots=True)
class Hello:
    node: str
    version: int = PROTOCOL_VERSION
    epoch: int = 0  # the server's start identity: handles of an older epoch are gone


@dataclass(frozen=True, slots=True)
class Call:
    id: int
    request: Request


@dataclass(frozen=True, slots=True)
class BadCall:
    """A well-framed request whose fields are refused (a '..' component, a bad name): answer EACCES."""

    id: int
    reason: str


@dataclass(frozen=True, slots=True)
class Result:
    id: int
    reply: Message


@dataclass(frozen=True, slots=True)
class Failure:
    id: int
    error: str  # errno name

    @property
    def errno(self) -> int:
        return errno_number(self.error)


class Change(enum.IntEnum):
    """What an Invalidate says changed at its path."""

    DATA = 1  # the file's content (and so its size and times)
    ATTR = 2  # only attributes: mode, owner, times, xattrs, link count
    ENTRY = 3  # the name appeared, went or now names another file; the parent's attributes changed too
    ALL = 4  # events were lost (the host's queue overflowed): forget everything cached
    UNWATCHED = 5  # the server can no longer watch the whole tree: stop caching


_INVALIDATE = struct.Struct("!B")


@dataclass(frozen=True, slots=True)
class Invalidate:
    """The host changed ``path`` (relative to the mount root; ``b""`` is the root) in the way ``change`` says.

    Wire payload: one change byte, then the path to the end of the frame.
    """

    change: Change
    path: bytes = b""

    def __post_init__(self) -> None:
        if not isinstance(self.change, Change):
            raise ValueError(f"Invalidate.change = {self.change!r} is not a Change")
        check_relative(self.path, "Invalidate.path")
        if self.change is Change.ENTRY and not self.path:
            raise ValueError("Invalidate: an ENTRY change names an entry, not the root")

    def encode(self) -> bytes:
        return _INVALIDATE.pack(self.change) + self.path


@dataclass(frozen=True, slots=True)
class Ping:
    token: int


@dataclass(frozen=True, slots=True)
class Pong:
    token: int


class Closed:
    """The peer ended the stream on a frame boundary."""

    def __repr__(self) -> str:
        return "Closed()"


Event = Hello | Call | BadCall | Result | Failure | Ping | Pong | Invalidate | Closed
_TOKEN = struct.Struct("!Q")


class QtfsConnection:
    """Bytes to events and events to bytes for one side (``client`` or not).

    The only state: whether the peer's Hello came, and on the client the op
    of every pending request id (so replies decode to their type).
    """

    def __init__(self, client: bool) -> None:
        self.client = client
        self._decoder = FrameDecoder(MAX_PAYLOAD)
        self._pending: dict[int, Op] = {}
        self._hello_seen = False

    @property
    def pending(self) -> int:
        return len(self._pending)

    # outgoing

    def send_hello(self, hello: Hello) -> bytes:
        document = {"node": hello.node, "version": hello.version, "epoch": hello.epoch}
        return encode_frame(T_HELLO, 0, messages.dump(document), max_payload=MAX_PAYLOAD)

    def send_call(self, id: int, request: Request) -> bytes:
        if not self.client:
            raise LocalProtocolError("only the client sends requests")
        if not 0 < id <= MAX_ID:
            raise LocalProtocolError(f"request id {id} out of range")
        if id in self._pending:
            raise LocalProtocolError(f"request id {id} is already pending")
        op = request.OP
        body = request.encode()
        if len(body) + 1 > MAX_PAYLOAD:
            raise LocalProtocolError(f"{op.name} request of {len(body)} bytes is too large")
        self._pending[id] = op
        return encode_header(T_REQUEST, id, len(body) + 1) + bytes((op,)) + body

    def send_result(self, id: int, reply: Message) -> bytes:
        body = reply.encode()
        return encode_frame(T_REPLY, id, body, max_payload=MAX_PAYLOAD)

    def result_header(self, id: int, length: int) -> bytes:
        """The header of a Reply whose payload the server sends as it is (a read's data)."""
        if length > MAX_PAYLOAD:
            raise LocalProtocolError(f"reply of {length} bytes is too large")
        return encode_header(T_REPLY, id, length)

    def send_failure(self, id: int, error: int | str) -> bytes:
        name = (errno_name(error) if isinstance(error, int) else error).encode()
        return encode_frame(T_ERROR, id, name)

    def send_invalidate(self, invalidate: Invalidate) -> bytes:
        if self.client:
            raise LocalProtocolError("only the server sends Invalidate")
        return encode_frame(T_INVALIDATE, 0, invalidate.encode(), max_payload=MAX_PAYLOAD)

    def send_ping(self, token: int) -> bytes:
        return encode_frame(T_PING, 0, _TOKEN.pack(token))

    def send_pong(self, token: int) -> bytes:
        return encode_frame(T_PONG, 0, _TOKEN.pack(token))

    # incoming

    def receive_data(self, data: bytes | bytearray) -> None:
        self._decoder.receive_data(bytes(data) if isinstance(data, bytearray) else data)

    def next_event(self) -> Event | None:
        """The next event, or None when more bytes are needed."""
        frame = self._decoder.next_frame()
        if not isinstance(frame, Frame):
            return None if frame is NEED_DATA else Closed()
        kind, channel, payload = frame.type, frame.channel, frame.payload
        if kind == T_HELLO:
            return self._hello(payload)
        if not self._hello_seen:
            raise RemoteProtocolError(f"frame type {kind:#04x} before Hello")
        if kind in (T_PING, T_PONG):
            if len(payload) != _TOKEN.size:
                raise RemoteProtocolError(f"ping of {len(payload)} bytes")
            (token,) = _TOKEN.unpack(payload)
            return Ping(token) if kind == T_PING else Pong(token)
        if kind == T_INVALIDATE and self.client:
            return self._invalidate(payload)
        if kind == T_REQUEST and not self.client:
            if not payload:
                raise RemoteProtocolError("empty request")
            try:
                op = Op(payload[0])
            except ValueError:
                raise RemoteProtocolError(f"unknown op {payload[0]}") from None
            if channel == 0:
                raise RemoteProtocolError("request id 0")
            try:
                return Call(channel, REQUESTS[op].decode(memoryview(payload)[1:], op.name))
            except RemoteProtocolError as exc:
                # The frame is intact, so the stream stays in step: refuse this request only.
                return BadCall(channel, str(exc))
        if kind in (T_REPLY, T_ERROR) and self.client:
            op_pending = self._pending.pop(channel, None)
            if op_pending is None:
                raise RemoteProtocolError(f"reply to request {channel}, which is not pending")
            if kind == T_ERROR:
                if not 0 < len(payload) <= 32 or not payload.isascii():
                    raise RemoteProtocolError("malformed error reply")
                return Failure(channel, payload.decode())
            return Result(channel, REPLIES[op_pending].decode(payload, f"{op_pending.name} reply"))
        raise RemoteProtocolError(f"unexpected frame type {kind:#04x} on the {'client' if self.client else 'server'}")

    def _invalidate(self, payload: bytes) -> Invalidate:
        try:
            change = Change(payload[0])
            return Invalidate(change, bytes(payload[1:]))
        except (IndexError, ValueError) as exc:
            raise RemoteProtocolError(f"malformed Invalidate: {exc}") from None

    def _hello(self, payload: bytes) -> Hello:
        if self._hello_seen:
            raise RemoteProtocolError("a second Hello")
        document = messages.load(bytes(payload), "Hello")
        try:
            hello = Hello(str(document["node"]), int(document["version"]), int(document.get("epoch", 0)))
        except (ValueError, KeyError, TypeError, AttributeError, OverflowError, RecursionError) as exc:
            # JSON's Infinity, a list for a document, nesting deeper than the stack: all the peer's fault.
            raise RemoteProtocolError(f"malformed Hello: {exc}") from None
        if hello.version != PROTOCOL_VERSION:
            raise RemoteProtocolError(f"peer speaks qtfs protocol {hello.version}, we speak {PROTOCOL_VERSION}")
        self._hello_seen = True
        return hello
