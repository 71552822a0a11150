"""The udsproxy benchmark, runnable alone: ``python -m bench.udsproxy_bench``.

Side by side in one run, over the lab's veth: a program on the DPU side
reaching a host-only UNIX socket through udsproxy, the same through a
socat relay (UNIX-LISTEN -> TCP -> UNIX-CONNECT), and a direct local UNIX
socket on the host side.  ``make bench`` calls `udsproxy_rows` too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.report import run_alone
from offload import proc
from offload.lab.lab import Lab

RELAY_PORT = 2224
ROOT = Path(__file__).resolve().parent.parent


def uds_run(lab: Lab, role: str, path: str, hide: Path | None = None) -> dict:
    argv = [sys.executable, "-m", "bench.uds_client", path]
    if hide is not None:  # the socket must not exist on this side: a mount namespace hides it
        argv = proc.with_hidden_dir(hide, argv)
    result = proc.run(lab.command(role, argv), env=lab.env(role), cwd=ROOT, timeout=600)
    return json.loads(result.stdout)


def median(results: list[dict], key: str) -> float:
    return statistics.median(result[key] for result in results)


def udsproxy_rows(lab: Lab, work: Path, repeat: int = 3) -> list[tuple[str, str, str]]:
    """udsproxy against a socat relay over the same veth and a direct local socket.

    The three take turns, ``repeat`` times, and each figure is the median of
    its turns: this machine is shared, and a burst of someone else's load
    should not land on one contender only.
    """
    path = str(lab.sockets / "bench.sock")
    relay = str(work / "relay.sock")
    children = [
        proc.spawn(
            lab.command("host", [sys.executable, "-m", "bench.uds_server", path]),
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
        ),
        proc.spawn(
            lab.command("host", ["socat", f"TCP-LISTEN:{RELAY_PORT},reuseaddr,fork", f"UNIX-CONNECT:{path}"]),
            stdin=subprocess.DEVNULL,
        ),
        proc.spawn(
            lab.command("dpu", ["socat", f"UNIX-LISTEN:{relay},fork", f"TCP:{lab.host.link.address}:{RELAY_PORT}"]),
            stdin=subprocess.DEVNULL,
        ),
    ]
    try:
        deadline = time.monotonic() + 20
        while not (os.path.exists(path) and os.path.exists(relay)):
            if time.monotonic() > deadline:
                raise SystemExit("bench: the UNIX socket servers did not start")
            time.sleep(0.05)
        runs: dict[str, list[dict]] = {"ours": [], "socat": [], "direct": []}
        for _ in range(repeat):
            runs["ours"].append(uds_run(lab, "dpu", path, hide=lab.sockets))
            runs["socat"].append(uds_run(lab, "dpu", relay))
            runs["direct"].append(uds_run(lab, "host", path))
    finally:
        for child in children:
            child.kill()
            child.wait()
    for name, results in runs.items():
        if any(result["bytes"] != 1 << 30 for result in results):
            raise SystemExit(f"bench: {name} did not deliver 1 GiB: {results}")
    ours, socat, direct = ({key: median(results, key) for key in ("rtt_us", "mib_s")} for results in runs.values())
    return [
        ("UNIX socket round trip (64 B): udsproxy", f"{ours['rtt_us']:.0f} us", ""),
        (
            "socat relay over the veth",
            f"{socat['rtt_us']:.0f} us",
            f"udsproxy = {ours['rtt_us'] / socat['rtt_us']:.2f}x (target <= 2x)",
        ),
        (
            "direct local UNIX socket",
            f"{direct['rtt_us']:.0f} us",
            f"udsproxy = {ours['rtt_us'] / direct['rtt_us']:.2f}x",
        ),
        ("1 GiB through a UNIX socket: udsproxy", f"{ours['mib_s']:.0f} MiB/s", ""),
        (
            "socat relay over the veth",
            f"{socat['mib_s']:.0f} MiB/s",
            f"udsproxy = {ours['mib_s'] / socat['mib_s']:.2f}x (target >= 1.5x)",
        ),
        (
            "direct local UNIX socket",
            f"{direct['mib_s']:.0f} MiB/s",
            f"udsproxy = {ours['mib_s'] / direct['mib_s']:.2f}x",
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.udsproxy_bench", description=__doc__)
    parser.add_argument("--lab", default="offu", help="name of the lab to create (default offu)")
    parser.add_argument("--repeat", type=int, default=3, help="turns of each contender (median reported)")
    args = parser.parse_args()
    run_alone(args.lab, ["udsproxy"], lambda lab, work: udsproxy_rows(lab, work, args.repeat))


if __name__ == "__main__":
    main()
