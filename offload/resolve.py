"""Opening paths below a root without ever leaving it, and the C library calls the os module lacks.

Shared by every component that acts on a path a peer or a caller named:
qtfs's exports, udsproxy's and rexec's prefixes, the mount steps, ptys.
Every path a qtfs client sends is relative to its mount root and was checked
for ``..`` and empty components by the protocol.  What remains is symlinks:
a component that is a symlink pointing outside the root (absolute, or
climbing with ``..``) must not be followed.  openat2(2) with
RESOLVE_BENEATH refuses exactly that in the kernel (EXDEV), race-free, and
RESOLVE_NO_MAGICLINKS refuses /proc-style magic links.  Python has no
os.openat2, so it is called through ctypes; where the kernel lacks it
(before 5.6, ENOSYS) each directory component is opened with O_NOFOLLOW
instead, which refuses every symlink on the way (stricter, still safe).
The final component is never followed: FUSE resolves symlinks on the
client side (readlink), so the server acts on the link itself.
"""

from __future__ import annotations

import ctypes
import errno
import os

SYS_OPENAT2 = 437  # the same number on every architecture (asm-generic)
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
#: statfs(2) f_type of the kernel's fact filesystems (linux/magic.h).
PROC_SUPER_MAGIC = 0x9FA0
SYSFS_MAGIC = 0x62656572
RESOLVE_BENEATH = 0x08
_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


#: The C library, for the calls the os module lacks (failures set errno: see `libc_error`).
libc = ctypes.CDLL(None, use_errno=True)
_syscall = libc.syscall
_syscall.restype = ctypes.c_long
_have_openat2: bool | None = None


def libc_error(what: str = "") -> OSError:
    """The OSError of the `libc` call that just failed, by its errno; ``what`` names the call."""
    number = ctypes.get_errno()
    return OSError(number, f"{what}: {os.strerror(number)}" if what else os.strerror(number))


class Escape(PermissionError):
    """The path leaves the export (a symlink pointing out of it)."""


def openat2(dirfd: int, path: bytes, flags: int, mode: int = 0, *, no_symlinks: bool = False) -> int:
    """openat2(dirfd, path, flags, RESOLVE_BENEATH|RESOLVE_NO_MAGICLINKS); OSError on failure.

    ``no_symlinks`` adds RESOLVE_NO_SYMLINKS: no symlink at all is followed
    (ELOOP), not even one that stays below ``dirfd`` (the fallback is that
    strict anyway).
    """
    global _have_openat2
    if _have_openat2 is not False:
        resolve = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS | (RESOLVE_NO_SYMLINKS if no_symlinks else 0)
        how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve)
        for _ in range(8):
            fd = _syscall(SYS_OPENAT2, dirfd, path, ctypes.byref(how), ctypes.sizeof(how))
            if fd >= 0:
                _have_openat2 = True
                return fd
            err = ctypes.get_errno()
            if err == errno.EAGAIN:  # a concurrent rename or mount: the kernel asks us to retry
                continue
            if err == errno.ENOSYS:
                _have_openat2 = False
                break
            if err == errno.EXDEV:
                raise Escape(errno.EACCES, "path leaves the export", os.fsdecode(path))
            raise OSError(err, os.strerror(err), os.fsdecode(path))
        else:
            raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN), os.fsdecode(path))
    return _walk(dirfd, path, flags, mode)


def _walk(dirfd: int, path: bytes, flags: int, mode: int) -> int:
    """The fallback: one O_NOFOLLOW open per component."""
    parts = path.split(b"/") if path else []
    current = dirfd
    try:
        for part in parts[:-1]:
            try:
                fd = os.open(part, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=current)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.islink(
                    f"/proc/self/fd/{current}/{os.fsdecode(part)}"
                ):
                    raise Escape(errno.EACCES, "symlink on the way", os.fsdecode(path)) from None
                raise
            if current != dirfd:
                os.close(current)
            current = fd
        last = parts[-1] if parts else b"."
        return os.open(last, flags | os.O_CLOEXEC, mode, dir_fd=current)
    finally:
        if current != dirfd:
            os.close(current)


def open_parent(root: int, path: bytes) -> tuple[int, bytes]:
    """(fd of the directory holding ``path``, last component); the fd is ``root`` itself for top-level names.

    The caller closes the fd unless it is ``root``.
    """
    head, slash, name = path.rpartition(b"/")
    if not slash:
        return root, path
    return openat2(root, head, _DIR_FLAGS), name


def fs_type(fd: int) -> int:
    """fstatfs(2)'s f_type of the filesystem holding ``fd`` (os.statvfs has none)."""
    # struct statfs begins with f_type, a C long; 256 bytes hold the whole struct on every ABI.
    buffer = (ctypes.c_long * 32)()
    if libc.fstatfs(fd, buffer) != 0:
        raise libc_error()
    return int(buffer[0]) & 0xFFFFFFFF


def renameat2(old_dir: int, old: bytes, new_dir: int, new: bytes, flags: int) -> None:
    """rename(2) with flags (RENAME_NOREPLACE, RENAME_EXCHANGE), which os.rename lacks."""
    if libc.renameat2(old_dir, old, new_dir, new, ctypes.c_uint(flags)) != 0:
        raise libc_error()


def real_path(fd: int) -> bytes:
    """Where the kernel says ``fd`` is now (its /proc/self/fd link): the path after every symlink."""
    return os.fsencode(os.readlink(f"/proc/self/fd/{fd}"))
