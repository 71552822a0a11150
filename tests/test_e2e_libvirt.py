"""End to end: Debian's own libvirtd on the DPU side runs VMs whose qemu runs on the host side.

One whole lab for the module (its name is the test lab's with a "v"):
rexec, udsproxy and qtfs on both sides, /another_rootfs built and prepared
on the DPU side, virtlogd and libvirtd chrooted there.  Guests are TCG
domains booting a Debian kernel whose init prints a marker on the serial
console (see offload/lab/guest.py for why TCG).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from functools import partial

import psutil
import pytest

from offload import proc
from offload.lab import dpu_libvirt, guest
from offload.lab.lab import Lab
from offload.lab.libvirt import Domain, Virsh, guest_domain, qemu_processes, wait_for_marker
from tests.conftest import libvirt_lab

pytestmark = [pytest.mark.lab, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def vlab() -> Iterator[Lab]:
    with libvirt_lab("v") as lab:
        yield lab


@pytest.fixture
def virsh(vlab: Lab) -> Virsh:
    return dpu_libvirt.virsh(vlab)


def netns(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/net")


def start_guest(lab: Lab, virsh: Virsh, name: str) -> Domain:
    domain = guest_domain(name, guest.build())
    virsh.define(domain)
    virsh("start", name)
    return domain


def console_of(lab: Lab, domain: Domain) -> str:
    path = lab.path_on("host", domain.console_log)
    return path.read_text(errors="replace") if path.exists() else ""


def stand_ins(lab: Lab, name: str) -> list[psutil.Process]:
    """The DPU side's rexec stand-ins for a guest's qemu."""
    dpu = lab.netns_id("dpu")
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        # "/usr/bin/python3 -IS /usr/bin/rexec -- /usr/bin/qemu-system-x86_64 ..." in the rootfs
        if any(arg.endswith("/rexec") for arg in cmdline[:3]) and f"guest={name}," in " ".join(cmdline):
            try:
                if netns(process.pid) == dpu:
                    found.append(process)
            except OSError:
                pass
    return found


def wait_until(condition, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)


def cleanup(virsh: Virsh, *names: str) -> None:
    for name in names:
        proc.run(virsh.argv("destroy", name), check=False)
        proc.run(virsh.argv("undefine", name), check=False)
        wait_until(lambda name=name: not qemu_processes(name), 15, f"qemu of {name} gone")


def test_lifecycle(vlab: Lab, virsh: Virsh) -> None:
    name = "e2e-life"
    try:
        domain = start_guest(vlab, virsh, name)
        marker = wait_for_marker(lambda: console_of(vlab, domain))
        assert marker.startswith(guest.MARKER)

        # qemu runs on the host side, under the host's rexec_server.
        [qemu] = qemu_processes(name)
        assert netns(qemu.pid) == vlab.netns_id("host")
        assert vlab.pid_of("host-rexec") in [p.pid for p in qemu.parents()]
        # libvirtd runs on the DPU side only, and its qemu is a stand-in there.
        assert netns(vlab.pid_of("dpu-libvirtd")) == vlab.netns_id("dpu")
        assert len(stand_ins(vlab, name)) == 1

        assert name in virsh("list")
        info = virsh("dominfo", name)
        assert "running" in info
        stats = virsh("domstats", name)
        assert "state.state=1" in stats
        status = virsh("qemu-monitor-command", "--pretty", name, '{"execute":"query-status"}')
        assert '"running": true' in status

        virsh("destroy", name)
        wait_until(lambda: not qemu_processes(name), 10, "no qemu on the host after destroy")
        wait_until(lambda: not stand_ins(vlab, name), 10, "no stand-in on the DPU after destroy")
        assert virsh.state(name) == "shut off"
        virsh("undefine", name)
        assert name not in virsh("list", "--all")
    finally:
        cleanup(virsh, name)


def test_two_domains_at_once(vlab: Lab, virsh: Virsh) -> None:
    names = ["e2e-one", "e2e-two"]
    try:
        domains = [start_guest(vlab, virsh, name) for name in names]
        for domain in domains:
            wait_for_marker(lambda domain=domain: console_of(vlab, domain))
        pids = {name: [p.pid for p in qemu_processes(name)] for name in names}
        assert all(len(found) == 1 for found in pids.values()), pids
        running = virsh("list", "--name").split()
        assert set(names) <= set(running)
    finally:
        cleanup(virsh, *names)


def test_sigkill_of_the_stand_in_leaves_no_qemu(vlab: Lab, virsh: Virsh) -> None:
    name = "e2e-kill"
    try:
        domain = start_guest(vlab, virsh, name)
        wait_for_marker(lambda: console_of(vlab, domain))
        [stand_in] = stand_ins(vlab, name)
        stand_in.send_signal(signal.SIGKILL)
        wait_until(lambda: not qemu_processes(name), 15, "the host's qemu ended after its stand-in was killed")
        wait_until(lambda: virsh.state(name) == "shut off", 15, "libvirt saw the domain end")
    finally:
        cleanup(virsh, name)


def test_libvirtd_restart_keeps_the_running_domain(vlab: Lab, virsh: Virsh) -> None:
    name = "e2e-relive"
    try:
        domain = start_guest(vlab, virsh, name)
        wait_for_marker(lambda: console_of(vlab, domain))
        [qemu] = qemu_processes(name)
        dpu_libvirt.restart_libvirtd(vlab)
        # The new libvirtd reads its status XML, finds the stand-in alive and
        # reconnects to the monitor socket, still bridged by the stand-in.
        assert virsh.state(name) == "running"
        status = virsh("qemu-monitor-command", "--pretty", name, '{"execute":"query-status"}')
        assert '"running": true' in status
        assert [p.pid for p in qemu_processes(name)] == [qemu.pid]
    finally:
        cleanup(virsh, name)


def counted(lab: Lab, domain: Domain) -> int:
    """The guest's last counter value on its console."""
    return guest.ticks(console_of(lab, domain))[-1]


def counts_past(lab: Lab, domain: Domain, value: int) -> bool:
    return counted(lab, domain) > value


#: Every daemon of both sides that a guest's management goes through.
DAEMONS = ("host-rexec", "dpu-rexec", "host-udsproxy", "dpu-udsproxy", "host-qtfs")


def test_a_running_guest_outlives_restarts_of_every_daemon(vlab: Lab, virsh: Virsh) -> None:
    """Stopped (SIGTERM, as systemctl) or crashed (SIGKILL), each daemon of either side comes back under a
    running guest: it goes on counting, libvirt still calls it running, its monitor still answers, and
    libvirt still tunes it.  Then `virsh destroy` still ends it, at once, and it starts again."""
    name = "e2e-restarts"
    try:
        domain = start_guest(vlab, virsh, name)
        wait_until(lambda: guest.ticks(console_of(vlab, domain)), 60, "the guest counts")
        qemu = qemu_processes(name)
        [stand_in] = stand_ins(vlab, name)
        (cpu_group,) = vlab.host_partitions["cpu"].glob(f"qemu-*-{name}.libvirt-qemu")
        shares = 100
        for service in DAEMONS:
            for crash in (False, True):
                vlab.restart_service(service, crash=crash)
                what = f"after {service} {'crashed' if crash else 'stopped'} and came back"
                wait_until(partial(counts_past, vlab, domain, counted(vlab, domain) + 1), 20, f"counting {what}")
                assert virsh.state(name) == "running", what
                status = virsh("qemu-monitor-command", "--pretty", name, '{"execute":"query-status"}')
                assert '"running": true' in status, what
                assert qemu_processes(name) == qemu, what  # the same qemu, never restarted
                assert stand_ins(vlab, name) == [stand_in], what  # libvirt's view of it: the same stand-in
                # And libvirt still tunes it: through qtfs, into the host's cgroup.
                shares += 1
                virsh("schedinfo", name, "--live", "--set", f"cpu_shares={shares}")
                assert (cpu_group / "cpu.shares").read_text().strip() == str(shares), what
        # The signal path goes on too: libvirt ends the guest through its stand-in.
        started = time.monotonic()
        virsh("destroy", name)
        wait_until(lambda: not qemu_processes(name), 15, "qemu ended by virsh destroy")
        assert time.monotonic() - started < 10  # at once, not after a resume window
        assert virsh.state(name) == "shut off"
        proc.run(vlab.command("host", ["truncate", "-s", "0", domain.console_log]))
        virsh("start", name)
        wait_for_marker(lambda: console_of(vlab, domain))
    finally:
        cleanup(virsh, name)


def test_guests_stop_ends_the_guests_and_libvirt_sees_them_shut_off(vlab: Lab, virsh: Virsh) -> None:
    """What rexec-guests.service does at the host's shutdown: `offload guests stop` ends the programs
    rexec_server keeps, while it runs; libvirt on the DPU sees the guest shut off (not a lost link)."""
    name = "e2e-guests"
    try:
        domain = start_guest(vlab, virsh, name)
        wait_for_marker(lambda: console_of(vlab, domain))
        run_dir = str(vlab.host.run_dir)
        listed = proc.run(
            vlab.command("host", [*proc.run_module("offload.cli"), "guests", "list", "--run-dir", run_dir])
        )
        [qemu] = qemu_processes(name)
        assert f"pid {qemu.pid} running" in listed.stdout, listed.stdout
        stopped = proc.run(
            vlab.command("host", [*proc.run_module("offload.cli"), "guests", "stop", "--run-dir", run_dir])
        )
        assert f"pid {qemu.pid} " in stopped.stdout and "ended on SIGTERM" in stopped.stdout, stopped.stdout
        assert not qemu_processes(name)
        wait_until(lambda: virsh.state(name) == "shut off", 15, "libvirt saw the guest end")
        wait_until(lambda: not stand_ins(vlab, name), 15, "the stand-in exited")
        assert (
            "no sessions kept"
            in proc.run(
                vlab.command("host", [*proc.run_module("offload.cli"), "guests", "list", "--run-dir", run_dir])
            ).stdout
        )
    finally:
        cleanup(virsh, name)
