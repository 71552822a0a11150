"""Floods while a VM runs: from the network and from a local user, in the whole lab.

libvirtd on the DPU side starts a guest whose qemu runs on the host side;
then the DPU's network namespace floods the host's rexec_server and
udsproxyd peer ports and the qtfs server (connections that never speak,
and some that send garbage), and the DPU's user ``nobody`` floods the DPU's
rexec agent socket and udsproxyd shim socket.  Both floods are bounded in
time and close every socket before anything is judged.  Judged by effect:
every daemon keeps its pid, the guest's qemu keeps its pid, libvirt says
the domain runs and its monitor answers, and a new rexec session works.
"""

from __future__ import annotations

import json
import subprocess
import sys

import psutil
import pytest

from offload import proc
from offload.lab.lab import LAB_PEER_LIMIT, QTFS_PORT, REXEC_PORT, UDSPROXY_PORT, Lab
from offload.lab.libvirt import Virsh, qemu_processes, wait_for_marker
from tests.conftest import rexec, wait_for
from tests.test_e2e_libvirt import cleanup, console_of, start_guest, virsh, vlab

pytestmark = [pytest.mark.lab, pytest.mark.timeout(600)]

__all__ = ["virsh", "vlab"]

#: Per target: connections that never speak, then connections that send garbage.
SILENT = 300
GARBAGE = 40
#: How long the flood holds its connections (the daemons meanwhile hold their slots).
HOLD = 3.0
#: What a flood may take at most, connecting, holding and closing.
FLOOD_TIMEOUT = 90

#: The flooder: stdlib only, so that ``nobody`` can run it with the system's python.
#: Arguments: targets as tcp:ADDRESS:PORT or unix:PATH.  Prints, per target,
#: how many of its connections were established.
FLOODER = r"""
import json, os, resource, selectors, socket, sys, time
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
SILENT, GARBAGE, HOLD = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
held, selector, connected = [], selectors.DefaultSelector(), {}
try:
    for target in sys.argv[4:]:
        kind, _, where = target.partition(":")
        connected[target] = 0
        for index in range(SILENT + GARBAGE):
            if kind == "tcp":
                address, port = where.rsplit(":", 1)
                sock, peer = socket.socket(socket.AF_INET, socket.SOCK_STREAM), (address, int(port))
            else:
                sock, peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM), where
            sock.setblocking(False)
            held.append(sock)
            try:
                sock.connect(peer)
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                continue
            selector.register(sock, selectors.EVENT_WRITE, (target, index >= SILENT))
    deadline = time.monotonic() + 10
    while selector.get_map() and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=max(0.0, deadline - time.monotonic())):
            selector.unregister(key.fileobj)
            target, garbage = key.data
            if key.fileobj.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0:
                continue
            connected[target] += 1
            if garbage:
                try:
                    key.fileobj.send(os.urandom(4096))
                except OSError:
                    pass
    time.sleep(HOLD)
finally:
    for sock in held:
        sock.close()
print(json.dumps(connected))
"""

#: Every daemon the lab with libvirt runs, by its key in the lab's state.
DAEMONS = ("host-rexec", "dpu-rexec", "host-udsproxy", "dpu-udsproxy", "host-qtfs", "dpu-virtlogd", "dpu-libvirtd")


def flood(argv: list[str], targets: list[str]) -> subprocess.Popen:
    return proc.spawn(
        [*argv, "-c", FLOODER, str(SILENT), str(GARBAGE), str(HOLD), *targets],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(flooder: subprocess.Popen) -> dict[str, int]:
    """The flooder's counts once it has closed every socket and exited."""
    out, err = flooder.communicate(timeout=FLOOD_TIMEOUT)
    assert flooder.returncode == 0, err
    return json.loads(out)


def alive(process: psutil.Process) -> bool:
    # is_running() compares the start time too: a reused pid is not the same process.
    return process.is_running() and process.status() != psutil.STATUS_ZOMBIE


def test_daemons_and_a_running_vm_outlive_floods_from_the_network_and_a_local_user(vlab: Lab, virsh: Virsh) -> None:
    name = "flood-vm"
    flooders: list[subprocess.Popen] = []
    try:
        domain = start_guest(vlab, virsh, name)
        wait_for_marker(lambda: console_of(vlab, domain))
        [qemu] = qemu_processes(name)
        daemons = {key: psutil.Process(vlab.program_pid(key)) for key in DAEMONS}
        host = vlab.host.link.address
        network = [f"tcp:{host}:{port}" for port in (REXEC_PORT, UDSPROXY_PORT, QTFS_PORT)]
        local = [f"unix:{vlab.dpu.run_dir / 'rexec.sock'}", f"unix:{vlab.dpu.run_dir / 'udsproxy' / 'udsproxy.sock'}"]
        nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "/usr/bin/python3", "-I"]
        flooders.append(flood(vlab.command("dpu", [sys.executable, "-I"], cwd="/"), network))
        flooders.append(flood(vlab.command("dpu", nobody, cwd="/"), local))
        from_network, from_nobody = (finish(flooder) for flooder in flooders)

        # The floods reached their targets: each took far more than one slot.
        for target in network:
            assert from_network[target] >= 100, from_network
        for target in local:
            assert from_nobody[target] >= 100, from_nobody
        # ... and pressed every daemon to its per-peer limit (the lab's).
        at_limit = f"{LAB_PEER_LIMIT} open from it"
        for key in ("host-rexec", "host-udsproxy", "host-qtfs", "dpu-rexec", "dpu-udsproxy"):
            log = vlab.dir / f"{key}.log"
            wait_for(lambda log=log: at_limit in log.read_text(errors="replace"), 30, f"{key} at its limit")

        dead = [key for key, process in daemons.items() if not alive(process)]
        assert dead == [], f"ended by the flood: {dead}"
        assert alive(qemu)
        assert [p.pid for p in qemu_processes(name)] == [qemu.pid]
        assert virsh.state(name) == "running"
        status = virsh("qemu-monitor-command", "--pretty", name, '{"execute":"query-status"}')
        assert '"running": true' in status

        # A new session, through the DPU's agent socket and the host's peer
        # port: the daemons notice the flood's closed connections as they
        # read them, so the first try may still meet a full slot.
        def new_session() -> bool:
            done = rexec(vlab, "/bin/sh", "-c", "echo after-the-flood", text=True, timeout=30)
            return done.returncode == 0 and done.stdout == "after-the-flood\n"

        wait_for(new_session, 60, "a new rexec session after the floods")
        assert all(alive(process) for process in daemons.values())
    finally:
        for flooder in flooders:
            if flooder.poll() is None:
                flooder.kill()
            flooder.wait()
        cleanup(virsh, name)
