"""Taking a userspace qtfs mount down: unmount it, end the client that served it, wait for that.

`umount` is the one way the package does it (``qtfs umount``, ``offload
teardown``, prepare's rollback), in-process.  The mount is found in
/proc/self/mountinfo, not by stat(2), which would be a request to the
client (hung if the client is).  A lazy unmount leaves the superblock, and
its client, alive while it is used: its connection is aborted then, so the
files still open there fail instead of being served by nobody knows what.
Either way the call returns once the client, known by its pid file
``/run/qtfs/<st_dev of the mount>.pid``, has exited (ended after
`UMOUNT_WAIT` seconds if need be).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from offload import proc
from offload.errors import MountError, OffloadError
from offload.mounts import mountinfo, syscalls
from offload.qtfs import fusectl

log = logging.getLogger("qtfs")

PID_DIR = Path("/run/qtfs")
UMOUNT_WAIT = 10.0


def pidfile(device: int) -> Path:
    return PID_DIR / f"{device}.pid"


def write_pidfile(device: int) -> Path | None:
    """Record this process as the client of the mount of ``device`` (best effort)."""
    try:
        PID_DIR.mkdir(parents=True, exist_ok=True)
        path = pidfile(device)
        path.write_text(f"{os.getpid()}\n")
        return path
    except OSError as exc:
        log.debug("no pid file: %s", exc)
        return None


def state(pid: int) -> str:
    """The state letter in /proc/PID/stat ("Z": a zombie, "X": dead); "" once the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            return file.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return ""


def alive(pid: int) -> bool:
    """``pid`` is still a running qtfs process (a stale pid file may name a reused pid)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            ours = b"qtfs" in file.read()
    except OSError:
        return False
    return ours and state(pid) not in ("", "Z")


def device_on_top(path: str) -> tuple[int, str] | None:
    """(st_dev, fstype) of the mount on top at ``path``, or None where nothing is mounted."""
    stack = mountinfo.stack_at(mountinfo.read(), path)
    if not stack:
        return None
    major, minor = stack[-1].device.split(":")
    return os.makedev(int(major), int(minor)), stack[-1].fstype


@dataclass(frozen=True)
class Ended:
    """The client of a mount that was taken down: its pid (None if unknown) and whether it had to be killed."""

    pid: int | None
    killed: bool = False

    def __str__(self) -> str:
        if self.pid is None:
            return "its qtfs client is unknown (no pid file)"
        if self.killed:
            return f"its qtfs client (pid {self.pid}) did not end by itself within {UMOUNT_WAIT:.0f} s: killed"
        return f"its qtfs client (pid {self.pid}) ended"


def umount(path: str, *, lazy: bool = False) -> Ended:
    """Unmount the qtfs mount at ``path`` (``lazy``: detach it even if busy) and wait for its client to end."""
    found = device_on_top(path)
    if found is None:
        raise MountError(f"{path}: not a mount point", path=path, errno=errno.EINVAL)
    device, fstype = found
    if not fstype.startswith("fuse"):
        raise MountError(f"{path}: {fstype} is mounted there, not a FUSE (qtfs) mount", path=path, errno=errno.EINVAL)
    pid = _client_pid(device)
    # Opened before the unmount, while the connection is surely this mount's.
    connection = fusectl.Connection.open_or_none(device, f"the lazy unmount of {path}") if lazy else None
    try:
        _detach(path, lazy)
        if connection is not None:
            connection.abort()
    finally:
        if connection is not None:
            connection.close()
    return _wait_ended(pid, path)


def detach_if_ours(path: str, connection: fusectl.Connection) -> bool:
    """Detach the mount on top at ``path`` if it is ``connection``'s; True if it did.

    mountinfo is read first and the connection's existence checked after:
    a connection alive then was alive when mountinfo was read, so the device
    number seen there was not yet free for another mount to take.
    """
    found = device_on_top(path)
    if found is None or found[0] != connection.device or not connection.exists():
        return False
    with contextlib.suppress(MountError):
        syscalls.umount(path, syscalls.MNT_DETACH)
        return True
    return False


def _client_pid(device: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        pid = int(pidfile(device).read_text())
        if alive(pid):
            return pid
    return None


def _detach(path: str, lazy: bool) -> None:
    if os.geteuid() == 0:
        syscalls.umount(path, syscalls.MNT_DETACH if lazy else 0)
        return
    # fusermount3 (setuid root) lets a user unmount the FUSE mounts they made.
    try:
        proc.run(["fusermount3", "-u", *(["-z"] if lazy else []), path])
    except OffloadError as exc:
        raise MountError(str(exc), path=path) from None


def _wait_ended(pid: int | None, path: str) -> Ended:
    if pid is None:
        return Ended(None)
    deadline = time.monotonic() + UMOUNT_WAIT
    while time.monotonic() < deadline:
        if not alive(pid):
            return Ended(pid)
        time.sleep(0.02)
    log.warning("the qtfs client %d of %s did not end after the unmount: ending it", pid, path)
    proc.end_pid(pid)
    return Ended(pid, killed=True)
