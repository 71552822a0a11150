"""The base trees: overlay of the DPU's root, a copy of it, debootstrap, or a qcow2 image.

Each function makes the base at a path and says what it did; build.py
decides where (TARGET itself for overlay, a staging directory for the
others) and installs offload's files afterwards.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING

from offload import proc
from offload.errors import MountError, RootfsError
from offload.mounts import mountinfo, ops, syscalls
from offload.mounts.mountinfo import MountEntry
from offload.prefix import is_under
from offload.rootfs_builder import partitions
from offload.rootfs_builder.copy import PSEUDO, Copier
from offload.rootfs_builder.layout import EXCLUDED, Layout, Say

if TYPE_CHECKING:
    from subprocess import Popen

DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"


# -- the machine's mounts --------------------------------------------------------


def _holds_no_system(entry: MountEntry) -> bool:
    """A pseudo or run-time filesystem, or a FUSE mount: no part of the system lies there."""
    return entry.fstype in PSEUDO or entry.fstype.startswith("fuse")


def content_mounts(entries: Iterable[MountEntry], root: str, skip: list[str]) -> list[str]:
    """Filesystems below ``root`` that hold part of the system (/usr, /var, /opt on their own disks).

    An overlay's lower layer, like a walk of one directory tree, sees only
    the filesystem mounted at ``root``: every other filesystem shows up as
    its (usually empty) mount point.  Pseudo and run-time filesystems, and
    anything under the excluded directories, are not content.  Parents first.
    """
    hidden = [os.path.join(root, name) for name in EXCLUDED] + skip
    points = {
        e.mount_point
        for e in entries
        if is_under(e.mount_point, root, strict=True)
        and not _holds_no_system(e)
        and not any(is_under(e.mount_point, h) for h in hidden)
    }
    return sorted(points, key=lambda p: (p.count("/"), p))


# -- overlay -----------------------------------------------------------------------

# Overlay's option parser splits on ',' and lowerdir on ':'; it knows '\\' escapes
# but mount(8) and humans do not agree on them, so such paths are refused.
_OVERLAY_UNSAFE = (",", ":", "\\")


def overlay(lower: str, upper: str, work: str, target: str) -> ops.MountOp:
    """The step that mounts overlay on ``target``: read-only ``lower``, writable ``upper`` (``work`` on the same fs).

    Its check knows the overlay by its upper layer.
    """
    for path in (lower, upper, work):
        if any(c in path for c in _OVERLAY_UNSAFE):
            raise MountError(f"overlay layer path {path!r} contains one of , : \\", path=path)
    return ops.MountOp(
        path=os.path.realpath(target),
        fstype="overlay",
        source="overlay",
        options=f"lowerdir={lower},upperdir={upper},workdir={work}",
        identity=(f"upperdir={upper}",),
    )


def _mirror_dirs(lower: Path, upper: Path, relative: Path) -> None:
    """Create ``upper/relative`` with each component's owner and mode taken from ``lower``."""
    current_lower, current_upper = lower, upper
    for part in relative.parts:
        current_lower, current_upper = current_lower / part, current_upper / part
        if current_upper.is_dir():
            continue
        current_upper.mkdir()
        with contextlib.suppress(FileNotFoundError):
            info = os.stat(current_lower)
            os.chown(current_upper, info.st_uid, info.st_gid)
            os.chmod(current_upper, info.st_mode & 0o7777)


def overlay_layers(layout: Layout, lower: str, nested: list[str], *, make: bool = False) -> list[ops.MountOp]:
    """The root overlay on TARGET, then one per content filesystem below ``lower`` (parents first).

    ``make``: create the upper and work directories (idempotent).
    """
    layers = []
    for point in [lower, *nested]:
        relative = os.path.relpath(point, lower)
        key = layout.nested / relative.replace("/", "%")
        upper, work = (layout.upper, layout.work) if point == lower else (key / "upper", key / "work")
        if make:
            upper.mkdir(parents=True, exist_ok=True)
            work.mkdir(parents=True, exist_ok=True)
        layers.append(overlay(point, str(upper), str(work), os.path.normpath(layout.target / relative)))
    return layers


def prepare_overlay(layout: Layout, lower: str, say: Say) -> tuple[list[ops.MountOp], list[str]]:
    """Create the layers (idempotent); the overlays to mount, in order, and the nested lower layers."""
    skip = [str(path) for path in (layout.target, layout.upper, layout.work, layout.nested)]
    nested = content_mounts(mountinfo.read(), lower, skip)
    layers = overlay_layers(layout, lower, nested, make=True)
    upper, root = layout.upper, Path(lower)
    # The directories copy mode leaves out are empty here too: the mount
    # orchestrator mounts proc, sys, a private /dev, /run and /tmp afresh.
    for name in EXCLUDED:
        if (root / name).is_dir() and not (upper / name).exists():
            _mirror_dirs(root, upper, Path(name))
            os.setxattr(upper / name, "trusted.overlay.opaque", b"y")  # hides what the lower layer has there
    # The rootfs's own layers seen from inside it would be loops (ELOOP):
    # whiteouts hide them unless an excluded directory already does.
    for path in skip:
        relative = os.path.relpath(path, lower)
        if relative.startswith("..") or relative.split("/")[0] in EXCLUDED or not os.path.lexists(path):
            continue
        _mirror_dirs(root, upper, Path(relative).parent)
        if not os.path.lexists(upper / relative):  # left by an interrupted build
            syscalls.mknod_char(str(upper / relative), 0, 0, 0o000)  # a 0/0 character device: absent when merged
    for point in nested:
        say(f"{point} is a filesystem of its own: it gets an overlay of its own in the rootfs")
    return layers, nested


# -- copy ---------------------------------------------------------------------------


def copy_root(source: Path, dest: Path, layout: Layout, say: Say, *, hardlinks: bool = True) -> None:
    """A copy of ``source`` at ``dest`` (see copy.py), without run-time state or the rootfs itself."""
    root = str(source)
    skip = {os.path.join(root, name) for name in EXCLUDED}
    skip |= {str(layout.target), str(layout.staging), str(layout.upper), str(layout.work)}
    skip |= {e.mount_point for e in mountinfo.under(mountinfo.read(), root) if _holds_no_system(e)}
    say(f"copying {source} to {dest} (leaving out {', '.join('/' + n for n in EXCLUDED)} and the rootfs itself)")
    Copier(source, dest, frozenset(skip), hardlinks=hardlinks, progress=say).run()


# -- debootstrap ------------------------------------------------------------------


def debootstrap(dest: Path, say: Say, *, suite: str = DEBIAN_SUITE, mirror: str = DEBIAN_MIRROR) -> None:
    """A clean Debian minbase; libvirt and python3 are installed afterwards (install.ensure_packages)."""
    argv = ["debootstrap", "--variant=minbase", suite, str(dest), mirror]
    say(f"running {proc.describe(argv)} (about 30 s)")
    _run_with_progress(argv, say, "debootstrap")


def _spawn_logged(argv: list[str], log_file: IO[bytes]) -> Popen[bytes]:
    """``argv`` with stdin from /dev/null and stdout and stderr into ``log_file``."""
    with open(os.devnull, "rb") as null:
        return proc.spawn(argv, stdin=null, stdout=log_file, stderr=log_file)


def _stop(child: Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM, SIGKILL after ``grace`` seconds; always reaped."""
    if child.poll() is None:
        proc.end_pid(child.pid, grace)
    child.wait()


def _run_with_progress(argv: list[str], say: Say, what: str, interval: float = 5.0) -> None:
    """Run ``argv``, passing on its last output line every few seconds; its log tail on failure."""
    with tempfile.TemporaryFile() as output:
        child = _spawn_logged(argv, output)
        started = last = time.monotonic()
        try:
            while child.poll() is None:
                time.sleep(0.2)
                if time.monotonic() - last >= interval:
                    last = time.monotonic()
                    output.seek(0)
                    lines = output.read().decode(errors="replace").strip().splitlines()
                    say(f"{what}: {time.monotonic() - started:.0f} s: {lines[-1] if lines else '...'}")
        finally:
            _stop(child)
        if child.returncode != 0:
            output.seek(0)
            tail = "\n".join(output.read().decode(errors="replace").strip().splitlines()[-15:])
            raise RootfsError(f"{what} failed with status {child.returncode}: {proc.describe(argv)}\n{tail}")


# -- image ------------------------------------------------------------------------------


def image_format(image: Path) -> tuple[str, int]:
    import json

    info = json.loads(proc.run(["qemu-img", "info", "--output=json", str(image)]).stdout)
    return str(info["format"]), int(info["virtual-size"])


@contextlib.contextmanager
def raw_view(image: Path, scratch: Path, say: Say) -> Iterator[str]:
    """The image's disk as raw bytes: the file itself, /dev/nbd0, or a qemu-storage-daemon FUSE export."""
    fmt, size = image_format(image)
    if fmt == "raw":
        yield str(image)
        return
    if Path("/sys/block/nbd0").exists():  # the nbd module is loaded: the reference's way
        say(f"attaching {image} to /dev/nbd0 (qemu-nbd)")
        proc.run(["qemu-nbd", "--read-only", f"--format={fmt}", "--connect=/dev/nbd0", str(image)])
        try:
            yield "/dev/nbd0"
        finally:
            proc.run(["qemu-nbd", "--disconnect", "/dev/nbd0"], check=False)
        return
    # No nbd here: qemu-storage-daemon serves the disk as a raw file over FUSE.
    export = scratch / "disk.raw"
    export.touch()
    argv = [
        "qemu-storage-daemon",
        "--blockdev",
        f"driver=file,node-name=file,filename={_qemu_escape(str(image))},read-only=on",
        "--blockdev",
        f"driver={fmt},node-name=disk,file=file,read-only=on",
        "--export",
        f"type=fuse,id=raw,node-name=disk,mountpoint={_qemu_escape(str(export))},writable=off",
    ]
    say(f"exposing {image} ({fmt}) as a raw file: {proc.describe(argv)}")
    log = scratch / "qsd.log"
    with open(log, "wb") as log_file:
        daemon = _spawn_logged(argv, log_file)
    try:
        deadline = time.monotonic() + 15
        while os.stat(export).st_size != size:
            if daemon.poll() is not None:
                raise RootfsError(
                    f"qemu-storage-daemon exited with status {daemon.returncode}: {log.read_text().strip()}"
                )
            if time.monotonic() > deadline:
                raise RootfsError(f"qemu-storage-daemon did not export {image} within 15 s: {log.read_text().strip()}")
            time.sleep(0.05)
        yield str(export)
    finally:
        # SIGTERM: it ends the export and unmounts it; a FUSE mount left by
        # a daemon that died is unmounted here.
        _stop(daemon)
        if mountinfo.is_mount_point(export):
            syscalls.umount(str(export), syscalls.MNT_DETACH)


def _qemu_escape(value: str) -> str:
    return value.replace(",", ",,")  # QemuOpts: a comma in a value is doubled


def copy_image(image: Path, dest: Path, layout: Layout, say: Say, *, partition: int | None = None) -> str:
    """Copy the root filesystem of ``image`` to ``dest``; returns which partition it was."""
    if not image.is_file():
        raise RootfsError(f"--image {image}: no such file")
    with tempfile.TemporaryDirectory(prefix=".offload-image-", dir=layout.target.parent) as scratch_name:
        scratch = Path(scratch_name)
        with raw_view(image, scratch, say) as raw:
            table = proc.run(["sfdisk", "--json", raw], check=False)
            if table.returncode == 0 and table.stdout.strip():
                part = partitions.choose_root(partitions.parse(table.stdout), partition)
                offset, size, what = part.offset, part.size, part.describe()
            elif partition is not None:
                raise RootfsError(f"{image} has no partition table, so no partition {partition}")
            else:
                offset, size, what = 0, None, "the whole disk (no partition table)"
            say(f"root filesystem of {image}: {what}")
            mount_point = scratch / "root"
            mount_point.mkdir()
            with loop_device(raw, offset=offset, size=size) as device:
                step = ops.MountOp(path=str(mount_point), fstype=_probe_fstype(device), source=device, options="ro")
                step.execute(ops.Direct())
                try:
                    say(f"{device} mounted read-only on {mount_point}")
                    Copier(mount_point, dest, frozenset(), hardlinks=False, progress=say).run()
                finally:
                    try:
                        syscalls.umount(step.path)
                    except MountError:
                        syscalls.umount(step.path, syscalls.MNT_DETACH)
            return what


@contextlib.contextmanager
def loop_device(image: str, *, offset: int = 0, size: int | None = None) -> Iterator[str]:
    """A read-only loop device over ``image`` (from ``offset``, ``size`` bytes); detached on exit."""
    argv = ["losetup", "--find", "--show", "--read-only", "--offset", str(offset)]
    if size is not None:
        argv += ["--sizelimit", str(size)]
    device = proc.run([*argv, image]).stdout.strip()
    try:
        yield device
    finally:
        proc.run(["losetup", "--detach", device], check=False)


def _probe_fstype(device: str) -> str:
    # -p probes the device itself: without it blkid may answer from its
    # cache file, which remembers what an earlier user of the same loop
    # device held.
    result = proc.run(["blkid", "-p", "-o", "value", "-s", "TYPE", device], check=False)
    fstype = result.stdout.strip()
    if result.returncode != 0 or not fstype:
        raise MountError(f"no filesystem found on {device} (blkid)", path=device)
    return fstype


def remove_tree(path: Path) -> None:
    """rm -rf that refuses to cross into a mount (it would delete what is mounted there)."""
    top = os.path.abspath(path)
    inside = sorted({e.mount_point for e in mountinfo.read() if is_under(e.mount_point, top)})
    if inside:
        raise RootfsError(f"cannot remove {path}: still mounted there: {', '.join(inside)}")
    shutil.rmtree(path, ignore_errors=False)
