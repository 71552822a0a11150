"""Nothing is lost at the end of a stream through rexec: output of programs that exit at once, and bridged sockets.

Each round carries a random amount (1 B to 8 MiB, spread evenly over the
orders of magnitude, both extremes included).  The remote program writes
and ends at once, or closes its socket right after writing: every byte it
wrote must reach the DPU side before the end of file.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import textwrap
from pathlib import Path

import pytest

from offload.lab.lab import Lab
from tests.conftest import PYTHON, dup_at, listener_at_fd, rexec, start_rexec

pytestmark = pytest.mark.lab


def rounds(count: int, seed: int) -> list[tuple[int, int]]:
    """(size, seed) of each round: both extremes, then sizes spread over every order of magnitude."""
    rng = random.Random(seed)
    sizes = [1, 8 << 20] + [max(1, int(2 ** rng.uniform(0, 23))) for _ in range(count - 2)]
    return [(size, rng.getrandbits(32)) for size in sizes]


def payload(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


#: Writes PAYLOAD(size, seed) to stdout and another to stderr, then ends without any cleanup.
WRITE_AND_EXIT = textwrap.dedent(
    """
    import os, random, sys
    size, seed = int(sys.argv[1]), int(sys.argv[2])
    for fd, data in ((1, random.Random(seed).randbytes(size)), (2, random.Random(seed + 1).randbytes(size // 2 + 1))):
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    os._exit(5)
    """
)


def test_output_of_a_program_that_exits_at_once(lab: Lab) -> None:
    wrong = []
    for size, seed in rounds(40, 1129):
        result = rexec(lab, PYTHON, "-c", WRITE_AND_EXIT, str(size), str(seed), timeout=120)
        assert result.returncode == 5, result.stderr[-500:]
        if result.stdout != payload(size, seed) or result.stderr != payload(size // 2 + 1, seed + 1):
            wrong.append((size, len(result.stdout), len(result.stderr)))
    assert not wrong, f"(size, stdout received, stderr received) of the rounds that lost bytes: {wrong}"


#: Accepts one connection per round on the bridged listener (fd N), reads
#: the round's "SIZE SEED" line, writes that payload and closes at once.
CLOSE_AFTER_WRITING = textwrap.dedent(
    """
    import random, socket, sys
    listener = socket.socket(fileno=int(sys.argv[1]))
    for _ in range(int(sys.argv[2])):
        conn, _ = listener.accept()
        size, seed = map(int, conn.makefile("rb").readline().split())
        conn.sendall(random.Random(seed).randbytes(size))
        conn.close()
    """
)


def receive_all(sock: socket.socket) -> bytes:
    parts = []
    while chunk := sock.recv(1 << 20):
        parts.append(chunk)
    return b"".join(parts)


def test_bridged_socket_whose_far_end_closes_right_after_writing(lab: Lab, tmp_path: Path) -> None:
    plan = rounds(100, 2026)
    path = str(tmp_path / "bridged.sock")
    fd = listener_at_fd(path, 29)
    try:
        child = start_rexec(
            lab, PYTHON, "-c", CLOSE_AFTER_WRITING, str(fd), str(len(plan)), pass_fds=[fd], stderr=subprocess.PIPE
        )
    finally:
        os.close(fd)
    wrong = []
    try:
        for size, seed in plan:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
                client.settimeout(60)
                client.connect(path)
                client.sendall(f"{size} {seed}\n".encode())
                got = receive_all(client)
            if got != payload(size, seed):
                wrong.append((size, len(got)))
        assert child.wait(timeout=60) == 0, child.stderr.read() if child.stderr else ""
    finally:
        child.kill()
        child.wait()
        if child.stderr:
            child.stderr.close()
    assert not wrong, f"(size, received) of the rounds that lost bytes: {wrong}"


#: Writes the round's payload on an inherited connected socket and ends at once.
WRITE_ON_INHERITED_SOCKET = textwrap.dedent(
    """
    import os, random, socket, sys
    sock = socket.socket(fileno=int(sys.argv[1]))
    sock.sendall(random.Random(int(sys.argv[3])).randbytes(int(sys.argv[2])))
    os._exit(0)
    """
)


def test_relayed_socket_written_by_a_program_that_exits_at_once(lab: Lab) -> None:
    wrong = []
    for size, seed in rounds(20, 7):
        ours, theirs = socket.socketpair()
        fd = dup_at(theirs.fileno(), 110)
        theirs.close()
        try:
            child = start_rexec(
                lab, PYTHON, "-c", WRITE_ON_INHERITED_SOCKET, str(fd), str(size), str(seed), pass_fds=[fd]
            )
        finally:
            os.close(fd)
        try:
            ours.settimeout(60)
            got = receive_all(ours)
            assert child.wait(timeout=60) == 0
        finally:
            ours.close()
            child.kill()
            child.wait()
        if got != payload(size, seed):
            wrong.append((size, len(got)))
    assert not wrong, f"(size, received) of the rounds that lost bytes: {wrong}"
