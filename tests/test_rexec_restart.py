"""A restart of the host's rexec_server ends neither the DPU side's rexec_server nor the sessions it carries.

The host's server runs under the lab's service manager, whose fd store keeps
each session's fds across the restart, as systemd's does; it stops on
SIGTERM, as systemctl would stop it, or on SIGKILL, as a crash would (no
goodbye on any link).  A session that ran across the restart goes on: its
program is the same process, bytes it writes after the restart arrive, its
stdin is carried, a signal to its stand-in reaches it, and once the caller
is gone it ends at once.  The DPU side's server is the same process
afterwards and serves a new session at once.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import threading
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import IO

import psutil
import pytest

from offload.lab.lab import LAB_RESUME_WINDOW, REXEC_KEEPALIVE, Lab
from tests.conftest import gone, pidmap, remote_pid_of, rexec, server_pid, start_rexec, wait_for

pytestmark = pytest.mark.lab

#: Generous: every step waits for an event; this only bounds a hang.
DEADLINE = 60.0
#: As much as the link carries: the DPU side's server is busy when the host's dies.  (If its
#: server is killed, it dies of SIGPIPE by itself.)
STREAM = ("/bin/cat", "/dev/zero")
#: More than every buffer between the program and the stand-in's reader holds (pipes, a channel's
#: window in flight, the relays' buffers): bytes beyond it were written after the restart.
BEYOND_BUFFERS = 32 << 20
#: A program whose caller is gone ends at once: its grace, and far less than the resume window.
PROMPTLY = LAB_RESUME_WINDOW / 3
LOST_STATUS = b"rexec: the remote program ended while its rexec_server restarted; how is not known\n"
RESTARTS = [pytest.param(False, id="SIGTERM"), pytest.param(True, id="SIGKILL")]


def log_tail(lab: Lab, key: str) -> str:
    return (lab.dir / f"{key}.log").read_text(errors="replace")[-4000:]


def logs(lab: Lab) -> str:
    return f"host:\n{log_tail(lab, 'host-rexec')}\ndpu:\n{log_tail(lab, 'dpu-rexec')}"


class Counter:
    """Reads ``stream`` to its end in a thread, counting the bytes."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.count = 0
        self.thread = threading.Thread(target=self._read, args=(stream,))
        self.thread.start()

    def _read(self, stream: IO[bytes]) -> None:
        while chunk := stream.read1(1 << 20):
            self.count += len(chunk)


def identity(pid: int) -> tuple[int, float]:
    return pid, psutil.Process(pid).create_time()


def assert_runs_on(lab: Lab, before: tuple[int, float], label: str) -> None:
    """The host's program is the process ``before`` names (not a successor with its pid), and runs."""
    pid = before[0]
    try:
        now: tuple[int, float] | None = identity(pid)
    except psutil.NoSuchProcess:
        now = None
    assert now == before and not gone(pid), f"{label}: the host's program {pid} did not run on:\n{logs(lab)}"


def read_line(stream: IO[bytes], timeout: float = DEADLINE) -> bytes:
    """One line of a stand-in's output, within ``timeout``: b"" at its end, or what came if it hung."""
    line = b""
    deadline = time.monotonic() + timeout
    while not line.endswith(b"\n") and select.select([stream], [], [], max(0.0, deadline - time.monotonic()))[0]:
        byte = os.read(stream.fileno(), 1)
        if not byte:
            break
        line += byte
    return line


def assert_ended_after_a_restart(session: subprocess.Popen) -> None:
    """The stand-in of a program that ended under a restarted server: its status is not known there (the
    program is no child of the server), and the stand-in says so instead of making one up."""
    assert session.stderr is not None
    assert (session.wait(DEADLINE), session.stderr.read()) == (255, LOST_STATUS)


def assert_nothing_left(lab: Lab, remote: int, pidmap: Path, label: str) -> None:
    """The host's program, the stand-in's pidmap and the host's record of the session are gone."""
    wait_for(lambda: gone(remote), DEADLINE, f"the host's program {remote} to end ({label})")
    sessions = lab.host.run_dir / "sessions"
    wait_for(lambda: not any(sessions.iterdir()), DEADLINE, f"the host's session records to go ({label})")
    wait_for(lambda: not pidmap.exists(), DEADLINE, f"the stand-in's pidmap {pidmap} to go ({label})")


def restart_host_under_a_session(
    lab: Lab, label: str, *, crash: bool, during: AbstractContextManager | None = None
) -> None:
    """Restart the host's server while a DPU stand-in's session streams; the session goes on, then ends
    with its stand-in.  ``during`` (if given) is held around the restart."""
    session = start_rexec(lab, *STREAM, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert session.stdout is not None and session.stderr is not None
    counter = Counter(session.stdout)
    try:
        remote = remote_pid_of(lab, session.pid)  # written once the program runs on the host
        mapped = pidmap(lab, session.pid)
        before = identity(remote)
        with during or nullcontext():
            lab.restart_service("host-rexec", crash=crash)
        restarted = counter.count
        wait_for(
            lambda: counter.count > restarted + BEYOND_BUFFERS or session.poll() is not None,
            DEADLINE,
            f"bytes after the restart ({label})",
        )
        assert session.poll() is None, f"{label}: the session ended ({session.stderr.read()!r}):\n{logs(lab)}"
        assert_runs_on(lab, before, label)
        session.kill()
        session.wait()
        wait_for(lambda: gone(remote), PROMPTLY, f"the host's program {remote} to end with its stand-in ({label})")
        assert_nothing_left(lab, remote, mapped, label)
    finally:
        session.kill()
        session.wait()
        counter.thread.join(DEADLINE)


def assert_serves(lab: Lab, dpu: int, label: str) -> None:
    """The DPU side's server is still ``dpu`` and runs a new session correctly."""
    assert not gone(dpu), f"{label}: the DPU side's rexec_server died:\n{log_tail(lab, 'dpu-rexec')}"
    assert server_pid(lab, "dpu") == dpu
    fresh = rexec(lab, "/bin/sh", "-c", 'echo "$0"', label, timeout=DEADLINE)
    assert (fresh.returncode, fresh.stdout, fresh.stderr) == (0, f"{label}\n".encode(), b""), (
        f"{label}: no new session:\n{log_tail(lab, 'dpu-rexec')}"
    )


@pytest.mark.timeout(20 * 3 * DEADLINE)
def test_dpu_server_and_session_survive_host_server_restarts(lab: Lab) -> None:
    dpu = server_pid(lab, "dpu")
    assert_serves(lab, dpu, "before")  # and fills the DPU side's pool of warm links
    for round in range(20):
        crash = round % 2 == 1
        label = f"round {round} ({'SIGKILL' if crash else 'SIGTERM'})"
        restart_host_under_a_session(lab, label, crash=crash)
        assert_serves(lab, dpu, label)


class Frozen:
    """The DPU side's server stopped (as a starved process is) from entry until a keepalive after it.

    When it runs again, every link to the old host server is silent for longer
    than the keepalive and its stream is broken: the keepalive task and the
    receiving task of each link fail in the same scheduling step.  The wait
    only sets that scene up; nothing asserted depends on it.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def __enter__(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)
        self.until = time.monotonic() + REXEC_KEEPALIVE + 1
        wait_for(lambda: psutil.Process(self.pid).status() == psutil.STATUS_STOPPED, DEADLINE, "SIGSTOP")

    def __exit__(self, *exc: object) -> None:
        try:
            time.sleep(max(0.0, self.until - time.monotonic()))
        finally:
            os.kill(self.pid, signal.SIGCONT)


@pytest.mark.timeout(4 * 4 * DEADLINE)
def test_dpu_server_and_session_survive_links_failing_every_way_at_once(lab: Lab) -> None:
    assert REXEC_KEEPALIVE + 1 < LAB_RESUME_WINDOW  # the frozen side resumes its session in time
    dpu = server_pid(lab, "dpu")
    assert_serves(lab, dpu, "before")
    for round in range(4):
        crash = round % 2 == 1
        label = f"frozen round {round} ({'SIGKILL' if crash else 'SIGTERM'})"
        restart_host_under_a_session(lab, label, crash=crash, during=Frozen(dpu))
        assert_serves(lab, dpu, label)


@pytest.mark.timeout(3 * DEADLINE)
@pytest.mark.parametrize("crash", RESTARTS)
def test_stdin_and_stdout_go_on_after_a_restart(lab: Lab, crash: bool) -> None:
    session = start_rexec(lab, "/bin/cat", stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert session.stdin is not None and session.stdout is not None and session.stderr is not None
    try:
        remote, mapped = remote_pid_of(lab, session.pid), pidmap(lab, session.pid)
        before = identity(remote)
        session.stdin.write(b"before\n")
        session.stdin.flush()
        assert read_line(session.stdout) == b"before\n"
        lab.restart_service("host-rexec", crash=crash)
        assert_runs_on(lab, before, "cat")
        session.stdin.write(b"after the restart\n")
        session.stdin.flush()
        assert read_line(session.stdout) == b"after the restart\n", logs(lab)
        session.stdin.close()  # cat's end of file, carried on the new link
        assert_ended_after_a_restart(session)
        assert session.stdout.read() == b""
        assert_nothing_left(lab, remote, mapped, "cat")
    finally:
        session.kill()
        session.wait()


#: Says it is ready, then waits for SIGTERM; says so and exits (3, which its restarted server cannot know).
TRAPS_TERM = 'trap "echo got TERM; exit 3" TERM; echo ready; while :; do sleep 0.1; done'


@pytest.mark.timeout(3 * DEADLINE)
@pytest.mark.parametrize("crash", RESTARTS)
def test_a_signal_after_a_restart_reaches_the_program(lab: Lab, crash: bool) -> None:
    session = start_rexec(lab, "/bin/sh", "-c", TRAPS_TERM, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert session.stdout is not None and session.stderr is not None
    try:
        remote, mapped = remote_pid_of(lab, session.pid), pidmap(lab, session.pid)
        before = identity(remote)
        assert read_line(session.stdout) == b"ready\n"
        lab.restart_service("host-rexec", crash=crash)
        assert_runs_on(lab, before, "trap")
        session.send_signal(signal.SIGTERM)
        assert read_line(session.stdout) == b"got TERM\n", logs(lab)
        assert_ended_after_a_restart(session)
        assert_nothing_left(lab, remote, mapped, "trap")
    finally:
        session.kill()
        session.wait()


@pytest.mark.timeout(3 * DEADLINE)
@pytest.mark.parametrize("crash", RESTARTS)
def test_a_program_ending_after_a_restart_ends_its_stand_in_with_status_unknown(lab: Lab, crash: bool) -> None:
    """The restarted server is not the program's parent: it sees the end, never the status."""
    session = start_rexec(lab, "/bin/sh", "-c", "exec sleep 1000", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert session.stderr is not None
    try:
        remote, mapped = remote_pid_of(lab, session.pid), pidmap(lab, session.pid)
        before = identity(remote)
        lab.restart_service("host-rexec", crash=crash)
        assert_runs_on(lab, before, "killed")
        os.kill(remote, signal.SIGKILL)
        assert_ended_after_a_restart(session)
        assert_nothing_left(lab, remote, mapped, "killed")
    finally:
        session.kill()
        session.wait()
