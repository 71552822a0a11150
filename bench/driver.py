"""Runs inside a lab namespace: times commands and counts their output.

usage: python -m bench.driver latency N -- CMD ...
       python -m bench.driver throughput -- CMD ...
Prints one JSON document.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time


def latency(count: int, argv: list[str]) -> dict:
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        result = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, check=False)
        samples.append(time.perf_counter() - start)
        if result.returncode != 0:
            return {"error": f"{argv} exited {result.returncode}"}
    samples.sort()
    return {"median": samples[len(samples) // 2], "min": samples[0], "samples": len(samples)}


def throughput(argv: list[str]) -> dict:
    start = time.perf_counter()
    child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    assert child.stdout is not None
    total = 0
    fd = child.stdout.fileno()
    while chunk := os.read(fd, 1 << 20):
        total += len(chunk)
    code = child.wait()
    elapsed = time.perf_counter() - start
    return {"bytes": total, "seconds": elapsed, "mib_s": total / elapsed / (1 << 20), "code": code}


def main() -> None:
    mode = sys.argv[1]
    if mode == "latency":
        count, argv = int(sys.argv[2]), sys.argv[4:]
        print(json.dumps(latency(count, argv)))
    else:
        print(json.dumps(throughput(sys.argv[3:])))


if __name__ == "__main__":
    main()
