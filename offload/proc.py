"""Every child process the package starts goes through this module; nothing else imports subprocess.

Remote programs are started through the ``rexec-exec`` helper
(native/rexec_exec.c), which puts inherited fds at their exact numbers and
reports exec failures by stage and errno.  A child is always reaped, also
when the caller is being cancelled (`terminate`; `end_pid` for a process
trio did not start).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from offload.errors import OffloadError

if TYPE_CHECKING:
    # trio is imported where it is used: command-line tools that only run
    # programs should not pay its import time at start.
    import trio

    from offload.protocol.rexec import Rlimit

log = logging.getLogger(__name__)

#: What `run` raises past its ``timeout``: callers catch it without importing subprocess.
TimeoutExpired = subprocess.TimeoutExpired

_PACKAGE_HELPER = Path(__file__).parent / "_native" / "rexec-exec"
#: Where the Debian package installs it (debian/offload.install).
_SYSTEM_HELPER = Path("/usr/lib/offload/rexec-exec")


#: Redirection constants for spawn() and run(), so callers need not import subprocess.
DEVNULL = subprocess.DEVNULL
PIPE = subprocess.PIPE
STDOUT = subprocess.STDOUT


def exec_helper() -> str:
    """Path of the rexec-exec helper: the package's build, else the installed one."""
    for candidate in (_PACKAGE_HELPER, _SYSTEM_HELPER):
        if os.access(candidate, os.X_OK):
            return str(candidate)
    raise OffloadError(
        f"the rexec-exec helper is missing (looked for {_PACKAGE_HELPER} and {_SYSTEM_HELPER}); run 'make setup'"
    )


class ExecFailed(OffloadError):
    """The program could not be started; ``stage`` says which step failed."""

    def __init__(self, stage: str, fd: int, err: int, program: str, limit: Rlimit | None = None, cwd: str = "") -> None:
        self.stage, self.fd, self.errno, self.program = stage, fd, err, program
        reason = os.strerror(err)
        if stage == "exec":
            message = f"{program}: {reason}"
        elif stage == "cwd":
            message = f"{program}: cannot enter its working directory {cwd}: {reason}"
        elif stage.startswith("RLIMIT_"):
            # A resource limit its user may not have here (a hard limit above its own, say).
            asked = f" to soft {_limit(limit[0])}, hard {_limit(limit[1])}" if limit else ""
            message = f"{program}: cannot set {stage}{asked}: {reason}"
        else:
            message = f"{program}: cannot {stage} fd {fd}: {reason}"
        super().__init__(message)

    @property
    def exit_code(self) -> int:
        # The shell's convention: 127 for "not found", 126 for "found but not runnable".
        return 127 if self.stage == "exec" and self.errno == errno.ENOENT else 126


#: Programs `start_program` started, by pid, until collected: `reap_orphans` must leave them to trio.
_programs: weakref.WeakValueDictionary[int, trio.Process] = weakref.WeakValueDictionary()
#: `start_program` calls between fork and registration (a reap now could steal a program's status).
_starting = 0
_reap_deferred = False
#: Exited children nobody has collected yet, by pid: when a scan first found each (`reap_orphans`).
_exited_since: dict[int, float] = {}
#: Seconds an exited child is left to whoever waits for it before it counts as an orphan.
ORPHAN_AFTER = 1.0


@dataclass(frozen=True)
class ProgramPlan:
    """How to start one remote program."""

    path: str  # what to execute
    argv: Sequence[str]  # argv[0] as the caller typed it
    env: Mapping[str, str]
    cwd: str
    umask: int
    uid: int
    gid: int
    groups: Sequence[int] = ()
    dups: Mapping[int, int] = field(default_factory=dict)  # target fd -> our fd
    opens: Sequence[tuple[int, str, int, int]] = ()  # (target fd, path, flags, offset)
    #: NAME (protocol.local.RLIMITS) -> (soft, hard), None for unlimited; set as the program's user.
    rlimits: Mapping[str, Rlimit] = field(default_factory=dict)


async def start_program(plan: ProgramPlan) -> trio.Process:
    """Start ``plan``; raise ExecFailed if any step before the program runs fails."""
    import trio

    status_read, status_write = os.pipe2(os.O_CLOEXEC)
    specs = [f"dup:{ours}:{target}" for target, ours in sorted(plan.dups.items())]
    specs += [f"open:{target}:{flags}:{offset}:{path}" for target, path, flags, offset in plan.opens]
    targets = set(plan.dups) | {target for target, *_ in plan.opens}
    specs += [f"close:{fd}" for fd in (0, 1, 2) if fd not in targets]
    specs += [f"rlimit:{name}:{_limit(soft)}:{_limit(hard)}" for name, (soft, hard) in sorted(plan.rlimits.items())]
    # Entered by the helper, as the user: subprocess would enter it as root, before it drops root.
    specs.append(f"cwd:{plan.cwd}")
    command = [exec_helper(), str(status_write), *specs, "--", plan.path, *plan.argv]
    as_root = plan.uid == 0
    global _starting
    _starting += 1
    try:
        process = await trio.lowlevel.open_process(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(status_write, *plan.dups.values()),
            close_fds=True,
            env=dict(plan.env),
            cwd="/",
            umask=plan.umask,
            user=None if as_root else plan.uid,
            group=None if as_root else plan.gid,
            extra_groups=None if as_root else list(plan.groups),
            # Its own process group, so cleanup reaches helpers it starts.
            process_group=0,
            restore_signals=True,
        )
    except OSError as exc:
        os.close(status_read)
        raise ExecFailed("exec", -1, exc.errno or errno.EIO, plan.argv[0]) from None
    finally:
        os.close(status_write)
        _starting -= 1
    _programs[process.pid] = process
    if _reap_deferred:
        reap_orphans()
    report = b""
    async with trio.lowlevel.FdStream(status_read) as status:
        while chunk := await status.receive_some(256):
            report += chunk
    if report:
        with trio.CancelScope(shield=True):
            await process.wait()  # the helper exits at once: reap it even if we are being cancelled
        stage, fd, err = report.decode().split()
        if stage.startswith("RLIMIT_"):
            raise ExecFailed(stage, -1, int(err), plan.argv[0], plan.rlimits.get(stage.removeprefix("RLIMIT_")))
        raise ExecFailed(stage, int(fd), int(err), plan.argv[0], cwd=plan.cwd)
    return process


def _limit(value: int | None) -> str:
    return "unlimited" if value is None else str(value)


async def terminate(process: trio.Process, grace: float = 2.0) -> int:
    """SIGTERM, then SIGKILL after ``grace`` seconds, to its process group too; always reaps."""
    import trio

    with trio.CancelScope(shield=True):
        if process.returncode is None:
            _signal(process, signal.SIGTERM)
            with trio.move_on_after(grace):
                await process.wait()
            if process.returncode is None:
                _signal(process, signal.SIGKILL)
        status = await process.wait()
    return status


def is_program(pid: int) -> bool:
    """Whether ``pid`` is a program `start_program` started that has not been collected."""
    process = _programs.get(pid)
    return process is not None and process.returncode is None


# PR_SET_CHILD_SUBREAPER, <linux/prctl.h>.
_PR_SET_CHILD_SUBREAPER = 36


def adopt_orphans(enable: bool) -> None:
    """Make this process the parent of its programs' orphans (a child subreaper), or stop.

    A program that daemonizes (qemu -daemonize: fork, setsid, fork again)
    leaves a process whose parents have exited; the kernel hands it to the
    nearest subreaper instead of pid 1.  So a daemon a program started stays
    our child, which is how we can tell it from any other process on this
    machine (see prctl(2)).  Whoever enables this must call `reap_orphans`
    on every SIGCHLD, and again when it says.
    """
    from offload.resolve import libc, libc_error

    if libc.prctl(_PR_SET_CHILD_SUBREAPER, int(enable), 0, 0, 0) != 0:
        raise libc_error("prctl(PR_SET_CHILD_SUBREAPER)")


def reap_orphans() -> float | None:
    """Collect the orphans we adopted that have exited; seconds until a scan is due again (None: none waits).

    A child that exited counts as an orphan only after ORPHAN_AFTER
    uncollected: a command this process runs and waits for (subprocess,
    trio) is its waiter's to collect, with its status, also when another
    child's SIGCHLD makes us scan first.  Programs stay trio's to reap
    (their status is the session's result).  While a program is being
    started its pid is not registered yet, so the scan waits for the
    registration.
    """
    import psutil

    global _reap_deferred, _exited_since
    if _starting:
        _reap_deferred = True
        return ORPHAN_AFTER
    _reap_deferred = False
    now = time.monotonic()
    waiting: dict[int, float] = {}
    for child in psutil.Process().children():
        try:
            exited = child.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            continue
        if not exited or is_program(child.pid):
            continue
        since = _exited_since.get(child.pid, now)
        if now - since < ORPHAN_AFTER:
            waiting[child.pid] = since
        else:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(child.pid, os.WNOHANG)
    _exited_since = waiting
    return min((since + ORPHAN_AFTER - now for since in waiting.values()), default=None)


def _signal(process: trio.Process, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signum)
        process.send_signal(signum)


# Plain commands and daemons (lab, tests, benchmarks) ---------------------------


#: The package's own programs (pyproject.toml's [project.scripts]): the module each one runs.
PROGRAMS = {
    "offload": "offload.cli",
    "qtfs": "offload.qtfs.cli",
    "rexec": "offload.rexec_client",
    "rexec_server": "offload.rexec_server",
    "udsproxyd": "offload.udsproxy.daemon",
}


def program(name: str) -> list[str]:
    """The command line that starts this package's program ``name``, never looked up through PATH.

    The running interpreter runs the program's module, so the program is the
    one installed with the code that starts it, whatever PATH holds.
    ``-P``: the caller's working directory stays out of ``sys.path``, so a
    directory named ``offload`` there cannot stand in for the package.
    """
    return run_module(PROGRAMS[name])


def run_module(module: str) -> list[str]:
    """The command line that runs the package's ``module`` with the running interpreter (see `program`)."""
    return [sys.executable, "-P", "-m", module]


def describe(argv: Sequence[str]) -> str:
    """A copy-pasteable shell form of ``argv`` for logs and errors."""
    return shlex.join(str(a) for a in argv)


def run(argv: Sequence[str], *, check: bool = True, capture: bool = True, **options) -> subprocess.CompletedProcess:
    """Run a command to completion; on failure raise OffloadError with its output."""
    log.debug("running %s", describe(argv))
    try:
        if "input" not in options:
            options.setdefault("stdin", subprocess.DEVNULL)
        result = subprocess.run(list(argv), capture_output=capture, text=options.pop("text", True), **options)
    except FileNotFoundError:
        raise OffloadError(f"{argv[0]}: command not found (while running: {describe(argv)})") from None
    if check and result.returncode != 0:
        detail = (result.stderr or result.stdout or "").strip() if capture else ""
        raise OffloadError(
            f"command failed with status {result.returncode}: {describe(argv)}" + (f"\n{detail}" if detail else "")
        )
    return result


def spawn(argv: Sequence[str], **options) -> subprocess.Popen:
    """Start a long-running child; the caller owns it and must end it."""
    log.debug("starting %s", describe(argv))
    return subprocess.Popen(list(argv), **options)


def in_netns(netns: str | None, argv: Sequence[str]) -> list[str]:
    """``argv`` run inside the named network namespace (nsenter, from util-linux)."""
    if netns is None:
        return list(argv)
    return ["nsenter", f"--net=/run/netns/{netns}", "--", *argv]


def with_hidden_dir(directory: str | os.PathLike[str], argv: Sequence[str]) -> list[str]:
    """``argv`` in a private mount namespace where ``directory`` is an empty tmpfs (util-linux unshare).

    How a test or benchmark makes a socket exist "only on the other side" of the lab.
    """
    script = f'mount -t tmpfs none "{directory}" && exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *argv]


def end_pid(pid: int, grace: float = 3.0) -> bool:
    """SIGTERM, then SIGKILL a process that need not be our child; True once it has exited.

    If it is our own child (a daemon started by this process and left to
    run), its status is collected so no zombie stays behind.
    """
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return end_pidfd(pidfd, grace)
    finally:
        os.close(pidfd)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


def end_pidfd(pidfd: int, grace: float = 3.0) -> bool:
    """SIGTERM, then SIGKILL the process of ``pidfd`` (left open); True once it has exited.

    A pidfd turns readable when its process exits, also when that process
    is not our child and stays a zombie until its parent reaps it: for us
    it is gone.  A pidfd, unlike a pid, cannot name a successor that reused
    the number.  Blocking: async callers run it in a thread.
    """
    import select

    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    for signum in (signal.SIGTERM, signal.SIGKILL):
        try:
            signal.pidfd_send_signal(pidfd, signum)
        except ProcessLookupError:
            return True
        if poller.poll(grace * 1000):
            return True
    return False
