"""Lint, format and type checks are part of the suite."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from offload import proc

ROOT = Path(__file__).parent.parent
BIN = Path(sys.executable).parent


@pytest.mark.parametrize(
    "command",
    [
        ["ruff", "check", "offload", "tests", "bench"],
        ["ruff", "format", "--check", "offload", "tests", "bench"],
        ["mypy"],
    ],
    ids=["ruff-check", "ruff-format", "mypy"],
)
def test_tool(command: list[str]) -> None:
    result = proc.run([str(BIN / command[0]), *command[1:]], cwd=ROOT, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_nothing_else_imports_subprocess() -> None:
    offenders = [
        str(path.relative_to(ROOT))
        for path in (ROOT / "offload").rglob("*.py")
        if path.name != "proc.py" and "import subprocess" in path.read_text()
    ]
    assert offenders == []


def test_the_packages_programs_are_its_console_scripts_and_start_without_path() -> None:
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert {name: target.partition(":")[0] for name, target in scripts.items()} == proc.PROGRAMS
    # Run from an unrelated directory with a PATH that has no venv in it:
    # what an unactivated venv, a unit file or sudo gives.
    for name in proc.PROGRAMS:
        result = proc.run([*proc.program(name), "--help"], check=False, cwd="/", env={"PATH": "/usr/bin:/bin"})
        assert result.returncode == 0, (name, result.stderr)
