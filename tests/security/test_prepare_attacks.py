"""`offload prepare` against symlinks planted in the target and among the host's facts.

A compromised host serves its directories and its /proc facts to the DPU
through qtfs; a rootfs layer may carry links too.  None of it may steer
where prepare mounts or which of the DPU's files it binds.  Each test runs
prepare in a private mount namespace (tests/test_mounts_ns.py) against a
real qtfs server on loopback where it needs one, and checks the effect:
which mounts exist outside the target, what the outside file holds, what
the rootfs shows, what teardown leaves.
"""

from __future__ import annotations

import dataclasses
import errno
import os
from pathlib import Path

import pytest

from offload.errors import StepFailed
from offload.mounts import config as config_module
from offload.mounts import mountinfo, orchestrator
from offload.mounts.cli import make_plan
from offload.mounts.ops import QtfsMount
from offload.prefix import is_under
from tests.test_mounts_ns import in_private_namespace, needs_root
from tests.test_mounts_qtfs import HAVE_QTFS, _end_clients, qtfs_serve

needs_qtfs = pytest.mark.skipif(
    not HAVE_QTFS or not os.path.exists("/dev/fuse"), reason="needs the userspace qtfs command and /dev/fuse"
)
pytestmark = needs_root

#: What every test's plan leaves out: the machine's cgroups and devices are not what is attacked.
SMALL = "cgroups = false\ndevices = []\nhugetlbfs = false\nmqueue = false\nbind = []\n"


def _outside(target: str) -> set[tuple[int, str]]:
    # fusectl: the qtfs client mounts the FUSE control filesystem where it is missing (offload.qtfs.fusectl).
    return {
        (e.mount_id, e.mount_point)
        for e in mountinfo.read()
        if not is_under(e.mount_point, target, strict=True) and e.fstype != "fusectl"
    }


def _prepare_and_teardown(target: str, config: Path, adjust=None) -> dict[str, object]:
    """In this (private) namespace: prepare, note what is mounted outside the target, tear down."""
    before = _outside(target)
    plan = make_plan(config_module.load(config), target)
    if adjust is not None:
        plan = adjust(plan)
    result: dict[str, object] = {}
    try:
        orchestrator.prepare(plan)
        result["prepared"] = True
    except StepFailed as exc:
        result["prepared"] = False
        result["error"] = str(exc)
    result["new_outside"] = sorted(p for _, p in _outside(target) - before)
    result["probe"] = result.get("probe")
    try:
        orchestrator.teardown(target)
        result["teardown"] = "ok"
    except Exception as exc:  # the test reports it; the namespace goes away anyway
        result["teardown"] = repr(exc)
    result["left_outside"] = sorted(p for _, p in _outside(target) - before)
    result["left_below"] = [e.mount_point for e in mountinfo.under(mountinfo.read(), target)]
    return result


def _layout(tmp_path: Path) -> tuple[str, Path]:
    target = tmp_path / "another_rootfs"
    target.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("untouched\n")
    return str(target), outside


def test_a_link_in_a_rootfs_layer_does_not_take_a_mount_outside_the_target(tmp_path: Path) -> None:
    target, outside = _layout(tmp_path)
    # A layer bound into the rootfs holds x -> the outside directory; the
    # plan mounts a tmpfs on /opt/layer/x, which is only a link once the
    # layer is there (the plan was made before).
    layer = tmp_path / "layer"
    layer.mkdir()
    (layer / "x").symlink_to(outside)
    config = tmp_path / "prepare.toml"
    config.write_text(
        SMALL.replace("bind = []\n", "")
        + f'[[bind]]\nsource = "{layer}"\ntarget = "/opt/layer"\n'
        + '[[mount]]\ntype = "tmpfs"\ntarget = "/opt/layer/x"\n'
    )

    def body() -> dict[str, object]:
        result = _prepare_and_teardown(target, config)
        result["outside_listing"] = sorted(os.listdir(outside))
        return result

    result = in_private_namespace(body)
    assert result["new_outside"] == [], result
    assert result["prepared"] is False and "symlink" in str(result["error"]), result
    assert result["outside_listing"] == ["precious"]
    assert (outside / "precious").read_text() == "untouched\n"
    assert result["teardown"] == "ok" and result["left_outside"] == [] and result["left_below"] == []


@needs_qtfs
def test_a_link_the_host_serves_does_not_take_a_mount_outside_the_target(tmp_path: Path) -> None:
    target, outside = _layout(tmp_path)
    export = tmp_path / "host" / "var-lib-libvirt"
    export.mkdir(parents=True)
    # The host plants a link in the directory it serves as /var/lib/libvirt.
    (export / "ram").symlink_to(outside)
    config = tmp_path / "prepare.toml"
    try:
        with qtfs_serve(tmp_path, export) as address:
            config.write_text(
                SMALL
                + f'host = "{address}"\ninsecure = true\nexports = ["{export}"]\n'
                + "proc_facts = false\nsys_facts = false\n"
                + f'[[mount]]\ntype = "tmpfs"\ntarget = "{export}/ram"\n'
            )

            def body() -> dict[str, object]:
                result = _prepare_and_teardown(target, config)
                result["outside_listing"] = sorted(os.listdir(outside))
                return result

            result = in_private_namespace(body)
    finally:
        leftover = _end_clients(target)
    assert result["new_outside"] == [], result
    assert result["prepared"] is False, result
    assert result["outside_listing"] == ["precious"]
    assert (outside / "precious").read_text() == "untouched\n"
    assert result["teardown"] == "ok" and result["left_outside"] == [] and result["left_below"] == []
    assert leftover == []


@needs_qtfs
def test_a_link_among_the_hosts_facts_binds_no_dpu_file_and_the_facts_are_read_only(tmp_path: Path) -> None:
    target, _ = _layout(tmp_path)
    secret = tmp_path / "dpu-etc" / "shadow"
    secret.parent.mkdir()
    secret.write_text("DPU SECRET\n")
    # What a malicious host serves as its /proc: cpuinfo, and meminfo as a
    # link to a file that exists only on the DPU.
    fake_proc = tmp_path / "host-proc"
    fake_proc.mkdir()
    (fake_proc / "cpuinfo").write_text("processor : 0 (the host's)\n")
    (fake_proc / "meminfo").symlink_to(secret)
    config = tmp_path / "prepare.toml"

    def served_as_proc(plan):
        # The plan asks for the host's /proc; this host answers with fake_proc.
        steps = tuple(
            dataclasses.replace(s, remote=str(fake_proc)) if isinstance(s, QtfsMount) and s.mode == "proc" else s
            for s in plan.steps
        )
        return dataclasses.replace(plan, steps=steps)

    try:
        with qtfs_serve(tmp_path, fake_proc) as address:
            config.write_text(SMALL + f'host = "{address}"\ninsecure = true\nexports = []\nsys_facts = false\n')

            def body() -> dict[str, object]:
                before = _outside(target)
                plan = served_as_proc(make_plan(config_module.load(config), target))
                result: dict[str, object] = {}
                try:
                    orchestrator.prepare(plan)
                    with open(f"{target}/proc/meminfo") as file:
                        result["meminfo"] = file.read()
                    with open(f"{target}/proc/cpuinfo") as file:
                        result["cpuinfo"] = file.read()
                    try:
                        with open(f"{target}/proc/cpuinfo", "w") as file:
                            file.write("written from the rootfs\n")
                        result["write"] = "written"
                    except OSError as exc:
                        result["write"] = errno.errorcode[exc.errno or 0]
                finally:
                    orchestrator.teardown(target)
                result["left_outside"] = sorted(p for _, p in _outside(target) - before)
                result["left_below"] = [e.mount_point for e in mountinfo.under(mountinfo.read(), target)]
                return result

            result = in_private_namespace(body)
    finally:
        leftover = _end_clients(target)
    assert "DPU SECRET" not in str(result["meminfo"])
    assert str(result["meminfo"]).startswith("MemTotal:")  # the DPU's own, left in place
    assert result["cpuinfo"] == "processor : 0 (the host's)\n"
    assert result["write"] == "EROFS"
    assert (fake_proc / "cpuinfo").read_text() == "processor : 0 (the host's)\n"
    assert secret.read_text() == "DPU SECRET\n"
    assert result["left_outside"] == [] and result["left_below"] == []
    assert leftover == []
