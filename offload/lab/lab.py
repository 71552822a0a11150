"""The lab: host and DPU as two network namespaces on one machine; the DPU's with its own pids and cgroups.

Every process ``up`` starts is recorded in the lab's state file before
``up`` waits for it, so ``down`` can remove everything after a failed ``up``
too.

The two sides cannot see each other's private files: each side's mount
namespace hides the other side's key (pki/NODE/key.pem with all of
pki/NODE), run directory (NODE/: whitelist, agent and shim sockets,
pidmaps), and from the host side the DPU's rootfs (dpu-rootfs/: the
overlay's upper and work layers and /another_rootfs); the CA's key is hidden
from both.  The controlling process (``offload lab``, the tests), outside
both namespaces, sees everything.  Still shared on purpose, as the
offload machinery or the lab's control needs it:

- ``shared/``, the directory both sides' rexec_servers and udsproxyds name
  as shared (a stand-in for a directory that is the same on both machines);
- ``sockets/``, the UNIX sockets the tests serve through udsproxy;
- the CA certificate (pki/ca.pem) and each node's certificate, public;
- the daemons' logs (KEY.log, written by the controlling process's file
  handles) and readiness sockets (KEY.notify), the state file and
  prepare.toml, which name no secret.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

from offload import pki, proc
from offload.errors import LabError
from offload.lab import LIBVIRT_EXPORTS, SERVICES, cgroups, dpu_libvirt, mountns, netlink
from offload.lab.libvirt import QEMU_BINARY, spawn_logged, tail

log = logging.getLogger(__name__)

LAB_ROOT = Path("/run/offload-lab")
REXEC_PORT, UDSPROXY_PORT, QTFS_PORT = 7001, 7002, 7003
#: Seconds of silence after which the lab's rexec_servers declare a link lost.
REXEC_KEEPALIVE = 6.0
#: Seconds the lab's rexec_servers wait for a session whose link was lost to be resumed (short, so a
#: test outlasts it).
LAB_RESUME_WINDOW = 15.0
#: Connections to the other side one unprivileged user's rexec sessions may hold at once.
LAB_USER_LINKS = 8
#: Connections each daemon serves at once per peer (below the default, so that a flood test reaches it).
LAB_PEER_LIMIT = 256
SHIM = Path(__file__).resolve().parent.parent / "_native" / "libudsproxy.so"
READY_TIMEOUT = 30.0
#: A service's fd store size, as rexec.service's FileDescriptorStoreMax=.
STORE_MAX = 4096
#: Seconds a stopping service has before SIGKILL, as proc.end_pid gives a daemon.
STOP_TIMEOUT = 3.0
#: The key of what the lab started for a service: its manager (offload.lab.manager).
MANAGER_SUFFIX = "-manager"
#: The controllers whose cgroups libvirt on the DPU side makes on the host side (the rootfs's qemu.conf).
TUNED_CONTROLLERS = ("cpu", "cpuacct", "cpuset", "memory", "blkio")
#: Programs each side's whitelist allows besides --allow ones.
DEFAULT_ALLOW = (
    "/bin/true",
    "/usr/bin/true",
    "/bin/false",
    "/usr/bin/false",
    "/bin/cat",
    "/usr/bin/cat",
    "/bin/sh",
    "/usr/bin/sh",
    "/bin/sleep",
    "/usr/bin/sleep",
    "/usr/bin/head",
    "/usr/bin/env",
)


@dataclass(frozen=True)
class LabSide:
    role: str  # host or dpu
    link: netlink.Side
    run_dir: Path

    @property
    def netns(self) -> str:
        return self.link.netns


class Lab:
    def __init__(self, name: str = "offload", root: Path = LAB_ROOT) -> None:
        if not name.replace("-", "").isalnum() or len(name) > 10:
            raise LabError(f"lab name {name!r}: use up to 10 letters, digits or dashes")
        self.name = name
        self.dir = root / name
        self.host = LabSide("host", netlink.Side(f"{name}-host", f"{name}-h", "169.254.77.1"), self.dir / "host")
        self.dpu = LabSide("dpu", netlink.Side(f"{name}-dpu", f"{name}-d", "169.254.77.2"), self.dir / "dpu")
        self.state_file = self.dir / "state.json"

    # -- state ---------------------------------------------------------------

    def side(self, role: str) -> LabSide:
        if role not in ("host", "dpu"):
            raise LabError(f"unknown side {role!r} (host or dpu)")
        return self.host if role == "host" else self.dpu

    def other(self, side: LabSide) -> LabSide:
        return self.dpu if side is self.host else self.host

    def _state(self) -> dict:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {"pids": {}}

    def _save(self, key: str, value: object, within: str = "") -> None:
        """Set ``key`` in the state file (in its table ``within``)."""
        state = self._state()
        (state.setdefault(within, {}) if within else state)[key] = value
        self.state_file.write_text(json.dumps(state, indent=1))

    def record(self, key: str, pid: int) -> None:
        """Note a process the lab started, by key, for status, restart and down."""
        self._save(key, pid, within="pids")

    @property
    def host_partitions(self) -> dict[str, Path]:
        """Controller -> the host side's cgroup that the DPU side's libvirt sees as its /machine."""
        return {name: Path(place) for name, place in self._state().get("host_partitions", {}).items()}

    def _make_host_partitions(self) -> dict[str, Path]:
        """The host side's cgroups libvirt's domains are made in, one per tuned controller.

        Below the lab's own cgroups, named after the lab: the machine's
        /machine (a local libvirtd's) is never the lab's.  `down` removes them.
        """
        places = {}
        for place in cgroups.subtree(f"offload-lab-{self.name}-machine"):
            controllers = set(place.parts[4].split(",")) if len(place.parts) > 5 else set()
            for name in TUNED_CONTROLLERS:
                if name in controllers and name not in places:
                    places[name] = place
        self._save("host_partitions", {name: str(place) for name, place in places.items()})
        cgroups.create(sorted(set(places.values())))
        return places

    @property
    def dpu_cgroups(self) -> list[Path]:
        """The DPU side's cgroups, one per hierarchy: the roots its cgroup namespace shows (offload.lab.cgroups)."""
        return [Path(place) for place in self._state().get("cgroups", [])]

    def status_keys(self) -> list[str]:
        """Keys of the processes the lab started (host-rexec, dpu-libvirtd, ...)."""
        return list(self._state()["pids"])

    @property
    def is_up(self) -> bool:
        return self.state_file.exists()

    # -- environment for commands ----------------------------------------------

    def private(self, role: str) -> list[Path]:
        """What only ``role``'s side may see of the lab's directory (hidden from the other side)."""
        side = self.side(role)
        paths = [side.run_dir, self.dir / "pki" / role]
        if role == "dpu":
            paths.append(self.rootfs_dir)
        return paths

    @property
    def rootfs_dir(self) -> Path:
        """Where the DPU side's /another_rootfs and its overlay layers live (the DPU's alone)."""
        return self.dir / "dpu-rootfs"

    def rexec_address(self, side: LabSide) -> str:
        return _address(side, REXEC_PORT)

    @property
    def sockets(self) -> Path:
        """Where the lab's UNIX sockets for udsproxy live (allowed on both sides)."""
        return self.dir / "sockets"

    def env(self, role: str) -> dict[str, str]:
        """What an operator's unit file would give a program on that side."""
        side = self.side(role)
        bin_dir = str(Path(sys.executable).parent)
        env = dict(os.environ)
        env.update(
            CMD_NET_ADDR=self.rexec_address(self.other(side)),
            REXEC_AGENT_SOCKET=str(side.run_dir / "rexec.sock"),
            PATH=f"{bin_dir}:{env.get('PATH', '/usr/bin:/bin')}",
        )
        if "udsproxy" in self._state().get("services", ()):
            env.update(UDSPROXY_SOCKET=str(side.run_dir / "udsproxy" / "udsproxy.sock"), LD_PRELOAD=str(SHIM))
        return env

    def _holder(self, role: str) -> int:
        """The pid holding that side's namespaces."""
        holder = self._state()["pids"].get(f"{role}-ns")
        if holder is None:
            raise LabError(f"lab {self.name} has no {role} side (offload lab up first)")
        return holder

    def command(self, role: str, argv: list[str], cwd: str | os.PathLike[str] | None = None) -> list[str]:
        """``argv`` run on that side: in its network and mount namespaces, in ``cwd`` (default: ours)."""
        return mountns.enter(self._holder(role), argv, str(cwd) if cwd is not None else None)

    def pid_of(self, key: str) -> int:
        """The pid of a process the lab started, by its key (e.g. host-rexec, dpu-libvirtd)."""
        pid = self._state()["pids"].get(key)
        if pid is None:
            raise LabError(f"lab {self.name} runs no {key}")
        return int(pid)

    def program_pid(self, key: str) -> int:
        """The pid of the program (`_program`) a process the lab started runs (e.g. the DPU's rexec_server itself)."""
        pid = self.pid_of(key)
        role = key.split("-", 1)[0]
        return self._program(role, pid) if role in ("host", "dpu") else pid

    def pid_on(self, role: str, pid: int) -> int:
        """The number ``role``'s side gives the program (`_program`) of process ``pid``, started with `command`."""
        return mountns.pid_in_namespace(self._program(role, pid))

    def pid_here(self, role: str, pid: int) -> int:
        """The number here of the process that ``role``'s side numbers ``pid`` (a pidfile's, a pidmap's)."""
        found = mountns.pid_outside(self._holder(role), pid)
        if found is None:
            raise LabError(f"no process {pid} on the {role} side of lab {self.name}")
        return found

    def _program(self, role: str, pid: int) -> int:
        """What process ``pid`` runs: on the DPU side, where it entered the side's pid namespace, its child
        (offload.lab.pidns), which lives exactly as long as it; elsewhere the process itself."""
        holder = self._state()["pids"].get(f"{role}-ns")
        if holder is None or mountns.init_of(holder) is None:
            return pid
        return mountns.entered_program(pid)

    def netns_id(self, role: str) -> str:
        """That side's network namespace as /proc/PID/ns/net names it (net:[INODE])."""
        return f"net:[{os.stat(f'/run/netns/{self.side(role).netns}').st_ino}]"

    def path_on(self, role: str, path: str | os.PathLike[str]) -> Path:
        """``path`` as that side's mount namespace shows it, reachable from here."""
        return Path(f"/proc/{self._holder(role)}/root") / Path(path).relative_to("/")

    # -- up and down ---------------------------------------------------------------

    def up(self, only: list[str] | None = None, allow: list[str] | tuple[str, ...] = ()) -> list[str]:
        services = list(only or SERVICES)
        unknown = set(services) - set(SERVICES)
        if unknown:
            raise LabError(f"unknown service(s) {', '.join(sorted(unknown))}; known: {', '.join(SERVICES)}")
        if "libvirt" in services and not set(SERVICES) <= set(services):
            raise LabError(f"libvirt in the lab needs all of {', '.join(SERVICES)}")
        if "libvirt" in services:
            allow = (*allow, QEMU_BINARY)
        if self.is_up:
            raise LabError(f"lab {self.name} is already up (offload lab down first)")
        if os.geteuid() != 0:
            raise LabError("the lab needs root (network namespaces and veth)")
        done = []
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.state_file.write_text(json.dumps({"pids": {}, "services": services}))
            netlink.create_pair(self.host.link, self.dpu.link)
            done.append(
                f"namespaces {self.host.netns} ({self.host.link.address}) and {self.dpu.netns} ({self.dpu.link.address}) joined by veth"
            )
            pki.init(self.dir / "pki", pki.HOST_AND_DPU)
            done.append(f"PKI in {self.dir / 'pki'}")
            (self.dir / "shared").mkdir(exist_ok=True)
            self.rootfs_dir.mkdir(exist_ok=True)
            for side in (self.host, self.dpu):
                (side.run_dir / "udsproxy").mkdir(parents=True, exist_ok=True)
                self._write_whitelist(side, allow)
            for side in (self.host, self.dpu):
                hide = [*self.private(self.other(side).role), self.dir / "pki" / "ca-key.pem"]
                steps = mountns.plan(side.role, self.dir, hide)
                # The DPU side has pids, cgroups and ptys of its own, as on a second machine.
                own_cgroups = None
                if side.role == "dpu":
                    own_cgroups = cgroups.subtree(f"offload-lab-{self.name}-dpu")
                    self._save("cgroups", [str(place) for place in own_cgroups])
                    cgroups.create(own_cgroups)
                pid = mountns.start_holder(side.netns, steps, self.dir / f"{side.role}-ns.log", own_cgroups)
                self.record(f"{side.role}-ns", pid)
                done.append(f"{side.role} mount namespace: " + ", ".join(_describe(step) for step in steps))
            starters = {
                "rexec": self._start_rexec,
                "udsproxy": self._start_udsproxy,
                "qtfs": self._start_qtfs_server,
                "libvirt": lambda: dpu_libvirt.start(self),
            }
            for service in SERVICES:
                if service in services:
                    done += starters[service]()
        except BaseException:
            log.error("lab up failed; removing what was made")
            with contextlib.suppress(Exception):
                self.down()
            raise
        return done

    def _write_whitelist(self, side: LabSide, allow: list[str] | tuple[str, ...]) -> None:
        path = side.run_dir / "whitelist"
        path.unlink(missing_ok=True)
        path.write_text("".join(f"{p}\n" for p in dict.fromkeys([*DEFAULT_ALLOW, *allow])))
        os.chmod(path, 0o400)

    def _start_daemons(self, name: str, what: str, port: int, extra: Callable[[LabSide], list[str]]) -> list[str]:
        """Start a lab daemon on both sides: what both share (node, addresses, credentials, users), then ``extra``."""
        done = []
        for side in (self.host, self.dpu):
            common = [
                *("--node", side.role, "--listen", _address(side, port), "--peer", _address(self.other(side), port)),
                *("--pki", str(self.dir / "pki" / side.role)),
                *("--max-peer-connections", str(LAB_PEER_LIMIT)),
                # libvirtd is root on the DPU side; on the host side qemu runs as root, as qemu.conf
                # says, and libvirt's sockets are root's: root acts as root, as a libvirt deployment
                # configures it (the daemons squash root callers otherwise).
                *("--user-map", "root=root"),
            ]
            self.start_service(f"{side.role}-{name}", side, [*proc.program(what), *common, *extra(side)])
            done.append(f"{what} on {side.role} at {_address(side, port)}")
        return done

    @property
    def shared(self) -> tuple[str, ...]:
        """Paths that name the same file on both sides: the lab's shared directory, and what qtfs
        serves (console logs, disks), for rexec's inherited fds and udsproxy's passed ones."""
        return (str(self.dir / "shared"), *LIBVIRT_EXPORTS)

    def _start_rexec(self) -> list[str]:
        return self._start_daemons(
            "rexec",
            "rexec_server",
            REXEC_PORT,
            lambda side: [
                *("--whitelist", str(side.run_dir / "whitelist"), "--run-dir", str(side.run_dir)),
                *(arg for prefix in self.shared for arg in ("--shared-path", prefix)),
                *("--keepalive", f"{REXEC_KEEPALIVE:g}"),
                *("--resume-window", f"{LAB_RESUME_WINDOW:g}"),
                # Small, so that a test reaches it.
                *("--max-user-links", str(LAB_USER_LINKS)),
            ],
        )

    @property
    def qtfs_address(self) -> str:
        return f"tcp://{self.host.link.address}:{QTFS_PORT}"

    def _start_qtfs_server(self) -> list[str]:
        argv = [
            *proc.program("qtfs"),
            *("serve", "--listen", self.qtfs_address, "--pki", str(self.dir / "pki" / "host")),
            *("--max-peer-connections", str(LAB_PEER_LIMIT)),
            *(arg for export in LIBVIRT_EXPORTS for arg in ("--export", export)),
            # libvirtd is root on the DPU side and owns its state directories
            # here (it chowns its files back to root): the lab loosens the
            # default root squash on purpose.  setuid, setgid and file
            # capabilities stay refused either way.
            "--no-root-squash",
            # The host's facts, which the DPU side binds over its own files.
            *("--export", "/proc:ro", "--export", "/sys:ro"),
            # The cgroups libvirt makes for its domains, and the programs the
            # DPU side started, which alone may be placed in them.
            *(arg for place in sorted(set(self._make_host_partitions().values())) for arg in ("--export", str(place))),
            *("--programs-of", str(self.host.run_dir / "rexec.lock")),
        ]
        proc.run(self.command("host", ["mkdir", "-p", "/var/lib/libvirt/images", "/var/lib/libvirt/qemu"]))
        self.start_service("host-qtfs", self.host, argv)
        return [f"qtfs server on host at {self.qtfs_address} exporting {', '.join(LIBVIRT_EXPORTS)}"]

    def _start_udsproxy(self) -> list[str]:
        if not SHIM.exists():
            raise LabError(f"{SHIM} is missing (run make setup)")
        self.sockets.mkdir(exist_ok=True)
        allowed = [str(self.sockets), "/var/lib/libvirt", "/run/libvirt"]
        return self._start_daemons(
            "udsproxy",
            "udsproxyd",
            UDSPROXY_PORT,
            lambda side: [
                *("--run-dir", str(side.run_dir / "udsproxy")),
                *(arg for prefix in allowed for arg in ("--allow", prefix)),
                *(arg for prefix in self.shared for arg in ("--share", prefix)),
            ],
        )

    def start_service(self, key: str, side: LabSide, argv: list[str]) -> int:
        """Start a daemon in ``side``'s namespace under a service manager of its own; wait for its READY=1.

        The manager (offload.lab.manager) plays systemd's part: it keeps the
        daemon's fd store across `restart_service`.  ``key`` names the daemon
        itself (its pid here, returned); ``KEY-manager`` what the lab started
        for it, which `down` ends first.
        """
        self._save(key, [side.role, argv], within="argv")
        with self._readiness(key) as notify:
            managed = [
                *proc.run_module("offload.lab.manager"),
                *("--notify-socket", str(side.run_dir / f"{key}.notify")),
                *("--ready-socket", notify.getsockname()),
                *("--store-max", str(STORE_MAX), "--stop-timeout", f"{STOP_TIMEOUT:g}"),
                "--",
                *argv,
            ]
            env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
            child = spawn_logged(self.command(side.role, managed), self.dir / f"{key}.log", env=env)
            self.record(f"{key}{MANAGER_SUFFIX}", child.pid)
            pid = self._await_ready(key, side, notify, child.poll)
        # It runs on after we return; it is ours to end in down(), by pid.
        child.returncode = 0
        return pid

    def restart_service(self, key: str, *, crash: bool = False) -> int:
        """Stop a service the lab started and start it again; the new pid.

        It stops on SIGTERM, as systemctl would stop it, or with ``crash`` on
        SIGKILL, as a crash or the OOM killer would end it: no cleanup at all.
        Its manager restarts it (SIGUSR1, SIGUSR2) and keeps its fd store; a
        service whose manager is gone (the daemon exited) starts afresh.
        """
        role, argv = self._state().get("argv", {}).get(key, (None, None))
        if argv is None:
            raise LabError(f"lab {self.name} has no service {key} to restart")
        manager = self._state()["pids"].get(f"{key}{MANAGER_SUFFIX}")
        if manager is None or not _running(manager) or not self._is_ours(manager):
            return self.start_service(key, self.side(role), argv)
        with self._readiness(key) as notify:
            os.kill(manager, signal.SIGUSR2 if crash else signal.SIGUSR1)
            return self._await_ready(key, self.side(role), notify, lambda: None if _running(manager) else -1)

    @contextlib.contextmanager
    def _readiness(self, key: str) -> Iterator[socket.socket]:
        """The lab's notify socket for ``key``, bound afresh: what it receives is news."""
        path = self.dir / f"{key}.notify"
        path.unlink(missing_ok=True)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as notify:
            notify.bind(str(path))
            notify.settimeout(0.2)
            yield notify

    def _await_ready(self, key: str, side: LabSide, notify: socket.socket, exited: Callable[[], int | None]) -> int:
        """Wait for the manager's READY=1 and record the daemon's pid (its MAINPID=, numbered here)."""
        log_path = self.dir / f"{key}.log"
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            try:
                fields = dict(line.split("=", 1) for line in notify.recv(4096).decode().split("\n") if "=" in line)
            except TimeoutError:
                fields = {}
            if fields.get("READY") == "1" and fields.get("MAINPID", "").isdigit():
                pid = self.pid_here(side.role, int(fields["MAINPID"]))
                self.record(key, pid)
                return pid
            status = exited()
            if status is not None:
                raise LabError(f"{key} exited with status {status} before it was ready:\n{tail(log_path, '(no log)')}")
            if time.monotonic() > deadline:
                raise LabError(f"{key} was not ready after {READY_TIMEOUT:.0f} s:\n{tail(log_path, '(no log)')}")

    def down(self) -> list[str]:
        removed = []
        pids = dict(self._state()["pids"])
        holders = {key: pid for key, pid in pids.items() if key.endswith("-ns")}
        # A side's pid namespace ends with its init, which its holder ends.
        inits: set[int | None] = set()
        for pid in holders.values():
            with contextlib.suppress(LabError):
                inits.add(mountns.init_of(pid))
        namespaces = self._namespace_ids()
        # Managers first: each stops its daemon and flushes its store, as
        # systemctl stop does (a daemon ended under its manager is a crash).
        managers = [key for key in pids if key.endswith(MANAGER_SUFFIX)]
        for key in [*managers, *(key for key in pids if key not in managers)]:
            pid = pids[key]
            if key not in holders and self._belongs(pid, namespaces):
                proc.end_pid(pid, grace=STOP_TIMEOUT + 2 if key in managers else 3.0)
                removed.append(f"{key} (pid {pid})")
        # Everything else of the lab (a state file lost in a crash, what the
        # daemons started) is ours too.  The holders go last: their
        # namespaces, and every mount in them, end with them.
        for process in psutil.process_iter(["pid", "cmdline"]):
            pid = process.info["pid"]
            if pid in pids.values() or pid in inits or pid == os.getpid():
                continue
            if self._belongs(pid, namespaces, process.info["cmdline"]):
                proc.end_pid(pid)
                removed.append(f"leftover pid {pid} ({' '.join((process.info['cmdline'] or ['?'])[:2])})")
        for key, pid in holders.items():
            if self._belongs(pid, namespaces):
                proc.end_pid(pid)
                removed.append(f"{key} (pid {pid}) and its mounts")
        made = self._state().get("cgroups", []) + sorted(set(self._state().get("host_partitions", {}).values()))
        left = cgroups.remove(made)
        removed += [f"cgroup {place}" for place in made if place not in left]
        if left:
            log.warning("cgroups of the lab still hold processes, left in place: %s", ", ".join(left))
        removed += netlink.remove([self.host.netns, self.dpu.netns], [self.host.link.ifname, self.dpu.link.ifname])
        if self.dir.exists():
            shutil.rmtree(self.dir)
            removed.append(str(self.dir))
        return removed

    def _namespace_ids(self) -> set[str]:
        """The identities of the lab's network namespaces (as /proc/PID/ns/net shows them)."""
        ids = set()
        for role in ("host", "dpu"):
            with contextlib.suppress(OSError):
                ids.add(self.netns_id(role))
        return ids

    def _belongs(self, pid: int, namespaces: set[str], cmdline: list[str] | None = None) -> bool:
        # Started from the lab's directory, or running in its namespaces
        # (chrooted daemons, VMs, stand-ins, FUSE servers); a pid number
        # alone may have been reused by now.
        in_lab = mountns.namespace_of(pid) in namespaces
        return in_lab or self._is_ours(pid, cmdline)

    def _is_ours(self, pid: int, cmdline: list[str] | None = None) -> bool:
        try:
            cmdline = cmdline if cmdline is not None else psutil.Process(pid).cmdline()
        except psutil.Error:
            return False
        return any(str(self.dir) in arg for arg in cmdline or ())

    def status(self) -> list[str]:
        if not self.is_up:
            return [f"lab {self.name} is down"]
        lines = [f"lab {self.name}: {self.dir}"]
        present = netlink.namespaces()
        for side in (self.host, self.dpu):
            state = "present" if side.netns in present else "MISSING"
            lines.append(f"  {side.role}: netns {side.netns} {state}, {side.link.ifname} {side.link.address}")
        namespaces = self._namespace_ids()
        for key, pid in self._state()["pids"].items():
            lines.append(f"  {key}: pid {pid} {'running' if self._belongs(pid, namespaces) else 'NOT RUNNING'}")
        return lines

    def set_link(self, up: bool) -> None:
        """Cut (or restore) the link between the sides, as a pulled cable would."""
        netlink.set_link(self.dpu.link, up)


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, exited but not yet collected, does not)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _address(side: LabSide, port: int) -> str:
    return f"tcp://{side.link.address}:{port}"


def _describe(step: mountns.Step) -> str:
    if isinstance(step, mountns.Hide):
        return f"{step.path} hidden"
    if isinstance(step, mountns.Bind):
        return f"{step.path} (bound)" if step.source == step.path else f"{step.source} at {step.path}"
    return f"private {step.path}"
