"""Task ids in a host cgroup seen from the DPU (the FUSE client's ``--cgroup`` mode).

libvirt writes two kinds of numbers into a cgroup's ``tasks``: pids of
this machine (the emulator's, which is a stand-in, and before that its own
child that is about to exec the stand-in) and thread ids qemu reported over
QMP, which are the host's.  A write is carried to the host as:

* a stand-in's pid (rexec's pidmap, ``pids/<stand-in pid>``, holds the
  host pid of its program): that host pid;
* a process of this machine running the writer's own executable (libvirt
  placing its fork that is about to exec the stand-in; libvirt daemonizes
  it, so it is no child of the writer): nothing at once; the DPU's
  processes stay where they are.  The fork keeps its pid when it execs the
  stand-in, so once the pidmap maps it the host program is placed there
  (`Filesystem.carry_placements_forever`);
* anything else: as it is; the host places it only if it is a thread of a
  program the DPU started (`offload.qtfs.programs`) and refuses it
  otherwise.

Reads go the other way: a host pid is shown as its stand-in's, and numbers
that name nothing here (the host's thread ids) are left out, so nothing
this machine does with a pid read from a cgroup touches one of its own
processes by accident.
"""

from __future__ import annotations

import errno
import os

from offload.qtfs.programs import status_fields

#: At most this many digits make a task id (pid_max is at most 2^22).
MAX_DIGITS = 10
#: The files of a cgroup that take a task: a tid (tasks) or a whole process (cgroup.procs).
TASK_FILES = (b"tasks", b"cgroup.procs")
#: How long a fork libvirt placed may take to become a mapped stand-in, and how often that is looked at.
PLACEMENT_WAIT = 60.0
PLACEMENT_POLL = 0.02


def host_pid(pidmap: str, pid: int) -> int | None:
    """The host pid of the program whose stand-in is ``pid`` (None: ``pid`` is no stand-in)."""
    try:
        with open(os.path.join(pidmap, str(pid)), "rb") as mapping:
            text = mapping.read(MAX_DIGITS + 1)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return int(text) if text.isdigit() and len(text) <= MAX_DIGITS else None


def standins(pidmap: str) -> dict[int, int]:
    """Host pid -> stand-in pid for every live mapping in ``pidmap``."""
    try:
        names = os.listdir(pidmap)
    except FileNotFoundError:
        return {}
    mapped = {int(name): host_pid(pidmap, int(name)) for name in names if name.isdigit()}
    return {remote: pid for pid, remote in mapped.items() if remote is not None}


def same_program(pid: int, writer: int) -> bool:
    """``pid`` is a process of this machine running the writer's own executable (a fork not yet exec'ed)."""
    try:
        mine = os.stat(f"/proc/{writer}/exe")
        theirs = os.stat(f"/proc/{pid}/exe")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False
    return (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino)


def process_of(task: int) -> int:
    """The process (thread group) of this machine's task ``task``; 0 if it is gone.

    FUSE names the calling thread, and libvirt writes from one of its many.
    """
    try:
        return int(status_fields(task, "Tgid")["Tgid"])
    except (OSError, KeyError, ValueError):
        return 0


def task_id(data: bytes) -> int:
    """The one task id a write to a tasks file carries (EINVAL for anything else)."""
    text = data.strip()
    if not text.isdigit() or len(text) > MAX_DIGITS:
        raise OSError(errno.EINVAL, "expected one task id")
    return int(text)


def outgoing(pidmap: str, writer: int, data: bytes) -> bytes | None:
    """What a write of ``data`` by process ``writer`` says to the host; None: nothing to carry."""
    pid = task_id(data)
    remote = host_pid(pidmap, pid)
    if remote is not None:
        return b"%d" % remote
    if writer and same_program(pid, writer):
        return None
    return data.strip()


def incoming(pidmap: str, data: bytes) -> bytes:
    """A host tasks or cgroup.procs listing as this machine's pids (stand-ins); other ids left out."""
    mapped = standins(pidmap)
    shown = [b"%d\n" % mapped[int(word)] for word in data.split() if word.isdigit() and int(word) in mapped]
    return b"".join(shown)
