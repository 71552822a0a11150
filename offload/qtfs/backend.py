"""The server's file operations for one mounted connection: requests in, replies out, no I/O loop.

Every path resolves below the mount root (`offload.resolve`), and the
policy judges where it really leads: the directory holding the entry is
opened first, the kernel's path of it is what the whitelist and the facts
allowlist see, and the operation then acts on the entry in that very
directory, so check and use meet the same object.  Refusals raise OSError:
EACCES for the whitelist, ENOENT for what a facts export does not serve,
EROFS for a write to a read-only export (README.md, "qtfs", Security).

The process runs with umask 0 (the client's kernel applied the caller's
umask already); new files are given to the calling DPU user, except that a
setgid directory's group wins, as the kernel does it locally.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import random
import re
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from typing import Any

from offload.fdinfo import closed_on_error, closing
from offload.prefix import is_under
from offload.protocol import qtfs as wire
from offload.qtfs import facts
from offload.qtfs.inodes import join
from offload.qtfs.programs import Programs
from offload.qtfs.tasks import TASK_FILES, process_of, task_id
from offload.qtfs.whitelist import Whitelist
from offload.resolve import PROC_SUPER_MAGIC, SYSFS_MAGIC, fs_type, open_parent, openat2, real_path, renameat2

log = logging.getLogger(__name__)

#: A directory page stays well under the frame limit.
DIR_PAGE = 256 * 1024
#: Flags a client may pass to open(2); anything else is dropped.
OPEN_FLAGS = (
    os.O_ACCMODE | os.O_APPEND | os.O_TRUNC | os.O_SYNC | os.O_DSYNC | os.O_NOATIME | os.O_DIRECT | os.O_NONBLOCK
)
#: Added to every open: a FIFO (or a device) named by a peer must never block the server,
#: nor a terminal become its controlling one.  Neither changes anything for a regular file.
OPEN_ALWAYS = os.O_NONBLOCK | os.O_NOCTTY | os.O_NOFOLLOW | os.O_CLOEXEC
#: Open files one connection may hold (a peer that never releases them runs into EMFILE, not the host's limits).
MAX_HANDLES = 4096
#: Bytes of directory listings one connection may hold between OPENDIR and its last READDIR.
MAX_LISTING_BYTES = 32 << 20
#: nobody/nogroup: who uid and gid 0 of a request become under root squash.
SQUASHED = 65534
#: Mode bits a peer never sets: they would run the peer's programs with the host owner's privileges.
PRIVILEGE_BITS = stat.S_ISUID | stat.S_ISGID
#: Extended attribute namespaces a peer never writes: file capabilities, security labels, trusted data.
PRIVILEGED_XATTRS = (b"security.", b"trusted.")
#: Filesystems whose content is served only through a facts export's allowlist.
FACT_FILESYSTEMS = {PROC_SUPER_MAGIC: facts.PROC_SERVED, SYSFS_MAGIC: facts.SYS_SERVED}
#: cgroup v1 and v2: served only by a cgroup export, where placing a task is checked.
CGROUP_FILESYSTEMS = frozenset({0x27E0EB, 0x63677270})
#: Below /proc/PID of a program the DPU started, what its statistics and affinity are read from.
PROGRAM_ENTRIES = re.compile(rb"[0-9]+(/(stat|status|cgroup|task(/[0-9]+(/(stat|status))?)?))?")
#: The inode number of a procfs or sysfs root (PROC_ROOT_INO; kernfs numbers its root 1 too).
FS_ROOT_INO = 1


def _refused(path: bytes, why: str, what: str = "a mount") -> PermissionError:
    log.warning("refused %s of %s: %s", what, os.fsdecode(path), why)
    return PermissionError(errno.EACCES, why, os.fsdecode(path))


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


class Handles:
    """Open fds of one connection by number.  Numbers start at a random point, so a
    number from an earlier connection or server never names a file here by chance."""

    def __init__(self, limit: int = MAX_HANDLES) -> None:
        self._fds: dict[int, int] = {}
        self._next = itertools.count(random.getrandbits(40) + 1)
        self.limit = limit

    def add(self, fd: int) -> int:
        """A number for ``fd``; EMFILE (and ``fd`` closed) when the connection holds its limit."""
        if len(self._fds) >= self.limit:
            os.close(fd)
            raise OSError(errno.EMFILE, "too many open files on this connection")
        handle = next(self._next)
        self._fds[handle] = fd
        return handle

    def get(self, handle: int) -> int:
        try:
            return self._fds[handle]
        except KeyError:
            raise OSError(errno.EBADF, "no such handle") from None

    def close(self, handle: int) -> None:
        fd = self.get(handle)
        del self._fds[handle]
        os.close(fd)

    def close_all(self) -> None:
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()


class Backend:
    """One connection's view: its mount root, its open files and directory listings."""

    def __init__(
        self,
        exports: tuple[Export, ...],
        whitelist: Whitelist,
        root_squash: bool = True,
        programs: Programs | None = None,
    ) -> None:
        self.exports = exports
        self.whitelist = whitelist
        self.root_squash = root_squash
        #: The host processes the DPU may place in cgroups and read /proc/PID of; None: none.
        self.programs = programs
        #: The mount root is a cgroup directory: task placement is checked (`_place`).
        self.cgroup = False
        #: Handles of open tasks / cgroup.procs files -> (file name, fd of the directory's cgroup.procs).
        self._task_files: dict[int, tuple[bytes, int]] = {}
        self.root = -1
        self.base = b""
        self._root_real = b""  # the kernel's path of the mount root, what resolved paths begin with
        self.readonly = True
        #: The allowlist of a facts mount (its root is a procfs or sysfs root), None for any other.
        self.facts: tuple[bytes, ...] | None = None
        self.files = Handles()
        self._dirs: dict[int, tuple[list[bytes], int]] = {}  # handle -> (encoded entries, their bytes)
        self._listing_bytes = 0
        self._dir_numbers = itertools.count(random.getrandbits(40) + 1)

    def close(self) -> None:
        for _, procs in self._task_files.values():
            os.close(procs)
        self._task_files.clear()
        self.files.close_all()
        self._dirs.clear()
        self._listing_bytes = 0
        if self.root >= 0:
            os.close(self.root)
            self.root = -1

    # -- helpers ------------------------------------------------------------------------

    def host_path(self, path: bytes) -> bytes:
        if not path:
            return self.base
        return (self.base if self.base != b"/" else b"") + b"/" + path

    def _writable(self, path: bytes) -> None:
        if self.readonly:
            raise OSError(errno.EROFS, "read-only export", os.fsdecode(self.host_path(path)))

    @property
    def _judged(self) -> bool:
        """Some policy looks at paths: without one, resolving them for it would be wasted work."""
        return self.whitelist.enforced or self.facts is not None

    def _relative(self, real: bytes, path: bytes) -> bytes:
        """``real`` (a kernel path) relative to the mount root; EACCES if it lies elsewhere now."""
        if real == self._root_real:
            return b""
        prefix = self._root_real.rstrip(b"/") + b"/"
        if not real.startswith(prefix):
            # Moved out of the export since it was opened (or deleted): judge nothing we cannot name.
            raise PermissionError(errno.EACCES, "no longer inside the export", os.fsdecode(path))
        return real[len(prefix) :]

    def _allow(self, where: bytes, sections: tuple[str, ...], path: bytes) -> None:
        """The policy's verdict on ``where`` (resolved, relative to the mount root) for ``sections``."""
        if self.facts is not None and not self._served(where):
            raise FileNotFoundError(errno.ENOENT, "not served by a facts export", os.fsdecode(path))
        for section in sections:
            host = self.host_path(where)
            if not self.whitelist.allows(section, host):
                raise _refused(host, "not allowed by the whitelist", section)

    def _served(self, where: bytes) -> bool:
        """``where`` (relative to a facts export's root) is served: an allowlisted fact, or, in a procfs,
        what libvirt reads of a program the DPU started (its stat, status and cgroup, its threads' stat and status)."""
        assert self.facts is not None
        if facts.allowed(self.facts, where):
            return True
        if self.facts is not facts.PROC_SERVED or self.programs is None or not PROGRAM_ENTRIES.fullmatch(where):
            return False
        return self.programs.started(int(where.split(b"/")[0]))

    def _no_facts_below(self, fd: int, path: bytes) -> None:
        """A procfs, sysfs or cgroupfs reached inside an ordinary export (one exporting "/", say) is not served."""
        kind = fs_type(fd)
        if self.facts is None and kind in FACT_FILESYSTEMS:
            raise PermissionError(errno.EACCES, "procfs and sysfs are served by facts exports only", os.fsdecode(path))
        if not self.cgroup and kind in CGROUP_FILESYSTEMS:
            raise PermissionError(errno.EACCES, "cgroups are served by cgroup exports only", os.fsdecode(path))

    @contextlib.contextmanager
    def _at(self, path: bytes, *sections: str) -> Iterator[tuple[int, bytes]]:
        """(directory fd, name) of ``path`` (the root is (root, b".")), once the policy allowed ``sections`` there.

        The caller acts on ``name`` in that very directory, not following it (see the module's docstring).
        """
        if self.root < 0:
            raise OSError(errno.EPROTO, "not mounted")
        if not path:
            self._allow(b"", sections, path)
            yield self.root, b"."
            return
        parent, name = open_parent(self.root, path)
        try:
            if parent != self.root:
                self._no_facts_below(parent, path)
            if self._judged:
                where = self._relative(real_path(parent), path) if parent != self.root else b""
                self._allow(join(where, name), sections, path)
            yield parent, name
        finally:
            if parent != self.root:
                os.close(parent)

    @contextlib.contextmanager
    def _opened(self, path: bytes, flags: int, *sections: str) -> Iterator[int]:
        """``path`` itself (never followed) opened with ``flags`` once the policy allowed ``sections``."""
        with self._at(path, *sections) as (parent, name):
            fd = os.open(name, flags | OPEN_ALWAYS, dir_fd=parent)
        with closing(fd):
            yield fd

    def _allow_handle(self, fd: int, section: str) -> None:
        """An operation by handle is judged by the handle's own file, where it is now."""
        if self._judged:
            real = real_path(fd)
            self._allow(self._relative(real, real), (section,), real)

    @contextlib.contextmanager
    def _in_parent(self, path: bytes, *sections: str) -> Iterator[tuple[int, bytes]]:
        """`_at` for an entry in a directory: EBUSY for the mount root, which is never made, removed or renamed."""
        if not path:
            raise OSError(errno.EBUSY, "the mount root itself")
        with self._at(path, *sections) as found:
            yield found

    def _stat(self, path: bytes) -> wire.AttrReply:
        """The attributes of ``path`` itself (a symlink is not followed)."""
        with self._at(path) as (parent, name):
            return wire.AttrReply(wire.pack_stat(os.stat(name, dir_fd=parent, follow_symlinks=False)))

    def _give(self, parent: int, name: bytes, uid: int, gid: int) -> None:
        """Hand a new entry to the calling user (root squashed to nobody/nogroup unless told otherwise);
        a setgid parent's group wins."""
        if self.root_squash:
            uid, gid = (SQUASHED if uid == 0 else uid), (SQUASHED if gid == 0 else gid)
        if os.stat(parent).st_mode & stat.S_ISGID:
            gid = -1
        if uid or gid:
            os.chown(name, uid, gid, dir_fd=parent, follow_symlinks=False)

    # -- operations ------------------------------------------------------------------------

    def mount(self, request: wire.Mount) -> wire.MountReply:
        path = request.path.rstrip(b"/") or b"/"
        export = max((e for e in self.exports if is_under(path, e.path)), key=lambda e: len(e.path), default=None)
        if export is None:
            raise _refused(path, "not exported")
        if not self.whitelist.allows("Mount", path):
            raise _refused(path, "not allowed by the whitelist", "Mount")
        with closing(os.open(export.path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)) as export_fd:
            rest = path[len(export.path) :].lstrip(b"/")
            if rest and _facts_of(export_fd) is not None:
                # Below its root, a procfs is the processes' own entries (/proc/1, /proc/self).
                raise _refused(path, "a facts export is mounted at its root only")
            root = openat2(export_fd, rest, os.O_PATH | os.O_DIRECTORY) if rest else os.dup(export_fd)
        with closed_on_error(root):
            served = _facts_of(root)
            if served is None and fs_type(root) in FACT_FILESYSTEMS:
                raise _refused(path, "procfs and sysfs are mounted at their roots only")
            root_real = real_path(root)
        if self.root >= 0:
            os.close(self.root)
        self.root, self.base, self._root_real = root, path, root_real
        self.facts = served
        self.cgroup = fs_type(root) in CGROUP_FILESYSTEMS
        # Facts are for reading: the host's kernel tunables are not the peer's to write.
        self.readonly = export.readonly or served is not None
        return wire.MountReply(wire.pack_stat(os.stat(root)), wire.MOUNT_READONLY if self.readonly else 0)

    def lookup(self, request: wire.Lookup) -> wire.AttrReply:
        return self._stat(request.path)

    def getattr(self, request: wire.Getattr) -> wire.AttrReply:
        if request.handle:
            return wire.AttrReply(wire.pack_stat(os.fstat(self.files.get(request.handle))))
        return self._stat(request.path)

    def setattr(self, request: wire.Setattr) -> wire.AttrReply:
        self._writable(request.path)
        if request.handle:
            fd = self.files.get(request.handle)
            self._allow_handle(fd, "Setattr")
            self._set_on_fd(fd, request)
            return wire.AttrReply(wire.pack_stat(os.fstat(fd)))
        with self._opened(request.path, os.O_PATH, "Setattr") as target:
            self._no_facts_below(target, request.path)
            self._set_on_fd(target, request, by_path=True)
            return wire.AttrReply(wire.pack_stat(os.stat(target)))

    def _set_on_fd(self, fd: int, request: wire.Setattr, by_path: bool = False) -> None:
        # An O_PATH fd allows no fchmod or ftruncate; its /proc/self/fd magic link
        # resolves to exactly the inode it was opened on (a symlink stays that
        # symlink, never its target), so operating through it is race-free.
        where: int | str = f"/proc/self/fd/{fd}" if by_path else fd
        valid = request.valid
        st = os.stat(fd)
        if valid & wire.SET_MODE:
            if stat.S_ISLNK(st.st_mode):
                raise OSError(errno.EOPNOTSUPP, "symlinks have no mode")
            os.chmod(where, _peer_mode(request.mode, st.st_mode))
        if valid & (wire.SET_UID | wire.SET_GID):
            uid = request.uid if valid & wire.SET_UID else -1
            gid = request.gid if valid & wire.SET_GID else -1
            # A file handed to root by a peer would pass for one of the host's
            # own (cron, for one, trusts root's files).  Without root squash
            # the operator has said that the peer's root is root here: it
            # creates root's files anyway, so its chown may too.
            if self.root_squash and (uid == 0 or gid == 0):
                raise PermissionError(errno.EPERM, "a peer does not give files to root")
            os.chown(where, uid, gid)
        if valid & wire.SET_SIZE:
            os.truncate(where, request.size)
            _drop_privileges(where, os.stat(fd).st_mode)
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
        with self._at(request.path) as (parent, name):
            return wire.DataReply(os.readlink(name, dir_fd=parent))

    def open(self, request: wire.Open) -> wire.HandleReply:
        flags = request.flags & OPEN_FLAGS
        access = flags & os.O_ACCMODE
        writes = access != os.O_RDONLY or flags & os.O_TRUNC
        sections = ["Open"]
        if writes:
            self._writable(request.path)
            sections.append("Write")
        if access != os.O_WRONLY:
            sections.append("Read")
        with self._at(request.path, *sections) as (parent, name):
            fd = os.open(name, flags | OPEN_ALWAYS, dir_fd=parent)
            with closed_on_error(fd):
                self._no_facts_below(fd, request.path)
                if writes:
                    _drop_privileges(fd, os.fstat(fd).st_mode)
            handle = self.files.add(fd)  # which closes fd when it refuses
            if self.cgroup and name in TASK_FILES and access != os.O_RDONLY:
                # A process is placed whole (cgroup.procs) when a tid named in
                # `tasks` is its leader: see `_place`.
                try:
                    procs = os.open(b"cgroup.procs", os.O_WRONLY | OPEN_ALWAYS, dir_fd=parent)
                except BaseException:
                    self.files.close(handle)
                    raise
                self._task_files[handle] = (name, procs)
        return wire.HandleReply(handle, b"")

    def create(self, request: wire.Create) -> wire.HandleReply:
        self._writable(request.path)
        flags = (request.flags & OPEN_FLAGS) | OPEN_ALWAYS
        sections = ("Create", "Write") if flags & os.O_ACCMODE != os.O_RDONLY else ("Create",)
        mode = stat.S_IMODE(request.mode) & ~PRIVILEGE_BITS
        with self._in_parent(request.path, *sections) as (parent, name):
            try:
                fd = os.open(name, flags | os.O_CREAT | os.O_EXCL, mode, dir_fd=parent)
            except FileExistsError:
                if request.flags & os.O_EXCL:
                    raise
                # Someone's existing file: opened as it is, never handed to the caller.
                fd = os.open(name, flags, dir_fd=parent)
                with closed_on_error(fd):
                    _drop_privileges(fd, os.fstat(fd).st_mode)
            else:
                with closed_on_error(fd):
                    self._give(parent, name, request.uid, request.gid)
        with closed_on_error(fd):
            attr = wire.pack_stat(os.fstat(fd))
        return wire.HandleReply(self.files.add(fd), attr)

    def read(self, request: wire.Read) -> wire.DataReply:
        return wire.DataReply(os.pread(self.files.get(request.handle), request.size, request.offset))

    def write(self, request: wire.Write) -> wire.CountReply:
        fd = self.files.get(request.handle)
        task_file = self._task_files.get(request.handle)
        if task_file is not None:
            return self._place(fd, task_file, request.data)
        return wire.CountReply(os.pwrite(fd, request.data, request.offset))

    def _place(self, fd: int, task_file: tuple[bytes, int], data: bytes) -> wire.CountReply:
        """Put a task into this cgroup: only a program the DPU started (or one of its threads).

        The DPU writes one task id per write(2), as libvirt does.  libvirt's
        cgroup v1 code writes the emulator's pid into ``tasks``, which moves
        that one thread; its other threads would follow from the placement
        libvirt made before exec, which was of the DPU's stand-in, not of the
        host's program.  So the leader of a thread group moves its whole
        process, and its vcpu threads are moved out again by their own writes.
        """
        name, procs = task_file
        task = task_id(data)
        if self.programs is None:
            log.warning("refused placing host task %d: this server has no --programs-of", task)
            raise PermissionError(errno.EPERM, "this server places no tasks")
        self.programs.check(task, "placing")
        leader = name == b"cgroup.procs" or process_of(task) == task  # it leads its thread group
        os.write(procs if leader else fd, b"%d" % task)
        return wire.CountReply(len(data))

    def release(self, request: wire.Release) -> wire.Empty:
        task_file = self._task_files.pop(request.handle, None)
        if task_file is not None:
            os.close(task_file[1])
        self.files.close(request.handle)
        return wire.Empty()

    def fsync(self, request: wire.Fsync) -> wire.Empty:
        fd = self.files.get(request.handle)
        (os.fdatasync if request.datasync else os.fsync)(fd)
        return wire.Empty()

    def _make(
        self, request: wire.Mkdir | wire.Mknod | wire.Symlink, section: str, make: Callable[[int, bytes], None]
    ) -> wire.AttrReply:
        """``make(parent, name)`` the new entry ``request.path`` and hand it to the calling user."""
        self._writable(request.path)
        with self._in_parent(request.path, section) as (parent, name):
            make(parent, name)
            self._give(parent, name, request.uid, request.gid)
        return self._stat(request.path)

    def mkdir(self, request: wire.Mkdir) -> wire.AttrReply:
        # The kernel gives a new directory its parent's setgid bit itself; the peer gives none.
        mode = stat.S_IMODE(request.mode) & ~PRIVILEGE_BITS
        return self._make(request, "Mkdir", lambda parent, name: os.mkdir(name, mode, dir_fd=parent))

    def mknod(self, request: wire.Mknod) -> wire.AttrReply:
        self._writable(request.path)
        kind = stat.S_IFMT(request.mode)
        # Sockets and FIFOs (libvirt binds its monitor sockets here) and plain
        # files; device nodes made from the DPU would open host devices.
        if kind not in (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK):
            raise PermissionError(errno.EPERM, "device nodes are not made through qtfs")
        mode = kind | (stat.S_IMODE(request.mode) & ~PRIVILEGE_BITS)
        return self._make(request, "Create", lambda parent, name: os.mknod(name, mode, 0, dir_fd=parent))

    def symlink(self, request: wire.Symlink) -> wire.AttrReply:
        return self._make(request, "Create", lambda parent, name: os.symlink(request.target, name, dir_fd=parent))

    def link(self, request: wire.Link) -> wire.AttrReply:
        self._writable(request.path)
        # Both names are judged: a new name for a file the rules keep from the
        # peer would be a way around them.
        with (
            self._in_parent(request.source, "Create") as (source_dir, source),
            self._in_parent(request.path, "Create") as (parent, name),
        ):
            os.link(source, name, src_dir_fd=source_dir, dst_dir_fd=parent, follow_symlinks=False)
        return self._stat(request.path)

    def unlink(self, request: wire.Unlink) -> wire.Empty:
        self._writable(request.path)
        with self._in_parent(request.path, "Unlink") as (parent, name):
            os.unlink(name, dir_fd=parent)
        return wire.Empty()

    def rmdir(self, request: wire.Rmdir) -> wire.Empty:
        self._writable(request.path)
        with self._in_parent(request.path, "Rmdir") as (parent, name):
            os.rmdir(name, dir_fd=parent)
        return wire.Empty()

    def rename(self, request: wire.Rename) -> wire.Empty:
        self._writable(request.old)
        with (
            self._in_parent(request.old, "Rename") as (old_dir, old),
            self._in_parent(request.new, "Rename") as (new_dir, new),
        ):
            if request.flags:
                renameat2(old_dir, old, new_dir, new, request.flags)
            else:
                os.rename(old, new, src_dir_fd=old_dir, dst_dir_fd=new_dir)
        return wire.Empty()

    def opendir(self, request: wire.Opendir) -> wire.DirReply:
        entries = []
        with self._opened(request.path, os.O_RDONLY | os.O_DIRECTORY, "Readdir") as fd:
            self._no_facts_below(fd, request.path)
            where = self._relative(real_path(fd), request.path) if self.facts is not None else b""
            with os.scandir(fd) as listing:
                for entry in listing:
                    name = os.fsencode(entry.name)
                    if self.facts is not None and not facts.allowed(self.facts, join(where, name)):
                        continue
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue  # removed while we listed
                    entries.append(wire.encode_entry(name, wire.pack_stat(st)))
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
                self._forget_listing(handle)
            return wire.DirReply(0, 1, page)
        if not handle:
            # A listing is held until its last page was read or it was released;
            # a peer that never does either is held to these bounds.
            held = sum(len(entry) for entry in entries)
            if len(self._dirs) >= MAX_HANDLES or self._listing_bytes + held > MAX_LISTING_BYTES:
                raise OSError(errno.EMFILE, "too many directory listings held on this connection")
            handle = next(self._dir_numbers)
            self._listing_bytes += held
            self._dirs[handle] = (entries, held)
        return wire.DirReply(handle, 0, page)

    def _forget_listing(self, handle: int) -> None:
        listing = self._dirs.pop(handle, None)
        if listing is not None:
            self._listing_bytes -= listing[1]

    def readdir(self, request: wire.Readdir) -> wire.DirReply:
        try:
            entries, _ = self._dirs[request.handle]
        except KeyError:
            raise OSError(errno.EBADF, "no such directory handle") from None
        return self._page(request.handle, entries, request.index)

    def releasedir(self, request: wire.Releasedir) -> wire.Empty:
        self._forget_listing(request.handle)
        return wire.Empty()

    def statfs(self, request: wire.Statfs) -> wire.StatfsReply:
        with self._opened(request.path, os.O_PATH) as fd:
            st = os.statvfs(fd)
        return wire.StatfsReply(*(getattr(st, "f_" + field.name) for field in fields(wire.StatfsReply)))

    def _xattr_path(self, path: bytes, sections: tuple[str, ...], action):
        # The parent through its /proc/self/fd link, the entry itself not followed.
        with self._at(path, *sections) as (parent, name):
            return action(f"/proc/self/fd/{parent}/{os.fsdecode(name)}")

    def getxattr(self, request: wire.Getxattr) -> wire.DataReply:
        name = os.fsdecode(request.name)
        value = self._xattr_path(request.path, (), lambda where: os.getxattr(where, name, follow_symlinks=False))
        return wire.DataReply(value)

    def listxattr(self, request: wire.Listxattr) -> wire.DataReply:
        names = self._xattr_path(request.path, (), lambda where: os.listxattr(where, follow_symlinks=False))
        return wire.DataReply(b"".join(os.fsencode(n) + b"\0" for n in names))

    def _xattr_writable(self, request: wire.Setxattr | wire.Removexattr) -> str:
        self._writable(request.path)
        # security.capability is a file capability (root powers for whoever runs the
        # file); security.* labels and trusted.* are the host's own business.
        if request.name.startswith(PRIVILEGED_XATTRS):
            log.warning("refused a peer's change of %s", os.fsdecode(request.name))
            raise PermissionError(errno.EPERM, "privileged extended attribute", os.fsdecode(request.name))
        return os.fsdecode(request.name)

    def setxattr(self, request: wire.Setxattr) -> wire.Empty:
        name = self._xattr_writable(request)
        self._xattr_path(
            request.path,
            ("Setxattr",),
            lambda where: os.setxattr(where, name, request.value, request.flags, follow_symlinks=False),
        )
        return wire.Empty()

    def removexattr(self, request: wire.Removexattr) -> wire.Empty:
        name = self._xattr_writable(request)
        self._xattr_path(request.path, ("Setxattr",), lambda where: os.removexattr(where, name, follow_symlinks=False))
        return wire.Empty()

    def handlers(self) -> dict[wire.Op, Callable[[Any], wire.Message]]:
        """The operation for each op, the method of its name (the server looks them up once per connection)."""
        return {op: getattr(self, op.name.lower()) for op in wire.Op}


def _facts_of(fd: int) -> tuple[bytes, ...] | None:
    """The allowlist served below ``fd`` when it is a procfs or sysfs root (or a tree made to look like a
    procfs root, LXCFS-style); None for anything else, a directory inside a procfs included."""
    served = FACT_FILESYSTEMS.get(fs_type(fd))
    if served is not None:
        return served if os.stat(fd).st_ino == FS_ROOT_INO else None
    # A tree made to look like a procfs root has its "self": a symlink to the reader's pid.
    with contextlib.suppress(OSError):
        if os.readlink("self", dir_fd=fd).isdigit():
            return facts.PROC_SERVED
    return None


def _peer_mode(mode: int, current: int) -> int:
    """The permission bits a peer may set: never setuid or setgid, except that a directory keeps the
    setgid bit it has (inherited from its parent, as the kernel gives it)."""
    bits = stat.S_IMODE(mode) & ~PRIVILEGE_BITS
    if stat.S_ISDIR(current) and current & mode & stat.S_ISGID:
        bits |= stat.S_ISGID
    return bits


def _drop_privileges(where: int | str, mode: int) -> None:
    """What the kernel does to a file an unprivileged user writes: its setuid bit goes, and its setgid bit
    where it means setgid (group-executable).  The server writes with CAP_FSETID, which would keep them."""
    setgid = stat.S_ISGID | stat.S_IXGRP
    if stat.S_ISREG(mode) and (mode & stat.S_ISUID or mode & setgid == setgid):
        os.chmod(where, stat.S_IMODE(mode) & ~PRIVILEGE_BITS)
