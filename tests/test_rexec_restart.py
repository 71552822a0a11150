"""A restart of the host's rexec_server never takes the DPU side's rexec_server down.

The DPU side's server holds warm links to the host's and a session running
over one of them.  Each round stops the host's server, on SIGTERM as
systemctl would or on SIGKILL as a crash would (no goodbye on any link), and
starts it again.  The DPU side's server must be the same process afterwards
and serve a new session at once.  The session that ran across the restart
ends as "link lost" (its program ended with the host's server); it must end,
and leave no program behind on the host.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from contextlib import AbstractContextManager, nullcontext
from typing import IO

import psutil
import pytest

from offload.lab.lab import REXEC_KEEPALIVE, Lab
from tests.conftest import gone, remote_pid_of, rexec, server_pid, start_rexec, wait_for

pytestmark = pytest.mark.lab

#: Generous: every step waits for an event; this only bounds a hang.
DEADLINE = 60.0
#: As much as the link carries: the DPU side's server is busy when the host's dies.  (If its
#: server is killed, it dies of SIGPIPE by itself.)
STREAM = ("/bin/cat", "/dev/zero")


def dpu_log(lab: Lab) -> str:
    return (lab.dir / "dpu-rexec.log").read_text(errors="replace")[-4000:]


def discard(stream: IO[bytes]) -> threading.Thread:
    """Read ``stream`` to its end in a thread, keeping nothing."""

    def read() -> None:
        while stream.read1(1 << 20):
            pass

    reader = threading.Thread(target=read)
    reader.start()
    return reader


def restart_host_under_a_session(
    lab: Lab, label: str, *, crash: bool, during: AbstractContextManager | None = None
) -> None:
    """Restart the host's server while a DPU stand-in's session runs; that session ends as link lost.

    ``during`` (if given) is held around the restart.
    """
    session = start_rexec(lab, *STREAM, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert session.stdout is not None and session.stderr is not None
    reader = discard(session.stdout)
    try:
        remote = remote_pid_of(lab, session.pid)  # written once the program runs on the host
        with during or nullcontext():
            lab.restart_service("host-rexec", crash=crash)
        session.wait(timeout=DEADLINE)
        reader.join(DEADLINE)
        lost = f"rexec: link to {lab.host.link.address} lost\n".encode()
        assert (session.returncode, session.stderr.read()) == (255, lost), f"{label}:\n{dpu_log(lab)}"
        wait_for(lambda: gone(remote), DEADLINE, f"the host's program {remote} to end ({label})")
    finally:
        session.kill()
        session.wait()
        reader.join(DEADLINE)


def assert_serves(lab: Lab, dpu: int, label: str) -> None:
    """The DPU side's server is still ``dpu`` and runs a new session correctly."""
    assert not gone(dpu), f"{label}: the DPU side's rexec_server died:\n{dpu_log(lab)}"
    assert server_pid(lab, "dpu") == dpu
    fresh = rexec(lab, "/bin/sh", "-c", 'echo "$0"', label, timeout=DEADLINE)
    assert (fresh.returncode, fresh.stdout, fresh.stderr) == (0, f"{label}\n".encode(), b""), (
        f"{label}: no new session:\n{dpu_log(lab)}"
    )


@pytest.mark.timeout(20 * 3 * DEADLINE)
def test_dpu_server_survives_host_server_restarts(lab: Lab) -> None:
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
def test_dpu_server_survives_links_failing_every_way_at_once(lab: Lab) -> None:
    dpu = server_pid(lab, "dpu")
    assert_serves(lab, dpu, "before")
    for round in range(4):
        crash = round % 2 == 1
        label = f"frozen round {round} ({'SIGKILL' if crash else 'SIGTERM'})"
        restart_host_under_a_session(lab, label, crash=crash, during=Frozen(dpu))
        assert_serves(lab, dpu, label)
