"""Logging set-up, done only by entry points.

Under systemd (JOURNAL_STREAM names our stderr) records go to the journal
with their level; otherwise to stderr, one line each.  Library modules only
call ``logging.getLogger(__name__)`` with lazy ``%s`` arguments.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys


def _under_journal() -> bool:
    stream = os.environ.get("JOURNAL_STREAM", "")
    if not stream:
        return False
    try:
        device, inode = (int(part) for part in stream.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (device, inode)


def raise_fd_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit: every relayed connection costs fds."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def setup(program: str, level: str = "INFO") -> None:
    handler: logging.Handler = logging.StreamHandler()
    form = f"%(asctime)s {program}[%(process)d] %(levelname)s %(message)s"
    if _under_journal():
        form = "<%(levelno)s>%(message)s"
        with contextlib.suppress(ImportError):
            from systemd.journal import JournalHandler

            handler = JournalHandler(SYSLOG_IDENTIFIER=program)
            form = "%(message)s"
    handler.setFormatter(logging.Formatter(form))
    root = logging.getLogger()
    root.setLevel(level.upper())
    root.handlers[:] = [handler]
