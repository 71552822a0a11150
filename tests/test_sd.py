"""offload.sd against real sockets and processes: what a service manager receives, and what it passes."""

from __future__ import annotations

import array
import json
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from offload import proc, sd


@pytest.fixture
def manager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A socket where a service manager listens, named by $NOTIFY_SOCKET."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.bind(str(path))
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield sock


def receive(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One message and the fds it carried (ours to close)."""
    data, ancillary, flags, _ = sock.recvmsg(4096, socket.CMSG_SPACE(sd.MAX_FDS_PER_MESSAGE * 4))
    assert not flags & socket.MSG_CTRUNC
    fds = array.array("i")
    for level, kind, payload in ancillary:
        assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
        fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return data, list(fds)


def identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def test_stored_fds_arrive_as_the_same_files(manager: socket.socket) -> None:
    read_end, write_end = os.pipe()
    memfd = os.memfd_create("facts", os.MFD_CLOEXEC)
    try:
        os.write(memfd, b"facts")
        assert sd.store_fds("rexec-1-ch0", [write_end, memfd])
        data, fds = receive(manager)
        try:
            assert data == b"FDSTORE=1\nFDNAME=rexec-1-ch0"
            assert [identity(fd) for fd in fds] == [identity(write_end), identity(memfd)]
            # The same pipe: what goes into the received end comes out of ours.
            os.write(fds[0], b"across")
            assert os.read(read_end, 100) == b"across"
            assert os.pread(fds[1], 100, 0) == b"facts"
        finally:
            for fd in fds:
                os.close(fd)
    finally:
        for fd in (read_end, write_end, memfd):
            os.close(fd)


def test_store_without_poll_and_removal(manager: socket.socket) -> None:
    memfd = os.memfd_create("facts", os.MFD_CLOEXEC)
    try:
        assert sd.store_fds("state", [memfd], poll=False)
        data, fds = receive(manager)
        for fd in fds:
            os.close(fd)
        assert (data, len(fds)) == (b"FDSTORE=1\nFDNAME=state\nFDPOLL=0", 1)
    finally:
        os.close(memfd)
    assert sd.remove_fds("state")
    assert receive(manager) == (b"FDSTOREREMOVE=1\nFDNAME=state", [])
    assert sd.notify("READY=1")
    assert receive(manager) == (b"READY=1", [])


def test_abstract_address(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"offload-test-sd-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sd.remove_fds("gone")
        assert receive(sock) == (b"FDSTOREREMOVE=1\nFDNAME=gone", [])


def test_no_manager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    memfd = os.memfd_create("facts", os.MFD_CLOEXEC)
    try:
        monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
        assert not sd.store_fds("state", [memfd])
        assert not sd.remove_fds("state")
        # A manager that is gone: nothing listens on its socket's path.
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody"))
        assert not sd.store_fds("state", [memfd])
        assert not sd.notify("READY=1")
    finally:
        os.close(memfd)


def test_store_available(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    for size, available in (("4096", True), ("1", True), ("0", False), ("-1", False), ("x", False), ("", False)):
        monkeypatch.setenv("FDSTORE", size)
        assert sd.store_available() is available, size
    monkeypatch.delenv("NOTIFY_SOCKET")
    monkeypatch.setenv("FDSTORE", "4096")
    assert not sd.store_available()


@pytest.mark.parametrize("name", ["", "a:b", "x" * 256, "tab\there", "new\nline", "caf\u00e9", "del\x7f"])
def test_bad_names_refused(manager: socket.socket, name: str) -> None:
    memfd = os.memfd_create("facts", os.MFD_CLOEXEC)
    try:
        with pytest.raises(ValueError):
            sd.store_fds(name, [memfd])
        with pytest.raises(ValueError):
            sd.remove_fds(name)
    finally:
        os.close(memfd)
    manager.settimeout(0)
    with pytest.raises(BlockingIOError):
        manager.recv(4096)  # nothing was sent


def test_names_at_the_limits_pass(manager: socket.socket) -> None:
    for name in ("x" * 255, "a b~!"):
        assert sd.remove_fds(name)
        assert receive(manager) == (f"FDSTOREREMOVE=1\nFDNAME={name}".encode(), [])


def test_fd_counts_refused(manager: socket.socket) -> None:
    memfd = os.memfd_create("facts", os.MFD_CLOEXEC)
    try:
        with pytest.raises(ValueError):
            sd.store_fds("many", [memfd] * (sd.MAX_FDS_PER_MESSAGE + 1))
        with pytest.raises(ValueError):
            sd.store_fds("none", [])
        assert sd.store_fds("most", [memfd] * sd.MAX_FDS_PER_MESSAGE)
        _, fds = receive(manager)
        for fd in fds:
            os.close(fd)
        assert len(fds) == sd.MAX_FDS_PER_MESSAGE
    finally:
        os.close(memfd)


#: Run as the manager's child: what inherited_fds found, whether each fd is close-on-exec, what is left of LISTEN_*.
CHILD = """
import json, os
from offload import sd
found = sd.inherited_fds()
print(json.dumps({
    "found": {name: [[fd, os.get_inheritable(fd), os.fstat(fd).st_ino] for fd in fds] for name, fds in found.items()},
    "left": sorted(key for key in os.environ if key.startswith("LISTEN_")),
    "fd3_inheritable": os.get_inheritable(3),
}))
"""


#: Puts the fds named in argv[1] at 3, 4, ... and execs CHILD in the same process, so LISTEN_PID=self is its pid.
LAUNCH = """
import fcntl, os, sys
files = [int(fd) for fd in sys.argv[1].split(",")]
moved = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100) for fd in files]  # out of the way of 3, 4, ...
for index, fd in enumerate(moved):
    os.dup2(fd, 3 + index)
os.environ["LISTEN_FDS"] = str(len(files))
if sys.argv[2] != "-":
    os.environ["LISTEN_FDNAMES"] = sys.argv[2]
os.environ["LISTEN_PID"] = str(os.getpid()) if sys.argv[3] == "self" else sys.argv[3]
os.execv(sys.executable, [sys.executable, "-c", sys.argv[4]])
"""


def run_listener(files: list[int], names: str | None, listen_pid: str = "self") -> dict:
    """A child that finds ``files`` at 3, 4, ... with LISTEN_* set (by default LISTEN_PID its own pid, as a manager sets it)."""
    argv = [sys.executable, "-c", LAUNCH, ",".join(map(str, files)), names or "-", listen_pid, CHILD]
    result = proc.run(argv, pass_fds=files, check=False, timeout=30)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_inherited_fds_by_name() -> None:
    memfds = [os.memfd_create(f"file{index}", 0) for index in range(4)]
    try:
        inodes = [os.fstat(fd).st_ino for fd in memfds]
        report = run_listener(memfds, "one:two:one")
    finally:
        for fd in memfds:
            os.close(fd)
    # One name twice keeps its fds in order; the fd beyond the names is "unknown"; each is close-on-exec.
    assert report["found"] == {
        "one": [[3, False, inodes[0]], [5, False, inodes[2]]],
        "two": [[4, False, inodes[1]]],
        "unknown": [[6, False, inodes[3]]],
    }
    assert report["left"] == []


def test_inherited_fds_without_names() -> None:
    memfd = os.memfd_create("file", 0)
    try:
        report = run_listener([memfd], None)
    finally:
        os.close(memfd)
    assert list(report["found"]) == ["unknown"]
    assert report["left"] == []


def test_inherited_fds_for_another_process_left_alone() -> None:
    memfd = os.memfd_create("file", 0)
    try:
        report = run_listener([memfd], "mine", listen_pid="1")
    finally:
        os.close(memfd)
    assert report["found"] == {}
    assert report["fd3_inheritable"] is True  # not ours: untouched
    assert report["left"] == []  # and no child of ours takes them
