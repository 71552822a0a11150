"""Shared fixtures: the lab, and helpers to run the stand-in on the DPU side."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from offload import proc
from offload.lab import SERVICES, guest
from offload.lab.lab import Lab
from offload.lab.libvirt import install_argv
from offload.log import raise_fd_limit

# The in-process daemons of one test can hold thousands of connections.
raise_fd_limit()

PYTHON = sys.executable
#: A whitelisted program that does not exist: exec fails with ENOENT (127).
MISSING = "/usr/bin/offload-test-no-such-program"
NEEDS_ROOT = "needs root: network namespaces, veth and mounts (CI runs as root)"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason=NEEDS_ROOT)
    for item in items:
        if "lab" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def lab() -> Iterator[Lab]:
    # Separate names let several checkouts run the suite on one machine at once.
    lab = Lab(os.environ.get("OFFLOAD_TEST_LAB", "offt"))
    lab.down()  # whatever a crashed earlier run left
    lab.up(only=["rexec", "udsproxy"], allow=[PYTHON, MISSING])
    try:
        yield lab
    finally:
        keep_logs(lab)
        lab.down()


@contextlib.contextmanager
def libvirt_lab(suffix: str) -> Iterator[Lab]:
    """A whole lab (every service, stock libvirtd on the DPU side) with the guest's images on the host side.

    Named after the session's lab plus ``suffix``, so modules that need one each can run at once.
    """
    lab = Lab(os.environ.get("OFFLOAD_TEST_LAB", "offt")[:9] + suffix)
    lab.down()
    image = guest.build()
    try:
        lab.up(only=list(SERVICES))
        proc.run(lab.command("host", install_argv(image)))
        yield lab
    finally:
        keep_logs(lab)
        lab.down()


def keep_logs(lab: Lab) -> None:
    """Copy the lab's daemon logs to /tmp/offload-test-logs/NAME for a post-mortem."""
    import shutil

    keep = Path("/tmp/offload-test-logs") / lab.name
    shutil.rmtree(keep, ignore_errors=True)
    keep.mkdir(parents=True)
    for log in lab.dir.glob("*.log"):
        shutil.copy(log, keep)


@pytest.fixture
def shared(lab: Lab) -> Path:
    """A directory that both sides see at the same path (configured as shared)."""
    return lab.dir / "shared"


def rexec(lab: Lab, *args: str, side: str = "dpu", timeout: float = 30, **options) -> subprocess.CompletedProcess:
    """Run ``rexec ARGS`` on ``side`` (the DPU by default) and wait for it."""
    options.setdefault("text", False)
    return proc.run(
        lab.command(side, [*proc.program("rexec"), *args]),
        env=lab.env(side),
        check=False,
        timeout=timeout,
        **options,
    )


def start_rexec(lab: Lab, *args: str, side: str = "dpu", **options) -> subprocess.Popen:
    """Start ``rexec ARGS`` on ``side``; the caller owns the process."""
    options.setdefault("stdin", subprocess.DEVNULL)
    return proc.spawn(lab.command(side, [*proc.program("rexec"), *args]), env=lab.env(side), **options)


def server_pid(lab: Lab, role: str) -> int:
    """The pid of ``role``'s rexec_server itself (not of what entered the DPU side for it)."""
    return lab.program_pid(f"{role}-rexec")


def dup_at(fd: int, preferred: int) -> int:
    """A duplicate of ``fd`` at ``preferred`` or the next free number above it (inheritable).

    One F_DUPFD call picks the number and takes it: looking for a free number
    first and dup2() onto it after races with any thread opening files
    meanwhile (dup2 then fails with EBUSY, or closes what the thread opened).
    """
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_DUPFD, preferred)


def wait_for(predicate, timeout: float, what: str):
    """The first true value of ``predicate()`` within ``timeout`` seconds; fail naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def gone(pid: int) -> bool:
    """Exited: no such process, or a zombie that its (re)parent has not reaped yet."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def pidmap(lab: Lab, standin: int) -> Path:
    """The pidmap file of a stand-in (``standin``: numbered here; the file is named by the DPU's number)."""
    return lab.dpu.run_dir / "pids" / str(lab.pid_on("dpu", standin))


def remote_pid_of(lab: Lab, standin: int) -> int:
    """The host's pid of the program behind a stand-in (numbered here, or the `command` that started it)."""
    path = pidmap(lab, standin)
    return int(wait_for(lambda: path.exists() and path.read_text(), 10, f"pidmap {path}"))


def listener_at_fd(path: str, preferred: int) -> int:
    """A listening AF_UNIX stream socket bound at ``path``, as fd ``preferred`` (or the next free number).

    libvirt hands qemu its QMP listener at a fixed number (29); the caller owns the fd.
    """
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(4)
        return dup_at(listener.fileno(), preferred)
