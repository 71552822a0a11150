"""The guard of a qtfs mount: when its client dies, however, abort the connection and detach the mount.

A client killed while one of its threads is stuck in a kernel call on its
FUSE connection cannot end the connection itself (offload.qtfs.fusectl).
So the client starts this small process once its mount answers, hands it
the connection's held control files, and the guard waits for the client's
death: then it aborts the connection and detaches the mount if it is still
there (the next prepare or mount finds the path free).

The client's death is noticed by PR_SET_PDEATHSIG, which the kernel sends
when the thread that started the guard exits: the client's main thread,
which runs the FUSE loop and never blocks in such a call.  A process
whose other threads are stuck never counts as exited for waitpid(2) or a
pidfd of the process, which is why those are not used.  The guard has a session of its
own (a terminal's ^C or hang-up is the client's business).  SIGTERM ends
it without further ado: whoever sends it to everything (systemd stopping a
unit, lab down) sends it to the client too, which then aborts the
connection itself.  A client that ends normally ends and reaps its guard.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from offload import log as log_module
from offload.qtfs import fusectl
from offload.qtfs.unmount import detach_if_ours, state
from offload.resolve import libc, libc_error

log = logging.getLogger("qtfs")

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
#: What the kernel sends the guard when its client's main thread exits.
DEATH_SIGNAL = signal.SIGUSR1


def command(connection: fusectl.Connection, mountpoint: str) -> list[str]:
    """How the client starts its guard (it passes the connection's files at the same numbers)."""
    from offload import proc

    return [
        *proc.run_module(__name__),
        *("--client", str(os.getpid()), "--device", str(connection.device)),
        *("--abort-fd", str(connection.abort_fd), "--waiting-fd", str(connection.waiting_fd)),
        mountpoint,
    ]


def _watch_parent(parent: int) -> None:
    """Return once the main thread of ``parent`` (the client that started this process) has exited."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {DEATH_SIGNAL})
    if libc.prctl(PR_SET_PDEATHSIG, int(DEATH_SIGNAL), 0, 0, 0) != 0:
        raise libc_error("prctl(PR_SET_PDEATHSIG)")
    # Set after the client may already have died.
    if _main_thread_gone(parent):
        return
    while True:
        info = signal.sigwaitinfo({DEATH_SIGNAL})
        # The kernel sends it in the name of the exiting thread (si_pid: the
        # client's pid).  While another thread of the client lives on, we are
        # its child now, so getppid() does not change: it cannot tell.
        if info.si_pid == parent or _main_thread_gone(parent):
            return


def _main_thread_gone(parent: int) -> bool:
    return os.getppid() != parent or state(parent) in ("", "Z", "X")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="qtfs-guard", description=__doc__)
    for flag, metavar in (("--client", "PID"), ("--device", "ST_DEV"), ("--abort-fd", "FD"), ("--waiting-fd", "FD")):
        parser.add_argument(flag, type=int, required=True, metavar=metavar)
    parser.add_argument("mountpoint")
    args = parser.parse_args(argv)
    log_module.setup("qtfs-guard", "INFO")
    connection = fusectl.Connection(args.device, args.abort_fd, args.waiting_fd)
    _watch_parent(args.client)
    connection.abort()
    if detach_if_ours(args.mountpoint, connection):
        log.warning(
            "the qtfs client %d of %s died without unmounting: its connection was aborted and the mount detached",
            args.client,
            args.mountpoint,
        )
    sys.exit(0)


if __name__ == "__main__":
    main()
