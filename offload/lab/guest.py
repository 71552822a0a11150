"""The lab's guest: a real Debian kernel and a tiny initramfs that says it booted.

The kernel comes from Debian's ``linux-image-*-cloud-amd64`` package (the
smallest one with virtio and the 8250 serial console built in), fetched with
``apt-get download`` into a cache, so it is exactly what the distribution
ships.  The initramfs is static busybox (Debian's busybox-static) and
``INIT``, whose counter tells a guest restored from a save image (it counts
on) from one that booted again (it starts over).  The kernel is cached by
package version, the initramfs by its /init as well.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import os
import shutil
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path

from offload import proc
from offload.errors import LabError

log = logging.getLogger(__name__)

CACHE = Path("/var/cache/offload-lab/guest")
KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX = Path("/bin/busybox")
MARKER = "OFFLOAD-GUEST-UP"
TICK = "OFFLOAD-GUEST-TICK"
ECHO = "OFFLOAD-GUEST-ECHO"

INIT = f"""#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t devtmpfs dev /dev
echo "{MARKER} uptime $(/bin/busybox cut -d' ' -f1 /proc/uptime)"
# A background list reads /dev/null unless told otherwise (no job control here).
(while IFS= read -r line; do echo "{ECHO} $line"; done) </dev/console &
tick=0
while :; do echo "{TICK} $tick"; tick=$((tick + 1)); /bin/busybox sleep 1; done
"""


@dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initrd: Path
    version: str


def build(cache: Path = CACHE) -> GuestImage:
    """The cached kernel and initramfs, made if missing."""
    package = _kernel_package()
    directory = cache / package
    # A changed /init is a new initramfs, whatever the cache holds.
    init_digest = hashlib.sha256(INIT.encode()).hexdigest()[:12]
    kernel, initrd = directory / "vmlinuz", directory / f"initrd-{init_digest}.gz"
    directory.mkdir(parents=True, exist_ok=True)
    if not kernel.exists():
        _fetch_kernel(package, directory, kernel)
    if not initrd.exists():
        _write_atomically(initrd, _initramfs())
    return GuestImage(kernel, initrd, package)


def _kernel_package() -> str:
    """The versioned kernel package the meta package points at, e.g. linux-image-6.1.0-56-cloud-amd64."""
    result = proc.run(["apt-cache", "depends", KERNEL_META_PACKAGE], check=False)
    for line in result.stdout.splitlines():
        name = line.strip().removeprefix("Depends:").strip()
        if line.strip().startswith("Depends:") and name.startswith("linux-image-"):
            return name
    raise LabError(f"apt-cache knows no kernel behind {KERNEL_META_PACKAGE} (apt-get update?): {result.stderr.strip()}")


def _fetch_kernel(package: str, directory: Path, kernel: Path) -> None:
    log.info("fetching %s for the lab's guest", package)
    download = directory / "download"
    shutil.rmtree(download, ignore_errors=True)
    download.mkdir()
    try:
        # apt drops to the _apt user for downloads; let it write here.
        os.chmod(download, 0o777)
        proc.run(["apt-get", "download", "-q", package], cwd=download)
        debs = list(download.glob("*.deb"))
        if len(debs) != 1:
            raise LabError(f"apt-get download {package} left {len(debs)} packages in {download}")
        data = proc.run(["dpkg-deb", "--fsys-tarfile", str(debs[0])], text=False).stdout
        with tarfile.open(fileobj=io.BytesIO(data)) as archive:
            members = [m for m in archive.getmembers() if m.isfile() and Path(m.name).name.startswith("vmlinuz-")]
            if not members:
                raise LabError(f"{debs[0].name} has no /boot/vmlinuz-*")
            source = archive.extractfile(members[0])
            assert source is not None
            _write_atomically(kernel, source.read())
    finally:
        shutil.rmtree(download, ignore_errors=True)


def _initramfs() -> bytes:
    if not BUSYBOX.exists():
        raise LabError(f"{BUSYBOX} is missing (Debian package busybox-static; run make setup)")
    files = [(directory, stat.S_IFDIR | 0o755, b"") for directory in ("bin", "dev", "proc")]
    files.append(("bin/busybox", stat.S_IFREG | 0o755, BUSYBOX.read_bytes()))
    files.append(("init", stat.S_IFREG | 0o755, INIT.encode()))
    return gzip.compress(_newc(files), compresslevel=1)


def _newc(files: list[tuple[str, int, bytes]]) -> bytes:
    """``files`` (name, mode, data) in the kernel's initramfs format: cpio "newc" (ramfs-rootfs-initramfs.rst)."""
    parts = []
    for inode, (name, mode, data) in enumerate([*files, ("TRAILER!!!", 0, b"")], start=1):
        encoded = name.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(mode) else 1
        fields = [inode, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(encoded), 0]
        header = b"070701" + b"".join(b"%08X" % value for value in fields)
        parts += [_pad4(header + encoded), _pad4(data)]
    return b"".join(parts)


def _pad4(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)


def _write_atomically(path: Path, data: bytes) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    os.replace(partial, path)


def ticks(console: str) -> list[int]:
    """The counter values the guest printed, in the order they appear on its console."""
    found = []
    for line in console.splitlines():
        words = line.split()
        if len(words) == 2 and words[0] == TICK and words[1].isdigit():
            found.append(int(words[1]))
    return found
