"""Paths inside the target, resolved the way a process chrooted there sees them.

A rootfs has absolute symlinks (Debian's /var/run -> /run).  Resolved from
outside, /another_rootfs/var/run/rexec would lead to the machine's own
/run/rexec, and a mount there would land outside the target.  `resolve`
follows symlinks with the target as "/", so every path the orchestrator
touches stays inside it.
"""

from __future__ import annotations

import os
import stat

from offload.errors import ConfigError

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
