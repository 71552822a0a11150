"""Shared helpers of the rootfs tests: a small root tree, and commands in a private mount namespace."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OFFLOAD = str(Path(sys.executable).parent / "offload")
PYTHON = Path("/usr/bin/python3.11")


def private(script: str, *, timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``script`` (sh -eu) in a private mount namespace: every mount it makes ends with it."""
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-euc", script],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, "OFFLOAD": OFFLOAD, **(env or {})},
    )


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"status {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result.stdout


def _libraries(binary: Path) -> list[Path]:
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        parts = line.split()
        for part in parts:
            if part.startswith("/"):
                found.append(Path(part))
    return found


def small_root(root: Path) -> Path:
    """A tiny root that can run python3 (what the rexec stand-in needs) and nothing more.

    It stands in for a distribution's root in copy and image mode: a real
    / is 5 GB here.  Python's standard library is copied without its tests.
    """
    for name in ("etc", "usr/bin", "usr/lib", "lib64", "proc", "run", "tmp", "dev", "sys", "var"):
        (root / name).mkdir(parents=True, exist_ok=True)
    shutil.copy2(PYTHON, root / "usr/bin/python3.11")
    (root / "usr/bin/python3").symlink_to("python3.11")
    for library in _libraries(PYTHON):
        destination = root / str(library.resolve()).lstrip("/")
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(library.resolve(), destination)
        alias = root / str(library).lstrip("/")
        if not alias.exists():
            alias.parent.mkdir(parents=True, exist_ok=True)
            alias.symlink_to(library.resolve())
    shutil.copytree(
        "/usr/lib/python3.11",
        root / "usr/lib/python3.11",
        symlinks=True,
        ignore=shutil.ignore_patterns("test", "dist-packages", "site-packages", "__pycache__", "idlelib", "tkinter"),
    )
    (root / "etc/hostname").write_text("small\n")
    return root
