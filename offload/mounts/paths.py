"""Paths inside the target, resolved the way a process chrooted there sees them.

A rootfs has absolute symlinks (Debian's /var/run -> /run).  Resolved from
outside, /another_rootfs/var/run/rexec would lead to the machine's own
/run/rexec, and a mount there would land outside the target.  `resolve`
follows symlinks with the target as "/", so every path the orchestrator
touches stays inside it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat

from offload.errors import ConfigError, MountError
from offload.fdinfo import closing
from offload.resolve import Escape, openat2

_MAX_LINKS = 40  # like the kernel's MAXSYMLINKS


def resolve(root: str, path: str) -> str:
    """The machine path of ``path`` (absolute, as seen inside ``root``).

    Existing components are followed through symlinks, absolute ones
    relative to ``root``; ``..`` never climbs above ``root``; the first
    missing component and everything after it are taken literally (they will
    be created as directories).
    """
    root = os.path.realpath(root)
    pending = [part for part in path.split("/") if part not in ("", ".")]
    current = root
    links = 0
    exists = True
    while pending:
        part = pending.pop(0)
        if part == "..":
            if current != root:
                current = os.path.dirname(current)
            continue
        candidate = os.path.join(current, part)
        if exists:
            try:
                info = os.lstat(candidate)
            except FileNotFoundError:
                exists = False
            else:
                if stat.S_ISLNK(info.st_mode):
                    links += 1
                    if links > _MAX_LINKS:
                        raise ConfigError(f"too many levels of symbolic links resolving {path} in {root}")
                    link = os.readlink(candidate)
                    if link.startswith("/"):
                        current = root
                    pending[:0] = [p for p in link.split("/") if p not in ("", ".")]
                    continue
        current = candidate
    return current


def inside(root: str, path: str) -> str:
    """``path`` (a machine path inside ``root``) as the chroot sees it, for messages."""
    rel = os.path.relpath(path, root)
    return "/" if rel == "." else "/" + rel


# Opening at the moment of use ------------------------------------------------
#
# `resolve` runs when the plan is made; by the time a step runs, earlier
# steps have mounted things (a directory the host serves through qtfs, a
# bind of a rootfs layer) that may hold symlinks the plan never saw.  So a
# step opens its path again, beneath the target with openat2
# RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS: a symlink anywhere on the way is
# refused (ELOOP), whatever it points to, and the fd it gets is what the
# mount goes onto (offload.mounts.syscalls.attach).

DIRECTORY = "directory"
FILE = "file"


def _refused(path: str, exc: OSError) -> MountError:
    number = exc.errno or errno.EIO
    if number in (errno.ELOOP, errno.EXDEV, errno.EACCES) or isinstance(exc, Escape):
        why = "a symlink on the way (refused: a mount there could land outside the target)"
        number = errno.ELOOP
    else:
        why = os.strerror(number)
    return MountError(f"{path}: {why}", path=path, errno=number)


def open_inside(root: str, path: str, *, make: str = "") -> int:
    """An O_PATH fd of ``path`` (a machine path below ``root``), no symlink followed on the way.

    ``make``: `DIRECTORY` creates the missing directories (mkdir -p),
    `FILE` the missing directories and an empty file; otherwise ``path``
    must exist.  The caller closes the fd.
    """
    rel = os.path.relpath(path, root)
    if rel == ".." or rel.startswith("../"):
        raise MountError(f"{path} is not below {root}", path=path, errno=errno.EXDEV)
    with closing(os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)) as root_fd:
        if rel == ".":
            return os.dup(root_fd)
        if not make:
            try:
                return openat2(root_fd, os.fsencode(rel), os.O_PATH, no_symlinks=True)
            except OSError as exc:
                raise _refused(path, exc) from None
        return _make(root_fd, rel.split("/"), make, path)


def _make(root_fd: int, parts: list[str], make: str, path: str) -> int:
    current = os.dup(root_fd)
    try:
        for index, part in enumerate(parts):
            last = index == len(parts) - 1
            name = os.fsencode(part)
            try:
                fd = _open_one(current, name, directory=not last or make == DIRECTORY)
            except FileNotFoundError:
                # mkdirat and O_CREAT|O_NOFOLLOW never follow a symlink at the name itself.
                with contextlib.suppress(FileExistsError):
                    if last and make == FILE:
                        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
                        os.close(os.open(part, flags, 0o644, dir_fd=current))
                    else:
                        os.mkdir(part, 0o755, dir_fd=current)
                fd = _open_one(current, name, directory=not last or make == DIRECTORY)
            os.close(current)
            current = fd
        result, current = current, -1
        return result
    except OSError as exc:
        raise _refused(path, exc) from None
    finally:
        if current >= 0:
            os.close(current)


def _open_one(parent: int, name: bytes, *, directory: bool) -> int:
    return openat2(parent, name, os.O_PATH | (os.O_DIRECTORY if directory else 0), no_symlinks=True)
