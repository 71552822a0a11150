"""The lab's two sides cannot see each other's private files, as two machines could not.

In a whole lab (libvirt's /another_rootfs built on the DPU side), a process
on the host side cannot read the DPU's key nor list the DPU's run directory,
its rootfs or the rootfs's upper layer; a process on the DPU side cannot
read the host's key nor list the host's run directory; neither reads the
CA's key.  The controlling process, outside both namespaces, still sees all
of it, and the lab still works: a rexec from the DPU side runs on the host
side.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from offload import proc
from offload.lab import dpu_libvirt
from offload.lab.lab import Lab
from offload.rootfs_builder.layout import Layout
from tests.conftest import rexec
from tests.test_e2e_libvirt import vlab

pytestmark = [pytest.mark.lab, pytest.mark.timeout(600)]

__all__ = ["vlab"]


def on(lab: Lab, role: str, *argv: str) -> subprocess.CompletedProcess:
    return proc.run(lab.command(role, list(argv), cwd="/"), check=False, timeout=30)


def cannot_read(lab: Lab, role: str, path: Path) -> None:
    """``cat PATH`` on that side fails or prints nothing."""
    done = on(lab, role, "cat", str(path))
    assert done.returncode != 0 or done.stdout == "", f"{role} side read {path}: {done.stdout[:80]!r}"


def lists_nothing(lab: Lab, role: str, path: Path) -> None:
    """``ls -A PATH`` on that side fails or lists nothing."""
    done = on(lab, role, "ls", "-A", str(path))
    assert done.returncode != 0 or done.stdout.strip() == "", f"{role} side lists {path}: {done.stdout[:200]!r}"


def test_the_host_side_cannot_see_the_dpus_private_files(vlab: Lab) -> None:
    key = vlab.dir / "pki" / "dpu" / "key.pem"
    upper = Layout.of(dpu_libvirt.target(vlab)).upper
    # They are there: the controlling process and the DPU side see them.
    assert b"PRIVATE KEY" in key.read_bytes()
    assert "PRIVATE KEY" in on(vlab, "dpu", "cat", str(key)).stdout
    assert any(upper.iterdir()), f"{upper} is empty: no upper layer to hide"
    assert on(vlab, "dpu", "ls", "-A", str(upper)).stdout.strip()
    assert (vlab.dpu.run_dir / "rexec.sock").exists()

    cannot_read(vlab, "host", key)
    for path in (upper, dpu_libvirt.target(vlab), vlab.rootfs_dir, vlab.dpu.run_dir, key.parent):
        lists_nothing(vlab, "host", path)
    cannot_read(vlab, "host", dpu_libvirt.target(vlab) / "etc" / "libvirt" / "qemu.conf")
    # Hidden, not writable either: nothing planted there reaches the DPU side.
    planted = on(vlab, "host", "touch", str(vlab.dpu.run_dir / "planted"))
    assert planted.returncode != 0
    assert not (vlab.dpu.run_dir / "planted").exists()
    # The host side still has its own.
    assert "PRIVATE KEY" in on(vlab, "host", "cat", str(vlab.dir / "pki" / "host" / "key.pem")).stdout


def test_the_dpu_side_cannot_see_the_hosts_private_files(vlab: Lab) -> None:
    key = vlab.dir / "pki" / "host" / "key.pem"
    assert b"PRIVATE KEY" in key.read_bytes()
    assert (vlab.host.run_dir / "rexec.sock").exists()

    cannot_read(vlab, "dpu", key)
    lists_nothing(vlab, "dpu", key.parent)
    lists_nothing(vlab, "dpu", vlab.host.run_dir)
    assert "PRIVATE KEY" in on(vlab, "dpu", "cat", str(vlab.dir / "pki" / "dpu" / "key.pem")).stdout


def test_neither_side_reads_the_ca_key(vlab: Lab) -> None:
    ca_key = vlab.dir / "pki" / "ca-key.pem"
    assert b"PRIVATE KEY" in ca_key.read_bytes()
    for role in ("host", "dpu"):
        cannot_read(vlab, role, ca_key)


def test_what_is_shared_on_purpose_still_is(vlab: Lab) -> None:
    # A file the DPU side writes in the shared directory is read on the host side.
    shared = vlab.dir / "shared" / "privacy-check"
    try:
        assert on(vlab, "dpu", "sh", "-c", f"echo from-dpu > {shared}").returncode == 0
        assert on(vlab, "host", "cat", str(shared)).stdout == "from-dpu\n"
    finally:
        shared.unlink(missing_ok=True)
    # A rexec from the DPU side runs on the host side.
    done = rexec(vlab, "/bin/sh", "-c", "readlink /proc/self/ns/net", text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == vlab.netns_id("host")
    # Each side's daemons still log to their own files.
    for key in ("host-rexec", "dpu-rexec", "host-qtfs", "dpu-libvirtd"):
        assert (vlab.dir / f"{key}.log").exists()
