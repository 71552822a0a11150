"""The shipped systemd units pass systemd-analyze verify."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from offload import proc

UNITS = sorted((Path(__file__).parent.parent / "systemd").glob("*.service"))
BIN = Path(sys.executable).parent


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("unit", UNITS, ids=[u.name for u in UNITS])
def test_unit_verifies(unit: Path, tmp_path: Path) -> None:
    # Units name the installed paths; point them at this checkout's build,
    # since verify checks that ExecStart exists.
    text = unit.read_text().replace("/usr/local/bin/", f"{BIN}/")
    copy = tmp_path / unit.name
    copy.write_text(text)
    result = proc.run(["systemd-analyze", "verify", "--man=no", str(copy)], check=False)
    problems = [line for line in (result.stderr + result.stdout).splitlines() if unit.name in line or copy.name in line]
    assert result.returncode == 0 and not problems, result.stderr


def test_units_exist() -> None:
    assert "rexec.service" in [u.name for u in UNITS]
