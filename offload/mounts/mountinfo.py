"""/proc/self/mountinfo, parsed (proc(5)).

Entries keep the file's order, which is the order the mounts were made
(newer kernels list them by their unique, increasing mount id): the last
entry at a mount point is the one on top, and walking the list backwards
reaches every child before its parent.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from offload.prefix import is_under

MOUNTINFO = "/proc/self/mountinfo"

_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    # The kernel writes space, tab, newline and backslash as \ooo octal.
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


@dataclass(frozen=True)
class MountEntry:
    mount_id: int
    parent_id: int
    device: str  # "major:minor"
    root: str  # the mounted directory inside its filesystem ("/" unless a bind)
    mount_point: str
    options: tuple[str, ...]  # per-mount: rw, nosuid, relatime, ...
    optional: tuple[str, ...]  # shared:N, master:N, ...
    fstype: str
    source: str
    super_options: tuple[str, ...]  # per-superblock: mode=755, cpu, ...

    @property
    def filesystem_data(self) -> tuple[str, ...]:
        """The superblock options without rw/ro (those are per-mount flags)."""
        return tuple(o for o in self.super_options if o not in ("rw", "ro"))


def parse_line(line: str) -> MountEntry:
    fields = line.split()
    separator = fields.index("-", 6)
    return MountEntry(
        mount_id=int(fields[0]),
        parent_id=int(fields[1]),
        device=fields[2],
        root=_unescape(fields[3]),
        mount_point=_unescape(fields[4]),
        options=tuple(fields[5].split(",")),
        optional=tuple(fields[6:separator]),
        fstype=fields[separator + 1],
        source=_unescape(fields[separator + 2]),
        super_options=tuple(map(_unescape, fields[separator + 3].split(","))) if len(fields) > separator + 3 else (),
    )


def parse(text: str) -> tuple[MountEntry, ...]:
    return tuple(parse_line(line) for line in text.splitlines() if line.strip())


def read(path: str = MOUNTINFO) -> tuple[MountEntry, ...]:
    with open(path, encoding="utf-8", errors="surrogateescape") as file:
        return parse(file.read())


def stack_at(entries: tuple[MountEntry, ...], path: str) -> list[MountEntry]:
    """The mounts at exactly ``path``, bottom first."""
    return [entry for entry in entries if entry.mount_point == path]


def is_mount_point(path: str | os.PathLike[str]) -> bool:
    """Something is mounted at ``path`` (made absolute, not resolved) in this mount namespace."""
    return bool(stack_at(read(), os.path.abspath(path)))


def under(entries: tuple[MountEntry, ...], path: str) -> list[MountEntry]:
    """The mounts strictly below ``path``, in mount order."""
    return [entry for entry in entries if is_under(entry.mount_point, path, strict=True)]


def containing(entries: tuple[MountEntry, ...], path: str) -> MountEntry | None:
    """The mount that ``path`` (already free of symlinks) lies on: the top one at the longest prefix."""
    covering = (entry for entry in reversed(entries) if is_under(path, entry.mount_point))
    return max(covering, key=lambda entry: len(entry.mount_point), default=None)


def bind_root(entries: tuple[MountEntry, ...], source: str) -> tuple[str, str] | None:
    """(device, root) that a bind mount of ``source`` shows in mountinfo."""
    entry = containing(entries, source)
    if entry is None:
        return None
    rest = os.path.relpath(source, entry.mount_point)
    root = os.path.normpath(os.path.join(entry.root, rest)) if rest != "." else entry.root
    return entry.device, root
