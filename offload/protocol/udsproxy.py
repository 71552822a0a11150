"""The udsproxy protocol between two udsproxyd, sans-io.

One authenticated connection carries one proxied UNIX socket connection:
Hello both ways, then the client (the side where connect() failed) sends
Connect with the path and the name of the user who called connect() (the
server maps it and connects as that user); the server (where the socket lives) answers
Connected, naming an errno on failure; then each side sends Data and one
Eof (half-close carried as half-close).  Message boundaries of a
SOCK_SEQPACKET connection survive because each Data frame is one message.

Once open, the connection is multiplexed: channel 1 is the proxied socket;
channels 2 and up are pipes that were passed with SCM_RIGHTS (the side that
connected numbers its channels even, the other side odd, so they never
collide).  Passed fds travel as an Fds frame describing them, followed by
the Data frame they were sent with; the receiver answers every Fds frame,
in order, with FdsResult (an errno name, or empty when it delivered them).
A pipe channel carries Data and one Eof from the side that reads the local
pipe to the side that writes into one; the writer returns Window credits
as it writes, so a slow pipe reader never stalls the other channels.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from offload.errors import LocalProtocolError, RemoteProtocolError
from offload.protocol import fdpass, messages
from offload.protocol.fdpass import MAX_FDS, FdDescription
from offload.protocol.framing import encode_frame, encode_header
from offload.protocol.link import NEED_DATA as NEED_DATA
from offload.protocol.link import Closed, Connection, Registry, Role
from offload.protocol.messages import check_path

T_HELLO = 0x01
T_CONNECT = 0x60
T_CONNECTED = 0x61
T_DATA = 0x20
T_EOF = 0x21
T_FDS = 0x22
T_FDS_RESULT = 0x23
T_WINDOW = 0x24
T_PAUSE = 0x25
DATA_CHANNEL = 1
MAX_DATA = 256 << 10
#: Frames larger than a Data frame are never legitimate.
MAX_FRAME = MAX_DATA + 1024
SOCKET_TYPES = ("stream", "seqpacket")
MAX_CHANNEL = 1 << 31

# The requests of the LD_PRELOAD shim (native/qtfs_shim.c) to its udsproxyd, in the same frames.
SHIM_CONNECT = 0x50  # u16 socket type, then the path
SHIM_CONNECTED = 0x51  # u32 errno; the connected socket by SCM_RIGHTS
SHIM_SEND_FDS = 0x52  # the bytes of one sendmsg; SCM_RIGHTS: the carried socket first, then the fds to pass
SHIM_SENT = 0x53  # u32 errno
#: The answer to a Connect for a path this side does not carry (not under
#: its --allow prefixes): the caller keeps the error its own connect() had,
#: so, e.g., libvirt still sees ENOENT for a daemon it may start itself.
SHIM_NOT_CARRIED = 0xFFFF


@dataclass(frozen=True, slots=True)
class Hello:
    node: str


@dataclass(frozen=True, slots=True)
class Connect:
    path: str
    type: str = "stream"
    #: The caller's user name on the client's machine; the server maps it.
    user: str = "nobody"

    def __post_init__(self) -> None:
        check_path(self.path, "socket")
        if not 0 < len(self.user) <= 256 or "\0" in self.user or "/" in self.user:
            raise ValueError(f"user name {self.user[:64]!r}")
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
    channel: int = DATA_CHANNEL


@dataclass(frozen=True, slots=True)
class Eof:
    channel: int = DATA_CHANNEL


@dataclass(frozen=True, slots=True)
class Fds:
    """The fds passed with the next Data frame on the data channel."""

    fds: tuple[FdDescription, ...]


@dataclass(frozen=True, slots=True)
class FdsResult:
    """The answer to one Fds: an errno name, or empty when they were delivered."""

    error: str = ""


@dataclass(frozen=True, slots=True)
class Window:
    """Credit for ``increment`` more bytes on pipe channel ``channel``."""

    channel: int
    increment: int


@dataclass(frozen=True, slots=True)
class Pause:
    """The sender sends nothing more on this connection, and reads nothing more from its program: the
    connection ends, without either program's end of stream, to be attached again on another.

    Each side answers the other's with its own; once both were sent,
    everything either sent before has arrived (a restart of a server loses
    no byte of a monitor it carries).
    """


def data_header(channel: int, length: int) -> bytes:
    """The header of a Data frame whose payload the caller already holds (no copy)."""
    return encode_header(T_DATA, channel, length)


def shim_connect_request(payload: bytes) -> tuple[int, str]:
    """Parse the shim's Connect payload: (socket type, path); ValueError names what is wrong."""
    if len(payload) < 3:
        raise ValueError(f"connect request of {len(payload)} bytes")
    kind = int.from_bytes(payload[:2], "big")
    raw = payload[2:]
    if b"\0" in raw:
        raise ValueError("path contains NUL")
    if len(raw) > 107:
        raise ValueError(f"path of {len(raw)} bytes does not fit a sockaddr_un")
    return kind, raw.decode(errors="surrogateescape")


def shim_reply(kind: int, error: int) -> bytes:
    return encode_frame(kind, 0, error.to_bytes(4, "big"))


Event = Hello | Connect | Connected | Data | Eof | Fds | FdsResult | Window | Closed


class State(enum.Enum):
    IDLE = "idle"
    CONNECTING = "connecting"
    OPEN = "open"
    DONE = "done"


def _hello(conn: Any, channel: int, payload: bytes) -> Hello:
    document = messages.load(payload, "hello")
    if document.get("service") != "udsproxy":
        raise RemoteProtocolError(f"peer speaks {document.get('service')!r}, not udsproxy")
    return Hello(str(document.get("node", "?"))[:256])


def _data(event: Data) -> tuple[int, bytes]:
    if len(event.data) > MAX_DATA:
        raise LocalProtocolError(f"data of {len(event.data)} bytes is too large")
    return event.channel, event.data


def _fds(event: Fds) -> tuple[int, bytes]:
    if not 0 < len(event.fds) <= MAX_FDS:
        raise LocalProtocolError(f"{len(event.fds)} fds in one message")
    if any(fd.is_pipe and not fd.channel for fd in event.fds):
        raise LocalProtocolError("a pipe without a channel")
    return DATA_CHANNEL, messages.dump({"fds": [fd.to_json() for fd in event.fds]})


def _fds_of(conn: Any, channel: int, payload: bytes) -> Fds:
    entries = messages.field(messages.load(payload, "fds"), "fds", list, "fds")
    return _on(channel, True, Fds(fdpass.decode(entries, "fds", range(DATA_CHANNEL + 1, MAX_CHANNEL))))


def _on(channel: int, data_channel: bool, event: Any) -> Any:
    if (channel == DATA_CHANNEL) != data_channel:
        raise RemoteProtocolError(f"{type(event).__name__} on channel {channel}")
    return event


def _window(conn: Any, channel: int, payload: bytes) -> Window:
    if len(payload) != 4:
        raise RemoteProtocolError(f"window of {len(payload)} bytes")
    return _on(channel, False, Window(channel, int.from_bytes(payload, "big")))


UDSPROXY = Registry("udsproxy", max_payload=MAX_FRAME, hello=Hello)
UDSPROXY.declare(
    T_HELLO, Hello, encode=lambda e: (0, messages.dump({"node": e.node, "service": "udsproxy"})), decode=_hello
)
UDSPROXY.declare_object(T_CONNECT, Connect, ("path", str), ("type", str), ("user", str), sender=Role.CLIENT)
UDSPROXY.declare_object(T_CONNECTED, Connected, ("error", str), sender=Role.SERVER, limit=32)
UDSPROXY.declare_object(T_FDS_RESULT, FdsResult, ("error", str), channel=DATA_CHANNEL, limit=32)
UDSPROXY.declare(T_DATA, Data, encode=_data, decode=lambda conn, channel, payload: Data(payload, channel))
UDSPROXY.declare(T_EOF, Eof, encode=lambda e: (e.channel, b""), decode=lambda conn, channel, payload: Eof(channel))
UDSPROXY.declare(T_FDS, Fds, encode=_fds, decode=_fds_of)
UDSPROXY.declare(T_WINDOW, Window, encode=lambda e: (e.channel, e.increment.to_bytes(4, "big")), decode=_window)
UDSPROXY.declare(
    T_PAUSE,
    Pause,
    encode=lambda e: (DATA_CHANNEL, b""),
    decode=lambda conn, channel, payload: _on(channel, True, Pause()),
)


class UdsProxyConnection(Connection):
    """One udsproxy connection: its setup, driven in trio; then the relay continues it (`opened`, `leftover`)."""

    registry = UDSPROXY
    transitions = {
        (Role.CLIENT, Connect, State.IDLE): State.CONNECTING,
        (Role.SERVER, Connected, State.CONNECTING): State.OPEN,  # DONE if it names an error
        **{
            (role, event, State.OPEN): State.OPEN
            for role in Role
            for event in (Data, Eof, Fds, FdsResult, Window, Pause)
        },
    }

    def __init__(self, client: bool) -> None:
        super().__init__(Role.CLIENT if client else Role.SERVER, State.IDLE)

    @classmethod
    def opened(cls, client: bool) -> UdsProxyConnection:
        """A connection past its setup, as the relay continues it (or a console's pty, which has none)."""
        conn = cls(client)
        conn.sent_hello = True
        conn.peer_hello = Hello("")
        conn.state = State.OPEN
        return conn

    def _sending(self, event: Any) -> None:
        if not isinstance(event, Hello) and self.peer_hello is None:
            raise LocalProtocolError(f"{type(event).__name__} before the peer's Hello")
        self._received(event)

    def _received(self, event: Any) -> Any:
        if isinstance(event, Connected) and event.error:
            self.state = State.DONE
        return event
