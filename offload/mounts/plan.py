"""The planner: configuration + facts about the machine -> an ordered tuple of steps.

Pure: it reads only its arguments (`resolve` maps a path inside the target
to a machine path; the CLI passes offload.mounts.paths.resolve, tests a
plain join).  README's "offload prepare" section lists what the default
plan mounts; why each step is made its way is said beside it.
"""

from __future__ import annotations

import functools
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace

from offload.errors import ConfigError
from offload.mounts import mountinfo
from offload.mounts.config import MountSpec, PrepareConfig
from offload.mounts.machine import Facts
from offload.mounts.ops import BindOp, MakeDir, MakeLink, MakeNode, MountOp, QtfsMount, Skipped, Step, WriteFile
from offload.prefix import is_under
from offload.qtfs.facts import PROC_FILES, SYS_DIRS  # the host's /proc files and /sys directories qtfs serves

CGROUP_ROOT = "/sys/fs/cgroup"
#: Inside the target: the udsproxy shim's map of the cgroup partitions (its
#: OFFLOAD_CGROUP_PARTITIONS when that is not set; native/qtfs_shim.c).
CGROUP_PARTITIONS_FILE = "/run/offload/cgroup-partitions"
#: The files prepare writes into the target; teardown removes them.
PUBLISHED_FILES = (CGROUP_PARTITIONS_FILE,)

Resolver = Callable[[str], str]


@dataclass(frozen=True)
class Plan:
    target: str
    steps: tuple[Step, ...]

    def describe(self) -> list[str]:
        lines = [f"# offload prepare --target {self.target}: {len(self.steps)} steps"]
        for number, step in enumerate(self.steps, 1):
            lines.append(f"# {number}: {step.what}")
            lines += step.describe()
        return lines


def build(config: PrepareConfig, target: str, facts: Facts, resolve: Resolver) -> Plan:
    steps: list[Step] = [
        MountOp(path=resolve("/proc"), fstype="proc", source="proc", options="nosuid,nodev,noexec"),
        MountOp(path=resolve("/sys"), fstype="sysfs", source="sysfs", options="nosuid,nodev,noexec"),
    ]
    if config.cgroups:
        steps += cgroup_steps(facts, target, resolve)
    steps += dev_steps(config, facts, resolve)
    if config.run_tmpfs:
        steps.append(MountOp(path=resolve("/run"), fstype="tmpfs", source="tmpfs", options="nosuid,nodev,mode=0755"))
        # libvirt's console takes a lock file in /var/lock, which Debian links to /run/lock.
        steps.append(MakeDir(path=resolve("/run/lock"), mode=0o1777))
    steps += [_from_spec(spec, resolve) for spec in (*config.bind, *config.mount)]
    if config.host:
        steps += qtfs_steps(config, facts, resolve)
    return Plan(target, order(steps))


def _flag_words(entry: mountinfo.MountEntry) -> list[str]:
    from offload.mounts.syscalls import FLAG_WORDS

    return [o for o in entry.options if o in FLAG_WORDS and o != "rw"]


def cgroup_steps(facts: Facts, target: str, resolve: Resolver) -> list[Step]:
    """This machine's mounts at and under /sys/fs/cgroup, the same way, in the same order.

    Read from mountinfo, never a hard-coded list: kernels combine the
    controllers differently, and naming a combination the kernel did not
    make fails.
    """
    tops: dict[str, tuple[int, mountinfo.MountEntry]] = {}
    for index, entry in enumerate(facts.mounts):
        if is_under(entry.mount_point, target):
            continue  # our own earlier work, not the machine's layout
        if not is_under(entry.mount_point, CGROUP_ROOT):
            continue
        if entry.fstype in ("cgroup", "cgroup2") or (entry.fstype == "tmpfs" and entry.mount_point == CGROUP_ROOT):
            tops[entry.mount_point] = (index, entry)  # a later mount at the same point covers an earlier one
    chosen = [entry for _, entry in sorted(tops.values(), key=lambda item: item[0])]
    children = sorted(
        {os.path.relpath(e.mount_point, CGROUP_ROOT).split("/")[0] for e in chosen if e.mount_point != CGROUP_ROOT}
    )
    steps: list[Step] = []
    for entry in chosen:
        data = list(entry.filesystem_data)
        steps.append(
            MountOp(
                path=resolve(entry.mount_point),
                fstype=entry.fstype,
                source=entry.source,
                options=",".join(_flag_words(entry) + data),
                # A v1 mount is identified by its controllers (or name=):
                # cpu mounted where cpuacct should be is wrong.
                identity=tuple(data) if entry.fstype == "cgroup" else (),
                subdirs=tuple(children) if entry.mount_point == CGROUP_ROOT and entry.fstype == "tmpfs" else (),
            )
        )
    return steps


def dev_steps(config: PrepareConfig, facts: Facts, resolve: Resolver) -> list[Step]:
    # A tmpfs with nodes made by mknod: devtmpfs would be the machine's own /dev, shared.
    dev = resolve("/dev")
    steps: list[Step] = [MountOp(path=dev, fstype="tmpfs", source="tmpfs", options="nosuid,mode=0755,size=4m")]
    wanted = set(config.devices)
    for node in facts.devices:
        if node.name in wanted:
            steps.append(
                MakeNode(
                    path=os.path.join(dev, node.name),
                    major=node.major,
                    minor=node.minor,
                    mode=node.mode,
                    uid=node.uid,
                    gid=node.gid,
                    make_parent="/" in node.name,
                )
            )
    # /dev/ptmx must be the devpts instance's own ptmx, or ptys opened in
    # the target would come from the machine's instance.
    links = {"ptmx": "pts/ptmx", "fd": "/proc/self/fd", "stdin": "/proc/self/fd/0"}
    links |= {"stdout": "/proc/self/fd/1", "stderr": "/proc/self/fd/2"}
    steps += [MakeLink(path=os.path.join(dev, name), link=link) for name, link in links.items()]
    steps.append(
        MountOp(
            path=os.path.join(dev, "pts"),
            fstype="devpts",
            source="devpts",
            options=f"nosuid,noexec,newinstance,ptmxmode=0666,mode=0620,gid={facts.tty_gid}",
        )
    )
    steps.append(MountOp(path=os.path.join(dev, "shm"), fstype="tmpfs", source="shm", options="nosuid,nodev,mode=1777"))
    for wanted_fs, fstype, name, options in (
        (config.mqueue, "mqueue", "mqueue", "nosuid,nodev,noexec"),
        (config.hugetlbfs, "hugetlbfs", "hugepages", "nosuid,nodev"),
    ):
        if not wanted_fs:
            continue
        path = os.path.join(dev, name)
        if fstype in facts.filesystems:
            steps.append(MountOp(path=path, fstype=fstype, source=fstype, options=options))
        else:
            steps.append(Skipped(path=path, name=fstype, reason=f"this kernel has no {fstype} (/proc/filesystems)"))
    return steps


def _from_spec(spec: MountSpec, resolve: Resolver) -> Step:
    path = resolve(spec.where)
    if spec.is_bind:
        return BindOp(
            path=path,
            source=spec.source,
            recursive=spec.type == "rbind",
            readonly="ro" in spec.options.split(","),
            missing=spec.missing,
        )
    return MountOp(path=path, fstype=spec.type, source=spec.source or spec.type, options=spec.options)


def qtfs_steps(config: PrepareConfig, facts: Facts, resolve: Resolver) -> list[Step]:
    kernel = config.qtfs_kernel == "yes" or (config.qtfs_kernel == "auto" and "qtfs" in facts.filesystems)

    userspace = functools.partial(
        QtfsMount, address=config.host, pki=config.pki, insecure=config.insecure, command=config.qtfs_command
    )

    def qtfs(remote: str, path: str, mode: str = "") -> Step:
        if kernel:
            # The module's server address is a module parameter; the device
            # string is the remote path, and "-o proc" its proc mode.
            return MountOp(path=path, fstype="qtfs", source=remote, options="proc" if mode == "proc" else "")
        return userspace(path=path, remote=remote, mode=mode)

    steps = [qtfs(export.remote, resolve(export.where)) for export in config.exports]
    # Over this machine's own cgroup mounts (libvirt finds its controllers in
    # /proc/mounts, where only a real cgroup mount counts), the directory
    # libvirt makes its groups in is the host's: placement and limits reach
    # the host's programs, with stand-in pids translated (offload.qtfs.tasks).
    steps += [
        userspace(path=resolve(p.where), remote=p.remote, mode="cgroup", pidmap=config.pidmap)
        for p in config.cgroup_partitions
    ]
    partitions = shim_partitions(config, facts)
    if partitions:
        steps.append(WriteFile(path=resolve(CGROUP_PARTITIONS_FILE), content=partitions))
    for enabled, kind, names in ((config.proc_facts, "proc", PROC_FILES), (config.sys_facts, "sys", SYS_DIRS)):
        if not enabled:
            continue
        staging = resolve(f"{config.qtfs_staging}/qtfs-{kind}")
        steps.append(qtfs(f"/{kind}", staging, kind))
        # Only what exists on both sides is bound: procfs and sysfs cannot
        # grow a missing file, and a host without it has nothing to show.
        # Read-only, and opened beneath the staging mount without following
        # any symlink: the host's facts are shown, never changed from here,
        # and a link the host serves there never picks one of this
        # machine's files to bind into the rootfs.
        steps += [
            BindOp(
                path=resolve(f"/{kind}/{name}"),
                source=os.path.join(staging, name),
                missing="skip",
                create_target=False,
                readonly=True,
                beneath=staging,
            )
            for name in names
        ]
    return steps


def shim_partitions(config: PrepareConfig, facts: Facts) -> str:
    """The shim's map of the cgroup partitions: "CONTROLLER=HOST GROUP=LOCAL GROUP" items, ';'-separated.

    A group is a path as /proc/PID/cgroup shows it on that machine: below
    its hierarchy's mount, /sys/fs/cgroup/HIERARCHY on either side (the
    partitions are v1 controller hierarchies; the hierarchy's name, or the
    name of a link to it such as "cpu", gives the controllers).  With it,
    libvirt reconnecting to a running domain finds the domain's groups in
    the partitions it mounted.  Empty where there is nothing to map, or
    where this machine's cgroups are one cgroup2 hierarchy (the shim maps
    controller hierarchies only).
    """
    if any(entry.mount_point == CGROUP_ROOT and entry.fstype == "cgroup2" for entry in facts.mounts):
        return ""
    items: dict[str, None] = {}
    for partition in config.cgroup_partitions:
        local = os.path.relpath(partition.where, CGROUP_ROOT).split("/")
        remote = os.path.relpath(partition.remote, CGROUP_ROOT).split("/")
        if not is_under(partition.where, CGROUP_ROOT) or not is_under(partition.remote, CGROUP_ROOT):
            continue
        if len(local) < 2 or len(remote) < 2:
            continue  # a hierarchy's root is no partition
        host_group, local_group = "/" + "/".join(remote[1:]), "/" + "/".join(local[1:])
        if any(c in host_group + local_group for c in "=;"):
            continue  # the map has no way to write these
        for controller in local[0].split(","):
            if controller and "=" not in controller and ";" not in controller:
                items[f"{controller}={host_group}={local_group}"] = None
    return ";".join(items)


def order(steps: list[Step]) -> tuple[Step, ...]:
    """Parents before children, otherwise the declared order; then number the layers.

    Step B must follow a mount A when B's path lies below A's mount point (B
    would be hidden under A otherwise) or B reads from below it (a bind's
    source), and stacked mounts at one path keep their declared order.  One
    exception: a mount on a path an earlier step already mounts on covers it
    on purpose, so it does not move before steps declared ahead of it.
    """
    mounts = [(i, step.mountpoint) for i, step in enumerate(steps) if step.mountpoint]
    first = {point: i for i, point in reversed(mounts)}  # the first mount at each point
    covers = {i for i, point in mounts if first[point] != i}
    preds: list[set[int]] = [set() for _ in steps]
    for j, step in enumerate(steps):
        for i, point in mounts:
            if i == j or (i in covers and i > j):
                continue
            below = is_under(step.path, point, strict=True) or any(is_under(need, point) for need in step.needs)
            if below or (step.mountpoint == point and i < j):
                preds[j].add(i)
    totals = Counter(point for _, point in mounts)
    layers: Counter[str] = Counter()
    ordered: list[Step] = []
    placed: set[int] = set()
    while len(placed) < len(steps):
        # The first step, in declared order, whose predecessors are all placed.
        ready = next((j for j, before in enumerate(preds) if j not in placed and before <= placed), None)
        if ready is None:
            stuck = ", ".join(step.path for j, step in enumerate(steps) if j not in placed)
            raise ConfigError(f"the mounts cannot be ordered (they depend on each other): {stuck}")
        placed.add(ready)
        step = steps[ready]
        if at := step.mountpoint:
            step = replace(step, layer=layers[at], layers=totals[at])
            layers[at] += 1
        ordered.append(step)
    return tuple(ordered)
