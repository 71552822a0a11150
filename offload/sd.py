"""The service manager's protocol, in one place: sd_notify states and the file descriptor store.

The store keeps fds across a restart of the daemon (systemd.service(5),
FileDescriptorStoreMax=; sd_listen_fds_with_names(3) for how they come back).
"""

from __future__ import annotations

import array
import errno
import logging
import os
import socket
from collections.abc import Sequence

from offload import proc
from offload.errors import OffloadError

log = logging.getLogger(__name__)

#: The first fd the manager passes (SD_LISTEN_FDS_START).
LISTEN_FDS_START = 3
#: The most fds one message may carry (the kernel's SCM_MAX_FD).
MAX_FDS_PER_MESSAGE = 253
#: The longest name the manager accepts (systemd's FDNAME_MAX).
MAX_NAME = 255
#: The name the manager gives fds it passes without one (sd_listen_fds_with_names(3)).
UNKNOWN = "unknown"


def notify(state: str, *, address: str | None = None) -> bool:
    """Send ``state`` to $NOTIFY_SOCKET (or ``address``); False when not run by a service manager."""
    return _send(state, (), address)


def store_available() -> bool:
    """The manager keeps fds for us: it listens for notifications and its store has room.

    systemd >= 254 sets $FDSTORE to FileDescriptorStoreMax=; the unit sets it
    itself for older ones, next to that setting.
    """
    return bool(os.environ.get("NOTIFY_SOCKET")) and store_size() > 0


def place_in_scope(pid: int, unit: str, slice_name: str, description: str) -> None:
    """Move ``pid`` into a transient scope ``unit`` of its own in ``slice_name``, as `systemd-run --scope`
    makes one: from then on it lives outside this service's cgroup, so stopping the service (or
    `systemctl kill` of it) never touches it.  OSError says why not."""
    properties = [
        ("PIDs", "au", "1", str(pid)),
        ("Slice", "s", slice_name),
        ("Description", "s", description),
        ("CollectMode", "s", "inactive-or-failed"),
    ]
    service = own_service()
    if service:
        # Stopped before this service at shutdown (units stop in reverse order): its program ends
        # while this service still runs to report it.
        properties.append(("After", "as", "1", service))
    argv = [
        *("busctl", "call", "--quiet", "org.freedesktop.systemd1", "/org/freedesktop/systemd1"),
        *("org.freedesktop.systemd1.Manager", "StartTransientUnit", "ssa(sv)a(sa(sv))", unit, "fail"),
        str(len(properties)),
        *(word for words in properties for word in words),
        "0",  # no auxiliary units
    ]
    try:
        proc.run(argv, timeout=10)
    except (OffloadError, proc.TimeoutExpired) as exc:
        raise OSError(errno.EIO, str(exc)) from None


def own_service() -> str:
    """The service unit whose cgroup we run in (``rexec.service``), or "" outside one."""
    try:
        with open("/proc/self/cgroup") as file:
            name = file.read().strip().splitlines()[-1].rsplit("/", 1)[-1]
    except (OSError, IndexError):
        return ""
    return name if name.endswith(".service") else ""


def store_size() -> int:
    """How many fds the manager's store holds at most ($FDSTORE), 0 without one."""
    size = os.environ.get("FDSTORE", "")
    return int(size) if size.isdigit() else 0


def store_fds(name: str, fds: Sequence[int], *, poll: bool = True) -> bool:
    """Keep ``fds`` in the manager's store under ``name``; False when no manager took the message.

    The manager holds duplicates: the caller still owns ``fds``.  With
    ``poll``, systemd drops a stored fd by itself once it reports POLLHUP or
    POLLERR (a pipe whose other end closed); ``poll=False`` sends FDPOLL=0.
    """
    check_name(name)
    if not fds:
        raise ValueError(f"no fds to store under {name!r}")
    if len(fds) > MAX_FDS_PER_MESSAGE:
        raise ValueError(f"{len(fds)} fds under {name!r}: at most {MAX_FDS_PER_MESSAGE} go in one message")
    return _send(f"FDSTORE=1\nFDNAME={name}" + ("" if poll else "\nFDPOLL=0"), fds, None)


def remove_fds(name: str) -> bool:
    """Have the manager close and forget the fds it keeps under ``name``."""
    check_name(name)
    return _send(f"FDSTOREREMOVE=1\nFDNAME={name}", (), None)


def inherited_fds() -> dict[str, list[int]]:
    """The fds the manager passed us, by name, in the order passed; each made close-on-exec.

    Call it once, at start: it unsets LISTEN_FDS, LISTEN_FDNAMES and
    LISTEN_PID, so that no child of ours takes them for its own.  Fds meant
    for another process (LISTEN_PID is not ours: we inherited the variables
    from a parent that did not unset them) are not ours to touch.
    """
    count = os.environ.pop("LISTEN_FDS", "")
    names = os.environ.pop("LISTEN_FDNAMES", None)
    listener = os.environ.pop("LISTEN_PID", "")
    if not listener.isdigit() or int(listener) != os.getpid():
        return {}
    if not count.isdigit():
        log.warning("LISTEN_FDS=%r is not a number: no fds taken", count)
        return {}
    labels = names.split(":") if names is not None else []
    found: dict[str, list[int]] = {}
    for index in range(int(count)):
        fd = LISTEN_FDS_START + index
        os.set_inheritable(fd, False)
        found.setdefault(labels[index] if index < len(labels) else UNKNOWN, []).append(fd)
    return found


def check_name(name: str) -> None:
    """systemd's fdname_is_valid: printable ASCII without ':', its LISTEN_FDNAMES separator."""
    if not name or len(name) > MAX_NAME or ":" in name or not all(" " <= char <= "~" for char in name):
        raise ValueError(f"fd store name {name!r}: use 1 to {MAX_NAME} printable ASCII characters, no ':'")


def _address(value: str) -> str:
    """A $NOTIFY_SOCKET value as a socket address: '@' names the abstract namespace."""
    return "\0" + value[1:] if value.startswith("@") else value


def _send(message: str, fds: Sequence[int], address: str | None) -> bool:
    address = address or os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.connect(_address(address))
            sock.sendmsg([message.encode()], rights)
        except OSError:
            return False
    return True
