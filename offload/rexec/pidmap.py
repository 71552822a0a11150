"""The reference's pidmap files: ``<run dir>/pids/<stand-in pid>`` -> remote pid.

Format (kept for tools that read it): the remote pid in decimal, no newline,
under an exclusive flock held for the stand-in's lifetime.  The agent
creates and locks the file and hands the locked fd to the stand-in, so the
lock lives exactly as long as the stand-in does, even when the stand-in
runs unprivileged (libvirt runs qemu as libvirt-qemu) and could not create
files in the root-owned directory itself.  A file whose lock can be taken
belongs to a dead stand-in and is removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from offload.errors import RefusedError
from offload.fdinfo import closed_on_error

log = logging.getLogger(__name__)


class PidmapDir:
    def __init__(self, path: Path) -> None:
        self.path = path
        #: Stand-in pids with a session in progress in this agent.
        self._claimed: set[int] = set()

    @contextlib.contextmanager
    def claim(self, standin_pid: int) -> Iterator[None]:
        """Reserve ``standin_pid`` for one session, before its program is asked for.

        A stand-in runs one program; a second request from the same process
        while its first runs is refused here, before the peer starts
        anything, not when its pidmap file turns out to be locked.
        """
        if standin_pid in self._claimed:
            raise RefusedError(f"the stand-in {standin_pid} already has a session running")
        self._claimed.add(standin_pid)
        try:
            yield
        finally:
            self._claimed.discard(standin_pid)

    def prepare(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        os.chmod(self.path, 0o755)  # readable by libvirt and tools; writable by root
        removed = 0
        for entry in self.path.iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fd = os.open(entry, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError: a live stand-in holds it
                # Unlinked while we hold the lock: no new owner can appear
                # between the check and the removal.
                entry.unlink()
                removed += 1
            except (BlockingIOError, FileNotFoundError):
                pass
            finally:
                os.close(fd)
        if removed:
            log.info("removed %d stale pidmap file(s) from %s", removed, self.path)

    def create(self, standin_pid: int, remote_pid: int) -> int:
        """Write and lock the mapping; return the locked fd for the stand-in to hold."""
        path = self.path / str(standin_pid)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        try:
            with closed_on_error(fd):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.ftruncate(fd, 0)
                os.write(fd, str(remote_pid).encode())
        except BlockingIOError:
            raise RefusedError(f"the stand-in {standin_pid} already holds its pidmap {path}") from None
        return fd

    def remove(self, standin_pid: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.path / str(standin_pid)).unlink()
