"""A qtfs client that dies while the host floods it with Invalidates leaves no caller in D state.

The coherent cache drops a changed file's pages in a worker thread of the
client (pyfuse3.invalidate_inode), and that kernel call waits for page
locks that the READ requests of DPU readers hold.  A client killed at that
moment cannot answer the READs, and its stuck thread keeps /dev/fuse open,
so the kernel never ends the connection by itself: without the client's
own abort (SIGTERM) or its guard's (SIGKILL), the readers and the client's
last thread stay in D state until someone aborts the connection by hand.

Everything runs on loopback in a private mount namespace with its own
/run, driven by one process (DRIVER) that reports what it saw as JSON; it
waits for conditions with deadlines and kills the client only once one of
the client's threads is seen in D state, the case that used to hang.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import psutil
import pytest

from offload import proc
from tests.test_mounts_ns import needs_root

pytestmark = [needs_root, pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse")]

ROOT = Path(__file__).parent.parent

DRIVER = r"""
import contextlib, json, os, random, signal, subprocess, sys, threading, time
from offload import proc
from offload.mounts import mountinfo, syscalls
from offload.qtfs import fusectl, unmount

work, signame = sys.argv[1], sys.argv[2]
export, mnt, sock = f"{work}/export", f"{work}/mnt", f"{work}/qtfs.sock"
FILES, SIZE, PAGE = 16, 512 * 1024, 4096
READER = (
    "import os, sys\n"
    "mnt = sys.argv[1]\n"
    "while True:\n"
    "    for name in os.listdir(mnt):\n"
    "        os.stat(f'{mnt}/{name}')\n"
    "        with open(f'{mnt}/{name}', 'rb') as file:\n"
    "            file.read()\n"
)


def until(condition, seconds):
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def thread_states(pid):
    states = []
    for task in os.listdir(f"/proc/{pid}/task") if os.path.isdir(f"/proc/{pid}/task") else ():
        with contextlib.suppress(OSError, IndexError):
            with open(f"/proc/{pid}/task/{task}/stat") as file:
                states.append(file.read().rpartition(")")[2].split()[0])
    return states


def mounted():
    return bool(mountinfo.stack_at(mountinfo.read(), mnt))


# This namespace's own /run: the client's pid file stays out of the machine's.
syscalls.mount("tmpfs", "/run", "tmpfs")
os.makedirs(export)
os.makedirs(mnt)
for number in range(FILES):
    with open(f"{export}/f{number}", "wb") as file:
        file.write(os.urandom(SIZE))
server = proc.spawn(
    [*proc.program("qtfs"), "serve", "--listen", f"unix://{sock}", "--insecure", "--export", export],
    stdin=subprocess.DEVNULL,
    stderr=open(f"{work}/server.log", "ab"),
)
readers, flooding, connection = [], threading.Event(), None
try:
    assert until(lambda: os.path.exists(sock), 30), "the server did not listen"
    proc.run([*proc.program("qtfs"), "mount", "--insecure", "--log-file", f"{work}/client.log",
              f"unix://{sock}:{export}", mnt])
    device = os.stat(mnt).st_dev
    client = int(unmount.pidfile(device).read_text())
    # Held for the clean-up below only (it never touches a later connection).
    connection = fusectl.Connection.open(device)

    def flood():
        # Host-side changes to the files the readers read: an Invalidate each.
        while flooding.is_set():
            fd = os.open(f"{export}/f{random.randrange(FILES)}", os.O_WRONLY)
            os.pwrite(fd, os.urandom(PAGE), random.randrange(SIZE // PAGE) * PAGE)
            os.close(fd)

    flooding.set()
    threading.Thread(target=flood, daemon=True).start()
    readers = [proc.spawn([sys.executable, "-c", READER, mnt], stderr=subprocess.DEVNULL) for _ in range(3)]
    stuck = until(lambda: "D" in thread_states(client), 60)
    os.kill(client, getattr(signal, signame))
    for reader in readers:
        reader.kill()
    started = time.monotonic()
    readers_ended = until(lambda: all(reader.poll() is not None for reader in readers), 30)
    unmounted = until(lambda: not mounted(), 30)
    client_ended = until(lambda: set(thread_states(client)) <= {"Z"}, 30)
    print(json.dumps({
        "stuck": stuck, "readers_ended": readers_ended, "unmounted": unmounted,
        "client_ended": client_ended, "seconds": time.monotonic() - started,
    }), flush=True)
finally:
    flooding.clear()
    if connection is not None:
        connection.abort()  # whatever the outcome, nothing stays in D state after the test
        connection.close()
    for reader in readers:
        reader.kill()
        reader.wait()
    if mounted():
        syscalls.umount(mnt, syscalls.MNT_DETACH)
    server.terminate()
    server.wait()
"""


@pytest.mark.parametrize("signame", ["SIGKILL", "SIGTERM"])
def test_a_client_killed_during_an_invalidation_flood_leaves_no_caller_in_d_state(tmp_path: Path, signame: str) -> None:
    os.chmod(tmp_path, 0o755)
    driver = [sys.executable, "-c", DRIVER, str(tmp_path), signame]
    try:
        result = proc.run(
            ["unshare", "--mount", "--propagation", "private", *driver], check=False, cwd=ROOT, timeout=240
        )
    finally:
        left = _left_after(tmp_path, 10)
        for pid in left:
            proc.end_pid(pid)
    logs = "".join(
        f"\n--- {name}\n{(tmp_path / name).read_text()}"
        for name in ("client.log", "server.log")
        if (tmp_path / name).exists()
    )
    assert result.returncode == 0, result.stderr + logs
    outcome = json.loads(result.stdout)
    assert outcome["stuck"], f"no thread of the client was seen in D state under the flood{logs}"
    assert outcome["readers_ended"], f"the readers stayed in D state after the client's {signame}{logs}"
    assert outcome["unmounted"] and outcome["client_ended"], (outcome, logs)
    assert left == []


def _left_after(tmp_path: Path, seconds: float) -> list[int]:
    """The test's processes still running after ``seconds``: every one has ``tmp_path`` on its
    command line (server, client, guard; the readers are the driver's children and end with it)."""

    def running() -> list[int]:
        return [
            p.pid
            for p in psutil.process_iter(["cmdline"])
            if any(str(tmp_path) in arg for arg in p.info["cmdline"] or ()) and p.pid != os.getpid()
        ]

    deadline = time.monotonic() + seconds
    while (left := running()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left
