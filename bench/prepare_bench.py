"""Wall time of `offload prepare` and `offload teardown` for the default plan (no qtfs).

Everything runs in a private mount namespace (``unshare -m --propagation
private``, with a tmpfs over /run) on a temporary target, so nothing
reaches the machine.  Side by side: the same plan run the reference's way,
as a shell script with one mount(8)/mknod(1) process per step (what
``--dry-run`` prints), and taken down with one umount(8) per mount.

    .venv/bin/python -m bench.prepare_bench
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNS = 7
ROOT = Path(__file__).parent.parent
OFFLOAD = str(Path(sys.executable).parent / "offload")
NO_CONFIG = "/nonexistent/prepare.toml"  # the defaults: no qtfs steps


def _timed(argv: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def _inner(target: str, runs: int) -> dict[str, object]:
    """In the private namespace: time the commands ``runs`` times each."""
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", "/run"], check=True)
    common = ["--target", target, "--config", NO_CONFIG]
    plan = subprocess.run([OFFLOAD, "prepare", "--dry-run", *common], check=True, capture_output=True, text=True)
    script = Path(target).parent / "prepare.sh"
    script.write_text("set -e\n" + plan.stdout)
    steps = sum(1 for line in plan.stdout.splitlines() if line.startswith("# ") and line[2:3].isdigit())
    figures: dict[str, list[float]] = {
        "prepare": [],
        "teardown": [],
        "in_process": [],
        "in_process_down": [],
        "module_up": [],
        "module_down": [],
        "sh_up": [],
        "sh_down": [],
    }
    module = [sys.executable, "-m", "offload.mounts"]
    mounts = 0
    for _ in range(runs):
        started = time.perf_counter()
        done = subprocess.run([OFFLOAD, "prepare", *common], check=True, capture_output=True, text=True)
        figures["prepare"].append(time.perf_counter() - started)
        # "prepared T: ... in N ms": the plan itself, without the interpreter's start
        figures["in_process"].append(float(done.stdout.splitlines()[-1].rsplit(" in ", 1)[1].split()[0]) / 1000)
        down = subprocess.run([OFFLOAD, "teardown", "--dry-run", *common], check=True, capture_output=True, text=True)
        mounts = len(down.stdout.splitlines())
        started = time.perf_counter()
        gone = subprocess.run([OFFLOAD, "teardown", *common], check=True, capture_output=True, text=True)
        figures["teardown"].append(time.perf_counter() - started)
        # "tore down T: N unmounted, in N ms; nothing is mounted below it"
        figures["in_process_down"].append(float(gone.stdout.splitlines()[-1].split(" in ")[1].split()[0]) / 1000)
        figures["module_up"].append(_timed([*module, "prepare", *common]))
        figures["module_down"].append(_timed([*module, "teardown", *common]))
        figures["sh_up"].append(_timed(["sh", str(script)]))
        # the reference's way down: one umount(8) per mount, deepest first
        started = time.perf_counter()
        for line in down.stdout.splitlines():
            subprocess.run(line.split(), check=True)
        figures["sh_down"].append(time.perf_counter() - started)
        assert not os.path.ismount(os.path.join(target, "dev"))
    return {"steps": steps, "mounts": mounts, **{k: statistics.median(v) for k, v in figures.items()}}


def measure(runs: int = RUNS) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="offm-bench-") as work:
        target = os.path.join(work, "another_rootfs")
        os.mkdir(target)
        argv = ["unshare", "--mount", "--propagation", "private"]
        argv += [sys.executable, "-m", "bench.prepare_bench", "--inner", target, str(runs)]
        result = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=600)
        if result.returncode != 0:
            raise RuntimeError(f"prepare_bench failed in its namespace:\n{result.stderr}")
        return json.loads(result.stdout)


def prepare_rows() -> list[tuple[str, str, str]]:
    m = measure()

    def ms(seconds: float) -> str:
        return f"{seconds * 1000:.0f} ms"

    plan = f"default plan, {m['steps']} steps, {m['mounts']} mounts, no qtfs; median of {RUNS}"
    return [
        ("`offload prepare` wall time", ms(m["prepare"]), f"{plan}; whole command incl. Python start"),
        ("  of which the plan itself", ms(m["in_process"]), "mount(2)/mknod(2) from one process"),
        ("`offload teardown` wall time", ms(m["teardown"]), "from mountinfo, newest first, then checked"),
        ("  of which the teardown itself", ms(m["in_process_down"]), "umount2(2) from one process"),
        ("`python -m offload.mounts prepare`", ms(m["module_up"]), "the same without the umbrella command's imports"),
        ("`python -m offload.mounts teardown`", ms(m["module_down"]), ""),
        ("same plan as a shell script", ms(m["sh_up"]), "one mount(8)/mknod process per step (reference style)"),
        ("same teardown, one umount(8) each", ms(m["sh_down"]), ""),
    ]


def main() -> None:
    if sys.argv[1:2] == ["--inner"]:
        print(json.dumps(_inner(sys.argv[2], int(sys.argv[3]))))
        return
    if os.geteuid() != 0:
        raise SystemExit("prepare_bench: needs root (mount namespaces)")
    rows = prepare_rows()
    width = max(len(r[0]) for r in rows)
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>8}  {note}")


if __name__ == "__main__":
    main()
