"""A domain as nova-compute defines and manages one, driven from the DPU side by a python-libvirt client.

One whole lab for the module (the test lab's name with a "k").  The client
(tests/nova_client.py) runs on the DPU side with Debian's python3-libvirt,
its event loop registered as nova-compute registers it, and answers one
JSON request at a time; every step is then checked by its effect on the
host side: the host's qemu process, its open files, its threads' affinity,
its cgroup files, its console log, its VNC listener and its own QMP answers.

The domain is nova's shape: a qcow2 overlay on a backing file, a pty serial
and console with a log file, VNC, a virtio balloon with a stats period,
virtio-rng, user networking, ``<cputune>`` and ``<memtune>``.  The tests
run in order on one domain, as an instance lives: started, tuned, paused,
given a disk, reset, suspended to disk and restored, destroyed, undefined.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import queue
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from xml.etree import ElementTree
from xml.sax.saxutils import escape

import psutil
import pytest

from offload import proc
from offload.lab import SERVICES, dpu_libvirt, guest
from offload.lab.lab import Lab
from offload.lab.libvirt import IMAGES, Domain, guest_domain, install_argv, qemu_processes, wait_for_marker
from tests.conftest import keep_logs
from tests.test_e2e_libvirt import console_of, wait_until
from tests.test_nova_tuning import vcpu_tid
from tests.test_vm_fds import goes_on_from

SYSTEM_PYTHON = "/usr/bin/python3"
HAS_PYTHON_LIBVIRT = proc.run([SYSTEM_PYTHON, "-c", "import libvirt"], check=False).returncode == 0

pytestmark = [
    pytest.mark.lab,
    pytest.mark.timeout(600),
    pytest.mark.skipif(not HAS_PYTHON_LIBVIRT, reason="python3-libvirt is not installed (make setup installs it)"),
]

NAME = "nova-1"
CLIENT = Path(__file__).with_name("nova_client.py")
BASE = IMAGES / "nova-base.qcow2"
OVERLAY = IMAGES / "nova-disk.qcow2"
HOTPLUG = IMAGES / "nova-hot.qcow2"
SHARES = 2048
#: <memtune>'s soft limit.  A hard limit also makes libvirt raise qemu's
#: RLIMIT_MEMLOCK to it in the child it forks before exec, which needs
#: CAP_SYS_RESOURCE: root on this kind of machine lacks it, with or without offload.
SOFT_LIMIT_MIB = 1024
STATS_PERIOD = 10
#: virDomainModificationImpact's VIR_DOMAIN_AFFECT_LIVE.
AFFECT_LIVE = 1


@dataclasses.dataclass(frozen=True)
class NovaDomain(Domain):
    """The lab's guest as nova-compute would define it (kernel boot aside)."""

    disk: str = str(OVERLAY)
    vcpu_pin: int = 0

    def xml(self) -> str:
        log = escape(self.console_log)
        return f"""<domain type='{self.type}'>
  <name>{escape(self.name)}</name>
  <memory unit='MiB'>{self.memory_mib}</memory>
  <currentMemory unit='MiB'>{self.memory_mib}</currentMemory>
  <vcpu placement='static'>1</vcpu>
  <cputune>
    <shares>{SHARES}</shares>
    <vcpupin vcpu='0' cpuset='{self.vcpu_pin}'/>
  </cputune>
  <memtune>
    <soft_limit unit='MiB'>{SOFT_LIMIT_MIB}</soft_limit>
  </memtune>
  <sysinfo type='smbios'>
    <system>
      <entry name='manufacturer'>OpenStack Foundation</entry>
      <entry name='product'>OpenStack Nova</entry>
    </system>
  </sysinfo>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{escape(self.kernel)}</kernel>
    <initrd>{escape(self.initrd)}</initrd>
    <cmdline>console=ttyS0 panic=-1 quiet</cmdline>
    <smbios mode='sysinfo'/>
  </os>
  <features>
    <acpi/>
    <apic/>
  </features>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{escape(self.emulator)}</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{escape(self.disk)}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='user'>
      <model type='virtio'/>
    </interface>
    <serial type='pty'>
      <log file='{log}' append='off'/>
      <target port='0'/>
    </serial>
    <console type='pty'>
      <log file='{log}' append='off'/>
      <target type='serial' port='0'/>
    </console>
    <graphics type='vnc' autoport='yes' listen='127.0.0.1'>
      <listen type='address' address='127.0.0.1'/>
    </graphics>
    <memballoon model='virtio'>
      <stats period='{STATS_PERIOD}'/>
    </memballoon>
    <rng model='virtio'>
      <backend model='random'>/dev/urandom</backend>
    </rng>
  </devices>
</domain>
"""


def hotplug_disk_xml() -> str:
    return f"""<disk type='file' device='disk'>
  <driver name='qemu' type='qcow2'/>
  <source file='{HOTPLUG}'/>
  <target dev='vdb' bus='virtio'/>
</disk>
"""


class ClientError(Exception):
    pass


class NovaClient:
    """tests/nova_client.py on the DPU side: one request, one answer."""

    def __init__(self, lab: Lab) -> None:
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
        argv = [SYSTEM_PYTHON, "-I", str(CLIENT), dpu_libvirt.virsh(lab).uri]
        with open(lab.dir / "nova-client.log", "ab") as log:
            self._process = proc.spawn(
                lab.command("dpu", argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env, text=True
            )
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        try:
            assert self._answer(60) == "ready"
        except BaseException:
            self.close()
            raise

    def _read(self) -> None:
        assert self._process.stdout is not None
        for line in self._process.stdout:
            self._lines.put(line)
        self._lines.put("")

    def _answer(self, timeout: float) -> object:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise ClientError(f"no answer from the client in {timeout} s") from None
        if not line:
            raise ClientError("the client ended (see nova-client.log in the lab's logs)")
        reply = json.loads(line)
        if not reply["ok"]:
            raise ClientError(reply["error"])
        return reply["result"]

    def request(self, op: str, timeout: float = 120, **arguments: object) -> object:
        assert self._process.stdin is not None
        self._process.stdin.write(json.dumps({"op": op, **arguments}) + "\n")
        self._process.stdin.flush()
        return self._answer(timeout)

    def call(self, method: str, *args: object, timeout: float = 120) -> object:
        return self.request("call", name=NAME, method=method, args=list(args), timeout=timeout)

    def monitor(self, command: str, **arguments: object) -> dict:
        qmp = {"execute": command, **({"arguments": arguments} if arguments else {})}
        answer = self.request("monitor", name=NAME, command=json.dumps(qmp))
        assert isinstance(answer, dict) and "return" in answer, answer
        return answer

    def event(self, kind: str, timeout: float = 60) -> dict:
        found = self.request("wait_event", name=NAME, kind=kind, timeout=timeout)
        assert isinstance(found, dict)
        return found

    def close(self) -> None:
        try:
            assert self._process.stdin is not None
            self._process.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self._process.stdin.close()
            self._process.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            pass
        finally:
            if self._process.poll() is None:  # a reaped child's pid may be another process's by now
                proc.end_pid(self._process.pid)
                self._process.wait(10)


@dataclasses.dataclass
class Instance:
    lab: Lab
    client: NovaClient
    domain: NovaDomain

    def console(self) -> str:
        return console_of(self.lab, self.domain)

    def qemu(self) -> psutil.Process:
        (found,) = qemu_processes(NAME)
        return found

    def open_files(self) -> set[str]:
        qemu = self.qemu()
        found = set()
        for fd in os.listdir(f"/proc/{qemu.pid}/fd"):
            with contextlib.suppress(OSError):  # closed meanwhile
                found.add(os.readlink(f"/proc/{qemu.pid}/fd/{fd}"))
        return found

    def group(self, controller: str) -> Path:
        """The host's cgroup directory libvirt made for the domain (machine name "qemu-ID-NAME", no systemd)."""
        (found,) = self.lab.host_partitions[controller].glob(f"qemu-*-{NAME}.libvirt-qemu")
        return found


def on_host(lab: Lab, *argv: str) -> str:
    return proc.run(lab.command("host", list(argv))).stdout


@pytest.fixture(scope="module")
def klab() -> Iterator[Lab]:
    lab = Lab(os.environ.get("OFFLOAD_TEST_LAB", "offt")[:8] + "k")
    lab.down()
    image = guest.build()
    try:
        lab.up(only=list(SERVICES))
        proc.run(lab.command("host", install_argv(image)))
        # The instance's disk: a qcow2 overlay on a base image, as nova's image cache makes them.
        on_host(lab, "qemu-img", "create", "-q", "-f", "qcow2", str(BASE), "64M")
        on_host(lab, "qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(BASE), str(OVERLAY))
        on_host(lab, "qemu-img", "create", "-q", "-f", "qcow2", str(HOTPLUG), "16M")
        yield lab
    finally:
        keep_logs(lab)
        lab.down()


@pytest.fixture(scope="module")
def instance(klab: Lab) -> Iterator[Instance]:
    client = NovaClient(klab)
    base = guest_domain(NAME, guest.build())
    domain = NovaDomain(base.name, base.kernel, base.initrd, vcpu_pin=max(os.sched_getaffinity(0)))
    try:
        yield Instance(klab, client, domain)
    finally:
        for step in ("destroy", "undefine"):
            proc.run(dpu_libvirt.virsh(klab).argv(step, NAME), check=False)
        client.close()
        wait_until(lambda: not qemu_processes(NAME), 15, "qemu gone")


def test_define_and_start(instance: Instance) -> None:
    client = instance.client
    assert client.request("define", xml=instance.domain.xml()) == NAME
    assert client.event("lifecycle:DEFINED")["detail"] == "ADDED"
    client.call("create")
    assert client.event("lifecycle:STARTED")["detail"] == "BOOTED"
    wait_for_marker(instance.console)
    # qemu runs on the host side, with the overlay and its backing file open.
    qemu = instance.qemu()
    assert os.readlink(f"/proc/{qemu.pid}/ns/net") == instance.lab.netns_id("host")
    assert {str(OVERLAY), str(BASE)} <= instance.open_files()


def test_devices_are_the_host_qemus(instance: Instance) -> None:
    client, lab = instance.client, instance.lab
    live = ElementTree.fromstring(str(client.call("XMLDesc", 0)))
    # VNC: the host's qemu answers on the port libvirt reports.
    graphics = live.find("devices/graphics[@type='vnc']")
    assert graphics is not None
    port = int(graphics.get("port", "-1"))
    probe = f"import socket; print(socket.create_connection(('127.0.0.1', {port}), 10).recv(12))"
    assert "RFB 003" in on_host(lab, sys.executable, "-c", probe)
    # The balloon polls the guest's statistics at the period asked for.
    balloon = client.monitor("qom-get", path="/machine/peripheral/balloon0", property="guest-stats-polling-interval")
    assert balloon["return"] == STATS_PERIOD
    # virtio-rng reads the host's /dev/urandom.
    assert client.monitor("qom-get", path="/objects/objrng0", property="filename")["return"] == "/dev/urandom"
    # User networking.
    network = client.monitor("human-monitor-command", **{"command-line": "info network"})["return"]
    assert "type=user" in network, network


def test_define_time_tuning_is_the_hosts(instance: Instance) -> None:
    assert int((instance.group("cpu") / "cpu.shares").read_text()) == SHARES
    assert int((instance.group("memory") / "memory.soft_limit_in_bytes").read_text()) == SOFT_LIMIT_MIB << 20
    qemu = instance.qemu()
    assert os.sched_getaffinity(vcpu_tid(qemu)) == {instance.domain.vcpu_pin}
    pins = instance.client.call("vcpuPinInfo", 0)
    assert isinstance(pins, list)
    assert [cpu for cpu, pinned in enumerate(pins[0]) if pinned] == [instance.domain.vcpu_pin]


def test_memory_stats_are_the_host_qemus(instance: Instance) -> None:
    stats = instance.client.call("memoryStats")
    assert isinstance(stats, dict)
    with open(f"/proc/{instance.qemu().pid}/status") as status:
        host_rss = int(re.search(r"VmRSS:\s*(\d+)", status.read()).group(1))  # type: ignore[union-attr]
    assert abs(stats["rss"] - host_rss) <= host_rss * 0.1, (stats, host_rss)
    assert stats["actual"] == instance.domain.memory_mib * 1024


#: How long a paused guest is watched; a running one prints a tick every second.
PAUSE_WATCH = 4.0


def test_suspend_and_resume(instance: Instance) -> None:
    client = instance.client
    wait_until(lambda: len(guest.ticks(instance.console())) >= 2, 60, "the guest counts")
    client.call("suspend")
    assert client.event("lifecycle:SUSPENDED")["detail"] == "PAUSED"
    assert client.monitor("query-status")["return"]["status"] == "paused"
    # Watched for a while, a paused guest prints at most the tick already on its way.
    before = guest.ticks(instance.console())[-1]
    with pytest.raises(AssertionError):
        wait_until(lambda: guest.ticks(instance.console())[-1] > before + 1, PAUSE_WATCH, "a paused guest counts")
    stopped_at = guest.ticks(instance.console())[-1]
    client.call("resume")
    assert client.event("lifecycle:RESUMED")["detail"] == "UNPAUSED"
    wait_until(lambda: guest.ticks(instance.console())[-1] > stopped_at, 30, "the resumed guest counts on")
    assert guest.MARKER not in instance.console().split(guest.MARKER, 1)[1]


def block_files(client: NovaClient) -> set[str]:
    return {device["inserted"]["file"] for device in client.monitor("query-block")["return"] if "inserted" in device}


def test_disk_hotplug_and_unplug(instance: Instance) -> None:
    client = instance.client
    client.call("attachDeviceFlags", hotplug_disk_xml(), AFFECT_LIVE)
    assert str(HOTPLUG) in block_files(client)
    wait_until(lambda: str(HOTPLUG) in instance.open_files(), 10, "the host's qemu opened the new disk")

    client.call("detachDeviceFlags", hotplug_disk_xml(), AFFECT_LIVE)
    assert client.event("device-removed")["detail"] == "virtio-disk1"
    assert str(HOTPLUG) not in block_files(client)
    wait_until(lambda: str(HOTPLUG) not in instance.open_files(), 10, "the host's qemu closed the disk")
    assert str(OVERLAY) in block_files(client)


def test_hard_reset_boots_again(instance: Instance) -> None:
    pid = instance.qemu().pid
    assert instance.console().count(guest.MARKER) == 1
    instance.client.call("reset", 0)
    wait_until(lambda: instance.console().count(guest.MARKER) == 2, 120, "the guest booted again")
    assert instance.qemu().pid == pid


def test_managed_save_then_create_goes_on(instance: Instance) -> None:
    client, lab = instance.client, instance.lab
    wait_until(lambda: len(guest.ticks(instance.console().rsplit(guest.MARKER, 1)[1])) >= 2, 60, "the guest counts")
    client.call("managedSave", 0)
    assert client.event("lifecycle:STOPPED")["detail"] == "SAVED"
    assert not qemu_processes(NAME)
    assert client.call("hasManagedSaveImage", 0) == 1
    with lab.path_on("host", f"/var/lib/libvirt/qemu/save/{NAME}.save").open("rb") as image:
        assert image.read(16) == b"LibvirtQemudSave"
    before = instance.console()

    client.call("create")
    assert client.event("lifecycle:STARTED")["detail"] == "RESTORED"
    goes_on_from(lab, instance.domain, before)
    assert client.call("hasManagedSaveImage", 0) == 0


def test_destroy_and_undefine(instance: Instance) -> None:
    client = instance.client
    client.call("destroy")
    assert client.event("lifecycle:STOPPED")["detail"] == "DESTROYED"
    wait_until(lambda: not qemu_processes(NAME), 15, "no qemu on the host after destroy")
    client.call("undefine")
    assert client.event("lifecycle:UNDEFINED")["detail"] == "REMOVED"
    assert NAME not in client.request("names")  # type: ignore[operator]
