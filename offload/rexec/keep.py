"""What of a resumable session outlives the rexec_server that holds it: its fds and its facts.

A restart of rexec_server (an upgrade, a crash) must not end the sessions it holds, as a restart of
libvirtd never ends a guest: the units let the programs live (KillMode=process), and what the server
holds for each session goes into the service manager's fd store (`offload.sd`: systemd's FDSTORE), with
a memfd of the facts, for the next server to carry on (`inherited`).  Two roles keep sessions:

- ``rexec``, the host's side (`offload.rexec.executor`): its ends of the
  program's pipes and sockets (``ch<channel>``) and its connections to the
  program's bridged listeners (``b<conn>``);
- ``agent``, the DPU's side (`offload.rexec.agent`): the stand-in's
  connection (``standin``), the fds the stand-in passed (``ch<channel>``,
  listeners ``l<fd>``), the connections libvirt made to those listeners
  (``b<fd>x<conn>``) and the ptys standing for the program's
  (``p<host pty>``).

A session is adopted only while the process whose life bounds it runs
(the program; the stand-in), that same process and not a successor with
its pid.  The host's programs are also named in ``<run dir>/sessions/``:
when the store is gone (the unit was stopped, not restarted) a starting
server ends the programs nobody can resume any more, instead of leaving
them running unseen (`end_unreachable`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import select
import signal
import time
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from offload import sd

log = logging.getLogger(__name__)

#: The fd-store names of one session's fds: <role>-<session>-<what>.
_NAME = re.compile(r"(rexec|agent)-([0-9a-f]{32})-([a-z0-9]+)")
#: What each role keeps of a session, by name.
_WHAT = {
    "rexec": re.compile(r"state|ch[0-9]+|b[0-9]+"),
    "agent": re.compile(r"state|standin|ch[0-9]+|l[0-9]+|b[0-9]+x[0-9]+|p[0-9]+"),
}
#: The facts of a session are a few hundred bytes; a bigger memfd is not ours.
MAX_FACTS = 64 << 10


#: Room a kept session may still take after its start (its monitor connections, its ptys).
ROOM_AFTER_START = 8


class Keep:
    """One session's part of the fd store; a no-op where there is none (its session then ends with the server).

    ``marker``: a file naming the session's bounding process, for `end_unreachable`.  The
    store is shared by every session of the server and bounded ($FDSTORE): only sessions of
    root callers (libvirt's, the VMs: ``root``) are kept, and only while the store has room
    for them, so that no user's sessions crowd the VMs out of it.
    """

    #: The fds this process keeps in the store.
    used = 0

    def __init__(
        self, role: str, name: str, marker: Path | None = None, kept: Iterable[str] = (), *, root: bool = True
    ) -> None:
        self.prefix = f"{role}-{name}-"
        self.name = name
        self.enabled = root and sd.store_available()
        self._marker = marker
        self._kept: set[str] = set(kept)  # what the store holds of the session
        Keep.used += len(self._kept)

    def record(self, facts: dict[str, Any], fds: dict[str, int]) -> None:
        """Keep the session's facts (with ``pid`` and ``start``, `start_of`, of the process that bounds it) and its
        first ``fds`` (copies: the caller keeps its own).

        The store keeps an open file once however often it is given (the
        stand-in's stdout and stderr are one pipe): each is kept under its
        first name, and the facts say which names are the same file.
        """
        if not self.enabled:
            return
        if Keep.used + len(fds) + 1 + ROOM_AFTER_START > sd.store_size():
            log.warning("session %s: the fd store is full; a restart of this server will end it", self.name)
            self.enabled = False
            return
        if self._marker is not None:
            self._marker.write_text(f"{facts['pid']} {facts['start']}\n")
        first: dict[tuple[int, int, int], str] = {}
        same: dict[str, str] = {}
        for what, fd in fds.items():
            st = os.fstat(fd)
            identity = (st.st_dev, st.st_ino, fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE)
            if identity in first:
                same[what] = first[identity]
            else:
                first[identity] = what
        state = os.memfd_create(self.prefix + "state", os.MFD_CLOEXEC)
        try:
            os.write(state, json.dumps({**facts, "same": same}).encode())
            self.keep("state", state)
        finally:
            os.close(state)
        for what, fd in fds.items():
            if what not in same:
                self.keep(what, fd)

    def keep(self, what: str, fd: int) -> None:
        """Keep ``fd`` (a copy: the caller keeps its own) as ``what`` of the session."""
        if not self.enabled:
            return
        # Not polled: a session drops its fds itself, and a pipe whose writer closed may still hold bytes.
        if what not in self._kept and sd.store_fds(self.prefix + what, [fd], poll=False):
            self._kept.add(what)
            Keep.used += 1
        else:
            log.warning("session %s: %s not kept in the fd store; a restart will end the session", self.name, what)

    def drop(self, what: str) -> None:
        if what in self._kept:
            self._kept.discard(what)
            Keep.used -= 1
            sd.remove_fds(self.prefix + what)

    def forget(self) -> None:
        """The session is over: nothing of it is kept."""
        for what in list(self._kept):
            self.drop(what)
        if self._marker is not None:
            with contextlib.suppress(FileNotFoundError):
                self._marker.unlink()


@dataclass
class Kept:
    """A session a restarted server found in the store: its facts, and its fds by what they are."""

    role: str
    name: str
    facts: dict[str, Any]
    fds: dict[str, int] = field(default_factory=dict)

    def keeping(self, marker: Path | None = None) -> Keep:
        """The session's `Keep` from here on, holding what the store holds of it: made before any fd is taken."""
        return Keep(self.role, self.name, marker, ["state", *self.fds])

    def take(self, prefix: str) -> dict[str, int]:
        """The fds whose names start with ``prefix``, by the rest of the name; they are the caller's now."""
        taken = {what[len(prefix) :]: fd for what, fd in self.fds.items() if what.startswith(prefix)}
        for what in taken:
            del self.fds[prefix + what]
        return taken

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def inherited() -> list[Kept]:
    """The sessions whose fds the service manager passed us at start; anything else it passed is closed
    and dropped from the store.  Call once, before the server opens anything."""
    found: dict[tuple[str, str], dict[str, int]] = {}
    for name, fds in sd.inherited_fds().items():
        match = _NAME.fullmatch(name)
        if match is None or not _WHAT[match[1]].fullmatch(match[3]) or len(fds) != 1:
            log.warning("closing %d inherited fds named %r: not a session's", len(fds), name)
            for fd in fds:
                os.close(fd)
            sd.remove_fds(name)
            continue
        found.setdefault((match[1], match[2]), {})[match[3]] = fds[0]
    sessions = []
    for (role, session), named in found.items():
        facts = _facts(role, session, named)
        if facts is not None:
            sessions.append(Kept(role, session, facts, named))
            continue
        for what, fd in named.items():
            os.close(fd)
            sd.remove_fds(f"{role}-{session}-{what}")
    return sessions


def _facts(role: str, session: str, fds: dict[str, int]) -> dict[str, Any] | None:
    """The facts of a session that may be carried on (its state fd is closed); None if it may not."""
    state = fds.get("state")
    if state is None:
        log.warning("%s session %s: inherited without its facts; its fds are closed", role, session)
        return None
    try:
        facts = json.loads(os.pread(state, MAX_FACTS, 0))
        if not isinstance(facts, dict) or facts.get("name") != session:
            raise ValueError("the facts are another session's")
        pid, start = int(facts["pid"]), int(facts["start"])
    except (OSError, ValueError, TypeError, KeyError) as exc:
        log.warning("%s session %s: its facts do not read (%s); its fds are closed", role, session, exc)
        return None
    if not runs(pid, start):
        log.info("%s session %s: pid %d ended while no server ran; nothing to carry on", role, session, pid)
        return None
    os.close(fds.pop("state"))  # the store keeps its own copy
    for what, kept_as in dict(facts.get("same") or {}).items():
        if isinstance(what, str) and _WHAT[role].fullmatch(what) and kept_as in fds and what not in fds:
            fds[what] = os.dup(fds[kept_as])
    return facts


def start_of(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (/proc/PID/stat); None if it is gone or a zombie.

    Not psutil's create_time: that adds the boot time as the wall clock
    tells it now, so a clock stepped since (NTP at a DPU's boot) would make
    a running program look like another.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            fields = file.read().rsplit(b")", 1)[1].split()  # the name may hold anything but its last ")"
    except OSError:
        return None
    return None if fields[0] == b"Z" else int(fields[19])


def runs(pid: int, start: int) -> bool:
    """Whether ``pid`` is the process that started at ``start`` (`start_of`), and not a zombie."""
    return start_of(pid) == start


def open_pidfd(pid: int, start: int) -> int | None:
    """A pidfd of that process, checked after it was opened (so it names no successor); None if it is gone."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return None
    if not runs(pid, start):
        os.close(pidfd)
        return None
    return pidfd


def _markers(sessions_dir: Path) -> Iterator[tuple[str, int, int]]:
    """The sessions named in ``sessions_dir``: (name, pid, start) of each readable marker."""
    for marker in sorted(sessions_dir.iterdir()) if sessions_dir.is_dir() else ():
        with contextlib.suppress(OSError, ValueError):
            pid_text, start_text = marker.read_text().split()
            yield marker.name, int(pid_text), int(start_text)


def marked(sessions_dir: Path, skip: Collection[str] = ()) -> dict[str, tuple[int, int]]:
    """The running programs of the sessions named in ``sessions_dir`` (but ``skip``): name -> (pid, pidfd)."""
    running: dict[str, tuple[int, int]] = {}
    for name, pid, start in _markers(sessions_dir):
        if name not in skip and (pidfd := open_pidfd(pid, start)) is not None:
            running[name] = (pid, pidfd)
    return running


def end(running: dict[str, tuple[int, int]], timeout: float) -> list[str]:
    """End the programs of `marked`: SIGTERM to all, SIGKILL to those left after ``timeout``; a line for each.
    Their pidfds are closed.  Their server, if it runs, tells the peer how each ended."""
    lines = []
    try:
        for signum in (signal.SIGTERM, signal.SIGKILL):
            poller = select.poll()
            for _, pidfd in running.values():
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(pidfd, signum)
                poller.register(pidfd, select.POLLIN)
            deadline = time.monotonic() + timeout
            left = {pidfd for _, pidfd in running.values()}
            while left and (wait := deadline - time.monotonic()) > 0:
                left -= {fd for fd, _ in poller.poll(wait * 1000)}
            for session, (pid, pidfd) in list(running.items()):
                if pidfd not in left:
                    lines.append(f"pid {pid} (session {session}) ended on {signal.Signals(signum).name}")
                    os.close(pidfd)
                    del running[session]
            if not running:
                break
        lines.extend(f"pid {pid} (session {session}) did not end" for session, (pid, _) in running.items())
    finally:
        for _, pidfd in running.values():
            os.close(pidfd)
    return lines


def unreachable(sessions_dir: Path, adopted: Collection[str]) -> dict[str, tuple[int, int]]:
    """The running programs of sessions named in ``sessions_dir`` that were not adopted, for `end`: nobody can
    resume them.  Their names are removed; call it before sessions start (they name theirs there)."""
    found = marked(sessions_dir, adopted)
    for marker in sessions_dir.iterdir():
        if marker.name not in adopted:
            with contextlib.suppress(FileNotFoundError):
                marker.unlink()
    for session, (pid, _) in found.items():
        log.warning("pid %d of session %s cannot be resumed (no fd store kept it); ending it", pid, session)
    return found


def end_unreachable(sessions_dir: Path, adopted: Collection[str], grace: float) -> None:
    """`end` what is `unreachable`."""
    end(unreachable(sessions_dir, adopted), grace)


def programs(sessions_dir: Path) -> list[str]:
    """A line for each session named in ``sessions_dir``: its program's pid, and whether it runs."""
    lines = [
        f"session {name}: pid {pid} {'running' if runs(pid, start) else 'gone'}"
        for name, pid, start in _markers(sessions_dir)
    ]
    return lines or [f"no sessions kept in {sessions_dir}"]
