"""The deployment as shipped: how long a service start takes under systemd.

The systemd lab (`offload lab systemd`) boots the host and the DPU as two
containers with systemd as PID 1 and installs the package built from this
checkout.  Rows:

- ``systemctl start offload-libvirtd`` until virsh answers (``virsh list``
  on the chrooted libvirtd's socket), against the distribution's own
  ``libvirtd.service`` started the same way in the same container (what an
  operator without the offload has).  Target: under 2 s.
- The gap a running guest's management sees while ``systemctl restart
  rexec`` restarts the host's rexec_server (and then the DPU's): virsh in
  the DPU container asks the guest's monitor ``query-status`` back to back;
  the longest round trip around the restart is the stall, next to the
  typical round trip before it.  Target: under 1 s.

Each start is timed inside the container by one small program (nsenter per
virsh poll would add its own cost), after one unmeasured start of each that
fills libvirt's capability cache; the median of ``rounds`` starts is shown.
The monitor calls are timed by another such program, on the machine's
monotonic clock (the containers have no time namespace of their own), so
that they line up with the restart's start and end taken outside; the
median of ``RESTARTS`` restarts is shown.

    .venv/bin/python -m bench.systemd_bench
"""

from __future__ import annotations

import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.report import Row, print_table
from offload import proc
from offload.errors import LabError
from offload.lab import systemd_lab
from offload.lab.systemd_lab import DISTRO_LIBVIRT_UNITS, LIBVIRT_SOCKET, SystemdLab

LAB_NAME = "offbs"
TARGET_S = 2.0
STALL_TARGET_S = 1.0
RESTARTS = 3
#: How long the monitor is asked before a restart (the typical round trip) and after it (the resume).
BEFORE_S, AFTER_S = 2.0, 3.0
#: Runs in the DPU container: stop UNIT, then time `systemctl start UNIT` until virsh at URI answers.
TIME_START = """
import subprocess, sys, time
unit, uri = sys.argv[1], sys.argv[2]
subprocess.run(["systemctl", "stop", unit], check=True)
started = time.monotonic()
subprocess.run(["systemctl", "start", unit], check=True)
deadline = started + 60
quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
while subprocess.run(["virsh", "-q", "-c", uri, "list", "--all"], **quiet).returncode != 0:
    if time.monotonic() > deadline:
        sys.exit(f"virsh at {uri} did not answer within 60 s of starting {unit}")
print(time.monotonic() - started)
"""


#: Runs in the DPU container: query-status on the guest's monitor through virsh, back to back, until its
#: stdin closes; prints each call's start, end (the machine's monotonic clock) and exit status.
MONITOR_LOOP = """
import json, select, subprocess, sys, time
uri, domain = sys.argv[1], sys.argv[2]
argv = ["timeout", "30", "virsh", "-q", "-c", uri, "qemu-monitor-command", domain, '{"execute":"query-status"}']
quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
calls = []
while not select.select([sys.stdin], [], [], 0)[0]:
    started = time.monotonic()
    code = subprocess.run(argv, **quiet).returncode
    calls.append((started, time.monotonic(), code))
print(json.dumps(calls))
"""


@dataclass(frozen=True)
class Stall:
    longest: float  # the longest round trip that overlapped the restart or the settling after it
    typical: float  # the median round trip before the restart
    failed: int  # calls that did not answer at all


def _stall(calls: list[tuple[float, float, int]], restart: tuple[float, float]) -> Stall:
    begun, done = restart
    around = [end - start for start, end, _ in calls if end >= begun and start <= done + AFTER_S]
    before = [end - start for start, end, _ in calls if end < begun]
    if not around or not before:
        raise LabError(f"the monitor loop made {len(before)} calls before the restart and {len(around)} around it")
    return Stall(max(around), statistics.median(before), sum(1 for *_, code in calls if code != 0))


def _stall_of_restart(lab: SystemdLab, role: str, domain: str) -> Stall:
    """One ``systemctl restart rexec`` on ``role`` while the DPU's virsh asks the guest's monitor back to back."""
    uri = f"qemu:///system?socket={LIBVIRT_SOCKET}"
    argv = lab.command("dpu", ["python3", "-c", MONITOR_LOOP, uri, domain])
    loop = proc.spawn(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(BEFORE_S)
        begun = time.monotonic()
        lab.systemctl(role, "restart", "rexec")
        done = time.monotonic()
        time.sleep(AFTER_S)
        out, _ = loop.communicate("", timeout=60)  # its stdin closed: it stops after the call under way
    finally:
        if loop.poll() is None:
            loop.kill()
            loop.wait()
    if loop.returncode != 0:
        raise LabError(f"the monitor loop in the DPU container exited {loop.returncode}")
    return _stall([tuple(call) for call in json.loads(out)], (begun, done))


@contextlib.contextmanager
def _running_guest(lab: SystemdLab) -> Iterator[str]:
    """The lab's guest started from the DPU container for the block; destroyed and undefined on every way out."""
    vm = systemd_lab.domain(lab)
    try:
        systemd_lab.start_vm(lab, vm)
        yield vm.name
    finally:
        with contextlib.suppress(LabError):
            systemd_lab.virsh(lab)("destroy", vm.name)
        with contextlib.suppress(LabError):
            systemd_lab.virsh(lab)("undefine", vm.name)


def _restart_row(lab: SystemdLab, role: str, domain: str) -> Row:
    stalls = [_stall_of_restart(lab, role, domain) for _ in range(RESTARTS)]
    longest = statistics.median(s.longest for s in stalls)
    typical = statistics.median(s.typical for s in stalls)
    failed = sum(s.failed for s in stalls)
    verdict = "meets" if longest < STALL_TARGET_S and not failed else "misses"
    where = "host" if role == "host" else "DPU"
    return (
        f"`systemctl restart rexec` ({where}) under a running guest: longest monitor round trip (DPU's virsh)",
        f"{longest:.2f} s (each: {', '.join(f'{s.longest:.2f}' for s in stalls)}; typical round trip "
        f"{typical * 1000:.0f} ms; {failed} calls failed; median of {RESTARTS})",
        f"{verdict} the {STALL_TARGET_S:.0f} s target",
    )


def _start_seconds(lab: SystemdLab, unit: str, uri: str) -> float:
    return float(lab.run("dpu", "python3", "-c", TIME_START, unit, uri, timeout=120).stdout.strip())


def _median_start(lab: SystemdLab, unit: str, uri: str, rounds: int) -> float:
    _start_seconds(lab, unit, uri)  # fills the capability cache; not measured
    return statistics.median(_start_seconds(lab, unit, uri) for _ in range(rounds))


def systemd_rows(rounds: int = 5, say: Callable[[str], None] = print) -> list[Row]:
    """Build the package, boot the systemd lab, time the unit starts, take everything down."""
    lab = SystemdLab(LAB_NAME)
    lab.down()
    with tempfile.TemporaryDirectory(prefix="offload-bench-deb-") as tmp:
        deb = systemd_lab.build_deb(Path(tmp))
        try:
            lab.up(deb, say)
            with _running_guest(lab) as domain:
                restarts = [_restart_row(lab, role, domain) for role in ("host", "dpu")]
            offloaded = _median_start(lab, "offload-libvirtd", f"qemu:///system?socket={LIBVIRT_SOCKET}", rounds)
            # The distribution's libvirtd next to it: its own /run, not the chroot's.
            lab.systemctl("dpu", "unmask", *DISTRO_LIBVIRT_UNITS)
            local = _median_start(lab, "libvirtd.service", "qemu:///system", rounds)
        finally:
            lab.down()
    verdict = "meets" if offloaded < TARGET_S else "misses"
    return [
        (
            "systemctl start offload-libvirtd until virsh answers (DPU container)",
            f"{offloaded:.2f} s (distro libvirtd.service {local:.2f} s; median of {rounds})",
            f"{offloaded / local:.2f}x; {verdict} the {TARGET_S:.0f} s target",
        ),
        *restarts,
    ]


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    print_table(systemd_rows(rounds, say=lambda line: print(line, file=sys.stderr)), "systemd")


if __name__ == "__main__":
    main()
