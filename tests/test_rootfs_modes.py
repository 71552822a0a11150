"""offload rootfs: copy, image and debootstrap modes, for real (debootstrap is the slow one)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from offload.rootfs_builder.layout import machine_arch
from tests.rootfs_helpers import ok, private, small_root

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root")
QEMU = f"/usr/bin/qemu-system-{machine_arch()}"


def _source(tmp_path: Path) -> Path:
    source = small_root(tmp_path / "source")
    (source / "usr/bin/qemu-system-x86_64").write_text("#!/bin/sh\necho the real qemu\n")
    (source / "usr/bin/linked-a").write_text("one file, two names\n")
    os.link(source / "usr/bin/linked-a", source / "usr/bin/linked-b")
    (source / "etc/setuid").write_text("x")
    os.chmod(source / "etc/setuid", 0o4755)
    os.setxattr(source / "etc/setuid", "user.offload", b"kept")
    os.mkfifo(source / "etc/fifo")
    (source / "etc/absolute").symlink_to("/etc/hostname")
    (source / "run/state").write_text("run-time state, not copied\n")
    (source / "proc/fake").write_text("not copied\n")
    return source


def test_copy_mode_links_package_trees_and_copies_the_rest(tmp_path: Path) -> None:
    source = _source(tmp_path)
    original = (source / "usr/bin/qemu-system-x86_64").read_bytes()
    target = tmp_path / "root"
    out = ok(private(f"$OFFLOAD rootfs build --mode copy --no-apt --source {source} {target}"))
    assert "cannot reflink: hard links for /usr" in out and "copied" in out
    assert "libvirt is missing" in out
    # /usr is hard-linked (same filesystem), /etc copied with its metadata.
    assert os.stat(target / "usr/bin/python3.11").st_ino == os.stat(source / "usr/bin/python3.11").st_ino
    assert os.stat(target / "usr/bin/linked-a").st_ino == os.stat(target / "usr/bin/linked-b").st_ino
    copied = os.stat(target / "etc/setuid")
    assert copied.st_ino != os.stat(source / "etc/setuid").st_ino and copied.st_mode & 0o7777 == 0o4755
    assert os.getxattr(target / "etc/setuid", "user.offload") == b"kept"
    assert (target / "etc/fifo").is_fifo() and os.readlink(target / "etc/absolute") == "/etc/hostname"
    assert list((target / "run").iterdir()) == [] and list((target / "proc").iterdir()) == []
    # The wrapper replaced the rootfs's qemu by rename: the source's file is untouched.
    assert (source / "usr/bin/qemu-system-x86_64").read_bytes() == original
    assert b"exec /usr/bin/rexec" in (target / "usr/bin/qemu-system-x86_64").read_bytes()
    assert not (tmp_path / ".root.partial").exists()
    again = ok(private(f"$OFFLOAD rootfs build --mode copy --no-apt --source {source} {target}"))
    assert "nothing changed" in again
    check = private(f"$OFFLOAD rootfs check {target}")
    assert check.returncode == 1
    problems = [line for line in check.stdout.splitlines() if "PROBLEM" in line]
    assert problems and all("libvirt missing" in line for line in problems), check.stdout
    assert "rexec starts in the rootfs" in check.stdout


def test_copy_mode_refuses_a_foreign_target(tmp_path: Path) -> None:
    source = _source(tmp_path)
    target = tmp_path / "root"
    target.mkdir()
    (target / "precious").write_text("not ours\n")
    result = private(f"$OFFLOAD rootfs build --mode copy --no-apt --source {source} {target}")
    assert result.returncode == 1 and "was not built by offload rootfs build" in result.stderr
    assert (target / "precious").exists()


def _disk_image(tmp_path: Path, tree: Path) -> Path:
    """A qcow2 disk: GPT, a small EFI partition, then an ext4 root made with mkfs.ext4 -d (no mount)."""
    fs = tmp_path / "root.ext4"
    subprocess.run(["mkfs.ext4", "-q", "-d", str(tree), str(fs), "160M"], check=True)
    raw = tmp_path / "disk.raw"
    with open(raw, "wb") as stream:
        stream.truncate((1 + 2 + 160 + 1) * (1 << 20))
    layout = "label: gpt\nstart=2048, size=4096, type=U\nstart=6144, size=327680, type=L\n"
    subprocess.run(["sfdisk", "--quiet", str(raw)], input=layout, text=True, check=True)
    with open(fs, "rb") as source, open(raw, "r+b") as disk:
        disk.seek(6144 * 512)
        while chunk := source.read(1 << 20):
            disk.write(chunk)
    qcow2 = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(qcow2)], check=True)
    raw.unlink()
    fs.unlink()
    return qcow2


def _leftovers(tmp_path: Path) -> list[str]:
    """Loop devices, FUSE exports and daemons of this test still around."""
    loops = subprocess.run(["losetup", "--list", "--noheadings"], capture_output=True, text=True).stdout
    found = [line for line in loops.splitlines() if str(tmp_path) in line]
    with open("/proc/self/mountinfo") as stream:
        found += [line for line in stream if str(tmp_path) in line]
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    found += [line for line in ps.splitlines() if "qemu-storage-daemon" in line and str(tmp_path) in line]
    return found


def test_image_mode_copies_the_root_partition_of_a_qcow2(tmp_path: Path) -> None:
    tree = _source(tmp_path)
    (tree / "etc/os-release").write_text('NAME="from the image"\n')
    image = _disk_image(tmp_path, tree)
    target = tmp_path / "root"
    out = ok(private(f"$OFFLOAD rootfs build --mode image --image {image} --no-apt {target}", timeout=180))
    assert "qemu-storage-daemon" in out and "partition 2" in out and "mounted read-only" in out
    assert (target / "etc/os-release").read_text() == 'NAME="from the image"\n'
    assert (target / "usr/bin/python3.11").stat().st_size > 1000
    assert b"exec /usr/bin/rexec" in (target / "usr/libexec/qemu-kvm").read_bytes()
    assert "rexec starts in the rootfs" in private(f"$OFFLOAD rootfs check {target}").stdout
    assert _leftovers(tmp_path) == []


def test_a_failed_image_build_leaves_nothing(tmp_path: Path) -> None:
    tree = tmp_path / "empty"
    tree.mkdir()
    image = _disk_image(tmp_path, tree)
    target = tmp_path / "root"
    # Partition 1 holds no filesystem: the build fails after the export and the loop device exist.
    result = private(f"$OFFLOAD rootfs build --mode image --image {image} --partition 1 {target}", timeout=120)
    assert result.returncode == 1 and "no filesystem found" in result.stderr, result.stdout + result.stderr
    assert not target.exists() and not (tmp_path / ".root.partial").exists()
    assert not list(tmp_path.glob(".offload-image-*"))
    assert _leftovers(tmp_path) == []


@pytest.mark.slow
def test_debootstrap_mode_builds_a_clean_rootfs_with_libvirt(tmp_path: Path) -> None:
    target = tmp_path / "root"
    out = ok(private(f"$OFFLOAD rootfs build --mode debootstrap --host 169.254.77.1 {target}", timeout=400))
    assert "debootstrap" in out and "python3 libvirt-daemon-system libvirt-clients" in out
    check = ok(private(f"$OFFLOAD rootfs check {target}"))
    assert check.strip().endswith("good") and "rexec starts in the rootfs" in check
    assert ok(private(f"chroot {target} virsh --version")).startswith("9.")
    assert not (target / "usr/sbin/policy-rc.d").exists()
    assert "nothing changed" in ok(private(f"$OFFLOAD rootfs build --mode debootstrap {target} --host 169.254.77.1"))
