"""`offload rootfs check`: what is wrong with a rootfs, compared with its manifest."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from offload import proc
from offload.mounts.mountinfo import is_mount_point
from offload.rootfs_builder import install, manifest
from offload.rootfs_builder.layout import Layout, machine_arch


def check(target: str, state_dir: str | None = None, *, run: bool = True) -> tuple[list[str], list[str]]:
    """(problems, facts): an empty problem list means the rootfs is good.

    ``run`` also starts the stand-in inside the rootfs (chroot, `rexec
    --help`) to prove its interpreter can import it.
    """
    layout = Layout.of(target, state_dir)
    problems: list[str] = []
    facts: list[str] = []
    root = layout.target
    recorded = manifest.read(layout.manifest())
    overlay_upper = layout.upper.is_dir()
    if recorded is None and overlay_upper:
        recorded = manifest.read(layout.manifest(layout.upper))
        if recorded is not None and not is_mount_point(root):
            return [f"overlay not mounted on {root} (offload rootfs mount {root})"], facts
    if not root.is_dir():
        return [f"{root} does not exist"], facts
    if layout.marker().exists() or (overlay_upper and layout.marker(layout.upper).exists()):
        problems.append(f"half-built: {layout.marker()} is present (a build did not finish; build again)")
    if recorded is None:
        problems.append(f"no manifest at {layout.manifest()}: not built by offload rootfs build")
        return problems, facts
    facts.append(
        f"mode {recorded.mode}, {len(recorded.files)} files recorded, host {recorded.host or '(default peer)'}"
    )
    if recorded.mode == "overlay" and not is_mount_point(root):
        problems.append(f"overlay not mounted on {root} (offload rootfs mount {root})")
    for entry in recorded.files:
        problems += _check_entry(root, entry)
    for path in install.LIBVIRT_FILES:
        if not os.path.lexists(root / path):
            problems.append(f"libvirt missing: /{path} (apt-get install {' '.join(install.LIBVIRT_PACKAGES)})")
    if not os.path.lexists(root / install.LOCK_DIR):
        problems.append(f"/{install.LOCK_DIR} missing: libvirt cannot lock a console (build again)")
    if not os.path.lexists(root / install.PYTHON.lstrip("/")):
        problems.append(f"{install.PYTHON} missing: the rexec stand-in cannot run")
    elif run and recorded.arch == machine_arch() and not layout.marker().exists():
        result = proc.run(["chroot", str(root), install.PYTHON, "-IS", install.REXEC, "--help"], check=False)
        if result.returncode != 0:
            problems.append(f"rexec does not start in the rootfs: {(result.stderr or result.stdout).strip()}")
        else:
            facts.append("rexec starts in the rootfs")
    return problems, facts


def _check_entry(root: Path, entry: manifest.Entry) -> list[str]:
    path = root / entry.path.lstrip("/")
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return [f"missing: {entry.path} ({entry.what})"]
    if not stat.S_ISREG(info.st_mode):
        return [f"not a regular file: {entry.path} ({entry.what})"]
    problems = []
    state = manifest.file_state(path)
    if state is not None and state[0] != entry.sha256:
        problems.append(f"changed: {entry.path} ({entry.what}) differs from what was installed")
    mode = stat.S_IMODE(info.st_mode)
    if entry.mode & 0o111 and not mode & 0o111:
        problems.append(f"not executable: {entry.path} ({entry.what}), mode {mode:04o}")
    elif mode != entry.mode:
        problems.append(f"mode {mode:04o} instead of {entry.mode:04o}: {entry.path}")
    # A hard link to the machine's own file: a write to one is a write to
    # both (the wrapper over the real qemu would make the machine's qemu call itself).
    try:
        if os.path.samestat(info, os.lstat(entry.path)) and os.path.realpath(root) != "/":
            problems.append(f"{entry.path} in the rootfs is the machine's own {entry.path} (a hard link)")
    except OSError:
        pass
    return problems
