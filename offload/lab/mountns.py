"""Each lab side's own mount namespace, held open by one idle process.

The lab's two sides share one machine, so without this they would share
/var/lib/libvirt, /run and /etc/libvirt and the offload machinery would be
proved by accident.  Each side gets a private mount namespace (made by
util-linux ``unshare`` inside that side's network namespace) in which the
directories the design says differ are fresh tmpfs instances:

- host: /var/lib/libvirt and /run/libvirt, so the lab's VMs and their state
  never touch the machine's own libvirt directories;
- DPU: /run (with the lab's own directory bound back at the same path, so
  both sides keep seeing the lab's sockets and logs), /var/lib/libvirt and
  /etc/libvirt (a copy of the machine's configuration).

On the DPU side the lab's rexec and udsproxy state directories are also
bound at the default paths (/run/rexec, /run/udsproxy), where a deployed
DPU has them and where the rootfs configuration looks for them.

Last, each side's namespace hides what is the other side's alone (``Hide``
steps, which the lab names: the other side's key, run directory and, on the
host side, the DPU's rootfs and its layers): an empty read-only tmpfs is
mounted over a directory, /dev/null over a file.  Only the lab's
controlling process, outside both namespaces, sees everything.

A namespace lives as long as a process is in it: the holder runs ``sleep``
after its set-up and is the first thing the lab starts on each side and the
last thing it ends; every mount in the namespace goes with it, so no
unmount list is needed.  Commands enter both namespaces with ``nsenter``.
"""

from __future__ import annotations

import os
import select
import shlex
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from offload import proc
from offload.errors import LabError

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
        return "\n".join(
            [
                f"exec {fd}<{shlex.quote(self.source)}",
                f'__binds="$__binds {fd}:{shlex.quote(self.path)}"',
            ]
        )


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


Step = Tmpfs | Bind | Hide


def plan(role: str, lab_dir: Path, hide: Sequence[str | os.PathLike[str]] = ()) -> list[Step]:
    """The namespace set-up of one side, in order; ``hide`` names the other side's private paths."""
    steps: list[Step]
    if role == "host":
        steps = [Tmpfs("/var/lib/libvirt"), Tmpfs("/run/libvirt")]
    else:
        steps = [
            Bind(str(lab_dir), str(lab_dir)),
            Bind(str(lab_dir / "dpu"), "/run/rexec"),
            Bind(str(lab_dir / "dpu" / "udsproxy"), "/run/udsproxy"),
            Tmpfs("/run"),
            Tmpfs("/var/lib/libvirt"),
            Tmpfs("/etc/libvirt", keep=True),
        ]
    return steps + [Hide(str(path)) for path in hide]


def script(steps: Sequence[Step]) -> str:
    """The shell program the holder runs: set-up, then binds, then hiding, then wait forever.

    Bind sources are opened before the tmpfs mounts that would hide them and
    bound (through /proc/self/fd) after, so a directory can be kept visible
    at its own path under a fresh /run.  Hide steps come last, so that a
    bind does not uncover what they cover.
    """
    body = ["set -eu", '__binds=""']
    body += [step.script(i) for i, step in enumerate(steps) if not isinstance(step, Hide)]
    body.append(
        "for __b in $__binds; do __fd=${__b%%:*}; __path=${__b#*:}; "
        'mkdir -p "$__path"; mount --no-canonicalize --bind "/proc/self/fd/$__fd" "$__path"; done'
    )
    body += [step.script(i) for i, step in enumerate(steps) if isinstance(step, Hide)]
    body.append(f"printf '{READY_LINE.decode().strip()}\\n'")
    # stdout is the lab's pipe; close it so the lab's read sees EOF if we die.
    body.append("exec sleep infinity >/dev/null")
    return "\n".join(body)


def start_holder(netns: str | None, steps: Sequence[Step], log_path: Path) -> int:
    """Start the holder of a new mount namespace in ``netns``; return its pid once set up."""
    argv = proc.in_netns(
        netns, ["unshare", "--mount", "--propagation", "private", "sh", "-c", script(steps), "offload-lab-ns"]
    )
    with open(log_path, "ab") as log_file:
        holder = proc.spawn(argv, stdin=proc.DEVNULL, stdout=proc.PIPE, stderr=log_file, start_new_session=True)
    assert holder.stdout is not None
    deadline = time.monotonic() + READY_TIMEOUT
    line = b""
    try:
        while not line.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([holder.stdout], [], [], remaining)[0]:
                raise LabError(f"mount namespace for {netns} not ready after {READY_TIMEOUT:.0f} s (see {log_path})")
            chunk = os.read(holder.stdout.fileno(), 64)
            if not chunk:
                holder.wait(5)
                raise LabError(
                    f"mount namespace set-up for {netns} failed with status {holder.returncode}: "
                    f"{log_path.read_text(errors='replace').strip()[-600:]}"
                )
            line += chunk
    except BaseException:
        proc.end_pid(holder.pid)
        raise
    finally:
        holder.stdout.close()
    if line != READY_LINE:
        proc.end_pid(holder.pid)
        raise LabError(f"mount namespace for {netns}: unexpected output {line!r}")
    # ``sh`` exec'd ``sleep`` through ``unshare`` and ``nsenter``: the pid we
    # started is now the holder itself.
    holder.returncode = 0  # it runs on after we return; the lab ends it by pid
    return holder.pid


def enter(holder_pid: int, argv: list[str], cwd: str | None = None) -> list[str]:
    """``argv`` run in the holder's network and mount namespaces, in ``cwd``."""
    return ["nsenter", f"--target={holder_pid}", "--net", "--mount", f"--wd={cwd or os.getcwd()}", "--", *argv]


def namespace_ids(pid: int) -> tuple[str, str] | None:
    """(net, mnt) namespace identities of a process, or None if it is gone."""
    try:
        return os.readlink(f"/proc/{pid}/ns/net"), os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None
