"""Which host processes the DPU may tune and watch: the programs it started through rexec.

The host's rexec_server is a child subreaper and runs every program of the
DPU as its child (a daemon whose parents exited is re-parented to it), so a
process is one of the DPU's programs exactly when rexec_server is among its
ancestors.  rexec_server is found by the singleton lock it holds for its
whole life (``<run dir>/rexec.lock``, an flock): /proc/locks names the
holder's pid beside the lock file's device and inode.  Nothing is cached
across calls but the holder, by its pid and start time: a pid the holder
left behind names another process once it is reused.

A thread is judged by its thread group: a tid is the DPU's when the process
it belongs to is.
"""

from __future__ import annotations

import errno
import logging
import os

import psutil

log = logging.getLogger(__name__)

#: Parent links followed before giving up: deeper than any real process tree.
MAX_DEPTH = 64


def status_fields(pid: int, *names: str) -> dict[str, str]:
    """Fields of /proc/PID/status (FileNotFoundError or ProcessLookupError once the task is gone)."""
    with open(f"/proc/{pid}/status", "rb") as status:
        text = status.read().decode("ascii", "replace")
    pairs = (line.partition(":") for line in text.splitlines())
    return {key: value.strip() for key, _, value in pairs if key in names}


def lock_holder(lock_path: str) -> int | None:
    """The pid holding an flock on ``lock_path`` (None: nobody, or no such file)."""
    try:
        st = os.stat(lock_path)
    except FileNotFoundError:
        return None
    # /proc/locks: "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"; the
    # device is MAJOR:MINOR in hex, the inode in decimal.
    wanted = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    with open("/proc/locks", "rb") as locks:
        for line in locks.read().decode("ascii", "replace").splitlines():
            words = line.split()
            if len(words) >= 6 and words[1] == "FLOCK" and words[5] == wanted and words[4].isdigit():
                return int(words[4])
    return None


class Programs:
    """``started(pid)``: ``pid`` (a process or thread id of this machine) belongs to a program rexec_server runs."""

    def __init__(self, lock_path: str) -> None:
        self.lock_path = lock_path
        #: The holder; psutil knows it by pid and start time (`is_running` is False once the pid is reused).
        self._server: psutil.Process | None = None

    def _rexec_server(self) -> int | None:
        if self._server is not None and self._server.is_running():
            return self._server.pid
        holder = lock_holder(self.lock_path)
        try:
            self._server = psutil.Process(holder) if holder is not None else None
        except psutil.NoSuchProcess:
            self._server = None
        return self._server.pid if self._server is not None else None

    def started(self, pid: int) -> bool:
        if pid <= 1:
            return False
        if self._started_under(self._rexec_server(), pid):
            return True
        # The rexec_server we knew may have been restarted since (a new pid
        # holds the lock, the old one may linger as a zombie): ask again.
        self._server = None
        server = self._rexec_server()
        if server is None:
            log.warning("no rexec_server holds %s: no host process is the DPU's", self.lock_path)
            return False
        return self._started_under(server, pid)

    @staticmethod
    def _started_under(server: int | None, pid: int) -> bool:
        if server is None:
            return False
        try:
            tgid = int(status_fields(pid, "Tgid")["Tgid"])
            current = tgid
            for _ in range(MAX_DEPTH):
                if current == server:
                    return tgid != server
                if current <= 1:
                    return False
                current = int(status_fields(current, "PPid")["PPid"])
        except (FileNotFoundError, ProcessLookupError, KeyError, ValueError):
            return False
        return False

    def check(self, pid: int, what: str) -> None:
        """PermissionError (EPERM, logged) unless ``pid`` is one of the DPU's programs or their threads."""
        if not self.started(pid):
            log.warning("refused %s of host task %d: not a program the DPU started", what, pid)
            raise PermissionError(errno.EPERM, f"host task {pid} is not a program the DPU started")
