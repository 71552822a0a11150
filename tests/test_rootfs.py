"""offload rootfs: overlay mode, the wrapper's quoting, manifest, idempotency and check (fast tests).

Every build runs in a private mount namespace (`unshare -m`), so the
overlay it mounts ends with the test, also when it fails.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from offload.errors import RootfsError
from offload.mounts import mountinfo
from offload.rootfs_builder import install, modes, partitions
from offload.rootfs_builder.layout import Layout, machine_arch
from offload.rootfs_builder.modes import content_mounts
from tests.rootfs_helpers import ok, private

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root")
QEMU = f"/usr/bin/qemu-system-{machine_arch()}"


def _sha(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_overlay_build_is_idempotent_and_leaves_the_machine_alone(tmp_path: Path) -> None:
    target = tmp_path / "root"
    machine_qemu = _sha(QEMU)
    out = ok(
        private(
            f"""
            $OFFLOAD rootfs build --host 169.254.77.1 {target}
            echo ---second
            $OFFLOAD rootfs build --host 169.254.77.1 {target}
            echo ---check
            $OFFLOAD rootfs check {target}
            echo ---virsh
            chroot {target} virsh --version
            echo ---run
            ls -A {target}/run {target}/tmp | wc -l
            """
        )
    )
    first, rest = out.split("---second")
    second, rest = rest.split("---check")
    check, rest = rest.split("---virsh")
    virsh, listing = rest.split("---run")
    assert "installed /usr/bin/qemu-kvm" in first and "built in overlay mode" in first
    assert "nothing changed" in second and "installed" not in second
    assert check.strip().endswith("good") and "rexec starts in the rootfs" in check
    assert virsh.strip().startswith("9.")
    # /run and /tmp are hidden (opaque): only the two "name:" header lines and a blank one.
    assert int(listing.strip()) == 3
    assert _sha(QEMU) == machine_qemu, "the machine's own qemu must never be touched"
    # The upper layer holds only what differs: a few hundred kilobytes.
    upper = tmp_path / ".root-upper"
    size = sum(p.stat().st_size for p in upper.rglob("*") if p.is_file() and not p.is_symlink())
    assert size < 2_000_000
    document = json.loads((upper / "etc/offload/rootfs-manifest.json").read_text())
    assert document["mode"] == "overlay" and document["host"] == "169.254.77.1"
    assert document["overlay"]["lower"] == "/"
    paths = {entry["path"]: entry for entry in document["files"]}
    assert {"/usr/bin/rexec", "/usr/bin/qemu-kvm", "/usr/libexec/qemu-kvm", QEMU} <= set(paths)
    assert paths["/usr/bin/qemu-kvm"]["sha256"] == _sha(upper / "usr/bin/qemu-kvm")
    env = (upper / "etc/offload/rexec.env").read_text()
    assert "CMD_NET_ADDR=tcp://169.254.77.1:7001" in env


def test_check_reports_a_broken_rootfs_and_build_repairs_it(tmp_path: Path) -> None:
    target = tmp_path / "root"
    out = ok(
        private(
            f"""
            $OFFLOAD rootfs build {target} >/dev/null
            chmod -x {target}/usr/libexec/qemu-kvm
            echo '# local edit' >> {target}/etc/libvirt/qemu.conf
            rm {target}/usr/lib/offload/libudsproxy.so
            touch {target}/etc/offload/rootfs-building
            $OFFLOAD rootfs check {target} || echo "status $?"
            echo ---repair
            $OFFLOAD rootfs build {target}
            echo ---again
            $OFFLOAD rootfs check {target}
            """
        )
    )
    broken, rest = out.split("---repair")
    repair, again = rest.split("---again")
    assert "not executable: /usr/libexec/qemu-kvm" in broken
    assert "changed: /etc/libvirt/qemu.conf" in broken
    assert "missing: /usr/lib/offload/libudsproxy.so" in broken
    assert "half-built" in broken
    assert "status 1" in broken
    assert "installed /usr/libexec/qemu-kvm" in repair and "installed /etc/libvirt/qemu.conf" in repair
    assert "installed /usr/lib/offload/libudsproxy.so" in repair and "installed /usr/bin/rexec" not in repair
    assert again.strip().endswith("good")


def test_an_overlay_is_mounted_again_from_its_layers(tmp_path: Path) -> None:
    target = tmp_path / "root"
    ok(private(f"$OFFLOAD rootfs build {target} >/dev/null"))
    # The namespace is gone: like after a reboot, nothing is mounted.
    result = private(f"$OFFLOAD rootfs check {target}")
    assert result.returncode == 1 and "overlay not mounted" in result.stdout
    out = ok(
        private(
            f"""
            $OFFLOAD rootfs mount {target}
            $OFFLOAD rootfs check {target}
            $OFFLOAD -m offload 2>/dev/null || true
            python3 -c 'from offload.rootfs_builder import overlay_mount_spec; print(overlay_mount_spec("{target}"))'
            """,
            env={"PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
        )
    )
    assert "mount -t overlay" in out and out.count("good") == 1
    assert f"('/', '{tmp_path}/.root-upper', '{tmp_path}/.root-work')" in out


def test_a_separate_filesystem_below_root_gets_its_own_overlay(tmp_path: Path) -> None:
    content = tmp_path / "content"
    content.mkdir()
    (content / "marker").write_text("from a filesystem of its own\n")
    image = tmp_path / "opt.ext4"
    ok(private(f"mkfs.ext4 -q -d {content} {image} 8M"))
    target = tmp_path / "root"
    out = ok(
        private(
            f"""
            mount -o loop,ro {image} /srv
            $OFFLOAD rootfs build {target}
            cat {target}/srv/marker
            python3 -c 'import json; print(json.load(open("{tmp_path}/.root-upper/etc/offload/rootfs-manifest.json"))["overlay"]["nested"])'
            """
        )
    )
    assert "/srv is a filesystem of its own" in out
    assert "from a filesystem of its own" in out
    assert "['/srv']" in out


def test_a_failed_overlay_build_leaves_nothing(tmp_path: Path) -> None:
    lower = tmp_path / "lower"
    (lower / "etc").mkdir(parents=True)
    (lower / "etc/offload").write_text("a file where the build needs a directory\n")
    (lower / "usr/bin").mkdir(parents=True)
    target = tmp_path / "root"
    result = private(
        f"$OFFLOAD rootfs build --source {lower} {target} || echo status $?; grep -c {target} /proc/self/mountinfo || true"
    )
    assert "status 1" in result.stdout, result.stdout + result.stderr
    assert result.stdout.strip().endswith("0")  # not mounted
    assert "build failed" in result.stdout and "offload:" in result.stderr
    assert not target.exists() and not (tmp_path / ".root-upper").exists() and not (tmp_path / ".root-work").exists()


def test_the_wrapper_passes_every_argument_and_maps_daemonize(tmp_path: Path) -> None:
    target = tmp_path / "root"
    fake = tmp_path / "fake-rexec"
    # A stand-in for rexec that records its argv, one NUL-terminated argument each.
    fake.write_text('#!/bin/sh\nfor a do printf "%s\\0" "$a"; done > /tmp/argv.$$\nmv /tmp/argv.$$ /tmp/argv\n')
    fake.chmod(0o755)
    record = tmp_path / "argv"
    out = ok(
        private(
            f"""
            $OFFLOAD rootfs build {target} >/dev/null
            mount --bind {fake} {target}/usr/bin/rexec
            mount -t tmpfs none {target}/tmp
            touch {target}/tmp/a {target}/tmp/b
            cd {target}/tmp
            chroot {target} /usr/bin/qemu-kvm -name 'vm with  spaces' -append '*' '' "$(printf 'a\\nb')" -S
            cp {target}/tmp/argv {record}.plain
            env -i PATH=/usr/bin:/bin /usr/sbin/chroot {target} /usr/libexec/qemu-kvm -machine none -pidfile '/var/lib/x y/p.pid' -daemonize
            cp {target}/tmp/argv {record}.daemon
            env -i /usr/sbin/chroot {target} /bin/sh -c '. /etc/offload/rexec.env; echo "agent=$REXEC_AGENT_SOCKET"'
            """
        )
    )
    plain = (tmp_path / "argv.plain").read_bytes().split(b"\0")[:-1]
    assert plain == [b"--", QEMU.encode(), b"-name", b"vm with  spaces", b"-append", b"*", b"", b"a\nb", b"-S"]
    daemon = (tmp_path / "argv.daemon").read_bytes().split(b"\0")[:-1]
    assert daemon == [
        b"--daemon-pidfile",
        b"/var/lib/x y/p.pid",
        b"--",
        QEMU.encode(),
        b"-machine",
        b"none",
        b"-pidfile",
        b"/var/lib/x y/p.pid",
        b"-daemonize",
    ]
    assert "agent=/var/run/rexec/rexec.sock" in out


def test_the_wrapper_takes_the_environment_from_its_file(tmp_path: Path) -> None:
    target = tmp_path / "root"
    fake = tmp_path / "fake-rexec"
    fake.write_text('#!/bin/sh\necho "addr=$CMD_NET_ADDR agent=$REXEC_AGENT_SOCKET"\n')
    fake.chmod(0o755)
    out = ok(
        private(
            f"""
            $OFFLOAD rootfs build --host 192.0.2.1:7101 {target} >/dev/null
            mount --bind {fake} {target}/usr/bin/rexec
            env -i /usr/sbin/chroot {target} /usr/bin/qemu-kvm -version
            env -i REXEC_AGENT_SOCKET=/elsewhere.sock /usr/sbin/chroot {target} /usr/bin/qemu-kvm -version
            """
        )
    )
    first, second = out.strip().splitlines()
    assert first == "addr=tcp://192.0.2.1:7101 agent=/var/run/rexec/rexec.sock"
    assert second == "addr=tcp://192.0.2.1:7101 agent=/elsewhere.sock"


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("169.254.77.1", "tcp://169.254.77.1:7001"),
        ("host.example:7100", "tcp://host.example:7100"),
        ("vsock://3:7001", "vsock://3:7001"),
        ("fe80::1", "tcp://[fe80::1]:7001"),
        ("[fe80::1]:7002", "tcp://[fe80::1]:7002"),
    ],
)
def test_host_addresses(given: str, expected: str) -> None:
    assert install.host_address(given) == expected


SFDISK_GPT = """{"partitiontable": {"label": "gpt", "unit": "sectors", "sectorsize": 512, "partitions": [
 {"node": "/x/disk.raw1", "start": 2048, "size": 2048, "type": "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"},
 {"node": "/x/disk.raw2", "start": 4096, "size": 40960, "type": "0FC63DAF-8483-4772-8E79-3D69D8477DE4"},
 {"node": "/x/disk.raw3", "start": 45056, "size": 4096, "type": "0FC63DAF-8483-4772-8E79-3D69D8477DE4"}]}}"""
SFDISK_MBR = """{"partitiontable": {"label": "dos", "unit": "sectors", "sectorsize": 512, "partitions": [
 {"node": "/dev/nbd0p1", "start": 2048, "size": 1024000, "type": "83", "bootable": true},
 {"node": "/dev/nbd0p2", "start": 1026048, "size": 8000000, "type": "83"},
 {"node": "/dev/nbd0p3", "start": 9026048, "size": 400000, "type": "82"}]}}"""


def test_the_root_partition_is_found() -> None:
    gpt = partitions.parse(SFDISK_GPT)
    assert partitions.choose_root(gpt) == partitions.Partition(2, 4096 * 512, 40960 * 512, gpt[1].type)
    assert partitions.choose_root(gpt, 3).offset == 45056 * 512
    mbr = partitions.parse(SFDISK_MBR)
    assert partitions.choose_root(mbr).number == 2  # the reference's /dev/nbd0p2
    with pytest.raises(RootfsError, match="no partition 9"):
        partitions.choose_root(mbr, 9)
    with pytest.raises(RootfsError, match="cannot read"):
        partitions.parse("{}")


def test_content_mounts_are_real_filesystems_outside_runtime_dirs() -> None:
    table = [
        ("/", "ext4"),
        ("/proc", "proc"),
        ("/usr", "xfs"),
        ("/usr/local", "ext4"),
        ("/run/netns", "ext4"),
        ("/mnt/tools", "tmpfs"),
        ("/home", "fuse.sshfs"),
        ("/another_rootfs", "ext4"),
        ("/var/lib/docker/x/merged", "overlay"),
    ]
    mounts = mountinfo.parse("".join(f"1 1 0:1 / {path} rw - {fstype} src rw\n" for path, fstype in table))
    assert content_mounts(mounts, "/", ["/another_rootfs"]) == ["/usr", "/usr/local"]


def test_stand_in_modules_are_all_it_imports() -> None:
    """The installed copy of the stand-in must be complete: import it from the copy alone."""
    root = Path(install.__file__).resolve().parent.parent
    for module in install.STAND_IN_MODULES:
        assert (root / module).is_file()
    import subprocess

    copy = Path(shutil.os.environ.get("TMPDIR", "/tmp")) / f"offr-standin-{os.getpid()}"
    try:
        for module in install.STAND_IN_MODULES:
            (copy / "offload" / module).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(root / module, copy / "offload" / module)
        code = "import sys; sys.path.insert(0, sys.argv[1]); import offload.rexec_client as c; print(c.__file__)"
        result = subprocess.run(["/usr/bin/python3", "-IS", "-c", code, str(copy)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(str(copy))
    finally:
        shutil.rmtree(copy, ignore_errors=True)


def test_the_rootfs_has_a_lock_directory_for_libvirts_consoles(tmp_path: Path) -> None:
    said: list[str] = []
    assert install.ensure_lock_dir(tmp_path, said.append)
    assert os.readlink(tmp_path / "var" / "lock") == "/run/lock"
    assert not install.ensure_lock_dir(tmp_path, said.append)  # a second build changes nothing
    assert len(said) == 1
    # One the rootfs already has (a directory of its own, or Debian's link) is kept.
    other = tmp_path / "other"
    (other / "var" / "lock").mkdir(parents=True)
    assert not install.ensure_lock_dir(other, said.append)
    assert (other / "var" / "lock").is_dir() and not (other / "var" / "lock").is_symlink()


def test_overlay_layers_left_by_an_interrupted_build_are_prepared_again(tmp_path: Path) -> None:
    # A build killed after its whiteouts were made leaves them in the upper
    # layer; the next build must take them as they are.
    lower = tmp_path / "lower"
    (lower / "srv").mkdir(parents=True)
    layout = Layout.of(lower / "srv" / "root")
    for attempt in range(2):
        modes.prepare_overlay(layout, str(lower), lambda line: None)
        whiteout = os.lstat(layout.upper / "srv" / layout.upper.name)
        assert stat.S_ISCHR(whiteout.st_mode) and whiteout.st_rdev == 0, attempt
