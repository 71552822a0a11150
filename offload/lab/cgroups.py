"""The DPU side's own cgroups: a subtree of every hierarchy, which its cgroup namespace makes its root.

On two machines the DPU's libvirtd makes and tunes cgroups in the DPU's
kernel only.  Here the side's subtree sits below the cgroup the lab runs in
(so the machine's own limits still hold), its init joins it before making
the cgroup namespace, and the side's mount namespace mounts each hierarchy
again: the host side's cgroups (where its qemu runs) cannot be seen or
written from the DPU side.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from offload.errors import LabError
from offload.mounts import mountinfo
from offload.prefix import is_under

CGROUP_ROOT = "/sys/fs/cgroup"
#: cgroup v1's cpu.shares of a group that nobody set.
DEFAULT_SHARES = 1024


@dataclass(frozen=True)
class Hierarchy:
    """One cgroup hierarchy as this machine mounts it."""

    mount_point: str
    fstype: str  # cgroup or cgroup2
    data: tuple[str, ...]  # its superblock options: the controllers (cpu, name=systemd, ...)

    def holds(self, controllers: str) -> bool:
        """This is the hierarchy a /proc/PID/cgroup line's controllers name ("" for cgroup2)."""
        if not controllers:
            return self.fstype == "cgroup2"
        return self.fstype == "cgroup" and set(controllers.split(",")) <= set(self.data)


def hierarchies() -> list[Hierarchy]:
    """The hierarchies mounted under /sys/fs/cgroup, at their roots, in mount order."""
    found = []
    for entry in mountinfo.read():
        mounted_here = is_under(entry.mount_point, CGROUP_ROOT)
        if entry.fstype in ("cgroup", "cgroup2") and entry.root == "/" and mounted_here:
            found.append(Hierarchy(entry.mount_point, entry.fstype, entry.filesystem_data))
    return found


def subtree(name: str) -> list[Path]:
    """Where the side called ``name`` gets its cgroup in every hierarchy: below our own cgroup there."""
    places = []
    known = hierarchies()
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        hierarchy = next((h for h in known if h.holds(controllers)), None)
        if hierarchy is not None:
            places.append(Path(hierarchy.mount_point + path.rstrip("/")) / name)
    return places


def create(places: list[Path]) -> None:
    """Make the side's cgroups (a cpuset one gets its parent's cpus and memory nodes, or it takes no task)."""
    for place in places:
        try:
            place.mkdir(exist_ok=True)
            for knob in ("cpuset.cpus", "cpuset.mems"):
                if (place / knob).exists() and not (place / knob).read_text().strip():
                    (place / knob).write_text((place.parent / knob).read_text())
            if (place / "cpu.shares").exists():
                # A DPU has CPUs of its own.  Here its whole side is one
                # group, which by default weighs as much as one busy task of
                # the host side: give it the weight of as many as this
                # machine has CPUs, so the DPU side is not starved by the host.
                (place / "cpu.shares").write_text(str(DEFAULT_SHARES * (os.cpu_count() or 1)))
        except OSError as exc:
            raise LabError(f"cannot make the lab's cgroup {place}: {exc}") from None


def remove(places: list[str | os.PathLike[str]]) -> list[str]:
    """Remove the side's cgroups and whatever was made below them (libvirt's machine.slice), deepest first.

    Called once the side's processes are gone; a cgroup that still holds
    one is left and named.
    """
    left = []
    for place in places:
        top = Path(place)
        if not top.is_dir():
            continue
        below = sorted((Path(root) for root, _, _ in os.walk(top)), key=lambda p: len(p.parts), reverse=True)
        for directory in below:
            with contextlib.suppress(OSError):
                directory.rmdir()
        if top.exists():
            left.append(str(top))
    return left
