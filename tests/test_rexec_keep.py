"""offload.rexec.keep with real processes, pipes and memfds: what a restarted server gets back, and what it ends.

The service manager is played by a datagram socket named by $NOTIFY_SOCKET
(what the server stores and drops arrives there), and by a child process
that finds fds at 3, 4, ... with LISTEN_FDS, LISTEN_FDNAMES and LISTEN_PID
set, as systemd starts a service whose fd store holds something.
"""

from __future__ import annotations

import array
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from offload import proc, sd
from offload.rexec import keep

KEPT = "a1" * 16
GONE = "b2" * 16
REUSED = "c3" * 16
#: Generous: each wait is for an event; this only bounds a hang.
DEADLINE = 10.0


@pytest.fixture
def manager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """The service manager's notification socket, with an fd store of some room."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.bind(str(path))
        sock.settimeout(DEADLINE)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        monkeypatch.setenv("FDSTORE", "64")
        yield sock


def receive(sock: socket.socket) -> tuple[str, list[int]]:
    """One notification and the fds it carried (the caller's to close)."""
    data, ancillary, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(4 * sd.MAX_FDS_PER_MESSAGE))
    fds = array.array("i")
    for _, _, payload in ancillary:
        fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return data.decode(), list(fds)


def pending(sock: socket.socket) -> list[str]:
    """The notifications already sent (none carries fds)."""
    messages = []
    while select.select([sock], [], [], 0)[0]:
        message, fds = receive(sock)
        assert fds == [], message
        messages.append(message)
    return messages


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen]:
    """A running program, as a session's is."""
    child = proc.spawn(["sleep", "1000"])
    try:
        yield child
    finally:
        child.kill()
        child.wait()


def started_at(pid: int) -> int:
    start = keep.start_of(pid)
    assert start is not None
    return start


def facts_of(name: str, pid: int, started: int) -> dict:
    """Facts as the host's server records them: what a restarted server reads back."""
    return {
        "name": name,
        "secret": "5e" * 32,
        "peer": "dpu.example",
        "pid": pid,
        "start": started,
        "user": {"name": "qemu", "uid": 107, "gid": 107, "groups": [36, 107], "home": "/"},
        "program": "/usr/bin/qemu-kvm",
        "channels": {"1": [False, True], "2": [True, False]},
        "bridges": {"29": "/run/offload/bridges/x"},
    }


def memfd_with(content: bytes) -> int:
    fd = os.memfd_create("facts", os.MFD_CLOEXEC)
    os.write(fd, content)
    return fd


# -- the facts, through the store --------------------------------------------------------------


#: Run with fds at 3, 4, ... and LISTEN_* describing them: what keep.inherited found; then each kept fd
#: gets a line written through it, and every fd stays open until stdin ends.
INHERIT = """
import fcntl, json, os, sys
names, count = sys.argv[1], len(sys.argv[1].split(":"))
os.environ.update(LISTEN_FDS=str(count), LISTEN_FDNAMES=names, LISTEN_PID=str(os.getpid()))
from offload.rexec import keep
kept = keep.inherited()

def is_open(fd):
    try:
        fcntl.fcntl(fd, fcntl.F_GETFD)
    except OSError:
        return False
    return True

open_fds = [fd for fd in range(3, 3 + count) if is_open(fd)]
for session in kept:
    for what, fd in session.fds.items():
        os.write(fd, f"{what} of {session.name}\\n".encode())
report = [{"role": s.role, "name": s.name, "facts": s.facts, "fds": s.fds} for s in kept]
print(json.dumps({"kept": report, "open": open_fds}), flush=True)
sys.stdin.read()
"""

#: Puts the fds named in argv[1] at 3, 4, ... (and no other copy of them), then runs INHERIT.
PLACE = """
import fcntl, os, sys
files = [int(fd) for fd in sys.argv.pop(1).split(",")]
moved = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100) for fd in files]
for fd in files:
    os.close(fd)
for index, fd in enumerate(moved):
    os.dup2(fd, 3 + index)
    os.close(fd)
"""


class Inheritor:
    """A restarted server, as far as the fd store goes: a child given ``fds`` by ``names``."""

    def __init__(self, fds: list[int], names: list[str]) -> None:
        argv = [sys.executable, "-c", PLACE + INHERIT, ",".join(map(str, fds)), ":".join(names)]
        self.child = proc.spawn(argv, pass_fds=fds, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.child.stdout is not None
        line = self.child.stdout.readline()
        assert line, f"the child found nothing to report (status {self.child.wait(DEADLINE)})"
        self.report = json.loads(line)

    def close(self) -> None:
        assert self.child.stdin is not None
        self.child.stdin.close()
        assert self.child.wait(DEADLINE) == 0


def test_recorded_facts_and_fds_are_what_a_restarted_server_gets(
    manager: socket.socket, sleeper: subprocess.Popen, tmp_path: Path
) -> None:
    """Facts read back as recorded; each fd is the same file, one given under two names (a stand-in's
    stdout and stderr, one pipe) kept once and found under both."""
    facts = facts_of(KEPT, sleeper.pid, started_at(sleeper.pid))
    marker = tmp_path / KEPT
    output, other = os.pipe(), os.pipe()
    try:
        keep.Keep("rexec", KEPT, marker).record(facts, {"ch1": output[1], "ch2": output[1], "ch3": other[1]})
        # The program is named for a server that finds no store (end_unreachable).
        assert marker.read_text().split() == [str(sleeper.pid), str(facts["start"])]
        stored = [receive(manager) for _ in range(3)]
        assert [(message, len(fds)) for message, fds in stored] == [
            (f"FDSTORE=1\nFDNAME=rexec-{KEPT}-{what}\nFDPOLL=0", 1) for what in ("state", "ch1", "ch3")
        ]
        fds = [fd for _, passed in stored for fd in passed]
        try:
            inheritor = Inheritor(fds, [f"rexec-{KEPT}-{what}" for what in ("state", "ch1", "ch3")])
        finally:
            for fd in fds:
                os.close(fd)
        inheritor.close()
        (found,) = inheritor.report["kept"]
        assert (found["role"], found["name"], found["facts"]) == ("rexec", KEPT, {**facts, "same": {"ch2": "ch1"}})
        assert sorted(found["fds"]) == ["ch1", "ch2", "ch3"]
        # By effect: what the restarted server writes through each reaches the pipe it was recorded as.
        assert os.read(output[0], 100) == f"ch1 of {KEPT}\nch2 of {KEPT}\n".encode()
        assert os.read(other[0], 100) == f"ch3 of {KEPT}\n".encode()
        assert pending(manager) == []  # nothing of a kept session is dropped from the store
    finally:
        for fd in (*output, *other):
            os.close(fd)


def test_a_session_forgotten_leaves_nothing_in_the_store(
    manager: socket.socket, sleeper: subprocess.Popen, tmp_path: Path
) -> None:
    marker = tmp_path / KEPT
    kept = keep.Keep("agent", KEPT, marker)
    kept.record(facts_of(KEPT, sleeper.pid, started_at(sleeper.pid)), {})
    read_end, write_end = os.pipe()
    try:
        kept.keep("ch2", write_end)
        stored = [receive(manager) for _ in range(2)]
    finally:
        os.close(read_end)
        os.close(write_end)
    for _, fds in stored:
        for fd in fds:
            os.close(fd)
    assert [message for message, _ in stored] == [
        f"FDSTORE=1\nFDNAME=agent-{KEPT}-state\nFDPOLL=0",
        f"FDSTORE=1\nFDNAME=agent-{KEPT}-ch2\nFDPOLL=0",
    ]
    kept.drop("ch2")
    kept.drop("ch2")  # dropped once: the store is told once
    kept.forget()
    assert pending(manager) == [
        f"FDSTOREREMOVE=1\nFDNAME=agent-{KEPT}-ch2",
        f"FDSTOREREMOVE=1\nFDNAME=agent-{KEPT}-state",
    ]
    assert not marker.exists()


def test_without_a_store_nothing_is_kept(
    sleeper: subprocess.Popen, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        monkeypatch.delenv("FDSTORE", raising=False)  # a manager without a store
        kept = keep.Keep("rexec", KEPT, tmp_path / KEPT)
        assert not kept.enabled
        kept.record(facts_of(KEPT, sleeper.pid, started_at(sleeper.pid)), {"ch1": 0})
        kept.keep("ch1", 0)
        kept.forget()
        assert pending(sock) == []
    assert not (tmp_path / KEPT).exists()


def test_inherited_keeps_a_running_sessions_fds_and_closes_the_rest(
    manager: socket.socket, sleeper: subprocess.Popen
) -> None:
    ended = proc.spawn(["sleep", "1000"])
    ended_at = started_at(ended.pid)
    ended.kill()
    ended.wait()
    states = [
        memfd_with(json.dumps(facts_of(KEPT, sleeper.pid, started_at(sleeper.pid))).encode()),
        memfd_with(json.dumps(facts_of(GONE, ended.pid, ended_at)).encode()),
        # The pid runs, but it is another process than the session's: a successor with its number.
        memfd_with(json.dumps(facts_of(REUSED, sleeper.pid, started_at(sleeper.pid) - 1)).encode()),
    ]
    pipes = [os.pipe() for _ in range(4)]
    stray = memfd_with(b"not a session's")
    fds = [states[0], pipes[0][1], states[1], pipes[1][1], states[2], pipes[2][1], pipes[3][1], stray]
    names = [
        f"rexec-{KEPT}-state",
        f"rexec-{KEPT}-ch2",
        f"rexec-{GONE}-state",
        f"rexec-{GONE}-ch1",
        f"rexec-{REUSED}-state",
        f"rexec-{REUSED}-b3",
        f"rexec-{'d4' * 16}-ch1",  # a session whose facts were never stored
        "somebody-else",
    ]
    try:
        inheritor = Inheritor(fds, names)
    finally:
        for fd in fds:
            os.close(fd)  # from here the child holds the only write ends
    readers = [read_end for read_end, _ in pipes]
    try:
        report = inheritor.report
        assert [(s["name"], s["fds"]) for s in report["kept"]] == [(KEPT, {"ch2": 4})]
        # Of the fds passed at 3..10 only the kept session's channel is open in the child.
        assert report["open"] == [4]
        # By effect: the kept channel is the pipe passed, and open; the other pipes are at their end.
        assert os.read(readers[0], 100) == f"ch2 of {KEPT}\n".encode()
        os.set_blocking(readers[0], False)
        with pytest.raises(BlockingIOError):
            os.read(readers[0], 100)
        for reader in readers[1:]:
            assert select.select([reader], [], [], DEADLINE)[0]
            assert os.read(reader, 100) == b""
        # The manager is told to drop what no session will use.
        dropped = set(pending(manager))
        assert dropped == {
            "FDSTOREREMOVE=1\nFDNAME=somebody-else",
            *(f"FDSTOREREMOVE=1\nFDNAME={name}" for name in names[2:7]),
        }
    finally:
        inheritor.close()
        for reader in readers:
            os.close(reader)


# -- programs nobody can resume ------------------------------------------------------------------


def mark(sessions: Path, name: str, pid: int, started: int) -> Path:
    marker = sessions / name
    marker.write_text(f"{pid} {started}\n")
    return marker


def test_a_program_named_but_not_adopted_is_ended(tmp_path: Path, sleeper: subprocess.Popen) -> None:
    spared = proc.spawn(["sleep", "1000"])
    try:
        unreachable = mark(tmp_path, GONE, sleeper.pid, started_at(sleeper.pid))
        adopted = mark(tmp_path, KEPT, spared.pid, started_at(spared.pid))
        start = time.monotonic()
        keep.end_unreachable(tmp_path, {KEPT}, grace=DEADLINE)
        # Ended on SIGTERM, well within its grace; its marker goes with it.
        assert sleeper.wait(DEADLINE) == -signal.SIGTERM
        assert time.monotonic() - start < DEADLINE / 2
        assert not unreachable.exists()
        # An adopted session's program runs on, still named.
        assert spared.poll() is None
        assert adopted.exists()
    finally:
        spared.kill()
        spared.wait()


def test_a_marker_of_a_reused_pid_ends_nothing(tmp_path: Path, sleeper: subprocess.Popen) -> None:
    marker = mark(tmp_path, REUSED, sleeper.pid, started_at(sleeper.pid) - 1)
    keep.end_unreachable(tmp_path, set(), grace=0.1)
    time.sleep(0.3)  # beyond the grace: a SIGTERM and its SIGKILL would have landed
    assert sleeper.poll() is None
    assert not marker.exists()


@pytest.mark.parametrize("content", ["", "12", "x y", "12 y\n", "-1 0.5"])
def test_an_unreadable_marker_ends_nothing(tmp_path: Path, sleeper: subprocess.Popen, content: str) -> None:
    (tmp_path / GONE).write_text(content)
    keep.end_unreachable(tmp_path, set(), grace=0.1)
    time.sleep(0.3)
    assert sleeper.poll() is None
    assert not (tmp_path / GONE).exists()


def test_a_full_store_keeps_no_more_sessions_and_says_so(
    manager: socket.socket, sleeper: subprocess.Popen, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store is shared and bounded: a session that would not fit is not kept (and ends with its server),
    instead of being kept in part; one that fits afterwards, once room was given back, is kept."""
    monkeypatch.setenv("FDSTORE", str(keep.Keep.used + 2 + keep.ROOM_AFTER_START))
    first = keep.Keep("rexec", KEPT, tmp_path / KEPT)
    first.record(facts_of(KEPT, sleeper.pid, started_at(sleeper.pid)), {"ch1": 0})
    assert first.enabled
    kept_first = [receive(manager) for _ in range(2)]
    second = keep.Keep("rexec", GONE, tmp_path / GONE)
    second.record(facts_of(GONE, sleeper.pid, started_at(sleeper.pid)), {"ch1": 0})
    assert not second.enabled and not (tmp_path / GONE).exists()
    manager.settimeout(0.2)
    with pytest.raises(TimeoutError):
        receive(manager)  # nothing of the second went to the store
    first.forget()
    for _, fds in kept_first:
        for fd in fds:
            os.close(fd)
    third = keep.Keep("rexec", REUSED, tmp_path / REUSED)
    third.record(facts_of(REUSED, sleeper.pid, started_at(sleeper.pid)), {"ch1": 0})
    assert third.enabled
    third.forget()
