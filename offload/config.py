"""rexec_server configuration: one table of settings, one frozen object.

Each setting is declared once (`SETTINGS`) and feeds both the command line
and the TOML file (``/etc/offload/rexec.toml`` by default; keys are the
long option names with dashes as underscores).  The command line wins over
the file, the file over the defaults.  Library code raises ConfigError; the
entry point prints it and exits.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from offload.errors import ConfigError
from offload.net import REQUEST_TIMEOUT, ConnectionLimits

DEFAULT_CONFIG = Path("/etc/offload/rexec.toml")


@dataclass(frozen=True)
class Setting:
    name: str  # attribute and TOML key; its default is RexecConfig's
    kind: type  # str, int, float, bool, or list (of str)
    help: str
    metavar: str | None = None


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "listen",
        list,
        "address to accept peer links on (repeatable); default: $CMD_NET_ADDR",
        "ADDR",
    ),
    Setting("peer", str, "default remote rexec_server for stand-ins without CMD_NET_ADDR", "ADDR"),
    Setting(
        "whitelist",
        str,
        "programs peers may run here, one absolute path per line",
        "FILE",
    ),
    Setting(
        "pki",
        str,
        "directory with ca.pem, cert.pem and key.pem (default /etc/offload/pki)",
        "DIR",
    ),
    Setting(
        "insecure",
        bool,
        "plaintext links without authentication (tests only; warns at start)",
    ),
    Setting("node", str, "this machine's name in messages (default: the host name)", "NAME"),
    Setting("run_dir", str, "state directory: agent socket, pids/, bridges/", "DIR"),
    Setting(
        "shared_path",
        list,
        "prefix of paths that are the same file on both machines (repeatable)",
        "PREFIX",
    ),
    Setting("env", list, "extra environment variable passed to remote programs (repeatable)", "NAME"),
    Setting(
        "leave_behind",
        list,
        "fd type left behind instead of refused, e.g. 'anon_inode:[eventfd]' (repeatable)",
        "TYPE",
    ),
    Setting("user_map", list, "CALLER=REMOTE user mapping (repeatable)", "MAP"),
    Setting("keepalive", float, "seconds without traffic after which a link is lost", "SECONDS"),
    Setting(
        "kill_grace",
        float,
        "seconds between SIGTERM and SIGKILL when a session's caller is gone",
        "SECONDS",
    ),
    Setting(
        "request_timeout",
        float,
        "seconds a stand-in has to send its request on the agent socket before it is closed",
        "SECONDS",
    ),
    Setting("warm", int, "idle authenticated connections kept open to each peer", "N"),
    Setting(
        "peer_name",
        list,
        "the only peer node accepted or connected to (repeatable; default: any of the other role)",
        "NAME",
    ),
    Setting("max_connections", int, "peer links, and stand-ins, served at once", "N"),
    Setting("max_peer_connections", int, "links served at once per peer address (stand-ins: per uid)", "N"),
)


@dataclass(frozen=True)
class RexecConfig:
    listen: tuple[str, ...] = ()
    peer: str = ""
    whitelist: str = "/etc/rexec/whitelist"
    pki: str = ""
    insecure: bool = False
    node: str = ""
    run_dir: str = "/var/run/rexec"
    shared_path: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    leave_behind: tuple[str, ...] = ()
    user_map: tuple[str, ...] = ()
    keepalive: float = 10.0
    kill_grace: float = 2.0
    request_timeout: float = REQUEST_TIMEOUT
    warm: int = 2
    peer_name: tuple[str, ...] = ()
    max_connections: int = ConnectionLimits.total
    max_peer_connections: int = ConnectionLimits.per_peer

    def __post_init__(self) -> None:
        _ = self.limits  # ConnectionLimits raises ConfigError for limits out of range
        if self.keepalive < 0.5:
            raise ConfigError(f"keepalive {self.keepalive} is below 0.5 seconds")
        if not self.request_timeout > 0:
            raise ConfigError(f"request timeout {self.request_timeout} must be positive")
        if self.kill_grace < 0:
            raise ConfigError("kill_grace must not be negative")
        if not 0 <= self.warm <= 64:
            raise ConfigError(f"warm {self.warm} out of range 0..64")
        for prefix in self.shared_path:
            if not prefix.startswith("/") or ".." in prefix.split("/"):
                raise ConfigError(f"shared path {prefix!r} must be absolute without '..'")
        for item in self.user_map:
            if item.count("=") != 1 or not all(item.split("=")):
                raise ConfigError(f"user map {item!r} is not CALLER=REMOTE")

    @property
    def node_name(self) -> str:
        return self.node or os.uname().nodename

    @property
    def agent_socket(self) -> str:
        return str(Path(self.run_dir) / "rexec.sock")

    @property
    def limits(self) -> ConnectionLimits:
        return ConnectionLimits(self.max_connections, self.max_peer_connections)

    @property
    def users(self) -> dict[str, str]:
        return dict(item.split("=", 1) for item in self.user_map)

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, document: dict[str, Any], *, source: str = "configuration") -> RexecConfig:
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in document.items():
            setting = next((s for s in SETTINGS if s.name == key), None)
            if key not in known or setting is None:
                raise ConfigError(f"unknown setting {key!r}", path=source)
            values[key] = _coerce(setting, value, source)
        return cls(**values)


def _coerce(setting: Setting, value: Any, source: str) -> Any:
    if setting.kind is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{setting.name} must be a list of strings", path=source)
        return tuple(value)
    if setting.kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, setting.kind) or (setting.kind is int and isinstance(value, bool)):
        raise ConfigError(f"{setting.name} must be of type {setting.kind.__name__}", path=source)
    return value


_DEFAULTS = RexecConfig()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help=f"TOML settings file (default {DEFAULT_CONFIG} if present)")
    for setting in SETTINGS:
        flag = "--" + setting.name.replace("_", "-")
        default = getattr(_DEFAULTS, setting.name)
        shown = f"{setting.help} (default: {default})" if default not in ((), "", False) else setting.help
        if setting.kind is bool:
            parser.add_argument(flag, action="store_true", default=None, help=setting.help)
        elif setting.kind is list:
            parser.add_argument(flag, action="append", metavar=setting.metavar, help=shown)
        else:
            parser.add_argument(flag, type=setting.kind, metavar=setting.metavar, help=shown)


def from_arguments(args: argparse.Namespace, environ: dict[str, str] | None = None) -> RexecConfig:
    environ = dict(os.environ) if environ is None else environ
    document: dict[str, Any] = {}
    path = Path(args.config) if args.config else DEFAULT_CONFIG
    if args.config or path.exists():
        try:
            document = tomllib.loads(path.read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read: {exc.strerror}", path=str(path)) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"not valid TOML: {exc}", path=str(path)) from None
    for setting in SETTINGS:
        value = getattr(args, setting.name, None)
        if value is not None:
            document[setting.name] = value
    if not document.get("listen") and environ.get("CMD_NET_ADDR"):
        # The reference's variable names the address rexec_server serves on.
        document["listen"] = [environ["CMD_NET_ADDR"]]
    return RexecConfig.from_json(document, source=str(path))
