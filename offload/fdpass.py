"""Carrying an fd passed by SCM_RIGHTS to the other machine: the one implementation (ARCHITECTURE.md).

The sender describes each fd (`prepare`): a regular file under a shared
prefix travels by path, access mode, O_APPEND and offset; /dev/null by
access; a pipe end stays here and its bytes travel on a flow-controlled
channel of its own.  Anything else is refused, and the caller decides what
refusing means (the shim's sendmsg fails, a monitor command goes without
its fd), so no fd is ever dropped quietly.

The receiver re-creates it (`materialize`): a file is re-opened as the
user the connection acts for, beneath its own shared prefix, and delivered
only if it is the very file the sender had (st_dev and st_ino).  A path
string names nothing for sure: a sender in a mount namespace of its own
can put any file of its own at a shared path, and re-opening that path as
root would hand over whatever root-only file lies there on this side.
"""

from __future__ import annotations

import array
import errno
import fcntl
import os
import socket
import stat

from offload import fdinfo, users
from offload.errors import UnsupportedFdError
from offload.prefix import is_shared, is_under, open_beneath
from offload.protocol.fdpass import FdDescription


def open_flags(access: str, append: bool = False) -> int:
    """open(2)'s flags for an access mode as the wire says it ("r", "w", "rw"), and O_APPEND."""
    return {"r": os.O_RDONLY, "w": os.O_WRONLY, "rw": os.O_RDWR}[access] | (os.O_APPEND if append else 0)


def prepare(fd: int, shared: tuple[str, ...], root: str = "/") -> tuple[FdDescription, int | None]:
    """Describe one passed fd; return it with the fd this side keeps (pipes).

    ``root`` is the sending program's root directory: a file's path is
    named as that program sees it (libvirtd runs chrooted in
    /another_rootfs, and the far side knows nothing of that root).  ``fd``
    itself stays open: the caller closes it either way.  Raises
    UnsupportedFdError naming what the fd is when it cannot be carried.
    """
    try:
        entry = fdinfo.describe(fd)
    except OSError as exc:
        raise UnsupportedFdError(fd, f"unreadable ({exc.strerror})") from None
    kind = entry["type"]
    if kind == fdinfo.NULL:
        return FdDescription("null", access=entry["access"]), None
    if kind == fdinfo.FILE:
        path = entry["path"]
        root = root.rstrip("/")
        if root and is_under(path, root, strict=True):
            path = path[len(root) :]
        if entry["deleted"]:
            raise UnsupportedFdError(fd, f"a deleted or unnamed file ({path})")
        if not is_shared(path, shared):
            raise UnsupportedFdError(fd, f"the file {path}, which is not under a --share prefix")
        st = os.fstat(fd)
        return FdDescription(
            "file",
            path=path,
            access=entry["access"],
            append=entry["append"],
            offset=entry["offset"],
            dev=st.st_dev,
            ino=st.st_ino,
        ), None
    if kind in (fdinfo.PIPE_READ, fdinfo.PIPE_WRITE):
        reading = kind == fdinfo.PIPE_READ
        # Opening the pipe again through /proc gives this side its own open
        # file description: O_NONBLOCK set here never changes the sender's.
        flags = (os.O_RDONLY if reading else os.O_WRONLY) | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            kept = os.open(f"/proc/self/fd/{fd}", flags)
        except OSError as exc:  # e.g. ENXIO: a write end whose readers are all gone
            raise UnsupportedFdError(fd, f"a pipe that cannot be reopened ({exc.strerror})") from None
        return FdDescription("pipe_r" if reading else "pipe_w"), kept
    raise UnsupportedFdError(fd, str(entry.get("what", kind)))


def root_of(pid: int) -> str:
    """The root directory of process ``pid`` ("/" if it cannot be read)."""
    return fdinfo.readlink_or(f"/proc/{pid}/root", "/")


def peer_root(sock: users.Socket) -> str:
    """The root directory of the process at the other end of a UNIX socket."""
    try:
        pid, _, _ = users.peer_credentials(sock)
    except OSError:
        return "/"
    return root_of(pid) if pid > 0 else "/"


def materialize(description: FdDescription, shared: tuple[str, ...], user: users.RemoteUser) -> tuple[int, int | None]:
    """The fd for this side's program and the fd this side keeps (pipes); OSError says why not.

    ``user`` is whom the connection acts for on this side: a file is
    re-opened with that user's credentials, never the daemon's.
    """
    if description.kind == "null":
        return os.open("/dev/null", open_flags(description.access) | os.O_CLOEXEC), None
    if description.kind == "file":
        flags = open_flags(description.access, description.append) | os.O_NOCTTY | os.O_NONBLOCK
        # O_NONBLOCK so that a FIFO or device at that path cannot block us;
        # only a regular file is what the sender had.
        fd = users.run_as(user, lambda: open_beneath(description.path, shared, flags))
        with fdinfo.closed_on_error(fd):
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EOPNOTSUPP, "not a regular file here", description.path)
            if (st.st_dev, st.st_ino) != (description.dev, description.ino):
                raise PermissionError(
                    errno.EACCES,
                    f"not the file the sender passed (it had {description.dev}:{description.ino},"
                    f" {st.st_dev}:{st.st_ino} is here)",
                    description.path,
                )
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
            if not description.append:
                os.lseek(fd, description.offset, os.SEEK_SET)
        return fd, None
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    if description.kind == "pipe_r":  # the program reads what the channel brings
        os.set_blocking(write_end, False)
        return read_end, write_end
    os.set_blocking(read_end, False)  # pipe_w: what the program writes goes back
    return write_end, read_end


def fds_of(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    """The fds an SCM_RIGHTS message brought (the caller owns them from here on)."""
    passed: list[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            numbers = array.array("i")
            numbers.frombytes(data[: len(data) - len(data) % numbers.itemsize])
            passed.extend(numbers)
    return passed
