"""The systemd lab end to end: the package from this checkout under a real systemd on both sides.

Two containers booted with ``systemd-nspawn -b`` (offload/lab/systemd_lab.py)
get the package with apt and each side's configuration in /etc; the units
are enabled as an operator does; virsh in the DPU container starts a VM
whose qemu runs in the host container, in a scope of its own in machine.slice
that rexec_server made for it.  Then the journal,
``systemctl reload rexec``, each daemon of either side restarted and killed
under the running guest (which runs on, the same qemu, its monitor
answering), ``systemctl stop offload-prepare``, and a teardown that leaves
no process, veth, namespace or tree behind, also when a step fails (a
second test makes ``up`` fail after both containers booted).

The image is built once (apt into the minbase: 25 s here, plus debootstrap's
30 s to a minute when tests/test_package.py has not cached the minbase) and
kept in /var/cache/offload-lab/; with it cached the two tests take under
3 minutes, most of it building the package (45 s), each lab's up (20 to
30 s), the guest's boot under TCG (12 s) and the ten restarts under it
(15 s).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from offload.errors import OffloadError
from offload.lab import debian, netlink, systemd_lab
from offload.lab.libvirt import wait_until
from offload.lab.systemd_lab import SystemdLab

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(1500),  # the first run builds the image
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (debootstrap, systemd-nspawn, namespaces)"),
    pytest.mark.skipif(
        not all(shutil.which(tool) for tool in ("debootstrap", "systemd-nspawn", "dpkg-buildpackage", "nsenter")),
        reason="needs debootstrap, systemd-nspawn, dpkg-dev and util-linux (make setup installs them)",
    ),
]

NAME = (os.environ.get("OFFLOAD_TEST_LAB", "offt") + "s")[-9:]


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    out = tmp_path_factory.mktemp("deb")
    try:
        yield systemd_lab.build_deb(out)
    finally:
        shutil.rmtree(out, ignore_errors=True)


@pytest.fixture
def lab() -> Iterator[SystemdLab]:
    if not systemd_lab.IMAGE.exists():
        why = debian.mirror_reachable()
        if why:
            pytest.skip(f"the systemd lab's image is not cached and {why}")
    lab = SystemdLab(NAME)
    lab.down()  # a run killed before its teardown
    try:
        yield lab
    finally:
        state = lab._state()
        lab.down()
        _assert_nothing_left(lab, state)


def _assert_nothing_left(lab: SystemdLab, state: dict[str, int]) -> None:
    started = [key for key in state if key.endswith(("-nspawn", "-init"))]
    alive = [f"{key} {state[key]}" for key in started if Path(f"/proc/{state[key]}").exists()]
    assert alive == [], f"still running after down: {alive}"
    assert not {lab.host.netns, lab.dpu.netns} & set(netlink.namespaces())
    links = set(os.listdir("/sys/class/net"))
    assert not {lab.host.ifname, lab.dpu.ifname} & links
    assert not lab.dir.exists()
    assert not [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if str(lab.dir) in line]


def test_systemd_lab(deb: Path, lab: SystemdLab) -> None:
    timings = []

    def timed(title: str, step: Callable[..., str | None], *args: object) -> str:
        started = time.monotonic()
        said = step(*args)
        timings.append(f"{title}: {time.monotonic() - started:.1f} s")
        print(f"{title}: {said}")
        return said or ""

    lines: list[str] = []
    timed("up", lab.up, deb, lines.append)
    print("\n".join(lines))
    for role in ("host", "dpu"):
        assert lab.run(role, "systemctl", "is-system-running").stdout.strip() == "running", role
    ready = timed("ready", systemd_lab.services_ready, lab)
    assert ready.count("(running, notify)") == 5
    # `systemctl status` says so too, with the package's program and its own log line.
    status = lab.systemctl("host", "status", "--full", "rexec")
    assert "Active: active (running)" in status and "(rexec_server)" in status, status
    assert "rexec_server" in status.split("Main PID:")[1] and " ready: " in status, status

    # The sandboxing of the units is in force (udsproxyd.service, qtfs-server.service).
    for unit in ("udsproxyd", "qtfs-server"):
        pid = systemd_lab.unit_state(lab, "host", unit)["MainPID"]
        status = lab.run("host", "cat", f"/proc/{pid}/status").stdout
        assert "NoNewPrivs:\t1" in status, (unit, status)
        shown = lab.systemctl("host", "show", "--property=ProtectSystem,PrivateTmp,RestrictAddressFamilies", unit)
        assert "ProtectSystem=full" in shown and "PrivateTmp=yes" in shown and "AF_VSOCK" in shown, shown
        # ... and by its effect, in the service's own mount namespace: /usr is read-only to it,
        # its /tmp is its own, and a seccomp filter (the address families) is on it.
        inside = ["nsenter", f"--target={pid}", "--mount", "--"]
        probe = lab.run("host", *inside, "touch", "/usr/lib/offload-probe", check=False)
        assert probe.returncode != 0 and "Read-only file system" in probe.stderr, (unit, probe.stderr)
        lab.run("host", "touch", "/tmp/offload-probe")
        assert lab.run("host", *inside, "test", "-e", "/tmp/offload-probe", check=False).returncode == 1, unit
        assert "Seccomp:\t2" in status, (unit, status)

    vm = systemd_lab.domain(lab)
    timed("vm", systemd_lab.start_vm, lab, vm)
    where = timed("where", systemd_lab.where_qemu_runs, lab, vm.name)
    assert "(machine.slice)" in where and '"running":true' in where
    # No qemu in the DPU container: only its stand-in.
    dpu_pidns = os.readlink(f"/proc/{lab.leader('dpu')}/ns/pid")
    assert all(os.readlink(f"/proc/{pid}/ns/pid") != dpu_pidns for pid in systemd_lab.qemu_in_host(lab, vm.name))

    timed("journal", systemd_lab.journal_priorities, lab)
    timed("reload", systemd_lab.reload_whitelist, lab)
    # journalctl filters by priority: the refusal is among the host's warnings.
    warnings = lab.run("host", "journalctl", "--no-pager", "-u", "rexec", "-p", "warning").stdout
    assert "refused /usr/bin/true" in warnings
    reloads = [e for e in systemd_lab.journal(lab, "host") if "Reloaded" in str(e.get("MESSAGE"))]
    assert reloads, "systemd logged no reload of rexec.service"

    # Each daemon of either side restarted by an operator and killed as by a crash (systemd restarts
    # it): the guest runs on, the same qemu, its monitor answering (restart_under_guest checks each).
    wait_until(lambda: systemd_lab.console_ticks(lab, vm), 60, "the guest counts")
    for role, unit in systemd_lab.RESTARTED:
        for crash in (False, True):
            title = f"{'kill' if crash else 'restart'} {role} {unit}"
            timed(title, systemd_lab.restart_under_guest, lab, vm, role, unit, crash)
    # The restarted rexec_servers said so, at info: the host carried the session on, the DPU resumed it.
    carried = timed("carried on", systemd_lab.sessions_carried_on, lab)
    assert "carrying on session" in carried and "resumed on a new link" in carried

    timed("destroy", systemd_lab.destroy_vm, lab, vm.name)
    timed("stop offload-prepare", systemd_lab.stop_prepare, lab)
    qtfs_clients = lab.run("dpu", "pgrep", "-f", "qtfs mount|offload.qtfs", check=False).stdout.split()
    assert qtfs_clients == []
    print("; ".join(timings))


def test_a_failed_up_leaves_nothing(lab: SystemdLab, tmp_path: Path) -> None:
    # A package apt refuses: up fails once both containers have booted, and
    # lab_up takes everything down (the fixture checks nothing is left).
    broken = tmp_path / "offload_0.0.0_amd64.deb"
    broken.write_bytes(b"not a Debian package\n")
    said: list[str] = []
    with pytest.raises(OffloadError, match="apt-get install"), systemd_lab.lab_up(lab, broken, said.append):
        pass
    assert any("systemd is up" in line for line in said), said
    assert any("powered off" in line for line in said), said
