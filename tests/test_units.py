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
    # The units name each other (Requires=offload-prepare.service): verify
    # each one among all of them.
    for other in UNITS:
        (tmp_path / other.name).write_text(other.read_text().replace("/usr/local/bin/", f"{BIN}/"))
    copy = tmp_path / unit.name
    copy.write_text(text)
    result = proc.run(["systemd-analyze", "verify", "--man=no", str(copy)], check=False)
    problems = [line for line in (result.stderr + result.stdout).splitlines() if unit.name in line or copy.name in line]
    assert result.returncode == 0 and not problems, result.stderr


def test_units_exist() -> None:
    assert "rexec.service" in [u.name for u in UNITS]


def _settings(unit: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in (Path(__file__).parent.parent / "systemd" / unit).read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


def test_offload_prepare_unit_mounts_once_and_tears_down_on_stop() -> None:
    unit = _settings("offload-prepare.service")
    assert unit["Type"] == ["oneshot"] and unit["RemainAfterExit"] == ["yes"]
    assert unit["ExecStart"][0].split()[1:2] == ["prepare"]
    assert unit["ExecStop"][0].split()[1:3] == ["teardown", "--force"]
    assert {"rexec.service", "udsproxyd.service"} <= set(unit["After"][0].split())


def test_chrooted_libvirt_units_preload_the_shim_after_prepare() -> None:
    for name in ("offload-virtlogd.service", "offload-libvirtd.service"):
        unit = _settings(name)
        assert unit["RootDirectory"] == ["/another_rootfs"], name
        assert "LD_PRELOAD=/usr/lib/offload/libudsproxy.so" in unit["Environment"], name
        assert any(e.startswith("UDSPROXY_SOCKET=") for e in unit["Environment"]), name
        assert "offload-prepare.service" in unit["Requires"][0] and "offload-prepare.service" in unit["After"][0]


def test_qtfs_server_unit_exists() -> None:
    unit = next(u for u in UNITS if u.name == "qtfs-server.service")
    text = unit.read_text()
    assert "Type=notify" in text and "qtfs serve" in text
