"""The mount orchestrator's pure parts: mountinfo parsing, options, paths in a rootfs, the planner, the config."""

from __future__ import annotations

import os
import stat
import tomllib
from dataclasses import replace
from pathlib import Path

import pytest

from offload import proc
from offload.errors import ConfigError
from offload.mounts import config, mountinfo, paths, plan, syscalls
from offload.mounts.machine import DeviceNode, Facts
from offload.mounts.ops import BindOp, MakeDir, MakeLink, MakeNode, MountOp, QtfsMount, Skipped, WriteFile
from offload.prefix import is_under

# A cgroup v1 layout like this machine's (cpu and cpuacct apart, no
# net_cls), a cgroup2 at unified, and an escaped path.
MOUNTINFO = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
23 27 0:22 / /sys rw,relatime shared:7 - sysfs sysfs rw
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard
31 23 0:28 / /sys/fs/cgroup ro,nosuid,nodev,noexec - tmpfs tmpfs ro,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,nosuid,nodev,noexec,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/net_cls,net_prio rw,relatime - cgroup cgroup rw,net_cls,net_prio
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate
50 27 254:0 /srv/a\\040b /mnt/with\\040space rw - ext4 /dev/vda rw
60 27 0:50 / /t/sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu
"""

TARGET = "/t"
FACTS = Facts(
    mounts=mountinfo.parse(MOUNTINFO),
    filesystems=frozenset({"proc", "sysfs", "tmpfs", "devpts", "mqueue", "hugetlbfs", "cgroup", "cgroup2"}),
    devices=(DeviceNode("null", 1, 3, 0o666, 0, 0), DeviceNode("kvm", 10, 232, 0o660, 0, 107)),
)


def join(path: str) -> str:
    return TARGET + path


def build(cfg: config.PrepareConfig | None = None, facts: Facts = FACTS) -> plan.Plan:
    return plan.build(cfg or config.PrepareConfig(), TARGET, facts, join)


# mountinfo and options --------------------------------------------------------


def test_mountinfo_fields_and_escapes() -> None:
    entries = mountinfo.parse(MOUNTINFO)
    sys_entry = entries[1]
    assert (sys_entry.mount_id, sys_entry.parent_id, sys_entry.device) == (23, 27, "0:22")
    assert sys_entry.optional == ("shared:7",) and sys_entry.fstype == "sysfs"
    spaced = next(e for e in entries if e.mount_id == 50)
    assert spaced.mount_point == "/mnt/with space" and spaced.root == "/srv/a b"
    systemd = next(e for e in entries if e.mount_point.endswith("systemd"))
    assert systemd.filesystem_data == ("xattr", "name=systemd")
    assert [e.mount_point for e in mountinfo.stack_at(entries, "/sys")] == ["/sys"]
    assert [e.mount_id for e in mountinfo.under(entries, "/sys/fs/cgroup")] == [32, 33, 34, 40, 41]


def test_bind_root_names_the_filesystem_and_directory_of_a_source() -> None:
    entries = mountinfo.parse(MOUNTINFO)
    assert mountinfo.bind_root(entries, "/srv/x") == ("254:0", "/srv/x")
    assert mountinfo.bind_root(entries, "/mnt/with space/d") == ("254:0", "/srv/a b/d")
    assert mountinfo.bind_root(entries, "/proc") == ("0:21", "/")


def test_is_under_matches_whole_components() -> None:
    assert is_under("/a/b", "/a", strict=True) and not is_under("/ab", "/a", strict=True)
    assert not is_under("/a", "/a", strict=True) and is_under("/a", "/a")


def test_split_options_separates_flags_from_filesystem_data() -> None:
    flags, data = syscalls.split_options("ro,nosuid,nodev,noexec,relatime,mode=0755,size=4m")
    expected = syscalls.MS_RDONLY | syscalls.MS_NOSUID | syscalls.MS_NODEV | syscalls.MS_NOEXEC | syscalls.MS_RELATIME
    assert flags == expected
    assert data == "mode=0755,size=4m"
    assert syscalls.split_options("rw,cpu,cpuacct") == (0, "cpu,cpuacct")


# paths inside the rootfs ------------------------------------------------------------


def test_resolve_keeps_absolute_symlinks_inside_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "run").mkdir(parents=True)
    (root / "var").mkdir()
    (root / "var" / "run").symlink_to("/run")  # as on Debian
    (root / "up").symlink_to("../../..")
    (root / "loop").symlink_to("loop")
    assert paths.resolve(str(root), "/var/run/rexec") == f"{root}/run/rexec"
    assert paths.resolve(str(root), "/up/etc") == f"{root}/etc"
    assert paths.resolve(str(root), "/../../x/./y") == f"{root}/x/y"
    assert paths.inside(str(root), f"{root}/run/rexec") == "/run/rexec"
    with pytest.raises(ConfigError, match="symbolic links"):
        paths.resolve(str(root), "/loop/x")


# the planner ------------------------------------------------------------------------


def test_default_plan_without_a_host_has_no_qtfs_steps() -> None:
    steps = build().steps
    assert not [s for s in steps if isinstance(s, QtfsMount) or getattr(s, "fstype", "") == "qtfs"]
    kinds = [(type(s).__name__, s.path) for s in steps]
    assert kinds[:2] == [("MountOp", "/t/proc"), ("MountOp", "/t/sys")]
    assert ("MakeNode", "/t/dev/kvm") in kinds and ("MakeLink", "/t/dev/ptmx") in kinds
    # libvirt's console lock files, in the fresh /run, after it is mounted.
    assert kinds.index(("MakeDir", "/t/run/lock")) > kinds.index(("MountOp", "/t/run"))
    devpts = next(s for s in steps if isinstance(s, MountOp) and s.fstype == "devpts")
    assert "newinstance" in devpts.options and "ptmxmode=0666" in devpts.options
    assert not [s for s in steps if isinstance(s, MountOp) and s.fstype == "devtmpfs"]
    binds = [s for s in steps if isinstance(s, BindOp)]
    assert [b.source for b in binds] == ["/var/run/rexec", "/var/run/udsproxy", "/etc/rexec"]
    assert [b.readonly for b in binds] == [False, False, True]


def test_every_step_comes_after_the_mounts_above_it() -> None:
    steps = build(config.PrepareConfig(host="169.254.77.1:7003")).steps
    for index, step in enumerate(steps):
        for later in steps[index + 1 :]:
            point = later.mountpoint
            covers_earlier = point and any(s.mountpoint == point for s in steps[: steps.index(later)])
            if point and not covers_earlier:
                assert not is_under(step.path, point, strict=True), f"{step.path} before its parent {point}"


def test_cgroups_mirror_the_machine_layout_not_a_fixed_list() -> None:
    cgroups = [s for s in build().steps if isinstance(s, MountOp) and s.path.startswith("/t/sys/fs/cgroup")]
    summary = [(s.path, s.fstype, s.options, s.identity) for s in cgroups]
    assert summary == [
        ("/t/sys/fs/cgroup", "tmpfs", "ro,nosuid,nodev,noexec,mode=755", ()),
        ("/t/sys/fs/cgroup/cpu", "cgroup", "nosuid,nodev,noexec,relatime,cpu", ("cpu",)),
        ("/t/sys/fs/cgroup/cpuacct", "cgroup", "relatime,cpuacct", ("cpuacct",)),
        ("/t/sys/fs/cgroup/net_cls,net_prio", "cgroup", "relatime,net_cls,net_prio", ("net_cls", "net_prio")),
        ("/t/sys/fs/cgroup/systemd", "cgroup", "relatime,xattr,name=systemd", ("xattr", "name=systemd")),
        ("/t/sys/fs/cgroup/unified", "cgroup2", "relatime,nsdelegate", ()),
    ]
    # The read-only tmpfs gets its children's directories before it turns read-only.
    assert cgroups[0].subdirs == ("cpu", "cpuacct", "net_cls,net_prio", "systemd", "unified")
    assert cgroups[0].describe()[-1] == "mount -o remount,bind,ro /t/sys/fs/cgroup"


def test_cgroup2_only_machines_get_one_cgroup2_mount() -> None:
    facts = Facts(
        mounts=mountinfo.parse("31 23 0:28 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"),
        filesystems=FACTS.filesystems,
        devices=(),
    )
    cgroups = [s for s in build(facts=facts).steps if isinstance(s, MountOp) and "cgroup" in s.path]
    assert [(s.path, s.fstype, s.options) for s in cgroups] == [("/t/sys/fs/cgroup", "cgroup2", "nosuid,nsdelegate")]


def test_missing_hugetlbfs_is_skipped_with_a_note() -> None:
    facts = Facts(mounts=FACTS.mounts, filesystems=FACTS.filesystems - {"hugetlbfs"}, devices=())
    skipped = [s for s in build(facts=facts).steps if isinstance(s, Skipped)]
    assert [(s.path, s.name) for s in skipped] == [("/t/dev/hugepages", "hugetlbfs")]
    assert skipped[0].describe() == [
        "# skipped hugetlbfs on /t/dev/hugepages: this kernel has no hugetlbfs (/proc/filesystems)"
    ]


def test_a_host_adds_userspace_qtfs_exports_and_the_host_facts() -> None:
    cfg = config.PrepareConfig(
        host="169.254.77.1:7003", pki="/pki", exports=(config.HostDir("/var/lib/libvirt"),), sys_facts=False
    )
    steps = build(cfg).steps
    qtfs = [s for s in steps if isinstance(s, QtfsMount)]
    assert [(s.remote, s.path, s.mode) for s in qtfs] == [
        ("/var/lib/libvirt", "/t/var/lib/libvirt", ""),
        ("/proc", "/t/run/offload/qtfs-proc", "proc"),
    ]
    # This installation's own qtfs, whatever PATH holds.
    assert qtfs[1].argv() == [
        *proc.program("qtfs"),
        "mount",
        "--proc",
        "--pki",
        "/pki",
        "169.254.77.1:7003:/proc",
        "/t/run/offload/qtfs-proc",
    ]
    facts_binds = [s for s in steps if isinstance(s, BindOp) and s.source.startswith("/t/run/offload/qtfs-proc/")]
    assert {b.path for b in facts_binds} == {f"/t/proc/{name}" for name in plan.PROC_FILES}
    assert all(not b.create_target and b.missing == "skip" for b in facts_binds)
    order = [s.path for s in steps]
    # the staging mount after the tmpfs /run it lives on, the binds after both it and /proc
    assert order.index("/t/run") < order.index("/t/run/offload/qtfs-proc") < order.index(facts_binds[0].path)


def test_the_shims_partition_map_is_written_from_the_cgroup_partitions() -> None:
    partitions = (
        config.HostDir(remote="/sys/fs/cgroup/cpu,cpuacct/offload/machine", local="/sys/fs/cgroup/cpu/machine"),
        config.HostDir(remote="/sys/fs/cgroup/memory/offload/machine", local="/sys/fs/cgroup/memory/machine"),
        config.HostDir(remote="/sys/fs/cgroup/blkio/vms", local="/sys/fs/cgroup/net_cls,net_prio/machine"),
        config.HostDir(remote="/sys/fs/cgroup/cpuset", local="/sys/fs/cgroup/cpuset/machine"),  # a hierarchy's root
        config.HostDir(remote="/srv/cgroup/x", local="/sys/fs/cgroup/pids/machine"),  # not a cgroup mount's path
    )
    cfg = config.PrepareConfig(host="10.0.0.1:7003", cgroup_partitions=partitions)
    steps = build(cfg).steps
    (written,) = [s for s in steps if isinstance(s, WriteFile)]
    assert written.path == "/t/run/offload/cgroup-partitions"
    assert written.content == (
        "cpu=/offload/machine=/machine;memory=/offload/machine=/machine;net_cls=/vms=/machine;net_prio=/vms=/machine"
    )
    order = [s.path for s in steps]
    assert order.index("/t/run") < order.index(written.path)
    # Without partitions, or without a host (nothing is mounted), nothing is written.
    assert not [s for s in build(replace(cfg, cgroup_partitions=())).steps if isinstance(s, WriteFile)]
    assert not [s for s in build(replace(cfg, host="")).steps if isinstance(s, WriteFile)]
    # One cgroup2 hierarchy: the shim maps controller hierarchies only.
    unified = Facts(
        mounts=mountinfo.parse("31 23 0:28 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"),
        filesystems=FACTS.filesystems,
        devices=(),
    )
    assert plan.shim_partitions(cfg, unified) == ""


def test_the_kernel_module_is_used_where_the_kernel_has_qtfs() -> None:
    facts = Facts(mounts=FACTS.mounts, filesystems=FACTS.filesystems | {"qtfs"}, devices=())
    cfg = config.PrepareConfig(host="10.0.0.1:7003", exports=(config.HostDir("/home/VMs"),), sys_facts=False)
    qtfs = [s for s in build(cfg, facts).steps if isinstance(s, MountOp) and s.fstype == "qtfs"]
    assert [(s.source, s.path, s.options) for s in qtfs] == [
        ("/home/VMs", "/t/home/VMs", ""),
        ("/proc", "/t/run/offload/qtfs-proc", "proc"),
    ]
    assert qtfs[1].describe()[-1] == "mount -t qtfs -o proc /proc /t/run/offload/qtfs-proc"


def test_configured_mounts_move_before_the_steps_they_would_hide() -> None:
    cfg = config.PrepareConfig(
        host="h:1",
        exports=(config.HostDir("/var/lib/libvirt"),),
        proc_facts=False,
        sys_facts=False,
        mount=(config.MountSpec(type="tmpfs", target="/var/lib"),),
    )
    order = [s.path for s in build(cfg).steps]
    assert order.index("/t/var/lib") < order.index("/t/var/lib/libvirt")


def test_a_mount_covering_an_earlier_one_keeps_its_place() -> None:
    a = MountOp(path="/t/x", fstype="tmpfs", source="a")
    child = MountOp(path="/t/x/y", fstype="tmpfs", source="b")
    cover = BindOp(path="/t/x", source="/elsewhere")
    ordered = plan.order([a, child, cover])
    assert [(s.path, s.layer) for s in ordered] == [("/t/x", 0), ("/t/x/y", 0), ("/t/x", 1)]


def test_mutually_dependent_binds_are_a_config_error() -> None:
    one = BindOp(path="/t/a", source="/t/b/f")
    two = BindOp(path="/t/b", source="/t/a/f")
    with pytest.raises(ConfigError, match="cannot be ordered"):
        plan.order([one, two])


def test_describe_gives_shell_commands() -> None:
    node = MakeNode(path="/t/dev/kvm", major=10, minor=232, mode=0o660, gid=107)
    assert node.describe() == ["mknod -m 0660 /t/dev/kvm c 10 232", "chown 0:107 /t/dev/kvm"]
    assert MakeLink(path="/t/dev/ptmx", link="pts/ptmx").describe() == ["ln -s pts/ptmx /t/dev/ptmx"]
    assert MakeDir(path="/t/run/lock", mode=0o1777).describe() == ["mkdir -m 1777 /t/run/lock"]
    bind = BindOp(path="/t/with space", source="/nonexistent-offm", readonly=True, recursive=True)
    assert bind.describe() == [
        "mkdir -p '/t/with space'",
        "mount --rbind /nonexistent-offm '/t/with space'",
        "mount -o remount,bind,ro '/t/with space'",
    ]


# the configuration ---------------------------------------------------------------------


def test_missing_config_file_means_defaults(tmp_path: Path) -> None:
    assert config.load(tmp_path / "absent.toml") == config.PrepareConfig()


def test_config_round_trips_through_toml_and_json(tmp_path: Path) -> None:
    original = config.PrepareConfig(
        target="/srv/root",
        host="169.254.77.1:7003",
        pki="/etc/offload/pki",
        insecure=True,
        exports=(config.HostDir("/var/lib/libvirt"), config.HostDir("/srv/images", "/home/VMs")),
        devices=("null", "kvm"),
        hugetlbfs=False,
        bind=(config.MountSpec(source="/var/run/rexec", missing="create"),),
        mount=(
            config.MountSpec(type="tmpfs", target="/var/cache/libvirt", options="mode=0755,size=64m"),
            config.MountSpec(type="rbind", source="/dev/vfio", target="/dev/vfio", options="ro"),
        ),
    )
    file = tmp_path / "prepare.toml"
    file.write_text(original.to_toml())
    assert config.load(file) == original
    assert config.from_dict(__import__("json").loads(original.to_json())) == original


def test_config_accepts_short_forms_and_names_bad_keys(tmp_path: Path) -> None:
    file = tmp_path / "prepare.toml"
    file.write_text('host = "169.254.77.1:7003"\nexports = ["/var/lib/libvirt", { remote = "/a", local = "/b" }]\n')
    loaded = config.load(file)
    assert loaded.exports == (config.HostDir("/var/lib/libvirt"), config.HostDir("/a", "/b"))
    for text, message in (
        ('hots = "x:1"\n', "unknown key hots"),
        ("hugetlbfs = 1\n", "hugetlbfs: expected true or false"),
        ('host = "169.254.77.1"\n', "HOST:PORT"),
        ('[[bind]]\nsource = "relative"\n', "absolute"),
        ('[[mount]]\ntype = "tmpfs"\n', "needs a target"),
        ('[[bind]]\nsource = "/x"\noptions = "nosuid"\n', "only 'ro'"),
        ("target = [\n", "not valid TOML"),
    ):
        file.write_text(text)
        with pytest.raises(ConfigError, match=message) as caught:
            config.load(file)
        assert str(file) in str(caught.value)


def test_the_shipped_example_config_loads() -> None:
    example = Path(__file__).parent.parent / "systemd" / "prepare.toml.example"
    loaded = config.from_dict(tomllib.loads(example.read_text()))
    assert loaded.host


def test_udsproxy_run_dir_matches_the_daemon() -> None:
    from offload.udsproxy.daemon import ProxyConfig

    assert ProxyConfig.__dataclass_fields__["run_dir"].default == config.UDSPROXY_RUN_DIR


def test_the_machine_facts_name_real_devices() -> None:
    from offload.mounts import machine

    found = {d.name: d for d in machine.devices(("null", "no-such-device"), "/nonexistent")}
    assert list(found) == ["null"]
    assert (found["null"].major, found["null"].minor) == (os.major(os.stat("/dev/null").st_rdev), 3)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: mknod and chown of a device node")
def test_device_groups_are_mapped_to_the_targets_numbers(tmp_path: Path) -> None:
    """A device's group is found by name in the target's /etc/group, whatever this machine's /dev/kvm is.

    The nodes are made on a fixture directory (the same character device as
    /dev/null), so the test sets the state it checks: a node whose group has
    a name here gets the target's number for that name; a group the target
    does not know, and root, keep their numbers.
    """
    import grp

    from offload.mounts import machine

    named = next(group for group in grp.getgrall() if group.gr_gid != 0)
    unknown = next(gid for gid in range(60000, 65000) if not _group_exists(gid))
    dev = tmp_path / "dev"
    dev.mkdir()
    for name, gid in (("kvm", named.gr_gid), ("vhost-net", 0), ("net/tun", unknown)):
        node = dev / name
        node.parent.mkdir(exist_ok=True)
        os.mknod(node, 0o660 | stat.S_IFCHR, os.makedev(1, 3))
        os.chown(node, 0, gid)
        os.chmod(node, 0o660)  # mknod applies the umask
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "group").write_text(f"root:x:0:\ntty:x:77:\n{named.gr_name}:x:4242:\n")

    nodes = {
        node.name: node for node in machine.devices(("kvm", "vhost-net", "net/tun", "absent"), str(tmp_path), str(dev))
    }

    assert set(nodes) == {"kvm", "vhost-net", "net/tun"}
    assert nodes["kvm"].gid == 4242  # libvirt in the target sees it as its own group of that name
    assert nodes["vhost-net"].gid == 0
    assert nodes["net/tun"].gid == unknown
    assert (nodes["kvm"].major, nodes["kvm"].minor, nodes["kvm"].mode) == (1, 3, 0o660)
    assert machine.gather(str(tmp_path), ()).tty_gid == 77


def _group_exists(gid: int) -> bool:
    import grp

    try:
        grp.getgrgid(gid)
    except KeyError:
        return False
    return True


@pytest.mark.parametrize("path", ["/sys/fs/cgroup/cpu/mach\nine", "/var/lib/\x1blibvirt"])
def test_a_control_character_in_a_directory_path_is_refused(path: str) -> None:
    # The shim's cgroup map is one line of these paths: a newline would cut it short.
    with pytest.raises(ConfigError):
        config.HostDir(remote=path)
    with pytest.raises(ConfigError):
        config.HostDir(remote="/sys/fs/cgroup/cpu/machine", local=path)


def test_a_directory_where_the_cgroup_map_goes_is_wrong_not_a_crash(tmp_path: Path) -> None:
    (tmp_path / "run" / "offload" / "cgroup-partitions").mkdir(parents=True)
    step = WriteFile(path=str(tmp_path / "run" / "offload" / "cgroup-partitions"), content="cpu=/a=/b")
    assert step.check(()).detail == "is not a regular file"
