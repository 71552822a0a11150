"""The systemd lab: the host side and the DPU side as two containers with systemd as PID 1.

It deploys the Debian package as an operator does (README, "The systemd lab").
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import shutil
import signal
import stat
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

from offload import proc
from offload.errors import LabError
from offload.lab import debian, guest, libvirt, netlink
from offload.lab.lab import QTFS_PORT, REXEC_PORT, UDSPROXY_PORT
from offload.lab.libvirt import Domain, Virsh, guest_domain, step, tail, wait_for_marker, wait_until
from offload.lab.mountns import namespace_of
from offload.mounts import mountinfo

if TYPE_CHECKING:  # types only: processes are started through offload.proc
    from subprocess import CompletedProcess

IMAGE = debian.CACHE / f"{debian.SUITE}-systemd.tar"
#: Bump when PACKAGES or the image's preparation changes: an older tarball is rebuilt.
IMAGE_VERSION = "2"
#: systemd as PID 1, libvirt and qemu, and what the offload package depends
#: on from Debian (debian/control), so that installing the .deb needs no
#: network inside the containers; qemu's firmware named, as recommends are not installed.
PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "libpam-systemd",
    "iproute2",
    "procps",
    "libvirt-daemon-system",
    "libvirt-daemon-driver-qemu",
    "libvirt-clients",
    "qemu-system-x86",
    "seabios",
    "ipxe-qemu",
    "qemu-utils",
    "python3",
    "python3-cryptography",
    "python3-psutil",
    "python3-systemd",
    "python3-outcome",
    "python3-sortedcontainers",
    "python3-idna",
    "python3-pyroute2",
    "fuse3",
)
#: The distribution's libvirt units: on the DPU libvirtd runs chrooted
#: (offload-libvirtd), on the host qemu is started by rexec_server; neither
#: side runs the machine's own libvirtd (README: "Stop and disable the
#: machine's own virtlogd/libvirtd units first").
DISTRO_LIBVIRT_UNITS = (
    "libvirtd.service",
    "libvirtd.socket",
    "libvirtd-ro.socket",
    "libvirtd-admin.socket",
    "virtlogd.service",
    "virtlogd.socket",
    "virtlogd-admin.socket",
    "virtlockd.service",
    "virtlockd.socket",
    "virtlockd-admin.socket",
    "libvirt-guests.service",
)


#: Every nspawn of the lab: a process the lab owns (no machined), in the caller's unit.
NSPAWN = ("systemd-nspawn", "--quiet", "--register=no", "--keep-unit")


def _nspawn_run(root: Path, argv: Sequence[str], timeout: float = 900) -> None:
    """One command in ``root`` under systemd-nspawn, no boot (its own mount and pid namespaces)."""
    options = ["--resolv-conf=replace-host", "--setenv=DEBIAN_FRONTEND=noninteractive"]
    proc.run([*NSPAWN, *options, "-D", str(root), "--", *argv], timeout=timeout)


def image(say: Callable[[str], None] = print) -> Path:
    """The cached image tarball, built on first use (debootstrap minbase, then apt inside)."""

    def make(work: Path) -> None:
        started = time.monotonic()
        work.mkdir()
        proc.run(["tar", "-C", str(work), "--numeric-owner", "-xpf", str(debian.minbase())])
        say(f"apt-get install {' '.join(PACKAGES)}")
        # Nothing starts while apt runs (there is no systemd running in it anyway).
        (work / "usr/sbin/policy-rc.d").write_text("#!/bin/sh\nexit 101\n")
        (work / "usr/sbin/policy-rc.d").chmod(0o755)
        _nspawn_run(work, ["apt-get", "update", "-q"])
        # Without recommends: qemu's would bring a desktop (GTK, mesa, LLVM: 700 MB).
        _nspawn_run(work, ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES], timeout=1200)
        _nspawn_run(work, ["apt-get", "clean"])
        (work / "usr/sbin/policy-rc.d").unlink()
        # Units that would fail or linger in a container and slow the boot.
        _nspawn_run(work, ["systemctl", "mask", *DISTRO_LIBVIRT_UNITS, "systemd-networkd-wait-online.service"])
        (work / "etc/hostname").write_text("offload-lab\n")
        say(f"image {IMAGE} built in {time.monotonic() - started:.0f} s")

    return debian.cached(IMAGE, "build the systemd lab's image", make, IMAGE_VERSION)


@dataclass(frozen=True)
class Side(netlink.Side):
    role: str  # "host" or "dpu"


HOST_ADDRESS = "169.254.78.1"
DPU_ADDRESS = "169.254.78.2"
ROOTFS = "/another_rootfs"
#: The chrooted libvirtd's socket, seen from the DPU container.
LIBVIRT_SOCKET = f"{ROOTFS}/run/libvirt/libvirt-sock"
QEMU_CONF = f"{ROOTFS}/etc/libvirt/qemu.conf"
HOST_UNITS = ("rexec", "udsproxyd", "qtfs-server")
DPU_UNITS = ("rexec", "udsproxyd", "offload-prepare", "offload-libvirtd")
#: What the host lets the DPU run: qemu (the rootfs's wrapper runs the host's binary of that name).
HOST_WHITELIST = (libvirt.QEMU_BINARY,)
BOOT_TIMEOUT = 120.0
POWEROFF_TIMEOUT = 60.0
NSPAWN_STATE = Path("/run/systemd/nspawn")


#: The /etc files an operator writes on each side (path inside the container: text), mode 0644 unless MODES says.
HOST_CONFIG = {
    "etc/offload/rexec.toml": (
        "# The host: a listener for the DPU; root mapped to root (libvirt runs qemu as root).\n"
        f'listen = ["tcp://{HOST_ADDRESS}:{REXEC_PORT}"]\n'
        'shared_path = ["/var/lib/libvirt"]\n'
        'user_map = ["root=root"]\n'
    ),
    "etc/rexec/whitelist": "".join(f"{p}\n" for p in HOST_WHITELIST),
    "etc/offload/udsproxyd.env": (
        f"UDSPROXYD_ARGS=--listen tcp://{HOST_ADDRESS}:{UDSPROXY_PORT} --peer tcp://{DPU_ADDRESS}:{UDSPROXY_PORT}"
        " --allow /var/lib/libvirt --share /var/lib/libvirt/images --user-map root=root\n"
    ),
    "etc/offload/qtfs.env": (
        f"QTFS_ARGS=--listen tcp://{HOST_ADDRESS}:{QTFS_PORT} --export /var/lib/libvirt"
        " --export /proc:ro --export /sys:ro --no-root-squash --programs-of /run/rexec/rexec.lock\n"
    ),
}
DPU_CONFIG = {
    "etc/offload/rexec.toml": (
        "# The DPU: only its peer, the host; no listener.\n"
        f'peer = "tcp://{HOST_ADDRESS}:{REXEC_PORT}"\n'
        'shared_path = ["/var/lib/libvirt"]\n'
    ),
    "etc/offload/udsproxyd.env": (
        f"UDSPROXYD_ARGS=--listen tcp://{DPU_ADDRESS}:{UDSPROXY_PORT} --peer tcp://{HOST_ADDRESS}:{UDSPROXY_PORT}"
        " --allow /var/lib/libvirt --share /var/lib/libvirt/images\n"
    ),
    "etc/offload/prepare.toml": (
        "# The host's /var/lib/libvirt over qtfs, and its /proc and /sys facts.\n"
        f'host = "{HOST_ADDRESS}:{QTFS_PORT}"\n'
        'exports = ["/var/lib/libvirt"]\n'
    ),
}
MODES = {"etc/rexec/whitelist": 0o400}


class SystemdLab:
    """Two booted containers, host and DPU; ``up`` and ``down`` own everything they make."""

    def __init__(self, name: str) -> None:
        if not name.isidentifier() or len(name) > 9:
            raise LabError(f"lab name {name!r}: letters, digits and _ only, at most 9 characters")
        self.name = name
        self.dir = Path("/var/lib/offload-lab") / name
        self.state_file = self.dir / "state.json"
        self.host = Side(f"{name}-host", f"{name}-h", HOST_ADDRESS, "host")
        self.dpu = Side(f"{name}-dpu", f"{name}-d", DPU_ADDRESS, "dpu")

    def root(self, role: str) -> Path:
        return self.dir / role

    # -- state: the pids this lab started, so that down works from any process

    def _state(self) -> dict[str, int]:
        try:
            return {k: int(v) for k, v in json.loads(self.state_file.read_text()).items()}
        except (OSError, ValueError):
            return {}

    def _record(self, key: str, pid: int) -> None:
        self.state_file.write_text(json.dumps({**self._state(), key: pid}))

    def _record_process(self, key: str, pid: int) -> None:
        """Note ``pid`` and its start time in ms since the epoch: with its pid, who it is (`_process`)."""
        self._record(key, pid)
        self._record(f"{key}-started", int(psutil.Process(pid).create_time() * 1000))

    def leader(self, role: str) -> int:
        """The container's PID 1, as this machine numbers it."""
        pid = self._state().get(f"{role}-init")
        if not pid:
            raise LabError(f"the {role} container of lab {self.name} is not running")
        return pid

    def command(self, role: str, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside the container: its namespaces and root, a clean environment."""
        env = {**libvirt.UNIT_ENV, "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"}
        # --wd: the container PID 1's cwd, its /.
        enter = ["nsenter", f"--target={self.leader(role)}", "--all", "--root", "--wd"]
        return [*enter, "env", "-i", *(f"{name}={value}" for name, value in env.items()), *argv]

    def run(self, role: str, *argv: str, check: bool = True, timeout: float = 120) -> CompletedProcess[str]:
        return proc.run(self.command(role, argv), check=check, timeout=timeout)

    def systemctl(self, role: str, *argv: str, check: bool = True, timeout: float = 120) -> str:
        return self.run(role, "systemctl", "--no-pager", *argv, check=check, timeout=timeout).stdout

    # -- up

    def up(self, deb: Path, say: Callable[[str], None] = print) -> None:
        """Boot both containers, install ``deb`` and configure and enable each side's units."""
        if not deb.is_file():
            raise LabError(f"{deb}: no such package (make deb builds one)")
        tarball = image(say)
        if self.dir.exists():
            raise LabError(f"{self.dir} exists: run 'offload lab systemd down --name {self.name}' first")
        self.dir.mkdir(parents=True)
        netlink.create_pair(self.host, self.dpu)
        # systemd-nspawn keeps locks in /run/systemd/nspawn; made here, removed by down.
        for made, directory in (("made-run-systemd", NSPAWN_STATE.parent), ("made-nspawn-state", NSPAWN_STATE)):
            if not directory.exists():
                self._record(made, 1)
        for side in (self.host, self.dpu):
            with libvirt.timed(say, f"{side.role}: image unpacked"):
                root = self.root(side.role)
                root.mkdir()
                proc.run(["tar", "-C", str(root), "--numeric-owner", "-xpf", str(tarball)], timeout=300)
                (root / "etc/hostname").write_text(f"{self.name}-{side.role}\n")
                # Two machines: each its own identity (the journal's, D-Bus's).
                (root / "etc/machine-id").write_text(uuid.uuid4().hex + "\n")
                shutil.copy(deb, root / "srv" / deb.name)
        for side in (self.host, self.dpu):
            self._boot(side)
        for side in (self.host, self.dpu):
            with libvirt.timed(say, f"{side.role}: systemd is up"):
                self._wait_booted(side, say)
        for side in (self.host, self.dpu):
            with libvirt.timed(say, f"{side.role}: apt-get install ./{deb.name}"):
                self.run(side.role, "apt-get", "install", "-y", "-q", f"/srv/{deb.name}", timeout=300)
        self._configure(say)
        self._enable("host", HOST_UNITS, say)
        with libvirt.timed(say, f"dpu: offload rootfs build --mode overlay {ROOTFS}"):
            self.run(
                "dpu", "offload", "rootfs", "build", "--mode", "overlay", "--host", HOST_ADDRESS, ROOTFS, timeout=300
            )
        # The lab has no cgroup_partitions (nspawn mounts the containers'
        # cgroup v1 hierarchies read-only), so, as the rootfs's qemu.conf
        # says for that case, libvirt makes no cgroups for its domains.
        self.run("dpu", "sed", "-i", r"s/^cgroup_controllers = .*/cgroup_controllers = [ ]/", QEMU_CONF)
        self._enable("dpu", DPU_UNITS, say)

    def _enable(self, role: str, units: Sequence[str], say: Callable[[str], None]) -> None:
        """systemctl enable --now; on failure the error carries the failed units' journal."""
        with libvirt.timed(say, f"{role}: systemctl enable --now {' '.join(units)}"):
            result = self.run(role, "systemctl", "--no-pager", "enable", "--now", *units, check=False, timeout=240)
            if result.returncode != 0:
                failed = [u for u in units if unit_state(self, role, u).get("ActiveState") != "active"]
                logs = _journal_text(self, role, "-n", "40", *(f"--unit={u}" for u in failed))
                raise LabError(
                    f"{role}: systemctl enable --now {' '.join(units)} failed ({', '.join(failed)}):\n"
                    f"{result.stderr.strip()}\n{logs}"
                )

    def _configure(self, say: Callable[[str], None]) -> None:
        """PKI, addresses, whitelists and prepare.toml, written into each side's /etc."""
        self.run("host", "offload", "pki", "init", "--dir", "/root/pki", "--node", "host", "--node", "dpu")
        pki = self.root("host") / "root/pki"
        for side, files in ((self.host, HOST_CONFIG), (self.dpu, DPU_CONFIG)):
            root = self.root(side.role)
            target = root / "etc/offload/pki"
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(pki / side.role, target)
            for path, text in files.items():
                (root / path).parent.mkdir(parents=True, exist_ok=True)
                (root / path).write_text(text)
                (root / path).chmod(MODES.get(path, 0o644))
            say(f"{side.role}: /etc/offload/pki, {', '.join('/' + p for p in files)}")

    def _own_kvm(self) -> Path:
        """A device node of the lab's own for /dev/kvm (the same device, another inode).

        The container's packages set the owner and mode of their /dev/kvm to
        their own kvm group; on the machine's node that would change the
        machine's /dev/kvm, whose group number means another group here.
        """
        node = self.dir / "kvm"
        if not node.exists():
            machine = os.stat("/dev/kvm")
            os.mknod(node, stat.S_IFCHR | stat.S_IMODE(machine.st_mode), machine.st_rdev)
            os.chown(node, machine.st_uid, machine.st_gid)
        return node

    def _boot(self, side: Side) -> None:
        log = self.dir / f"{side.role}-nspawn.log"
        argv = [
            *NSPAWN,
            "--boot",
            f"--machine={self.name}-{side.role}",
            f"--network-namespace-path=/run/netns/{side.netns}",
            "--resolv-conf=off",
            "--console=passive",
            "--bind=/dev/fuse",
            *([f"--bind={self._own_kvm()}:/dev/kvm"] if side.role == "host" and Path("/dev/kvm").exists() else []),
            "-D",
            str(self.root(side.role)),
        ]
        child = libvirt.spawn_logged(argv, log)
        child.returncode = 0  # it runs on; down ends it by pid and reaps it
        self._record_process(f"{side.role}-nspawn", child.pid)

        def init() -> int | None:
            try:
                children = psutil.Process(child.pid).children()
            except psutil.NoSuchProcess:
                raise LabError(f"systemd-nspawn for {side.role} exited: {tail(log)}") from None
            # The container's PID 1 is nspawn's child in a pid namespace of its own.
            ours = namespace_of(os.getpid(), "pid")
            return next((c.pid for c in children if namespace_of(c.pid, "pid") not in (None, ours)), None)

        failure = f"systemd-nspawn for {side.role} started no container within 30 s"
        self._record_process(f"{side.role}-init", wait_until(init, 30, failure))

    def _wait_booted(self, side: Side, say: Callable[[str], None]) -> None:
        def answered() -> CompletedProcess[str] | None:
            wait = ("timeout", str(int(BOOT_TIMEOUT)), "systemctl", "is-system-running", "--wait")
            result = self.run(side.role, *wait, check=False, timeout=BOOT_TIMEOUT + 10)
            # Until PID 1 has made /run/systemd/system and its bus socket,
            # systemctl says "offline" or cannot connect, and exits at once.
            early = result.stdout.strip() in ("", "offline") or "Failed to connect to bus" in result.stderr
            return None if early else result

        failure = f"{side.role} container did not boot: systemd not reachable in {BOOT_TIMEOUT:.0f} s"
        result = wait_until(answered, BOOT_TIMEOUT, failure, interval=0.1)
        state = result.stdout.strip()
        if state not in ("running", "degraded"):
            raise LabError(f"{side.role} container did not boot: {state!r} {result.stderr.strip()}")
        if state == "degraded":
            # A boot unit that failed on a loaded machine (seen: journal-flush
            # timing out on 2 busy cores) is started once more; a second
            # failure is the lab's.
            failed = self.systemctl(side.role, "--failed", "--plain", "--no-legend", check=False)
            units = [line.split()[0] for line in failed.splitlines() if line.strip()]
            self.systemctl(side.role, "restart", *units, check=False)
            again = self.run(side.role, "systemctl", "is-system-running", check=False).stdout.strip()
            if again != "running":
                raise LabError(f"{side.role} container booted degraded; failed units:\n{failed}")
            say(f"{side.role}: {', '.join(units)} failed at boot and succeeded on a restart")

    # -- down

    def _process(self, state: dict[str, int], key: str) -> psutil.Process | None:
        """The process recorded under ``key``, if it still runs and is that process (not a reused pid)."""
        pid, started = state.get(key), state.get(f"{key}-started")
        if not pid or started is None:
            return None
        try:
            process = psutil.Process(pid)
            same = abs(process.create_time() * 1000 - started) < 20 and process.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return None
        return process if same else None

    def down(self) -> list[str]:
        """Power both containers off and remove everything; idempotent, works after a failed up."""
        done = []
        state = self._state()
        for role in ("dpu", "host"):
            nspawn, init = self._process(state, f"{role}-nspawn"), self._process(state, f"{role}-init")
            if init is not None:
                with contextlib.suppress(psutil.NoSuchProcess):
                    init.send_signal(signal.SIGRTMIN + 4)  # systemd: poweroff, as machinectl poweroff sends
            waited = nspawn or init
            if waited is None:
                continue
            try:
                _wait_exit(waited, POWEROFF_TIMEOUT)
                done.append(f"{role} container powered off")
            except TimeoutError:
                # SIGKILL to the container's PID 1 ends its pid namespace; then nspawn exits.
                for process in (init, nspawn):
                    if process is not None:
                        with contextlib.suppress(psutil.NoSuchProcess, TimeoutError):
                            process.kill()  # psutil checks it is still the same process
                            _wait_exit(process, 10)
                done.append(f"{role} container killed (no poweroff within {POWEROFF_TIMEOUT:.0f} s)")
        for role in ("dpu", "host"):
            root = self.root(role)
            if root.exists():
                ended = debian.end_processes_in(root)
                if ended:
                    done.append(f"{role}: processes left in the tree ended: {ended}")
                debian.remove_tree(root)
                done.append(f"{role} tree removed")
        done += netlink.remove([self.host.netns, self.dpu.netns], [self.host.ifname, self.dpu.ifname])
        shutil.rmtree(self.dir, ignore_errors=True)
        made = (
            [NSPAWN_STATE / "locks", NSPAWN_STATE / "propagate", NSPAWN_STATE] if state.get("made-nspawn-state") else []
        )
        made += [NSPAWN_STATE.parent] if state.get("made-run-systemd") else []
        for directory in [*made, self.dir.parent]:
            with contextlib.suppress(OSError):  # not empty: another nspawn or lab uses it now
                directory.rmdir()
        return done


def _wait_exit(process: psutil.Process, timeout: float) -> None:
    """Wait for an nspawn process to end (TimeoutError if it does not), reaping it if it is our child.

    Its pidfd turns readable once it has exited, also as another process's zombie.
    """
    try:
        pidfd = os.pidfd_open(process.pid)
    except ProcessLookupError:
        return
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        if not poller.poll(timeout * 1000):
            raise TimeoutError(process.pid)
    finally:
        os.close(pidfd)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(process.pid, os.WNOHANG)


@contextlib.contextmanager
def lab_up(lab: SystemdLab, deb: Path, say: Callable[[str], None] = print) -> Iterator[SystemdLab]:
    """The lab, up for the block; down on every way out (a failed up included)."""
    try:
        lab.up(deb, say)
        yield lab
    finally:
        for line in lab.down():
            say(f"down: {line}")


# -- what the demo and the test check, one step each; each raises LabError when it does not hold

DOMAIN = "offload-sd-demo"
#: The Type=notify daemons; a running guest outlives each one's restart by an operator and its crash.
NOTIFY_UNITS = (*(("host", unit) for unit in HOST_UNITS), ("dpu", "rexec"), ("dpu", "udsproxyd"))
RESTARTED = NOTIFY_UNITS


def unit_state(lab: SystemdLab, role: str, unit: str) -> dict[str, str]:
    text = lab.systemctl(role, "show", "--property=Type,ActiveState,SubState,Result,MainPID,StatusErrno", unit)
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def services_ready(lab: SystemdLab) -> str:
    """Each side's units active; the Type=notify ones running, i.e. they sent READY=1."""
    seen = []
    for role, units in (("host", HOST_UNITS), ("dpu", DPU_UNITS)):
        for unit in units:
            state = unit_state(lab, role, unit)
            expected = ("oneshot", "active", "exited") if unit == "offload-prepare" else (None, "active", "running")
            if (role, unit) in NOTIFY_UNITS:
                expected = ("notify", "active", "running")
            got = (state.get("Type") if expected[0] else None, state.get("ActiveState"), state.get("SubState"))
            if got != expected:
                status = lab.systemctl(role, "status", "--lines=20", unit, check=False)
                raise LabError(f"{role}: {unit} is {got}, expected {expected}:\n{status}")
            seen.append(f"{role} {unit} {state['ActiveState']} ({state['SubState']}, {state['Type']})")
    return "; ".join(seen)


def virsh(lab: SystemdLab) -> Virsh:
    """virsh in the DPU container, talking to the chrooted libvirtd (offload-libvirtd.service)."""
    return Virsh(LIBVIRT_SOCKET, wrap=lambda argv: lab.command("dpu", argv))


def domain(lab: SystemdLab) -> Domain:
    """The lab's guest, its kernel and initramfs copied into the host's images directory."""
    image = guest.build()
    images = lab.root("host") / libvirt.IMAGES.relative_to("/")
    images.mkdir(parents=True, exist_ok=True)
    for path in (image.kernel, image.initrd):
        shutil.copy(path, images / path.name)
    return guest_domain(DOMAIN, image)


def start_vm(lab: SystemdLab, vm: Domain) -> str:
    """virsh define and start in the DPU container; the guest's marker in the host's console log."""
    command = virsh(lab)
    command.wait_ready(60)
    command.define(vm)
    command("start", vm.name)
    line = wait_for_marker(lambda: _console(lab, vm))
    return f"{vm.name} started from the DPU container; its console (host side): {line}"


def qemu_in_host(lab: SystemdLab, name: str) -> list[int]:
    """The pids (this machine's numbers) of the guest's qemu processes in the host container."""
    host_pidns = namespace_of(lab.leader("host"), "pid")
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        ours = cmdline and cmdline[0].endswith("qemu-system-x86_64") and f"guest={name}," in " ".join(cmdline)
        if ours and namespace_of(process.pid, "pid") == host_pidns:
            found.append(process.pid)
    return found


def where_qemu_runs(lab: SystemdLab, name: str) -> str:
    found = qemu_in_host(lab, name)
    if len(found) != 1:
        raise LabError(f"expected one qemu for {name} in the host container, found {found}")
    cgroups = Path(f"/proc/{found[0]}/cgroup").read_text()
    # rexec_server moved it out of its own cgroup into a scope of its own (--program-slice), as
    # libvirt's machines live: stopping rexec.service never touches it.
    scope = next((line.rsplit("/", 1)[1] for line in cgroups.splitlines() if "/machine.slice/rexec-" in line), None)
    if scope is None or "rexec.service" in cgroups:
        raise LabError(f"qemu pid {found[0]} is not in a scope of its own in machine.slice:\n{cgroups}")
    libvirtd = int(unit_state(lab, "dpu", "offload-libvirtd")["MainPID"])
    return (
        f"qemu pid {found[0]} in the host container's {scope} (machine.slice); libvirtd pid {libvirtd} (DPU container's "
        f"numbering) in offload-libvirtd.service; {_guest_runs(lab, name)}"
    )


def journal(lab: SystemdLab, role: str, unit: str = "rexec") -> list[dict[str, str]]:
    """``journalctl -u UNIT -o json`` in a container: its entries."""
    text = lab.run(role, "journalctl", "--no-pager", "-o", "json", "-u", unit).stdout
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _journal_text(lab: SystemdLab, role: str, *options: str) -> str:
    """journalctl's text in a container, to show in an error."""
    return lab.run(role, "journalctl", "--no-pager", *options, check=False).stdout


def _logged(lab: SystemdLab, role: str, words: str) -> list[dict[str, str]]:
    """rexec_server's own journal entries (not systemd's about the unit) that say ``words``."""
    return [
        e
        for e in journal(lab, role)
        if e.get("SYSLOG_IDENTIFIER") == "rexec_server" and words in str(e.get("MESSAGE", ""))
    ]


def journal_priorities(lab: SystemdLab) -> str:
    """Each daemon logs to journald with its priority: ``journalctl -u UNIT`` has its entries, its start at info (6)."""
    said = []
    for role, unit in NOTIFY_UNITS:
        entries = [e for e in journal(lab, role, unit) if e.get("SYSLOG_IDENTIFIER") not in (None, "systemd")]
        ready = [e for e in entries if e.get("PRIORITY") == "6" and " ready" in str(e.get("MESSAGE", ""))]
        unprioritised = [e for e in entries if not str(e.get("PRIORITY", "")).isdigit()]
        if not ready or unprioritised:
            shown = _journal_text(lab, role, "-o", "verbose", "-u", unit)
            raise LabError(f"{role}: journalctl -u {unit} has no 'ready' entry at priority 6:\n{shown[-3000:]}")
        first = ready[0]
        said.append(
            f"{role} {unit}: {len(entries)} entries, <{first['PRIORITY']}> {first['SYSLOG_IDENTIFIER']}: "
            f"{first['MESSAGE']}"
        )
    return "; ".join(said)


def reload_whitelist(lab: SystemdLab, program: str = "/usr/bin/true") -> str:
    """A program the host refuses (logged as a warning) runs once it is whitelisted and rexec reloaded."""
    refused = lab.run("dpu", "rexec", program, check=False)
    if refused.returncode != 126:
        raise LabError(f"rexec {program} before the reload: exit {refused.returncode}, expected 126 (not allowed)")
    warnings = [e for e in _logged(lab, "host", program) if e.get("PRIORITY") == "4"]
    if not warnings:
        raise LabError(f"the host's journal has no warning (priority 4) about {program}")
    whitelist = lab.root("host") / "etc/rexec/whitelist"
    whitelist.write_text(whitelist.read_text() + f"{program}\n")
    lab.systemctl("host", "reload", "rexec")
    ran = lab.run("dpu", "rexec", program, check=False)
    if ran.returncode != 0:
        raise LabError(f"rexec {program} after systemctl reload rexec: exit {ran.returncode}: {ran.stderr.strip()}")
    state = unit_state(lab, "host", "rexec")
    if (state["ActiveState"], state["SubState"]) != ("active", "running"):
        raise LabError(f"host rexec after reload: {state}")
    return (
        f"before: exit 126 and the host logged <4> {warnings[-1]['MESSAGE']}; after adding {program} to "
        f"/etc/rexec/whitelist and systemctl reload rexec: exit 0, rexec still {state['SubState']}"
    )


#: How long a monitor command may take after a restart: a relay that never came back hangs libvirt's monitor.
MONITOR_TIMEOUT = 30


def _console(lab: SystemdLab, vm: Domain) -> str:
    """The guest's console log on the host side, so far."""
    return libvirt.console_text(lab.root("host") / vm.console_log.lstrip("/"))


def console_ticks(lab: SystemdLab, vm: Domain) -> list[int]:
    """The guest's counter as its console log on the host side has it so far."""
    return guest.ticks(_console(lab, vm))


def _kill_main(lab: SystemdLab, role: str, unit: str) -> None:
    """SIGKILL to the unit's main process only, as a crash: its cgroup also holds what it runs (qemu on the host)."""
    # An older systemctl knows the option only as --kill-who.
    whom = "--kill-whom=main" if "--kill-whom" in lab.systemctl(role, "--help") else "--kill-who=main"
    lab.systemctl(role, "kill", "--signal=SIGKILL", whom, unit)


def _back_with_new_pid(lab: SystemdLab, role: str, unit: str, before: str) -> bool:
    state = unit_state(lab, role, unit)
    return (state["ActiveState"], state["SubState"]) == ("active", "running") and state["MainPID"] not in ("0", before)


def _guest_runs(lab: SystemdLab, name: str, after: str = "") -> str:
    """libvirt calls the guest running, and so does its answer to query-status through libvirt's monitor connection."""
    state = virsh(lab).state(name)
    if state != "running":
        raise LabError(f"virsh domstate {name} says {state!r}{after}")
    # Bounded inside the container: virsh waits as long as libvirt does for a monitor that never answers.
    bounded = Virsh(LIBVIRT_SOCKET, wrap=lambda argv: lab.command("dpu", ["timeout", str(MONITOR_TIMEOUT), *argv]))
    try:
        status = " ".join(bounded("qemu-monitor-command", name, '{"execute":"query-status"}').split())
    except LabError as exc:
        raise LabError(f"query-status failed or took over {MONITOR_TIMEOUT} s{after}: {exc}") from None
    if '"running":true' not in status:
        raise LabError(f"query-status{after}: {status}")
    return f"domstate {state}, query-status {status}"


def restart_under_guest(lab: SystemdLab, vm: Domain, role: str, unit: str, crash: bool) -> str:
    """``systemctl restart`` (or a SIGKILL and systemd's Restart=on-failure) of one daemon under a running guest.

    The guest must not notice: it counts on, libvirt calls it running, its
    monitor answers through the rexec_servers, and it is the same qemu.
    """
    how = "SIGKILL to MainPID" if crash else "systemctl restart"
    qemu = qemu_in_host(lab, vm.name)
    before = unit_state(lab, role, unit)["MainPID"]
    started = time.monotonic()
    if crash:
        _kill_main(lab, role, unit)
    else:
        lab.systemctl(role, "restart", unit)
    failure = f"{role} {unit} not active with a new MainPID 30 s after {how}"
    wait_until(lambda: _back_with_new_pid(lab, role, unit, before), 30, failure, interval=0.1)
    back = time.monotonic() - started
    after = unit_state(lab, role, unit)["MainPID"]
    counted = max(console_ticks(lab, vm), default=-1)
    failure = f"the guest's counter stayed at {counted} for 20 s after {how} of {role} {unit}"
    wait_until(lambda: max(console_ticks(lab, vm), default=-1) > counted, 20, failure, interval=0.1)
    runs = _guest_runs(lab, vm.name, f" after {how} of {role} {unit}")
    if qemu_in_host(lab, vm.name) != qemu:
        raise LabError(f"qemu was {qemu} before {how} of {role} {unit}, is {qemu_in_host(lab, vm.name)} after")
    return (
        f"{role} {unit}: {how}, MainPID {before} -> {after} in {back:.1f} s; the guest counted past {counted}, "
        f"{runs}, qemu pid {qemu[0]} the same"
    )


def sessions_carried_on(lab: SystemdLab) -> str:
    """Each restarted rexec_server said, at info (6), that it carried the guest's session on, and the DPU resumed it."""
    said = []
    for role, words, at_least in (
        ("host", "carrying on session", 2),  # the host's restart and its crash
        ("dpu", "carrying on the session of stand-in", 2),  # the DPU's
        ("dpu", "resumed on a new link", 4),  # after each of the four
    ):
        entries = _logged(lab, role, words)
        if len(entries) < at_least or any(e.get("PRIORITY") != "6" for e in entries):
            shown = _journal_text(lab, role, "-u", "rexec", "-b")
            raise LabError(
                f"{role}: journalctl -u rexec has {len(entries)} entries saying {words!r} (expected {at_least}"
                f" or more, at priority 6):\n{shown[-4000:]}"
            )
        said.append(f"{role}: {len(entries)} x <{entries[-1]['PRIORITY']}> {entries[-1]['MESSAGE']}")
    return "; ".join(said)


def destroy_vm(lab: SystemdLab, name: str) -> str:
    virsh(lab)("destroy", name)
    failure = "qemu still runs in the host container 15 s after virsh destroy"
    wait_until(lambda: not qemu_in_host(lab, name), 15, failure, interval=0.1)
    virsh(lab)("undefine", name)
    return "destroyed and undefined; no qemu left in the host container"


def mounts_below(lab: SystemdLab, path: str = ROOTFS) -> list[str]:
    """Mount points strictly below ``path`` in the DPU container's mount namespace."""
    mounts = mountinfo.read(f"/proc/{lab.leader('dpu')}/mountinfo")
    return [entry.mount_point for entry in mountinfo.under(mounts, path)]


def stop_prepare(lab: SystemdLab) -> str:
    """systemctl stop offload-prepare: libvirtd and virtlogd stop with it, and no mount is left in the rootfs."""
    before = len(mounts_below(lab))
    lab.systemctl("dpu", "stop", "offload-prepare", timeout=120)
    left = mounts_below(lab)
    if left:
        raise LabError(f"mounts left below {ROOTFS} after systemctl stop offload-prepare: {left}")
    states = {unit: unit_state(lab, "dpu", unit)["ActiveState"] for unit in ("offload-prepare", "offload-libvirtd")}
    if set(states.values()) != {"inactive"}:
        raise LabError(f"after stopping offload-prepare: {states}")
    return f"{before} mounts below {ROOTFS} before, none after; {states}"


# -- the demo (make demo-systemd) and the command line (offload lab systemd)

CHECKOUT = Path(__file__).resolve().parent.parent.parent


def build_deb(out: Path) -> Path:
    """The Debian package built from this checkout's working tree (scripts/build-deb) in ``out``."""
    script = CHECKOUT / "scripts" / "build-deb"
    if not script.exists():
        raise LabError(f"{script} is missing: the systemd lab builds the package from a checkout (or give --deb)")
    built = proc.run(["bash", str(script), str(out)], timeout=600)
    return Path(built.stdout.strip().splitlines()[-1])


def demo(lab: SystemdLab, deb: Path | None = None, *, keep: bool = False) -> None:
    """Everything issue 15 asks of the systemd lab, step by step, then down (also after a failure unless ``keep``)."""
    step("lab down (leftovers)", lambda: ", ".join(lab.down()) or "nothing left over")
    step("image", lambda: f"{image()} ({IMAGE.stat().st_size >> 20} MiB, cached)")
    packages = lab.dir.with_name(f"{lab.name}.deb")
    lines: list[str] = []
    succeeded = False

    def build() -> str:
        nonlocal deb
        deb = build_deb(packages)
        return f"{deb} from {CHECKOUT}"

    def up() -> str:
        assert deb is not None
        lab.up(deb, lines.append)
        return "\n    " + "\n    ".join(lines)

    try:
        if deb is None:
            step("make deb", build)
        step("lab up", up)
        step("services ready (systemctl show)", lambda: services_ready(lab))
        vm = domain(lab)
        step("virsh define and start (DPU container)", lambda: start_vm(lab, vm))
        step("where qemu runs", lambda: where_qemu_runs(lab, vm.name))
        step("journalctl -u UNIT (priorities)", lambda: journal_priorities(lab))
        step("systemctl reload rexec (host)", lambda: reload_whitelist(lab))
        for role, unit in RESTARTED:
            for crash in (False, True):
                title = f"{'SIGKILL' if crash else 'systemctl restart'} {unit} ({role}) under the guest"
                step(title, partial(restart_under_guest, lab, vm, role, unit, crash))
        step("journalctl -u rexec (sessions carried on)", lambda: sessions_carried_on(lab))
        step("virsh destroy and undefine", lambda: destroy_vm(lab, vm.name))
        step("systemctl stop offload-prepare (DPU)", lambda: stop_prepare(lab))
        succeeded = True
    finally:
        shutil.rmtree(packages, ignore_errors=True)
        if succeeded or not keep:
            step("lab down", lambda: ", ".join(lab.down()))
        else:
            print(f"the lab stays up: offload lab --name {lab.name} systemd exec dpu -- systemctl status", flush=True)


def run_command(args: argparse.Namespace, name: str) -> int:
    """What ``offload lab systemd ACTION`` does to the lab ``name`` (offload/lab/systemd_cli.py parses it)."""
    lab = SystemdLab(name)
    if args.action == "down":
        for line in lab.down():
            print(f"down: {line}")
        return 0
    if args.action == "exec":
        argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        return proc.run(lab.command(args.role, argv or ["bash"]), check=False, capture=False).returncode
    if args.action == "up":
        packages = lab.dir.with_name(f"{lab.name}.deb")
        try:
            deb = args.deb or build_deb(packages)
            with contextlib.ExitStack() as undo:
                undo.callback(lab.down)
                lab.up(deb.resolve(), lambda line: print(f"up: {line}", flush=True))
                undo.pop_all()
        finally:
            shutil.rmtree(packages, ignore_errors=True)
        print(f"lab {lab.name} is up; try: offload lab --name {lab.name} systemd exec dpu -- systemctl status rexec")
        return 0
    try:
        demo(lab, args.deb.resolve() if args.deb else None, keep=args.keep)
    except LabError as exc:
        print(f"demo FAILED: {exc}", flush=True)
        return 1
    print("demo succeeded: systemd ran every unit on both sides, and virsh on the DPU ran a VM on the host", flush=True)
    return 0
