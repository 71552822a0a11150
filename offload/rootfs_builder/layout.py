"""Where a rootfs and its companions live: staging dir, overlay layers, manifest, marker.

Everything is derived from TARGET (and an optional state directory), so a
later command (check, mount, the orchestrator after a reboot) finds the same
paths without being told again.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

#: How the builder reports its progress, a line at a time.
Say = Callable[[str], None]

#: Inside the rootfs.
MANIFEST = "etc/offload/rootfs-manifest.json"
#: Present while a build installs into the rootfs; a rootfs with it is not good.
MARKER = "etc/offload/rootfs-building"
#: Top-level directories of the source root never copied (copy mode) and
#: hidden (overlay mode): kernel and run-time state the mount orchestrator
#: mounts afresh.
EXCLUDED = ("proc", "sys", "dev", "run", "tmp")


@dataclass(frozen=True)
class Layout:
    target: Path
    state_dir: Path | None = None

    @classmethod
    def of(cls, target: str | os.PathLike[str], state_dir: str | os.PathLike[str] | None = None) -> Layout:
        # abspath, not resolve(): TARGET may be a mount point we must not look through.
        return cls(Path(os.path.abspath(target)), Path(os.path.abspath(state_dir)) if state_dir else None)

    @property
    def staging(self) -> Path:
        """Copy, debootstrap and image modes build here and rename to TARGET when done."""
        return self.target.parent / f".{self.target.name}.partial"

    @property
    def upper(self) -> Path:
        return self._layer("upper")

    @property
    def work(self) -> Path:
        return self._layer("work")

    def _layer(self, name: str) -> Path:
        if self.state_dir is not None:
            return self.state_dir / name
        return self.target.parent / f".{self.target.name}-{name}"

    @property
    def nested(self) -> Path:
        """The layers of the overlays over content filesystems below the lower root, a directory each."""
        return self.upper.with_name(self.upper.name + ".mounts")

    def manifest(self, root: Path | None = None) -> Path:
        return (root or self.target) / MANIFEST

    def marker(self, root: Path | None = None) -> Path:
        return (root or self.target) / MARKER


def machine_arch() -> str:
    """qemu's name for this machine's architecture (qemu-system-ARCH)."""
    machine = platform.machine()
    return {"amd64": "x86_64", "arm64": "aarch64", "armv7l": "arm", "ppc64le": "ppc64"}.get(machine, machine)


def overlay_mount_spec(
    target: str | os.PathLike[str], state_dir: str | os.PathLike[str] | None = None
) -> tuple[str, str, str]:
    """(lower, upper, work) of an overlay-mode rootfs at ``target``, for mounting it again.

    An overlay does not survive a reboot; the orchestrator (or ``offload
    rootfs mount``) mounts ``overlay`` with these layers on ``target`` before
    anything else.  The lower layer recorded in the manifest (kept in the
    upper layer, so readable before the mount) wins over the default "/".
    """
    from offload.errors import ConfigError
    from offload.rootfs_builder import manifest

    layout = Layout.of(target, state_dir)
    if not layout.upper.is_dir():
        raise ConfigError(f"{target} is not an overlay rootfs: {layout.upper} does not exist")
    recorded = manifest.read(layout.manifest(layout.upper))
    lower = recorded.overlay.get("lower", "/") if recorded is not None and recorded.overlay else "/"
    return str(lower), str(layout.upper), str(layout.work)
