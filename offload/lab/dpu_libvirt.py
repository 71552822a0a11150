"""The DPU side of the lab's libvirt: /another_rootfs, its mounts, and stock libvirtd in it.

What an operator does on a DPU (README, "The lab"), done in the DPU side's
namespaces: build and prepare the rootfs, then run Debian's own virtlogd
and libvirtd chrooted there, the udsproxy shim preloaded into libvirtd.
Nothing here reconfigures libvirt beyond the qemu.conf the rootfs builder writes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from offload import proc
from offload.errors import LabError
from offload.lab import LIBVIRT_EXPORTS
from offload.lab.libvirt import UNIT_ENV, Virsh, spawn_logged, timed, wait_until

if TYPE_CHECKING:  # the lab starts this part; this part only uses the lab it is given
    from offload.lab.lab import Lab

READY_TIMEOUT = 60.0
#: libvirtd's environment, paths inside the rootfs.
LIBVIRTD_ENV = {
    # The shim where the rootfs builder installs it, udsproxyd's socket where the prepared mounts put it.
    "LD_PRELOAD": "/usr/lib/offload/libudsproxy.so",
    "UDSPROXY_SOCKET": "/run/udsproxy/udsproxy.sock",
    # The host's /proc (offload prepare's qtfs staging directory), where the shim reads a remote
    # program's statistics and affinity.
    "OFFLOAD_HOST_PROC": "/run/offload/qtfs-proc",
    # No OFFLOAD_CGROUP_PARTITIONS: the shim reads the map prepare wrote into the rootfs.
}


def target(lab: Lab) -> Path:
    """The DPU side's /another_rootfs, in ``Lab.rootfs_dir`` beside its overlay layers (so down removes it)."""
    return lab.rootfs_dir / "another_rootfs"


def libvirt_socket(lab: Lab) -> str:
    return str(target(lab) / "run" / "libvirt" / "libvirt-sock")


def virsh(lab: Lab) -> Virsh:
    """virsh on the DPU side, talking to the chrooted libvirtd."""
    return Virsh(libvirt_socket(lab), wrap=lambda argv: lab.command("dpu", argv), env=UNIT_ENV)


def prepare_config(lab: Lab) -> str:
    """offload prepare's configuration for the lab: qtfs from the lab's host side (prepare.toml)."""
    exports = ", ".join(f'"{path}"' for path in LIBVIRT_EXPORTS)
    # libvirt's /machine in each tuned controller (the DPU side mounts them
    # as this machine does: /sys/fs/cgroup/<controller>) is the host side's.
    partitions = "".join(
        f'\n[[cgroup_partitions]]\nremote = "{place}"\nlocal = "/sys/fs/cgroup/{name}/machine"\n'
        for name, place in lab.host_partitions.items()
    )
    return (
        "# Written by the lab: the host side serves /var/lib/libvirt over qtfs.\n"
        f'host = "{lab.qtfs_address}"\n'
        f'pki = "{lab.dir / "pki" / "dpu"}"\n'
        f"exports = [{exports}]\n"
        f"{partitions}"
    )


def start(lab: Lab) -> list[str]:
    root = target(lab)
    done: list[str] = []
    offload_cli = proc.program("offload")
    build = ["rootfs", "build", "--mode", "overlay", "--host", lab.rexec_address(lab.host), str(root)]
    with timed(done.append, f"/another_rootfs built at {root}, overlay"):
        proc.run(lab.command("dpu", [*offload_cli, *build]), timeout=600)
    config = lab.dir / "prepare.toml"
    config.write_text(prepare_config(lab))
    with timed(done.append, f"{root} prepared"):
        proc.run(
            lab.command("dpu", [*offload_cli, "prepare", "--target", str(root), "--config", str(config)]), timeout=120
        )

    _start_chrooted(lab, "dpu-virtlogd", root, ["/usr/sbin/virtlogd"], {})
    socket = lab.path_on("dpu", root / "run" / "libvirt" / "virtlogd-sock")
    failure = f"virtlogd did not create {socket} in {READY_TIMEOUT:.0f} s (see {lab.dir / 'dpu-virtlogd.log'})"
    wait_until(socket.exists, READY_TIMEOUT, failure)
    done.append("virtlogd on dpu, chrooted")
    _start_libvirtd(lab, root)
    done.append(f"libvirtd on dpu, chrooted in {root}, shim preloaded; virsh: {virsh(lab).uri}")
    return done


def restart_libvirtd(lab: Lab) -> int:
    """Stop libvirtd (SIGTERM, as systemctl would) and start it again; the new pid."""
    proc.end_pid(lab.pid_of("dpu-libvirtd"))
    _start_libvirtd(lab, target(lab))
    return lab.pid_of("dpu-libvirtd")


def _start_libvirtd(lab: Lab, root: Path) -> None:
    _start_chrooted(lab, "dpu-libvirtd", root, ["/usr/sbin/libvirtd"], LIBVIRTD_ENV)
    virsh(lab).wait_ready(READY_TIMEOUT)


def _start_chrooted(lab: Lab, key: str, root: Path, argv: list[str], env: dict[str, str]) -> None:
    log_path = lab.dir / f"{key}.log"
    # The environment is set inside the chroot: LD_PRELOAD names a
    # path there, and `chroot` itself must not try to load it.
    chrooted = ["chroot", str(root), "/usr/bin/env", *(f"{k}={v}" for k, v in env.items()), *argv]
    child = spawn_logged(lab.command("dpu", chrooted, cwd="/"), log_path, env=UNIT_ENV)
    lab.record(key, child.pid)
    time.sleep(0.05)
    if child.poll() is not None:
        raise LabError(f"{key} exited with status {child.returncode} at start: see {log_path}")
    child.returncode = 0  # it runs on; the lab ends it by pid
