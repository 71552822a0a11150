"""Every mount and namespace syscall of the package goes through this module.

mount(2), umount2(2) and unshare(2) are called through ctypes (one syscall
per step: starting mount(8) for each of some thirty steps would cost more
than the whole plan), mknod(2) through ``os``.  A failure becomes a
`MountError` carrying the path and the kernel's errno; nothing else here
decides policy.
"""

from __future__ import annotations

import ctypes
import errno as errno_module
import os
import stat

from offload.errors import MountError

# <linux/mount.h>
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_SYNCHRONOUS = 16
MS_REMOUNT = 32
MS_MANDLOCK = 64
MS_DIRSYNC = 128
MS_NOSYMFOLLOW = 256
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MS_LAZYTIME = 1 << 25

MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8
CLONE_NEWNS = 0x00020000

# mount(8)'s option words that are flags, not filesystem data.  A word that
# clears a flag (rw, suid, ...) maps to 0: it is the default.
FLAG_WORDS: dict[str, int] = {
    "ro": MS_RDONLY,
    "rw": 0,
    "nosuid": MS_NOSUID,
    "suid": 0,
    "nodev": MS_NODEV,
    "dev": 0,
    "noexec": MS_NOEXEC,
    "exec": 0,
    "sync": MS_SYNCHRONOUS,
    "async": 0,
    "mand": MS_MANDLOCK,
    "nomand": 0,
    "dirsync": MS_DIRSYNC,
    "nosymfollow": MS_NOSYMFOLLOW,
    "noatime": MS_NOATIME,
    "atime": 0,
    "nodiratime": MS_NODIRATIME,
    "diratime": 0,
    "relatime": MS_RELATIME,
    "norelatime": 0,
    "strictatime": MS_STRICTATIME,
    "lazytime": MS_LAZYTIME,
    "nolazytime": 0,
    "defaults": 0,
}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]


def split_options(options: str) -> tuple[int, str]:
    """mount(8)-style ``-o`` words -> (MS_* flags, the filesystem's data string)."""
    flags = 0
    data = []
    for word in filter(None, options.split(",")):
        if word in FLAG_WORDS:
            flags |= FLAG_WORDS[word]
        else:
            data.append(word)
    return flags, ",".join(data)


def errno_name(number: int) -> str:
    return errno_module.errorcode.get(number, f"errno {number}")


def _fail(what: str, path: str, number: int) -> MountError:
    return MountError(f"{what}: {os.strerror(number)} ({errno_name(number)})", path=path, errno=number)


def _b(value: str | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


def mount(source: str | None, target: str, fstype: str | None, flags: int = 0, data: str = "") -> None:
    """mount(2); ``what`` in the error is the equivalent mount(8) command."""
    if _libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data) if data else None) != 0:
        number = ctypes.get_errno()
        if flags & MS_BIND:
            what = f"mount --{'r' if flags & MS_REC else ''}bind {source} {target}"
        elif flags & MS_REMOUNT:
            what = f"mount -o remount {target}"
        else:
            what = f"mount -t {fstype} {source} {target}"
        raise _fail(what, target, number)


def umount(target: str, flags: int = 0) -> None:
    """umount2(2), never following a symlink at ``target`` (it may point out of the rootfs)."""
    if _libc.umount2(_b(target), flags | UMOUNT_NOFOLLOW) != 0:
        number = ctypes.get_errno()
        lazy = " (lazy)" if flags & MNT_DETACH else ""
        raise _fail(f"umount{lazy} {target}", target, number)


def mknod_char(path: str, major: int, minor: int, mode: int) -> None:
    """A character device node with exactly ``mode`` (mknod(2) applies the umask; chmod does not)."""
    try:
        os.mknod(path, stat.S_IFCHR | mode, os.makedev(major, minor))
        os.chmod(path, mode)
    except OSError as exc:
        raise _fail(f"mknod {path} c {major} {minor}", path, exc.errno or errno_module.EIO) from None


def unshare_mount_namespace() -> None:
    """Move this process into a new mount namespace where nothing propagates back.

    unshare(CLONE_NEWNS) copies the mounts, but shared ones would still
    propagate to the original namespace: making / recursively private is what
    util-linux's ``unshare -m --propagation private`` does too.
    """
    if _libc.unshare(CLONE_NEWNS) != 0:
        raise _fail("unshare --mount", "/", ctypes.get_errno())
    mount(None, "/", None, MS_REC | MS_PRIVATE)
