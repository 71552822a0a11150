"""Resource control and statistics of a running guest, from the DPU side, by their effect on the host side.

One whole lab for the module (the test lab's name with an "n").  virsh on
the DPU side tunes a running guest; the proof is the host's own view: the
cgroup files of the host's qemu (found with qemu_processes, read from the
host's cgroupfs), the affinity of its threads and the memory nodes they may
use.  The guest has an iothread, pinned at start by ``<cputune>``, and a
strict ``<numatune>``.  The statistics libvirt
reports are compared with the host's /proc of that qemu.  A host process
that the DPU did not start is out of reach.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import re
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

from offload import proc
from offload.errors import LabError
from offload.lab import dpu_libvirt, guest
from offload.lab.lab import Lab
from offload.lab.libvirt import Domain, Virsh, guest_domain, qemu_processes, wait_for_marker
from tests.conftest import libvirt_lab

pytestmark = [pytest.mark.lab, pytest.mark.timeout(600)]

GUEST = "tune1"
CLOCK_TICK = os.sysconf("SC_CLK_TCK")
CPUS = sorted(os.sched_getaffinity(0))
two_cpus = pytest.mark.skipif(len(CPUS) < 2, reason="needs two CPUs to tell a pinned thread from an unpinned one")
#: ``<cputune><iothreadpin>``'s cpuset at start: one CPU, so the pin differs from an unpinned thread's mask.
IOTHREAD_PIN = CPUS[-1]
#: The host's NUMA nodes; ``<numatune>`` binds the guest to the first.
NODES = sorted(int(node.name[4:]) for node in Path("/sys/devices/system/node").glob("node[0-9]*"))
#: A node the host lacks.
MISSING_NODE = max(NODES) + 1


def wait_until(condition: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def tlab() -> Iterator[Lab]:
    with libvirt_lab("n") as lab:
        yield lab


@pytest.fixture(scope="module")
def virsh(tlab: Lab) -> Virsh:
    return dpu_libvirt.virsh(tlab)


@pytest.fixture(scope="module")
def qemu(tlab: Lab, virsh: Virsh) -> Iterator[psutil.Process]:
    """The host's qemu of a running guest started from the DPU side."""
    domain: Domain = dataclasses.replace(
        guest_domain(GUEST, guest.build()), iothreads=1, iothread_pin=str(IOTHREAD_PIN), numa_nodeset=str(NODES[0])
    )
    virsh.define(domain)
    virsh("start", GUEST)
    try:
        path = tlab.path_on("host", domain.console_log)
        wait_for_marker(lambda: path.read_text(errors="replace") if path.exists() else "")
        (found,) = qemu_processes(GUEST)
        yield found
    finally:
        virsh("destroy", GUEST, timeout=60) if GUEST in virsh("list", "--name") else None
        virsh("undefine", GUEST)


def domain_group(lab: Lab) -> str:
    """libvirt's name for the guest's cgroup below its partition (machine name "qemu-ID-NAME", no systemd)."""
    (found,) = lab.host_partitions["cpu"].glob(f"qemu-*-{GUEST}.libvirt-qemu")
    return found.name


def group(lab: Lab, controller: str, *below: str) -> Path:
    """The host's cgroup directory libvirt made for the guest in ``controller``."""
    return lab.host_partitions[controller].joinpath(domain_group(lab), *below)


def thread_named(qemu: psutil.Process, prefix: str) -> int:
    """The host thread of qemu whose name starts with ``prefix``."""
    for thread in qemu.threads():
        with open(f"/proc/{qemu.pid}/task/{thread.id}/comm") as comm:
            if comm.read().startswith(prefix):
                return thread.id
    raise AssertionError(f"qemu has no thread named {prefix}...")


def vcpu_tid(qemu: psutil.Process) -> int:
    """The host thread running vcpu 0 (qemu names it "CPU 0/TCG" or "CPU 0/KVM")."""
    return thread_named(qemu, "CPU 0/")


def iothread_tid(qemu: psutil.Process) -> int:
    """The host thread of iothread 1 (libvirt's id "iothread1"; qemu names it "IO iothread1")."""
    return thread_named(qemu, "IO iothread1")


def mems_allowed(pid: int, tid: int) -> str:
    """The memory nodes the host lets task ``tid`` of ``pid`` use (its cpuset's), as a list."""
    status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
    return re.search(r"Mems_allowed_list:\s*(\S+)", status).group(1)  # type: ignore[union-attr]


class Writes:
    """inotify on files of the host's cgroupfs: which of them were written (IN_MODIFY) since the watch began."""

    IN_MODIFY = 0x2
    IN_NONBLOCK = os.O_NONBLOCK

    def __init__(self, paths: list[Path]) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._fd = libc.inotify_init1(self.IN_NONBLOCK | os.O_CLOEXEC)
        if self._fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self._paths: dict[int, Path] = {}
        for path in paths:
            wd = libc.inotify_add_watch(self._fd, os.fsencode(path), self.IN_MODIFY)
            if wd < 0:
                raise OSError(ctypes.get_errno(), f"inotify_add_watch {path}")
            self._paths[wd] = path

    def written(self) -> set[Path]:
        found = set()
        while True:
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                return found
            at = 0
            while at < len(data):
                wd, mask, _cookie, length = struct.unpack_from("iIII", data, at)
                if mask & self.IN_MODIFY:
                    found.add(self._paths[wd])
                at += 16 + length

    def close(self) -> None:
        os.close(self._fd)


def test_qemu_is_placed_in_the_hosts_cgroups(tlab: Lab, qemu: psutil.Process) -> None:
    tid = vcpu_tid(qemu)
    for controller in ("cpu", "cpuacct", "cpuset"):
        assert str(tid) in group(tlab, controller, "vcpu0", "tasks").read_text().split()
        assert str(qemu.pid) in group(tlab, controller, "emulator", "cgroup.procs").read_text().split()
    for controller in ("memory", "blkio"):
        assert str(qemu.pid) in group(tlab, controller, "cgroup.procs").read_text().split()


@two_cpus
def test_cputune_iothreadpin_at_start_pins_the_hosts_iothread(tlab: Lab, virsh: Virsh, qemu: psutil.Process) -> None:
    # libvirt found the thread with QMP query-iothreads: a host tid, which no DPU task has.
    tid = iothread_tid(qemu)
    assert os.sched_getaffinity(tid) == {IOTHREAD_PIN}
    assert os.sched_getaffinity(vcpu_tid(qemu)) == set(CPUS)  # only the iothread is pinned
    for controller in ("cpu", "cpuacct", "cpuset"):
        assert str(tid) in group(tlab, controller, "iothread1", "tasks").read_text().split()
    assert group(tlab, "cpuset", "iothread1", "cpuset.cpus").read_text().strip() == str(IOTHREAD_PIN)
    assert re.search(rf"^\s*1\s+{IOTHREAD_PIN}\s*$", virsh("iothreadinfo", GUEST), re.M)


@two_cpus
def test_iothreadpin_sets_the_host_iothreads_affinity(tlab: Lab, virsh: Virsh, qemu: psutil.Process) -> None:
    tid = iothread_tid(qemu)
    other = CPUS[0]  # IOTHREAD_PIN is the last
    virsh("iothreadpin", GUEST, "1", str(other), "--live")
    assert os.sched_getaffinity(tid) == {other}
    assert group(tlab, "cpuset", "iothread1", "cpuset.cpus").read_text().strip() == str(other)
    assert re.search(rf"^\s*1\s+{other}\s*$", virsh("iothreadinfo", GUEST), re.M)
    virsh("iothreadpin", GUEST, "1", ",".join(map(str, CPUS)), "--live")
    assert os.sched_getaffinity(tid) == set(CPUS)


def test_numatune_at_start_binds_the_host_qemus_memory(tlab: Lab, virsh: Virsh, qemu: psutil.Process) -> None:
    node = str(NODES[0])
    threads = {"emulator": qemu.pid, "vcpu0": vcpu_tid(qemu), "iothread1": iothread_tid(qemu)}
    for name, tid in threads.items():
        assert group(tlab, "cpuset", name, "cpuset.mems").read_text().strip() == node, name
        assert mems_allowed(qemu.pid, tid) == node, name
    shown = virsh("numatune", GUEST)
    assert re.search(r"numa_mode\s*:\s*strict", shown) and re.search(rf"numa_nodeset\s*:\s*{node}\s*$", shown, re.M)


@contextmanager
def started(virsh: Virsh, domain: Domain) -> Iterator[psutil.Process]:
    """``domain`` defined and started from the DPU side (not waited for to boot): its host qemu; then gone."""
    virsh.define(domain)
    try:
        virsh("start", domain.name)
        try:
            (found,) = qemu_processes(domain.name)
            yield found
        finally:
            virsh("destroy", domain.name, timeout=60)
    finally:
        virsh("undefine", domain.name)


@two_cpus
def test_cputune_emulatorpin_at_start_pins_the_host_qemu(tlab: Lab, virsh: Virsh) -> None:
    # libvirt pins qemu right after placing it in the domain's group, before its emulator group exists.
    domain = dataclasses.replace(guest_domain("tune3", guest.build()), emulator_pin=str(CPUS[0]))
    with started(virsh, domain) as qemu:
        assert os.sched_getaffinity(qemu.pid) == {CPUS[0]}


def test_numatune_of_a_running_guest_writes_the_hosts_cpuset_mems(tlab: Lab, virsh: Virsh) -> None:
    # libvirt changes a running guest's nodeset in restrictive mode only, through cpuset.mems alone.
    # With one node the value cannot change: the proof is the host kernel's record of the writes.
    domain = dataclasses.replace(
        guest_domain("tune2", guest.build()), iothreads=1, numa_nodeset=str(NODES[0]), numa_mode="restrictive"
    )
    with started(virsh, domain):
        (place,) = tlab.host_partitions["cpuset"].glob(f"qemu-*-{domain.name}.libvirt-qemu")
        files = [place.joinpath(name, "cpuset.mems") for name in ("emulator", "vcpu0", "iothread1")]
        writes = Writes(files)
        try:
            virsh("numatune", domain.name, "--live", "--nodeset", str(NODES[0]))
            assert writes.written() == set(files)
        finally:
            writes.close()
        assert all(file.read_text().strip() == str(NODES[0]) for file in files)
        before = files[1].read_text()
        with pytest.raises(LabError, match=f"NUMA node {MISSING_NODE} is unavailable"):
            virsh("numatune", domain.name, "--live", "--nodeset", str(MISSING_NODE))
        assert files[1].read_text() == before


def test_numatune_naming_a_node_the_host_lacks_is_refused_at_start(tlab: Lab, virsh: Virsh) -> None:
    # libvirt checks the nodeset against the host's nodes (its /sys facts) before qemu runs.
    other = dataclasses.replace(guest_domain("tune2", guest.build()), numa_nodeset=str(MISSING_NODE))
    virsh.define(other)
    try:
        with pytest.raises(LabError, match=f"NUMA node {MISSING_NODE} is unavailable"):
            virsh("start", other.name)
        assert qemu_processes(other.name) == []
    finally:
        virsh("undefine", other.name)


def test_schedinfo_sets_the_hosts_cpu_cgroups(tlab: Lab, virsh: Virsh, qemu: psutil.Process) -> None:
    virsh("schedinfo", GUEST, "--live", "--set", "cpu_shares=512")
    virsh("schedinfo", GUEST, "--live", "--set", "vcpu_period=50000")
    virsh("schedinfo", GUEST, "--live", "--set", "vcpu_quota=20000")
    assert group(tlab, "cpu", "cpu.shares").read_text().strip() == "512"
    assert group(tlab, "cpu", "vcpu0", "cpu.cfs_period_us").read_text().strip() == "50000"
    assert group(tlab, "cpu", "vcpu0", "cpu.cfs_quota_us").read_text().strip() == "20000"
    shown = virsh("schedinfo", GUEST, "--live")
    assert re.search(r"cpu_shares\s*:\s*512", shown) and re.search(r"vcpu_quota\s*:\s*20000", shown)


def test_memtune_sets_the_hosts_memory_limit(tlab: Lab, virsh: Virsh, qemu: psutil.Process) -> None:
    virsh("memtune", GUEST, "--live", "--hard-limit", str(1024 * 1024))  # KiB
    assert int(group(tlab, "memory", "memory.limit_in_bytes").read_text()) == 1 << 30


def test_blkiotune_weight_where_the_host_has_it(tlab: Lab, virsh: Virsh, qemu: psutil.Process) -> None:
    knobs = [name for name in ("blkio.bfq.weight", "blkio.weight") if group(tlab, "blkio", name).exists()]
    if not knobs:
        pytest.skip("the host's blkio controller has no weight here (no BFQ or CFQ scheduler)")
    virsh("blkiotune", GUEST, "--live", "--weight", "300")
    assert group(tlab, "blkio", knobs[0]).read_text().split()[-1] == "300"


def test_vcpupin_and_emulatorpin_set_the_host_threads_affinity(tlab: Lab, virsh: Virsh, qemu: psutil.Process) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    last, first = cpus[-1], cpus[0]
    tid = vcpu_tid(qemu)
    virsh("vcpupin", GUEST, "0", str(last), "--live")
    assert os.sched_getaffinity(tid) == {last}
    virsh("emulatorpin", GUEST, str(first), "--live")
    assert os.sched_getaffinity(qemu.pid) == {first}
    assert os.sched_getaffinity(tid) == {last}  # the vcpu keeps its own pin
    assert re.search(rf"CPU Affinity:\s*{'-' * last}y", virsh("vcpuinfo", GUEST))


def host_cpu_seconds(pid: int, tid: int | None = None) -> float:
    path = f"/proc/{pid}/task/{tid}/stat" if tid else f"/proc/{pid}/stat"
    with open(path) as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICK  # utime, stime


def test_statistics_are_the_host_qemus(tlab: Lab, virsh: Virsh, qemu: psutil.Process) -> None:
    # The guest has run for a while: its qemu's time is far from a stand-in's.
    wait_until(lambda: host_cpu_seconds(qemu.pid) > 1.0, 120, "the host's qemu used a second of CPU")
    rss_kib = int(re.search(r"rss (\d+)", virsh("dommemstat", GUEST)).group(1))  # type: ignore[union-attr]
    with open(f"/proc/{qemu.pid}/status") as status:
        host_rss = int(re.search(r"VmRSS:\s*(\d+)", status.read()).group(1))  # type: ignore[union-attr]
    assert abs(rss_kib - host_rss) <= host_rss * 0.1, (rss_kib, host_rss)

    before = host_cpu_seconds(qemu.pid)
    reported = int(re.search(r"cpu\.time=(\d+)", virsh("domstats", "--cpu-total", GUEST)).group(1)) / 1e9  # type: ignore[union-attr]
    after = host_cpu_seconds(qemu.pid)
    # The cgroup counts from libvirt's placement, just after qemu started.
    assert before * 0.8 - 0.5 <= reported <= after + 0.5, (before, reported, after)

    tid = vcpu_tid(qemu)
    before = host_cpu_seconds(qemu.pid, tid)
    shown = virsh("vcpuinfo", GUEST)
    after = host_cpu_seconds(qemu.pid, tid)
    vcpu_time = float(re.search(r"CPU time:\s*([\d.]+)s", shown).group(1))  # type: ignore[union-attr]
    assert before - 0.2 <= vcpu_time <= after + 0.2, (before, vcpu_time, after)

    total = virsh("cpu-stats", GUEST, "--total")
    cpu_total = float(re.search(r"cpu_time\s+([\d.]+) seconds", total).group(1))  # type: ignore[union-attr]
    assert cpu_total >= reported - 0.5, (cpu_total, reported)


def test_a_host_process_the_dpu_did_not_start_is_out_of_reach(tlab: Lab, qemu: psutil.Process) -> None:
    bystander = proc.spawn(tlab.command("host", ["sleep", "300"]))
    try:

        def sleeper() -> int | None:
            # The side's command may exec sleep itself or start it as its child.
            for process in [psutil.Process(bystander.pid), *psutil.Process(bystander.pid).children(recursive=True)]:
                if process.name() == "sleep":
                    return process.pid
            return None

        wait_until(sleeper, 10, "sleep started on the host side")
        pid = sleeper()
        assert pid is not None
        with open(f"/proc/{pid}/cgroup") as file:
            cgroups_before = file.read()
        affinity_before = os.sched_getaffinity(pid)
        root = dpu_libvirt.target(tlab)
        machine = root / "sys" / "fs" / "cgroup" / "cpu" / "machine" / domain_group(tlab) / "tasks"
        placing = proc.run(tlab.command("dpu", ["sh", "-c", f"echo {pid} > {machine}"]), check=False)
        assert placing.returncode != 0
        reading = proc.run(tlab.command("dpu", ["cat", f"{root}/run/offload/qtfs-proc/{pid}/status"]), check=False)
        assert reading.returncode != 0
        with open(f"/proc/{pid}/cgroup") as file:
            assert file.read() == cgroups_before
        assert os.sched_getaffinity(pid) == affinity_before
        # The DPU's own numbers never reach the host either way: qemu's are shown as its stand-in's.
        listed = proc.run(tlab.command("dpu", ["cat", str(machine.parent / "emulator" / "tasks")])).stdout.split()
        assert str(qemu.pid) not in listed
    finally:
        proc.end_pid(bystander.pid)


def test_qemu_has_the_resource_limits_libvirt_gave_its_stand_in(qemu: psutil.Process) -> None:
    """libvirt sets qemu's limits in its child before exec (max_core is 0 by default): the host's qemu has them."""
    (stand_in,) = [
        p
        for p in psutil.process_iter(["exe", "cmdline"])
        if p.pid != qemu.pid
        and f"guest={GUEST}," in " ".join(p.info["cmdline"] or [])
        and "rexec" in str(p.info["cmdline"])
    ]
    carried = ("Max core file size", "Max locked memory", "Max open files", "Max processes")
    wanted = {
        line[:26].strip(): line[26:].split()[:2]
        for line in Path(f"/proc/{stand_in.pid}/limits").read_text().splitlines()
    }
    shown = {
        line[:26].strip(): line[26:].split()[:2] for line in Path(f"/proc/{qemu.pid}/limits").read_text().splitlines()
    }
    assert wanted["Max core file size"] == ["0", "0"]
    assert {name: shown[name] for name in carried} == {name: wanted[name] for name in carried}


def test_tuning_reaches_a_running_domain_after_libvirtd_restarts(tlab: Lab, virsh: Virsh, qemu: psutil.Process) -> None:
    # libvirt reconnecting finds the domain's groups through the host's /proc/<qemu>/cgroup, not the stand-in's.
    dpu_libvirt.restart_libvirtd(tlab)
    assert GUEST in virsh("list", "--name")
    virsh("schedinfo", GUEST, "--live", "--set", "cpu_shares=768")
    assert group(tlab, "cpu", "cpu.shares").read_text().strip() == "768"
    assert re.search(r"cpu_shares\s*:\s*768", virsh("schedinfo", GUEST, "--live"))
    cpus = sorted(os.sched_getaffinity(0))
    tid = vcpu_tid(qemu)
    virsh("vcpupin", GUEST, "0", str(cpus[0]), "--live")
    assert os.sched_getaffinity(tid) == {cpus[0]}
    assert group(tlab, "cpuset", "vcpu0", "cpuset.cpus").read_text().strip() == str(cpus[0])
    virsh("iothreadpin", GUEST, "1", str(cpus[-1]), "--live")
    assert os.sched_getaffinity(iothread_tid(qemu)) == {cpus[-1]}
