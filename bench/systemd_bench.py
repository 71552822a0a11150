"""The deployment as shipped: how long a service start takes under systemd.

The systemd lab (`offload lab systemd`) boots the host and the DPU as two
containers with systemd as PID 1 and installs the package built from this
checkout.  In the DPU container, one row:

- ``systemctl start offload-libvirtd`` until virsh answers (``virsh list``
  on the chrooted libvirtd's socket), against the distribution's own
  ``libvirtd.service`` started the same way in the same container (what an
  operator without the offload has).  Target: under 2 s.

Each start is timed inside the container by one small program (nsenter per
virsh poll would add its own cost), after one unmeasured start of each that
fills libvirt's capability cache; the median of ``rounds`` starts is shown.

    .venv/bin/python -m bench.systemd_bench
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from bench.report import Row, print_table
from offload.lab import systemd_lab
from offload.lab.systemd_lab import DISTRO_LIBVIRT_UNITS, LIBVIRT_SOCKET, SystemdLab

LAB_NAME = "offbs"
TARGET_S = 2.0
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
        )
    ]


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    print_table(systemd_rows(rounds, say=lambda line: print(line, file=sys.stderr)), "systemd")


if __name__ == "__main__":
    main()
