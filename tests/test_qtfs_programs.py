"""Which host processes count as the DPU's programs: those below the rexec_server holding the lock."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from offload import proc
from offload.qtfs.programs import Programs

#: A stand-in for rexec_server: holds the lock, runs one program, lets go of the lock on a line.
SERVER = r"""
import fcntl, subprocess, sys
lock = open(sys.argv[1], "w")
fcntl.flock(lock, fcntl.LOCK_EX)
program = subprocess.Popen(["sleep", "300"])
print(program.pid, flush=True)
sys.stdin.readline()
fcntl.flock(lock, fcntl.LOCK_UN)
print("released", flush=True)
sys.stdin.readline()
program.kill()
program.wait()
"""


def start_server(lock: Path) -> tuple[subprocess.Popen, int]:
    server = proc.spawn(
        [sys.executable, "-c", SERVER, str(lock)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert server.stdout is not None
    return server, int(server.stdout.readline())


def test_a_program_counts_under_the_lock_holder_and_after_the_holder_changed(tmp_path: Path) -> None:
    lock = tmp_path / "rexec.lock"
    programs = Programs(str(lock))
    first, first_program = start_server(lock)
    second, spawned = None, [first_program]
    try:
        assert programs.started(first_program)
        assert not programs.started(first.pid)  # the server itself is not one of its programs
        # A restart: the old server still lives (or lingers) while a new one holds the lock.
        assert first.stdin is not None and first.stdout is not None
        first.stdin.write("\n")
        first.stdin.flush()
        assert first.stdout.readline().strip() == "released"
        second, second_program = start_server(lock)
        spawned.append(second_program)
        assert programs.started(second_program)
        assert not programs.started(first_program)  # no longer below the lock's holder
    finally:
        for server in (first, second):
            if server is not None:
                server.kill()
                server.wait()
        for pid in spawned:  # orphaned by the kill
            proc.end_pid(pid)


#: In a pid namespace of its own, where the next pid can be chosen (ns_last_pid): the holder's pid is
#: given, once it has ended, to an unrelated process.  Prints whether that one's child counts as the DPU's.
REUSE = r"""
import os, subprocess, sys, time
sys.path[:0] = [sys.argv[3]]
from offload.qtfs.programs import Programs
programs = Programs(sys.argv[1])
server = subprocess.Popen([sys.executable, "-c", sys.argv[2], sys.argv[1]], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
program = int(server.stdout.readline())
assert programs.started(program)  # the holder is known from here on
server.kill(); server.wait()
subprocess.run(["kill", str(program)])
with open("/proc/sys/kernel/ns_last_pid", "w") as last:
    last.write(str(server.pid - 1))
impostor = subprocess.Popen(["sh", "-c", "sleep 300 & echo $!; wait"], stdout=subprocess.PIPE, text=True)
child = int(impostor.stdout.readline())
print(impostor.pid == server.pid, programs.started(child), flush=True)
impostor.kill()
subprocess.run(["kill", str(child)])
"""


def test_a_pid_the_holder_left_behind_names_nobody_when_reused(tmp_path: Path) -> None:
    """After rexec_server ends, its pid may be reused by any process: that one's children are not the DPU's."""
    lock = tmp_path / "rexec.lock"
    repo = str(Path(__file__).resolve().parents[1])
    argv = ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", REUSE, str(lock), SERVER, repo]
    reused, counted = proc.run(argv, timeout=60).stdout.split()
    assert reused == "True"  # the impostor does have the holder's pid
    assert counted == "False"
