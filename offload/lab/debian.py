"""Debian images for the labs and tests that need a whole Debian system: the mirror, a cached minbase.

`minbase()` is debootstrap's minbase bookworm, made once and kept as a
tarball under /var/cache/offload-lab (the package test installs into it,
the systemd lab builds its image on it).  The mirror is the one apt here
uses; network traffic goes only there.  `remove_tree` takes down a root
that a container or debootstrap left: its processes (by pid), its mounts,
its files.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import urllib.request
from collections.abc import Callable
from pathlib import Path

from offload import proc
from offload.errors import LabError, OffloadError
from offload.mounts import mountinfo, syscalls
from offload.prefix import is_under

CACHE = Path("/var/cache/offload-lab")
SUITE = "bookworm"
MINBASE = CACHE / f"{SUITE}-minbase.tar"


def mirror() -> str:
    """The Debian mirror apt uses for bookworm here (one-line or deb822 sources)."""
    files = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in files:
        if not path.is_file():
            continue
        text = path.read_text()
        if path.suffix == ".sources":
            for stanza in text.split("\n\n"):
                fields = {}
                for line in stanza.splitlines():
                    key, sep, value = line.partition(":")
                    if sep and not line.startswith(("#", " ")):
                        fields[key.strip()] = value.split()
                if "deb" in fields.get("Types", []) and SUITE in fields.get("Suites", []):
                    return fields["URIs"][0]
        else:
            for line in text.splitlines():
                words = [w for w in line.split("#", 1)[0].split() if not w.startswith("[")]
                if len(words) >= 3 and words[0] == "deb" and words[2] == SUITE:
                    return words[1]
    return "http://deb.debian.org/debian"


class MirrorUnreachable(LabError):
    """The image must be built and no Debian mirror answers."""


def mirror_reachable() -> str | None:
    """None if the mirror answers, else why not."""
    address = mirror()
    try:
        with urllib.request.urlopen(f"{address}/dists/{SUITE}/Release", timeout=30):
            return None
    except OSError as exc:
        return f"the Debian mirror {address} does not answer: {exc}"


def unmount_beneath(path: Path) -> None:
    """Detach every mount at or below ``path``, deepest first (debootstrap's and nspawn's binds)."""
    top = str(path.resolve())
    inside = {e.mount_point for e in mountinfo.read() if is_under(e.mount_point, top)}
    for mount in sorted(inside, key=len, reverse=True):
        with contextlib.suppress(OffloadError):
            syscalls.umount(mount, syscalls.MNT_DETACH)


def end_processes_in(root: Path) -> list[int]:
    """SIGKILL every process whose root is ``root`` (left by a killed container), by pid."""
    target = str(root.resolve())
    ended = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(entry / "root") == target:
                    os.kill(int(entry.name), signal.SIGKILL)
                    ended.append(int(entry.name))
    return ended


def remove_tree(path: Path) -> None:
    if not path.exists():
        return
    end_processes_in(path)
    unmount_beneath(path)
    top = str(path.resolve())
    left = sorted(e.mount_point for e in mountinfo.read() if is_under(e.mount_point, top))
    if left:
        # rm -rf would delete through them (a bound /dev, the machine's files).
        raise LabError(f"cannot remove {path}: still mounted there: {', '.join(left)}")
    shutil.rmtree(path, ignore_errors=True)


def cached(tarball: Path, what: str, make: Callable[[Path], None], version: str = "") -> Path:
    """``tarball`` of a tree ``make`` fills in a work directory, made on first use and again when ``version``
    changes (MirrorUnreachable if it must be made and cannot be); ``what`` names it in that error."""
    CACHE.mkdir(parents=True, exist_ok=True)
    stamp = tarball.with_suffix(".version")
    with open(tarball.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if tarball.exists() and (not version or (stamp.exists() and stamp.read_text().strip() == version)):
            return tarball
        why = mirror_reachable()
        if why:
            raise MirrorUnreachable(f"cannot {what}: {why}")
        work = tarball.with_suffix(".new")
        remove_tree(work)
        try:
            make(work)
            unmount_beneath(work)
            partial = tarball.with_suffix(".tar.partial")
            proc.run(["tar", "-C", str(work), "--numeric-owner", "-cf", str(partial), "."])
            partial.rename(tarball)
            if version:
                stamp.write_text(version + "\n")
        finally:
            remove_tree(work)
        return tarball


def minbase() -> Path:
    """The cached minbase tarball, made with debootstrap on first use (MirrorUnreachable if it cannot be)."""
    return cached(MINBASE, f"make the {SUITE} minbase", _debootstrap)


def _debootstrap(work: Path) -> None:
    proc.run(["debootstrap", "--variant=minbase", SUITE, str(work), mirror()], timeout=900)
