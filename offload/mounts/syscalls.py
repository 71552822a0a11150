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

from offload.errors import MountError, errno_name
from offload.fdinfo import closing, readlink_or

# <linux/mount.h>
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_SYNCHRONOUS = 16
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
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "sync": MS_SYNCHRONOUS,
    "mand": MS_MANDLOCK,
    "dirsync": MS_DIRSYNC,
    "nosymfollow": MS_NOSYMFOLLOW,
    "noatime": MS_NOATIME,
    "nodiratime": MS_NODIRATIME,
    "relatime": MS_RELATIME,
    "strictatime": MS_STRICTATIME,
    "lazytime": MS_LAZYTIME,
} | dict.fromkeys(
    ("rw", "suid", "dev", "exec", "async", "nomand", "atime", "diratime", "norelatime", "nolazytime", "defaults"), 0
)

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


def failure(what: str, path: str, number: int) -> MountError:
    """The MountError of a failed call: ``what`` (a command line), the kernel's message and errno name."""
    return MountError(
        f"{what}: {os.strerror(number)} ({errno_name(number, f'errno {number}')})", path=path, errno=number
    )


def _b(value: str | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


def mount(source: str | None, target: str, fstype: str | None, flags: int = 0, data: str = "") -> None:
    """mount(2); ``what`` in the error is the equivalent mount(8) command."""
    if _libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data) if data else None) != 0:
        number = ctypes.get_errno()
        if flags & MS_BIND:
            what = f"mount --{'r' if flags & MS_REC else ''}bind {source} {target}"
        else:
            what = f"mount -t {fstype} {source} {target}"
        raise failure(what, target, number)


def umount(target: str, flags: int = 0, *, name: str = "") -> None:
    """umount2(2) of ``target`` (or of the path ``name``, which errors call ``target``), never following a symlink
    there (it may point out of the rootfs)."""
    if _libc.umount2(_b(name or target), flags | UMOUNT_NOFOLLOW) != 0:
        number = ctypes.get_errno()
        lazy = " (lazy)" if flags & MNT_DETACH else ""
        raise failure(f"umount{lazy} {target}", target, number)


def mknod_char(path: str, major: int, minor: int, mode: int) -> None:
    """A character device node with exactly ``mode`` (mknod(2) applies the umask; chmod does not)."""
    try:
        os.mknod(path, stat.S_IFCHR | mode, os.makedev(major, minor))
        os.chmod(path, mode)
    except OSError as exc:
        raise failure(f"mknod {path} c {major} {minor}", path, exc.errno or errno_module.EIO) from None


def unshare_mount_namespace() -> None:
    """Move this process into a new mount namespace where nothing propagates back.

    unshare(CLONE_NEWNS) copies the mounts, but shared ones would still
    propagate to the original namespace: making / recursively private is what
    util-linux's ``unshare -m --propagation private`` does too.
    """
    if _libc.unshare(CLONE_NEWNS) != 0:
        raise failure("unshare --mount", "/", ctypes.get_errno())
    mount(None, "/", None, MS_REC | MS_PRIVATE)


# -- Mounting by file descriptor ---------------------------------------------
#
# A path handed to mount(2) is resolved by the kernel at the moment of the
# call, following every symlink on the way: a link planted in the target (a
# rootfs layer, a directory the host serves through qtfs) would take the
# mount outside it.  So every mount of a plan is made in two steps that
# never resolve a path after it was checked: the new mount is made detached
# (fsopen/fsmount for a filesystem, open_tree(OPEN_TREE_CLONE) for a bind),
# with its per-mount flags already set (a read-only bind is never writable,
# not even for an instant), and then attached with move_mount(2) onto an fd
# opened beneath the target (offload.mounts.paths.open_inside).  Its id is
# known before it is attached: teardown finds the mount by it wherever it is.

_SYS_OPEN_TREE = 428  # asm-generic numbers: the same on every architecture
_SYS_MOVE_MOUNT = 429
_SYS_FSOPEN = 430
_SYS_FSCONFIG = 431
_SYS_FSMOUNT = 432
_SYS_MOUNT_SETATTR = 442

OPEN_TREE_CLONE = 1
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
FSOPEN_CLOEXEC = 1
FSMOUNT_CLOEXEC = 1
FSCONFIG_SET_FLAG = 0
FSCONFIG_SET_STRING = 1
FSCONFIG_CMD_CREATE = 6
MOVE_MOUNT_F_EMPTY_PATH = 0x04
MOVE_MOUNT_T_EMPTY_PATH = 0x40

MOUNT_ATTR_RDONLY = 0x01
MOUNT_ATTR_NOSUID = 0x02
MOUNT_ATTR_NODEV = 0x04
MOUNT_ATTR_NOEXEC = 0x08
MOUNT_ATTR_NOATIME = 0x10
MOUNT_ATTR_STRICTATIME = 0x20
MOUNT_ATTR_NODIRATIME = 0x80
MOUNT_ATTR_NOSYMFOLLOW = 0x200000

#: MS_* per-mount flags -> MOUNT_ATTR_*.  MS_RELATIME is the default (0).
_ATTRS = {
    MS_RDONLY: MOUNT_ATTR_RDONLY,
    MS_NOSUID: MOUNT_ATTR_NOSUID,
    MS_NODEV: MOUNT_ATTR_NODEV,
    MS_NOEXEC: MOUNT_ATTR_NOEXEC,
    MS_NOATIME: MOUNT_ATTR_NOATIME,
    MS_STRICTATIME: MOUNT_ATTR_STRICTATIME,
    MS_NODIRATIME: MOUNT_ATTR_NODIRATIME,
    MS_NOSYMFOLLOW: MOUNT_ATTR_NOSYMFOLLOW,
}
#: MS_* flags of the superblock: fsconfig(2) takes them as flag keys.  "ro"
#: is the superblock's too, as with mount(2): a read-only device needs it.
_SUPER_FLAGS = {
    MS_RDONLY: "ro",
    MS_SYNCHRONOUS: "sync",
    MS_DIRSYNC: "dirsync",
    MS_LAZYTIME: "lazytime",
    MS_MANDLOCK: "mand",
}


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def _call(what: str, path: str, number: int, *args: object) -> int:
    result = _syscall(number, *args)
    if result < 0:
        raise failure(what, path, ctypes.get_errno())
    return int(result)


def mount_attributes(flags: int) -> int:
    """The MOUNT_ATTR_* bits of mount(2)-style MS_* ``flags``."""
    return sum(attr for flag, attr in _ATTRS.items() if flags & flag)


def fd_path(fd: int) -> str:
    """The /proc/self/fd link of ``fd``: where the kernel says it is, for messages."""
    return readlink_or(f"/proc/self/fd/{fd}", f"fd {fd}")


def mount_id(fd: int) -> int:
    """The id of the mount ``fd`` lies on (its fdinfo's mnt_id, the first field of mountinfo)."""
    with open(f"/proc/self/fdinfo/{fd}") as file:
        for line in file:
            if line.startswith("mnt_id:"):
                return int(line.split()[1])
    raise MountError(f"fd {fd}: no mnt_id in its fdinfo", path=fd_path(fd), errno=errno_module.EIO)


def new_mount(source: str, fstype: str, flags: int = 0, data: str = "", *, at: str = "") -> int:
    """A detached mount of a new ``fstype`` filesystem (fsopen, fsconfig, fsmount); its fd.

    ``flags`` are mount(2)'s MS_*, ``data`` its comma-separated options:
    each ``key=value`` and each bare ``key`` is given to fsconfig(2).
    ``at``, where it is going to be attached, is for messages.
    """
    what = f"mount -t {fstype} {source} {at}".rstrip()
    path = at or source
    with closing(_call(what, path, _SYS_FSOPEN, os.fsencode(fstype), FSOPEN_CLOEXEC)) as fs:
        settings = [("source", source)] + [
            (key, value if sep else None) for key, sep, value in (w.partition("=") for w in data.split(",") if w)
        ]
        settings += [(key, None) for flag, key in _SUPER_FLAGS.items() if flags & flag]
        for key, value in settings:
            option, command = (key, FSCONFIG_SET_FLAG) if value is None else (f"{key}={value}", FSCONFIG_SET_STRING)
            _call(f"{what}: option {option}", path, _SYS_FSCONFIG, fs, command, key.encode(), _b(value), 0)
        _call(what, path, _SYS_FSCONFIG, fs, FSCONFIG_CMD_CREATE, None, None, 0)
        return _call(what, path, _SYS_FSMOUNT, fs, FSMOUNT_CLOEXEC, mount_attributes(flags))


def clone_tree(source_fd: int, *, recursive: bool = False) -> int:
    """A detached bind of what ``source_fd`` names (open_tree OPEN_TREE_CLONE); its fd."""
    flags = OPEN_TREE_CLONE | os.O_CLOEXEC | AT_EMPTY_PATH | (AT_RECURSIVE if recursive else 0)
    path = fd_path(source_fd)
    return _call(f"mount --{'r' if recursive else ''}bind {path}", path, _SYS_OPEN_TREE, source_fd, b"", flags)


def set_attributes(mount_fd: int, attributes: int, *, recursive: bool = False) -> None:
    """mount_setattr(2): set MOUNT_ATTR_* on the mount ``mount_fd`` (and below it if ``recursive``)."""
    attr = _MountAttr(attributes, 0, 0, 0)
    flags = AT_EMPTY_PATH | (AT_RECURSIVE if recursive else 0)
    path = fd_path(mount_fd)
    what = f"mount -o remount,bind{' -R' if recursive else ''} {path}"
    _call(what, path, _SYS_MOUNT_SETATTR, mount_fd, b"", flags, ctypes.byref(attr), ctypes.sizeof(attr))


def attach(mount_fd: int, target_fd: int, shown: str) -> None:
    """move_mount(2) the detached mount ``mount_fd`` onto the directory or file ``target_fd``."""
    flags = MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH
    _call(f"move_mount onto {shown}", shown, _SYS_MOVE_MOUNT, mount_fd, b"", target_fd, b"", flags)


def umount_at(parent_fd: int, name: str, shown: str, flags: int = 0) -> None:
    """umount2(2) of the mount on ``name`` in the directory ``parent_fd``, never following a symlink there.

    The directory is reached through its /proc/self/fd magic link, which
    names the very directory the caller opened (no path resolved again),
    and only the last component is looked up, with UMOUNT_NOFOLLOW.  An fd
    of the mount itself would not do: it keeps the mount busy.
    """
    umount(shown, flags, name=f"/proc/self/fd/{parent_fd}/{name}")
