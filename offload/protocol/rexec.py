"""The rexec session protocol between two rexec_servers, sans-io.

One connection carries one session: the client side (the machine where the
stand-in runs) asks the server side (where the program will run) to start a
program, then both relay the program's file descriptors as channels and the
server reports how the program ended.  A connection may sit idle in a warm
pool before its session starts; keepalives run in every state.  Events
validate on construction; `RexecConnection` is rexec's table on the link core.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, get_args

from offload.errors import LocalProtocolError, RemoteProtocolError
from offload.protocol import fdpass, link, local, messages
from offload.protocol.fdpass import MAX_FDS
from offload.protocol.link import NEED_DATA as NEED_DATA
from offload.protocol.link import Closed, Connection, Ping, Pong, Registry, Role
from offload.protocol.messages import check_path
from offload.protocol.ptypaths import MAX_PTY_INDEX as MAX_PTY_INDEX

# Frame types.  Control frames use channel 0.
T_HELLO = 0x01
T_PING = 0x02
T_PONG = 0x03
T_EXEC = 0x10
T_STARTED = 0x11
T_REFUSED = 0x12
T_EXITED = 0x13
T_DAEMONIZED = 0x14
T_SIGNAL = 0x15
T_DATA = 0x20
T_EOF = 0x21
T_WINDOW = 0x22
T_OPEN = 0x23
T_RESET = 0x24
T_OPEN_PTY = 0x26
T_TICKET = 0x27
T_ATTACHED = 0x16
T_RESUME = 0x17
T_RESUMED = 0x18
T_HANGUP = 0x19

CONTROL_CHANNEL = 0
#: Channels at or above this number are bridged connections, allocated by
#: the client as its listeners accept; below it they name inherited fds.
FIRST_BRIDGE_CHANNEL = 0x10000
BRIDGE_CHANNELS = range(FIRST_BRIDGE_CHANNEL, 1 << 32)
#: Bytes a sender may have in flight on one channel before the receiver
#: grants more.  It bounds what one stalled consumer can make a peer buffer.
INITIAL_WINDOW = 4 << 20
MAX_DATA_CHUNK = 1 << 20
MAX_ARGC = 16384
MAX_ENV = 1024
MAX_FD_NUMBER = 1 << 20
#: A pty ticket: this many random bytes, in hex.
TICKET_BYTES = 32
#: A resumable session's name: this many random bytes, in hex (its secret is a ticket's size).
SESSION_BYTES = 16

#: A finite resource limit is below this (the kernel's RLIM_INFINITY is all ones).
MAX_RLIMIT = 1 << 63

_WINDOW = struct.Struct("!I")

#: A resource limit: (soft, hard), None for unlimited.
Rlimit = tuple[int | None, int | None]


def parse_rlimits(value: object) -> dict[str, Rlimit]:
    """The ``rlimits`` of a request (`offload.protocol.local.RLIMITS`), checked; ValueError names what is wrong.

    Any local user's stand-in writes them: only the known names, numbers in
    range or "unlimited", and a soft limit no higher than its hard one.
    Whether the program's user may have them is the host kernel's to say.
    """
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError("rlimits must be an object")
    limits: dict[str, Rlimit] = {}
    for name, pair in value.items():
        if name not in local.RLIMITS:
            raise ValueError(f"resource limit {str(name)[:32]!r} is not one that is carried")
        if not isinstance(pair, list | tuple) or len(pair) != 2:
            raise ValueError(f"RLIMIT_{name}: expected [soft, hard]")
        soft, hard = (_rlimit_value(v, name) for v in pair)
        if hard is not None and (soft is None or soft > hard):
            raise ValueError(f"RLIMIT_{name}: soft limit above the hard limit")
        limits[name] = (soft, hard)
    return limits


def _rlimit_value(value: object, name: str) -> int | None:
    if value == local.UNLIMITED:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < MAX_RLIMIT:
        raise ValueError(f"RLIMIT_{name}: {str(value)[:32]!r} is not a limit")
    return value


def rlimits_to_json(limits: Mapping[str, Rlimit]) -> dict[str, list[int | str]]:
    return {name: [local.UNLIMITED if v is None else v for v in pair] for name, pair in limits.items()}


class FdKind(enum.Enum):
    NULL = "null"  # /dev/null, opened remotely with the same access mode
    FILE = "file"  # a regular file on a shared path, re-opened remotely
    PIPE_IN = "pipe_in"  # the remote program reads; data flows client -> server
    PIPE_OUT = "pipe_out"  # the remote program writes; data flows server -> client
    SOCKET = "socket"  # a connected AF_UNIX stream socket, relayed both ways
    LISTENER = "listener"  # a listening AF_UNIX stream socket, bridged per connection


RELAYED_KINDS = frozenset({FdKind.PIPE_IN, FdKind.PIPE_OUT, FdKind.SOCKET})


@dataclass(frozen=True, slots=True)
class FdSpec:
    """What the remote program finds at fd number ``fd``."""

    fd: int
    kind: FdKind
    channel: int = 0  # relayed kinds: the channel carrying its bytes
    path: str = ""  # FILE
    access: str = "r"  # NULL, FILE
    append: bool = False  # FILE
    offset: int = 0  # FILE

    def __post_init__(self) -> None:
        if not 0 <= self.fd < MAX_FD_NUMBER:
            raise ValueError(f"fd number {self.fd} out of range")
        if self.kind in RELAYED_KINDS:
            if not 0 < self.channel < FIRST_BRIDGE_CHANNEL:
                raise ValueError(f"fd {self.fd}: channel {self.channel} out of range")
        elif self.channel:
            raise ValueError(f"fd {self.fd}: a {self.kind.value} fd has no channel")
        if self.access not in fdpass.ACCESS:
            raise ValueError(f"fd {self.fd}: access mode {self.access!r}")
        if self.kind is FdKind.FILE:
            check_path(self.path, f"fd {self.fd}")
            if self.offset < 0 or self.offset >= 1 << 63:
                raise ValueError(f"fd {self.fd}: offset {self.offset} out of range")

    def to_json(self) -> dict[str, Any]:
        document: dict[str, Any] = {"fd": self.fd, "kind": self.kind.value}
        if self.kind in RELAYED_KINDS:
            document["channel"] = self.channel
        if self.kind in (FdKind.NULL, FdKind.FILE):
            document["access"] = self.access
        if self.kind is FdKind.FILE:
            document.update(path=self.path, append=self.append, offset=self.offset)
        return document

    @classmethod
    def from_json(cls, document: object) -> FdSpec:
        """The spec in a peer's request; ValueError says what is wrong (the peer's error, once decoded)."""
        if not isinstance(document, dict):
            raise ValueError("an fd entry is not an object")
        kind = FdKind(messages.field(document, "kind", str, "fd entry"))
        return cls(
            fd=messages.field(document, "fd", int, "fd entry"),
            kind=kind,
            channel=document.get("channel", 0) if kind in RELAYED_KINDS else 0,
            path=document.get("path", ""),
            access=document.get("access", "r"),
            append=bool(document.get("append", False)),
            offset=document.get("offset", 0),
        )


@dataclass(frozen=True, slots=True)
class ExecRequest:
    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str = "/"
    umask: int = 0o022
    user: str = "root"
    fds: tuple[FdSpec, ...] = ()
    daemon_pidfile: str | None = None
    #: The caller's resource limits of `local.RLIMITS`, set on the program as its user.
    rlimits: Mapping[str, Rlimit] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.argv or len(self.argv) > MAX_ARGC:
            raise ValueError(f"argv must have 1..{MAX_ARGC} entries")
        if not all(isinstance(a, str) and "\0" not in a for a in self.argv):
            raise ValueError("argv entries must be strings without NUL")
        if not self.argv[0]:
            raise ValueError("the program name is empty")
        if len(self.env) > MAX_ENV:
            raise ValueError(f"more than {MAX_ENV} environment variables")
        for key, value in self.env.items():
            if not key or "=" in key or "\0" in key or "\0" in value:
                raise ValueError(f"environment variable {key!r} is malformed")
        check_path(self.cwd, "cwd")
        if not 0 <= self.umask <= 0o777:
            raise ValueError(f"umask {self.umask:o} out of range")
        if not self.user or "/" in self.user or "\0" in self.user:
            raise ValueError(f"user name {self.user!r} is malformed")
        if len(self.fds) > MAX_FDS:
            raise ValueError(f"more than {MAX_FDS} file descriptors")
        numbers = [spec.fd for spec in self.fds]
        if len(set(numbers)) != len(numbers):
            raise ValueError("an fd number appears twice")
        channels = [spec.channel for spec in self.fds if spec.channel]
        if len(set(channels)) != len(channels):
            raise ValueError("a channel appears twice")
        if self.daemon_pidfile is not None:
            check_path(self.daemon_pidfile, "daemon pidfile")
        if parse_rlimits(rlimits_to_json(self.rlimits)) != dict(self.rlimits):
            raise ValueError("rlimits are malformed")

    @property
    def program(self) -> str:
        return self.argv[0]

    def to_json(self) -> dict[str, Any]:
        return {
            "argv": list(self.argv),
            "env": dict(self.env),
            "cwd": self.cwd,
            "umask": self.umask,
            "user": self.user,
            "fds": [spec.to_json() for spec in self.fds],
            "daemon_pidfile": self.daemon_pidfile,
            "rlimits": rlimits_to_json(self.rlimits),
        }

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> ExecRequest:
        what = "exec request"
        argv = messages.field(document, "argv", list, what)
        env = messages.field(document, "env", dict, what)
        fds = messages.field(document, "fds", list, what)
        if len(fds) > MAX_FDS or len(argv) > MAX_ARGC or len(env) > MAX_ENV:
            raise RemoteProtocolError(f"{what}: too many entries")
        if not all(isinstance(v, str) for v in (*argv, *env.values())):
            raise RemoteProtocolError(f"{what}: argv and environment must be strings")
        return cls(
            argv=tuple(argv),
            env=env,
            cwd=messages.field(document, "cwd", str, what),
            umask=messages.field(document, "umask", int, what),
            user=messages.field(document, "user", str, what),
            fds=tuple(FdSpec.from_json(entry) for entry in fds),
            daemon_pidfile=document.get("daemon_pidfile"),  # checked as a path
            rlimits=parse_rlimits(document.get("rlimits")),
        )


# Events ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    node: str
    service: str = "rexec"
    #: A `Ticket`'s token: this connection carries that pty or bridged connection, not sessions.
    attach: str = ""

    def __post_init__(self) -> None:
        if self.attach:
            check_ticket(self.attach)


def check_ticket(token: str, size: int = TICKET_BYTES) -> None:
    if len(token) != 2 * size or token.strip("0123456789abcdef"):
        raise ValueError("a ticket or session name is not one this protocol makes")


@dataclass(frozen=True, slots=True)
class Exec:
    request: ExecRequest

    @property
    def channels(self) -> tuple[int, ...]:
        """The channels of the request's relayed fds."""
        return tuple(spec.channel for spec in self.request.fds if spec.channel)


@dataclass(frozen=True, slots=True)
class Started:
    """The program runs as ``pid``.  A session that outlives its link is named by ``session``, and resumed
    on another link by whoever knows ``secret`` (both empty: it ends with its link)."""

    pid: int
    session: str = ""
    secret: str = ""

    def __post_init__(self) -> None:
        if self.pid <= 0:
            raise ValueError(f"pid {self.pid} out of range")
        if bool(self.session) != bool(self.secret):
            raise ValueError("a resumable session has both a name and a secret")
        if self.session:
            check_ticket(self.session, SESSION_BYTES)
            check_ticket(self.secret)


@dataclass(frozen=True, slots=True)
class Resume:
    """The client's first word on a new link: carry on session ``session``, whose link was lost.

    ``channels`` are the channels it relays again, from fresh windows: what
    was on the old link when it broke is lost.
    """

    session: str
    secret: str
    channels: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        check_ticket(self.session, SESSION_BYTES)
        check_ticket(self.secret)
        if len(self.channels) > MAX_FDS or not all(
            type(c) is int and 0 < c < FIRST_BRIDGE_CHANNEL for c in self.channels
        ):
            raise ValueError("resumed channels out of range")


@dataclass(frozen=True, slots=True)
class Resumed:
    """The server carries on the session on this link; its program is ``pid``."""

    pid: int


@dataclass(frozen=True, slots=True)
class Refused:
    """The program was not started, or its daemon not followed; ``code`` is the stand-in's exit status."""

    code: int
    reason: str

    def __post_init__(self) -> None:
        if not 1 <= self.code <= 255:
            raise ValueError(f"refusal exit code {self.code} out of range")


@dataclass(frozen=True, slots=True)
class Exited:
    """Exactly one of ``code`` (normal exit) and ``signal`` (killed) is set, or neither with ``lost``:
    the program ended while it was no child of the server (after a restart), so how is not known."""

    code: int | None = None
    signal: int | None = None
    lost: bool = False

    def __post_init__(self) -> None:
        if self.lost:
            if self.code is not None or self.signal is not None:
                raise ValueError("a lost exit status has no code or signal")
        elif (self.code is None) == (self.signal is None):
            raise ValueError("exactly one of code and signal must be set")
        if self.code is not None and not 0 <= self.code <= 255:
            raise ValueError(f"exit code {self.code} out of range")

    def to_json(self) -> dict[str, Any]:
        """As the peer and the stand-in both carry it: the signal by name."""
        if self.lost:
            return {"lost": True}
        return {"code": self.code} if self.signal is None else {"signal": messages.signal_name(self.signal)}


@dataclass(frozen=True, slots=True)
class Daemonized:
    """The foreground process exited with ``code``; daemon ``pid`` runs on."""

    code: int
    pid: int


@dataclass(frozen=True, slots=True)
class Signal:
    signum: int


@dataclass(frozen=True, slots=True)
class Hangup:
    """The caller is gone (its stand-in ended without being told the program's end): end the program.

    Said, not left to the link's end: a session outlives its link.
    """


@dataclass(frozen=True, slots=True)
class Data:
    channel: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Eof:
    channel: int


@dataclass(frozen=True, slots=True)
class Window:
    channel: int
    increment: int


@dataclass(frozen=True, slots=True)
class Open:
    """The client accepted a connection on its listener for ``fd``; the server answers with a `Ticket`.

    ``conn`` not 0: the server's connection of that number (a `Ticket`
    named it), whose link was lost, is attached again.  The server refuses
    with Reset (``fd`` is not one of the program's bridged listeners, or
    ``conn`` is not one of its connections to it).
    """

    channel: int
    fd: int
    conn: int = 0

    def __post_init__(self) -> None:
        if self.channel not in BRIDGE_CHANNELS:
            raise ValueError(f"bridge channel {self.channel} is not a bridged connection's")


@dataclass(frozen=True, slots=True)
class OpenPty:
    """The client asks for the pty whose master the program holds as number ``index``, relayed on ``channel``.

    The server opens that pty's other end only if its program holds the
    master (qemu's serial console), and answers a refusal with Reset.
    """

    channel: int
    index: int

    def __post_init__(self) -> None:
        if self.channel not in BRIDGE_CHANNELS:
            raise ValueError(f"pty channel {self.channel} is not a bridged connection's")
        if not 0 <= self.index < MAX_PTY_INDEX:
            raise ValueError(f"pty index {self.index} out of range")


@dataclass(frozen=True, slots=True)
class Ticket:
    """The server's answer to `Open` or `OpenPty`: a connection of its own whose Hello presents ``token``
    carries that bridged connection or that pty.

    The token is random, for that pty of this session only, for one use,
    by the peer the session's link authenticated.
    """

    channel: int
    token: str
    #: For a bridged connection: the server's number for its end, by which it is attached again.
    conn: int = 0

    def __post_init__(self) -> None:
        if self.channel not in BRIDGE_CHANNELS:
            raise ValueError(f"ticket channel {self.channel} is not a bridged connection's")
        check_ticket(self.token)


@dataclass(frozen=True, slots=True)
class Attached:
    """The server took a connection's ticket: from the next byte on, the connection is its relay."""


@dataclass(frozen=True, slots=True)
class Reset:
    """The channel is dead: no more data either way."""

    channel: int
    reason: str = ""


#: The events of a session's channels.
SessionEvent = Data | Eof | Window | Open | OpenPty | Ticket | Reset
SESSION_EVENTS = get_args(SessionEvent)
Event = (
    Hello
    | Ping
    | Pong
    | Exec
    | Started
    | Refused
    | Exited
    | Daemonized
    | Signal
    | Attached
    | Resume
    | Resumed
    | Hangup
    | SessionEvent
    | Closed
)

REXEC = Registry("rexec", max_payload=MAX_DATA_CHUNK, hello=Hello)


def _control(code: int, event: type, sender: Role | None, to_json: Any, from_json: Any) -> None:
    """Declare a control event: a JSON document on channel 0."""

    def decode(conn: Any, channel: int, payload: bytes) -> Any:
        if channel != CONTROL_CHANNEL:
            raise RemoteProtocolError(f"{event.__name__} on channel {channel}")
        return from_json(messages.load(payload, event.__name__))

    REXEC.declare(
        code, event, sender=sender, encode=lambda e: (CONTROL_CHANNEL, messages.dump(to_json(e))), decode=decode
    )


def _channel(code: int, event: type, to_payload: Any, from_payload: Any) -> None:
    """Declare a channel event, which either side sends: it names its channel, never the control channel."""

    def decode(conn: Any, channel: int, payload: bytes) -> Any:
        if channel == CONTROL_CHANNEL:
            raise RemoteProtocolError(f"{event.__name__} on the control channel")
        return from_payload(channel, payload)

    REXEC.declare(code, event, encode=lambda e: (e.channel, to_payload(e)), decode=decode)


def _hello(document: dict[str, Any]) -> Hello:
    attach = document.get("attach", "")
    return Hello(
        node=messages.field(document, "node", str, "hello")[:256],
        service=messages.field(document, "service", str, "hello")[:64],
        attach=attach if isinstance(attach, str) else str(attach)[:128],
    )


def _exited(document: dict[str, Any]) -> Exited:
    if document.get("lost") is True:
        return Exited(lost=True)
    if "signal" in document:
        return Exited(signal=messages.signal_number(document["signal"], "exited"))
    return Exited(code=messages.field(document, "code", int, "exited"))


_control(
    T_HELLO,
    Hello,
    None,
    lambda e: {"node": e.node, "service": e.service, **({"attach": e.attach} if e.attach else {})},
    _hello,
)
REXEC.declare_keepalive(T_PING, T_PONG)
_control(T_EXEC, Exec, Role.CLIENT, lambda e: e.request.to_json(), lambda d: Exec(ExecRequest.from_json(d)))
REXEC.declare_object(T_STARTED, Started, ("pid", int), ("session", str), ("secret", str), sender=Role.SERVER)
REXEC.declare_object(T_RESUME, Resume, ("session", str), ("secret", str), ("channels", list), sender=Role.CLIENT)
REXEC.declare_object(T_RESUMED, Resumed, ("pid", int), sender=Role.SERVER)
REXEC.declare_object(T_HANGUP, Hangup, sender=Role.CLIENT)
REXEC.declare_object(T_REFUSED, Refused, ("code", int), ("reason", str), sender=Role.SERVER)
_control(T_EXITED, Exited, Role.SERVER, Exited.to_json, _exited)
REXEC.declare_object(T_DAEMONIZED, Daemonized, ("code", int), ("pid", int), sender=Role.SERVER)
_control(
    T_SIGNAL,
    Signal,
    Role.CLIENT,
    lambda e: {"signal": messages.signal_name(e.signum)},
    lambda d: Signal(messages.signal_number(d.get("signal"), "signal")),
)
REXEC.declare_object(T_ATTACHED, Attached, sender=Role.SERVER)
_channel(T_DATA, Data, lambda e: e.data, Data)
_channel(T_EOF, Eof, lambda e: b"", lambda channel, p: Eof(channel))
_channel(T_WINDOW, Window, lambda e: _WINDOW.pack(e.increment), lambda ch, p: Window(ch, *_WINDOW.unpack(p)))
REXEC.declare_object(T_OPEN, Open, ("fd", int), ("conn", int), sender=Role.CLIENT, channel=None)
REXEC.declare_object(T_OPEN_PTY, OpenPty, ("index", int), sender=Role.CLIENT, channel=None)
REXEC.declare_object(T_TICKET, Ticket, ("token", str), ("conn", int), sender=Role.SERVER, channel=None)
REXEC.declare_object(T_RESET, Reset, ("reason", str), channel=None, limit=1024)


class State(enum.Enum):
    HELLO = "hello"  # waiting for the peer's Hello
    IDLE = "idle"  # authenticated, no session yet (warm pool)
    STARTING = "starting"  # Exec sent or received
    RESUMING = "resuming"  # Resume sent or received
    RUNNING = "running"  # the program runs; channels flow
    DONE = "done"  # the session ended
    ATTACHED = "attached"  # a pty's connection: no more rexec frames either way


class RexecConnection(Connection):
    """One side of a rexec connection: the session's order, and each channel's credit window."""

    registry = REXEC
    # Ping and Pong are allowed in every state.
    transitions = {
        (Role.CLIENT, Exec, State.IDLE): State.STARTING,
        # A connection carries sessions one after another.  Frames of the last
        # session that cross the new Exec on the wire arrive before it (TCP keeps
        # order) and are dropped in DONE; each side finishes a session's tasks
        # before it sends or accepts the next Exec.
        (Role.CLIENT, Exec, State.DONE): State.STARTING,
        (Role.SERVER, Started, State.STARTING): State.RUNNING,
        # A session whose link was lost goes on on another link, between that link's sessions.
        (Role.CLIENT, Resume, State.IDLE): State.RESUMING,
        (Role.CLIENT, Resume, State.DONE): State.RESUMING,
        (Role.SERVER, Resumed, State.RESUMING): State.RUNNING,
        (Role.SERVER, Refused, State.RESUMING): State.DONE,
        (Role.SERVER, Refused, State.STARTING): State.DONE,
        # After Started: the program ran, but what the caller asked for after it
        # (following its daemon) was refused; the stand-in reports the reason.
        (Role.SERVER, Refused, State.RUNNING): State.DONE,
        (Role.SERVER, Exited, State.RUNNING): State.DONE,
        (Role.SERVER, Daemonized, State.RUNNING): State.RUNNING,
        (Role.CLIENT, Signal, State.RUNNING): State.RUNNING,
        (Role.CLIENT, Hangup, State.RUNNING): State.DONE,
        (Role.CLIENT, Signal, State.DONE): State.DONE,
        (Role.SERVER, Attached, State.IDLE): State.ATTACHED,
        # Channel events flow while the program runs.  In DONE they are frames
        # that crossed Exited on the wire: dropped when they arrive, never sent.
        **{
            (role, event, state): state
            for role in Role
            for event in SESSION_EVENTS
            for state in (State.RUNNING, State.DONE)
        },
    }

    def __init__(self, role: Role, **keepalive: Any) -> None:
        super().__init__(role, State.HELLO, **keepalive)
        self.windows: dict[int, link.Window] = {}
        self._closed_channels: set[int] = set()

    # -- channels -----------------------------------------------------------

    def open_channel(self, channel: int) -> None:
        """Start flow control for ``channel`` (both sides do this identically)."""
        self.windows.setdefault(channel, link.Window(INITIAL_WINDOW))

    def close_channel(self, channel: int) -> None:
        """Forget ``channel``; late frames for it are dropped, not errors."""
        self.windows.pop(channel, None)
        self._closed_channels.add(channel)

    def window(self, channel: int) -> link.Window:
        window = self.windows.get(channel)
        if window is None:
            raise LocalProtocolError(f"channel {channel} is not open")
        return window

    def send_credit(self, channel: int) -> int:
        window = self.windows.get(channel)
        return window.credit if window is not None else 0

    def leftover(self) -> bytes:
        """After `Attached`: what was received beyond it, the relay's first bytes."""
        if self.state is not State.ATTACHED:
            raise LocalProtocolError(f"leftover bytes in state {self.state.value}")
        return super().leftover()

    # -- the core's hooks -----------------------------------------------------

    def _sending(self, event: Any) -> None:
        if isinstance(event, SESSION_EVENTS):
            if self.state is State.DONE:
                raise LocalProtocolError(f"{type(event).__name__} after the session ended")
            if isinstance(event, Data):
                self.window(event.channel).sent(len(event.data))
            elif isinstance(event, Open | OpenPty):
                self.open_channel(event.channel)
            elif isinstance(event, Ticket) and event.channel not in self.windows:
                raise LocalProtocolError(f"a ticket on channel {event.channel}, which asked for none")
        elif isinstance(event, Exec | Resume):
            self._open_channels(event.channels)

    def _received(self, event: Any) -> Any:
        if isinstance(event, SESSION_EVENTS):
            return self._channel_event(event)
        if isinstance(event, Hello):
            self.state = State.IDLE
        elif isinstance(event, Exec | Resume):
            self._open_channels(event.channels)
        elif isinstance(event, Signal) and self.state is State.DONE:
            # It crossed our Exited on the wire (a stand-in's signal as the
            # program ended): nothing is left to signal, and the link goes
            # on to carry the next session.
            return None
        return event

    def _channel_event(self, event: SessionEvent) -> Event | None:
        if self.state is State.DONE:
            return None  # it crossed our Exited on the wire; the next Exec forgets the channels
        if event.channel in self._closed_channels:
            return None  # crossed our Reset on the wire
        if isinstance(event, Open | OpenPty):
            if event.channel in self.windows:
                raise RemoteProtocolError(f"channel {event.channel} opened twice")
            self.open_channel(event.channel)
        elif event.channel not in self.windows:
            raise RemoteProtocolError(f"{type(event).__name__} on unknown channel {event.channel}")
        elif isinstance(event, Data):
            self.windows[event.channel].received(len(event.data))
        elif isinstance(event, Window):
            self.windows[event.channel].granted(event.increment)
        return event

    def _open_channels(self, channels: Iterable[int]) -> None:
        # Both sides open the session's channels at the same point of the
        # exchange, so data may flow the moment the program starts (or resumes).
        self.windows.clear()
        self._closed_channels.clear()
        for channel in channels:
            self.open_channel(channel)
