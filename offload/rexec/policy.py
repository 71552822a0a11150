"""What a session may do: the whitelist, environment, users and fds.

Policy is enforced on the side that acts: the server checks the whitelist,
maps the user and re-checks shared paths before it opens anything; the
agent decides which of the stand-in's fds travel and how.
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from offload import fdinfo
from offload.errors import ConfigError, RefusedError, UnsupportedFdError
from offload.prefix import is_shared as is_shared  # shared with udsproxy; rexec names it here
from offload.protocol.rexec import FdKind, FdSpec, Rlimit
from offload.rexec import standin
from offload.users import RemoteUser as RemoteUser  # shared with udsproxy; rexec names it here
from offload.users import map_user as map_user

log = logging.getLogger(__name__)

#: PATH of remote programs: the server's, never the caller's.
REMOTE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: Variables a remote program may receive from its caller.
ENV_NAMES = frozenset({"LANG", "LANGUAGE", "TZ", "HOME", "TERM", "COLUMNS", "LINES", "TMPDIR"})
ENV_PREFIXES = ("LC_", "XDG_")
#: Never passed, whatever the configuration says: they change what runs.
ENV_FORBIDDEN = frozenset({"PATH", "LD_PRELOAD", "LD_LIBRARY_PATH", "LD_AUDIT", "PYTHONPATH", "IFS"})
#: Signals a caller may have delivered to its program: those the stand-in
#: forwards, and SIGKILL to end it.  A peer asking for any other (SIGSTOP,
#: SIGSEGV, ...) is refused.
FORWARDED_SIGNALS = frozenset({*standin.FORWARDED_SIGNALS, signal.SIGKILL})


@dataclass(frozen=True)
class Whitelist:
    path: str
    programs: frozenset[str]

    @classmethod
    def load(cls, path: str) -> Whitelist:
        """Read the reference format: one absolute program path per line.

        The file must be root-owned and writable by nobody else, or anyone
        who could edit it could run anything here as any user.  No file
        means an empty list: nothing runs here for the peer (a DPU needs
        none).
        """
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            log.info("no whitelist at %s: no program runs here for the peer", path)
            return cls(path, frozenset())
        except OSError as exc:
            raise ConfigError(f"cannot open the whitelist: {exc.strerror}", path=path) from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)  # before fdopen, which refuses a directory with its own error
            raise ConfigError("the whitelist is not a regular file", path=path)
        with os.fdopen(fd) as stream:
            if st.st_uid != 0:
                raise ConfigError(f"the whitelist must be owned by root (it is owned by uid {st.st_uid})", path=path)
            if st.st_mode & 0o022:
                raise ConfigError(
                    f"the whitelist must not be group- or world-writable (mode {stat.S_IMODE(st.st_mode):04o}); chmod 0400 it",
                    path=path,
                )
            text = stream.read()
        programs = set()
        for number, line in enumerate(text.splitlines(), 1):
            entry = line.strip()
            if not entry or entry.startswith("#"):
                continue
            if not entry.startswith("/") or ".." in entry.split("/"):
                log.warning("%s:%d: ignoring %r: entries must be absolute paths without '..'", path, number, entry)
                continue
            programs.add(entry)
        return cls(path, frozenset(programs))

    def resolve(self, program: str, node: str) -> str:
        """The path to execute for ``program``, or RefusedError (126) / (127)."""
        if "/" in program:
            path = program
            if not path.startswith("/"):
                raise RefusedError(f"{program}: relative program paths are not allowed on {node}", exit_code=126)
        else:
            path = next((f"{d}/{program}" for d in REMOTE_PATH.split(":") if os.access(f"{d}/{program}", os.X_OK)), "")
            if not path:
                raise RefusedError(f"{program}: not found on {node}", exit_code=127)
        if path not in self.programs:
            raise RefusedError(f"{program}: not allowed on {node}", exit_code=126)
        return path


def filter_environment(env: dict[str, str], extra: tuple[str, ...]) -> dict[str, str]:
    """The caller's variables a remote program may see (an allowlist)."""
    allowed = {}
    for key, value in env.items():
        if key in ENV_FORBIDDEN or key.startswith("LD_"):
            continue
        if key in ENV_NAMES or key in extra or key.startswith(ENV_PREFIXES):
            allowed[key] = value
    return allowed


#: What a passed fd of each type is to the program: a channel of its own (the channel is fd + 1).
_CHANNEL_KINDS = {
    fdinfo.PIPE_READ: FdKind.PIPE_IN,
    fdinfo.PIPE_WRITE: FdKind.PIPE_OUT,
    fdinfo.UNIX_STREAM: FdKind.SOCKET,
}


@dataclass(frozen=True)
class FdPlan:
    """The agent's decision for the stand-in's fds."""

    specs: tuple[FdSpec, ...]  # what the remote program gets
    relayed: dict[int, FdSpec]  # passed fd number -> its relayed spec
    local_only: tuple[int, ...]  # fds that stay with the stand-in


def plan_fds(descriptions: list[dict], shared: tuple[str, ...], leave_behind: tuple[str, ...]) -> FdPlan:
    """Decide per fd from the stand-in's descriptions; raises UnsupportedFdError."""
    specs: list[FdSpec] = []
    relayed: dict[int, FdSpec] = {}
    local_only: list[int] = []
    for d in descriptions:
        fd, kind, passed = d["fd"], d["type"], d.get("passed", False)
        spec: FdSpec | None = None
        if kind == fdinfo.NULL:
            spec = FdSpec(fd, FdKind.NULL, access=d.get("access", "r"))
        elif kind == fdinfo.FILE and not passed:
            if not d.get("deleted") and is_shared(d["path"], shared):
                spec = FdSpec(
                    fd, FdKind.FILE, path=d["path"], access=d["access"], append=d["append"], offset=d["offset"]
                )
            else:
                local_only.append(fd)  # e.g. libvirt's locked pidfile: it stays here
                continue
        elif passed and kind in (fdinfo.FILE, fdinfo.STREAM):
            spec = FdSpec(fd, FdKind.PIPE_IN if fd == 0 else FdKind.PIPE_OUT, channel=fd + 1)
        elif passed and kind in _CHANNEL_KINDS:
            spec = FdSpec(fd, _CHANNEL_KINDS[kind], channel=fd + 1)
        elif passed and kind == fdinfo.UNIX_LISTENER:
            spec = FdSpec(fd, FdKind.LISTENER)
        else:
            what = str(d.get("what", kind))
            if "all" in leave_behind or what in leave_behind:
                log.info("leaving fd %d (%s) behind, as configured", fd, what)
                local_only.append(fd)
                continue
            raise UnsupportedFdError(fd, what)
        specs.append(spec)
        if passed:
            relayed[fd] = spec
    return FdPlan(tuple(specs), relayed, tuple(local_only))


def ensure_private_dir(path: Path, mode: int = 0o700) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, mode)


#: CAP_SYS_RESOURCE: what lets root raise a hard resource limit.
_CAP_SYS_RESOURCE = 24


def _may_raise_hard_limits() -> bool:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> _CAP_SYS_RESOURCE & 1)
    return False


def grantable_rlimits(requested: Mapping[str, Rlimit], uid: int) -> tuple[dict[str, Rlimit], list[str]]:
    """The limits a program of ``uid`` gets for ``requested``, and a line per limit that was lowered.

    The stand-in sends the limits it runs under: those libvirt set for qemu,
    but for a program run from a shell just that shell's.  A hard limit
    above this daemon's (which the program inherits) is only raised for
    root with CAP_SYS_RESOURCE, as the kernel would; for anyone else it is
    lowered to the daemon's, never granted and never a reason to refuse the
    program.  None is unlimited.
    """
    may_raise = uid == 0 and _may_raise_hard_limits()
    granted: dict[str, Rlimit] = {}
    lowered: list[str] = []
    for name, (soft, hard) in requested.items():
        ours = resource.getrlimit(getattr(resource, f"RLIMIT_{name}"))[1]
        ceiling = None if ours == resource.RLIM_INFINITY else ours
        if not may_raise and _above(hard, ceiling):
            hard = ceiling
            soft = hard if _above(soft, hard) else soft
            lowered.append(
                f"RLIMIT_{name} to soft {_shown(soft)}, hard {_shown(hard)} (asked {_shown(requested[name][0])}, {_shown(requested[name][1])})"
            )
        granted[name] = (soft, hard)
    return granted, lowered


def _above(limit: int | None, ceiling: int | None) -> bool:
    return ceiling is not None and (limit is None or limit > ceiling)


def _shown(limit: int | None) -> str:
    return "unlimited" if limit is None else str(limit)
