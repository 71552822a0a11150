"""Nothing is lost at the end of a stream: many round trips with half-close through udsproxy across the lab.

Each round trip carries a random amount (1 B to 8 MiB, spread evenly over
the orders of magnitude, both extremes included) one way and back, and
ends each direction with a half-close or a close.  Every byte written
before a close must arrive before the end of file, whichever side closes
first.  The far program runs on the host side; the near one, under the
shim, on the DPU side where the socket's directory is empty.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from offload import proc
from offload.lab.lab import Lab
from tests.conftest import PYTHON

pytestmark = pytest.mark.lab

ROUND_TRIPS = 200

#: The sizes and contents of every round trip, the same on both sides.
SIZES = textwrap.dedent(
    """
    import random
    def rounds(count, seed):
        rng = random.Random(seed)
        sizes = [1, 8 << 20] + [max(1, int(2 ** rng.uniform(0, 23))) for _ in range(count - 2)]
        return [(size, rng.getrandbits(32)) for size in sizes]
    def payload(size, seed):
        return random.Random(seed).randbytes(size)
    def receive_all(sock):
        parts = []
        while chunk := sock.recv(1 << 20):
            parts.append(chunk)
        return b"".join(parts)
    """
)

#: The far program.  near-first: read to EOF, send it all back, close().
#: far-first: send the round's payload, shutdown(SHUT_WR) at once, then read
#: to EOF what the near side echoes.  One line of JSON per round trip.
FAR = SIZES + textwrap.dedent(
    """
    import json, socket, struct, sys
    path, mode, count, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(4)
    for number, (size, content) in enumerate(rounds(count, seed)):
        conn, _ = listener.accept()
        if mode == "near-first":
            data = receive_all(conn)
            conn.sendall(data)
            conn.close()
            print(json.dumps({"round": number, "received": len(data), "intact": data == payload(size, content)}))
        else:
            sent = payload(size, content)
            conn.sendall(sent)
            conn.shutdown(socket.SHUT_WR)
            echoed = receive_all(conn)
            conn.close()
            print(json.dumps({"round": number, "received": len(echoed), "intact": echoed == sent}))
        sys.stdout.flush()
    """
)

#: The near program, under the shim: the mirror image of FAR.
NEAR = SIZES + textwrap.dedent(
    """
    import json, socket, sys
    path, mode, count, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    for number, (size, content) in enumerate(rounds(count, seed)):
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(path)
        expected = payload(size, content)
        if mode == "near-first":
            sock.sendall(expected)
            sock.shutdown(socket.SHUT_WR)
            got = receive_all(sock)
            sock.close()
        else:
            got = receive_all(sock)
            sock.sendall(got)
            sock.close()  # right after writing: what was written must still arrive
        print(json.dumps({"round": number, "size": size, "received": len(got), "intact": got == expected}))
        sys.stdout.flush()
    """
)


@pytest.mark.parametrize("mode", ["near-first", "far-first"])
def test_every_byte_before_a_close_arrives(lab: Lab, mode: str, tmp_path: Path) -> None:
    path = lab.sockets / f"stress-{mode}.sock"
    path.unlink(missing_ok=True)
    args = [str(path), mode, str(ROUND_TRIPS), "20261129"]
    far_output = tmp_path / "far.jsonl"
    with far_output.open("wb") as output:
        far = proc.spawn(lab.command("host", [PYTHON, "-c", FAR, *args]), stdin=subprocess.DEVNULL, stdout=output)
    try:
        wait_for_path(path, far)
        # The near side's socket directory is empty: every connect goes through udsproxy.
        near = proc.run(
            lab.command("dpu", proc.with_hidden_dir(lab.sockets, [PYTHON, "-c", NEAR, *args])),
            env=lab.env("dpu"),
            check=False,
            timeout=900,
        )
        assert near.returncode == 0, near.stderr
        assert far.wait(timeout=60) == 0
    finally:
        if far.poll() is None:
            far.kill()
            far.wait()
        path.unlink(missing_ok=True)

    for side, lines in (("near", near.stdout.splitlines()), ("far", far_output.read_text().splitlines())):
        rounds = [json.loads(line) for line in lines]
        assert len(rounds) == ROUND_TRIPS, f"the {side} side finished {len(rounds)} of {ROUND_TRIPS} round trips"
        wrong = [r for r in rounds if not r["intact"]]
        assert not wrong, f"{len(wrong)} of {ROUND_TRIPS} round trips arrived wrong on the {side} side: {wrong[:5]}"


def wait_for_path(path: Path, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while not path.exists():
        assert server.poll() is None, f"the far program exited with {server.returncode}"
        assert time.monotonic() < deadline, f"the far program did not create {path}"
        time.sleep(0.05)
