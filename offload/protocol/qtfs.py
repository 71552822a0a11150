"""The qtfs protocol between the FUSE client (DPU) and the qtfs server (host), sans-io.

One authenticated connection per mount, on the shared frame layer
(`offload.protocol.framing`).  After Hello both ways the client sends
requests, each in one Request frame whose channel is the request id; the
server answers each id exactly once with a Reply or an Error frame, in any
order, so a slow read never holds up a stat (requests are multiplexed).
Ping/Pong (channel 0) keep the link proven alive.  Invalidate frames
(channel 0, server to client only) say that something changed on the host
behind the client's back, so a client may cache what the server said until
told otherwise (see `Invalidate`).

Payloads are binary, not JSON: a request is one op byte followed by its
fields; numbers are fixed-width big-endian, strings a u32 length and the
bytes; a write's data (and a read reply's data) is the rest of the payload,
so it is never copied into a length-prefixed field.  Paths are bytes
(``os.fsencode``) relative to the mounted directory: ``b""`` is the mount
root, components are separated by single slashes, and ``.``, ``..`` and
empty components are refused by both sides.  An Error names the errno
(``b"ENOENT"``), since numbers differ between architectures.

The client side of `QtfsConnection` remembers which op each pending id
carries, so replies decode to their typed form; a reply to an id that is
not pending is the peer's protocol error.
"""

from __future__ import annotations

import enum
import errno as errno_module
import struct
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, ClassVar, TypeVar, dataclass_transform

from offload.errors import LocalProtocolError, RemoteProtocolError
from offload.protocol import messages
from offload.protocol.framing import CLOSED, NEED_DATA, FrameDecoder, encode_frame, encode_header

T_HELLO = 0x80
T_REQUEST = 0x81
T_REPLY = 0x82
T_ERROR = 0x83
T_PING = 0x84
T_PONG = 0x85
T_INVALIDATE = 0x86

PROTOCOL_VERSION = 1
#: The largest read or write one request carries (FUSE's max_write is 1 MiB).
MAX_IO = 1 << 20
#: Room for the fields around the data of a write or a directory page.
MAX_PAYLOAD = MAX_IO + 64 * 1024
MAX_PATH = 4096
MAX_NAME = 255
MAX_XATTR = 64 * 1024
MAX_ID = 0xFFFFFFFF

# SETATTR's ``valid`` bits.
SET_MODE = 1
SET_UID = 2
SET_GID = 4
SET_SIZE = 8
SET_ATIME = 16
SET_MTIME = 32
SET_ATIME_NOW = 64
SET_MTIME_NOW = 128
SET_ALL = 255

# MOUNT reply flags.
MOUNT_READONLY = 1
#: The server watches the mounted tree and sends Invalidate for every change made on the host.
MOUNT_WATCHED = 2
#: Opens are checked by rules (a whitelist): the client must ask at every open.
MOUNT_OPEN_CHECKED = 4


class Op(enum.IntEnum):
    MOUNT = 1
    LOOKUP = 2
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    OPEN = 6
    CREATE = 7
    READ = 8
    WRITE = 9
    RELEASE = 10
    FSYNC = 11
    MKDIR = 12
    MKNOD = 13
    SYMLINK = 14
    LINK = 15
    UNLINK = 16
    RMDIR = 17
    RENAME = 18
    OPENDIR = 19
    READDIR = 20
    RELEASEDIR = 21
    STATFS = 22
    GETXATTR = 23
    SETXATTR = 24
    LISTXATTR = 25
    REMOVEXATTR = 26


def check_relative(path: bytes, what: str = "path") -> None:
    """A path below the mount root: no leading slash, no empty, ``.`` or ``..`` component."""
    if not isinstance(path, bytes):
        raise ValueError(f"{what}: {path!r} is not bytes")
    if not path:
        return
    if len(path) > MAX_PATH or b"\0" in path:
        raise ValueError(f"{what}: path is too long or contains NUL")
    for part in path.split(b"/"):
        if part in (b"", b".", b".."):
            raise ValueError(f"{what}: {path!r} has an empty, '.' or '..' component")


def check_absolute(path: bytes, what: str = "path") -> None:
    if not isinstance(path, bytes) or not path.startswith(b"/"):
        raise ValueError(f"{what}: {path!r} is not absolute")
    if path != b"/":
        check_relative(path.rstrip(b"/")[1:], what)


def check_name(name: bytes, what: str = "name") -> None:
    if not name or len(name) > MAX_NAME or b"\0" in name or b"/" in name or name in (b".", b".."):
        raise ValueError(f"{what}: {name!r} is not a file name")


def errno_name(number: int) -> bytes:
    return errno_module.errorcode.get(number, "EIO").encode()


def errno_number(name: bytes | str) -> int:
    text = name.decode("ascii", "replace") if isinstance(name, bytes) else name
    value = getattr(errno_module, text, None) if text.startswith("E") else None
    return value if isinstance(value, int) else errno_module.EIO


# -- attributes -----------------------------------------------------------------------

_ATTR = struct.Struct("!QQIIIIQqqIqqq")


@dataclass(frozen=True, slots=True)
class Attr:
    """What lstat said about a host file (host inode and device numbers)."""

    ino: int
    dev: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    blocks: int
    blksize: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int

    SIZE: ClassVar[int] = _ATTR.size

    @classmethod
    def from_stat(cls, st: Any) -> Attr:
        return cls(
            st.st_ino,
            st.st_dev,
            st.st_mode,
            st.st_nlink,
            st.st_uid,
            st.st_gid,
            st.st_rdev,
            st.st_size,
            st.st_blocks,
            st.st_blksize,
            st.st_atime_ns,
            st.st_mtime_ns,
            st.st_ctime_ns,
        )

    def encode(self) -> bytes:
        return _ATTR.pack(
            self.ino,
            self.dev,
            self.mode,
            self.nlink,
            self.uid,
            self.gid,
            self.rdev,
            self.size,
            self.blocks,
            self.blksize,
            self.atime_ns,
            self.mtime_ns,
            self.ctime_ns,
        )

    @classmethod
    def decode_from(cls, data: bytes | memoryview, offset: int = 0) -> Attr:
        return cls(*_ATTR.unpack_from(data, offset))


def pack_stat(st: Any) -> bytes:
    """An os.stat_result straight to wire bytes (the server's hot path: no Attr object)."""
    return _ATTR.pack(
        st.st_ino,
        st.st_dev,
        st.st_mode,
        st.st_nlink,
        st.st_uid,
        st.st_gid,
        st.st_rdev,
        st.st_size,
        st.st_blocks,
        st.st_blksize,
        st.st_atime_ns,
        st.st_mtime_ns,
        st.st_ctime_ns,
    )


# -- messages -----------------------------------------------------------------------------
#
# Each message lists its wire layout as one letter per field, in field
# order: Q u64, q i64, I u32, B u8, s bytes (u32 length), p relative path,
# a absolute path, n file name, d the rest of the payload.  Numbers come
# first on the wire (one struct), then the strings in order.

_NUMERIC = {"Q": "Q", "q": "q", "I": "I", "B": "B"}
_LIMITS = {"Q": (0, (1 << 64) - 1), "q": (-(1 << 63), (1 << 63) - 1), "I": (0, MAX_ID), "B": (0, 255)}
_U32 = struct.Struct("!I")


class Message:
    LAYOUT: ClassVar[str] = ""
    _numbers: ClassVar[struct.Struct]
    _number_fields: ClassVar[tuple[str, ...]]
    _string_fields: ClassVar[tuple[tuple[str, str], ...]]

    @classmethod
    def _prepare(cls) -> None:
        names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
        if len(names) != len(cls.LAYOUT):
            raise TypeError(f"{cls.__name__}: layout {cls.LAYOUT!r} does not match {names}")
        kinds = list(zip(names, cls.LAYOUT, strict=True))
        if "d" in cls.LAYOUT[:-1]:
            raise TypeError(f"{cls.__name__}: trailing data must be the last field")
        cls._number_fields = tuple(n for n, k in kinds if k in _NUMERIC)
        cls._numbers = struct.Struct("!" + "".join(_NUMERIC[k] for _, k in kinds if k in _NUMERIC))
        cls._string_fields = tuple((n, k) for n, k in kinds if k not in _NUMERIC)

    def validate(self) -> None:
        for name, kind in zip((f.name for f in fields(self)), self.LAYOUT, strict=True):  # type: ignore[arg-type]
            value = getattr(self, name)
            if kind in _LIMITS:
                low, high = _LIMITS[kind]
                if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                    raise ValueError(f"{type(self).__name__}.{name} = {value!r} out of range")
            elif not isinstance(value, bytes):
                raise ValueError(f"{type(self).__name__}.{name} must be bytes")
            elif kind == "p":
                check_relative(value, f"{type(self).__name__}.{name}")
            elif kind == "a":
                check_absolute(value, f"{type(self).__name__}.{name}")
            elif kind == "n":
                check_name(value, f"{type(self).__name__}.{name}")

    def __post_init__(self) -> None:
        self.validate()

    def encode(self) -> bytes:
        parts = [self._numbers.pack(*(getattr(self, n) for n in self._number_fields))]
        for name, kind in self._string_fields:
            value = getattr(self, name)
            if kind != "d":
                parts.append(_U32.pack(len(value)))
            parts.append(value)
        return b"".join(parts)

    @classmethod
    def decode(cls, payload: bytes | memoryview, what: str = "") -> Any:
        view = memoryview(payload)
        try:
            values = dict(zip(cls._number_fields, cls._numbers.unpack_from(view), strict=True))
            at = cls._numbers.size
            for name, kind in cls._string_fields:
                if kind == "d":
                    # A read's data arrives as the whole payload: keep that object, no copy.
                    values[name] = payload if at == 0 and isinstance(payload, bytes) else bytes(view[at:])
                    at = len(view)
                    continue
                (length,) = _U32.unpack_from(view, at)
                at += 4
                if at + length > len(view):
                    raise struct.error("string runs past the end")
                values[name] = bytes(view[at : at + length])
                at += length
            if at != len(view):
                raise struct.error(f"{len(view) - at} trailing bytes")
            return cls(**values)
        except (struct.error, ValueError) as exc:
            raise RemoteProtocolError(f"{what or cls.__name__}: malformed payload: {exc}") from None


_M = TypeVar("_M")


@dataclass_transform(frozen_default=True)
def message(layout: str) -> Callable[[type[_M]], type[_M]]:
    """Class decorator: a frozen dataclass with a wire layout."""

    def wrap(cls: type[_M]) -> type[_M]:
        cls.LAYOUT = layout  # type: ignore[attr-defined]
        made = dataclass(frozen=True, slots=True)(cls)
        made._prepare()  # type: ignore[attr-defined]
        return made

    return wrap


# Requests (client -> server).


@message("a")
class Mount(Message):
    path: bytes


@message("p")
class Lookup(Message):
    path: bytes


@message("pQ")
class Getattr(Message):
    path: bytes
    handle: int = 0  # nonzero: fstat the open file instead of the path


@message("pQIIIIQqq")
class Setattr(Message):
    path: bytes
    handle: int = 0
    valid: int = 0
    mode: int = 0
    uid: int = 0
    gid: int = 0
    size: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0


@message("p")
class Readlink(Message):
    path: bytes


@message("pI")
class Open(Message):
    path: bytes
    flags: int


@message("pIIII")
class Create(Message):
    path: bytes
    flags: int
    mode: int
    uid: int
    gid: int


@message("QQI")
class Read(Message):
    handle: int
    offset: int
    size: int


@message("QQd")
class Write(Message):
    handle: int
    offset: int
    data: bytes


@message("Q")
class Release(Message):
    handle: int


@message("QB")
class Fsync(Message):
    handle: int
    datasync: int = 0


@message("pIII")
class Mkdir(Message):
    path: bytes
    mode: int
    uid: int
    gid: int


@message("pIQII")
class Mknod(Message):
    path: bytes
    mode: int
    rdev: int
    uid: int
    gid: int


@message("psII")
class Symlink(Message):
    path: bytes
    target: bytes
    uid: int
    gid: int


@message("pp")
class Link(Message):
    source: bytes  # the existing file
    path: bytes  # the new name


@message("p")
class Unlink(Message):
    path: bytes


@message("p")
class Rmdir(Message):
    path: bytes


@message("ppI")
class Rename(Message):
    old: bytes
    new: bytes
    flags: int = 0  # RENAME_NOREPLACE / RENAME_EXCHANGE


@message("p")
class Opendir(Message):
    path: bytes


@message("QI")
class Readdir(Message):
    handle: int
    index: int  # the first entry wanted


@message("Q")
class Releasedir(Message):
    handle: int


@message("p")
class Statfs(Message):
    path: bytes


@message("psI")
class Getxattr(Message):
    path: bytes
    name: bytes
    size: int = MAX_XATTR


@message("pssI")
class Setxattr(Message):
    path: bytes
    name: bytes
    value: bytes
    flags: int = 0


@message("pI")
class Listxattr(Message):
    path: bytes
    size: int = MAX_XATTR


@message("ps")
class Removexattr(Message):
    path: bytes
    name: bytes


# Replies (server -> client).


@message("")
class Empty(Message):
    pass


@message("sI")
class MountReply(Message):
    attr: bytes  # Attr.encode()
    flags: int = 0


@message("s")
class AttrReply(Message):
    attr: bytes


@message("Qs")
class HandleReply(Message):
    handle: int
    attr: bytes


@message("d")
class DataReply(Message):
    data: bytes


@message("I")
class CountReply(Message):
    count: int


@message("QQQQQQQI")
class StatfsReply(Message):
    bsize: int
    frsize: int
    blocks: int
    bfree: int
    bavail: int
    files: int
    ffree: int
    namemax: int


@message("QBd")
class DirReply(Message):
    """A page of a directory: entries as `encode_entries` lays them out."""

    handle: int  # 0 when the server keeps nothing open (the listing ended in this page)
    eof: int
    entries: bytes


REQUESTS: dict[Op, type[Message]] = {
    Op.MOUNT: Mount,
    Op.LOOKUP: Lookup,
    Op.GETATTR: Getattr,
    Op.SETATTR: Setattr,
    Op.READLINK: Readlink,
    Op.OPEN: Open,
    Op.CREATE: Create,
    Op.READ: Read,
    Op.WRITE: Write,
    Op.RELEASE: Release,
    Op.FSYNC: Fsync,
    Op.MKDIR: Mkdir,
    Op.MKNOD: Mknod,
    Op.SYMLINK: Symlink,
    Op.LINK: Link,
    Op.UNLINK: Unlink,
    Op.RMDIR: Rmdir,
    Op.RENAME: Rename,
    Op.OPENDIR: Opendir,
    Op.READDIR: Readdir,
    Op.RELEASEDIR: Releasedir,
    Op.STATFS: Statfs,
    Op.GETXATTR: Getxattr,
    Op.SETXATTR: Setxattr,
    Op.LISTXATTR: Listxattr,
    Op.REMOVEXATTR: Removexattr,
}
OP_OF: dict[type[Message], Op] = {cls: op for op, cls in REQUESTS.items()}
_ATTR_REPLY = (Op.LOOKUP, Op.GETATTR, Op.SETATTR, Op.MKDIR, Op.MKNOD, Op.SYMLINK, Op.LINK)
REPLIES: dict[Op, type[Message]] = {
    **dict.fromkeys(_ATTR_REPLY, AttrReply),
    Op.MOUNT: MountReply,
    Op.READLINK: DataReply,
    Op.OPEN: HandleReply,
    Op.CREATE: HandleReply,
    Op.READ: DataReply,
    Op.WRITE: CountReply,
    Op.RELEASE: Empty,
    Op.FSYNC: Empty,
    Op.UNLINK: Empty,
    Op.RMDIR: Empty,
    Op.RENAME: Empty,
    Op.OPENDIR: DirReply,
    Op.READDIR: DirReply,
    Op.RELEASEDIR: Empty,
    Op.STATFS: StatfsReply,
    Op.GETXATTR: DataReply,
    Op.SETXATTR: Empty,
    Op.LISTXATTR: DataReply,
    Op.REMOVEXATTR: Empty,
}
#: Ops that may be sent again after a reconnect without changing the outcome.
IDEMPOTENT = frozenset(
    {
        Op.LOOKUP,
        Op.GETATTR,
        Op.READLINK,
        Op.READ,
        Op.STATFS,
        Op.GETXATTR,
        Op.LISTXATTR,
        Op.OPENDIR,
        Op.READDIR,
    }
)

_ENTRY_NAME = struct.Struct("!H")


def encode_entry(name: bytes, attr: bytes) -> bytes:
    return attr + _ENTRY_NAME.pack(len(name)) + name


def decode_entries(data: bytes | memoryview) -> list[tuple[bytes, Attr]]:
    """The (name, attributes) pairs of a directory page."""
    view = memoryview(data)
    entries = []
    at = 0
    try:
        while at < len(view):
            attr = Attr.decode_from(view, at)
            at += Attr.SIZE
            (length,) = _ENTRY_NAME.unpack_from(view, at)
            at += 2
            name = bytes(view[at : at + length])
            at += length
            check_name(name, "directory entry")
            if len(name) != length:
                raise struct.error("name runs past the end")
            entries.append((name, attr))
    except (struct.error, ValueError) as exc:
        raise RemoteProtocolError(f"directory page: {exc}") from None
    return entries


# -- events and the connection ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    node: str
    version: int = PROTOCOL_VERSION
    epoch: int = 0  # the server's start identity: handles of an older epoch are gone


@dataclass(frozen=True, slots=True)
class Call:
    id: int
    request: Message


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

    def send_call(self, id: int, request: Message) -> bytes:
        if not self.client:
            raise LocalProtocolError("only the client sends requests")
        if not 0 < id <= MAX_ID:
            raise LocalProtocolError(f"request id {id} out of range")
        if id in self._pending:
            raise LocalProtocolError(f"request id {id} is already pending")
        op = OP_OF[type(request)]
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
        name = errno_name(error) if isinstance(error, int) else error.encode()
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
        if frame is NEED_DATA:
            return None
        if frame is CLOSED:
            return Closed()
        assert not isinstance(frame, type(NEED_DATA))
        kind, channel, payload = frame.type, frame.channel, frame.payload  # type: ignore[union-attr]
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
