"""`offload rootfs build`: a base tree by mode, offload's files in it, a manifest; idempotent.

TARGET is either absent or whole: README.md ("offload rootfs") says how
(the staging directory, the rootfs-building marker, a failed build's cleanup).
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from offload.errors import OffloadError, RootfsError
from offload.mounts import ops, syscalls
from offload.mounts.mountinfo import is_mount_point
from offload.rootfs_builder import install, manifest, modes
from offload.rootfs_builder.layout import MANIFEST, Layout, Say

MODES = ("overlay", "copy", "debootstrap", "image")


@dataclass(frozen=True)
class Request:
    target: str
    mode: str = "overlay"
    options: install.Options = field(default_factory=install.Options)
    source: str = "/"  # overlay's lower layer, copy's source
    image: str = ""
    partition: int | None = None
    suite: str = modes.DEBIAN_SUITE
    mirror: str = modes.DEBIAN_MIRROR
    state_dir: str | None = None
    apt: bool = True
    hardlinks: bool = True

    @property
    def layout(self) -> Layout:
        return Layout.of(self.target, self.state_dir)


@dataclass
class Result:
    fresh: bool
    changed: list[str]
    packages: list[str]


def build(request: Request, say: Say = print) -> Result:
    try:
        return _build(request, say)
    except OSError as exc:
        # Whatever step it was cleaned up after itself; name the file.
        where = f" {exc.filename}" if exc.filename else ""
        raise RootfsError(f"building {request.target} failed:{where}: {exc.strerror or exc}") from None


def _build(request: Request, say: Say) -> Result:
    if request.mode not in MODES:
        raise RootfsError(f"unknown mode {request.mode!r}; one of {', '.join(MODES)}")
    if request.mode == "image" and not request.image:
        raise RootfsError("--mode image needs --image FILE (a qcow2 or raw disk image)")
    install.validate(request.options)
    layout = request.layout
    started = time.monotonic()
    existing = _existing(request, layout)
    if existing is not None:
        if existing.mode != request.mode:
            raise RootfsError(
                f"{layout.target} was built in {existing.mode} mode; remove it to build it in {request.mode} mode"
            )
        overlay = None
        if request.mode == "overlay":
            mount_overlay(layout, say, os.path.abspath(request.source))
            overlay = existing.overlay or _overlay_info(layout, os.path.abspath(request.source), [])
        result = Result(False, *_install(request, layout.target, say, existing, overlay=overlay))
    elif request.mode == "overlay":
        result = _fresh_overlay(request, layout, say)
    else:
        result = _fresh_staged(request, layout, say)
    elapsed = time.monotonic() - started
    if not (result.fresh or result.changed or result.packages):
        say(f"{layout.target} is up to date: nothing changed ({elapsed:.1f} s)")
    else:
        what = "built" if result.fresh else f"updated ({len(result.changed)} files)"
        say(f"{layout.target} {what} in {request.mode} mode ({elapsed:.1f} s)")
    return result


def _existing(request: Request, layout: Layout) -> manifest.Manifest | None:
    if request.mode == "overlay" and layout.upper.is_dir():
        found = manifest.read(layout.manifest(layout.upper))
        if found is None and not layout.marker(layout.upper).exists():
            raise RootfsError(f"{layout.upper} exists but holds no rootfs manifest: remove it or pass --state-dir")
        return found or manifest.Manifest(mode="overlay", arch="", host="")
    if not layout.target.exists():
        return None
    found = manifest.read(layout.manifest())
    if found is not None:
        return found
    if is_mount_point(layout.target) and request.mode != "overlay":
        raise RootfsError(f"{layout.target} is a mount point without a rootfs manifest; unmount it first")
    if layout.marker().exists():
        return manifest.Manifest(mode=request.mode, arch="", host="")
    if any(layout.target.iterdir()):
        raise RootfsError(f"{layout.target} exists, is not empty and was not built by offload rootfs build")
    return None


def mount_overlay(layout: Layout, say: Say, lower: str | None = None) -> bool:
    """Mount an overlay rootfs's layers on TARGET unless they are; True if this mounted them."""
    if is_mount_point(layout.target):
        return False
    recorded = manifest.read(layout.manifest(layout.upper))
    if recorded is not None and recorded.overlay:
        lower, nested = str(recorded.overlay.get("lower", "/")), list(recorded.overlay.get("nested", []))
    else:
        lower, nested = lower or "/", []
    _mount_layers(layout, modes.overlay_layers(layout, lower, nested), say, [])
    return True


def _mount_layers(layout: Layout, layers: list[ops.MountOp], say: Say, mounted: list[ops.MountOp]) -> None:
    """Mount ``layers`` on TARGET in order, each added to ``mounted`` once it is."""
    layout.target.mkdir(parents=True, exist_ok=True)
    for layer in layers:
        say(" && ".join(layer.describe()))
        layer.execute(ops.Direct())
        mounted.append(layer)


def _overlay_info(layout: Layout, lower: str, nested: list[str]) -> dict:
    return {"lower": lower, "upper": str(layout.upper), "work": str(layout.work), "nested": nested}


def _fresh_overlay(request: Request, layout: Layout, say: Say) -> Result:
    lower = os.path.abspath(request.source)
    created_target = not layout.target.exists()
    mounted: list[ops.MountOp] = []
    try:
        say(f"overlay rootfs: {lower} read-only below, changes in {layout.upper}")
        layers, nested = modes.prepare_overlay(layout, lower, say)
        _mount_layers(layout, layers, say, mounted)
        changed, packages = _install(request, layout.target, say, None, overlay=_overlay_info(layout, lower, nested))
        return Result(True, changed, packages)
    except BaseException:
        say(f"build failed: unmounting {layout.target} and removing {layout.upper}")
        for layer in reversed(mounted):
            with contextlib.suppress(OffloadError):
                syscalls.umount(layer.path)
        for path in (layout.upper, layout.work, layout.nested):
            if path.exists():
                with contextlib.suppress(OffloadError, OSError):
                    modes.remove_tree(path)
        if created_target:
            with contextlib.suppress(OSError):
                layout.target.rmdir()
        raise


def _fresh_staged(request: Request, layout: Layout, say: Say) -> Result:
    staging = layout.staging
    if staging.exists():
        say(f"removing {staging}, left by an interrupted build")
        modes.remove_tree(staging)
    staging.mkdir(parents=True)
    try:
        if request.mode == "copy":
            modes.copy_root(Path(request.source), staging, layout, say, hardlinks=request.hardlinks)
            source = request.source
        elif request.mode == "debootstrap":
            modes.debootstrap(staging, say, suite=request.suite, mirror=request.mirror)
            source = f"debootstrap {request.suite} {request.mirror}"
        else:
            part = modes.copy_image(Path(request.image), staging, layout, say, partition=request.partition)
            source = f"{os.path.abspath(request.image)}: {part}"
        changed, packages = _install(request, staging, say, None, source=source)
        if layout.target.exists():
            layout.target.rmdir()  # empty (checked in _existing)
        os.rename(staging, layout.target)
        return Result(True, changed, packages)
    except BaseException:
        say(f"build failed: removing {staging}")
        with contextlib.suppress(OffloadError, OSError):
            modes.remove_tree(staging)
        raise


def _install(
    request: Request,
    root: Path,
    say: Say,
    previous: manifest.Manifest | None,
    *,
    source: str | None = None,
    overlay: dict | None = None,
) -> tuple[list[str], list[str]]:
    layout = request.layout
    marker = layout.marker(root)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"offload rootfs build started at {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    packages = install.ensure_packages(root, say, apt=request.apt)
    items = install.payloads(request.options)
    changed = install.apply(root, items, say)
    record = manifest.Manifest(
        mode=request.mode,
        arch=request.options.qemu_arch,
        host=request.options.host,
        files=tuple(item.entry() for item in items),
        packages=tuple(dict.fromkeys([*(previous.packages if previous else ()), *packages])),
        source=source if source is not None else (previous.source if previous else ""),
        overlay=overlay if overlay is not None else (previous.overlay if previous else {}),
    )
    document = install.Payload(f"/{MANIFEST}", manifest.render(record), 0o644, "the manifest")
    if install.write_file(root, document):
        changed.append(document.path)
    marker.unlink()
    return changed, packages
