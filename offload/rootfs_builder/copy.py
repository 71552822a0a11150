"""Copy mode: the reference's `cp -r` of the DPU's root, done well (README.md, "offload rootfs").

A walk that keeps what `cp -a` keeps (capabilities are extended
attributes) and costs as little as the filesystem allows: a reflink
(FICLONE) is a private copy that costs no data; else the package-managed
trees (`LINKABLE`) are hard-linked, since dpkg and rpm only ever replace
those files by rename, as install.write_file does, so a link is never
written through; else a plain copy (sendfile).
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from offload.errors import RootfsError

FICLONE = 0x40049409  # <linux/fs.h> _IOW(0x94, 9, int)
LINKABLE = frozenset({"usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32"})
#: Filesystems that hold no files worth copying: kernel or run-time state,
#: and overlays (another rootfs or a container's, not this system's files).
PSEUDO = frozenset(
    [
        "proc",
        "sysfs",
        "devtmpfs",
        "devpts",
        "tmpfs",
        "ramfs",
        "cgroup",
        "cgroup2",
        "mqueue",
        "hugetlbfs",
        "securityfs",
        "debugfs",
        "tracefs",
        "pstore",
        "bpf",
        "configfs",
        "fusectl",
        "binfmt_misc",
        "autofs",
        "efivarfs",
        "nsfs",
        "rpc_pipefs",
        "fuse.gvfsd-fuse",
        "overlay",
    ]
)


@dataclass
class Stats:
    files: int = 0
    bytes: int = 0
    linked: int = 0
    cloned: int = 0
    started: float = field(default_factory=time.monotonic)

    def line(self) -> str:
        rate = self.bytes / max(time.monotonic() - self.started, 1e-6) / 1e6
        return (
            f"{self.files} files, {self.bytes / 1e6:.0f} MB ({rate:.0f} MB/s); "
            f"{self.linked} hard-linked, {self.cloned} reflinked"
        )


@dataclass
class Copier:
    source: Path
    dest: Path
    skip: frozenset[str]  # absolute source paths never entered
    hardlinks: bool = True
    progress: Callable[[str], None] = print
    interval: float = 2.0
    stats: Stats = field(default_factory=Stats)
    _seen: dict[tuple[int, int], str] = field(default_factory=dict)
    _reflink: bool | None = None
    _last: float = field(default_factory=time.monotonic)

    def run(self) -> Stats:
        self.dest.mkdir(parents=True, exist_ok=True)
        self._copy_dir(str(self.source), str(self.dest), os.lstat(self.source), top=True)
        self.progress(f"copied {self.stats.line()}")
        return self.stats

    def _copy_dir(self, src: str, dst: str, info: os.stat_result, top: bool = False, linkable: bool = False) -> None:
        if not top:
            os.mkdir(dst, 0o700)
        try:
            entries = sorted(os.scandir(src), key=lambda e: e.name)
        except OSError as exc:
            raise RootfsError(f"{src}: cannot list: {exc.strerror}") from None
        for entry in entries:
            path = entry.path
            target = os.path.join(dst, entry.name)
            try:
                child = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # gone while we walked (a live system)
            if path in self.skip:
                if stat.S_ISDIR(child.st_mode):  # kept as an empty mount point
                    os.mkdir(target, 0o700)
                    _metadata(path, target, child, xattrs=False)
                continue
            if stat.S_ISDIR(child.st_mode):
                inner = linkable or (top and self.hardlinks and entry.name in LINKABLE)
                self._copy_dir(path, target, child, linkable=inner)
            elif stat.S_ISREG(child.st_mode):
                self._copy_file(path, target, child, linkable)
            elif stat.S_ISLNK(child.st_mode):
                os.symlink(os.readlink(path), target)
                _metadata(path, target, child)
            elif stat.S_ISSOCK(child.st_mode):
                continue  # a socket is a live process's; it means nothing in a copy
            else:  # FIFOs, device nodes
                os.mknod(target, child.st_mode, child.st_rdev)
                _metadata(path, target, child)
            self._tick()
        _metadata(src, dst, info)

    def _copy_file(self, src: str, dst: str, info: os.stat_result, linkable: bool) -> None:
        key = (info.st_dev, info.st_ino)
        if info.st_nlink > 1 and key in self._seen:
            os.link(self._seen[key], dst)  # a hard link inside the tree stays one
            return
        self.stats.files += 1
        self.stats.bytes += info.st_size
        try:
            with open(src, "rb") as fin:
                if self._reflink is not False:
                    with open(dst, "wb") as fout:
                        cloned = self._clone(fin.fileno(), fout.fileno())
                    if cloned:
                        self.stats.cloned += 1
                        _metadata(src, dst, info)
                        self._remember(key, info, dst)
                        return
                    os.unlink(dst)
                if linkable and self._link(src, dst):
                    self.stats.linked += 1
                    return
                with open(dst, "wb") as fout:
                    _sendfile_all(fin.fileno(), fout.fileno(), info.st_size)
        except OSError as exc:
            raise RootfsError(f"{src}: cannot copy: {exc.strerror}") from None
        _metadata(src, dst, info)
        self._remember(key, info, dst)

    def _remember(self, key: tuple[int, int], info: os.stat_result, dst: str) -> None:
        if info.st_nlink > 1:
            self._seen[key] = dst

    def _link(self, src: str, dst: str) -> bool:
        try:
            os.link(src, dst)
        except OSError as exc:
            if exc.errno in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                return False  # another filesystem, protected_hardlinks, too many links: copy
            raise
        return True

    def _clone(self, fd_in: int, fd_out: int) -> bool:
        try:
            fcntl.ioctl(fd_out, FICLONE, fd_in)
        except OSError:
            if self._reflink is None:
                self._reflink = False
                how = "hard links for /usr, /bin, /sbin and /lib*, " if self.hardlinks else ""
                self.progress(f"the target filesystem cannot reflink: {how}copies elsewhere")
            return False
        if self._reflink is None:
            self._reflink = True
            self.progress("the target filesystem can reflink: every file is a free private copy")
        return True

    def _tick(self) -> None:
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self.progress(f"copying: {self.stats.line()}")


def _sendfile_all(fd_in: int, fd_out: int, size: int) -> None:
    offset = 0
    while offset < size:
        sent = os.sendfile(fd_out, fd_in, offset, size - offset)
        if sent == 0:
            break  # the file shrank while we copied it
        offset += sent


def _metadata(src: str, dst: str, info: os.stat_result, xattrs: bool = True) -> None:
    """Owner, xattrs, mode, times, in the order cp -a uses (chown clears setuid bits)."""
    os.lchown(dst, info.st_uid, info.st_gid)
    if xattrs:
        try:
            for name in os.listxattr(src, follow_symlinks=False):
                os.setxattr(dst, name, os.getxattr(src, name, follow_symlinks=False), follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in (errno.ENOTSUP, errno.EPERM, errno.ENODATA):
                raise RootfsError(f"{src}: cannot copy extended attributes: {exc.strerror}") from None
    if not stat.S_ISLNK(info.st_mode):
        os.chmod(dst, stat.S_IMODE(info.st_mode))
    os.utime(dst, ns=(info.st_atime_ns, info.st_mtime_ns), follow_symlinks=False)
