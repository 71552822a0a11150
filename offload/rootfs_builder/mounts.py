"""Every mount the rootfs builder makes, as data (execute() and describe()).

The syscalls themselves are offload.mounts.syscalls (mount(2), umount2(2));
loop devices are set up with losetup(8), which owns the LOOP_CONFIGURE
dance.  Nothing else in this package mounts.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from offload import proc
from offload.errors import MountError
from offload.mounts import mountinfo, syscalls
from offload.prefix import is_under

# Overlay's option parser splits on ',' and lowerdir on ':'; it knows '\' escapes
# but mount(8) and humans do not agree on them, so such paths are refused.
_OVERLAY_UNSAFE = (",", ":", "\\")


@dataclass(frozen=True)
class Overlay:
    """overlay on ``target``: read-only ``lower``, writable ``upper`` (``work`` on the same fs)."""

    lower: str
    upper: str
    work: str
    target: str

    def __post_init__(self) -> None:
        for path in (self.lower, self.upper, self.work):
            if any(c in path for c in _OVERLAY_UNSAFE):
                raise MountError(f"overlay layer path {path!r} contains one of , : \\", path=path)

    @property
    def data(self) -> str:
        return f"lowerdir={self.lower},upperdir={self.upper},workdir={self.work}"

    def describe(self) -> str:
        return f"mount -t overlay -o {self.data} overlay {self.target}"

    def execute(self) -> None:
        syscalls.mount("overlay", self.target, "overlay", 0, self.data)


@dataclass(frozen=True)
class ReadOnly:
    """An ext4/xfs/... filesystem (a loop device) mounted read-only on ``target``."""

    device: str
    target: str
    fstype: str | None = None  # None: let the kernel try (via blkid's answer below)

    def describe(self) -> str:
        kind = f"-t {self.fstype} " if self.fstype else ""
        return f"mount {kind}-o ro {self.device} {self.target}"

    def execute(self) -> None:
        fstype = self.fstype or _probe_fstype(self.device)
        syscalls.mount(self.device, self.target, fstype, syscalls.MS_RDONLY)


@dataclass(frozen=True)
class Unmount:
    target: str
    lazy: bool = False

    def describe(self) -> str:
        return f"umount {'-l ' if self.lazy else ''}{self.target}"

    def execute(self) -> None:
        syscalls.umount(self.target, syscalls.MNT_DETACH if self.lazy else 0)


def _probe_fstype(device: str) -> str:
    # -p probes the device itself: without it blkid may answer from its
    # cache file, which remembers what an earlier user of the same loop
    # device held.
    result = proc.run(["blkid", "-p", "-o", "value", "-s", "TYPE", device], check=False)
    fstype = result.stdout.strip()
    if result.returncode != 0 or not fstype:
        raise MountError(f"no filesystem found on {device} (blkid)", path=device)
    return fstype


def mount_points() -> list[str]:
    """Mount points of this mount namespace."""
    return [entry.mount_point for entry in mountinfo.read()]


def is_mount_point(path: str | os.PathLike[str]) -> bool:
    return os.path.abspath(path) in mount_points()


def mounted_under(path: str | os.PathLike[str]) -> list[str]:
    """Mount points at or below ``path``, deepest first (the order to unmount them)."""
    top = os.path.abspath(path)
    found = [p for p in mount_points() if is_under(p, top)]
    return sorted(set(found), key=lambda p: p.count("/"), reverse=True)


@contextlib.contextmanager
def loop_device(image: str, *, offset: int = 0, size: int | None = None) -> Iterator[str]:
    """A read-only loop device over ``image`` (from ``offset``, ``size`` bytes); detached on exit."""
    argv = ["losetup", "--find", "--show", "--read-only", "--offset", str(offset)]
    if size is not None:
        argv += ["--sizelimit", str(size)]
    device = proc.run([*argv, image]).stdout.strip()
    try:
        yield device
    finally:
        proc.run(["losetup", "--detach", device], check=False)


@contextlib.contextmanager
def mounted(op: Overlay | ReadOnly) -> Iterator[None]:
    """``op`` mounted for the duration of the block; unmounted (lazily if busy) on every path."""
    op.execute()
    try:
        yield
    finally:
        try:
            Unmount(op.target).execute()
        except MountError:
            Unmount(op.target, lazy=True).execute()


def make_opaque(directory: Path) -> None:
    """An overlay upper directory that hides whatever the lower layer has there."""
    directory.mkdir(parents=True, exist_ok=True)
    os.setxattr(directory, "trusted.overlay.opaque", b"y")


def make_whiteout(path: Path) -> None:
    """An overlay whiteout (a 0/0 character device): ``path`` does not exist in the merged view."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        syscalls.mknod_char(str(path), 0, 0, 0o000)
