"""The one link core under rexec, udsproxy and qtfs, sans-io in the manner of h11 (ARCHITECTURE.md).

Whatever a decoder raises on the peer's bytes (a ValueError of an event's own
checks, a struct.error of a short field) is the peer's protocol error, never a
crash.  Every byte received counts as a sign of life, so a busy link needs no
Pong in time.
"""

from __future__ import annotations

import enum
import functools
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Concatenate, ParamSpec, TypeVar

from offload.errors import LinkLost, LocalProtocolError, ProtocolError, RemoteProtocolError
from offload.protocol import messages
from offload.protocol.framing import ABSOLUTE_MAX_PAYLOAD, NEED_DATA, Frame, FrameDecoder, encode_frame, encode_header

__all__ = ["NEED_DATA", "Closed", "Connection", "Phase", "Ping", "Pong", "Registry", "Role", "Window"]


class Role(enum.Enum):
    CLIENT = "client"  # opened the connection and asks
    SERVER = "server"  # accepted it and answers


@dataclass(frozen=True, slots=True)
class Ping:
    token: bytes = b""


@dataclass(frozen=True, slots=True)
class Pong:
    token: bytes = b""


@dataclass(frozen=True, slots=True)
class Closed:
    """The peer ended the stream on a frame boundary."""


#: What a decoder may raise on bytes the peer made up; each is the peer's protocol error.
DECODE_ERRORS = (ValueError, TypeError, KeyError, IndexError, OverflowError, RecursionError, struct.error)

Encoder = Callable[[Any], tuple[int, bytes]]
Decoder = Callable[[Any, int, bytes], Any]


@dataclass(frozen=True, slots=True)
class Kind:
    """One declared frame type."""

    code: int
    event: type
    sender: Role | None  # None: either side
    encode: Encoder  # event -> (channel, payload)
    decode: Decoder  # (connection, channel, payload) -> event


class Registry:
    """The frame types of one protocol, each declared once."""

    def __init__(self, name: str, *, max_payload: int, hello: type) -> None:
        if not 0 < max_payload <= ABSOLUTE_MAX_PAYLOAD:
            raise ValueError(f"max_payload must be in 1..{ABSOLUTE_MAX_PAYLOAD}")
        self.name = name
        self.max_payload = max_payload
        self.hello = hello
        self.by_code: dict[int, Kind] = {}
        self.by_event: dict[type, Kind] = {}

    def declare(self, code: int, event: type, *, sender: Role | None = None, encode: Encoder, decode: Decoder) -> None:
        if not 0 <= code <= 0xFF:
            raise LocalProtocolError(f"{self.name}: frame type {code} out of range")
        for known, what in ((self.by_code.get(code), f"frame type {code:#04x}"), (self.by_event.get(event), "")):
            if known is not None:
                raise LocalProtocolError(
                    f"{self.name}: {what or event.__name__} is already declared"
                    f" ({known.event.__name__} as {known.code:#04x})"
                )
        kind = Kind(code, event, sender, encode, decode)
        self.by_code[code] = kind
        self.by_event[event] = kind

    def declare_object(
        self,
        code: int,
        event: type,
        *fields: tuple[str, type],
        sender: Role | None = None,
        channel: int | None = 0,
        limit: int = 4096,
    ) -> None:
        """Declare an event that is the JSON object of ``fields`` (name, JSON type): strings kept to ``limit``, lists as tuples.

        It travels on ``channel`` and is refused on any other; with None, on
        the channel its own ``channel`` field names, never the control channel 0.
        """
        what = event.__name__

        def encode(e: Any) -> tuple[int, bytes]:
            document = {name: getattr(e, name) for name, _ in fields}
            return (e.channel if channel is None else channel), messages.dump(document)

        def decode(conn: Any, got: int, payload: bytes) -> Any:
            if got == 0 if channel is None else got != channel:
                raise RemoteProtocolError(f"{what} on channel {got}")
            document = messages.load(payload, what)
            found = (messages.field(document, name, kind, what) for name, kind in fields)
            values = [
                value[:limit] if isinstance(value, str) else tuple(value) if isinstance(value, list) else value
                for value in found
            ]
            return event(*values) if channel is not None else event(got, *values)

        self.declare(code, event, sender=sender, encode=encode, decode=decode)

    def declare_keepalive(self, ping: int, pong: int, *, size: int | None = None) -> None:
        """Ping and Pong at these codes on channel 0; tokens of exactly ``size`` bytes, or any kept to 64."""

        def decoder(event: type[Ping | Pong]) -> Decoder:
            def decode(conn: Any, channel: int, payload: bytes) -> Ping | Pong:
                if channel:
                    raise RemoteProtocolError(f"{event.__name__} on channel {channel}")
                if size is not None and len(payload) != size:
                    raise RemoteProtocolError(f"{event.__name__} of {len(payload)} bytes")
                return event(payload[:64])

            return decode

        self.declare(ping, Ping, encode=lambda e: (0, e.token), decode=decoder(Ping))
        self.declare(pong, Pong, encode=lambda e: (0, e.token), decode=decoder(Pong))


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _final_error(method: Callable[Concatenate[Connection, _P], _R]) -> Callable[Concatenate[Connection, _P], _R]:
    """The ERROR state: after any violation `error` holds it, and every later call raises."""

    @functools.wraps(method)
    def guarded(self: Connection, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        if self.error is not None:
            raise LocalProtocolError(f"{self.registry.name} connection failed earlier: {self.error}") from self.error
        try:
            return method(self, *args, **kwargs)
        except (ProtocolError, LinkLost) as exc:
            if self.error is None:
                self.error = exc
            raise

    return guarded


class Phase(enum.Enum):
    """The state of a protocol without states of its own."""

    OPEN = "open"


class Connection:
    """One side of one connection of the protocol whose `registry` a subclass names."""

    registry: ClassVar[Registry]
    #: (sender, event type, state) -> next state.  An event type that appears
    #: nowhere in the table is allowed in every state and changes none.
    transitions: ClassVar[Mapping[tuple[Role, type, Any], Any]] = {}

    def __init__(
        self,
        role: Role,
        state: enum.Enum = Phase.OPEN,
        *,
        keepalive: float | None = None,
        ping_every: float | None = None,
        now: float = 0.0,
    ) -> None:
        self.role = role
        self.peer_role = Role.SERVER if role is Role.CLIENT else Role.CLIENT
        self.state: Any = state
        self.error: Exception | None = None
        self.peer_hello: Any = None
        self.sent_hello = False
        self._decoder = FrameDecoder(self.registry.max_payload)
        self._governed = {event for _, event, _ in self.transitions}
        self.keepalive = keepalive
        self.ping_every = ping_every or (keepalive / 3 if keepalive else float("inf"))
        self._heard = now
        self._next_ping = now + self.ping_every
        self._pings = 0

    # -- sending ----------------------------------------------------------------------------

    @_final_error
    def send(self, event: Any) -> bytes:
        """The bytes of ``event``; `LocalProtocolError` if this side may not send it now."""
        kind = self._kind_to_send(type(event))
        if isinstance(event, self.registry.hello):
            if self.sent_hello:
                raise LocalProtocolError("Hello sent twice")
            self.sent_hello = True
        self.state = self._transition(self.role, event, LocalProtocolError)
        self._sending(event)
        channel, payload = kind.encode(event)
        return encode_frame(kind.code, channel, payload, max_payload=self.registry.max_payload)

    @_final_error
    def send_header(self, event: type, channel: int, length: int) -> bytes:
        """The header of a frame of ``event`` whose payload the caller sends as it is (no copy).

        Only for frames that change no state: a read's data, a relay's bytes.
        """
        kind = self._kind_to_send(event)
        if length > self.registry.max_payload:
            raise LocalProtocolError(f"{event.__name__} of {length} bytes is too large")
        return encode_header(kind.code, channel, length)

    def _kind_to_send(self, event: type) -> Kind:
        kind = self.registry.by_event.get(event)
        if kind is None:
            raise LocalProtocolError(f"{self.registry.name} cannot send {event.__name__}")
        if kind.sender is not None and kind.sender is not self.role:
            raise LocalProtocolError(f"only the {kind.sender.value} sends {event.__name__}")
        if not self.sent_hello and event is not self.registry.hello:
            raise LocalProtocolError(f"{event.__name__} before Hello")
        return kind

    def _transition(self, sender: Role, event: object, error: type[ProtocolError]) -> Any:
        if type(event) not in self._governed:
            return self.state
        next_state = self.transitions.get((sender, type(event), self.state))
        if next_state is None:
            raise error(f"{type(event).__name__} from the {sender.value} in state {self.state.value}")
        return next_state

    def _sending(self, event: Any) -> None:
        """What the protocol remembers of an event it sends (may refuse it with LocalProtocolError)."""

    # -- receiving --------------------------------------------------------------------------

    @_final_error
    def receive_data(self, data: bytes | bytearray) -> None:
        """Bytes from the peer; ``b""`` means it ended the stream."""
        self._decoder.receive_data(bytes(data) if isinstance(data, bytearray) else data)

    @_final_error
    def next_event(self) -> Any:
        """The next event, `NEED_DATA`, or `Closed` (again on every later call) at a clean end."""
        while True:
            frame = self._decoder.next_frame()
            if not isinstance(frame, Frame):
                return NEED_DATA if frame is NEED_DATA else Closed()
            event = self._received(self._decode(frame))
            if event is not None:
                return event

    def _decode(self, frame: Frame) -> Any:
        kind = self.registry.by_code.get(frame.type)
        if kind is None:
            raise RemoteProtocolError(f"unknown {self.registry.name} frame type {frame.type:#04x}")
        if kind.sender is self.role:
            raise RemoteProtocolError(f"{kind.event.__name__} from the {self.peer_role.value}")
        hello = kind.event is self.registry.hello
        if hello and self.peer_hello is not None:
            raise RemoteProtocolError("a second Hello")
        if not hello and self.peer_hello is None:
            raise RemoteProtocolError(f"{kind.event.__name__} before Hello")
        try:
            event = kind.decode(self, frame.channel, frame.payload)
        except DECODE_ERRORS as exc:
            raise RemoteProtocolError(f"malformed {kind.event.__name__}: {exc}") from None
        if hello:
            self.peer_hello = event
        self.state = self._transition(self.peer_role, event, RemoteProtocolError)
        return event

    @_final_error
    def event_of(self, type: int, channel: int, payload: bytes) -> Any:
        """The event of a frame its driver split itself (`framing.split_frames`), as `next_event` would return it.

        Checked the same way; None when the protocol drops it.
        """
        return self._received(self._decode(Frame(type, channel, payload)))

    @_final_error
    def leftover(self) -> bytes:
        """The bytes received beyond the events returned so far, handed to another reader (udsproxy's relay)."""
        return self._decoder.take_buffered()

    def _received(self, event: Any) -> Any:
        """What the protocol makes of a received event; None drops it (a frame that crossed ours)."""
        return event

    # -- keepalive --------------------------------------------------------------------------

    def heard(self, now: float) -> None:
        """The peer was heard from at ``now`` (bytes arrived)."""
        self._heard = now

    @property
    def deadline(self) -> float:
        """When `poll` has something to do next."""
        if self.keepalive is None:
            return float("inf")
        return min(self._next_ping, self._heard + self.keepalive)

    @_final_error
    def poll(self, now: float) -> bytes:
        """A Ping's bytes when one is due at ``now``, else ``b""``; `LinkLost` after ``keepalive`` of silence."""
        if self.keepalive is None:
            return b""
        if now - self._heard >= self.keepalive:
            raise LinkLost(f"nothing heard for {now - self._heard:.1f} s")
        if now < self._next_ping:
            return b""
        self._next_ping = now + self.ping_every
        self._pings += 1
        return self.send(Ping(self._pings.to_bytes(8, "big")))


class Window:
    """The credit window of one channel, both ways.

    The sender spends credit (`sent`) and gets more from the peer's window
    frames (`granted`); the receiver counts what arrived against what it
    allowed (`received`) and, as its consumer takes the bytes (`consumed`),
    says how much to grant back: nothing until half a window was taken, so
    window frames stay few.
    """

    __slots__ = ("allowance", "credit", "initial", "taken")

    LIMIT = 1 << 31

    def __init__(self, initial: int) -> None:
        self.initial = initial
        self.credit = initial  # bytes we may still send
        self.allowance = initial  # bytes the peer may still send us
        self.taken = 0  # bytes our consumer took since we last granted

    def sent(self, count: int) -> None:
        if count > self.credit:
            raise LocalProtocolError(f"{count} bytes exceed the credit of {self.credit}")
        self.credit -= count

    def granted(self, increment: int) -> None:
        if self.credit + increment > self.LIMIT:
            raise RemoteProtocolError("a window grew past 2 GiB")
        self.credit += increment

    def received(self, count: int) -> None:
        if count > self.allowance:
            raise RemoteProtocolError("the peer overran its window")
        self.allowance -= count

    def consumed(self, count: int) -> int:
        """Record ``count`` bytes taken by our consumer; the increment to grant now (0: not yet)."""
        self.taken += count
        if self.taken < self.initial // 2:
            return 0
        increment, self.taken = self.taken, 0
        self.allowance += increment
        return increment
