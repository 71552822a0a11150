"""Watching an exported tree with inotify(7), so clients may cache and be told of host changes.

`TreeWatch` watches every directory of a tree (and each new one) and turns
its events into `offload.protocol.qtfs.Invalidate` messages with paths
relative to the tree's root; the server reads it when its fd is readable
and before every batch of replies.  What inotify does not see is in
README.md ("qtfs", Caching); filesystems that change without events
(/proc, /sys, NFS, FUSE) fail `watchable` and are served uncached.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import struct
import time

from offload.fdinfo import closing
from offload.protocol import qtfs as wire
from offload.qtfs.inodes import join
from offload.resolve import fs_type, libc, libc_error

log = logging.getLogger(__name__)

IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
IN_ISDIR = 0x40000000

_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (native: the kernel's struct inotify_event)
_ENTRY_EVENTS = IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO
_SELF_EVENTS = IN_DELETE_SELF | IN_MOVE_SELF
MASK = IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | _ENTRY_EVENTS | _SELF_EVENTS | IN_ONLYDIR | IN_DONT_FOLLOW

# statfs(2) f_type of filesystems whose changes all pass through the local
# kernel's VFS (inotify sees them).  Anything else (procfs, sysfs, cgroupfs,
# NFS, FUSE...) is served uncached.
LOCAL_FILESYSTEMS = frozenset(
    {
        0xEF53,  # ext2/3/4
        0x58465342,  # xfs
        0x9123683E,  # btrfs
        0x01021994,  # tmpfs
        0x794C7630,  # overlayfs
        0xF2F52010,  # f2fs
        0x858458F6,  # ramfs
    }
)

libc.inotify_init1.argtypes = [ctypes.c_int]
libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]


def watchable(fd: int) -> bool:
    """Does inotify see every change to the tree at ``fd``?"""
    try:
        return fs_type(fd) in LOCAL_FILESYSTEMS
    except OSError:
        return False


def _change(change: wire.Change, path: bytes) -> wire.Invalidate:
    try:
        return wire.Invalidate(change, path)
    except ValueError:
        # A path the protocol cannot carry (longer than MAX_PATH): say "everything".
        return wire.Invalidate(wire.Change.ALL)


#: How long adding the watches of a mounted tree may take (well within the client's wait for its Mount).
WATCH_SECONDS = 2.0


class TreeWatch:
    """inotify watches on every directory below ``root`` (a host path); events as Invalidate messages."""

    def __init__(self, root: bytes) -> None:
        self.root = root
        self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)  # IN_NONBLOCK, IN_CLOEXEC
        if self.fd < 0:
            raise libc_error("inotify_init1")
        self._paths: dict[int, bytes] = {}  # wd -> directory relative to root
        self._wds: dict[bytes, int] = {}
        self._devices: set[int] = set()  # filesystems found watchable
        #: A watch could not be added (the limit, fs.inotify.max_user_watches): the tree is no longer covered.
        self.complete = True
        try:
            self._add_tree(b"")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __len__(self) -> int:
        return len(self._paths)

    def _add_tree(self, top: bytes) -> None:
        """Watch ``top`` and the directories below it (watch first, then list: nothing created between is missed)."""
        pending = [top]
        deadline = time.monotonic() + WATCH_SECONDS
        while pending:
            if time.monotonic() > deadline:
                # The client waits for the Mount's answer (qtfs.client's
                # CONNECT_TIMEOUT): a tree too big to watch by then is served
                # without the coherent cache rather than not at all.
                return self._incomplete(self.root, f"has too many directories to watch within {WATCH_SECONDS:.0f} s")
            relative = pending.pop()
            host = join(self.root, relative) if relative else self.root
            wd = libc.inotify_add_watch(self.fd, host, MASK)
            if wd < 0:
                number = ctypes.get_errno()
                if number in (errno.ENOENT, errno.ENOTDIR):
                    continue  # gone again, or replaced by a file: its own events say so
                if not relative:
                    raise libc_error(f"inotify_add_watch {os.fsdecode(host)}")
                return self._incomplete(host, f"cannot be watched: {os.strerror(number)}")
            old = self._paths.get(wd)
            if old is not None and self._wds.get(old) == wd:
                del self._wds[old]
            self._paths[wd] = relative
            self._wds[relative] = wd
            try:
                if not self._same_kind(host):
                    return self._incomplete(host, "is on a filesystem inotify cannot watch")
                with os.scandir(host) as entries:
                    for entry in entries:
                        if entry.is_dir(follow_symlinks=False):
                            pending.append(join(relative, os.fsencode(entry.name)))
            except (FileNotFoundError, NotADirectoryError):
                continue

    def _incomplete(self, host: bytes, why: str) -> None:
        log.warning("%s %s; clients stop caching", os.fsdecode(host), why)
        self.complete = False

    def _same_kind(self, host: bytes) -> bool:
        """Is the directory ``host`` on a filesystem inotify can watch?  (Something may be mounted in the tree.)"""
        with closing(os.open(host, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)) as fd:
            device = os.fstat(fd).st_dev
            if device in self._devices:
                return True
            if not watchable(fd):
                return False
            self._devices.add(device)
            return True

    def _drop_tree(self, top: bytes) -> None:
        """Stop watching ``top`` and below (moved out of its place: re-added where it went, if in the tree)."""
        prefix = top + b"/"
        for relative in [p for p in self._wds if p == top or p.startswith(prefix)]:
            wd = self._wds.pop(relative)
            self._paths.pop(wd, None)
            libc.inotify_rm_watch(self.fd, wd)  # its IN_IGNORED finds no path: ignored

    def read(self) -> list[wire.Invalidate]:
        """What changed since the last call, in order and without repeats; [] when nothing did."""
        out: list[wire.Invalidate] = []
        while True:
            try:
                data = os.read(self.fd, 64 * 1024)
            except BlockingIOError:
                break
            if not data:
                break
            self._parse(data, out)
        return list(dict.fromkeys(out))

    def _parse(self, data: bytes, out: list[wire.Invalidate]) -> None:
        at = 0
        while at + _EVENT.size <= len(data):
            wd, mask, _cookie, length = _EVENT.unpack_from(data, at)
            at += _EVENT.size
            name = data[at : at + length].rstrip(b"\0")
            at += length
            if mask & IN_Q_OVERFLOW:
                log.warning("inotify queue overflowed under %s: clients drop their caches", os.fsdecode(self.root))
                out.append(wire.Invalidate(wire.Change.ALL))
                continue
            directory = self._paths.get(wd)
            if directory is None:
                continue
            if mask & IN_IGNORED:
                self._paths.pop(wd, None)
                if self._wds.get(directory) == wd:
                    del self._wds[directory]
                continue
            if not name:
                # An event on a watched directory itself.
                if mask & _SELF_EVENTS and not directory:
                    out.append(wire.Invalidate(wire.Change.ALL))  # the root went: everything is stale
                elif mask & IN_ATTRIB:
                    out.append(_change(wire.Change.ATTR, directory))
                continue
            path = join(directory, name)
            if mask & _ENTRY_EVENTS:
                out.append(_change(wire.Change.ENTRY, path))
                if mask & IN_ISDIR:
                    if mask & (IN_MOVED_FROM | IN_DELETE):
                        self._drop_tree(path)
                    if mask & (IN_CREATE | IN_MOVED_TO):
                        self._add_tree(path)
                        # Entries made in it before its watch was in place were reported by no one.
                        out.append(_change(wire.Change.ENTRY, path))
                        if not self.complete:
                            out.append(wire.Invalidate(wire.Change.UNWATCHED))
            elif mask & (IN_MODIFY | IN_CLOSE_WRITE):
                out.append(_change(wire.Change.DATA, path))
            elif mask & IN_ATTRIB:
                out.append(_change(wire.Change.ATTR, path))
