"""What the planner needs to know about this machine, gathered in one place.

The planner itself is pure: `Facts` is all it reads, so tests can hand it
any machine they like (no hugetlbfs, a cgroup2-only layout, qtfs present).
"""

from __future__ import annotations

import grp
import os
import stat
from dataclasses import dataclass

from offload.mounts import mountinfo
from offload.mounts.mountinfo import MountEntry


@dataclass(frozen=True)
class DeviceNode:
    name: str  # under /dev, e.g. "net/tun"
    major: int
    minor: int
    mode: int  # permission bits
    uid: int
    gid: int  # already mapped to the target's group of the same name


@dataclass(frozen=True)
class Facts:
    mounts: tuple[MountEntry, ...]
    filesystems: frozenset[str]
    devices: tuple[DeviceNode, ...]
    tty_gid: int = 5


def filesystems(path: str = "/proc/filesystems") -> frozenset[str]:
    with open(path) as file:
        return frozenset(line.split()[-1] for line in file if line.strip())


def _target_groups(target: str) -> dict[str, int]:
    groups: dict[str, int] = {}
    try:
        with open(os.path.join(target, "etc/group")) as file:
            for line in file:
                fields = line.split(":")
                if len(fields) >= 3 and fields[2].isdigit():
                    groups.setdefault(fields[0], int(fields[2]))
    except OSError:
        pass
    return groups


def _map_gid(gid: int, groups: dict[str, int]) -> int:
    # /dev/kvm is root:kvm 0660 so that libvirt does not re-probe qemu on
    # every lookup; the target's kvm group may have another number.
    try:
        name = grp.getgrgid(gid).gr_name
    except KeyError:
        return gid
    return groups.get(name, gid)


def devices(names: tuple[str, ...], target: str, dev: str = "/dev") -> tuple[DeviceNode, ...]:
    """The character devices among ``names`` that this machine's /dev has."""
    groups = _target_groups(target)
    found = []
    for name in names:
        try:
            info = os.stat(os.path.join(dev, name))
        except OSError:
            continue
        if stat.S_ISCHR(info.st_mode):
            found.append(
                DeviceNode(
                    name,
                    os.major(info.st_rdev),
                    os.minor(info.st_rdev),
                    stat.S_IMODE(info.st_mode),
                    info.st_uid,
                    _map_gid(info.st_gid, groups),
                )
            )
    return tuple(found)


def gather(target: str, device_names: tuple[str, ...]) -> Facts:
    return Facts(
        mounts=mountinfo.read(),
        filesystems=filesystems(),
        devices=devices(device_names, target),
        tty_gid=_target_groups(target).get("tty", 5),
    )
