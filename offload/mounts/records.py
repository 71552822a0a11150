"""What prepare mounted, by mount id: how teardown finds every mount, wherever it landed.

A path says where a mount should be, not where it is: a mount that a
symlink took elsewhere is not below the target, and a teardown that looks
there only reports "nothing left".  So prepare writes down each mount it
makes as mountinfo shows it (the id, with the device, root and type that
tell a reused id apart) in ``/run/offload/prepare/<target>.mounts``, one
JSON object a line, and teardown takes down what is still there of it,
with everything mounted below it, besides whatever lies below the target.
/run is this machine's and empty after a boot, as mount ids are.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from offload.mounts.mountinfo import MountEntry

RECORDS_DIR = Path("/run/offload/prepare")


def path_of(target: str) -> Path:
    # systemd-escape's idea, simplified: one file name per target path.
    name = target.strip("/").replace("\\", "\\x5c").replace("-", "\\x2d").replace("/", "-") or "-"
    return RECORDS_DIR / f"{name}.mounts"


def save(target: str, entries: list[MountEntry]) -> None:
    """Replace the record of ``target`` with ``entries`` (atomically: a crash leaves the old or the new)."""
    path = path_of(target)
    if not entries:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    text = "".join(
        json.dumps({"id": e.mount_id, "device": e.device, "root": e.root, "fstype": e.fstype, "at": e.mount_point})
        + "\n"
        for e in entries
    )
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    temporary.write_text(text)
    os.replace(temporary, path)


def present(target: str, entries: tuple[MountEntry, ...]) -> list[MountEntry]:
    """The recorded mounts still there (same id, device, root and type), in mount order."""
    try:
        lines = path_of(target).read_text().splitlines()
    except FileNotFoundError:
        return []
    wanted = set()
    for line in lines:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            item = json.loads(line)
            wanted.add((int(item["id"]), str(item["device"]), str(item["root"]), str(item["fstype"])))
    return [e for e in entries if (e.mount_id, e.device, e.root, e.fstype) in wanted]


def with_descendants(roots: list[MountEntry], entries: tuple[MountEntry, ...]) -> list[MountEntry]:
    """``roots`` and every mount below one of them (by parent id, not by path), in mount order."""
    ids = {entry.mount_id for entry in roots}
    grew = True
    while grew:
        grew = False
        for entry in entries:
            if entry.parent_id in ids and entry.mount_id not in ids:
                ids.add(entry.mount_id)
                grew = True
    return [entry for entry in entries if entry.mount_id in ids]
