"""A service manager for one lab daemon: what systemd does for a unit, without systemd.

The lab runs its daemons without systemd, yet a daemon must find its
sessions again after a restart, as under rexec.service: the programs it ran
live on (KillMode=process), and the fds it held for them wait in the
manager's file descriptor store.  This process plays systemd's part for one
daemon, inside the daemon's side (the lab wraps it with `Lab.command`), so
pids and paths are those of the daemon's side:

- it is a child subreaper: the programs of a dead daemon become its
  children, and it reaps every child, as PID 1 would;
- it starts the daemon with NOTIFY_SOCKET naming a socket of its own and
  FDSTORE=<size>, plus LISTEN_FDS, LISTEN_FDNAMES and LISTEN_PID (the fds
  at 3, 4, ...) when it holds stored fds;
- it takes notifications from the daemon alone (its SCM_CREDENTIALS pid, as
  NotifyAccess=main): READY=1 is passed on to the lab with MAINPID=;
  FDSTORE=1 keeps the fds under FDNAME= (a duplicate of a kept fd is
  skipped; beyond --store-max they are refused), FDSTOREREMOVE=1 forgets
  a name; a stored fd that reports POLLHUP or POLLERR is dropped unless it
  came with FDPOLL=0 (systemd.service(5), FileDescriptorStoreMax=);
- SIGUSR1 restarts the daemon as ``systemctl restart`` does (SIGTERM, then
  start it again with the store), SIGUSR2 after SIGKILL, as a crash;
- SIGTERM or SIGINT stops it (SIGTERM, SIGKILL after --stop-timeout) and
  ends the store, as ``systemctl stop``; if the daemon exits on its own,
  the manager exits with its status.

A restarted daemon starts with the signals ignored that the process which
asked for the restart ignores, when that process is on this side (else
those the manager itself inherited): the lab's restart used to start the
daemon from its caller, and a test starts it as a shell's background job
would.

No trio and no psutil, only light modules: it runs for every lab daemon.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import logging
import os
import select
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from offload import fdpass, proc, sd
from offload import log as logs
from offload.lab import pidns

log = logging.getLogger("offload.lab.manager")

#: What the manager waits for, through a signalfd (the sender's pid comes with each).
SIGNALS = (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
#: Signals Python ignores in every interpreter: not an inherited disposition to pass on (as subprocess restores them).
PYTHON_IGNORES = {signal.SIGPIPE, signal.SIGXFSZ}
#: struct signalfd_siginfo: ssi_signo, ssi_errno, ssi_code, ssi_pid first, 128 bytes in all.
SIGINFO = struct.Struct("IiiI")
SIGINFO_SIZE = 128
#: kcmp(2) on x86_64 and aarch64, to tell one open file from another (systemd's same_fd).
SYS_KCMP = {"x86_64": 312, "aarch64": 272}
KCMP_FILE = 0
#: A notification is a few lines; systemd reads at most a page and some.
NOTIFY_BUFFER = 4096
ANCILLARY = socket.CMSG_SPACE(sd.MAX_FDS_PER_MESSAGE * 4) + socket.CMSG_SPACE(struct.calcsize("iII"))
#: systemd's name for fds stored without a valid FDNAME=.
DEFAULT_NAME = "stored"
HANGUP = select.POLLHUP | select.POLLERR | select.POLLNVAL


@dataclass
class Stored:
    """One fd in the store: its name and whether a hangup on it drops it."""

    name: str
    polled: bool


@dataclass
class Manager:
    argv: list[str]
    notify_path: str
    ready_path: str
    store_max: int
    stop_timeout: float
    daemon: int | None = None
    #: "restart", "crash" or "stop" while the daemon is being ended, else None.
    ending: str | None = None
    kill_at: float | None = None
    #: Signals ignored for the next start.
    ignored: set[int] = field(default_factory=set)
    store: dict[int, Stored] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.poller = select.poll()
        self.signals = _signalfd(SIGNALS)
        self.poller.register(self.signals, select.POLLIN)
        Path(self.notify_path).unlink(missing_ok=True)
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.notify.bind(self.notify_path)
        # As NotifyAccess=main: the kernel tells each message's sender.
        self.notify.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.poller.register(self.notify, select.POLLIN)

    # -- the daemon ---------------------------------------------------------------

    def start(self) -> None:
        fds = list(self.store)
        env = {k: v for k, v in os.environ.items() if k not in ("LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_PID")}
        env.update(NOTIFY_SOCKET=self.notify_path, FDSTORE=str(self.store_max))
        if fds:
            # LISTEN_PID, the child's own pid, is set in the child.
            env.update(LISTEN_FDS=str(len(fds)), LISTEN_FDNAMES=":".join(self.store[fd].name for fd in fds))
        pid = os.fork()
        if pid == 0:
            _exec_daemon(self.argv, env, fds, self.ignored)
        self.daemon = pid
        log.info("started %s as pid %d with %d stored fds", self.argv[0], pid, len(fds))

    def end(self, how: str) -> None:
        """End the daemon: ``how`` is restart (SIGTERM), crash (SIGKILL) or stop (SIGTERM, then no start)."""
        if self.daemon is None:
            return
        if self.ending is not None and how != "stop":
            log.info("pid %d is ending already (%s); %s ignored", self.daemon, self.ending, how)
            return
        self.ending = how
        if how == "crash":
            os.kill(self.daemon, signal.SIGKILL)
            log.info("killed pid %d (SIGKILL), to start it again", self.daemon)
            return
        if self.kill_at is None:
            os.kill(self.daemon, signal.SIGTERM)
            self.kill_at = time.monotonic() + self.stop_timeout
            log.info("stopping pid %d (SIGTERM)%s", self.daemon, ", to start it again" if how == "restart" else "")

    def kill_if_late(self) -> None:
        if self.daemon is not None and self.kill_at is not None and time.monotonic() >= self.kill_at:
            log.warning("pid %d did not stop in %g s: SIGKILL", self.daemon, self.stop_timeout)
            os.kill(self.daemon, signal.SIGKILL)
            self.kill_at = None

    def reap(self) -> None:
        """Collect every child that exited: the daemon, or a program its predecessor left to us."""
        for pid, code in pidns.exited_children():
            if pid != self.daemon:
                log.info("reaped pid %d (%s)", pid, _describe(code))
                continue
            # What it said before it exited is still queued, under its pid.
            self.receive()
            self.daemon_exited(code)

    def daemon_exited(self, code: int) -> None:
        log.info("pid %d exited (%s)", self.daemon, _describe(code))
        ending, self.ending, self.kill_at, self.daemon = self.ending, None, None, None
        if ending in ("restart", "crash"):
            self.start()
            return
        self.close()
        sys.exit(0 if ending == "stop" else (code if code >= 0 else 128 - code))

    # -- notifications -----------------------------------------------------------

    def receive(self) -> None:
        while True:
            try:
                data, ancillary, flags, _ = self.notify.recvmsg(
                    NOTIFY_BUFFER, ANCILLARY, socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC
                )
            except BlockingIOError:
                return
            fds, sender = _unpack(ancillary)
            kept: set[int] = set()
            try:
                if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
                    log.warning("a notification from pid %s was truncated: ignored", sender)
                elif sender != self.daemon or self.daemon is None:
                    log.warning("a notification from pid %s, not the daemon (%s): ignored", sender, self.daemon)
                else:
                    kept = self.handle(data.decode(errors="replace").split("\n"), fds)
            finally:
                for fd in fds:
                    if fd not in kept:
                        os.close(fd)

    def handle(self, lines: list[str], fds: list[int]) -> set[int]:
        """Act on one message of the daemon; the fds of ``fds`` now in the store."""
        fields = dict(line.split("=", 1) for line in lines if "=" in line)
        if fields.get("READY") == "1":
            sd.notify(f"READY=1\nMAINPID={self.daemon}", address=self.ready_path)
        if fields.get("FDSTOREREMOVE") == "1":
            self.forget(fields.get("FDNAME"))
        if fields.get("FDSTORE") == "1" and fds:
            return self.keep(_valid_name(fields.get("FDNAME")), fds, polled=fields.get("FDPOLL") != "0")
        return set()

    def keep(self, name: str, fds: list[int], polled: bool) -> set[int]:
        kept = set()
        for fd in fds:
            if any(_same_file(fd, other) for other in self.store):
                continue  # systemd suppresses a duplicate
            if len(self.store) >= self.store_max:
                log.warning("store full (%d fds): fd named %r refused", self.store_max, name)
                continue
            self.store[fd] = Stored(name, polled)
            if polled:
                self.poller.register(fd, 0)  # POLLHUP and POLLERR are always reported
            kept.add(fd)
        return kept

    def forget(self, name: str | None) -> None:
        if name is None:
            log.warning("FDSTOREREMOVE=1 without FDNAME=: ignored")
            return
        for fd in [fd for fd, stored in self.store.items() if stored.name == name]:
            self.drop(fd)

    def drop(self, fd: int) -> None:
        if self.store.pop(fd).polled:
            self.poller.unregister(fd)
        os.close(fd)

    def close(self) -> None:
        """The store flushed, as systemd flushes it when the unit stops; the socket gone."""
        for fd in list(self.store):
            self.drop(fd)
        self.notify.close()
        Path(self.notify_path).unlink(missing_ok=True)

    # -- the loop -------------------------------------------------------------------

    def on_signal(self) -> None:
        while True:
            try:
                info = os.read(self.signals, SIGINFO_SIZE)
            except BlockingIOError:
                return
            number, _, _, sender = SIGINFO.unpack_from(info)
            if number == signal.SIGCHLD:
                self.reap()
            elif number in (signal.SIGUSR1, signal.SIGUSR2):
                self.ignored = _ignored_by(sender) if sender else self.ignored
                self.end("restart" if number == signal.SIGUSR1 else "crash")
            else:
                self.end("stop")

    def run(self) -> None:
        self.start()
        while True:
            timeout = None if self.kill_at is None else max(0, int((self.kill_at - time.monotonic()) * 1000) + 1)
            for fd, events in self.poller.poll(timeout):
                if fd == self.signals:
                    self.on_signal()
                elif fd == self.notify.fileno():
                    self.receive()
                elif fd in self.store and events & HANGUP:
                    log.info("stored fd named %r reported a hangup: dropped", self.store[fd].name)
                    self.drop(fd)
            self.kill_if_late()


def _exec_daemon(argv: list[str], env: dict[str, str], fds: list[int], ignored: set[int]) -> None:
    """In the forked child: the stored fds at 3, 4, ..., signals as a fresh process has them, exec."""
    try:
        if fds:
            env["LISTEN_PID"] = str(os.getpid())
        # Out of the way first: a stored fd may sit where another must go.
        moved = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, sd.LISTEN_FDS_START + len(fds)) for fd in fds]
        for index, fd in enumerate(moved):
            os.dup2(fd, sd.LISTEN_FDS_START + index)  # inheritable
            os.close(fd)
        for number in signal.valid_signals():
            if number not in (signal.SIGKILL, signal.SIGSTOP):
                # Some are the C library's own (its real-time signals for threads): refused.
                with contextlib.suppress(OSError, ValueError):
                    signal.signal(number, signal.SIG_IGN if number in ignored else signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        os.execvpe(argv[0], argv, env)
    except BaseException as exc:
        print(f"offload.lab.manager: cannot start {argv[0]}: {exc}", file=sys.stderr, flush=True)
    os._exit(127)


def _signalfd(numbers: tuple[int, ...]) -> int:
    """A signalfd for ``numbers``, blocked from now on so that only it receives them."""
    mask = (ctypes.c_ulong * (1024 // (8 * ctypes.sizeof(ctypes.c_ulong))))()
    bits = 8 * ctypes.sizeof(ctypes.c_ulong)
    for number in numbers:
        mask[(number - 1) // bits] |= 1 << ((number - 1) % bits)
    signal.pthread_sigmask(signal.SIG_BLOCK, set(numbers))
    return pidns.check(pidns.libc.signalfd(-1, ctypes.byref(mask), os.O_CLOEXEC | os.O_NONBLOCK), "signalfd")


def _unpack(ancillary: list[tuple[int, int, bytes]]) -> tuple[list[int], int | None]:
    """The fds a message carried and its sender's pid."""
    credentials = [
        data for level, kind, data in ancillary if (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS)
    ]
    return fdpass.fds_of(ancillary), struct.unpack_from("i", credentials[0])[0] if credentials else None


def _valid_name(name: str | None) -> str:
    """The name to keep fds under: systemd keeps fds with a bad or no FDNAME= as "stored"."""
    if name is None:
        return DEFAULT_NAME
    try:
        sd.check_name(name)
    except ValueError as exc:
        log.warning("%s: kept as %r", exc, DEFAULT_NAME)
        return DEFAULT_NAME
    return name


def _same_file(a: int, b: int) -> bool:
    """Whether two fds are one open file (systemd's same_fd: kcmp, else inode and status flags)."""
    number = SYS_KCMP.get(os.uname().machine)
    if number is not None:
        pid = os.getpid()
        args = (ctypes.c_long(number), ctypes.c_long(pid), ctypes.c_long(pid), ctypes.c_long(KCMP_FILE))
        result = pidns.libc.syscall(*args, ctypes.c_long(a), ctypes.c_long(b))
        if result >= 0:
            return result == 0
    first, second = os.fstat(a), os.fstat(b)
    if (first.st_dev, first.st_ino) != (second.st_dev, second.st_ino):
        return False
    if first.st_mode & 0o170000 in (0o020000, 0o060000):
        return False  # two opens of a device may be different contexts
    # The read and write ends of one pipe share an inode; their flags differ.
    return fcntl.fcntl(a, fcntl.F_GETFL) == fcntl.fcntl(b, fcntl.F_GETFL)


def _ignored_by(pid: int) -> set[int]:
    """The signals process ``pid`` ignores (its SigIgn), without those every Python ignores."""
    try:
        with open(f"/proc/{pid}/status") as file:
            mask = int(next(line.split()[1] for line in file if line.startswith("SigIgn:")), 16)
    except (OSError, StopIteration, ValueError):
        return set()
    return {number for number in range(1, 65) if mask >> (number - 1) & 1} - PYTHON_IGNORES


def _describe(code: int) -> str:
    return f"signal {signal.Signals(-code).name}" if code < 0 else f"status {code}"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m offload.lab.manager", description=__doc__.split("\n")[0])
    parser.add_argument("--notify-socket", required=True, help="the socket to bind, the daemon's NOTIFY_SOCKET")
    parser.add_argument("--ready-socket", required=True, help="where READY=1 and MAINPID= are passed on")
    parser.add_argument("--store-max", type=int, default=4096, help="FileDescriptorStoreMax=")
    parser.add_argument("--stop-timeout", type=float, default=20.0, help="TimeoutStopSec=")
    parser.add_argument("argv", nargs="+", help="-- the daemon's command line")
    args = parser.parse_args()
    logs.setup("offload.lab.manager")
    # Before anything changes them: what the daemon's first start inherits.
    ignored = _ignored_by(os.getpid())
    proc.adopt_orphans(True)  # as PID 1 would: the programs of a daemon that died are ours to reap
    manager = Manager(args.argv, args.notify_socket, args.ready_socket, args.store_max, args.stop_timeout)
    manager.ignored = ignored
    manager.run()


if __name__ == "__main__":
    main()
