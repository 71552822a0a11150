"""The shipped systemd units pass systemd-analyze verify."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from offload import proc

UNITS = sorted((Path(__file__).parent.parent / "systemd").glob("*.service"))
BIN = Path(sys.executable).parent
#: Where the Debian package installs the programs the units start (debian/rules).
INSTALLED = {
    "/usr/sbin/rexec_server": "rexec_server",
    "/usr/sbin/udsproxyd": "udsproxyd",
    "/usr/bin/qtfs": "qtfs",
    "/usr/bin/offload": "offload",
}


def _here(text: str) -> str:
    """The unit with the package's programs replaced by this checkout's build (verify checks ExecStart exists)."""
    for path, name in INSTALLED.items():
        text = text.replace(f"={path} ", f"={BIN / name} ").replace(f"={path}\n", f"={BIN / name}\n")
    return text


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("unit", UNITS, ids=[u.name for u in UNITS])
def test_unit_verifies(unit: Path, tmp_path: Path) -> None:
    # The units name each other (Requires=offload-prepare.service): verify
    # each one among all of them.
    for other in UNITS:
        (tmp_path / other.name).write_text(_here(other.read_text()))
    copy = tmp_path / unit.name
    result = proc.run(["systemd-analyze", "verify", "--man=no", str(copy)], check=False)
    problems = [line for line in (result.stderr + result.stdout).splitlines() if unit.name in line or copy.name in line]
    assert result.returncode == 0 and not problems, result.stderr


def test_units_exist() -> None:
    assert "rexec.service" in [u.name for u in UNITS]


def test_units_start_the_installed_programs() -> None:
    # Exec lines of the units that are not chrooted name the package's paths,
    # never a developer's /usr/local or a venv.
    starts = [
        value.split()[0]
        for unit in UNITS
        if "RootDirectory" not in _settings(unit.name)
        for key, values in _settings(unit.name).items()
        if key.startswith("Exec") and key != "ExecReload"
        for value in values
    ]
    assert starts and set(starts) <= set(INSTALLED), starts


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
