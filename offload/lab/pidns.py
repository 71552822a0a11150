"""The DPU side's own pid namespace: its init, and how a command enters the side.

The DPU side's namespace holder creates a pid namespace (and a cgroup
namespace) whose init is ``init``: a host pid that leaks across (a pidfile,
a thread id from qemu's monitor) names nothing there, as on real hardware.

``init`` runs the side's set-up script as its first child, then stays pid 1
of the namespace: it reaps every orphan (libvirt's daemonized children,
stand-ins whose parent died) and ends on SIGTERM, which ends every process
of the namespace with it (the kernel kills them when pid 1 exits).  The
process started by the lab stays outside the namespace, the parent of
pid 1: it passes SIGTERM on and ends with it, so the lab ends the side by
the pid it started.

``enter`` runs a command on a side: it joins the network, mount, pid and
cgroup namespaces of the side's holder and forks (a pid namespace is
joined by one's children only).  It stays the command's parent, passes on
the signals a caller sends and exits with the command's status, so the lab
and the tests treat it as the command itself; if it is killed, the command
is killed too (PR_SET_PDEATHSIG).

Only the standard library and `offload.resolve` (ctypes): this runs for every lab command.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator

from offload.resolve import libc, libc_error

CLONE_NEWCGROUP = 0x02000000
CLONE_NEWPID = 0x20000000
PR_SET_PDEATHSIG = 1
#: The namespaces a command joins, in the order joined (mnt after the others:
#: it changes the root the other /proc paths are opened from, so all are opened first).
NAMESPACES = ("net", "cgroup", "pid", "mnt")
#: What a caller may send the command through us (SIGKILL kills us, then it: PR_SET_PDEATHSIG).
FORWARDED = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGWINCH,
    signal.SIGCONT,
)


def check(result: int, what: str) -> int:
    """A `libc` call's result; OSError with its errno if it failed (-1)."""
    if result < 0:
        raise libc_error(what)
    return result


def exited_children() -> Iterator[tuple[int, int]]:
    """(pid, exit code) of each child that has exited, without waiting for the others."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        yield pid, os.waitstatus_to_exitcode(status)


def _fork_bound() -> int:
    """fork(); the child is killed when its parent dies (PR_SET_PDEATHSIG), also before it asked.

    getppid() cannot tell whether the parent died first: it is 0 for a pid
    namespace's init.  The parent's end of a pipe can: it closes when the
    parent dies.
    """
    alive, held = os.pipe()
    child = os.fork()
    if child != 0:
        os.close(alive)
        os.set_inheritable(held, False)  # held until we exit, by no child of ours
        return child
    os.close(held)
    check(libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
    os.set_blocking(alive, False)
    try:
        if os.read(alive, 1) == b"":
            os._exit(1)  # the parent is gone already
    except BlockingIOError:
        pass
    os.close(alive)
    return 0


def _relay_until_exit(child: int) -> int:
    """Pass the forwarded signals to ``child`` until it ends; its status as an exit code."""
    for signum in FORWARDED:
        signal.signal(signum, lambda number, _frame: os.kill(child, number))
    while True:
        try:
            _, status = os.waitpid(child, 0)
        except InterruptedError:
            continue
        if os.WIFSTOPPED(status):
            continue
        return os.waitstatus_to_exitcode(status)


def _exit_like(code: int) -> None:
    """Exit as the command did: with its status, or killed by its signal."""
    if code < 0:
        if -code not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(-code, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {-code})
        os.kill(os.getpid(), -code)
        code = 128 - code
    os._exit(code)


def enter(target: int, workdir: str, argv: list[str]) -> None:
    """Run ``argv`` in ``workdir`` in the namespaces of process ``target``; exit as it exits."""
    _join_cgroups_of(target)
    fds = {kind: os.open(f"/proc/{target}/ns/{kind}", os.O_RDONLY | os.O_CLOEXEC) for kind in NAMESPACES}
    for kind in NAMESPACES:
        check(libc.setns(fds[kind], 0), f"setns to the {kind} namespace of pid {target}")
        os.close(fds[kind])
    child = _fork_bound()
    if child == 0:
        try:
            os.chdir(workdir)
            os.execvp(argv[0], argv)
        except OSError as exc:
            print(f"lab: cannot run {argv[0]} in {workdir}: {exc}", file=sys.stderr)
            os._exit(127)
    # Our own cwd and root stay on the side's mounts: nothing holds the caller's.
    _exit_like(_relay_until_exit(child))


def _join_cgroups_of(target: int) -> None:
    """Move into the root cgroups of ``target``'s cgroup namespace, as every process of the side is.

    The side mounts each hierarchy at its own cgroup (offload.lab.cgroups),
    so its /sys/fs/cgroup/*/cgroup.procs are those cgroups' (done before
    joining its namespaces: from outside a cgroup namespace's root one
    cannot move into it from within).
    """
    base = f"/proc/{target}/root/sys/fs/cgroup"
    for name in sorted(os.listdir(base)):
        if os.path.isfile(os.path.join(base, name, "cgroup.procs")):
            _join_cgroup(os.path.join(base, name))


def _join_cgroup(directory: str) -> None:
    with open(os.path.join(directory, "cgroup.procs"), "w") as procs:
        procs.write(str(os.getpid()))


def init(cgroups: list[str], argv: list[str]) -> None:
    """Join ``cgroups`` (the side's own, see offload.lab.cgroups), make a pid and a cgroup
    namespace rooted there, run ``argv`` (the set-up) in it, then be its pid 1."""
    for directory in cgroups:
        _join_cgroup(directory)
    check(libc.unshare(CLONE_NEWPID | CLONE_NEWCGROUP), "unshare(CLONE_NEWPID | CLONE_NEWCGROUP)")
    first = _fork_bound()
    if first != 0:
        # Outside, the parent of pid 1: nothing to say on the lab's pipe
        # (its reader sees EOF once the set-up has said all it will).
        _to_dev_null(1)
        _exit_like(_relay_until_exit(first))
    # pid 1: signals without a handler are not delivered to it, so SIGTERM gets one.
    signal.signal(signal.SIGTERM, lambda _number, _frame: os._exit(0))
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    setup = os.fork()
    if setup == 0:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
        os.execvp(argv[0], argv)
    _to_dev_null(1)
    while True:
        signal.sigtimedwait({signal.SIGCHLD}, 60)
        for pid, code in exited_children():
            if pid == setup and code != 0:
                os._exit(1)  # the side was not set up: the namespace ends here


def _to_dev_null(fd: int) -> None:
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, fd)
    os.close(null)


def main() -> None:
    usage = "usage: python -m offload.lab.pidns enter PID WORKDIR -- ARGV... | init [--cgroup DIR]... -- ARGV..."
    args = sys.argv[1:]
    if "--" not in args:
        sys.exit(usage)
    split = args.index("--")
    head, argv = args[:split], args[split + 1 :]
    if not argv:
        sys.exit(usage)
    if head[:1] == ["enter"] and len(head) == 3 and head[1].isdigit():
        enter(int(head[1]), head[2], argv)
    elif head[:1] == ["init"] and len(head) % 2 == 1 and set(head[1::2]) <= {"--cgroup"}:
        init(head[2::2], argv)
    else:
        sys.exit(usage)


if __name__ == "__main__":
    main()
