"""The rootfs's qemu wrapper reaches the host side's rexec_server across the lab.

The rootfs is built in overlay mode on the DPU side, in a private mount
namespace of its own (inside the lab's DPU namespaces); /run there is a
tmpfs with the DPU's rexec agent socket bound in at the default path, as
`offload prepare` arranges on a DPU.  The wrapper runs chrooted there.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from offload.lab.lab import Lab
from offload.rootfs_builder.layout import machine_arch
from tests.rootfs_helpers import OFFLOAD

pytestmark = [pytest.mark.lab, pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root")]
QEMU = f"/usr/bin/qemu-system-{machine_arch()}"


@pytest.fixture(scope="module")
def offr_lab():
    # Its own lab, beside the session one (whose name is OFFLOAD_TEST_LAB).
    lab = Lab(os.environ.get("OFFLOAD_TEST_LAB", "offt")[:9] + "r")
    if lab.is_up:
        lab.down()
    try:
        lab.up(only=["rexec"], allow=[QEMU])
        yield lab
    finally:
        lab.down()


def test_the_wrapper_runs_qemu_on_the_host_side(offr_lab: Lab, tmp_path: Path) -> None:
    lab = offr_lab
    target = tmp_path / "another_rootfs"
    script = f"""
        {OFFLOAD} rootfs build --host {lab.host.link.address} {target} >/dev/null
        mount -t proc proc {target}/proc
        mount -t tmpfs -o mode=0755 run {target}/run
        mkdir {target}/run/rexec
        touch {target}/run/rexec/rexec.sock
        mount --bind /run/rexec/rexec.sock {target}/run/rexec/rexec.sock
        env -i /usr/sbin/chroot {target} {QEMU} --version
        echo ---
        env -i /usr/sbin/chroot {target} /usr/bin/qemu-kvm -machine help | head -3
        echo ---
        env -i /usr/sbin/chroot {target} /bin/sh -c '. /etc/offload/rexec.env; export CMD_NET_ADDR REXEC_AGENT_SOCKET; rexec /bin/sh -c "readlink /proc/self/ns/net"'
        echo ---
        readlink /proc/self/ns/net
        """
    argv = lab.command("dpu", ["unshare", "--mount", "--propagation", "private", "sh", "-euc", script])
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout + result.stderr
    version, machines, remote_ns, dpu_ns = result.stdout.split("---\n")
    assert version.startswith("QEMU emulator version")
    assert "Supported machines are:" in machines
    # rexec in the rootfs runs programs in the host side's network namespace.
    assert remote_ns.strip() == lab.netns_id("host")
    assert dpu_ns.strip() == lab.netns_id("dpu")
    # The wrapper is only in the rootfs: the machine's qemu (the host side's) is the real one.
    assert b"rexec" not in Path(QEMU).read_bytes()[:4096]
