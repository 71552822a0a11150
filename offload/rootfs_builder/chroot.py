"""Run a program chrooted in a rootfs with /proc, /dev and DNS, in a mount namespace of its own.

``python -m offload.rootfs_builder.chroot ROOT -- PROGRAM ARGS...`` is how
the builder runs apt inside a rootfs.  The mounts it needs are made in a
private mount namespace of this process (offload.mounts.syscalls), so they
end with it: nothing to unmount, on any path.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from offload import proc
from offload.mounts import syscalls


def command(root: str | os.PathLike[str], argv: list[str]) -> list[str]:
    """The command line that runs ``argv`` chrooted in ``root``."""
    return [*proc.run_module("offload.rootfs_builder.chroot"), str(root), "--", *argv]


def _prepare(root: Path) -> None:
    syscalls.unshare_mount_namespace()
    (root / "proc").mkdir(exist_ok=True)
    syscalls.mount("proc", str(root / "proc"), "proc", syscalls.MS_NOSUID | syscalls.MS_NODEV | syscalls.MS_NOEXEC)
    (root / "dev").mkdir(exist_ok=True)
    # The machine's /dev, bound: package scripts want /dev/null and /dev/urandom.
    syscalls.mount("/dev", str(root / "dev"), None, syscalls.MS_BIND | syscalls.MS_REC)
    resolv = root / "etc" / "resolv.conf"
    if os.path.isfile("/etc/resolv.conf") and resolv.is_file() and not resolv.is_symlink():
        syscalls.mount("/etc/resolv.conf", str(resolv), None, syscalls.MS_BIND)
    elif not resolv.exists() and not resolv.is_symlink() and os.path.isfile("/etc/resolv.conf"):
        resolv.parent.mkdir(parents=True, exist_ok=True)
        resolv.write_bytes(Path("/etc/resolv.conf").read_bytes())


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 3 or args[1] != "--":
        sys.exit("usage: python -m offload.rootfs_builder.chroot ROOT -- PROGRAM [ARGS...]")
    root, program = Path(args[0]), args[2:]
    _prepare(root)
    os.chroot(root)
    os.chdir("/")
    try:
        os.execvp(program[0], program)
    except OSError as exc:
        sys.exit(f"chroot {root}: {program[0]}: {exc.strerror}")


if __name__ == "__main__":
    main()
