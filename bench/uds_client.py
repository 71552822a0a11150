"""Runs on one side of the lab: round trips and throughput over a UNIX socket.

usage: python -m bench.uds_client PATH
The server (bench.uds_server) echoes after an "E" and counts after an "S".
Prints one JSON document.
"""

from __future__ import annotations

import json
import socket
import sys
import time

ROUNDS = 2000
TOTAL = 1 << 30


def main() -> None:
    path = sys.argv[1]
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(path)
        sock.sendall(b"E")
        message = b"x" * 64
        start = time.perf_counter()
        for _ in range(ROUNDS):
            sock.sendall(message)
            got = 0
            while got < len(message):
                got += len(sock.recv(4096))
        round_trip = (time.perf_counter() - start) / ROUNDS
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(path)
        sock.sendall(b"S")
        chunk = bytes(1 << 20)
        start = time.perf_counter()
        for _ in range(TOTAL // len(chunk)):
            sock.sendall(chunk)
        sock.shutdown(socket.SHUT_WR)
        counted = int(sock.recv(100))
        elapsed = time.perf_counter() - start
    print(json.dumps({"rtt_us": round_trip * 1e6, "mib_s": counted / elapsed / (1 << 20), "bytes": counted}))


if __name__ == "__main__":
    main()
