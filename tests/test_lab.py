"""The whole lab comes down without a trace: after a running VM, and after a failed up."""

from __future__ import annotations

import os
from pathlib import Path

import psutil
import pytest

from offload import proc
from offload.errors import LabError
from offload.lab import dpu_libvirt, guest
from offload.lab.lab import Lab
from offload.lab.libvirt import guest_domain, install_argv, qemu_processes, wait_for_marker

pytestmark = [pytest.mark.lab, pytest.mark.timeout(300)]


@pytest.fixture
def dlab() -> Lab:
    lab = Lab(os.environ.get("OFFLOAD_TEST_LAB", "offt")[:9] + "d")
    lab.down()
    return lab


def lab_traces(lab: Lab, namespaces: set[str], holders: list[int]) -> list[str]:
    """Everything of the lab still on the machine."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if os.readlink(f"/proc/{process.pid}/ns/net") in namespaces:
                found.append(f"pid {process.pid} in a lab namespace: {process.info['cmdline']}")
        except OSError:
            pass
        if any(str(lab.dir) in arg for arg in process.info["cmdline"] or ()):
            found.append(f"pid {process.pid} started from the lab: {process.info['cmdline']}")
    found += [f"holder pid {pid}" for pid in holders if psutil.pid_exists(pid)]
    found += [f"netns {side.netns}" for side in (lab.host, lab.dpu) if Path(f"/run/netns/{side.netns}").exists()]
    found += [
        f"veth {side.link.ifname}"
        for side in (lab.host, lab.dpu)
        if Path(f"/sys/class/net/{side.link.ifname}").exists()
    ]
    with open("/proc/self/mountinfo") as mountinfo:
        found += [f"mount {line.split()[4]}" for line in mountinfo if str(lab.dir) in line]
    if lab.dir.exists():
        found.append(str(lab.dir))
    return found


def identities(lab: Lab) -> tuple[set[str], list[int]]:
    namespaces = {lab.netns_id(role) for role in ("host", "dpu")}
    return namespaces, [lab.pid_of("host-ns"), lab.pid_of("dpu-ns")]


def test_down_with_a_running_vm_leaves_nothing(dlab: Lab) -> None:
    image = guest.build()
    try:
        dlab.up()
        namespaces, holders = identities(dlab)
        proc.run(dlab.command("host", install_argv(image)))
        domain = guest_domain("lab-down", image)
        virsh = dpu_libvirt.virsh(dlab)
        virsh.define(domain)
        virsh("start", domain.name)
        console = dlab.path_on("host", domain.console_log)
        wait_for_marker(lambda: console.read_text(errors="replace") if console.exists() else "")
        assert qemu_processes(domain.name)
    finally:
        dlab.down()
    # Ending the host's rexec_server ended the VM; anything else in the
    # namespaces was ended by pid.
    assert not qemu_processes(domain.name)
    assert lab_traces(dlab, namespaces, holders) == []


def test_down_after_a_failed_up_leaves_nothing(dlab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, object] = {}

    def failing_libvirtd(lab: Lab, root: Path) -> None:
        # Everything else is up by now: namespaces, daemons, the prepared rootfs, virtlogd.
        seen["identities"] = identities(lab)
        raise LabError("injected: libvirtd did not start")

    monkeypatch.setattr(dpu_libvirt, "_start_libvirtd", failing_libvirtd)
    with pytest.raises(LabError, match="injected"):
        dlab.up()
    namespaces, holders = seen["identities"]  # type: ignore[misc]
    assert lab_traces(dlab, namespaces, holders) == []
    assert not dlab.is_up
