"""/etc/offload/prepare.toml: what `offload prepare` mounts, as frozen typed objects.

The dataclasses below are the one declaration of every setting: their
fields are the TOML keys, their defaults the defaults, their types what the
loader accepts (systemd/prepare.toml.example shows them).  A missing file
means all defaults (no qtfs steps, since no host is named).  Library code
raises ConfigError; the CLI prints it.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from offload.errors import ConfigError

DEFAULT_CONFIG = Path("/etc/offload/prepare.toml")
DEFAULT_TARGET = "/another_rootfs"

#: Device nodes libvirt and qemu open: the basic character devices, the
#: terminal and pty master, KVM, tap (net/tun), vhost and FUSE.  Each is
#: created only where the machine's /dev has it.
DEFAULT_DEVICES: tuple[str, ...] = (
    "null",
    "zero",
    "full",
    "random",
    "urandom",
    "tty",
    "kvm",
    "net/tun",
    "vhost-net",
    "vhost-vsock",
    "fuse",
)

# udsproxyd's socket directory is ProxyConfig.run_dir in offload/udsproxy/daemon.py
# (a test checks they agree; importing the daemon here would pull in trio).
UDSPROXY_RUN_DIR = "/var/run/udsproxy"

MISSING_POLICIES = ("error", "skip", "create")
KERNEL_POLICIES = ("auto", "yes", "no")


@dataclass(frozen=True)
class MountSpec:
    """One configured mount: a bind (``type = "bind"`` or ``"rbind"``) or a filesystem."""

    target: str = ""  # path inside the target rootfs; for binds defaults to source
    type: str = "bind"  # "bind", "rbind" or a filesystem type (tmpfs, ...)
    source: str = ""  # bind: a path on this machine; filesystem: the device string (default: type)
    options: str = ""  # as mount -o: flags (ro, nosuid, ...) and filesystem data (mode=0755, ...)
    missing: str = "error"  # bind whose source does not exist: "error", "skip" or "create" (mkdir -p)

    def __post_init__(self) -> None:
        if self.is_bind and not self.source:
            raise ConfigError(f"a {self.type} mount needs a source")
        if not self.is_bind and not self.target:
            raise ConfigError(f"a {self.type} mount needs a target")
        for name in ("source", "target"):
            value = getattr(self, name)
            if value and not (value.startswith("/") or (name == "source" and not self.is_bind)):
                raise ConfigError(f"{name} {value!r} must be an absolute path")
        if self.missing not in MISSING_POLICIES:
            raise ConfigError(f"missing = {self.missing!r}: expected one of {', '.join(MISSING_POLICIES)}")
        if self.is_bind and set(filter(None, self.options.split(","))) - {"ro", "rw"}:
            raise ConfigError(f"options = {self.options!r}: a bind takes only 'ro' or 'rw'")
        if not self.type or "/" in self.type:
            raise ConfigError(f"type = {self.type!r} is not a filesystem type")

    @property
    def is_bind(self) -> bool:
        return self.type in ("bind", "rbind")

    @property
    def where(self) -> str:
        return self.target or self.source


#: The state rexec and udsproxy need inside the chroot: the stand-in talks
#: to the local rexec_server through /var/run/rexec (and its pidmap lives
#: there), the shim to udsproxyd through its run directory.  The run
#: directories are created when missing (their daemons make them at start
#: anyway); /etc/rexec is shown read-only where it exists.  The machine's
#: /etc/offload is not bound: the rootfs builder writes the target's own
#: (rexec.env for the qemu wrapper, libvirtd.env, the manifest), which a
#: bind would hide, and the machine's holds private keys the chroot has no
#: use for.  A [[bind]] list in prepare.toml replaces this one.
DEFAULT_BINDS: tuple[MountSpec, ...] = (
    MountSpec(source="/var/run/rexec", missing="create"),
    MountSpec(source=UDSPROXY_RUN_DIR, missing="create"),
    MountSpec(source="/etc/rexec", options="ro", missing="skip"),
)


@dataclass(frozen=True)
class HostDir:
    """A host directory served by qtfs, mounted at ``local`` in the target (default: the same path)."""

    remote: str
    local: str = ""

    def __post_init__(self) -> None:
        for path in (self.remote, self.local):
            if path and (not path.startswith("/") or ".." in path.split("/")):
                raise ConfigError(f"export path {path!r} must be absolute, without '..'")
            if not path.isprintable():
                # The shim's map of cgroup partitions is one line of these paths.
                raise ConfigError(f"export path {path!r} has a control character")

    @classmethod
    def from_string(cls, value: str) -> HostDir:
        return cls(remote=value)

    @property
    def where(self) -> str:
        return self.local or self.remote


@dataclass(frozen=True)
class PrepareConfig:
    target: str = DEFAULT_TARGET
    # qtfs: with no host named the plan has no qtfs steps at all.
    host: str = ""  # the host's qtfs server, as `qtfs mount` takes it: HOST:PORT or tcp://HOST:PORT
    pki: str = "/etc/offload/pki"  # this machine's ca.pem, cert.pem and key.pem
    insecure: bool = False  # plaintext qtfs (tests only)
    exports: tuple[HostDir, ...] = (HostDir("/var/lib/libvirt"), HostDir("/home/VMs"))
    proc_facts: bool = True  # the host's /proc facts (meminfo, cpuinfo, ...) over the target's /proc files
    sys_facts: bool = True  # the host's /sys directories over the target's /sys
    qtfs_staging: str = "/run/offload"  # inside the target: where the host's /proc and /sys are mounted whole
    qtfs_command: str = ""  # the userspace qtfs program; "": this installation's (never looked up through PATH)
    qtfs_kernel: str = "auto"  # the qtfs kernel module: "auto" (when /proc/filesystems lists it), "yes", "no"
    # Host cgroup directories (the host's /machine of a controller) mounted over the target's, so that
    # libvirt's cgroups are made on the host and hold its programs: {remote = HOST DIR, local = TARGET DIR}.
    cgroup_partitions: tuple[HostDir, ...] = ()
    pidmap: str = "/var/run/rexec/pids"  # rexec's pidmap on this machine: stand-in pid -> host pid
    # Local mounts.
    devices: tuple[str, ...] = DEFAULT_DEVICES
    hugetlbfs: bool = True  # /dev/hugepages (skipped with a note where the kernel has no hugetlbfs)
    mqueue: bool = True  # /dev/mqueue
    cgroups: bool = True  # mirror this machine's cgroup mounts under /sys/fs/cgroup
    run_tmpfs: bool = True  # a fresh tmpfs on /run (libvirtd's sockets and pid files)
    bind: tuple[MountSpec, ...] = DEFAULT_BINDS
    mount: tuple[MountSpec, ...] = ()

    def __post_init__(self) -> None:
        if not self.target.startswith("/"):
            raise ConfigError(f"target = {self.target!r} must be an absolute path")
        for name in self.devices:
            if name.startswith("/") or ".." in name.split("/"):
                raise ConfigError(f"device {name!r}: expected a name under /dev such as 'kvm' or 'net/tun'")
        if self.host and (":" not in self.host or not self.host.rsplit(":", 1)[1].isdigit()):
            raise ConfigError(f"host = {self.host!r}: expected the qtfs server as HOST:PORT or tcp://HOST:PORT")
        if self.qtfs_kernel not in KERNEL_POLICIES:
            raise ConfigError(f"qtfs_kernel = {self.qtfs_kernel!r}: expected one of {', '.join(KERNEL_POLICIES)}")
        if not self.qtfs_staging.startswith("/") or ".." in self.qtfs_staging.split("/"):
            raise ConfigError(f"qtfs_staging = {self.qtfs_staging!r} must be absolute, without '..'")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    def to_toml(self) -> str:
        return _to_toml(dataclasses.asdict(self))


def from_dict(data: dict[str, Any], *, origin: str | None = None) -> PrepareConfig:
    try:
        return _build(PrepareConfig, data, "")
    except ConfigError as exc:
        raise ConfigError(str(exc), path=origin) from None


def load(path: Path | str | None = None) -> PrepareConfig:
    """The configuration in ``path`` (default /etc/offload/prepare.toml); defaults if it does not exist."""
    path = Path(path or DEFAULT_CONFIG)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        return PrepareConfig()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read: {exc}", path=str(path)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", path=str(path)) from None
    return from_dict(data, origin=str(path))


# The loader: one walk over the dataclasses' declared field types.


def _build(cls: Any, table: Any, where: str) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"{where or 'top level'}: expected a table")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - names)
    if unknown:
        raise ConfigError(
            f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} in {where or 'top level'}"
        )
    values = {name: _convert(hints[name], table[name], f"{where}{'.' if where else ''}{name}") for name in table}
    return cls(**values)


def _convert(kind: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(kind):
        if isinstance(value, str) and hasattr(kind, "from_string"):
            return kind.from_string(value)
        return _build(kind, value, where)
    if typing.get_origin(kind) is tuple:
        (item,) = {arg for arg in typing.get_args(kind) if arg is not Ellipsis}
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list")
        return tuple(_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if kind is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, not {value!r}")
    if kind is str and not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, not {value!r}")
    return value


def _to_toml(data: dict[str, Any]) -> str:
    """Write what `load` reads back: scalars, lists and arrays of tables, all a PrepareConfig holds."""

    def scalar(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, str):
            return json.dumps(value)  # a JSON string is a valid TOML basic string
        if isinstance(value, list | tuple):
            return "[" + ", ".join(scalar(v) for v in value) + "]"
        return str(value)

    head: list[str] = []
    tail: list[str] = []
    for key, value in data.items():
        if isinstance(value, tuple) and value and all(isinstance(v, dict) for v in value):
            for item in value:
                tail += ["", f"[[{key}]]", *(f"{k} = {scalar(v)}" for k, v in item.items())]
        else:
            head.append(f"{key} = {scalar(value)}")
    return "\n".join(head + tail) + "\n"
