"""Time and disk use of each `offload rootfs build` mode, beside what an operator would do instead.

Rows, all measured in one run on this machine:
- overlay mode of the machine's / (what the lab uses): the disk is the upper layer;
- copy mode and the reference's plain `cp -a` of the same tree: the tree is
  the machine's /usr, /etc and /var/lib/dpkg, laid out as a root (a
  hard-link farm on the same filesystem, made first and not timed);
- image mode from a qcow2 holding a small root (python3 and its standard
  library), beside `cp -a` of that tree;
- debootstrap mode (minbase plus python3 and libvirt with apt) beside a plain
  `debootstrap --variant=minbase` (skipped with --quick).

Disk is what the result adds to the filesystem (du counts a hard-linked
file once).  Runnable alone: python -m bench.rootfs_bench [--quick]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OFFLOAD = str(Path(sys.executable).parent / "offload")
BENCH_DIR = Path("/var/tmp")  # on the root filesystem, like /another_rootfs (not a tmpfs)


def _run(argv: list[str], timeout: float = 900) -> float:
    began = time.monotonic()
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    elapsed = time.monotonic() - began
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {result.stdout[-2000:]}{result.stderr[-2000:]}")
    return elapsed


def _private(script: str, timeout: float = 900) -> float:
    return _run(["unshare", "--mount", "--propagation", "private", "sh", "-euc", script], timeout)


def _added_kb(base: Path | None, path: Path) -> int:
    """Kilobytes ``path`` adds on disk beyond ``base`` (hard links to base count once, in base)."""
    argv = ["du", "-sk", "--one-file-system", *([str(base)] if base else []), str(path)]
    lines = subprocess.run(argv, capture_output=True, text=True, check=True).stdout.splitlines()
    return int(lines[-1].split()[0])


def _row(name: str, seconds: float, kb: int) -> tuple[str, str, str]:
    size = f"{kb / 1024:.1f} MB" if kb < 1024 * 1024 else f"{kb / 1024 / 1024:.2f} GB"
    return name, f"{seconds:.1f} s", size


def _overlay(work: Path) -> list[tuple[str, str, str]]:
    target = work / "overlay-root"
    seconds = _private(f"{OFFLOAD} rootfs build {target} >/dev/null")
    return [_row("overlay mode (lower: the machine's /)", seconds, _added_kb(None, work / ".overlay-root-upper"))]


def _copy(work: Path) -> list[tuple[str, str, str]]:
    source = work / "tree"
    source.mkdir()
    for path in ("usr", "etc", "var/lib/dpkg"):
        (source / path).parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cp", "-al", f"/{path}", str(source / path)], check=True)
    rows = []
    target = work / "copy-root"
    seconds = _private(f"{OFFLOAD} rootfs build --mode copy --no-apt --source {source} {target} >/dev/null")
    rows.append(_row("copy mode (hard links for /usr, copies elsewhere)", seconds, _added_kb(source, target)))
    shutil.rmtree(target)
    seconds = _private(
        f"{OFFLOAD} rootfs build --mode copy --no-apt --no-hardlinks --source {source} {target} >/dev/null"
    )
    rows.append(_row("copy mode --no-hardlinks", seconds, _added_kb(source, target)))
    shutil.rmtree(target)
    reference = work / "cp-a"
    seconds = _run(["cp", "-a", str(source), str(reference)])
    rows.append(_row("reference: cp -a of the same tree", seconds, _added_kb(source, reference)))
    shutil.rmtree(reference)
    shutil.rmtree(source)
    return rows


def _image(work: Path) -> list[tuple[str, str, str]]:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.rootfs_helpers import small_root
    from tests.test_rootfs_modes import _disk_image

    tree = small_root(work / "small")
    image = _disk_image(work, tree)
    target = work / "image-root"
    seconds = _private(f"{OFFLOAD} rootfs build --mode image --no-apt --image {image} {target} >/dev/null")
    rows = [_row("image mode (qcow2 of a small root: python3)", seconds, _added_kb(None, target))]
    reference = work / "small-cp-a"
    rows.append(
        _row(
            "reference: cp -a of that small root",
            _run(["cp", "-a", str(tree), str(reference)]),
            _added_kb(tree, reference),
        )
    )
    return rows


def _debootstrap(work: Path) -> list[tuple[str, str, str]]:
    target = work / "deb-root"
    seconds = _private(f"{OFFLOAD} rootfs build --mode debootstrap {target} >/dev/null")
    rows = [_row("debootstrap mode (minbase + python3 + libvirt)", seconds, _added_kb(None, target))]
    plain = work / "plain-debootstrap"
    seconds = _run(["debootstrap", "--variant=minbase", "bookworm", str(plain), "http://deb.debian.org/debian"])
    rows.append(_row("plain debootstrap --variant=minbase", seconds, _added_kb(None, plain)))
    return rows


def rootfs_rows(quick: bool = False) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory(prefix="offr-bench-", dir=BENCH_DIR) as name:
        work = Path(name)
        rows += _overlay(work)
        rows += _copy(work)
        rows += _image(work)
        if not quick:
            rows += _debootstrap(work)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip the debootstrap rows (network, minutes)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("rootfs_bench needs root (mounts, chroot)")
    rows = rootfs_rows(quick=args.quick)
    width = max(len(r[0]) for r in rows)
    print(f"{'rootfs':<{width}}  {'time':>8}  {'disk':>10}")
    for name, seconds, disk in rows:
        print(f"{name:<{width}}  {seconds:>8}  {disk:>10}")


if __name__ == "__main__":
    main()
