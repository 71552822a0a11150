"""Each lab side's own mount namespace, held open by one idle process.

Without it the two sides of one machine would share /var/lib/libvirt, /run
and /etc/libvirt, and the offload machinery would be proved by accident.
`plan` gives each side fresh tmpfs instances where the design says the
machines differ, binds the lab's directory back under the DPU's fresh /run,
puts the DPU's rexec and udsproxy state at the default paths (/run/rexec,
/run/udsproxy) where a deployed DPU has it, and last hides (``Hide``) what
is the other side's alone.

A namespace lives as long as a process is in it: the holder is the first
thing the lab starts on each side and the last it ends; every mount in the
namespace goes with it, so no unmount list is needed.
"""

from __future__ import annotations

import contextlib
import os
import select
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from offload import proc
from offload.errors import LabError
from offload.lab import cgroups
from offload.lab.libvirt import wait_until

READY_LINE = b"offload-lab-namespace-ready\n"
READY_TIMEOUT = 10.0


@dataclass(frozen=True)
class Tmpfs:
    """A fresh tmpfs on ``path``; ``keep`` carries the old contents over."""

    path: str
    keep: bool = False

    def script(self, index: int) -> str:
        path = shlex.quote(self.path)
        fd = 3 + index
        lines = [f"mkdir -p {path}"]
        if self.keep:
            # Open the old directory before it is covered, copy from it after.
            lines.append(f"exec {fd}<{path}")
        lines.append(f"mount -t tmpfs -o mode=0755 offload-lab {path}")
        if self.keep:
            lines.append(f"cp -a /proc/self/fd/{fd}/. {path}/")
            lines.append(f"exec {fd}<&-")
        return "\n".join(lines)


@dataclass(frozen=True)
class Bind:
    """``source`` (as it was before any tmpfs of this plan) bound onto ``path``."""

    source: str
    path: str

    def script(self, index: int) -> str:
        fd = 3 + index
        return "\n".join([f"exec {fd}<{shlex.quote(self.source)}", f'__binds="$__binds {fd}:{shlex.quote(self.path)}"'])


@dataclass(frozen=True)
class Hide:
    """``path`` (which must exist) covered, after every bind: an empty read-only
    tmpfs over a directory, /dev/null over a file."""

    path: str

    def script(self, index: int) -> str:
        path = shlex.quote(self.path)
        return (
            f"if [ -d {path} ]; then mount -t tmpfs -o ro,mode=0555,size=4k offload-lab-hidden {path}; "
            f"else mount --no-canonicalize --bind /dev/null {path}; fi"
        )


@dataclass(frozen=True)
class Instance:
    """A new instance of a kernel filesystem on ``path`` (the side's own /proc, /dev/pts)."""

    fstype: str
    path: str
    options: str = ""

    def script(self, index: int) -> str:
        options = f" -o {shlex.quote(self.options)}" if self.options else ""
        path = shlex.quote(self.path)
        lines = [f"mkdir -p {path}", f"mount -t {self.fstype}{options} offload-lab-{self.fstype} {path}"]
        if self.fstype == "devpts":
            # New ptys come from this instance: /dev/ptmx is the machine's otherwise.
            lines.append(f"mount --no-canonicalize --bind {shlex.quote(self.path)}/ptmx /dev/ptmx")
        return "\n".join(lines)


Step = Tmpfs | Bind | Hide | Instance


def plan(role: str, lab_dir: Path, hide: Sequence[str | os.PathLike[str]] = ()) -> list[Step]:
    """The namespace set-up of one side, in order; ``hide`` names the other side's private paths."""
    steps: list[Step]
    if role == "host":
        steps = [Tmpfs("/var/lib/libvirt"), Tmpfs("/run/libvirt")]
    else:
        steps = [
            # Its own pid namespace's processes, its own cgroups as their
            # roots (offload.lab.cgroups), and ptys the host side cannot see.
            Instance("proc", "/proc", "nosuid,nodev,noexec"),
            Instance("tmpfs", cgroups.CGROUP_ROOT, "nosuid,nodev,noexec,mode=0755"),
            *(Instance(h.fstype, h.mount_point, ",".join(h.data)) for h in cgroups.hierarchies()),
            Instance("devpts", "/dev/pts", "newinstance,ptmxmode=0666,mode=0620,gid=5"),
            Bind(str(lab_dir), str(lab_dir)),
            Bind(str(lab_dir / "dpu"), "/run/rexec"),
            Bind(str(lab_dir / "dpu" / "udsproxy"), "/run/udsproxy"),
            Tmpfs("/run"),
            Tmpfs("/var/lib/libvirt"),
            Tmpfs("/etc/libvirt", keep=True),
        ]
    return steps + [Hide(str(path)) for path in hide]


def script(steps: Sequence[Step], own_pids: bool = False) -> str:
    """The shell program the holder runs: set-up, then binds, then hiding, then wait forever
    (or, with ``own_pids``, end: the namespace's init holds it, see offload.lab.pidns).

    Bind sources are opened before the tmpfs mounts that would hide them and
    bound (through /proc/self/fd) after, so a directory can be kept visible
    at its own path under a fresh /run.  Hide steps come last, so that a
    bind does not uncover what they cover.
    """
    body = ["set -eu", '__binds=""']
    # Instances first (the binds below go through the side's own /proc), and
    # dash has fds up to 9 only: the index (3 + index: the fd) counts the rest.
    body += [step.script(0) for step in steps if isinstance(step, Instance)]
    body += [step.script(i) for i, step in enumerate(s for s in steps if isinstance(s, Tmpfs | Bind))]
    body.append(
        "for __b in $__binds; do __fd=${__b%%:*}; __path=${__b#*:}; "
        'mkdir -p "$__path"; mount --no-canonicalize --bind "/proc/self/fd/$__fd" "$__path"; done'
    )
    body += [step.script(0) for step in steps if isinstance(step, Hide)]
    body.append(f"printf '{READY_LINE.decode().strip()}\\n'")
    if not own_pids:
        # stdout is the lab's pipe; close it so the lab's read sees EOF if we die.
        body.append("exec sleep infinity >/dev/null")
    return "\n".join(body)


def start_holder(
    netns: str | None, steps: Sequence[Step], log_path: Path, own_cgroups: Sequence[Path] | None = None
) -> int:
    """Start the holder of a new mount namespace in ``netns``; return its pid once set up.

    With ``own_cgroups`` the side also gets pid and cgroup namespaces of its
    own, the latter rooted at those cgroups; their init is the holder's only
    child (offload.lab.pidns).
    """
    setup = ["sh", "-c", script(steps, own_pids=own_cgroups is not None), "offload-lab-ns"]
    if own_cgroups is not None:
        joined = [arg for place in own_cgroups for arg in ("--cgroup", str(place))]
        setup = [*proc.run_module("offload.lab.pidns"), "init", *joined, "--", *setup]
    argv = proc.in_netns(netns, ["unshare", "--mount", "--propagation", "private", *setup])
    with open(log_path, "ab") as log_file:
        holder = proc.spawn(argv, stdin=proc.DEVNULL, stdout=proc.PIPE, stderr=log_file, start_new_session=True)
    assert holder.stdout is not None
    try:
        if not select.select([holder.stdout], [], [], READY_TIMEOUT)[0]:
            raise LabError(f"mount namespace for {netns} not ready after {READY_TIMEOUT:.0f} s (see {log_path})")
        # One printf, shorter than PIPE_BUF, writes the line: it arrives whole, or nothing does.
        line = holder.stdout.readline()
        if not line:
            holder.wait(5)
            raise LabError(
                f"mount namespace set-up for {netns} failed with status {holder.returncode}: "
                f"{log_path.read_text(errors='replace').strip()[-600:]}"
            )
        if line != READY_LINE:
            raise LabError(f"mount namespace for {netns}: unexpected output {line!r}")
    except BaseException:
        proc.end_pid(holder.pid)
        raise
    finally:
        holder.stdout.close()
    # ``sh`` exec'd ``sleep`` (or the init's parent runs on) through
    # ``unshare`` and ``nsenter``: the pid we started is now the holder itself.
    holder.returncode = 0  # it runs on after we return; the lab ends it by pid
    return holder.pid


def enter(holder_pid: int, argv: list[str], cwd: str | None = None) -> list[str]:
    """``argv`` run in the holder's namespaces (and its pid namespace, if it made one), in ``cwd``."""
    workdir = cwd or os.getcwd()
    init = init_of(holder_pid)
    if init is not None:
        return [*proc.run_module("offload.lab.pidns"), "enter", str(init), workdir, "--", *argv]
    return ["nsenter", f"--target={holder_pid}", "--net", "--mount", f"--wd={workdir}", "--", *argv]


def init_of(holder_pid: int) -> int | None:
    """The init of the pid namespace the holder made (its only child), or None if it made none."""
    try:
        if os.readlink(f"/proc/{holder_pid}/ns/pid") == os.readlink(f"/proc/{holder_pid}/ns/pid_for_children"):
            return None
        with open(f"/proc/{holder_pid}/task/{holder_pid}/children") as file:
            children = file.read().split()
    except OSError as exc:
        raise LabError(f"the lab's namespace holder {holder_pid} is gone: {exc}") from None
    if len(children) != 1:
        raise LabError(f"the lab's namespace holder {holder_pid} has no init (children: {children})")
    return int(children[0])


def namespace_of(pid: int, kind: str = "net") -> str | None:
    """The identity of a process's namespace of ``kind`` (net:[INODE]), or None if it is gone."""
    try:
        return os.readlink(f"/proc/{pid}/ns/{kind}")
    except OSError:
        return None


def entered_program(pid: int) -> int:
    """The program a process started by `enter` runs: its child where it entered a pid namespace
    (waited for while that process is still entering)."""

    def program() -> int | None:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as file:
                argv = file.read().split(b"\0")
            with open(f"/proc/{pid}/task/{pid}/children") as file:
                children = file.read().split()
        except OSError:
            return pid
        # An empty command line: the process is still in execve (its
        # starter hears of the exec a moment before the arguments show).
        if argv == [b""]:
            return None
        if b"offload.lab.pidns" not in argv or b"enter" not in argv:
            return pid
        return int(children[0]) if children else None

    return wait_until(program, READY_TIMEOUT, f"pid {pid} started no program in {READY_TIMEOUT:.0f} s", interval=0.005)


def pid_in_namespace(pid: int) -> int:
    """``pid``'s number in its own pid namespace (the last of NSpid)."""
    try:
        with open(f"/proc/{pid}/status") as file:
            for line in file:
                if line.startswith("NSpid:"):
                    return int(line.split()[-1])
    except OSError:
        pass
    raise LabError(f"no process {pid}")


def pid_outside(holder_pid: int, pid: int) -> int | None:
    """The number here of the process that the holder's pid namespace numbers ``pid``."""
    init = init_of(holder_pid)
    if init is None:
        return pid
    namespace = os.readlink(f"/proc/{init}/ns/pid")
    for entry in os.listdir("/proc"):
        if entry.isdigit() and namespace_of(int(entry), "pid") == namespace:
            with contextlib.suppress(LabError):  # it ended meanwhile
                if pid_in_namespace(int(entry)) == pid:
                    return int(entry)
    return None
