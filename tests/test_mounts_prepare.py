"""prepare, teardown and status for real, each test in a private mount namespace (as root)."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from offload.errors import MountBusy, MountConflict, MountError
from offload.mounts import config, machine, mountinfo, ops, orchestrator, paths, syscalls
from offload.mounts import plan as plan_module
from offload.mounts.orchestrator import StepFailed
from tests.test_mounts_ns import in_private_namespace, needs_root

pytestmark = needs_root


def make_plan(target: str, cfg: config.PrepareConfig | None = None) -> plan_module.Plan:
    cfg = cfg or config.PrepareConfig()
    facts = machine.gather(target, cfg.devices)
    return plan_module.build(cfg, target, facts, lambda path: paths.resolve(target, path))


def below(target: str) -> list[mountinfo.MountEntry]:
    return mountinfo.under(mountinfo.read(), target)


@pytest.fixture
def target(tmp_path: Path) -> str:
    root = tmp_path / "another_rootfs"
    root.mkdir()
    # Like a Debian rootfs: /var/run is an absolute symlink, which must
    # resolve inside the target, never to the machine's /run.
    (root / "var").mkdir()
    (root / "var" / "run").symlink_to("/run")
    return str(root)


def test_each_mount_type_works(target: str, tmp_path: Path) -> None:
    source = tmp_path / "state"
    (source / "sub").mkdir(parents=True)
    (source / "file").write_text("state\n")
    cfg = config.PrepareConfig(
        bind=(
            config.MountSpec(source="/var/run/rexec", missing="create"),
            config.MountSpec(source=str(source), target="/srv/ro", options="ro"),
            config.MountSpec(type="rbind", source=str(source), target="/srv/tree"),
        ),
        mount=(config.MountSpec(type="tmpfs", target="/var/cache/libvirt", options="mode=0700,size=1m"),),
    )

    def body() -> dict[str, object]:
        # A submount in the source, so the rbind has something to carry.
        syscalls.mount("tmpfs", str(source / "sub"), "tmpfs", 0, "")
        Path(source / "sub" / "inner").write_text("inner\n")
        summary = orchestrator.prepare(make_plan(target, cfg))
        t = Path(target)
        by_point = {e.mount_point: e for e in below(target)}
        ptmx = os.open(t / "dev" / "ptmx", os.O_RDWR | os.O_NOCTTY)
        try:
            pts = sorted(os.listdir(t / "dev" / "pts"))
        finally:
            os.close(ptmx)
        try:
            (t / "srv" / "ro" / "new").write_text("x")
            ro_error = 0
        except OSError as exc:
            ro_error = exc.errno or 0
        with open(t / "dev" / "zero", "rb") as zero:
            zeros = zero.read(4)
        return {
            "done": summary.done,
            "types": {p[len(target) :]: e.fstype for p, e in by_point.items()},
            "self": os.readlink(t / "proc" / "self") == str(os.getpid()),
            "sysfs_kernel": (t / "sys" / "kernel").is_dir(),
            "pts": pts,
            "zeros": zeros,
            "null": os.major(os.stat(t / "dev" / "null").st_rdev),
            "ro_error": ro_error,
            "ro_reads": (t / "srv" / "ro" / "file").read_text(),
            "rbind_inner": (t / "srv" / "tree" / "sub" / "inner").read_text(),
            "rexec_bind": by_point[f"{target}/run/rexec"].fstype,
            "shm_mode": oct(os.stat(t / "dev" / "shm").st_mode & 0o7777),
        }

    found = in_private_namespace(body)
    types = found["types"]
    assert isinstance(types, dict)
    for point, fstype in {
        "/proc": "proc",
        "/sys": "sysfs",
        "/dev": "tmpfs",
        "/dev/pts": "devpts",
        "/dev/shm": "tmpfs",
        "/dev/mqueue": "mqueue",
        "/run": "tmpfs",
        "/var/cache/libvirt": "tmpfs",
    }.items():
        assert types[point] == fstype, point
    if "hugetlbfs" in machine.filesystems():
        assert types["/dev/hugepages"] == "hugetlbfs"
    assert "devtmpfs" not in types.values()
    assert {"/srv/ro", "/srv/tree", "/srv/tree/sub"} <= set(types)  # the rbind brought the submount along
    assert found["self"] and found["sysfs_kernel"]
    assert found["pts"] == ["0", "ptmx"]  # a new devpts instance numbers from 0
    assert found["zeros"] == b"\0\0\0\0" and found["null"] == 1
    assert found["ro_error"] == errno.EROFS and found["ro_reads"] == "state\n"
    assert found["rbind_inner"] == "inner\n"
    assert found["shm_mode"] == "0o1777"
    # /var/run/rexec resolved inside the target, as /run/rexec there
    assert found["rexec_bind"] == "tmpfs"


def test_a_second_run_changes_nothing(target: str) -> None:
    def body() -> tuple[int, int, int, list[str], list[str]]:
        plan = make_plan(target)
        first = orchestrator.prepare(plan)
        before = [f"{e.mount_point} {e.fstype} {e.device}" for e in below(target)]
        second = orchestrator.prepare(make_plan(target))
        after = [f"{e.mount_point} {e.fstype} {e.device}" for e in below(target)]
        return first.done, second.done, second.already, before, after

    first_done, second_done, second_already, before, after = in_private_namespace(body)
    assert first_done > 20 and second_done == 0
    assert second_already == first_done
    assert before == after


def test_a_wrong_mount_is_an_error_with_a_hint_and_the_run_is_undone(target: str) -> None:
    def body() -> tuple[str, list[str]]:
        os.makedirs(f"{target}/dev")
        syscalls.mount("sysfs", f"{target}/dev", "sysfs", 0, "")  # wrong: sysfs where the /dev tmpfs goes
        with pytest.raises(StepFailed) as caught:
            orchestrator.prepare(make_plan(target))
        return str(caught.value), [f"{e.mount_point[len(target) :]} {e.fstype}" for e in below(target)]

    message, left = in_private_namespace(body)
    assert "sysfs (sysfs) is mounted there, expected tmpfs (tmpfs)" in message
    assert "offload teardown" in message and "umount" in message
    # proc, sysfs and the cgroups this run mounted are gone; what was there before stays
    assert left == ["/dev sysfs"]


def test_a_wrong_mount_found_on_its_own_is_a_conflict(target: str) -> None:
    def body() -> tuple[str, str]:
        os.makedirs(f"{target}/proc")
        syscalls.mount("tmpfs", f"{target}/proc", "tmpfs", 0, "")
        step = make_plan(target).steps[0]
        assert step.check(mountinfo.read()).state == ops.WRONG
        with pytest.raises(MountConflict) as caught:
            step.execute(orchestrator._Run(contextlib.ExitStack(), print, target))
        # the right mount, covered by another one, is wrong too
        syscalls.umount(f"{target}/proc")
        syscalls.mount("proc", f"{target}/proc", "proc", 0, "")
        syscalls.mount("tmpfs", f"{target}/proc", "tmpfs", 0, "")
        return str(caught.value), step.check(mountinfo.read()).detail

    message, covered = in_private_namespace(body)
    assert "tmpfs (tmpfs) is mounted there, expected proc (proc)" in message
    assert covered == "tmpfs (tmpfs) is mounted there on top of the planned mounts"


STEP_COUNT = len(make_plan("/nonexistent-offm-target").steps)


@pytest.mark.parametrize("step", range(1, STEP_COUNT + 1))
def test_a_failure_at_any_step_leaves_nothing_behind(target: str, step: int) -> None:
    def body() -> tuple[str, int | None, list[str], list[str]]:
        plan = make_plan(target)
        with pytest.raises(StepFailed) as caught:
            orchestrator.prepare(plan, fail_at=step)
        dev = Path(target) / "dev"
        leftovers = sorted(p.name for p in dev.iterdir()) if dev.is_dir() else []
        return str(caught.value), caught.value.errno, [e.mount_point for e in below(target)], leftovers

    message, number, left, dev_entries = in_private_namespace(body)
    assert f"step {step}/{STEP_COUNT}" in message and "ECANCELED" in message
    assert number == errno.ECANCELED
    assert left == []
    # nodes and links made on an existing /dev would be removed too; here
    # they lived on the tmpfs, and only the mountpoint directories remain
    assert all((Path(target) / "dev" / name).is_dir() for name in dev_entries)


def test_a_kernel_error_names_the_mount_and_errno_and_undoes_the_run(target: str) -> None:
    cfg = config.PrepareConfig(mount=(config.MountSpec(type="tmpfs", target="/var/tmp", options="size=lots"),))

    def body() -> tuple[str, int | None, str, list[str]]:
        with pytest.raises(StepFailed) as caught:
            orchestrator.prepare(make_plan(target, cfg))
        return str(caught.value), caught.value.errno, caught.value.path, [e.mount_point for e in below(target)]

    message, number, path, left = in_private_namespace(body)
    assert number == errno.EINVAL and "(EINVAL)" in message
    assert f"mount -t tmpfs tmpfs {target}/var/tmp" in message
    assert path == f"{target}/var/tmp"
    assert "undid the" in message
    assert left == []


def test_teardown_leaves_nothing_below_the_target_and_keeps_the_target_itself(target: str) -> None:
    def body() -> tuple[int, list[str], list[str]]:
        syscalls.mount(target, target, None, syscalls.MS_BIND)  # the target is a mount of its own (overlay, ...)
        orchestrator.prepare(make_plan(target))
        os.makedirs(f"{target}/mnt/extra")
        syscalls.mount("tmpfs", f"{target}/mnt/extra", "tmpfs", 0, "")  # not from the plan: goes too
        syscalls.mount("tmpfs", f"{target}/dev/shm", "tmpfs", 0, "")  # stacked on one of the plan's
        summary = orchestrator.teardown(target)
        entries = mountinfo.read()
        return (
            summary.unmounted,
            [e.mount_point for e in mountinfo.under(entries, target)],
            [e.mount_point for e in mountinfo.stack_at(entries, target)],
        )

    unmounted, left, itself = in_private_namespace(body)
    assert unmounted > 20 and left == [] and itself == [target]


def test_a_busy_mount_names_its_holders_and_force_detaches_it(target: str) -> None:
    def body() -> dict[str, object]:
        orchestrator.prepare(make_plan(target))
        holder = subprocess.Popen(["sleep", "60"], cwd=f"{target}/dev/shm")
        try:
            with pytest.raises(MountBusy) as caught:
                orchestrator.teardown(target)
            still = [e.mount_point[len(target) :] for e in below(target)]
            lines: list[str] = []
            summary = orchestrator.teardown(target, force=True, report=lines.append)
            left = [e.mount_point for e in below(target)]
            cwd_after = os.readlink(f"/proc/{holder.pid}/cwd")
        finally:
            holder.send_signal(signal.SIGKILL)
            holder.wait()
        return {
            "error": str(caught.value),
            "holders": caught.value.holders,
            "pid": holder.pid,
            "still": still,
            "lazily": summary.lazily,
            "force_holders": summary.holders,
            "left": left,
            "lines": lines,
            "cwd_after": cwd_after,
        }

    found = in_private_namespace(body)
    pid = found["pid"]
    assert f"pid {pid} (sleep: cwd)" in found["holders"]
    assert "EBUSY" in found["error"] and "--force" in found["error"]
    # everything not above the busy mount came down; the busy one and its parents stayed
    assert found["still"] == ["/dev", "/dev/shm"]
    assert found["lazily"] == 1 and f"pid {pid} (sleep: cwd)" in found["force_holders"]
    assert any("detached" in line and "sleep" in line for line in found["lines"])
    assert found["left"] == []
    # the detached mount lives on for its last user, outside the tree
    assert not str(found["cwd_after"]).startswith(target)


def test_cgroup_mounts_are_the_machines_own_hierarchies(target: str) -> None:
    machine_cgroups = [
        (e.mount_point, e.fstype, e.device, e.super_options)
        for e in mountinfo.read()
        if e.fstype in ("cgroup", "cgroup2") and e.mount_point.startswith("/sys/fs/cgroup")
    ]
    if not machine_cgroups:
        pytest.skip("this machine mounts no cgroup hierarchy under /sys/fs/cgroup")

    def body() -> list[tuple[str, str, str, tuple[str, ...]]]:
        orchestrator.prepare(make_plan(target))
        return [
            (e.mount_point[len(target) :], e.fstype, e.device, e.super_options)
            for e in below(target)
            if e.fstype in ("cgroup", "cgroup2")
        ]

    mirrored = in_private_namespace(body)
    # The same mount points, the same controllers and the same hierarchies
    # (a v1 mount of an existing controller set joins its hierarchy: same device).
    assert mirrored == machine_cgroups


def test_status_compares_plan_and_reality(target: str) -> None:
    def body() -> tuple[dict[str, str], dict[str, str], list[str]]:
        plan = make_plan(target)
        before = {row.path: row.state for row in orchestrator.status(plan)}
        orchestrator.prepare(plan)
        syscalls.umount(f"{target}/dev/mqueue")
        syscalls.mount("tmpfs", f"{target}/dev/mqueue", "tmpfs", 0, "")
        syscalls.umount(f"{target}/dev/shm")
        os.makedirs(f"{target}/mnt/x")
        syscalls.mount("tmpfs", f"{target}/mnt/x", "tmpfs", 0, "")
        rows = orchestrator.status(plan)
        after = {row.path: row.state for row in rows}
        extra = [row.path for row in rows if row.state == orchestrator.EXTRA]
        return before, after, extra

    before, after, extra = in_private_namespace(body)
    assert before[f"{target}/proc"] == "missing" and before[f"{target}/dev/null"] == "missing"
    assert after[f"{target}/proc"] == "mounted" and after[f"{target}/dev/null"] == "present"
    assert after[f"{target}/dev/shm"] == "missing"
    assert after[f"{target}/dev/mqueue"] == "wrong"
    assert extra == [f"{target}/mnt/x"]


def test_a_node_made_on_an_existing_dev_is_removed_on_failure(target: str) -> None:
    cfg = config.PrepareConfig(mount=(config.MountSpec(type="tmpfs", target="/zz", options="size=lots"),))

    def body() -> tuple[list[str], list[str]]:
        os.makedirs(f"{target}/dev")
        syscalls.mount("tmpfs", f"{target}/dev", "tmpfs", 0, "")
        # a /dev tmpfs that is "ours" already (source tmpfs): the plan reuses it
        with pytest.raises(StepFailed):
            orchestrator.prepare(make_plan(target, cfg))
        return sorted(os.listdir(f"{target}/dev")), [e.mount_point for e in below(target)]

    dev_entries, left = in_private_namespace(body)
    assert left == [f"{target}/dev"]
    assert "null" not in dev_entries and "ptmx" not in dev_entries


def test_qtfs_program_failure_is_reported_and_undone(target: str, tmp_path: Path) -> None:
    # /bin/false stands in for a qtfs client that cannot reach its server:
    # what is tested is the orchestrator's handling, not qtfs.
    cfg = config.PrepareConfig(host="127.0.0.1:9", qtfs_command="/bin/false", qtfs_kernel="no")

    def body() -> tuple[str, list[str]]:
        with pytest.raises(StepFailed) as caught:
            orchestrator.prepare(make_plan(target, cfg))
        return str(caught.value), [e.mount_point for e in below(target)]

    message, left = in_private_namespace(body)
    assert "/bin/false mount --pki /etc/offload/pki 127.0.0.1:9:/var/lib/libvirt" in message
    assert "status 1" in message and left == []


def test_a_missing_qtfs_program_fails_its_step(target: str) -> None:
    cfg = config.PrepareConfig(host="127.0.0.1:9", qtfs_command="/nonexistent/qtfs", qtfs_kernel="no")

    def body() -> tuple[str, list[str]]:
        with pytest.raises(StepFailed) as caught:
            orchestrator.prepare(make_plan(target, cfg))
        return str(caught.value), [e.mount_point for e in below(target)]

    message, left = in_private_namespace(body)
    assert "(qtfs 127.0.0.1:9:/var/lib/libvirt on" in message and "status 127" in message
    assert "command not found" in message and left == []


def test_prepare_and_teardown_are_fast_enough_to_count_in_the_bench_only(target: str) -> None:
    # No timing assertion here (the bench measures); this checks the summary
    # carries the figure the CLI prints.
    def body() -> tuple[float, float]:
        started = time.monotonic()
        summary = orchestrator.prepare(make_plan(target))
        down = orchestrator.teardown(target)
        return summary.seconds, time.monotonic() - started - down.seconds

    up, rest = in_private_namespace(body)
    assert 0 < up <= rest


def test_errors_carry_the_errno_name() -> None:
    exc = MountError("x", path="/p", errno=errno.EBUSY)
    assert exc.errno_name == "EBUSY" and exc.path == "/p"


def partitions_plan(target: str, *, run_tmpfs: bool) -> plan_module.Plan:
    """The steps that publish the shim's partition map, with or without the target's /run tmpfs below it."""
    path = paths.resolve(target, plan_module.CGROUP_PARTITIONS_FILE)
    steps: list[ops.Step] = [ops.WriteFile(path=path, content="cpu=/offload/machine=/machine")]
    if run_tmpfs:
        steps.append(ops.MountOp(path=paths.resolve(target, "/run"), fstype="tmpfs", source="tmpfs"))
    return plan_module.Plan(target, plan_module.order(steps))


@pytest.mark.parametrize("run_tmpfs", [True, False], ids=["on-run-tmpfs", "on-the-rootfs"])
def test_prepare_writes_the_shims_partition_map_and_teardown_removes_it(target: str, run_tmpfs: bool) -> None:
    published = f"{target}{plan_module.CGROUP_PARTITIONS_FILE}"

    def body() -> dict[str, object]:
        plan = partitions_plan(target, run_tmpfs=run_tmpfs)
        first = orchestrator.prepare(plan)
        found = {"text": Path(published).read_text(), "mode": oct(os.stat(published).st_mode & 0o777)}
        found["fs"] = [e.fstype for e in mountinfo.stack_at(mountinfo.read(), f"{target}/run")]
        Path(published).write_text("stale\n")  # a different map: the next prepare replaces it
        second = orchestrator.prepare(plan)
        found["rewritten"] = Path(published).read_text()
        found["done"] = (first.done, second.done, orchestrator.prepare(plan).already)
        orchestrator.teardown(target)
        found["after"] = os.path.exists(published)
        return found

    found = in_private_namespace(body)
    assert found["text"] == "cpu=/offload/machine=/machine\n" and found["mode"] == "0o644"
    assert found["fs"] == (["tmpfs"] if run_tmpfs else [])
    assert found["rewritten"] == "cpu=/offload/machine=/machine\n"
    assert found["done"] == ((2, 1, 2) if run_tmpfs else (1, 1, 1))
    assert found["after"] is False


def test_the_partition_map_is_never_written_through_a_symlink(target: str, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    os.makedirs(f"{target}/run")

    def body() -> tuple[str, list[str]]:
        plan = partitions_plan(target, run_tmpfs=False)
        # Planted after the plan was made, as a peer's mount could show one.
        os.symlink(os.path.relpath(outside, f"{target}/run"), f"{target}/run/offload")
        with pytest.raises(StepFailed) as caught:
            orchestrator.prepare(plan)
        return str(caught.value), os.listdir(outside)

    message, written = in_private_namespace(body)
    assert written == [] and "symlink" in message
