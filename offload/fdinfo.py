"""What a process's open file descriptors are, as the stand-in reports them.

The stand-in describes every fd it inherited; its agent decides, by policy,
what the remote program gets at the same number.  Classification uses the
facts the kernel gives: fstat for the file type, F_GETFL for the direction
of a pipe (fstat reports 0600 for both pipe ends; the access mode does not
lie), SO_ACCEPTCONN for listening sockets, and the /proc/self/fd link for
naming what cannot be carried (``anon_inode:[eventfd]``, ``/dev/net/tun``).

Imported by the stand-in on every start: stdlib only, nothing heavy.
"""

from __future__ import annotations

import _socket  # not socket: its enums cost the stand-in start-up time
import contextlib
import fcntl
import os
import stat
from collections.abc import Iterator

# Description types.
NULL = "null"  # /dev/null
FILE = "file"  # a regular file
PIPE_READ = "pipe_r"  # read end of a pipe or FIFO
PIPE_WRITE = "pipe_w"  # write end
UNIX_STREAM = "unix_stream"  # a connected AF_UNIX stream socket
UNIX_LISTENER = "unix_listener"  # a listening AF_UNIX stream socket
STREAM = "stream"  # stdio only: a tty or any other byte stream, relayed one way
OTHER = "other"  # cannot be carried; "what" names it

_DEV_NULL = os.makedev(1, 3)


@contextlib.contextmanager
def closing(fd: int) -> Iterator[int]:
    """``fd``, closed when the block ends, however it ends: the one owner of an fd used in one block."""
    try:
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def closed_on_error(fd: int) -> Iterator[int]:
    """``fd``, closed if the block raises: its owner until the caller takes it over."""
    try:
        yield fd
    except BaseException:
        os.close(fd)
        raise


def _access(flags: int) -> str:
    return {os.O_RDONLY: "r", os.O_WRONLY: "w"}.get(flags & os.O_ACCMODE, "rw")


def readlink_or(path: str, default: str) -> str:
    """Where the link ``path`` (a /proc magic link) points; ``default`` when it cannot be read."""
    try:
        return os.readlink(path)
    except OSError:
        return default


def describe(fd: int) -> dict:
    """Describe one open fd as a JSON-ready dict with at least fd and type."""
    st = os.fstat(fd)
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    mode = st.st_mode
    entry: dict = {"fd": fd, "access": _access(flags)}
    if stat.S_ISCHR(mode) and st.st_rdev == _DEV_NULL:
        entry["type"] = NULL
    elif stat.S_ISREG(mode):
        path = readlink_or(f"/proc/self/fd/{fd}", "?")
        entry.update(
            type=FILE,
            path=path,
            deleted=path.endswith(" (deleted)") or not path.startswith("/"),
            append=bool(flags & os.O_APPEND),
            offset=os.lseek(fd, 0, os.SEEK_CUR),
        )
    elif stat.S_ISFIFO(mode):
        entry["type"] = {"r": PIPE_READ, "w": PIPE_WRITE}.get(entry["access"], OTHER)
        if entry["type"] == OTHER:
            entry["what"] = "a FIFO opened read-write"
    elif stat.S_ISSOCK(mode):
        entry.update(_describe_socket(fd))
    else:
        entry["type"] = OTHER
        entry["what"] = readlink_or(f"/proc/self/fd/{fd}", "?")
    if fd <= 2 and entry["type"] in (OTHER, UNIX_STREAM) and (stat.S_ISCHR(mode) or stat.S_ISSOCK(mode)):
        # A terminal or a socket as stdio is carried as a one-way byte stream
        # in the direction stdio implies, as ssh does; the remote program
        # sees a pipe (isatty() is false there).
        entry["type"] = STREAM
    return entry


def _describe_socket(fd: int) -> dict:
    sock = _socket.socket(fileno=os.dup(fd))
    try:
        family = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_DOMAIN)
        kind = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_TYPE)
        listening = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_ACCEPTCONN)
    finally:
        sock.close()
    if family == _socket.AF_UNIX and kind == _socket.SOCK_STREAM:
        return {"type": UNIX_LISTENER if listening else UNIX_STREAM}
    names = {_socket.AF_INET: "AF_INET", _socket.AF_INET6: "AF_INET6", _socket.AF_UNIX: "AF_UNIX"}
    kinds = {_socket.SOCK_STREAM: "stream", _socket.SOCK_DGRAM: "datagram", _socket.SOCK_SEQPACKET: "seqpacket"}
    what = f"a {names.get(family, f'family {family}')} {kinds.get(kind, f'type {kind}')} socket"
    return {"type": OTHER, "what": what}


def open_fds() -> list[int]:
    """The fd numbers this process has open, ascending.

    The listing itself uses an fd, which is closed again by the time we
    look: those numbers are dropped by checking each one.
    """
    fds = []
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            os.fstat(int(name))
            fds.append(int(name))
    return sorted(fds)
