"""The lab's service manager (offload.lab.manager) keeps a daemon's fd store across restarts, as systemd does.

Each test runs the manager for a small daemon (DAEMON below) that stores the
read end of a FIFO the test writes into.  What the test wrote while the
daemon was down is read by the next daemon from the fd it inherited: the
same pipe crossed the restart.  When no process holds the read end any
more, the test's write fails with EPIPE: that is how the test sees the
store let go of it.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from offload import proc

DEADLINE = 20.0

#: The daemon: stores the FIFO's read end unless it inherited one, reads what waits in each inherited fd,
#: reports on stdout (one JSON line) and takes commands on stdin.
DAEMON = r"""
import json, os, sys
from offload import sd

def report(**what):
    os.write(1, (json.dumps(what) + "\n").encode())

inherited = sd.inherited_fds()
read = {}
for name, fds in inherited.items():
    for fd in fds:
        os.set_blocking(fd, False)
        try:
            read[name] = read.get(name, "") + os.read(fd, 1000).decode()
        except BlockingIOError:
            pass
        os.close(fd)  # the store keeps its own
if not inherited:
    fd = os.open(sys.argv[1], os.O_RDONLY | os.O_NONBLOCK)
    assert sd.store_fds("pipe", [fd])
    os.close(fd)
sd.notify("READY=1")
counts = {name: len(fds) for name, fds in inherited.items()}
listen = sorted(k for k in os.environ if k.startswith("LISTEN_"))
report(pid=os.getpid(), names=sorted(inherited), counts=counts, read=read, listen=listen)
for line in sys.stdin:
    command = line.split()
    if command[0] == "remove":
        sd.remove_fds("pipe")
        report(removed=True)
    elif command[0] == "orphan":
        child = os.fork()
        if child == 0:
            grandchild = os.fork()
            if grandchild == 0:
                null = os.open(os.devnull, os.O_RDWR)
                for fd in (0, 1):
                    os.dup2(null, fd)
                os.execv("/bin/sleep", ["sleep", "60"])
            report(orphan=grandchild)
            os._exit(0)
        os.waitpid(child, 0)
    elif command[0] == "store":  # store COUNT NAME [dup]: COUNT memfds in one message, the first twice with dup
        files = [os.memfd_create(f"file{index}") for index in range(int(command[1]))]
        sd.store_fds(command[2], [*files[:1], *files] if "dup" in command else files)
        for fd in files:
            os.close(fd)
        report(stored=command[2])
    elif command[0] == "exit":
        sys.exit(int(command[1]))
"""


@dataclass
class Run:
    """A manager running DAEMON, and the test's ends: the FIFO's write end, the ready socket, the reports."""

    dir: Path
    manager: subprocess.Popen
    ready: socket.socket
    writer: int = -1
    buffer: bytes = b""
    daemons: list[int] = field(default_factory=list)

    @property
    def notify_path(self) -> Path:
        return self.dir / "daemon.notify"

    def report(self) -> dict:
        """The daemon's next report line."""
        assert self.manager.stdout is not None
        deadline = time.monotonic() + DEADLINE
        while b"\n" not in self.buffer:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no report:\n{self.log()}"
            readable, _, _ = select.select([self.manager.stdout], [], [], remaining)
            if readable:
                chunk = os.read(self.manager.stdout.fileno(), 4096)
                assert chunk, f"the daemon's stdout ended:\n{self.log()}"
                self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def ready_pid(self, timeout: float = DEADLINE) -> int:
        """The daemon's pid from the manager's next READY=1."""
        self.ready.settimeout(timeout)
        message = self.ready.recv(4096).decode()
        fields = dict(line.split("=", 1) for line in message.split("\n"))
        assert fields["READY"] == "1"
        return int(fields["MAINPID"])

    def started(self) -> dict:
        """Wait for a daemon to start: its report, whose pid the manager announced."""
        pid = self.ready_pid()
        report = self.report()
        assert report["pid"] == pid
        assert report["listen"] == []  # unset for its children
        self.daemons.append(pid)
        return report

    def command(self, text: str) -> None:
        assert self.manager.stdin is not None
        self.manager.stdin.write(f"{text}\n".encode())
        self.manager.stdin.flush()

    def restart(self, crash: bool) -> dict:
        old = self.daemons[-1]
        self.manager.send_signal(signal.SIGUSR2 if crash else signal.SIGUSR1)
        report = self.started()
        assert report["pid"] != old
        wait_for(lambda: not psutil.pid_exists(old), "the old daemon to be gone")
        return report

    def open_writer(self) -> None:
        self.writer = os.open(self.dir / "fifo", os.O_WRONLY | os.O_NONBLOCK)

    def log(self) -> str:
        return (self.dir / "manager.log").read_text(errors="replace")


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def broken(fd: int) -> bool:
    """Whether writing into ``fd`` (a pipe's write end) fails with EPIPE: no reader holds its pipe."""
    try:
        os.write(fd, b".")
    except BrokenPipeError:
        return True
    return False


@pytest.fixture
def run() -> Iterator[Run]:
    # Short paths: a UNIX socket's path has at most 107 bytes.
    with tempfile.TemporaryDirectory(prefix="mgr", dir="/tmp") as name:
        directory = Path(name)
        os.mkfifo(directory / "fifo")
        (directory / "daemon.py").write_text(DAEMON)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as ready:
            ready.bind(str(directory / "ready"))
            argv = [
                *proc.run_module("offload.lab.manager"),
                *("--notify-socket", str(directory / "daemon.notify"), "--ready-socket", str(directory / "ready")),
                *("--store-max", "8", "--stop-timeout", "5"),
                *("--", sys.executable, str(directory / "daemon.py"), str(directory / "fifo")),
            ]
            with open(directory / "manager.log", "wb") as log:
                manager = proc.spawn(argv, stdin=proc.PIPE, stdout=proc.PIPE, stderr=log)
            state = Run(directory, manager, ready)
            try:
                yield state
            finally:
                with contextlib.suppress(OSError):
                    os.close(state.writer)
                for pid in state.daemons:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                manager.kill()
                manager.wait()
                for stream in (manager.stdin, manager.stdout):
                    assert stream is not None
                    stream.close()


@pytest.mark.timeout(120)
def test_restarts_carry_the_stored_pipe(run: Run) -> None:
    assert run.started() == {"pid": run.daemons[0], "names": [], "counts": {}, "read": {}, "listen": []}
    run.open_writer()  # the store holds the read end: the FIFO has a reader
    os.write(run.writer, b"while restarting")
    assert run.restart(crash=False)["read"] == {"pipe": "while restarting"}
    os.write(run.writer, b"while crashing")
    assert run.restart(crash=True)["read"] == {"pipe": "while crashing"}
    assert "(SIGKILL)" in run.log()

    # Stopped as systemctl stop does: the daemon ends, and the store with it.
    run.manager.send_signal(signal.SIGTERM)
    assert run.manager.wait(timeout=DEADLINE) == 0
    assert not psutil.pid_exists(run.daemons[-1])
    assert broken(run.writer)
    assert not run.notify_path.exists()


def test_removed_fds_are_closed_and_not_passed(run: Run) -> None:
    run.started()
    run.open_writer()
    run.command("remove")
    assert run.report() == {"removed": True}
    wait_for(lambda: broken(run.writer), "the removed read end to close")
    assert run.restart(crash=False)["names"] == []


def test_notifications_of_other_processes_are_ignored(run: Run) -> None:
    run.started()
    foreign_read, foreign_write = os.pipe()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(str(run.notify_path))
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [foreign_read]))]
            sock.sendmsg([b"FDSTORE=1\nFDNAME=foreign\nREADY=1"], rights)
        os.close(foreign_read)
        foreign_read = -1
        # Not kept: its only reader, the manager's copy, is closed.
        wait_for(lambda: broken(foreign_write), "the foreign fd to be closed")
        with pytest.raises(TimeoutError):
            run.ready_pid(timeout=1.0)  # its READY=1 was not passed on
        assert "not the daemon" in run.log()
        assert run.restart(crash=False)["names"] == ["pipe"]
    finally:
        for fd in (foreign_read, foreign_write):
            if fd >= 0:
                os.close(fd)


def test_daemon_exit_ends_the_manager_with_its_status(run: Run) -> None:
    run.started()
    run.open_writer()
    run.command("exit 3")
    assert run.manager.wait(timeout=DEADLINE) == 3
    assert broken(run.writer)


def test_orphans_are_adopted_and_reaped(run: Run) -> None:
    run.started()
    run.command("orphan")
    orphan = psutil.Process(run.report()["orphan"])
    # Its parent exited: the nearest subreaper adopted it.
    wait_for(lambda: orphan.ppid() == run.manager.pid, "the manager to adopt the orphan")
    orphan.terminate()
    wait_for(lambda: not psutil.pid_exists(orphan.pid), "the orphan to be reaped (no zombie left)")
    assert f"reaped pid {orphan.pid} (signal SIGTERM)" in run.log()


def test_a_hangup_drops_a_stored_fd(run: Run) -> None:
    """systemd drops a stored fd that reports POLLHUP (its pipe's last writer closed), unless stored with FDPOLL=0."""
    run.started()
    run.open_writer()
    os.close(run.writer)
    run.writer = -1
    wait_for(lambda: "reported a hangup" in run.log(), "the hangup to be seen")
    assert run.restart(crash=False)["names"] == []


def test_duplicates_skipped_and_the_store_bounded(run: Run) -> None:
    run.started()  # "pipe" is one of the 8 the store takes
    run.command("store 2 twice dup")
    assert run.report() == {"stored": "twice"}
    run.command("store 10 many")
    assert run.report() == {"stored": "many"}
    # The same open file twice is kept once; of 10 more, 5 have room.
    assert run.restart(crash=True)["counts"] == {"pipe": 1, "twice": 2, "many": 5}
    assert run.log().count("store full (8 fds): fd named 'many' refused") == 5
