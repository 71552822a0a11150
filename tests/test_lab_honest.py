"""The lab cannot pass a test by accident: the DPU side shares no pids, cgroups or ptys with the host side.

On two machines a host pid, a host thread id, a host cgroup or a host pty
means nothing on the DPU.  Each test here takes one thing of the host side
and tries to reach it from the DPU side by its number or its path, and
judges by effect: the host's process still lives, the host's cgroup tree
is unchanged, the host's pty received nothing.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import uuid
from pathlib import Path

import psutil
import pytest

from offload import proc
from offload.lab import cgroups
from offload.lab.lab import Lab
from tests.conftest import gone, wait_for

pytestmark = pytest.mark.lab


def on_dpu(lab: Lab, script: str) -> subprocess.CompletedProcess:
    return proc.run(lab.command("dpu", ["sh", "-c", script], cwd="/"), check=False, timeout=30)


def test_the_dpu_side_has_its_own_pid_1_and_sees_no_host_process(lab: Lab) -> None:
    victim = proc.spawn(lab.command("host", ["sleep", "300"], cwd="/"), stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: "sleep" in " ".join(psutil.Process(victim.pid).cmdline()), 10, "the host's sleep")
        result = on_dpu(lab, f"tr '\\0' ' ' </proc/1/cmdline; echo; kill -KILL {victim.pid}; echo $?")
        init, status = result.stdout.splitlines()[0], result.stdout.split()[-1]
        assert "offload.lab.pidns" in init, result.stdout
        assert status != "0", "the DPU side has a process with the host's number"
        assert not gone(victim.pid), "a kill from the DPU side by a host pid reached the host's process"
        # And the other way round: the DPU's numbers are its own.
        assert lab.pid_on("dpu", lab.pid_of("dpu-rexec")) != lab.pid_of("dpu-rexec")
    finally:
        victim.kill()
        victim.wait()


def test_the_dpu_side_cannot_see_or_change_the_hosts_cgroups(lab: Lab) -> None:
    marker = f"offload-test-{uuid.uuid4().hex[:8]}"
    hierarchy = next(h for h in cgroups.hierarchies() if "cpu" in h.data)
    host_cgroup = Path(hierarchy.mount_point) / marker
    host_cgroup.mkdir()
    try:
        view = hierarchy.mount_point  # the same path on the DPU side, where it shows the DPU's own subtree
        result = on_dpu(lab, f"ls {view}; mkdir {view}/{marker}-dpu; echo made=$?; cat /proc/self/cgroup")
        assert marker not in result.stdout.split(), "the host's cgroup is visible from the DPU side"
        assert "made=0" in result.stdout, result.stderr
        # What the DPU made landed in its own subtree, not beside the host's.
        assert not (Path(hierarchy.mount_point) / f"{marker}-dpu").exists()
        [dpu_root] = [p for p in lab.dpu_cgroups if str(p).startswith(hierarchy.mount_point + "/")]
        assert (dpu_root / f"{marker}-dpu").is_dir()
        (dpu_root / f"{marker}-dpu").rmdir()
        assert all(line.endswith(":/") for line in result.stdout.splitlines() if line[:1].isdigit() and ":" in line)
    finally:
        host_cgroup.rmdir()


HOLD_PTY = r"""
import os, sys, time
master, slave = os.openpty()
print(os.ttyname(slave), flush=True)
sys.stdin.read()  # until the test is done
os.set_blocking(master, False)
try:
    data = os.read(master, 4096)
except BlockingIOError:
    data = b""
print(repr(data), flush=True)
"""


def test_a_host_pty_cannot_be_reached_from_the_dpu_side(lab: Lab) -> None:
    holder = proc.spawn(
        lab.command("host", [sys.executable, "-c", HOLD_PTY], cwd="/"), stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout is not None and holder.stdin is not None
        assert select.select([holder.stdout], [], [], 30)[0], "the host side made no pty"
        path = holder.stdout.readline().decode().strip()
        assert path.startswith("/dev/pts/")
        on_dpu(lab, f"printf 'from the dpu\\n' > {path}")
        host_dev = os.stat("/dev/pts").st_dev
        dpu_dev = on_dpu(lab, "stat -c %d /dev/pts").stdout.strip()
        assert dpu_dev != str(host_dev)
        holder.stdin.close()
        received = holder.stdout.read().decode().strip()
        assert received == "b''", f"the host's pty {path} received {received} from the DPU side"
    finally:
        holder.kill()
        holder.wait()
