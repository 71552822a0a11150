"""The steps of a plan: small frozen objects that know how to do, check and describe themselves.

Every step works on a machine path already resolved inside the target, and
mounts onto an fd of it opened again when it runs (offload/mounts/paths.py
says why).  `check` compares it with mountinfo and the filesystem, changing
nothing; `execute` does what is not done yet and registers the undo of
exactly that; `describe()` is the shell equivalent (``--dry-run``).

``layer`` is the step's position among the plan's ``layers`` mounts at the
same path (0 for the first): a later mount may cover an earlier one on
purpose, and an idempotent re-run must recognise both.
"""

from __future__ import annotations

import contextlib
import errno as errno_module
import functools
import os
import shlex
import stat
from collections.abc import Callable
from dataclasses import dataclass

from offload import proc
from offload.errors import MountConflict, MountError, OffloadError
from offload.fdinfo import closing
from offload.mounts import mountinfo, paths, syscalls
from offload.mounts.mountinfo import MountEntry

# States a step can be in, as `offload status` prints them.
MOUNTED = "mounted"  # a mount step that is in place
PRESENT = "present"  # a node or link that is in place
MISSING = "missing"
WRONG = "wrong"
SKIPPED = "skipped"

# What `execute` reports.
DONE = "done"
ALREADY = "already"

#: How userspace qtfs mounts show in mountinfo (FUSE, subtype qtfs) and the
#: kernel module's filesystem type.
QTFS_FSTYPES = ("fuse.qtfs", "qtfs")


def is_qtfs(entry: MountEntry) -> bool:
    """A qtfs mount: the module's, or a FUSE one the qtfs client made (by subtype or source name)."""
    return entry.fstype in QTFS_FSTYPES or (entry.fstype.startswith("fuse") and "qtfs" in entry.source)


def is_userspace_qtfs(entry: MountEntry) -> bool:
    """A qtfs client's own FUSE mount (a bind of something inside one has another root)."""
    return entry.fstype.startswith("fuse") and is_qtfs(entry) and entry.root == "/"


class Direct:
    """What steps run in: on their own (the rootfs builder's), paths below /, nothing recorded or undone.

    A prepare run (`orchestrator._Run`) is the other: it records every
    mount by its id and registers the undo of each change.
    """

    #: The target every step's path lies below.
    target = "/"

    def entries(self) -> tuple[MountEntry, ...]:
        return mountinfo.read()

    def attach(self, mount_fd: int, target_fd: int, path: str) -> None:
        """Attach the detached mount ``mount_fd`` onto ``target_fd`` (a prepare run records it and its undo)."""
        syscalls.attach(mount_fd, target_fd, path)

    def record(self, entry: MountEntry) -> None:
        """Record a mount a program made (teardown finds it by its id)."""

    def on_undo(self, what: str, undo: Callable[[], object]) -> None:
        """Register the undo of a change just made."""

    def run(self, argv: list[str]) -> tuple[int, str]:
        try:
            result = proc.run(argv, check=False)
        except OffloadError as exc:  # the program is not there
            return 127, str(exc)
        return result.returncode, (result.stderr or "") + (result.stdout or "")


@dataclass(frozen=True)
class Outcome:
    state: str  # check: MOUNTED, PRESENT, MISSING, WRONG or SKIPPED; execute: DONE, ALREADY or SKIPPED
    detail: str = ""


_q = shlex.quote


def _conflict(path: str, detail: str) -> MountConflict:
    return MountConflict(
        f"{path}: {detail}; unmount it first (offload teardown, or umount {_q(path)}) or change the plan", path=path
    )


@dataclass(frozen=True, kw_only=True)
class Step:
    path: str
    layer: int = 0
    layers: int = 1  # how many of the plan's mounts stack at this path

    @property
    def mountpoint(self) -> str | None:
        """The path this step mounts on, if it is a mount."""
        return None

    @property
    def needs(self) -> tuple[str, ...]:
        """Other paths this step reads (a bind's source): mounts on them must come first."""
        return ()

    @property
    def what(self) -> str:
        raise NotImplementedError

    def describe(self) -> list[str]:
        raise NotImplementedError

    def check(self, entries: tuple[MountEntry, ...]) -> Outcome:
        raise NotImplementedError

    def execute(self, ctx: Direct) -> Outcome:
        raise NotImplementedError

    def _in_place(self, entries: tuple[MountEntry, ...]) -> bool:
        """True when what this step makes is there already; raise when something else is."""
        found = self.check(entries)
        if found.state == WRONG:
            raise _conflict(self.path, found.detail)
        return found.state in (MOUNTED, PRESENT)


class _MountStep(Step):
    """Shared logic of the steps that mount something at ``path``."""

    @property
    def mountpoint(self) -> str | None:
        return self.path

    def mismatch(self, entry: MountEntry, entries: tuple[MountEntry, ...]) -> str | None:
        raise NotImplementedError

    def check(self, entries: tuple[MountEntry, ...]) -> Outcome:
        stack = mountinfo.stack_at(entries, self.path)
        if len(stack) > self.layers:
            # Something the plan does not make covers the plan's mounts here:
            # whatever is done below it would land on the wrong filesystem.
            top = stack[-1]
            return Outcome(WRONG, f"{top.fstype} ({top.source}) is mounted there on top of the planned mounts")
        if len(stack) <= self.layer:
            return Outcome(MISSING)
        problem = self.mismatch(stack[self.layer], entries)
        return Outcome(WRONG, problem) if problem else Outcome(MOUNTED)


@dataclass(frozen=True, kw_only=True)
class MountOp(_MountStep):
    """mount -t FSTYPE -o OPTIONS SOURCE PATH."""

    fstype: str
    source: str
    options: str = ""
    identity: tuple[str, ...] = ()  # superblock options that must show (cgroup controllers)
    # Directories made inside the new mount before a read-only remount
    # (systemd mounts /sys/fs/cgroup as a read-only tmpfs).
    subdirs: tuple[str, ...] = ()

    @property
    def what(self) -> str:
        if self.identity:
            return f"{self.fstype} ({','.join(self.identity)})"
        return self.fstype

    def _split(self) -> tuple[int, str, bool]:
        flags, data = syscalls.split_options(self.options)
        late_ro = bool(self.subdirs) and bool(flags & syscalls.MS_RDONLY)
        return flags & ~syscalls.MS_RDONLY if late_ro else flags, data, late_ro

    def describe(self) -> list[str]:
        late_ro = self._split()[2]
        words = [w for w in self.options.split(",") if w and not (late_ro and w == "ro")]
        options = f" -o {_q(','.join(words))}" if words else ""
        lines = [f"mkdir -p {_q(self.path)}", f"mount -t {self.fstype}{options} {_q(self.source)} {_q(self.path)}"]
        if self.subdirs:
            lines.append("mkdir -p " + " ".join(_q(os.path.join(self.path, d)) for d in self.subdirs))
        if late_ro:
            lines.append(f"mount -o remount,bind,ro {_q(self.path)}")
        return lines

    def mismatch(self, entry: MountEntry, entries: tuple[MountEntry, ...]) -> str | None:
        if entry.fstype != self.fstype or entry.source != self.source:
            return f"{entry.fstype} ({entry.source}) is mounted there, expected {self.fstype} ({self.source})"
        lacking = [o for o in self.identity if o not in entry.super_options]
        if lacking:
            return f"{entry.fstype} with {','.join(entry.filesystem_data)} is mounted there, expected {','.join(self.identity)}"
        return None

    def execute(self, ctx: Direct) -> Outcome:
        if self._in_place(ctx.entries()):
            return Outcome(ALREADY)
        flags, data, late_ro = self._split()
        with (
            closing(paths.open_inside(ctx.target, self.path, make=paths.DIRECTORY)) as target,
            closing(syscalls.new_mount(self.source, self.fstype, flags, data, at=self.path)) as mount,
        ):
            for sub in self.subdirs:
                # Made in the detached mount: nothing outside it can be reached from there.
                with contextlib.suppress(FileExistsError):
                    os.mkdir(sub, 0o755, dir_fd=mount)
            if late_ro:
                syscalls.set_attributes(mount, syscalls.MOUNT_ATTR_RDONLY)
            ctx.attach(mount, target, self.path)
        return Outcome(DONE)


@dataclass(frozen=True, kw_only=True)
class BindOp(_MountStep):
    """mount --bind SOURCE PATH (``recursive``: --rbind), optionally read-only."""

    source: str  # a machine path
    recursive: bool = False
    readonly: bool = False
    missing: str = "error"  # source missing: "error", "skip", "create"
    create_target: bool = True  # False where the target is in procfs/sysfs and cannot be made
    #: Non-empty: ``source`` lies below this directory (a mount of the host's
    #: files) and is opened beneath it without following any symlink: what a
    #: peer serves never chooses which of this machine's files is bound.
    beneath: str = ""

    @property
    def needs(self) -> tuple[str, ...]:
        return (self.source,)

    @property
    def what(self) -> str:
        return f"{'rbind' if self.recursive else 'bind'}{' ro' if self.readonly else ''} {self.source}"

    def describe(self) -> list[str]:
        lines = []
        if self.missing == "create":
            lines.append(f"mkdir -p {_q(self.source)}")
        if self.create_target:
            if os.path.isdir(self.source) or not os.path.exists(self.source):
                lines.append(f"mkdir -p {_q(self.path)}")
            else:
                lines.append(f"mkdir -p {_q(os.path.dirname(self.path))} && touch {_q(self.path)}")
        lines.append(f"mount --{'rbind' if self.recursive else 'bind'} {_q(self.source)} {_q(self.path)}")
        if self.readonly:
            lines.append(f"mount -o remount,bind,ro {_q(self.path)}")
        # What execute() skips, the shell skips too.
        tests = [f"[ -e {_q(self.source)} ]"] if self.missing == "skip" else []
        tests += [] if self.create_target else [f"[ -e {_q(self.path)} ]"]
        if tests:
            return [f"if {' && '.join(tests)}; then {'; '.join(lines)}; fi"]
        return lines

    def mismatch(self, entry: MountEntry, entries: tuple[MountEntry, ...]) -> str | None:
        expected = mountinfo.bind_root(entries, os.path.realpath(self.source))
        if expected != (entry.device, entry.root):
            shown = entry.source if entry.root == "/" else f"{entry.source}[{entry.root}]"
            return f"{entry.fstype} {shown} is mounted there, expected a bind of {self.source}"
        if self.readonly and "ro" not in entry.options:
            return f"the bind of {self.source} there is read-write, expected read-only"
        return None

    def check(self, entries: tuple[MountEntry, ...]) -> Outcome:
        found = super().check(entries)
        if found.state == MISSING and self.missing == "skip" and not os.path.exists(self.source):
            return Outcome(SKIPPED, f"{self.source} does not exist")
        return found

    def _open_source(self) -> int | str:
        """An O_PATH fd of the source, or why the bind is skipped (missing and it may be, or refused)."""
        try:
            if self.beneath:
                return paths.open_inside(self.beneath, self.source)
            # The operator's own path on this machine (/var/run/rexec may be a link to /run/rexec).
            return os.open(self.source, os.O_PATH | os.O_CLOEXEC)
        except (MountError, FileNotFoundError) as exc:
            if self.beneath and exc.errno == errno_module.ELOOP:
                # The host serves a symlink where a fact should be: not
                # followed, not bound (the target keeps this machine's own).
                return f"{self.source} is a symlink on the host: {exc}"
            if exc.errno != errno_module.ENOENT:
                raise
        if self.missing == "skip":
            return f"{self.source} does not exist"
        if self.missing == "error":
            raise MountError(f"bind source {self.source} does not exist", path=self.source, errno=errno_module.ENOENT)
        os.makedirs(self.source, mode=0o755, exist_ok=True)
        return os.open(self.source, os.O_PATH | os.O_CLOEXEC)

    def execute(self, ctx: Direct) -> Outcome:
        source = self._open_source()
        if isinstance(source, str):
            return Outcome(SKIPPED, source)
        with closing(source):
            if self._in_place(ctx.entries()):
                return Outcome(ALREADY)
            is_dir = stat.S_ISDIR(os.fstat(source).st_mode)
            make = "" if not self.create_target else paths.DIRECTORY if is_dir else paths.FILE
            try:
                target = paths.open_inside(ctx.target, self.path, make=make)
            except MountError as exc:
                if exc.errno == errno_module.ENOENT and not self.create_target:
                    return Outcome(SKIPPED, f"{self.path} does not exist here")
                raise
            with (
                closing(target),
                closing(syscalls.clone_tree(source, recursive=self.recursive)) as tree,
            ):
                if self.readonly:
                    # Set on the detached bind: it is never writable, not even for an instant.
                    syscalls.set_attributes(tree, syscalls.MOUNT_ATTR_RDONLY, recursive=self.recursive)
                ctx.attach(tree, target, self.path)
        return Outcome(DONE)


@dataclass(frozen=True, kw_only=True)
class QtfsMount(_MountStep):
    """The userspace qtfs client: ``qtfs mount [--proc|--sys] ADDR:REMOTE PATH`` (it stays in the background)."""

    address: str
    remote: str
    mode: str = ""  # "", "proc", "sys" or "cgroup"
    pki: str = "/etc/offload/pki"
    insecure: bool = False
    command: str = ""  # "": this installation's qtfs (never looked up through PATH)
    pidmap: str = ""  # cgroup mode: rexec's pidmap directory, where stand-in pids are translated

    @property
    def what(self) -> str:
        return f"qtfs{' --' + self.mode if self.mode else ''} {self.address}:{self.remote}"

    def argv(self) -> list[str]:
        security = ["--insecure"] if self.insecure else ["--pki", self.pki]
        mode = [f"--{self.mode}"] if self.mode else []
        if self.mode == "cgroup":
            mode.append(self.pidmap)
        program = [self.command] if self.command else proc.program("qtfs")
        return [*program, "mount", *mode, *security, f"{self.address}:{self.remote}", self.path]

    def describe(self) -> list[str]:
        return [f"mkdir -p {_q(self.path)}", shlex.join(self.argv())]

    def mismatch(self, entry: MountEntry, entries: tuple[MountEntry, ...]) -> str | None:
        if is_qtfs(entry):
            return None
        return f"{entry.fstype} ({entry.source}) is mounted there, expected qtfs from {self.address}:{self.remote}"

    def execute(self, ctx: Direct) -> Outcome:
        if self._in_place(ctx.entries()):
            return Outcome(ALREADY)
        # The client mounts by path (libfuse): the path is checked for
        # symlinks right before, and the mount found afterwards must sit on
        # the very directory checked.  Inside a qtfs mount no symlink is ever
        # followed (nosymfollow), so what the host serves cannot move it.
        with closing(paths.open_inside(ctx.target, self.path, make=paths.DIRECTORY)) as target:
            status, output = ctx.run(self.argv())
            if status != 0:
                raise MountError(
                    f"{shlex.join(self.argv())} failed with status {status}"
                    + (f": {output.strip()}" if output else ""),
                    path=self.path,
                )
            ctx.on_undo(f"qtfs umount {self.path}", lambda: _qtfs_umount(self.path))
            entries = ctx.entries()
            stack = mountinfo.stack_at(entries, self.path)
            if self.check(entries).state != MOUNTED or stack[-1].parent_id != syscalls.mount_id(target):
                raise MountError(f"qtfs returned but nothing is mounted at {self.path}", path=self.path)
            ctx.record(stack[-1])
        return Outcome(DONE)


def _qtfs_umount(path: str) -> None:
    # Unmounts and waits until the background client has ended.
    from offload.qtfs import unmount  # its fusectl helpers: only qtfs steps load them

    unmount.umount(path)


class _MadeStep(Step):
    """Shared logic of the steps that make a file at ``path``: nothing over something else, once."""

    def wrong(self, info: os.stat_result) -> str | None:
        """What is wrong with the file found at ``path``; None if it is the one this step makes."""
        raise NotImplementedError

    def make(self, ctx: Direct) -> None:
        raise NotImplementedError

    def check(self, entries: tuple[MountEntry, ...]) -> Outcome:
        try:
            info = os.lstat(self.path)
        except FileNotFoundError:
            return Outcome(MISSING)
        problem = self.wrong(info)
        return Outcome(WRONG, problem) if problem else Outcome(PRESENT)

    def execute(self, ctx: Direct) -> Outcome:
        if self._in_place(()):
            return Outcome(ALREADY)
        self.make(ctx)
        return Outcome(DONE)


@dataclass(frozen=True, kw_only=True)
class MakeNode(_MadeStep):
    """mknod PATH c MAJOR MINOR, with the machine's mode and owner."""

    major: int
    minor: int
    mode: int
    uid: int = 0
    gid: int = 0
    make_parent: bool = False  # the node is in a subdirectory (net/tun) that a fresh /dev lacks

    @property
    def what(self) -> str:
        return f"mknod c {self.major}:{self.minor}"

    def describe(self) -> list[str]:
        lines = [f"mkdir -p {_q(os.path.dirname(self.path))}"] if self.make_parent else []
        lines.append(f"mknod -m {self.mode:04o} {_q(self.path)} c {self.major} {self.minor}")
        if (self.uid, self.gid) != (0, 0):
            lines.append(f"chown {self.uid}:{self.gid} {_q(self.path)}")
        return lines

    def wrong(self, info: os.stat_result) -> str | None:
        if stat.S_ISCHR(info.st_mode) and info.st_rdev == os.makedev(self.major, self.minor):
            return None
        return f"is not the character device {self.major}:{self.minor}"

    def make(self, ctx: Direct) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        syscalls.mknod_char(self.path, self.major, self.minor, self.mode)
        ctx.on_undo(f"rm {self.path}", lambda: os.unlink(self.path))
        os.chown(self.path, self.uid, self.gid)


@dataclass(frozen=True, kw_only=True)
class MakeLink(_MadeStep):
    """ln -s LINK PATH."""

    link: str

    @property
    def what(self) -> str:
        return f"symlink -> {self.link}"

    def describe(self) -> list[str]:
        return [f"ln -s {_q(self.link)} {_q(self.path)}"]

    def wrong(self, info: os.stat_result) -> str | None:
        if not stat.S_ISLNK(info.st_mode):
            return "is not a symlink"
        current = os.readlink(self.path)
        return None if current == self.link else f"points to {current}, expected {self.link}"

    def make(self, ctx: Direct) -> None:
        os.symlink(self.link, self.path)
        ctx.on_undo(f"rm {self.path}", lambda: os.unlink(self.path))


@dataclass(frozen=True, kw_only=True)
class MakeDir(_MadeStep):
    """mkdir -m MODE PATH (a directory programs expect in a fresh tmpfs, such as /run/lock)."""

    mode: int

    @property
    def what(self) -> str:
        return f"mkdir -m {self.mode:04o}"

    def describe(self) -> list[str]:
        return [f"mkdir -m {self.mode:04o} {_q(self.path)}"]

    def wrong(self, info: os.stat_result) -> str | None:
        return None if stat.S_ISDIR(info.st_mode) else "is not a directory"

    def make(self, ctx: Direct) -> None:
        os.mkdir(self.path)
        os.chmod(self.path, self.mode)  # mkdir's mode passes through the umask
        ctx.on_undo(f"rmdir {self.path}", lambda: os.rmdir(self.path))


@dataclass(frozen=True, kw_only=True)
class WriteFile(Step):
    """A small file the target's programs read (the shim's cgroup partitions), written whole.

    Written beneath the target without following a symlink, under a
    temporary name and renamed into place, so a reader sees the old text or
    the new.  It is prepare's own: a different text there is replaced.
    """

    content: str
    mode: int = 0o644

    @property
    def what(self) -> str:
        return f"write {os.path.basename(self.path)}"

    def describe(self) -> list[str]:
        return [f"mkdir -p {_q(os.path.dirname(self.path))}", f"printf '%s\\n' {_q(self.content)} > {_q(self.path)}"]

    def check(self, entries: tuple[MountEntry, ...]) -> Outcome:
        return self._compare(os.path.basename(self.path), None)

    def _compare(self, name: str, folder: int | None) -> Outcome:
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            with closing(os.open(self.path if folder is None else name, flags, dir_fd=folder)) as fd:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    return Outcome(WRONG, "is not a regular file")
                found = os.read(fd, len(self.text) + 1)
        except FileNotFoundError:
            return Outcome(MISSING)
        except OSError as exc:
            return Outcome(WRONG, f"cannot be read: {exc.strerror}")
        return Outcome(PRESENT) if found == self.text else Outcome(WRONG, "holds other text")

    @property
    def text(self) -> bytes:
        return f"{self.content}\n".encode()

    def execute(self, ctx: Direct) -> Outcome:
        name = os.path.basename(self.path)
        with closing(paths.open_inside(ctx.target, os.path.dirname(self.path), make=paths.DIRECTORY)) as folder:
            if self._compare(name, folder).state == PRESENT:
                return Outcome(ALREADY)
            temporary = f".{name}.new"
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary, dir_fd=folder)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            with closing(os.open(temporary, flags, self.mode, dir_fd=folder)) as fd:
                os.fchmod(fd, self.mode)
                os.write(fd, self.text)
            os.rename(temporary, name, src_dir_fd=folder, dst_dir_fd=folder)
        ctx.on_undo(f"rm {self.path}", functools.partial(remove_inside, ctx.target, self.path))
        return Outcome(DONE)


def remove_inside(target: str, path: str) -> bool:
    """Remove the file ``path`` (a machine path below ``target``), its directory reached without a symlink; True if it was there."""
    try:
        folder = paths.open_inside(target, os.path.dirname(path))
    except MountError as exc:
        if exc.errno == errno_module.ENOENT:
            return False
        raise
    with closing(folder), contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.basename(path), dir_fd=folder)
        return True
    return False


@dataclass(frozen=True, kw_only=True)
class Skipped(Step):
    """A step the plan cannot do on this machine, kept so that output says why."""

    name: str
    reason: str

    @property
    def what(self) -> str:
        return self.name

    def describe(self) -> list[str]:
        return [f"# skipped {self.name} on {self.path}: {self.reason}"]

    def check(self, entries: tuple[MountEntry, ...]) -> Outcome:
        return Outcome(SKIPPED, self.reason)

    def execute(self, ctx: Direct) -> Outcome:
        return Outcome(SKIPPED, self.reason)
