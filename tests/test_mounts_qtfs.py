"""prepare with a qtfs host: the real userspace qtfs server and client on loopback, in a private mount namespace."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from offload import proc
from tests.test_mounts_cli import sections, shell
from tests.test_mounts_ns import needs_root

BIN = Path(sys.executable).parent
OFFLOAD = BIN / "offload"
HAVE_QTFS = importlib.util.find_spec("offload.qtfs.cli") is not None and (BIN / "qtfs").exists()

pytestmark = [
    needs_root,
    pytest.mark.skipif(not HAVE_QTFS, reason="the userspace qtfs command (offload.qtfs.cli) is not installed"),
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse"),
]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def qtfs_serve(tmp_path: Path, *exports: Path | str) -> Iterator[str]:
    """A real `qtfs serve` on loopback (plaintext) exporting ``exports``; its address."""
    port = _free_port()
    address = f"127.0.0.1:{port}"
    argv = [*proc.program("qtfs"), "serve", "--listen", f"tcp://{address}", "--insecure"]
    argv += [arg for export in exports for arg in ("--export", str(export))]
    with open(tmp_path / "server.log", "wb") as log:
        server = proc.spawn(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"qtfs serve did not start: {(tmp_path / 'server.log').read_text()}") from None
                time.sleep(0.05)
        yield address
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.fixture
def qtfs_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    export = tmp_path / "host" / "var-lib-libvirt"
    export.mkdir(parents=True)
    (export / "hello.txt").write_text("from the host\n")
    with qtfs_serve(tmp_path, export, "/proc:ro", "/sys:ro") as address:
        yield address, export


#: A shell command: how many qtfs clients and guards serve mounts below {target} ([q]: not this script's own line).
_QTFS_PROCESSES = 'pgrep -fc "offload[.][q]tfs[.](cli mount|guard) .*{target}/"'


def _end_clients(target: str) -> list[int]:
    """qtfs clients still serving a mount under ``target`` (there should be none): end them, return their pids."""
    left = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        if any(target in arg for arg in process.info["cmdline"] or []) and process.pid != os.getpid():
            left.append(process.pid)
            process.kill()
    return left


def test_prepare_mounts_the_hosts_exports_and_facts_and_teardown_ends_the_clients(qtfs_server, tmp_path: Path) -> None:
    address, export = qtfs_server
    target = tmp_path / "another_rootfs"
    target.mkdir()
    config = tmp_path / "prepare.toml"
    # No qtfs_command: prepare runs its own installation's qtfs, with PATH or without.
    config.write_text(f'host = "{address}"\ninsecure = true\nexports = ["{export}"]\n')
    facts = f'awk \'$5 == "{target}/proc/meminfo" || $5 == "{target}/sys/devices/system" {{print $5, $8}}\' /proc/self/mountinfo'
    clients = f'pgrep -fc "offload[.][q]tfs[.]cli mount .*{target}/"'
    try:
        # As an operator runs it without activating the venv: a PATH without it.
        result = shell(
            f"""
            export PATH=/usr/bin:/bin
            {OFFLOAD} prepare --target {target} --config {config} 2>&1; echo "@@prepare rc=$?"
            {clients}; echo "@@clients rc=$?"
            cat {target}{export}/hello.txt; echo "@@read rc=$?"
            {facts}; echo "@@facts rc=0"
            sh -c 'echo $$; exec readlink {target}/proc/self'; echo "@@self rc=0"
            head -1 {target}/proc/meminfo; echo "@@meminfo rc=$?"
            {OFFLOAD} status --target {target} --config {config}; echo "@@status rc=$?"
            {OFFLOAD} prepare --target {target} --config {config} | tail -1; echo "@@again rc=$?"
            {OFFLOAD} teardown --target {target} --config {config} 2>&1; echo "@@teardown rc=$?"
            {_QTFS_PROCESSES.format(target=target)}; echo "@@after rc=$?"
            grep -c " {target}/" /proc/self/mountinfo; echo "@@left rc=$?"
            """,
            timeout=120,
        )
    finally:
        leftover_clients = _end_clients(str(target))
    out = sections(result.stdout)
    assert out["prepare.rc"] == "0", out.get("prepare", result.stderr)
    assert f"qtfs {address}:{export} on {target}{export}" in out["prepare"]
    assert out["clients"].strip() == "3"  # the export, the host's /proc and its /sys
    assert out["read"].strip() == "from the host"
    # the host's facts are bound over the target's own /proc and /sys ...
    assert out["facts"].splitlines() == [
        f"{target}/proc/meminfo fuse.qtfs",
        f"{target}/sys/devices/system fuse.qtfs",
    ]
    assert out["meminfo"].startswith("MemTotal:")
    # ... while /proc/self stays this machine's
    pid, link = out["self"].split()
    assert link == pid
    assert out["status.rc"] == "0"
    assert " 0 new," in out["again"]
    assert out["teardown.rc"] == "0" and out["left"].strip() == "0"
    assert "3 qtfs clients ended" in out["teardown"], out["teardown"]
    assert f"unmounted {target}{export} (fuse.qtfs); its qtfs client (pid " in out["teardown"]
    # Teardown returned after the clients (and their guards) had ended, not before.
    assert out["after"].strip() == "0"
    assert leftover_clients == []


def test_a_failure_after_the_qtfs_mounts_ends_their_clients(qtfs_server, tmp_path: Path) -> None:
    address, export = qtfs_server
    target = tmp_path / "another_rootfs"
    target.mkdir()
    config = tmp_path / "prepare.toml"
    config.write_text(f'host = "{address}"\ninsecure = true\nexports = ["{export}"]\n')
    try:
        result = shell(
            f"""
            last=$(offload prepare --dry-run --target {target} --config {config} | sed -n '1s/.*: \\([0-9]*\\) steps/\\1/p')
            offload prepare --target {target} --config {config} --fail-at-step $last 2>&1; echo "@@prepare rc=$?"
            {_QTFS_PROCESSES.format(target=target)}; echo "@@after rc=$?"
            grep -c " {target}/" /proc/self/mountinfo; echo "@@left rc=$?"
            """,
            timeout=120,
        )
    finally:
        leftover_clients = _end_clients(str(target))
    out = sections(result.stdout)
    assert out["prepare.rc"] == "1"
    assert "(ECANCELED)" in out["prepare"]
    for mount in (f"{target}{export}", f"{target}/run/offload/qtfs-proc", f"{target}/run/offload/qtfs-sys"):
        assert f"rollback: qtfs umount {mount}" in out["prepare"]
    assert out["after"].strip() == "0"  # the rollback waited for the clients to end
    assert out["left"].strip() == "0"
    assert leftover_clients == []


def test_teardown_force_ends_the_client_of_a_busy_qtfs_mount(qtfs_server, tmp_path: Path) -> None:
    address, export = qtfs_server
    target = tmp_path / "another_rootfs"
    target.mkdir()
    config = tmp_path / "prepare.toml"
    config.write_text(
        f'host = "{address}"\ninsecure = true\nexports = ["{export}"]\nproc_facts = false\nsys_facts = false\n'
    )
    try:
        result = shell(
            f"""
            offload prepare --target {target} --config {config} > /dev/null 2>&1; echo "@@prepare rc=$?"
            cd {target}{export} && sleep 60 &
            holder=$!
            until [ "$(readlink /proc/$holder/cwd)" = "{target}{export}" ]; do sleep 0.01; done
            offload teardown --target {target} --config {config} 2>&1; echo "@@busy rc=$?"
            offload teardown --force --target {target} --config {config} 2>&1; echo "@@force rc=$?"
            {_QTFS_PROCESSES.format(target=target)}; echo "@@after rc=$?"
            ls /proc/$holder/cwd/ 2>&1; echo "@@holder rc=$?"
            kill $holder; wait $holder
            """,
            timeout=120,
        )
    finally:
        leftover_clients = _end_clients(str(target))
    out = sections(result.stdout)
    assert out["prepare.rc"] == "0", result.stderr
    assert out["busy.rc"] == "1" and f"cannot unmount {target}{export}" in out["busy"]
    assert out["force.rc"] == "0", out["force"]
    assert f"detached {target}{export} (busy, held by: pid " in out["force"]
    assert "(sleep: cwd)); its qtfs client (pid " in out["force"] and "1 qtfs client ended" in out["force"]
    assert out["after"].strip() == "0", out["force"]
    # The holder's files there now fail (the connection was aborted), rather than being served on.
    assert out["holder.rc"] != "0" and ("aborted" in out["holder"] or "not connected" in out["holder"])
    assert leftover_clients == []
