"""The rexec session protocol between two rexec_servers, sans-io.

One connection carries one session: the client side (the machine where the
stand-in runs) asks the server side (where the program will run) to start a
program, then both relay the program's file descriptors as channels and the
server reports how the program ended.  A connection may sit idle in a warm
pool before its session starts; keepalives run in every state.

Events are frozen dataclasses that validate on construction.  `RexecConnection`
turns events into bytes (`send`) and bytes into events (`receive_data`,
`next_event`), and enforces the session's order and each channel's flow
control window.  Misuse by our own code raises `LocalProtocolError`;
anything wrong that the peer sent raises `RemoteProtocolError`.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from offload.errors import LocalProtocolError, RemoteProtocolError
from offload.protocol import fdpass, local, messages
from offload.protocol.fdpass import MAX_FDS, FdDescription
from offload.protocol.framing import CLOSED, NEED_DATA, Frame, FrameDecoder, encode_frame, encode_header
from offload.protocol.messages import check_path

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
T_FDS = 0x25
T_OPEN_PTY = 0x26
T_PTY_TICKET = 0x27
T_PTY_ATTACHED = 0x16

CONTROL_CHANNEL = 0
#: Channels at or above this number are bridged connections, allocated by
#: the client as its listeners accept; below it they name inherited fds.
FIRST_BRIDGE_CHANNEL = 0x10000
#: Channels from here up carry pipes passed over bridged connections
#: (`PassFds`): each side numbers its own, the client even, the server odd,
#: so the two never pick the same number.
FIRST_PASSED_CHANNEL = 1 << 31
PASSED_CHANNELS = range(FIRST_PASSED_CHANNEL, 1 << 32)
#: Bytes a sender may have in flight on one channel before the receiver
#: grants more.  It bounds what one stalled consumer can make a peer buffer.
INITIAL_WINDOW = 4 << 20
MAX_DATA_CHUNK = 1 << 20
MAX_ARGC = 16384
MAX_ENV = 1024
MAX_FD_NUMBER = 1 << 20
#: Unix98 pty numbers are below this (the kernel's own limit is far lower).
MAX_PTY_INDEX = 1 << 20
#: A pty ticket: this many random bytes, in hex.
TICKET_BYTES = 32

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


class Role(enum.Enum):
    CLIENT = "client"  # asks for a program to run
    SERVER = "server"  # runs it


class FdKind(enum.Enum):
    NULL = "null"  # /dev/null, opened remotely with the same access mode
    FILE = "file"  # a regular file on a shared path, re-opened remotely
    PIPE_IN = "pipe_in"  # the remote program reads; data flows client -> server
    PIPE_OUT = "pipe_out"  # the remote program writes; data flows server -> client
    SOCKET = "socket"  # a connected AF_UNIX stream socket, relayed both ways
    LISTENER = "listener"  # a listening AF_UNIX stream socket, bridged per connection


RELAYED_KINDS = frozenset({FdKind.PIPE_IN, FdKind.PIPE_OUT, FdKind.SOCKET})
ACCESS_MODES = frozenset({"r", "w", "rw"})


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
        if self.access not in ACCESS_MODES:
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
        what = "fd entry"
        if not isinstance(document, dict):
            raise RemoteProtocolError(f"{what}: not an object")
        try:
            kind = FdKind(messages.field(document, "kind", str, what))
        except ValueError:
            raise RemoteProtocolError(f"{what}: unknown kind {document.get('kind')!r}") from None
        try:
            return cls(
                fd=messages.field(document, "fd", int, what),
                kind=kind,
                channel=document.get("channel", 0) if kind in RELAYED_KINDS else 0,
                path=document.get("path", ""),
                access=document.get("access", "r"),
                append=bool(document.get("append", False)),
                offset=document.get("offset", 0),
            )
        except (TypeError, ValueError) as exc:
            raise RemoteProtocolError(f"{what}: {exc}") from None


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
        pidfile = document.get("daemon_pidfile")
        if pidfile is not None and not isinstance(pidfile, str):
            raise RemoteProtocolError(f"{what}: daemon_pidfile must be a string")
        try:
            return cls(
                argv=tuple(argv),
                env=env,
                cwd=messages.field(document, "cwd", str, what),
                umask=messages.field(document, "umask", int, what),
                user=messages.field(document, "user", str, what),
                fds=tuple(FdSpec.from_json(entry) for entry in fds),
                daemon_pidfile=pidfile,
                rlimits=parse_rlimits(document.get("rlimits")),
            )
        except ValueError as exc:
            raise RemoteProtocolError(f"{what}: {exc}") from None


# Events ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    node: str
    service: str = "rexec"
    #: A `PtyTicket`'s token: this connection carries that pty, not sessions.
    attach: str = ""

    def __post_init__(self) -> None:
        if self.attach:
            check_ticket(self.attach)


def check_ticket(token: str) -> None:
    if len(token) != 2 * TICKET_BYTES or token.strip("0123456789abcdef"):
        raise ValueError("a pty ticket is not one this protocol makes")


@dataclass(frozen=True, slots=True)
class Ping:
    token: bytes = b""


@dataclass(frozen=True, slots=True)
class Pong:
    token: bytes = b""


@dataclass(frozen=True, slots=True)
class Exec:
    request: ExecRequest


@dataclass(frozen=True, slots=True)
class Started:
    pid: int

    def __post_init__(self) -> None:
        if self.pid <= 0:
            raise ValueError(f"pid {self.pid} out of range")


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
    """Exactly one of ``code`` (normal exit) and ``signal`` (killed) is set."""

    code: int | None = None
    signal: int | None = None

    def __post_init__(self) -> None:
        if (self.code is None) == (self.signal is None):
            raise ValueError("exactly one of code and signal must be set")
        if self.code is not None and not 0 <= self.code <= 255:
            raise ValueError(f"exit code {self.code} out of range")


@dataclass(frozen=True, slots=True)
class Daemonized:
    """The foreground process exited with ``code``; daemon ``pid`` runs on."""

    code: int
    pid: int


@dataclass(frozen=True, slots=True)
class Signal:
    signum: int


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
    """The client accepted a connection on its listener for ``fd``."""

    channel: int
    fd: int


@dataclass(frozen=True, slots=True)
class OpenPty:
    """The client asks for the pty whose master the program holds as number ``index``, relayed on ``channel``.

    The server opens that pty's other end only if its program holds the
    master (qemu's serial console), and answers a refusal with Reset.
    """

    channel: int
    index: int

    def __post_init__(self) -> None:
        if not FIRST_BRIDGE_CHANNEL <= self.channel < FIRST_PASSED_CHANNEL:
            raise ValueError(f"pty channel {self.channel} is not a bridged connection's")
        if not 0 <= self.index < MAX_PTY_INDEX:
            raise ValueError(f"pty index {self.index} out of range")


@dataclass(frozen=True, slots=True)
class PtyTicket:
    """The server's answer to `OpenPty`: a connection of its own whose Hello presents ``token`` carries the pty.

    The token is random, for that pty of this session only, for one use,
    by the peer the session's link authenticated.
    """

    channel: int
    token: str

    def __post_init__(self) -> None:
        if not FIRST_BRIDGE_CHANNEL <= self.channel < FIRST_PASSED_CHANNEL:
            raise ValueError(f"pty channel {self.channel} is not a bridged connection's")
        check_ticket(self.token)


@dataclass(frozen=True, slots=True)
class PtyAttached:
    """The server took a pty connection's ticket: from the next byte on, the connection is the pty's relay."""


@dataclass(frozen=True, slots=True)
class PassFds:
    """fds the program at one end of bridged connection ``channel`` passed with its next bytes.

    They belong to the next Data of that channel (libvirt's ``getfd``
    command, say); a passed pipe's bytes travel on a channel of its own,
    numbered by the sender and opened by this event.
    """

    channel: int
    fds: tuple[FdDescription, ...]

    def __post_init__(self) -> None:
        if not FIRST_BRIDGE_CHANNEL <= self.channel < FIRST_PASSED_CHANNEL:
            raise ValueError(f"fds passed on channel {self.channel}, which is not a bridged connection")
        if not 0 < len(self.fds) <= MAX_FDS:
            raise ValueError(f"{len(self.fds)} fds in one message")
        for fd in self.fds:
            if fd.is_pipe and fd.channel not in PASSED_CHANNELS:
                raise ValueError(f"passed pipe on channel {fd.channel}, outside the passed pipes' channels")
            if not fd.is_pipe and fd.channel:
                raise ValueError(f"a passed {fd.kind} has no channel")


@dataclass(frozen=True, slots=True)
class Reset:
    """The channel is dead: no more data either way."""

    channel: int
    reason: str = ""


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    pass


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
    | Data
    | Eof
    | Window
    | Open
    | OpenPty
    | PtyTicket
    | PtyAttached
    | PassFds
    | Reset
    | ConnectionClosed
)


class State(enum.Enum):
    HELLO = "hello"  # waiting for the peer's Hello
    IDLE = "idle"  # authenticated, no session yet (warm pool)
    STARTING = "starting"  # Exec sent or received
    RUNNING = "running"  # the program runs; channels flow
    DONE = "done"  # the session ended
    ATTACHED = "attached"  # a pty's connection: no more rexec frames either way


SESSION_EVENTS = (Data, Eof, Window, Open, OpenPty, PtyTicket, PassFds, Reset)

# The state machine: (role of the sender, event type, state) -> next state.
# Ping and Pong are allowed everywhere and are not listed.  Channel events are
# allowed in RUNNING (and dropped after DONE, since they may cross Exited on
# the wire).
_TRANSITIONS: dict[tuple[Role, type, State], State] = {
    (Role.CLIENT, Exec, State.IDLE): State.STARTING,
    # A connection carries sessions one after another.  Frames of the last
    # session that cross the new Exec on the wire arrive before it (TCP keeps
    # order) and are dropped in DONE; each side finishes a session's tasks
    # before it sends or accepts the next Exec.
    (Role.CLIENT, Exec, State.DONE): State.STARTING,
    (Role.SERVER, Started, State.STARTING): State.RUNNING,
    (Role.SERVER, Refused, State.STARTING): State.DONE,
    # After Started: the program ran, but what the caller asked for after it
    # (following its daemon) was refused; the stand-in reports the reason.
    (Role.SERVER, Refused, State.RUNNING): State.DONE,
    (Role.SERVER, Exited, State.RUNNING): State.DONE,
    (Role.SERVER, Daemonized, State.RUNNING): State.RUNNING,
    (Role.CLIENT, Signal, State.RUNNING): State.RUNNING,
    (Role.CLIENT, Signal, State.DONE): State.DONE,
    (Role.SERVER, PtyAttached, State.IDLE): State.ATTACHED,
}


def _encode(event: Event) -> bytes:
    """The frame bytes of one event (no state checks)."""
    match event:
        case Data(channel, data):
            return encode_frame(T_DATA, channel, data)
        case Window(channel, increment):
            return encode_frame(T_WINDOW, channel, _WINDOW.pack(increment))
        case Eof(channel):
            return encode_frame(T_EOF, channel)
        case Ping(token):
            return encode_frame(T_PING, CONTROL_CHANNEL, token)
        case Pong(token):
            return encode_frame(T_PONG, CONTROL_CHANNEL, token)
        case Hello(node, service, attach):
            return _control(T_HELLO, {"node": node, "service": service, **({"attach": attach} if attach else {})})
        case PtyAttached():
            return _control(T_PTY_ATTACHED, {})
        case PtyTicket(channel, token):
            return encode_frame(T_PTY_TICKET, channel, messages.dump({"token": token}))
        case Exec(request):
            return _control(T_EXEC, request.to_json())
        case Started(pid):
            return _control(T_STARTED, {"pid": pid})
        case Refused(code, reason):
            return _control(T_REFUSED, {"code": code, "reason": reason})
        case Exited(code, signal):
            if signal is not None:
                return _control(T_EXITED, {"signal": messages.signal_name(signal)})
            return _control(T_EXITED, {"code": code})
        case Daemonized(code, pid):
            return _control(T_DAEMONIZED, {"code": code, "pid": pid})
        case Signal(signum):
            return _control(T_SIGNAL, {"signal": messages.signal_name(signum)})
        case Open(channel, fd):
            return encode_frame(T_OPEN, channel, messages.dump({"fd": fd}))
        case OpenPty(channel, index):
            return encode_frame(T_OPEN_PTY, channel, messages.dump({"index": index}))
        case Reset(channel, reason):
            return encode_frame(T_RESET, channel, messages.dump({"reason": reason}))
        case PassFds(channel, fds):
            return encode_frame(T_FDS, channel, messages.dump({"fds": [fd.to_json() for fd in fds]}))
    raise LocalProtocolError(f"cannot send {event!r}")


def _control(type: int, document: dict[str, Any]) -> bytes:
    return encode_frame(type, CONTROL_CHANNEL, messages.dump(document))


def _decode(frame: Frame) -> Event:
    """The event one frame carries; anything malformed is the peer's error."""
    type, channel, payload = frame.type, frame.channel, frame.payload
    if type in (T_DATA, T_EOF, T_WINDOW, T_OPEN, T_OPEN_PTY, T_PTY_TICKET, T_RESET, T_FDS):
        if channel == CONTROL_CHANNEL:
            raise RemoteProtocolError(f"frame type {type:#x} on the control channel")
        if type == T_DATA:
            if len(payload) > MAX_DATA_CHUNK:
                raise RemoteProtocolError(f"data frame of {len(payload)} bytes is too large")
            return Data(channel, payload)
        if type == T_EOF:
            return Eof(channel)
        if type == T_WINDOW:
            if len(payload) != _WINDOW.size:
                raise RemoteProtocolError("window frame of the wrong size")
            (increment,) = _WINDOW.unpack(payload)
            return Window(channel, increment)
        document = messages.load(payload, "channel frame")
        if type == T_OPEN:
            if not FIRST_BRIDGE_CHANNEL <= channel < FIRST_PASSED_CHANNEL:
                raise RemoteProtocolError(f"bridge channel {channel} is not a bridged connection's")
            return Open(channel, messages.field(document, "fd", int, "open"))
        if type == T_OPEN_PTY:
            try:
                return OpenPty(channel, messages.field(document, "index", int, "open pty"))
            except ValueError as exc:
                raise RemoteProtocolError(f"open pty: {exc}") from None
        if type == T_PTY_TICKET:
            try:
                return PtyTicket(channel, messages.field(document, "token", str, "pty ticket"))
            except ValueError as exc:
                raise RemoteProtocolError(f"pty ticket: {exc}") from None
        if type == T_FDS:
            fds = fdpass.decode(document.get("fds"), "passed fds", PASSED_CHANNELS)
            try:
                return PassFds(channel, fds)
            except ValueError as exc:
                raise RemoteProtocolError(f"passed fds: {exc}") from None
        return Reset(channel, str(document.get("reason", ""))[:1024])
    if channel != CONTROL_CHANNEL:
        raise RemoteProtocolError(f"control frame type {type:#x} on channel {channel}")
    if type == T_PING:
        return Ping(payload[:64])
    if type == T_PONG:
        return Pong(payload[:64])
    try:
        return _decode_control(type, payload)
    except ValueError as exc:
        raise RemoteProtocolError(f"frame type {type:#x}: {exc}") from None


def _decode_control(type: int, payload: bytes) -> Event:
    if type == T_HELLO:
        document = messages.load(payload, "hello")
        attach = document.get("attach", "")
        return Hello(
            node=messages.field(document, "node", str, "hello")[:256],
            service=messages.field(document, "service", str, "hello")[:64],
            attach=attach if isinstance(attach, str) else str(attach)[:128],
        )
    if type == T_PTY_ATTACHED:
        return PtyAttached()
    if type == T_EXEC:
        return Exec(ExecRequest.from_json(messages.load(payload, "exec")))
    if type == T_STARTED:
        return Started(messages.field(messages.load(payload, "started"), "pid", int, "started"))
    if type == T_REFUSED:
        document = messages.load(payload, "refused")
        return Refused(
            code=messages.field(document, "code", int, "refused"),
            reason=messages.field(document, "reason", str, "refused")[:4096],
        )
    if type == T_EXITED:
        document = messages.load(payload, "exited")
        if "signal" in document:
            return Exited(signal=messages.signal_number(document["signal"], "exited"))
        return Exited(code=messages.field(document, "code", int, "exited"))
    if type == T_DAEMONIZED:
        document = messages.load(payload, "daemonized")
        return Daemonized(
            code=messages.field(document, "code", int, "daemonized"),
            pid=messages.field(document, "pid", int, "daemonized"),
        )
    if type == T_SIGNAL:
        document = messages.load(payload, "signal")
        return Signal(messages.signal_number(document.get("signal"), "signal"))
    raise RemoteProtocolError(f"unknown frame type {type:#x}")


class RexecConnection:
    """Sans-io state of one rexec connection, seen from ``role``."""

    def __init__(self, role: Role, *, initial_window: int = INITIAL_WINDOW) -> None:
        self.role = role
        self.peer_role = Role.SERVER if role is Role.CLIENT else Role.CLIENT
        self.state = State.HELLO
        self.peer_hello: Hello | None = None
        self._sent_hello = False
        self._decoder = FrameDecoder()
        self._initial_window = initial_window
        # Bytes we may still send per channel, and bytes the peer may still
        # send to us before we grant more.
        self._send_credit: dict[int, int] = {}
        self._receive_allowance: dict[int, int] = {}
        # Bytes our consumer has taken since the last Window we sent.
        self._consumed: dict[int, int] = {}
        self._closed_channels: set[int] = set()

    # -- channels -----------------------------------------------------------

    def open_channel(self, channel: int) -> None:
        """Start flow control for ``channel`` (both sides do this identically)."""
        self._send_credit.setdefault(channel, self._initial_window)
        self._receive_allowance.setdefault(channel, self._initial_window)
        self._consumed.setdefault(channel, 0)

    def close_channel(self, channel: int) -> None:
        """Forget ``channel``; late frames for it are dropped, not errors."""
        for table in (self._send_credit, self._receive_allowance, self._consumed):
            table.pop(channel, None)
        self._closed_channels.add(channel)

    def send_credit(self, channel: int) -> int:
        return self._send_credit.get(channel, 0)

    def consumed(self, channel: int, count: int) -> bytes:
        """Record that ``count`` bytes of ``channel`` left our buffers.

        Returns the bytes of a Window frame once enough has been consumed to
        be worth telling the peer (half a window), else ``b""``.
        """
        if channel not in self._consumed:
            return b""
        total = self._consumed[channel] + count
        if total < self._initial_window // 2:
            self._consumed[channel] = total
            return b""
        self._consumed[channel] = 0
        self._receive_allowance[channel] += total
        return _encode(Window(channel, total))

    # -- sending -------------------------------------------------------------

    def send(self, event: Event) -> bytes:
        if isinstance(event, Hello):
            if self._sent_hello:
                raise LocalProtocolError("Hello sent twice")
            self._sent_hello = True
            return _encode(event)
        if not self._sent_hello:
            raise LocalProtocolError(f"{type(event).__name__} before Hello")
        if isinstance(event, Ping | Pong):
            return _encode(event)
        if isinstance(event, SESSION_EVENTS):
            self._check_channel_send(event)
            return _encode(event)
        self.state = self._transition(self.role, event, LocalProtocolError)
        if isinstance(event, Exec):
            self._open_request_channels(event.request)
        return _encode(event)

    def send_data(self, event: Data) -> tuple[bytes, bytes]:
        """Like send(Data), as (header, payload): the payload is not copied."""
        if not self._sent_hello:
            raise LocalProtocolError("Data before Hello")
        self._check_channel_send(event)
        return encode_header(T_DATA, event.channel, len(event.data)), event.data

    def _check_channel_send(self, event: Data | Eof | Window | Open | OpenPty | PtyTicket | PassFds | Reset) -> None:
        if self.state is not State.RUNNING:
            raise LocalProtocolError(f"{type(event).__name__} in state {self.state.value}")
        if isinstance(event, PassFds):
            self._open_passed_pipes(event, self.role, LocalProtocolError)
        elif isinstance(event, Open | OpenPty):
            if self.role is not Role.CLIENT:
                raise LocalProtocolError("only the client opens bridged connections")
            self.open_channel(event.channel)
        elif isinstance(event, PtyTicket):
            if self.role is not Role.SERVER or event.channel not in self._send_credit:
                raise LocalProtocolError(f"a pty ticket on channel {event.channel}, which asked for none")
        elif isinstance(event, Data):
            credit = self._send_credit.get(event.channel)
            if credit is None:
                raise LocalProtocolError(f"data on unknown channel {event.channel}")
            if len(event.data) > min(credit, MAX_DATA_CHUNK):
                raise LocalProtocolError(
                    f"data of {len(event.data)} bytes exceeds the credit of channel {event.channel}"
                )
            self._send_credit[event.channel] = credit - len(event.data)

    def _transition(self, sender: Role, event: Event, error: type[Exception]) -> State:
        key = (sender, type(event), self.state)
        if key not in _TRANSITIONS:
            raise error(f"{type(event).__name__} from the {sender.value} in state {self.state.value}")
        return _TRANSITIONS[key]

    # -- receiving -----------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        self._decoder.receive_data(data)

    def leftover(self) -> bytes:
        """After `PtyAttached`: what was received beyond it, the pty relay's first bytes."""
        if self.state is not State.ATTACHED:
            raise LocalProtocolError(f"leftover bytes in state {self.state.value}")
        return self._decoder.take_buffered()

    def next_event(self) -> Event | None:
        """Return the next event, or None when more bytes are needed.

        Channel events that arrive for a channel we already closed are
        dropped here, so callers never see them.
        """
        while True:
            frame = self._decoder.next_frame()
            if frame is NEED_DATA:
                return None
            if frame is CLOSED:
                return ConnectionClosed()
            assert isinstance(frame, Frame)
            event = self._receive(_decode(frame))
            if event is not None:
                return event

    def _receive(self, event: Event) -> Event | None:
        if isinstance(event, Hello):
            if self.peer_hello is not None:
                raise RemoteProtocolError("Hello received twice")
            self.peer_hello = event
            if self.state is State.HELLO:
                self.state = State.IDLE
            return event
        if self.peer_hello is None:
            raise RemoteProtocolError(f"{type(event).__name__} before Hello")
        if isinstance(event, Ping | Pong):
            return event
        if isinstance(event, SESSION_EVENTS):
            return self._receive_channel_event(event)
        self.state = self._transition(self.peer_role, event, RemoteProtocolError)
        if isinstance(event, Signal) and self.state is State.DONE:
            # It crossed our Exited on the wire (a stand-in's signal as the
            # program ended): nothing is left to signal, and the link goes
            # on to carry the next session.
            return None
        if isinstance(event, Exec):
            self._open_request_channels(event.request)
        return event

    def _open_request_channels(self, request: ExecRequest) -> None:
        # Both sides open the request's channels at the same point of the
        # exchange, so data may flow the moment the program starts.
        for table in (self._send_credit, self._receive_allowance, self._consumed):
            table.clear()
        self._closed_channels.clear()
        for spec in request.fds:
            if spec.channel:
                self.open_channel(spec.channel)

    def _open_passed_pipes(self, event: PassFds, sender: Role, error: type[Exception]) -> None:
        """Open the channels of the pipes in ``event``, which ``sender`` numbered."""
        if event.channel not in self._send_credit:
            raise error(f"fds passed on unknown channel {event.channel}")
        parity = 0 if sender is Role.CLIENT else 1
        for fd in event.fds:
            if not fd.is_pipe:
                continue
            if fd.channel % 2 != parity:
                raise error(f"passed pipe channel {fd.channel} is not the {sender.value}'s to number")
            if fd.channel in self._send_credit or fd.channel in self._closed_channels:
                raise error(f"passed pipe channel {fd.channel} opened twice")
            self.open_channel(fd.channel)

    def _receive_channel_event(
        self, event: Data | Eof | Window | Open | OpenPty | PtyTicket | PassFds | Reset
    ) -> Event | None:
        if self.state is State.DONE or event.channel in self._closed_channels:
            if isinstance(event, PassFds):
                # Nobody will relay its pipes: their frames are dropped too.
                self._closed_channels.update(fd.channel for fd in event.fds if fd.is_pipe)
            return None  # crossed our Exited or our Reset on the wire
        if self.state is not State.RUNNING:
            raise RemoteProtocolError(f"{type(event).__name__} in state {self.state.value}")
        if isinstance(event, Open | OpenPty):
            if self.role is not Role.SERVER:
                raise RemoteProtocolError("the server cannot open bridged connections")
            if event.channel in self._send_credit:
                raise RemoteProtocolError(f"channel {event.channel} opened twice")
            self.open_channel(event.channel)
            return event
        if isinstance(event, PassFds):
            self._open_passed_pipes(event, self.peer_role, RemoteProtocolError)
            return event
        if isinstance(event, PtyTicket) and self.role is not Role.CLIENT:
            raise RemoteProtocolError("the client cannot issue pty tickets")
        if event.channel not in self._send_credit:
            raise RemoteProtocolError(f"{type(event).__name__} on unknown channel {event.channel}")
        if isinstance(event, Data):
            allowance = self._receive_allowance[event.channel] - len(event.data)
            if allowance < 0:
                raise RemoteProtocolError(f"peer overran the window of channel {event.channel}")
            self._receive_allowance[event.channel] = allowance
        elif isinstance(event, Window):
            credit = self._send_credit[event.channel] + event.increment
            if credit > 1 << 31:
                raise RemoteProtocolError(f"window of channel {event.channel} grew past 2 GiB")
            self._send_credit[event.channel] = credit
        return event
