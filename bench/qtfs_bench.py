"""The qtfs benchmark, runnable alone: ``python -m bench.qtfs_bench``.

Side by side in one run, over the lab's veth: the same host directory
through qtfs (TLS, its default coherent cache: the kernel caches, the host
announces every change) and through sshfs (sshd in the host namespace,
sshfs with its default caches, which may serve stale data for 20 s), all
mounted on the DPU side in one private mount namespace.  Extra rows: qtfs
``--no-cache`` (every call asks the host), sshfs without caches, and the
same files read directly on the DPU side (no FUSE: the floor for a cache).
``make bench`` calls `qtfs_rows` too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from bench.report import run_alone
from bench.ssh import sshd
from offload import proc
from offload.lab.lab import Lab

QTFS_PORT = 7023
ROOT = Path(__file__).resolve().parent.parent
BIG = 256 << 20

# Runs on the DPU side in a private mount namespace: mounts, measures, unmounts.
DRIVER = r"""
import json, os, statistics, subprocess, sys, time
spec = json.loads(sys.argv[1])
results = {}
mounted = []
def timed(count, action):
    clock, calls = time.perf_counter_ns, []
    for _ in range(count):
        start = clock()
        action()
        calls.append(clock() - start)
    return calls
def read_small(path):
    fd = os.open(path, os.O_RDONLY)
    os.read(fd, 8192)
    os.close(fd)
def sequential(path):
    start = time.perf_counter()
    total = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(1 << 20):
            total += len(chunk)
    return total / (time.perf_counter() - start) / (1 << 20), total
try:
    for name, argv, where in spec["mounts"]:
        os.makedirs(where, exist_ok=True)
        subprocess.run(argv, check=True, timeout=60)
        mounted.append((name, where))
        small, listing = where + "/small", where + "/dir1000"
        os.stat(small); read_small(small); os.listdir(listing)  # warm up the connection
        results[name] = {}
    results["local"] = {}  # the same files without FUSE: the floor for what a kernel cache can do
    # On one CPU: the machine's CPUs need not be equally fast (a shared host's
    # neighbours), and a measure must not depend on where it was scheduled.
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    # The metadata measures take turns across the mounts, round by round and
    # in alternating order, so the machine's load falls on all of them alike.
    # Each figure is the median call: a cache's occasional refresh (a round
    # trip every few seconds, for qtfs and sshfs alike) and the other tenants
    # of a shared machine do not move it.
    measures = (
        ("stat_us", 2000, 1e6, lambda where: os.stat(where + "/small")),
        ("small_us", 1000, 1e6, lambda where: read_small(where + "/small")),
        ("readdir_ms", 20, 1e3, lambda where: os.listdir(where + "/dir1000")),
    )
    for key, count, scale, action in measures:
        calls = {}
        for turn in range(6):
            for name, where in (mounted + [("local", spec["local"])])[:: 1 if turn % 2 else -1]:
                time.sleep(0.2)  # what the previous mount's round left running settles first
                calls.setdefault(name, []).extend(timed(count, lambda: action(where)))
        for name, durations in calls.items():
            results[name][key] = statistics.median(durations) * scale / 1e9
    for name, where in mounted:
        rates = [sequential(where + "/big") for _ in range(2)]
        if any(total != spec["big"] for _, total in rates):
            raise SystemExit(f"{name}: read {rates} bytes, expected {spec['big']}")
        results[name]["seq_cold_mib_s"] = rates[0][0]  # nothing of it in the DPU's page cache yet
        results[name]["seq_mib_s"] = max(rate for rate, _ in rates)
finally:
    for _, where in reversed(mounted):
        subprocess.run(["umount", "-l", where], check=False)
print(json.dumps(results))
"""


def _prepare(data: Path) -> None:
    data.mkdir()
    (data / "small").write_bytes(os.urandom(4096))
    listing = data / "dir1000"
    listing.mkdir()
    for i in range(1000):
        (listing / f"entry-{i:04d}").write_bytes(b"x")
    with open(data / "big", "wb") as big:
        chunk = os.urandom(1 << 20)
        for _ in range(BIG >> 20):
            big.write(chunk)
    os.chmod(data, 0o755)


@contextlib.contextmanager
def _qtfs_server(lab: Lab, data: Path) -> Iterator[str]:
    argv = [
        *proc.program("qtfs"),
        "serve",
        "--listen",
        f"tcp://{lab.host.link.address}:{QTFS_PORT}",
        "--export",
        str(data),
        "--pki",
        str(lab.dir / "pki" / "host"),
        "--log-level",
        "WARNING",
    ]
    # Started as the lab starts its services: it returns once qtfs said READY=1.
    pid = lab.start_service("host-qtfs-bench", lab.host, argv)
    try:
        yield f"{lab.host.link.address}:{QTFS_PORT}"
    finally:
        proc.end_pid(pid)


def qtfs_rows(lab: Lab, work: Path) -> list[tuple[str, str, str]]:
    """qtfs against sshfs over the same veth: stat, 4 KiB open+read+close, readdir of 1,000, 256 MiB read."""

    # A directory of our own: sshd() writes its keys by fixed names, and the
    # caller's work directory may hold another sshd's already.
    work = work / "qtfs-bench"
    work.mkdir()
    os.chmod(work, 0o755)
    data = work / "qtfs-data"
    _prepare(data)
    mnt = work / "qtfs-mnt"
    qtfs = proc.program("qtfs")
    with sshd(lab, work) as ssh, _qtfs_server(lab, data) as address:
        pki = str(lab.dir / "pki" / "dpu")
        ssh_command = " ".join(ssh[:-1])
        spec = {
            "big": BIG,
            "local": str(data),
            "mounts": [
                [
                    "qtfs",
                    [*qtfs, "mount", "--log-level", "WARNING", "--pki", pki, f"{address}:{data}", f"{mnt}/qtfs"],
                    f"{mnt}/qtfs",
                ],
                [
                    "qtfs_nocache",
                    [
                        *qtfs,
                        "mount",
                        "--log-level",
                        "WARNING",
                        "--pki",
                        pki,
                        "--no-cache",
                        f"{address}:{data}",
                        f"{mnt}/nocache",
                    ],
                    f"{mnt}/nocache",
                ],
                [
                    "sshfs_coherent",
                    [
                        "sshfs",
                        "-o",
                        f"ssh_command={ssh_command}",
                        "-o",
                        "sftp_server=/usr/lib/openssh/sftp-server",
                        # sshfs with qtfs's coherence: no kernel or sshfs caches
                        "-o",
                        "dir_cache=no,entry_timeout=0,attr_timeout=0,negative_timeout=0",
                        f"{ssh[-1]}:{data}",
                        f"{mnt}/sshfs-coherent",
                    ],
                    f"{mnt}/sshfs-coherent",
                ],
                [
                    "sshfs",
                    [
                        "sshfs",
                        "-o",
                        f"ssh_command={ssh_command}",
                        # the bench's sshd has no sftp subsystem configured: run the server directly
                        "-o",
                        "sftp_server=/usr/lib/openssh/sftp-server",
                        f"{ssh[-1]}:{data}",
                        f"{mnt}/sshfs",
                    ],
                    f"{mnt}/sshfs",
                ],
            ],
        }
        argv = ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", DRIVER, json.dumps(spec)]
        result = proc.run(lab.command("dpu", argv), env=lab.env("dpu"), timeout=900)
    figures = json.loads(result.stdout)
    q, c, s, n = figures["qtfs"], figures["qtfs_nocache"], figures["sshfs"], figures["sshfs_coherent"]
    local = figures["local"]
    rows = []
    for key, label, unit in (
        ("stat_us", "stat of a file (median call)", "us"),
        ("small_us", "open+read+close of a 4 KiB file (median)", "us"),
        ("readdir_ms", "readdir of 1,000 entries (median)", "ms"),
    ):
        rows += [
            (
                f"{label}: qtfs (coherent cache, the default)",
                _figure(q[key], unit),
                f"{q[key] / s[key]:.2f}x default sshfs (target <= 1x)",
            ),
            (f"{label}: sshfs, default caches", _figure(s[key], unit), ""),
            (f"{label}: qtfs --no-cache", _figure(c[key], unit), f"{c[key] / n[key]:.2f}x sshfs without caches"),
            (f"{label}: sshfs without caches", _figure(n[key], unit), ""),
            (f"{label}: directly on the DPU side (the same filesystem, no FUSE)", _figure(local[key], unit), ""),
        ]
    rows += [
        (
            "sequential read of 256 MiB, first read: qtfs",
            f"{q['seq_cold_mib_s']:.0f} MiB/s",
            f"{q['seq_cold_mib_s'] / s['seq_cold_mib_s']:.2f}x default sshfs (target >= 0.8x)",
        ),
        ("sequential read of 256 MiB, first read: sshfs, default caches", f"{s['seq_cold_mib_s']:.0f} MiB/s", ""),
        (
            "sequential read of 256 MiB, best of two: qtfs (the second from the DPU's page cache)",
            f"{q['seq_mib_s']:.0f} MiB/s",
            f"{q['seq_mib_s'] / s['seq_mib_s']:.2f}x default sshfs",
        ),
        ("sequential read of 256 MiB, best of two: sshfs, default caches", f"{s['seq_mib_s']:.0f} MiB/s", ""),
        ("sequential read of 256 MiB, best of two: qtfs --no-cache", f"{c['seq_mib_s']:.0f} MiB/s", ""),
        ("sequential read of 256 MiB, best of two: sshfs without caches", f"{n['seq_mib_s']:.0f} MiB/s", ""),
    ]
    return rows


def _figure(value: float, unit: str) -> str:
    """Three significant digits, without an exponent (0.241 ms, 2.41 us, 611 us)."""
    decimals = max(0, 2 - math.floor(math.log10(value))) if value > 0 else 0
    return f"{value:.{decimals}f} {unit}"


def main() -> None:
    argparse.ArgumentParser(prog="python -m bench.qtfs_bench", description=__doc__).parse_args()
    run_alone("offq", ["rexec"], qtfs_rows)


if __name__ == "__main__":
    main()
