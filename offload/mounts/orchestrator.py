"""Carrying out a plan, taking everything down, and comparing plan with reality.

`prepare` runs the steps in order inside an ExitStack: each step that
changed something registers its undo, and a failure anywhere unwinds
exactly those, newest first, before the error goes up (naming the step and
the kernel's errno).  Every mount it makes is recorded by its mount id
(offload.mounts.records).  `teardown` does not trust any plan: it takes
down what `targets_below` finds, newest mount first (so children before
parents, and a covering mount before what it covers), and a userspace qtfs
mount with its client: it returns once the clients have ended.
"""

from __future__ import annotations

import contextlib
import errno as errno_module
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from offload.errors import MountBusy, MountError, OffloadError, StepFailed
from offload.fdinfo import closing
from offload.mounts import mountinfo, ops, paths, records, syscalls
from offload.mounts.mountinfo import MountEntry
from offload.mounts.plan import PUBLISHED_FILES, Plan
from offload.prefix import is_under

Report = Callable[[str], None]


def _quiet(line: str) -> None:
    pass


class _Run(ops.Direct):
    """The context of one prepare run: its mounts recorded, its changes undone on failure."""

    def __init__(self, stack: contextlib.ExitStack, report: Report, target: str) -> None:
        self.stack = stack
        self.report = report
        self.target = target
        self.undone: list[str] = []
        self.undo_failures: list[str] = []
        # What earlier runs made and is still there stays recorded.
        self.made = records.present(target, mountinfo.read())

    def attach(self, mount_fd: int, target_fd: int, path: str) -> None:
        mount_id = syscalls.mount_id(mount_fd)
        syscalls.attach(mount_fd, target_fd, path)
        entry = next((entry for entry in mountinfo.read() if entry.mount_id == mount_id), None)
        if entry is None:  # cannot be: it was attached in our namespace a moment ago
            raise MountError(f"the mount on {path} (id {mount_id}) is not in mountinfo", path=path)
        self.record(entry)

        def undo() -> None:
            unmount_exactly(entry)
            self.made.remove(entry)
            records.save(self.target, self.made)

        self.on_undo(f"umount {path}", undo)

    def record(self, entry: MountEntry) -> None:
        self.made.append(entry)
        records.save(self.target, self.made)

    def on_undo(self, what: str, undo: Callable[[], object]) -> None:
        def guarded() -> None:
            try:
                undo()
            except (OffloadError, OSError) as exc:
                # Keep unwinding: the rest can still be undone.
                self.undo_failures.append(f"{what}: {exc}")
                self.report(f"rollback: could not {what}: {exc}")
            else:
                self.undone.append(what)
                self.report(f"rollback: {what}")

        self.stack.callback(guarded)


@dataclass
class Summary:
    done: int = 0  # a count per outcome of Step.execute, named as ops names it
    already: int = 0
    skipped: int = 0
    seconds: float = 0.0


@contextlib.contextmanager
def locked(target: str, report: Report = _quiet) -> Iterator[None]:
    """One prepare or teardown of ``target`` at a time (flock on the directory itself)."""
    import fcntl

    with closing(os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)) as fd:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            report(f"waiting for another prepare or teardown of {target} to finish")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield


def prepare(plan: Plan, *, report: Report = _quiet, fail_at: int | None = None) -> Summary:
    """Carry out ``plan``; on failure undo this run's changes and raise StepFailed.

    ``fail_at`` (1-based) makes that step fail before it runs: the tests use
    it to prove that a failure at any step leaves nothing behind.
    """
    if not os.path.isdir(plan.target):
        raise MountError(
            f"target {plan.target} does not exist (build it first: offload rootfs build)", path=plan.target
        )
    summary = Summary()
    started = time.monotonic()
    total = len(plan.steps)
    width = len(str(total))
    # An exception that is not a step failure (KeyboardInterrupt, SIGTERM
    # turned into one by the CLI) unwinds the stack too: nothing half-done stays.
    with locked(plan.target, report), contextlib.ExitStack() as stack:
        run = _Run(stack, report, plan.target)
        for number, step in enumerate(plan.steps, 1):
            where = f"[{number:>{width}}/{total}]"
            try:
                if number == fail_at:
                    raise MountError(
                        f"injected failure before {step.what} on {step.path} (ECANCELED)",
                        path=step.path,
                        errno=errno_module.ECANCELED,
                    )
                result = step.execute(run)
            except (MountError, OSError) as exc:
                failure = _as_mount_error(exc, step)
                report(f"{where} FAILED  {step.what} on {step.path}: {failure}")
                stack.close()  # undo, newest first, before reporting
                undone = len(run.undone)
                message = f"step {number}/{total} ({step.what} on {step.path}) failed: {failure}"
                message += f"; undid the {undone} change{'s' if undone != 1 else ''} this run had made"
                if run.undo_failures:
                    message += "; could not undo: " + "; ".join(run.undo_failures)
                raise StepFailed(message, path=failure.path, errno=failure.errno) from exc
            setattr(summary, result.state, getattr(summary, result.state) + 1)
            verb = ("mounted" if step.mountpoint else "created") if result.state == ops.DONE else result.state
            detail = f": {result.detail}" if result.detail else ""
            report(f"{where} {verb:<8} {step.what} on {step.path}{detail}")
        stack.pop_all()  # success: the mounts stay
    summary.seconds = time.monotonic() - started
    return summary


def _as_mount_error(exc: BaseException, step: ops.Step) -> MountError:
    if isinstance(exc, MountError):
        return exc
    assert isinstance(exc, OSError)
    path = exc.filename if isinstance(exc.filename, str) else step.path
    return syscalls.failure(path, path, exc.errno or errno_module.EIO)


# Teardown -------------------------------------------------------------------


@dataclass
class TeardownSummary:
    unmounted: int = 0
    lazily: int = 0
    holders: list[str] = field(default_factory=list)
    clients: list[int] = field(default_factory=list)  # the qtfs clients that ended with their mounts
    seconds: float = 0.0


def targets_below(target: str, entries: tuple[MountEntry, ...]) -> list[MountEntry]:
    """The mounts to take down, in the order to take them down (newest first).

    Those below the target, and those prepare recorded wherever they are
    (with whatever is mounted below them), so that a mount a symlink took
    elsewhere is not left behind.
    """
    recorded = {e.mount_id for e in records.with_descendants(records.present(target, entries), entries)}
    return [e for e in reversed(entries) if e.mount_id in recorded or is_under(e.mount_point, target, strict=True)]


def unmount_exactly(entry: MountEntry, flags: int = 0) -> None:
    """Unmount ``entry`` itself: its mount point reached without following a symlink, its id checked.

    EINVAL when another mount covers it now (the caller takes that one first).
    """
    point = entry.mount_point
    with closing(paths.open_inside("/", os.path.dirname(point))) as parent:
        with closing(paths.open_inside("/", point)) as mount:  # closed first: it would keep the mount busy
            covered = syscalls.mount_id(mount) != entry.mount_id
        if covered:
            raise MountError(
                f"{point}: another mount covers mount {entry.mount_id}", path=point, errno=errno_module.EINVAL
            )
        syscalls.umount_at(parent, os.path.basename(point), point, flags)


def teardown_commands(target: str) -> list[str]:
    import shlex

    return [f"umount {shlex.quote(e.mount_point)}" for e in targets_below(target, mountinfo.read())]


def teardown(target: str, *, force: bool = False, report: Report = _quiet) -> TeardownSummary:
    """Unmount everything below ``target`` and check that nothing is left.

    A busy mount is an error naming the processes that hold it, unless
    ``force``: then it is detached lazily (it disappears from the tree now
    and is freed when the last user lets go) and the holders are reported;
    a busy qtfs mount's client is ended all the same (their files there fail).
    """
    target = os.path.realpath(target)
    if not os.path.isdir(target):
        return TeardownSummary()
    with locked(target, report):
        return _teardown(target, force, report)


def _remove_published(target: str, report: Report) -> None:
    """Remove the files prepare wrote into the target (`plan.PUBLISHED_FILES`), wherever they are now."""
    for path in PUBLISHED_FILES:
        try:
            machine_path = paths.resolve(target, path)
            if ops.remove_inside(target, machine_path):
                report(f"removed {machine_path}")
        except (OffloadError, OSError) as exc:
            report(f"could not remove {path} in {target}: {exc}")


def _teardown(target: str, force: bool, report: Report) -> TeardownSummary:
    summary = TeardownSummary()
    started = time.monotonic()
    busy: list[MountBusy] = []
    # Before the mounts go (the file may be on the target's /run tmpfs) and
    # after (one written while /run was not mounted there).
    _remove_published(target, report)
    # Repeat while a pass makes progress: a mount that could not be reached
    # by its path (covered by another one that is gone now) gets its turn.
    for _ in range(8):
        progress = False
        blocked: set[str] = set()
        for entry in targets_below(target, mountinfo.read()):
            point = entry.mount_point
            if any(is_under(b, point) for b in blocked):
                continue  # a busy mount below it is still there
            try:
                ended = _unmount_one(entry, summary)
            except MountError as exc:
                if exc.errno == errno_module.EBUSY:
                    holders = holders_of(point)
                    if force:
                        ended = _unmount_one(entry, summary, lazy=True)
                        summary.lazily += 1
                        summary.holders += holders
                        held = ", ".join(holders) or "unknown"
                        if ended:
                            # The connection was aborted: nothing serves these files any more.
                            report(f"detached {point} (busy, held by: {held}){ended}; their files there now fail")
                        else:
                            report(f"detached {point} (busy, freed when released by: {held})")
                        progress = True
                        continue
                    blocked.add(point)
                    busy.append(_busy_error(point, holders))
                    continue
                if exc.errno in (errno_module.EINVAL, errno_module.ENOENT):
                    continue  # not reachable now; the next pass may get it
                raise
            summary.unmounted += 1
            report(f"unmounted {point} ({entry.fstype}){ended}")
            progress = True
        if busy or not progress:
            break
    if busy:  # one error naming every busy mount (the first one's path)
        raise MountBusy(
            "; ".join(str(b) for b in busy),
            path=busy[0].path,
            errno=errno_module.EBUSY,
            holders=tuple(h for b in busy for h in b.holders),
        )
    left = targets_below(target, mountinfo.read())
    if left:
        listing = ", ".join(f"{e.mount_point} ({e.fstype})" for e in left)
        raise MountError(f"still mounted below {target} after teardown: {listing}", path=left[0].mount_point)
    _remove_published(target, report)
    records.save(target, [])
    summary.seconds = time.monotonic() - started
    return summary


def _unmount_one(entry: MountEntry, summary: TeardownSummary, *, lazy: bool = False) -> str:
    """Unmount ``entry`` (``lazy``: detach it); what else ended with it, for the report."""
    if ops.is_userspace_qtfs(entry):
        from offload.qtfs import unmount  # its fusectl helpers: only qtfs mounts load them

        ended = unmount.umount(entry.mount_point, lazy=lazy)
        if ended.pid is not None:
            summary.clients.append(ended.pid)
        return f"; {ended}"
    unmount_exactly(entry, syscalls.MNT_DETACH if lazy else 0)
    return ""


def _busy_error(point: str, holders: list[str]) -> MountBusy:
    held = f"; held by {', '.join(holders)}" if holders else " (no process found holding it: a mount below it?)"
    return MountBusy(
        f"cannot unmount {point}: {os.strerror(errno_module.EBUSY)} (EBUSY){held}; "
        "stop them, or use --force to detach it lazily",
        path=point,
        errno=errno_module.EBUSY,
        holders=tuple(holders),
    )


def holders_of(point: str) -> list[str]:
    """Processes whose cwd, root, executable or open files lie under ``point``: "pid 12 (sleep: cwd)"."""
    import psutil

    found = []
    for process in psutil.process_iter(["pid", "name"]):
        uses: list[str] = []
        try:
            if is_under(process.cwd(), point):
                uses.append("cwd")
            if is_under(os.readlink(f"/proc/{process.pid}/root"), point):
                uses.append("root")
            exe = process.exe()
            if exe and is_under(exe, point):
                uses.append("exe")
            if any(is_under(f.path, point) for f in process.open_files()):
                uses.append("open files")
        except (psutil.Error, OSError):
            pass  # gone, or a kernel thread
        if uses:
            me = ", this command" if process.pid == os.getpid() else ""
            found.append(f"pid {process.pid} ({process.info['name']}: {', '.join(uses)}{me})")
    return found


# Status ---------------------------------------------------------------------


@dataclass(frozen=True)
class StepStatus:
    state: str
    detail: str = ""
    path: str = ""
    what: str = ""


EXTRA = "extra"


def status(plan: Plan) -> list[StepStatus]:
    entries = mountinfo.read()
    result = []
    claimed: set[tuple[str, int]] = set()
    for step in plan.steps:
        found = step.check(entries)
        if step.mountpoint and found.state in (ops.MOUNTED, ops.WRONG):
            claimed.add((step.mountpoint, step.layer))
        result.append(StepStatus(found.state, found.detail, step.path, step.what))
    layers: Counter[str] = Counter()
    for entry in mountinfo.under(entries, plan.target):
        if (entry.mount_point, layers[entry.mount_point]) not in claimed:
            result.append(StepStatus(EXTRA, "not in the plan", entry.mount_point, f"{entry.fstype} ({entry.source})"))
        layers[entry.mount_point] += 1
    return result
