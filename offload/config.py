"""rexec_server configuration: one table of settings, one frozen object.

Each setting is declared once, as a `RexecConfig` field (type, default,
help), and feeds both the command line and the TOML file
(``/etc/offload/rexec.toml`` by default; keys are the long option names
with dashes as underscores).  The command line wins over the file, the
file over the defaults.  Library code raises ConfigError; the entry point
prints it and exits."""

from __future__ import annotations

import argparse
import os
import tomllib
from dataclasses import Field, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from offload.errors import ConfigError
from offload.net import REQUEST_TIMEOUT, ConnectionLimits

DEFAULT_CONFIG = Path("/etc/offload/rexec.toml")


def _setting(default: Any, text: str, metavar: str | None = None) -> Any:
    """A field of RexecConfig: its default (whose type is the setting's), its help text and metavar."""
    return field(default=default, metadata={"help": text, "metavar": metavar})


@dataclass(frozen=True)
class RexecConfig:
    listen: tuple[str, ...] = _setting(
        (), "address to accept peer links on (repeatable); default: $CMD_NET_ADDR", "ADDR"
    )
    peer: str = _setting("", "default remote rexec_server for stand-ins without CMD_NET_ADDR", "ADDR")
    whitelist: str = _setting("/etc/rexec/whitelist", "programs peers may run here, one absolute path per line", "FILE")
    pki: str = _setting("", "directory with ca.pem, cert.pem and key.pem (default /etc/offload/pki)", "DIR")
    insecure: bool = _setting(False, "plaintext links without authentication (tests only; warns at start)")
    node: str = _setting("", "this machine's name in messages (default: the host name)", "NAME")
    run_dir: str = _setting("/var/run/rexec", "state directory: agent socket, pids/, bridges/", "DIR")
    shared_path: tuple[str, ...] = _setting(
        (), "prefix of paths that are the same file on both machines (repeatable)", "PREFIX"
    )
    env: tuple[str, ...] = _setting((), "extra environment variable passed to remote programs (repeatable)", "NAME")
    leave_behind: tuple[str, ...] = _setting(
        (), "fd type left behind instead of refused, e.g. 'anon_inode:[eventfd]' (repeatable)", "TYPE"
    )
    user_map: tuple[str, ...] = _setting((), "CALLER=REMOTE user mapping (repeatable)", "MAP")
    keepalive: float = _setting(10.0, "seconds without traffic after which a link is lost", "SECONDS")
    kill_grace: float = _setting(2.0, "seconds between SIGTERM and SIGKILL when a session's caller is gone", "SECONDS")
    resume_window: float = _setting(
        60.0,
        "seconds a session whose link was lost (a restart of either rexec_server, a network outage) waits to be"
        " resumed before its program is ended",
        "SECONDS",
    )
    request_timeout: float = _setting(
        REQUEST_TIMEOUT, "seconds a stand-in has to send its request on the agent socket before it is closed", "SECONDS"
    )
    warm: int = _setting(2, "idle authenticated connections kept open to each peer", "N")
    peer_name: tuple[str, ...] = _setting(
        (), "the only peer node accepted or connected to (repeatable; default: any of the other role)", "NAME"
    )
    max_connections: int = _setting(ConnectionLimits.total, "peer links, and stand-ins, served at once", "N")
    max_peer_connections: int = _setting(
        ConnectionLimits.per_peer, "links served at once per peer address (stand-ins: per uid)", "N"
    )
    program_slice: str = _setting(
        "",
        "systemd slice in which each program gets a transient scope of its own, outside this service's cgroup,"
        " as libvirt's machines do (e.g. machine.slice; default: none)",
        "SLICE",
    )
    max_user_links: int = _setting(
        64,
        "connections to peers one unprivileged user's sessions may hold at once (their links, bridged"
        " connections and ptys; root's, libvirt's, are not counted)",
        "N",
    )

    def __post_init__(self) -> None:
        _ = self.limits  # ConnectionLimits raises ConfigError for limits out of range
        for wrong, message in (
            (self.keepalive < 0.5, f"keepalive {self.keepalive} is below 0.5 seconds"),
            (not self.request_timeout > 0, f"request timeout {self.request_timeout} must be positive"),
            (self.kill_grace < 0, "kill_grace must not be negative"),
            (self.resume_window < 0, "resume_window must not be negative"),
            (self.max_user_links < 1, f"max_user_links {self.max_user_links} must be at least 1"),
            (not 0 <= self.warm <= 64, f"warm {self.warm} out of range 0..64"),
        ):
            if wrong:
                raise ConfigError(message)
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
            if key not in known:
                raise ConfigError(f"unknown setting {key!r}", path=source)
            values[key] = _coerce(known[key], value, source)
        return cls(**values)


def _coerce(setting: Field, value: Any, source: str) -> Any:
    kind = type(setting.default)
    if kind is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{setting.name} must be a list of strings", path=source)
        return tuple(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{setting.name} must be of type {kind.__name__}", path=source)
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help=f"TOML settings file (default {DEFAULT_CONFIG} if present)")
    for setting in fields(RexecConfig):
        flag = "--" + setting.name.replace("_", "-")
        text, metavar = setting.metadata["help"], setting.metadata["metavar"]
        shown = f"{text} (default: {setting.default})" if setting.default not in ((), "", False) else text
        if isinstance(setting.default, bool):
            parser.add_argument(flag, action="store_true", default=None, help=text)
        elif isinstance(setting.default, tuple):
            parser.add_argument(flag, action="append", metavar=metavar, help=shown)
        else:
            parser.add_argument(flag, type=type(setting.default), metavar=metavar, help=shown)


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
    for setting in fields(RexecConfig):
        value = getattr(args, setting.name, None)
        if value is not None:
            document[setting.name] = value
    if not document.get("listen") and environ.get("CMD_NET_ADDR"):
        # The reference's variable names the address rexec_server serves on.
        document["listen"] = [environ["CMD_NET_ADDR"]]
    return RexecConfig.from_json(document, source=str(path))
