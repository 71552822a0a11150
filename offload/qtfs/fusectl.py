"""A FUSE connection's control files (fusectl): ending a connection whatever its server is doing.

Each FUSE mount's connection appears as ``/sys/fs/fuse/connections/N``, N
being its superblock's device number.  Writing to its ``abort`` file fails
every request waiting for an answer, and every later one, at once
(Documentation/filesystems/fuse.rst, "Aborting a filesystem connection").
Closing /dev/fuse does the same, but only when the file is really
released: a thread of the server stuck in a kernel call on the connection
(an invalidation waiting for a page lock that a pending READ holds) keeps
it open, so a killed server stays a zombie and the callers waiting on the
mount stay in D state.  Only an abort through this file frees them.

The files are opened while the connection is known to be ours (its server
is alive and holds /dev/fuse) and then held.  When a connection ends, the
kernel detaches its files (fs/fuse/control.c): a held ``abort`` then does
nothing and a held ``waiting`` reads empty, so a later connection that
gets the same number is never touched through them.  Both files are
unseekable: ``waiting`` answers one read.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

from offload.errors import MountError
from offload.mounts import syscalls

log = logging.getLogger(__name__)

CONNECTIONS = "/sys/fs/fuse/connections"


def number(device: int) -> int:
    """The connection's name: the kernel's own dev_t (MKDEV(major, minor)), not stat's encoding."""
    return (os.major(device) << 20) | os.minor(device)


def _ensure_mounted() -> None:
    """Mount fusectl here when this mount namespace lacks it (systemd mounts it at boot; namespaces may not)."""
    if os.path.ismount(CONNECTIONS):
        return
    # ENOENT: the fuse module is not loaded; EPERM: not root.  Either way
    # the caller cannot abort and says so.
    syscalls.mount("fusectl", CONNECTIONS, "fusectl")


@dataclass
class Connection:
    """The held ``abort`` and ``waiting`` files of one FUSE connection."""

    device: int
    abort_fd: int
    waiting_fd: int

    @classmethod
    def open(cls, device: int) -> Connection:
        """The control files of the connection of ``device`` (a mounted FUSE filesystem's st_dev)."""
        _ensure_mounted()
        directory = f"{CONNECTIONS}/{number(device)}"
        abort_fd = os.open(f"{directory}/abort", os.O_WRONLY | os.O_CLOEXEC)
        try:
            waiting_fd = os.open(f"{directory}/waiting", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            os.close(abort_fd)
            raise
        return cls(device, abort_fd, waiting_fd)

    @classmethod
    def open_or_none(cls, device: int, what: str) -> Connection | None:
        """`open`, or None with the reason logged: ``what`` then cannot abort the connection."""
        try:
            return cls.open(device)
        except (OSError, MountError) as exc:
            log.warning("%s cannot abort its FUSE connection if needed: %s", what, exc)
            return None

    def abort(self) -> None:
        """End the connection: every waiting and later request fails (a no-op once it has ended)."""
        with contextlib.suppress(OSError):
            os.write(self.abort_fd, b"1")

    def exists(self) -> bool:
        """The connection has not ended yet (it lasts while its superblock does).  Answers once."""
        try:
            return os.read(self.waiting_fd, 32) != b""
        except OSError:
            return False

    def close(self) -> None:
        for fd in (self.abort_fd, self.waiting_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
