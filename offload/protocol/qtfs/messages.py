"""The qtfs operations: each request with its wire layout and the type of its reply.

`Op` is the one list of operations; a request class is found by its op's
name (`Op.GETATTR` is `Getattr`) and declares its reply type as its base
(``class Getattr(Request[AttrReply])``), so `REQUESTS`, `REPLIES` and the
server's handlers are all derived from these declarations.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import ClassVar, Generic, TypeVar, dataclass_transform, get_args, get_origin

from offload.protocol.qtfs.codec import MAX_XATTR, Message, message

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


#: The op byte on the wire: MOUNT is 1 and the rest follow in this order (append, never reorder).
Op = enum.IntEnum(
    "Op",
    "MOUNT LOOKUP GETATTR SETATTR READLINK OPEN CREATE READ WRITE RELEASE FSYNC MKDIR MKNOD SYMLINK LINK UNLINK "
    "RMDIR RENAME OPENDIR READDIR RELEASEDIR STATFS GETXATTR SETXATTR LISTXATTR REMOVEXATTR",
)


#: Ops that may be sent again after a reconnect without changing the outcome.
IDEMPOTENT = frozenset(
    {Op.LOOKUP, Op.GETATTR, Op.READLINK, Op.READ, Op.STATFS, Op.GETXATTR, Op.LISTXATTR, Op.OPENDIR, Op.READDIR}
)

ReplyT = TypeVar("ReplyT", bound=Message)
_R = TypeVar("_R", bound="Request")


class Request(Message, Generic[ReplyT]):
    """A client's request; ``ReplyT`` is what the server answers it with."""

    OP: ClassVar[Op]


REQUESTS: dict[Op, type[Request]] = {}
REPLIES: dict[Op, type[Message]] = {}
OP_OF: dict[type[Message], Op] = {}


@dataclass_transform(frozen_default=True)
def request(layout: str) -> Callable[[type[_R]], type[_R]]:
    """`message`, registering the class under its op with the reply type its base names."""

    def wrap(cls: type[_R]) -> type[_R]:
        bases = cls.__dict__["__orig_bases__"]  # what the class statement wrote: Request[ReplyT]
        (reply,) = next(get_args(base) for base in bases if get_origin(base) is Request)
        made = message(layout)(cls)
        made.OP = Op[cls.__name__.upper()]
        REQUESTS[made.OP], REPLIES[made.OP], OP_OF[made] = made, reply, made.OP
        return made

    return wrap


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


# Requests (client -> server).


@request("a")
class Mount(Request[MountReply]):
    path: bytes


@request("p")
class Lookup(Request[AttrReply]):
    path: bytes


@request("pQ")
class Getattr(Request[AttrReply]):
    path: bytes
    handle: int = 0  # nonzero: fstat the open file instead of the path


@request("pQIIIIQqq")
class Setattr(Request[AttrReply]):
    path: bytes
    handle: int = 0
    valid: int = 0
    mode: int = 0
    uid: int = 0
    gid: int = 0
    size: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0


@request("p")
class Readlink(Request[DataReply]):
    path: bytes


@request("pI")
class Open(Request[HandleReply]):
    path: bytes
    flags: int


@request("pIIII")
class Create(Request[HandleReply]):
    path: bytes
    flags: int
    mode: int
    uid: int
    gid: int


@request("QQI")
class Read(Request[DataReply]):
    handle: int
    offset: int
    size: int


@request("QQd")
class Write(Request[CountReply]):
    handle: int
    offset: int
    data: bytes


@request("Q")
class Release(Request[Empty]):
    handle: int


@request("QB")
class Fsync(Request[Empty]):
    handle: int
    datasync: int = 0


@request("pIII")
class Mkdir(Request[AttrReply]):
    path: bytes
    mode: int
    uid: int
    gid: int


@request("pIQII")
class Mknod(Request[AttrReply]):
    path: bytes
    mode: int
    rdev: int
    uid: int
    gid: int


@request("psII")
class Symlink(Request[AttrReply]):
    path: bytes
    target: bytes
    uid: int
    gid: int


@request("pp")
class Link(Request[AttrReply]):
    source: bytes  # the existing file
    path: bytes  # the new name


@request("p")
class Unlink(Request[Empty]):
    path: bytes


@request("p")
class Rmdir(Request[Empty]):
    path: bytes


@request("ppI")
class Rename(Request[Empty]):
    old: bytes
    new: bytes
    flags: int = 0  # RENAME_NOREPLACE / RENAME_EXCHANGE


@request("p")
class Opendir(Request[DirReply]):
    path: bytes


@request("QI")
class Readdir(Request[DirReply]):
    handle: int
    index: int  # the first entry wanted


@request("Q")
class Releasedir(Request[Empty]):
    handle: int


@request("p")
class Statfs(Request[StatfsReply]):
    path: bytes


@request("psI")
class Getxattr(Request[DataReply]):
    path: bytes
    name: bytes
    size: int = MAX_XATTR


@request("pssI")
class Setxattr(Request[Empty]):
    path: bytes
    name: bytes
    value: bytes
    flags: int = 0


@request("pI")
class Listxattr(Request[DataReply]):
    path: bytes
    size: int = MAX_XATTR


@request("ps")
class Removexattr(Request[Empty]):
    path: bytes
    name: bytes


if set(REQUESTS) != set(Op):
    raise TypeError(f"ops without a request class: {sorted(set(Op) - set(REQUESTS))}")
