"""One side of a qtfs connection: the qtfs table on the link core (`offload.protocol.link`).

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
from dataclasses import dataclass
from typing import Any

from offload.errors import LocalProtocolError, RemoteProtocolError, errno_number
from offload.protocol import messages
from offload.protocol.framing import NEED_DATA as NEED_DATA
from offload.protocol.link import Closed, Connection, Ping, Pong, Registry, Role
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
        return bytes((self.change,)) + self.path


Event = Hello | Call | BadCall | Result | Failure | Ping | Pong | Invalidate | Closed


def _hello(conn: Any, channel: int, payload: bytes) -> Hello:
    document = messages.load(payload, "Hello")
    hello = Hello(str(document["node"]), int(document["version"]), int(document.get("epoch", 0)))
    if hello.version != PROTOCOL_VERSION:
        raise RemoteProtocolError(f"peer speaks qtfs protocol {hello.version}, we speak {PROTOCOL_VERSION}")
    return hello


def _call(conn: Any, channel: int, payload: bytes) -> Call | BadCall:
    op = Op(payload[0])
    if channel == 0:
        raise RemoteProtocolError("request id 0")
    try:
        return Call(channel, REQUESTS[op].decode(memoryview(payload)[1:], op.name))
    except RemoteProtocolError as exc:
        # The frame is intact, so the stream stays in step: refuse this request only.
        return BadCall(channel, str(exc))


def _answered(conn: QtfsConnection, id: int) -> Op:
    op = conn.pending.pop(id, None)
    if op is None:
        raise RemoteProtocolError(f"reply to request {id}, which is not pending")
    return op


def _result(conn: QtfsConnection, channel: int, payload: bytes) -> Result:
    op = _answered(conn, channel)
    return Result(channel, REPLIES[op].decode(payload, f"{op.name} reply"))


def _failure(conn: QtfsConnection, channel: int, payload: bytes) -> Failure:
    _answered(conn, channel)
    if not 0 < len(payload) <= 32 or not payload.isascii():
        raise RemoteProtocolError("malformed error reply")
    return Failure(channel, payload.decode())


QTFS = Registry("qtfs", max_payload=MAX_PAYLOAD, hello=Hello)
QTFS.declare(
    T_HELLO,
    Hello,
    encode=lambda e: (0, messages.dump({"node": e.node, "version": e.version, "epoch": e.epoch})),
    decode=_hello,
)
QTFS.declare(
    T_REQUEST,
    Call,
    sender=Role.CLIENT,
    encode=lambda e: (e.id, bytes((e.request.OP,)) + e.request.encode()),
    decode=_call,
)
QTFS.declare(T_REPLY, Result, sender=Role.SERVER, encode=lambda e: (e.id, e.reply.encode()), decode=_result)
QTFS.declare(T_ERROR, Failure, sender=Role.SERVER, encode=lambda e: (e.id, e.error.encode()), decode=_failure)
QTFS.declare_keepalive(T_PING, T_PONG, size=8)
QTFS.declare(
    T_INVALIDATE,
    Invalidate,
    sender=Role.SERVER,
    encode=lambda e: (0, e.encode()),
    decode=lambda conn, channel, payload: Invalidate(Change(payload[0]), payload[1:]),
)


class QtfsConnection(Connection):
    """Bytes to events and events to bytes for one side (``client`` or not)."""

    registry = QTFS

    def __init__(self, client: bool, **keepalive: Any) -> None:
        super().__init__(Role.CLIENT if client else Role.SERVER, **keepalive)
        self.pending: dict[int, Op] = {}

    def _sending(self, event: Any) -> None:
        if isinstance(event, Call):
            if not 0 < event.id <= MAX_ID:
                raise LocalProtocolError(f"request id {event.id} out of range")
            if event.id in self.pending:
                raise LocalProtocolError(f"request id {event.id} is already pending")
            self.pending[event.id] = event.request.OP
