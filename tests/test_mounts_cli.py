"""The commands as an operator runs them: scripts/offload-prepare, offload teardown/status, --dry-run.

Each test runs a shell under ``unshare -m --propagation private`` with a
tmpfs over /run, so the mounts (and the run directories the default plan
creates) vanish with it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from offload.mounts import mountinfo
from tests.test_mounts_ns import needs_root

pytestmark = needs_root

ROOT = Path(__file__).parent.parent
BIN = Path(sys.executable).parent


def shell(script: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PATH=f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}")
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", f"mount -t tmpfs tmpfs /run\n{script}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=ROOT,
    )


def sections(output: str) -> dict[str, str]:
    """Output split at lines '@@NAME rc=N' into {'NAME': text, 'NAME.rc': 'N'}."""
    found: dict[str, str] = {}
    current: list[str] = []
    for line in output.splitlines():
        if line.startswith("@@"):
            name, rc = line[2:].split(" rc=")
            found[name] = "\n".join(current)
            found[f"{name}.rc"] = rc
            current = []
        else:
            current.append(line)
    return found


@pytest.fixture
def target(tmp_path: Path) -> str:
    root = tmp_path / "another_rootfs"
    root.mkdir()
    return str(root)


def test_dry_run_prints_the_shell_commands_and_changes_nothing(target: str) -> None:
    result = subprocess.run(
        [str(BIN / "offload"), "prepare", "--dry-run", "--target", target, "--config", "/nonexistent/prepare.toml"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for expected in (
        f"mount -t proc -o nosuid,nodev,noexec proc {target}/proc",
        f"mount -t sysfs -o nosuid,nodev,noexec sysfs {target}/sys",
        f"mount -t tmpfs -o nosuid,mode=0755,size=4m tmpfs {target}/dev",
        f"mknod -m 0666 {target}/dev/null c 1 3",
        f"ln -s pts/ptmx {target}/dev/ptmx",
        f"mount -t devpts -o nosuid,noexec,newinstance,ptmxmode=0666,mode=0620,gid=5 devpts {target}/dev/pts",
        f"mount -t mqueue -o nosuid,nodev,noexec mqueue {target}/dev/mqueue",
        f"mount --bind /var/run/rexec {target}/var/run/rexec",
        f"if [ -e /etc/rexec ]; then mkdir -p {target}/etc/rexec; mount --bind /etc/rexec {target}/etc/rexec;"
        f" mount -o remount,bind,ro {target}/etc/rexec; fi",
    ):
        assert expected in lines, expected
    for entry in mountinfo.read():
        if entry.fstype == "cgroup" and entry.mount_point.startswith("/sys/fs/cgroup/"):
            controllers = ",".join(entry.filesystem_data)
            assert any(
                line.startswith("mount -t cgroup -o ")
                and line.endswith(f"{controllers} cgroup {target}{entry.mount_point}")
                for line in lines
            ), entry.mount_point
    assert not [line for line in lines if "devtmpfs" in line or "qtfs" in line]
    assert os.listdir(target) == []
    assert not mountinfo.under(mountinfo.read(), target)


def test_dry_run_with_a_host_prints_the_qtfs_commands(target: str, tmp_path: Path) -> None:
    config = tmp_path / "prepare.toml"
    config.write_text('host = "169.254.77.1:7003"\npki = "/run/pki"\nexports = ["/var/lib/libvirt"]\n')
    result = subprocess.run(
        [str(BIN / "offload"), "prepare", "--dry-run", "--target", target, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    # This installation's qtfs, run by its interpreter: the dry run shows what prepare runs, PATH or not.
    qtfs = f"{sys.executable} -P -m offload.qtfs.cli"
    assert f"{qtfs} mount --pki /run/pki 169.254.77.1:7003:/var/lib/libvirt {target}/var/lib/libvirt" in lines
    proc_staging = f"{target}/run/offload/qtfs-proc"
    assert f"{qtfs} mount --proc --pki /run/pki 169.254.77.1:7003:/proc {proc_staging}" in lines
    meminfo = f"{proc_staging}/meminfo {target}/proc/meminfo"
    # read-only: the host's facts are shown, never written from here
    remount = f"mount -o remount,bind,ro {target}/proc/meminfo"
    expected = (
        f"if [ -e {proc_staging}/meminfo ] && [ -e {target}/proc/meminfo ]; then mount --bind {meminfo}; {remount}; fi"
    )
    assert expected in lines


def test_the_dry_run_script_builds_what_prepare_builds(target: str, tmp_path: Path) -> None:
    script = tmp_path / "prepare.sh"
    config = tmp_path / "prepare.toml"
    source = tmp_path / "etc-state"
    source.mkdir()
    config.write_text(f'[[bind]]\nsource = "{source}"\ntarget = "/etc/state"\noptions = "ro"\n')
    layout = f"awk '$5 ~ \"^{target}/\" {{print $5, $8, $9, $10, $6}}' /proc/self/mountinfo"
    result = shell(
        f"""
        offload prepare --dry-run --target {target} --config {config} > {script}
        sh -e {script}; echo "@@script rc=$?"
        {layout}; echo "@@by-script rc=0"
        ls -l {target}/dev | awk '{{print $1, $5, $6, $NF}}'; echo "@@dev-by-script rc=0"
        offload teardown --target {target} >/dev/null; echo "@@down rc=$?"
        offload prepare --target {target} --config {config} >/dev/null; echo "@@prepare rc=$?"
        {layout}; echo "@@by-prepare rc=0"
        ls -l {target}/dev | awk '{{print $1, $5, $6, $NF}}'; echo "@@dev-by-prepare rc=0"
        """
    )
    out = sections(result.stdout)
    assert out["script.rc"] == "0", result.stderr
    assert out["down.rc"] == "0" and out["prepare.rc"] == "0"
    assert out["by-script"] == out["by-prepare"]
    assert "/etc/state" in out["by-script"] and "ro," in out["by-script"]
    assert out["dev-by-script"] == out["dev-by-prepare"]


def test_prepare_status_teardown_as_an_operator_runs_them(target: str) -> None:
    result = shell(
        f"""
        scripts/offload-prepare --target {target}; echo "@@prepare rc=$?"
        offload prepare --target {target}; echo "@@again rc=$?"
        offload status --target {target}; echo "@@status rc=$?"
        offload teardown --dry-run --target {target}; echo "@@plan-down rc=$?"
        umount {target}/dev/shm
        offload status --target {target}; echo "@@status-missing rc=$?"
        offload teardown --target {target}; echo "@@teardown rc=$?"
        grep -c " {target}/" /proc/self/mountinfo; echo "@@left rc=$?"
        offload status --target {target}; echo "@@status-down rc=$?"
        """
    )
    out = sections(result.stdout)
    assert out["prepare.rc"] == "0", result.stderr
    lines = out["prepare"].splitlines()
    assert lines[0].startswith("[ 1/") and "mounted  proc on" in lines[0]
    assert "prepared" in lines[-1] and "0 already in place" in lines[-1]
    assert out["again.rc"] == "0" and " 0 new," in out["again"].splitlines()[-1]
    assert out["status.rc"] == "0"
    assert "mounted  proc" in out["status"] and "present  mknod c 1:3" in out["status"]
    umounts = out["plan-down"].splitlines()
    assert umounts[-1] == f"umount {target}/proc" and f"umount {target}/dev/pts" in umounts
    assert umounts.index(f"umount {target}/dev/pts") < umounts.index(f"umount {target}/dev")
    assert out["status-missing.rc"] == "3"
    assert any(
        line.startswith("missing") and line.endswith(f"{target}/dev/shm") for line in out["status-missing"].splitlines()
    )
    assert out["teardown.rc"] == "0" and "nothing is mounted below it" in out["teardown"]
    assert out["left"].strip() == "0"
    assert out["status-down.rc"] == "3"


def test_a_failing_step_exits_non_zero_naming_it_and_leaves_nothing(target: str, tmp_path: Path) -> None:
    config = tmp_path / "prepare.toml"
    config.write_text('[[mount]]\ntype = "tmpfs"\ntarget = "/var/tmp"\noptions = "size=lots"\n')
    result = shell(
        f"""
        offload prepare --target {target} --fail-at-step 3 2>&1; echo "@@injected rc=$?"
        offload prepare --target {target} --config {config} 2>&1; echo "@@kernel rc=$?"
        grep -c " {target}/" /proc/self/mountinfo; echo "@@left rc=$?"
        """
    )
    out = sections(result.stdout)
    assert out["injected.rc"] == "1"
    assert "offload: step 3/" in out["injected"] and "(ECANCELED)" in out["injected"]
    assert "undid the 2 changes this run had made" in out["injected"]
    assert "rollback: umount " in out["injected"]
    assert out["kernel.rc"] == "1"
    assert f"mount -t tmpfs tmpfs {target}/var/tmp: option size=lots: Invalid argument (EINVAL)" in out["kernel"]
    assert out["left"].strip() == "0"


def test_bad_config_and_missing_target_are_clear_errors(tmp_path: Path) -> None:
    config = tmp_path / "prepare.toml"
    config.write_text('hots = "x"\n')
    bad = subprocess.run(
        [str(BIN / "offload"), "prepare", "--target", str(tmp_path), "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 1 and f"{config}: unknown key hots" in bad.stderr
    missing = subprocess.run(
        [str(BIN / "offload"), "prepare", "--target", str(tmp_path / "nope"), "--config", "/nonexistent"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 1 and "does not exist" in missing.stderr


def test_busy_teardown_from_the_command_line(target: str) -> None:
    result = shell(
        f"""
        offload prepare --target {target} >/dev/null
        (cd {target}/dev/shm && exec sleep 60) &
        holder=$!
        until [ "$(readlink /proc/$holder/cwd)" = {target}/dev/shm ]; do sleep 0.05; done
        offload teardown --target {target} 2>&1; echo "@@busy rc=$?"
        offload teardown --force --target {target} 2>&1; echo "@@force rc=$?"
        kill $holder; wait $holder
        echo $holder; echo "@@pid rc=0"
        """
    )
    out = sections(result.stdout)
    pid = out["pid"].strip()
    assert out["busy.rc"] == "1", result.stderr
    assert f"cannot unmount {target}/dev/shm" in out["busy"] and f"pid {pid} (sleep: cwd)" in out["busy"]
    assert out["force.rc"] == "0" and f"detached {target}/dev/shm" in out["force"] and f"pid {pid}" in out["force"]


def test_sigterm_during_prepare_undoes_the_run(target: str, tmp_path: Path) -> None:
    # A qtfs client that hangs (a stand-in script: what is tested is how
    # prepare handles systemd's SIGTERM, not qtfs) holds prepare at its
    # first qtfs step, after all the local mounts.
    marker = tmp_path / "qtfs-started"
    hanging = tmp_path / "hanging-qtfs"
    hanging.write_text(f"#!/bin/sh\ntouch {marker}\nexec sleep 30\n")
    hanging.chmod(0o755)
    config = tmp_path / "prepare.toml"
    config.write_text(f'host = "127.0.0.1:9"\ninsecure = true\nqtfs_command = "{hanging}"\nqtfs_kernel = "no"\n')
    result = shell(
        f"""
        offload prepare --target {target} --config {config} > {tmp_path}/out 2>&1 &
        pid=$!
        while [ ! -e {marker} ]; do sleep 0.05; done
        grep -c " {target}/" /proc/self/mountinfo; echo "@@during rc=$?"
        kill -TERM $pid; wait $pid; echo "@@prepare rc=$?"
        grep -c " {target}/" /proc/self/mountinfo; echo "@@left rc=$?"
        """
    )
    out = sections(result.stdout)
    assert int(out["during"]) > 20, result.stderr
    assert out["prepare.rc"] == "130", (tmp_path / "out").read_text()
    assert out["left"].strip() == "0"
    assert "rollback: umount" in (tmp_path / "out").read_text()


def test_a_second_prepare_waits_for_the_first(target: str) -> None:
    # flock(1) on the target stands for a prepare or teardown in progress;
    # it lets go only once prepare said that it waits.
    result = shell(
        f"""
        flock {target} sh -c 'touch {target}.locked; until [ -e {target}.go ]; do sleep 0.05; done' &
        until [ -e {target}.locked ]; do sleep 0.05; done
        offload prepare --target {target} > {target}.out 2>&1 &
        prepare=$!
        until grep -q "waiting for another" {target}.out; do sleep 0.05; done
        touch {target}.go
        wait $prepare; echo "@@prepare rc=$?"
        wait
        cat {target}.out; echo "@@out rc=0"
        rm -f {target}.locked {target}.go {target}.out
        """
    )
    out = sections(result.stdout)
    assert out["prepare.rc"] == "0", out["out"]
    assert out["out"].splitlines()[0] == f"waiting for another prepare or teardown of {target} to finish"
