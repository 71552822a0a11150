"""The server's file operations for one mounted connection: requests in, replies out, no I/O loop.

Every operation resolves its path below the connection's mount root with
`offload.qtfs.resolve` (never leaving the export), is checked against the
whitelist on the host path it touches, and raises OSError whose errno the
server sends back by name.  A refusal by policy is EACCES (as the
reference's); a write to a read-only export is EROFS.

The process runs as root with umask 0 (the client's kernel has applied the
caller's umask already); new files are given to the calling DPU user (uid
and gid from the FUSE request), except that a setgid directory's group wins,
as the kernel does it locally.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import itertools
import logging
import os
import random
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from offload.protocol import qtfs as wire
from offload.qtfs import facts
from offload.qtfs.resolve import open_parent, open_path, openat2
from offload.qtfs.whitelist import Whitelist

log = logging.getLogger(__name__)

#: A directory page stays well under the frame limit.
DIR_PAGE = 256 * 1024
#: Flags a client may pass to open(2); anything else is dropped.
OPEN_FLAGS = (
    os.O_ACCMODE | os.O_APPEND | os.O_TRUNC | os.O_SYNC | os.O_DSYNC | os.O_NOATIME | os.O_DIRECT | os.O_NONBLOCK
)
_libc = ctypes.CDLL(None, use_errno=True)


def _refused(what: str, path: bytes) -> PermissionError:
    log.warning("refused %s of %s: not allowed by the whitelist", what, os.fsdecode(path))
    return PermissionError(errno.EACCES, f"{what} not allowed", os.fsdecode(path))


@dataclass(frozen=True)
class Export:
    path: bytes  # absolute, no trailing slash (b"/" for the root)
    readonly: bool = False

    @classmethod
    def parse(cls, text: str) -> Export:
        """``PATH`` or ``PATH:ro`` / ``PATH:rw`` as ``--export`` takes it."""
        path, _, mode = text.partition(":") if text.endswith((":ro", ":rw")) else (text, "", "")
        if not path.startswith("/") or ".." in path.split("/"):
            raise ValueError(f"export {text!r}: expected an absolute path without '..' (PATH or PATH:ro)")
        return cls(os.fsencode(path.rstrip("/") or "/"), mode == "ro")

    def covers(self, path: bytes) -> bool:
        return self.path == b"/" or path == self.path or path.startswith(self.path + b"/")


class Handles:
    """Open fds of one connection by number.  Numbers start at a random point, so a
    number from an earlier connection or server never names a file here by chance."""

    def __init__(self) -> None:
        self._fds: dict[int, int] = {}
        self._next = itertools.count(random.getrandbits(40) + 1)

    def add(self, fd: int) -> int:
        handle = next(self._next)
        self._fds[handle] = fd
        return handle

    def get(self, handle: int) -> int:
        try:
            return self._fds[handle]
        except KeyError:
            raise OSError(errno.EBADF, "no such handle") from None

    def close(self, handle: int) -> None:
        fd = self._fds.pop(handle, None)
        if fd is None:
            raise OSError(errno.EBADF, "no such handle")
        os.close(fd)

    def close_all(self) -> None:
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()

    def __len__(self) -> int:
        return len(self._fds)


class Backend:
    """One connection's view: its mount root, its open files and directory listings."""

    def __init__(self, exports: tuple[Export, ...], whitelist: Whitelist) -> None:
        self.exports = exports
        self.whitelist = whitelist
        self.root = -1
        self.base = b""
        self.readonly = True
        self.hide_processes = False
        self.files = Handles()
        self._dirs: dict[int, tuple[list[bytes], int]] = {}  # handle -> (encoded entries, next index)
        self._dir_numbers = itertools.count(random.getrandbits(40) + 1)

    def close(self) -> None:
        self.files.close_all()
        self._dirs.clear()
        if self.root >= 0:
            os.close(self.root)
            self.root = -1

    # -- helpers ------------------------------------------------------------------------

    def host_path(self, path: bytes) -> bytes:
        if not path:
            return self.base
        return (self.base if self.base != b"/" else b"") + b"/" + path

    def _check(self, section: str, path: bytes) -> None:
        if not self.whitelist.allows(section, self.host_path(path)):
            raise _refused(section, self.host_path(path))

    def _writable(self, section: str, path: bytes) -> None:
        if self.readonly:
            raise OSError(errno.EROFS, "read-only export", os.fsdecode(self.host_path(path)))
        self._check(section, path)

    def _visible(self, path: bytes) -> None:
        # Per-process entries of the host's /proc are not served: the DPU keeps its own.
        if self.hide_processes and facts.is_per_process(path.partition(b"/")[0]):
            raise FileNotFoundError(errno.ENOENT, "per-process entries are not served")

    def _lstat(self, path: bytes) -> os.stat_result:
        if self.root < 0:
            raise OSError(errno.EPROTO, "not mounted")
        self._visible(path)
        if not path:
            return os.stat(self.root)
        parent, name = open_parent(self.root, path)
        try:
            return os.stat(name, dir_fd=parent, follow_symlinks=False)
        finally:
            if parent != self.root:
                os.close(parent)

    def _in_parent(self, path: bytes, action):
        """``action(parent_fd, name)`` on the directory holding ``path``."""
        if not path:
            raise OSError(errno.EBUSY, "the mount root itself")
        self._visible(path)
        parent, name = open_parent(self.root, path)
        try:
            return action(parent, name)
        finally:
            if parent != self.root:
                os.close(parent)

    def _give(self, parent: int, name: bytes, uid: int, gid: int) -> None:
        """Hand a new entry to the calling user; a setgid parent's group wins."""
        if os.stat(parent).st_mode & stat.S_ISGID:
            gid = -1
        if uid or gid:
            os.chown(name, uid, gid, dir_fd=parent, follow_symlinks=False)

    # -- operations ------------------------------------------------------------------------

    def mount(self, request: wire.Mount) -> wire.MountReply:
        path = request.path.rstrip(b"/") or b"/"
        export = max((e for e in self.exports if e.covers(path)), key=lambda e: len(e.path), default=None)
        if export is None:
            log.warning("refused a mount of %s: not exported", os.fsdecode(path))
            raise PermissionError(errno.EACCES, "not exported", os.fsdecode(path))
        if not self.whitelist.allows("Mount", path):
            raise _refused("Mount", path)
        export_fd = os.open(export.path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            rest = path[len(export.path) :].lstrip(b"/")
            root = openat2(export_fd, rest, os.O_PATH | os.O_DIRECTORY) if rest else os.dup(export_fd)
        finally:
            os.close(export_fd)
        if self.root >= 0:
            os.close(self.root)
        self.root, self.base, self.readonly = root, path, export.readonly
        self.hide_processes = _is_procfs(root)
        return wire.MountReply(wire.pack_stat(os.stat(root)), wire.MOUNT_READONLY if export.readonly else 0)

    def lookup(self, request: wire.Lookup | wire.Getattr) -> wire.AttrReply:
        if isinstance(request, wire.Getattr) and request.handle:
            return wire.AttrReply(wire.pack_stat(os.fstat(self.files.get(request.handle))))
        return wire.AttrReply(wire.pack_stat(self._lstat(request.path)))

    def setattr(self, request: wire.Setattr) -> wire.AttrReply:
        self._writable("Setattr", request.path)
        self._visible(request.path)
        valid = request.valid
        if request.handle:
            fd = self.files.get(request.handle)
            self._set_on_fd(fd, request, valid)
            return wire.AttrReply(wire.pack_stat(os.fstat(fd)))
        target = open_path(self.root, request.path)
        try:
            self._set_on_fd(target, request, valid, by_path=True)
            return wire.AttrReply(wire.pack_stat(os.stat(target)))
        finally:
            os.close(target)

    def _set_on_fd(self, fd: int, request: wire.Setattr, valid: int, by_path: bool = False) -> None:
        # An O_PATH fd allows no fchmod or ftruncate; its /proc/self/fd magic link
        # resolves to exactly the inode it was opened on (a symlink stays that
        # symlink, never its target), so operating through it is race-free.
        where: int | str = f"/proc/self/fd/{fd}" if by_path else fd
        st = os.stat(fd)
        if valid & wire.SET_MODE:
            if stat.S_ISLNK(st.st_mode):
                raise OSError(errno.EOPNOTSUPP, "symlinks have no mode")
            os.chmod(where, stat.S_IMODE(request.mode))
        if valid & (wire.SET_UID | wire.SET_GID):
            uid = request.uid if valid & wire.SET_UID else -1
            gid = request.gid if valid & wire.SET_GID else -1
            os.chown(where, uid, gid)
        if valid & wire.SET_SIZE:
            os.truncate(where, request.size)
        if valid & (wire.SET_ATIME | wire.SET_MTIME | wire.SET_ATIME_NOW | wire.SET_MTIME_NOW):
            now = time.time_ns()
            atime = (
                now if valid & wire.SET_ATIME_NOW else request.atime_ns if valid & wire.SET_ATIME else st.st_atime_ns
            )
            mtime = (
                now if valid & wire.SET_MTIME_NOW else request.mtime_ns if valid & wire.SET_MTIME else st.st_mtime_ns
            )
            os.utime(where, ns=(atime, mtime))

    def readlink(self, request: wire.Readlink) -> wire.DataReply:
        return wire.DataReply(self._in_parent(request.path, lambda parent, name: os.readlink(name, dir_fd=parent)))

    def open(self, request: wire.Open) -> wire.HandleReply:
        flags = request.flags & OPEN_FLAGS
        access = flags & os.O_ACCMODE
        writes = access != os.O_RDONLY or flags & os.O_TRUNC
        self._visible(request.path)
        self._check("Open", request.path)
        if writes:
            self._writable("Write", request.path)
        if access != os.O_WRONLY:
            self._check("Read", request.path)
        # O_NONBLOCK: a FIFO named by a client must never block the server;
        # it changes nothing for regular files.
        fd = openat2(self.root, request.path or b".", flags | os.O_NOFOLLOW | os.O_NONBLOCK)
        return wire.HandleReply(self.files.add(fd), b"")

    def create(self, request: wire.Create) -> wire.HandleReply:
        self._writable("Create", request.path)
        flags = (request.flags & OPEN_FLAGS) | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        if request.flags & os.O_EXCL:
            flags |= os.O_EXCL

        def create(parent: int, name: bytes) -> int:
            fd = os.open(name, flags, stat.S_IMODE(request.mode), dir_fd=parent)
            try:
                self._give(parent, name, request.uid, request.gid)
            except BaseException:
                os.close(fd)
                raise
            return fd

        fd = self._in_parent(request.path, create)
        return wire.HandleReply(self.files.add(fd), wire.pack_stat(os.fstat(fd)))

    def read(self, request: wire.Read) -> wire.DataReply:
        return wire.DataReply(os.pread(self.files.get(request.handle), request.size, request.offset))

    def write(self, request: wire.Write) -> wire.CountReply:
        return wire.CountReply(os.pwrite(self.files.get(request.handle), request.data, request.offset))

    def release(self, request: wire.Release) -> wire.Empty:
        self.files.close(request.handle)
        return wire.Empty()

    def fsync(self, request: wire.Fsync) -> wire.Empty:
        fd = self.files.get(request.handle)
        (os.fdatasync if request.datasync else os.fsync)(fd)
        return wire.Empty()

    def _made(self, path: bytes) -> wire.AttrReply:
        return wire.AttrReply(wire.pack_stat(self._lstat(path)))

    def mkdir(self, request: wire.Mkdir) -> wire.AttrReply:
        self._writable("Mkdir", request.path)

        def make(parent: int, name: bytes) -> None:
            os.mkdir(name, stat.S_IMODE(request.mode), dir_fd=parent)
            self._give(parent, name, request.uid, request.gid)

        self._in_parent(request.path, make)
        return self._made(request.path)

    def mknod(self, request: wire.Mknod) -> wire.AttrReply:
        self._writable("Create", request.path)
        kind = stat.S_IFMT(request.mode)
        # Sockets and FIFOs (libvirt binds its monitor sockets here) and plain
        # files; device nodes made from the DPU would open host devices.
        if kind not in (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK):
            raise PermissionError(errno.EPERM, "device nodes are not made through qtfs")

        def make(parent: int, name: bytes) -> None:
            os.mknod(name, kind | stat.S_IMODE(request.mode), 0, dir_fd=parent)
            self._give(parent, name, request.uid, request.gid)

        self._in_parent(request.path, make)
        return self._made(request.path)

    def symlink(self, request: wire.Symlink) -> wire.AttrReply:
        self._writable("Create", request.path)

        def make(parent: int, name: bytes) -> None:
            os.symlink(request.target, name, dir_fd=parent)
            self._give(parent, name, request.uid, request.gid)

        self._in_parent(request.path, make)
        return self._made(request.path)

    def link(self, request: wire.Link) -> wire.AttrReply:
        self._writable("Create", request.path)
        self._visible(request.source)
        source_dir, source_name = open_parent(self.root, request.source)
        try:
            self._in_parent(
                request.path,
                lambda parent, name: os.link(
                    source_name, name, src_dir_fd=source_dir, dst_dir_fd=parent, follow_symlinks=False
                ),
            )
        finally:
            if source_dir != self.root:
                os.close(source_dir)
        return self._made(request.path)

    def unlink(self, request: wire.Unlink) -> wire.Empty:
        self._writable("Unlink", request.path)
        self._in_parent(request.path, lambda parent, name: os.unlink(name, dir_fd=parent))
        return wire.Empty()

    def rmdir(self, request: wire.Rmdir) -> wire.Empty:
        self._writable("Rmdir", request.path)
        self._in_parent(request.path, lambda parent, name: os.rmdir(name, dir_fd=parent))
        return wire.Empty()

    def rename(self, request: wire.Rename) -> wire.Empty:
        self._writable("Rename", request.old)
        self._check("Rename", request.new)
        self._visible(request.new)
        old_dir, old_name = open_parent(self.root, request.old)
        try:

            def move(parent: int, name: bytes) -> None:
                if request.flags:
                    _renameat2(old_dir, old_name, parent, name, request.flags)
                else:
                    os.rename(old_name, name, src_dir_fd=old_dir, dst_dir_fd=parent)

            self._in_parent(request.new, move)
        finally:
            if old_dir != self.root:
                os.close(old_dir)
        return wire.Empty()

    def opendir(self, request: wire.Opendir) -> wire.DirReply:
        self._visible(request.path)
        self._check("Readdir", request.path)
        fd = openat2(self.root, request.path or b".", os.O_RDONLY | os.O_DIRECTORY)
        hide = self.hide_processes and not request.path
        entries = []
        try:
            with os.scandir(fd) as listing:
                for entry in listing:
                    name = os.fsencode(entry.name)
                    if hide and facts.is_per_process(name):
                        continue
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue  # removed while we listed
                    entries.append(wire.encode_entry(name, wire.pack_stat(st)))
        finally:
            os.close(fd)
        return self._page(0, entries, 0)

    def _page(self, handle: int, entries: list[bytes], start: int) -> wire.DirReply:
        size = 0
        end = start
        while end < len(entries) and size < DIR_PAGE:
            size += len(entries[end])
            end += 1
        page = b"".join(entries[start:end])
        if end >= len(entries):
            if handle:
                self._dirs.pop(handle, None)
            return wire.DirReply(0, 1, page)
        if not handle:
            handle = next(self._dir_numbers)
        self._dirs[handle] = (entries, end)
        return wire.DirReply(handle, 0, page)

    def readdir(self, request: wire.Readdir) -> wire.DirReply:
        try:
            entries, _ = self._dirs[request.handle]
        except KeyError:
            raise OSError(errno.EBADF, "no such directory handle") from None
        return self._page(request.handle, entries, request.index)

    def releasedir(self, request: wire.Releasedir) -> wire.Empty:
        self._dirs.pop(request.handle, None)
        return wire.Empty()

    def statfs(self, request: wire.Statfs) -> wire.StatfsReply:
        self._visible(request.path)
        fd = open_path(self.root, request.path)
        try:
            st = os.statvfs(fd)
        finally:
            os.close(fd)
        return wire.StatfsReply(
            st.f_bsize, st.f_frsize, st.f_blocks, st.f_bfree, st.f_bavail, st.f_files, st.f_ffree, st.f_namemax
        )

    def _xattr_path(self, path: bytes, action):
        # The parent through its /proc/self/fd link, the entry itself not followed.
        if not path:
            return action(f"/proc/self/fd/{self.root}")
        return self._in_parent(path, lambda parent, name: action(f"/proc/self/fd/{parent}/{os.fsdecode(name)}"))

    def getxattr(self, request: wire.Getxattr) -> wire.DataReply:
        name = os.fsdecode(request.name)
        value = self._xattr_path(request.path, lambda where: os.getxattr(where, name, follow_symlinks=False))
        return wire.DataReply(value)

    def listxattr(self, request: wire.Listxattr) -> wire.DataReply:
        names = self._xattr_path(request.path, lambda where: os.listxattr(where, follow_symlinks=False))
        return wire.DataReply(b"".join(os.fsencode(n) + b"\0" for n in names))

    def setxattr(self, request: wire.Setxattr) -> wire.Empty:
        self._writable("Setxattr", request.path)
        name = os.fsdecode(request.name)
        self._xattr_path(
            request.path,
            lambda where: os.setxattr(where, name, request.value, request.flags, follow_symlinks=False),
        )
        return wire.Empty()

    def removexattr(self, request: wire.Removexattr) -> wire.Empty:
        self._writable("Setxattr", request.path)
        name = os.fsdecode(request.name)
        self._xattr_path(request.path, lambda where: os.removexattr(where, name, follow_symlinks=False))
        return wire.Empty()

    def handlers(self) -> dict[wire.Op, Callable[[Any], wire.Message]]:
        """The operation for each op (the server looks them up once per connection)."""
        return {
            wire.Op.MOUNT: self.mount,
            wire.Op.LOOKUP: self.lookup,
            wire.Op.GETATTR: self.lookup,
            wire.Op.SETATTR: self.setattr,
            wire.Op.READLINK: self.readlink,
            wire.Op.OPEN: self.open,
            wire.Op.CREATE: self.create,
            wire.Op.READ: self.read,
            wire.Op.WRITE: self.write,
            wire.Op.RELEASE: self.release,
            wire.Op.FSYNC: self.fsync,
            wire.Op.MKDIR: self.mkdir,
            wire.Op.MKNOD: self.mknod,
            wire.Op.SYMLINK: self.symlink,
            wire.Op.LINK: self.link,
            wire.Op.UNLINK: self.unlink,
            wire.Op.RMDIR: self.rmdir,
            wire.Op.RENAME: self.rename,
            wire.Op.OPENDIR: self.opendir,
            wire.Op.READDIR: self.readdir,
            wire.Op.RELEASEDIR: self.releasedir,
            wire.Op.STATFS: self.statfs,
            wire.Op.GETXATTR: self.getxattr,
            wire.Op.SETXATTR: self.setxattr,
            wire.Op.LISTXATTR: self.listxattr,
            wire.Op.REMOVEXATTR: self.removexattr,
        }


def _is_procfs(fd: int) -> bool:
    # statvfs has no f_type; procfs is recognisable by its entry "self", a
    # symlink to the reader's pid.
    try:
        return os.readlink("self", dir_fd=fd).isdigit()
    except OSError:
        return False


def _renameat2(old_dir: int, old: bytes, new_dir: int, new: bytes, flags: int) -> None:
    if _libc.renameat2(old_dir, old, new_dir, new, ctypes.c_uint(flags)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
