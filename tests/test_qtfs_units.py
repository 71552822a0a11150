"""qtfs pieces without a network: whitelist, facts, inode table, the source syntax, containment."""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path

import pytest

from offload.errors import ConfigError
from offload.mounts.machine import filesystems
from offload.protocol import qtfs as wire
from offload.qtfs import facts
from offload.qtfs.backend import Backend, Export
from offload.qtfs.cli import split_source
from offload.qtfs.inodes import InodeTable
from offload.qtfs.whitelist import Whitelist, parse

REFERENCE = """
# the reference's sample, plus a ';'-separated list
[Open]
Path=/var/lib/libvirt/qemu;/home/VMs;
[Write]
Path=/var/lib/libvirt/qemu
[Mount]
Path=/var/lib/libvirt
[Kill]
Path=qemu-kvm
"""


def test_whitelist_reference_format() -> None:
    rules = parse(REFERENCE)
    assert rules.allows("Open", b"/var/lib/libvirt/qemu")
    assert rules.allows("Open", b"/var/lib/libvirt/qemu/domain-1/x")
    assert not rules.allows("Open", b"/var/lib/libvirt/qemuX")  # component boundary
    assert rules.allows("Open", b"/home/VMs/disk.img")
    assert not rules.allows("Rmdir", b"/var/lib/libvirt/qemu/x")  # no section: nothing allowed
    assert rules.allows("Mount", b"/var/lib/libvirt")
    assert Whitelist().allows("Unlink", b"/anything")  # no whitelist: exports decide


@pytest.mark.parametrize(
    "text", ["[Open]\nPath=relative\n", "[Open]\nPath=/a/../b\n", "[Nope]\nPath=/a\n", "Path=/a\n", "[Open]\nX=/a\n"]
)
def test_whitelist_errors(text: str) -> None:
    with pytest.raises(ConfigError):
        parse(text)


def test_facts() -> None:
    assert "cpuinfo" in facts.PROC_FILES and "meminfo" in facts.PROC_FILES
    assert "devices/system" in facts.SYS_DIRS
    assert {b"self", b"thread-self"} == facts.PER_PROCESS
    assert facts.sys_visible(b"devices") and facts.sys_visible(b"devices/system/cpu/online")
    assert not facts.sys_visible(b"devices/pci0000:00") and not facts.sys_visible(b"fs/cgroup")


def test_kernel_module_detection(tmp_path: Path) -> None:
    listing = tmp_path / "filesystems"
    listing.write_text("nodev\tsysfs\nnodev\tproc\n\text4\n")
    assert "qtfs" not in filesystems(str(listing))
    listing.write_text("nodev\tsysfs\nnodev\tqtfs\n")
    assert "qtfs" in filesystems(str(listing))
    assert ("qtfs" in filesystems()) == ("qtfs" in Path("/proc/filesystems").read_text().split())


@pytest.mark.parametrize(
    ("text", "address", "remote"),
    [
        ("169.254.77.1:7003:/var/lib/libvirt", "tcp://169.254.77.1:7003", b"/var/lib/libvirt"),
        ("tcp://h:1:/x", "tcp://h:1", b"/x"),
        ("unix:///run/q.sock:/proc", "unix:///run/q.sock", b"/proc"),
    ],
)
def test_split_source(text: str, address: str, remote: bytes) -> None:
    parsed, path = split_source(text)
    assert (str(parsed), path) == (address, remote)


def test_split_source_errors() -> None:
    for text in ("host:7003", "h:1:/a/../b"):
        with pytest.raises(ConfigError):
            split_source(text)


def test_inode_table_rename_and_forget() -> None:
    table = InodeTable((1, 1))
    a = table.remember(b"d", (1, 2))
    b = table.remember(b"d/f", (1, 3))
    assert table.remember(b"d", (1, 2)) is a and a.lookups == 2
    table.moved(b"d", b"e")
    assert table.path(a.inode) == b"e" and table.path(b.inode) == b"e/f"
    table.removed(b"e/f")
    with pytest.raises(OSError):
        table.path(b.inode)
    table.forget(a.inode, 2)
    with pytest.raises(OSError):
        table.path(a.inode)
    replaced = table.remember(b"e", (1, 9))  # a new file at a known path
    assert replaced.inode not in (a.inode, b.inode)


def test_backend_contains_paths(tmp_path: Path) -> None:
    export = tmp_path / "export"
    (export / "dir").mkdir(parents=True)
    (tmp_path / "secret").write_text("no")
    os.symlink("/etc", export / "abs")
    os.symlink("../../secret", export / "dir" / "up")
    os.symlink("dir", export / "inside")
    backend = Backend((Export(os.fsencode(export)),), Whitelist())
    try:
        backend.mount(wire.Mount(os.fsencode(export)))
        assert backend.lookup(wire.Lookup(b"inside/up")).attr  # the link itself: fine
        for path in (b"abs/passwd", b"dir/up/x", b"inside/up/x"):
            with pytest.raises(OSError) as caught:
                backend.lookup(wire.Lookup(path))
            assert caught.value.errno == errno.EACCES, path
        with pytest.raises(OSError) as caught:
            backend.mount(wire.Mount(os.fsencode(tmp_path)))
        assert caught.value.errno == errno.EACCES  # not exported
    finally:
        backend.close()


def test_a_procfs_inside_an_ordinary_export_is_refused_without_leaking_fds() -> None:
    backend = Backend((Export(b"/"),), Whitelist())
    try:
        backend.mount(wire.Mount(b"/"))
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(50):
            with pytest.raises(PermissionError):
                backend.open(wire.Open(b"proc", os.O_RDONLY))  # the procfs root: its parent is ordinary
        assert len(os.listdir("/proc/self/fd")) == before
    finally:
        backend.close()


def test_export_syntax() -> None:
    assert Export.parse("/a/b:ro") == Export(b"/a/b", True)
    assert Export.parse("/a/b/") == Export(b"/a/b", False)
    with pytest.raises(ValueError):
        Export.parse("a/b")


def test_tree_watch_reports_host_changes_by_relative_path(tmp_path: Path) -> None:
    from offload.qtfs import watch

    root = tmp_path / "tree"
    (root / "d").mkdir(parents=True)
    (root / "d" / "f").write_text("x")
    fd = os.open(root, os.O_PATH)
    try:
        assert watch.watchable(fd)  # tmp_path is on a local filesystem
    finally:
        os.close(fd)
    proc_fd = os.open("/proc", os.O_PATH)
    try:
        assert not watch.watchable(proc_fd)  # changes to /proc raise no events
    finally:
        os.close(proc_fd)
    tree = watch.TreeWatch(os.fsencode(root))
    try:
        assert len(tree) == 2
        change = wire.Change
        (root / "d" / "f").write_text("y")
        os.chmod(root / "d" / "f", 0o600)
        os.chmod(root / "d", 0o700)
        assert tree.read() == [
            wire.Invalidate(change.DATA, b"d/f"),
            wire.Invalidate(change.ATTR, b"d/f"),
            wire.Invalidate(change.ATTR, b"d"),
        ]
        assert tree.read() == []
        # A new directory filled before its watch was added: the whole of it is announced.
        (root / "n" / "m").mkdir(parents=True)
        (root / "n" / "m" / "g").write_text("g")
        assert tree.read() == [wire.Invalidate(change.ENTRY, b"n")]
        (root / "n" / "m" / "g").write_text("h")
        assert tree.read() == [wire.Invalidate(change.DATA, b"n/m/g")]
        # A renamed directory is watched under its new name, not the old.
        os.rename(root / "n", root / "d" / "n2")
        assert tree.read() == [wire.Invalidate(change.ENTRY, b"n"), wire.Invalidate(change.ENTRY, b"d/n2")]
        (root / "d" / "n2" / "m" / "g").write_text("i")
        assert tree.read() == [wire.Invalidate(change.DATA, b"d/n2/m/g")]
        # Moved out of the tree: no longer reported.
        os.rename(root / "d" / "n2", tmp_path / "away")
        assert tree.read() == [wire.Invalidate(change.ENTRY, b"d/n2")]
        (tmp_path / "away" / "m" / "g").write_text("j")
        assert tree.read() == []
        # A lost event (the kernel's queue overflowed) means: forget everything.
        overflow = struct.pack("iIII", -1, watch.IN_Q_OVERFLOW, 0, 0)
        out: list[wire.Invalidate] = []
        tree._parse(overflow, out)
        assert out == [wire.Invalidate(change.ALL)]
    finally:
        tree.close()


def test_a_tree_too_big_to_watch_in_time_is_served_uncached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from offload.qtfs import watch

    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
    in_time = watch.TreeWatch(os.fsencode(tmp_path))
    try:
        assert in_time.complete  # within the time: every directory watched
    finally:
        in_time.close()
    monkeypatch.setattr(watch, "WATCH_SECONDS", -1.0)
    late = watch.TreeWatch(os.fsencode(tmp_path))
    try:
        assert not late.complete  # the Mount is answered, without the coherent cache
    finally:
        late.close()
