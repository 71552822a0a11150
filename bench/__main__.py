"""make bench: every part side by side with what an operator would use instead.

Everything runs in one lab (its own namespaces, named "offb"), in one run,
one section per part:

- rexec: from the DPU side to the host side, against ssh over the same veth
  (sshd in the host namespace with a clean login shell, key authentication,
  plain and with ControlMaster) and a raw TCP stream (socat);
- udsproxy: against a socat relay over the same veth and a direct socket
  (bench/udsproxy_bench.py);
- qtfs: against sshfs over the same veth (bench/qtfs_bench.py);
- prepare: offload prepare / teardown of the default plan (bench/prepare_bench.py);
- rootfs: each build mode against cp -a and debootstrap (bench/rootfs_bench.py);
- libvirt: VM start, destroy, save and restore, offloaded against a local libvirtd
  (bench/libvirt_bench.py);
- systemd: in the systemd lab, `systemctl start offload-libvirtd` until virsh
  answers, against the distribution's libvirtd.service (bench/systemd_bench.py).

Figures are reported as ratios, because these machines are shared and noisy.
`--only SECTION,...` runs a subset; each section's module also runs alone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

from bench.report import print_table
from bench.ssh import sshd
from offload import proc
from offload.lab.lab import Lab

#: The stand-in, this installation's (never looked up through PATH).
REXEC = proc.program("rexec")
TCP_PORT = 2223
GIB = 1 << 30


def driver(lab: Lab, *args: str) -> dict:
    argv = [sys.executable, "-m", "bench.driver", *args]
    result = proc.run(lab.command("dpu", argv, cwd=Path(__file__).parent.parent), env=lab.env("dpu"), timeout=600)
    document = json.loads(result.stdout)
    if "error" in document:
        raise SystemExit(f"bench: {document['error']}")
    return document


@contextlib.contextmanager
def control_master(lab: Lab, ssh: list[str], work: Path) -> Iterator[list[str]]:
    socket_path = str(work / "cm.sock")
    master = proc.spawn(
        lab.command("dpu", [*ssh[:-1], "-M", "-S", socket_path, "-N", ssh[-1]]),
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(socket_path):
            if time.monotonic() > deadline:
                raise SystemExit("bench: ssh ControlMaster did not start")
            time.sleep(0.05)
        yield [*ssh[:-1], "-S", socket_path, ssh[-1]]
    finally:
        master.terminate()
        master.wait(10)


@contextlib.contextmanager
def tcp_source(lab: Lab) -> Iterator[list[str]]:
    """A raw TCP stream of 1 GiB from the host side; yields the DPU-side reader."""
    server = proc.spawn(
        lab.command("host", ["sh", "-c", f"head -c {GIB} /dev/zero | socat -u - TCP-LISTEN:{TCP_PORT},reuseaddr"]),
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        time.sleep(0.5)
        yield ["socat", "-u", f"TCP:{lab.host.link.address}:{TCP_PORT}", "-"]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, 15)
        server.wait(10)


def server_rss(lab: Lab, sessions: int) -> dict[str, float]:
    servers = {role: psutil.Process(lab.program_pid(f"{role}-rexec")) for role in ("host", "dpu")}
    children = [
        proc.spawn(lab.command("dpu", [*REXEC, "/bin/sleep", "3"]), env=lab.env("dpu"), stdin=subprocess.DEVNULL)
        for _ in range(sessions)
    ]
    peak = dict.fromkeys(servers, 0.0)
    try:
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            for role, process in servers.items():
                peak[role] = max(peak[role], process.memory_info().rss / (1 << 20))
            time.sleep(0.1)
    finally:
        codes = [child.wait(60) for child in children]
    if any(codes):
        raise SystemExit(f"bench: {sum(1 for c in codes if c)} of {sessions} sessions failed")
    return peak


SECTIONS = ("rexec", "udsproxy", "qtfs", "prepare", "rootfs", "libvirt", "systemd")


def rexec_rows(lab: Lab, work: Path, runs: int) -> list[tuple[str, str, str]]:
    rows = []
    with sshd(lab, work) as ssh, control_master(lab, ssh, work) as ssh_cm:
        driver(lab, "latency", "5", "--", *REXEC, "/bin/true")  # warm the pool
        rexec_lat = driver(lab, "latency", str(runs), "--", *REXEC, "/bin/true")["median"]
        ssh_lat = driver(lab, "latency", str(max(5, runs // 3)), "--", *ssh, "/bin/true")["median"]
        cm_lat = driver(lab, "latency", str(runs), "--", *ssh_cm, "/bin/true")["median"]
        rows.append(("`rexec /bin/true` latency (median)", f"{rexec_lat * 1000:.1f} ms", ""))
        rows.append(("ssh, plain", f"{ssh_lat * 1000:.1f} ms", f"rexec = {rexec_lat / ssh_lat:.3f}x (target <= 0.15x)"))
        rows.append(
            ("ssh, ControlMaster", f"{cm_lat * 1000:.1f} ms", f"rexec = {rexec_lat / cm_lat:.2f}x (target <= 3x)")
        )
        head = ["/usr/bin/head", "-c", str(GIB), "/dev/zero"]
        rexec_tp = driver(lab, "throughput", "--", *REXEC, *head)
        ssh_tp = driver(lab, "throughput", "--", *ssh_cm, *head)
        with tcp_source(lab) as reader:
            tcp_tp = driver(lab, "throughput", "--", *reader)
        for name, result in (("rexec", rexec_tp), ("ssh", ssh_tp), ("raw TCP (socat)", tcp_tp)):
            if result["bytes"] != GIB:
                raise SystemExit(f"bench: {name} delivered {result['bytes']} bytes, not {GIB}")
        rows.append(("1 GiB stdout: rexec", f"{rexec_tp['mib_s']:.0f} MiB/s", ""))
        rows.append(
            (
                "1 GiB stdout: ssh",
                f"{ssh_tp['mib_s']:.0f} MiB/s",
                f"rexec = {rexec_tp['mib_s'] / ssh_tp['mib_s']:.2f}x (target >= 1.5x)",
            )
        )
        rows.append(
            (
                "1 GiB: raw TCP (socat)",
                f"{tcp_tp['mib_s']:.0f} MiB/s",
                f"rexec = {rexec_tp['mib_s'] / tcp_tp['mib_s']:.2f}x",
            )
        )
    rss = server_rss(lab, 100)
    rows.append(
        (
            "rexec_server RSS, 100 concurrent sessions",
            f"host {rss['host']:.0f} MB, DPU {rss['dpu']:.0f} MB",
            "target < 100 MB",
        )
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(prog="make bench", description=__doc__)
    parser.add_argument("--runs", type=int, default=30, help="sequential runs per latency figure")
    parser.add_argument(
        "--only", default=",".join(SECTIONS), help=f"comma-separated sections (default all: {','.join(SECTIONS)})"
    )
    parser.add_argument("--quick", action="store_true", help="rootfs: skip the debootstrap builds (minutes)")
    parser.add_argument("--rounds", type=int, default=3, help="libvirt: VM starts per side; systemd: unit starts")
    args = parser.parse_args()
    sections = [s for s in args.only.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"bench: unknown section(s) {', '.join(sorted(unknown))}; known: {', '.join(SECTIONS)}")
    if os.geteuid() != 0:
        raise SystemExit("bench: needs root (network namespaces)")
    for tool in ("ssh", "socat", "/usr/sbin/sshd", "sshfs"):
        if not shutil.which(tool):
            raise SystemExit(f"bench: {tool} is missing; run make setup")
    from bench.libvirt_bench import libvirt_rows
    from bench.prepare_bench import prepare_rows
    from bench.qtfs_bench import qtfs_rows
    from bench.rootfs_bench import rootfs_rows
    from bench.systemd_bench import systemd_rows
    from bench.udsproxy_bench import udsproxy_rows

    lab = Lab("offb")
    lab.down()
    lab.up()
    tables: list[tuple[str, list[tuple[str, str, str]]]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="offload-bench-") as tmp:
            work = Path(tmp)
            os.chmod(work, 0o700)
            runners = {
                "rexec": lambda: rexec_rows(lab, work, args.runs),
                "udsproxy": lambda: udsproxy_rows(lab, work),
                "qtfs": lambda: qtfs_rows(lab, work),
                "prepare": prepare_rows,
                "rootfs": lambda: rootfs_rows(quick=args.quick),
                "libvirt": lambda: libvirt_rows(lab, work, args.rounds),
                "systemd": lambda: systemd_rows(args.rounds),
            }
            for section in sections:
                print(f"bench: {section} ...", file=sys.stderr, flush=True)
                tables.append((section, runners[section]()))
    finally:
        lab.down()
    for section, rows in tables:
        print_table(rows, section)


if __name__ == "__main__":
    main()
