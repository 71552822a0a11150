"""What every mode installs into a rootfs, and how (idempotently, by rename).

Files are always written to a temporary name and renamed over the old one,
never in place: in copy mode /usr may be hard links to the DPU's own files,
and writing through a link would change the DPU (or, in the lab, turn the
machine's real qemu into the wrapper).
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path

from offload import proc
from offload.errors import ConfigError, RootfsError
from offload.prefix import is_under
from offload.rootfs_builder import chroot
from offload.rootfs_builder.layout import Say, machine_arch
from offload.rootfs_builder.manifest import Entry, file_state, sha256

PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # offload/
HERE = Path(__file__).resolve().parent
SHIM = PACKAGE_ROOT / "_native" / "libudsproxy.so"
REXEC_PORT = 7001

REXEC = "/usr/bin/rexec"
PYTHON = "/usr/bin/python3"
LIBDIR = "/usr/lib/offload"
ENV_FILE = "/etc/offload/rexec.env"
LIBVIRTD_ENV = "/etc/offload/libvirtd.env"
SHIM_PATH = f"{LIBDIR}/libudsproxy.so"
AGENT_SOCKET = "/var/run/rexec/rexec.sock"
UDSPROXY_SOCKET = "/var/run/udsproxy/udsproxy.sock"
#: The stand-in and exactly the modules it imports (stdlib only beyond these).
STAND_IN_MODULES = (
    "__init__.py",
    "errors.py",
    "fdinfo.py",
    "rexec_client.py",
    "rexec/__init__.py",
    "rexec/standin.py",
    "protocol/__init__.py",
    "protocol/framing.py",
    "protocol/local.py",
)
LIBVIRT_PACKAGES = ("libvirt-daemon-system", "libvirt-clients")
LIBVIRT_FILES = ("usr/sbin/libvirtd", "usr/bin/virsh")


@dataclass(frozen=True)
class Options:
    host: str = ""  # --host: the host's rexec_server; "" = the agent's default peer
    remote_qemu: str = ""  # the host's qemu binary; default /usr/bin/qemu-system-ARCH
    arch: str = ""

    @property
    def qemu_arch(self) -> str:
        return self.arch or machine_arch()

    @property
    def remote(self) -> str:
        return self.remote_qemu or f"/usr/bin/qemu-system-{self.qemu_arch}"


@dataclass(frozen=True)
class Payload:
    path: str  # absolute, inside the rootfs
    data: bytes
    mode: int
    what: str

    def entry(self) -> Entry:
        return Entry(self.path, sha256(self.data), self.mode, self.what)


def host_address(host: str) -> str:
    """--host ADDR as CMD_NET_ADDR: tcp://ADDR:7001 unless ADDR names its own scheme or port."""
    from offload.net import parse_address

    if "://" in host:
        text = host
    elif host.startswith("[") or (host.count(":") == 1 and host.rpartition(":")[2].isdigit()):
        text = f"tcp://{host}"  # HOST:PORT or [IPv6]:PORT
    elif ":" in host:
        text = f"tcp://[{host}]:{REXEC_PORT}"  # a bare IPv6 address
    else:
        text = f"tcp://{host}:{REXEC_PORT}"
    parse_address(text)  # ConfigError naming what is wrong
    return text


def render_wrapper(options: Options) -> bytes:
    text = (HERE / "qemu_wrapper").read_text()
    for key, value in (("@REXEC@", REXEC), ("@QEMU@", shlex.quote(options.remote)), ("@ENV_FILE@", ENV_FILE)):
        text = text.replace(key, value)
    return text.encode()


def render_env(options: Options) -> bytes:
    lines = [
        "# Read by the qemu wrapper (/usr/bin/qemu-kvm): libvirt clears qemu's environment.",
        "# Written by `offload rootfs build --host ADDR`; rebuild to change it.",
        "# The host's rexec_server; empty: the DPU rexec_server's default peer (its --peer).",
        f"CMD_NET_ADDR={shlex.quote(host_address(options.host) if options.host else '')}",
        "# The DPU's rexec_server socket as this rootfs sees it (offload prepare binds /var/run/rexec).",
        f"REXEC_AGENT_SOCKET={AGENT_SOCKET}",
    ]
    return ("\n".join(lines) + "\n").encode()


def render_libvirtd_env() -> bytes:
    lines = [
        "# For the unit that starts libvirtd (and virtlogd) chrooted in this rootfs:",
        "# the udsproxy shim makes UNIX sockets that exist only on the host reachable.",
        f"LD_PRELOAD={SHIM_PATH}",
        f"UDSPROXY_SOCKET={UDSPROXY_SOCKET}",
    ]
    return ("\n".join(lines) + "\n").encode()


def render_rexec_launcher() -> bytes:
    # -I: no PYTHONPATH or user site from the caller; -S: no site, the
    # stand-in's start-up time is paid by every remote program.
    return (
        f"#!{PYTHON} -IS\n"
        "# The rexec stand-in (offload), installed by `offload rootfs build`.\n"
        "import sys\n"
        f"sys.path.insert(0, {LIBDIR + '/python'!r})\n"
        "from offload.rexec_client import main\n"
        "main()\n"
    ).encode()


def payloads(options: Options) -> list[Payload]:
    if not SHIM.is_file():
        raise RootfsError(f"{SHIM} is missing: build it with `make setup` (or `make native`)")
    wrapper = render_wrapper(options)
    items = [Payload(REXEC, render_rexec_launcher(), 0o755, "the rexec stand-in")]
    for module in STAND_IN_MODULES:
        data = (PACKAGE_ROOT / module).read_bytes()
        items.append(Payload(f"{LIBDIR}/python/offload/{module}", data, 0o644, "the rexec stand-in's code"))
    for path in ("/usr/bin/qemu-kvm", "/usr/libexec/qemu-kvm", f"/usr/bin/qemu-system-{options.qemu_arch}"):
        items.append(Payload(path, wrapper, 0o755, f"the qemu wrapper (runs the host's {options.remote})"))
    items += [
        Payload(SHIM_PATH, SHIM.read_bytes(), 0o755, "the udsproxy shim, preloaded into libvirtd"),
        Payload(ENV_FILE, render_env(options), 0o644, "where the qemu wrapper's rexec goes"),
        Payload(LIBVIRTD_ENV, render_libvirtd_env(), 0o644, "libvirtd's environment (shim)"),
        Payload(
            "/etc/libvirt/qemu.conf",
            (HERE / "qemu.conf").read_text().replace("@ARCH@", options.qemu_arch).encode(),
            0o600,
            "qemu.conf for offload",
        ),
    ]
    return items


def inside(root: Path, path: str) -> Path:
    """``path`` in ``root``; refuses a route through a symlink that leads out of the rootfs."""
    full = root / path.lstrip("/")
    real_root = os.path.realpath(root)
    parent = os.path.realpath(full.parent)
    if not is_under(parent, real_root):
        raise RootfsError(f"{full.parent} leads out of the rootfs (to {parent}): refusing to write {path}")
    return full


def write_file(root: Path, payload: Payload) -> bool:
    """Install one payload; False when it was already in place."""
    full = inside(root, payload.path)
    if file_state(full) == (sha256(payload.data), payload.mode):
        return False
    full.parent.mkdir(parents=True, exist_ok=True)
    full = inside(root, payload.path)  # again: mkdir may have followed a symlink
    temporary = full.with_name(f".{full.name}.offload-new")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as stream:
            stream.write(payload.data)
            os.fchmod(stream.fileno(), payload.mode)
        os.replace(temporary, full)  # a new inode: never written through a hard link
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise RootfsError(f"cannot install {payload.path} ({payload.what}) in {root}: {exc.strerror}") from None
    return True


#: libvirt takes a console's lock file in /var/lock; Debian links it to /run/lock,
#: which offload prepare makes in the rootfs's fresh /run.
LOCK_DIR = "var/lock"
LOCK_DIR_LINK = "/run/lock"


def ensure_lock_dir(root: Path, say: Say) -> bool:
    """/var/lock in the rootfs (a link to /run/lock, as Debian has it) unless it has one; True if made."""
    full = inside(root, LOCK_DIR)
    if os.path.lexists(full):
        return False
    full.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(LOCK_DIR_LINK, inside(root, LOCK_DIR))
    say(f"made /{LOCK_DIR} -> {LOCK_DIR_LINK} (libvirt's console lock files)")
    return True


def apply(root: Path, items: list[Payload], say: Say) -> list[str]:
    changed = []
    if ensure_lock_dir(root, say):
        changed.append(LOCK_DIR)
    for payload in items:
        if write_file(root, payload):
            changed.append(payload.path)
            say(f"installed {payload.path}: {payload.what}")
    return changed


def missing_packages(root: Path) -> list[str]:
    needed = []
    if not os.path.lexists(inside(root, PYTHON)):
        # The stand-in is Python (debootstrap minbase has none).  python3-minimal
        # alone lacks _json, which the stand-in's messages use: python3 is
        # python3-minimal plus the standard library's C modules.
        needed.append("python3")
    if not all(os.path.lexists(root / path) for path in LIBVIRT_FILES):
        needed += LIBVIRT_PACKAGES
    return needed


def ensure_packages(root: Path, say: Say, *, apt: bool = True) -> list[str]:
    """Install what is missing with apt inside ``root``; the packages installed."""
    needed = missing_packages(root)
    if not needed:
        return []
    if not apt:
        if "python3" in needed:
            raise RootfsError(f"{root} has no {PYTHON}, which the rexec stand-in needs (and --no-apt was given)")
        say(f"libvirt is missing in {root} ({', '.join(LIBVIRT_FILES)}); --no-apt: not installing it")
        return []
    if not (root / "usr/bin/apt-get").exists():
        raise RootfsError(f"{root} lacks {', '.join(needed)} and has no apt-get to install them")
    policy = inside(root, "/usr/sbin/policy-rc.d")
    made_policy = not os.path.lexists(policy)
    if made_policy:
        # Package scripts must not start libvirtd or anything else in the rootfs.
        policy.write_text("#!/bin/sh\n# offload rootfs build: start no services while installing\nexit 101\n")
        policy.chmod(0o755)
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "DEBIAN_FRONTEND": "noninteractive",
        "LC_ALL": "C",
    }
    try:
        say(f"apt: installing {' '.join(needed)} in {root} (apt-get update first)")
        _apt(root, ["apt-get", "update", "-q"], env, "apt-get update")
        _apt(root, ["apt-get", "install", "-y", "-q", "--no-install-recommends", *needed], env, "apt-get install")
        _apt(root, ["apt-get", "clean"], env, "apt-get clean")
    finally:
        if made_policy:
            policy.unlink(missing_ok=True)
    still = missing_packages(root)
    if still:
        raise RootfsError(f"apt ran but {', '.join(still)} still missing in {root}")
    return needed


def _apt(root: Path, argv: list[str], env: dict[str, str], what: str) -> None:
    result = proc.run(chroot.command(root, argv), check=False, env=env)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        raise RootfsError(f"{what} in {root} failed with status {result.returncode}:\n{tail}")


def validate(options: Options) -> None:
    if options.remote_qemu and not options.remote_qemu.startswith("/"):
        raise ConfigError(f"--remote-qemu {options.remote_qemu!r} must be an absolute path")
    if options.host:
        host_address(options.host)
