"""The udsproxy protocol between two udsproxyd, sans-io.

One authenticated connection carries one proxied UNIX socket connection:
Hello both ways, then the client (the side where connect() failed) sends
Connect with the path; the server (where the socket lives) answers
Connected, naming an errno on failure; then each side sends Data and one
Eof (half-close carried as half-close).  Message boundaries of a
SOCK_SEQPACKET connection survive because each Data frame is one message.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from offload.errors import LocalProtocolError, RemoteProtocolError
from offload.protocol import messages
from offload.protocol.framing import CLOSED, NEED_DATA, Frame, FrameDecoder, encode_frame
from offload.protocol.rexec import check_path

T_HELLO = 0x01
T_CONNECT = 0x60
T_CONNECTED = 0x61
T_DATA = 0x20
T_EOF = 0x21
DATA_CHANNEL = 1
MAX_DATA = 256 << 10
SOCKET_TYPES = ("stream", "seqpacket")


@dataclass(frozen=True, slots=True)
class Hello:
    node: str


@dataclass(frozen=True, slots=True)
class Connect:
    path: str
    type: str = "stream"

    def __post_init__(self) -> None:
        check_path(self.path, "socket")
        if len(self.path.encode()) > 107:
            raise ValueError(f"socket path of {len(self.path.encode())} bytes does not fit a sockaddr_un")
        if self.type not in SOCKET_TYPES:
            raise ValueError(f"socket type {self.type!r} is not carried")


@dataclass(frozen=True, slots=True)
class Connected:
    """``error`` is an errno name ("ENOENT"), or empty when connected."""

    error: str = ""


@dataclass(frozen=True, slots=True)
class Data:
    data: bytes


@dataclass(frozen=True, slots=True)
class Eof:
    pass


@dataclass(frozen=True, slots=True)
class Closed:
    pass


Event = Hello | Connect | Connected | Data | Eof | Closed


class State(enum.Enum):
    HELLO = "hello"
    IDLE = "idle"
    CONNECTING = "connecting"
    OPEN = "open"
    DONE = "done"


class UdsProxyConnection:
    def __init__(self, client: bool) -> None:
        self.client = client
        self.state = State.HELLO
        self._sent_hello = False
        self._peer_hello = False
        self._decoder = FrameDecoder(max_payload=MAX_DATA + 1024)

    def send(self, event: Event) -> bytes:
        if isinstance(event, Hello):
            if self._sent_hello:
                raise LocalProtocolError("Hello sent twice")
            self._sent_hello = True
            return encode_frame(T_HELLO, 0, messages.dump({"node": event.node, "service": "udsproxy"}))
        if self.state is State.HELLO and not self._peer_hello:
            raise LocalProtocolError(f"{type(event).__name__} before Hello")
        if isinstance(event, Connect):
            self._expect(self.client and self.state is State.IDLE, event, LocalProtocolError)
            self.state = State.CONNECTING
            return encode_frame(T_CONNECT, 0, messages.dump({"path": event.path, "type": event.type}))
        if isinstance(event, Connected):
            self._expect(not self.client and self.state is State.CONNECTING, event, LocalProtocolError)
            self.state = State.DONE if event.error else State.OPEN
            return encode_frame(T_CONNECTED, 0, messages.dump({"error": event.error}))
        self._expect(self.state is State.OPEN, event, LocalProtocolError)
        if isinstance(event, Data):
            if len(event.data) > MAX_DATA:
                raise LocalProtocolError(f"data of {len(event.data)} bytes is too large")
            return encode_frame(T_DATA, DATA_CHANNEL, event.data, max_payload=MAX_DATA)
        if isinstance(event, Eof):
            return encode_frame(T_EOF, DATA_CHANNEL)
        raise LocalProtocolError(f"cannot send {event!r}")

    def _expect(self, condition: bool, event: Event, error: type[Exception]) -> None:
        if not condition:
            side = "client" if self.client else "server"
            raise error(f"{type(event).__name__} not allowed for the {side} in state {self.state.value}")

    def receive_data(self, data: bytes) -> None:
        self._decoder.receive_data(data)

    def next_event(self) -> Event | None:
        frame = self._decoder.next_frame()
        if frame is NEED_DATA:
            return None
        if frame is CLOSED:
            return Closed()
        assert isinstance(frame, Frame)
        return self._receive(frame)

    def _receive(self, frame: Frame) -> Event:
        if frame.type == T_HELLO:
            if self._peer_hello:
                raise RemoteProtocolError("Hello received twice")
            document = messages.load(frame.payload, "hello")
            if document.get("service") != "udsproxy":
                raise RemoteProtocolError(f"peer speaks {document.get('service')!r}, not udsproxy")
            self._peer_hello = True
            self.state = State.IDLE
            return Hello(str(document.get("node", "?"))[:256])
        if not self._peer_hello:
            raise RemoteProtocolError("frame before Hello")
        if frame.type == T_CONNECT:
            self._expect(not self.client and self.state is State.IDLE, Connect("/x"), RemoteProtocolError)
            document = messages.load(frame.payload, "connect")
            try:
                event: Event = Connect(
                    messages.field(document, "path", str, "connect"),
                    messages.field(document, "type", str, "connect"),
                )
            except ValueError as exc:
                raise RemoteProtocolError(f"connect: {exc}") from None
            self.state = State.CONNECTING
            return event
        if frame.type == T_CONNECTED:
            self._expect(self.client and self.state is State.CONNECTING, Connected(), RemoteProtocolError)
            error = messages.field(messages.load(frame.payload, "connected"), "error", str, "connected")
            self.state = State.DONE if error else State.OPEN
            return Connected(error[:32])
        if frame.type in (T_DATA, T_EOF):
            self._expect(self.state is State.OPEN, Data(b""), RemoteProtocolError)
            if frame.channel != DATA_CHANNEL:
                raise RemoteProtocolError(f"data on channel {frame.channel}")
            return Data(frame.payload) if frame.type == T_DATA else Eof()
        raise RemoteProtocolError(f"unknown frame type {frame.type:#x}")
