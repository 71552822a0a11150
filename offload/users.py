"""Who a peer's request acts as on this machine (`map_user`), and acting as that user (`run_as`).

The acting side of every service does the work with the mapped account's
credentials, never simply as the daemon's root.
"""

from __future__ import annotations

import ctypes
import os
import platform
import pwd
import socket
import struct
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol, TypeVar

from offload.errors import RefusedError
from offload.resolve import libc, libc_error

T = TypeVar("T")

#: The account a root caller maps to unless the operator maps root explicitly.
SQUASHED = "nobody"


@dataclass(frozen=True)
class RemoteUser:
    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str


def map_user(caller: str, users: Mapping[str, str], node: str) -> RemoteUser:
    """The local account a caller's program runs as here; never root unless the caller was root."""
    name = users.get(caller, caller)
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise RefusedError(f"user {name} does not exist on {node}", exit_code=126) from None
    if entry.pw_uid == 0 and caller != "root":
        raise RefusedError(f"user {caller} may not run programs as root on {node}", exit_code=126)
    groups = tuple(os.getgrouplist(entry.pw_name, entry.pw_gid))
    return RemoteUser(entry.pw_name, entry.pw_uid, entry.pw_gid, groups, entry.pw_dir)


def squashing_root(users: Mapping[str, str]) -> dict[str, str]:
    """A user map where root maps to `SQUASHED` unless the operator's map names root itself."""
    return {"root": SQUASHED, **users}


class Socket(Protocol):
    def getsockopt(self, level: int, option: int, buflen: int, /) -> bytes: ...


def peer_credentials(sock: Socket) -> tuple[int, int, int]:
    """The pid, uid and gid of the process at the other end of a UNIX socket (SO_PEERCRED, struct ucred)."""
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return pid, uid, gid


def local_user(uid: int, gid: int, groups: tuple[int, ...] | None = None) -> RemoteUser:
    """A local caller (SO_PEERCRED) as an account: its name travels, its own ids act here.

    ``groups`` are the caller's own (SO_PEERGROUPS); None: its account's.
    """
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        raise RefusedError(f"uid {uid} has no user name on this machine", exit_code=126) from None
    if groups is None:
        groups = tuple(os.getgrouplist(entry.pw_name, gid))
    return RemoteUser(entry.pw_name, uid, gid, groups, entry.pw_dir)


# Raw system calls, not os.setresuid & co: glibc applies those to every
# thread of the process (POSIX set*id semantics, nptl's SIGSETXID), while
# the kernel's calls change only the calling thread's credentials.  That is
# what lets one short-lived thread act as a user while the daemon's other
# threads stay root.
_SYSCALLS = {
    "x86_64": {"setgroups": 116, "setresuid": 117, "setresgid": 119},
    # asm-generic numbering
    "aarch64": {"setgroups": 159, "setresuid": 147, "setresgid": 149},
    "riscv64": {"setgroups": 159, "setresuid": 147, "setresgid": 149},
}


def _call(name: str, *args: object) -> None:
    numbers = _SYSCALLS.get(platform.machine())
    if numbers is None:
        raise OSError(0, f"acting as another user is not implemented on {platform.machine()}")
    if libc.syscall(numbers[name], *args) != 0:
        raise libc_error(name)


def _become(user: RemoteUser) -> None:
    """This thread only, for good: groups first (needs root), then gid, then uid."""
    groups = (ctypes.c_uint * len(user.groups))(*user.groups)
    _call("setgroups", ctypes.c_size_t(len(user.groups)), groups)
    _call("setresgid", ctypes.c_uint(user.gid), ctypes.c_uint(user.gid), ctypes.c_uint(user.gid))
    _call("setresuid", ctypes.c_uint(user.uid), ctypes.c_uint(user.uid), ctypes.c_uint(user.uid))


def run_as(user: RemoteUser, work: Callable[[], T]) -> T:
    """``work()`` with ``user``'s credentials (uid, gid, groups); its result or its exception.

    It runs in a thread of its own that drops root for good (real, effective
    and saved ids) and then ends, so nothing it does can regain root and no
    other work ever runs with its credentials.  A fresh thread costs tens
    of microseconds, paid once per connect or re-opened file, never per
    message.  Every permission check the kernel makes (path lookup,
    connect(2), open(2), SO_PEERCRED) sees the user.
    """

    def body() -> T:
        _become(user)
        return work()

    with ThreadPoolExecutor(1, thread_name_prefix=f"as-{user.name}") as pool:
        return pool.submit(body).result()
