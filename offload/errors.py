"""The project's one exception tree, rooted at `OffloadError`, with structured attributes.

Besides what `offload.net.translate_errors` translates (ARCHITECTURE.md,
"Invariants"), udsproxy's threaded relay handles its socket and ssl errors
where it makes the calls; trio's TooSlowError (a deadline of our own) and
ClosedResourceError from waiting on an fd another task of ours closed are
not I/O failures and stay trio's.  Remote errno travels by name (numbers
differ between architectures).
"""

from __future__ import annotations

import errno as errno_module


def errno_name(number: int, unknown: str = "EIO") -> str:
    """The symbolic name of ``number`` (ENOENT); ``unknown`` for a number this system does not name."""
    return errno_module.errorcode.get(number, unknown)


def errno_number(name: bytes | str) -> int:
    """The number of the errno named ``name`` here; EIO for a name this system does not know."""
    text = name.decode("ascii", "replace") if isinstance(name, bytes) else name
    value = getattr(errno_module, text, None) if text.startswith("E") else None
    return value if isinstance(value, int) else errno_module.EIO


class OffloadError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(OffloadError):
    """A configuration file or command-line value is invalid."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path


class ProtocolError(OffloadError):
    """The framing or a session state machine was violated."""


class LocalProtocolError(ProtocolError):
    """We tried to send something the protocol does not allow (our bug)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow."""


class TransportError(OffloadError):
    """A connection could not be made or was broken."""

    def __init__(self, message: str, *, address: str | None = None) -> None:
        super().__init__(message)
        self.address = address


class AuthenticationError(TransportError):
    """The peer could not prove who it is (TLS handshake or certificate)."""


class LinkLost(TransportError):
    """Keepalives stopped arriving: the link to the peer is gone."""


class RefusedError(OffloadError):
    """A request was refused by policy (whitelist, user mapping, fd type)."""

    def __init__(self, message: str, *, exit_code: int = 126) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class UnsupportedFdError(RefusedError):
    """An inherited file descriptor cannot be carried to the other machine."""

    def __init__(self, fd: int, kind: str) -> None:
        super().__init__(f"fd {fd} is {kind}, which cannot be carried to the remote process")
        self.fd = fd
        self.kind = kind


class LabError(OffloadError):
    """Bringing the lab up or down, or a step of its demo, failed."""


class RootfsError(OffloadError):
    """Building a rootfs failed: its base tree, a file installed into it, or apt inside it."""


class MountError(OffloadError):
    """A mount, unmount or device-node step failed.

    ``errno`` is the kernel's error number (None when no syscall failed,
    e.g. a helper program did); ``errno_name`` its symbolic name (EBUSY).
    """

    def __init__(self, message: str, *, path: str, errno: int | None = None) -> None:
        self.path = path
        self.errno = errno
        self.errno_name = errno_name(errno, f"errno {errno}") if errno is not None else None
        super().__init__(message)


class MountConflict(MountError):
    """Something other than what the plan wants is already mounted (or present) at a path."""


class MountBusy(MountError):
    """A mount cannot be unmounted because processes use it; ``holders`` names them."""

    def __init__(self, message: str, *, path: str, errno: int | None, holders: tuple[str, ...]) -> None:
        super().__init__(message, path=path, errno=errno)
        self.holders = holders


class StepFailed(MountError):
    """A step of `offload prepare` failed; what that run had done is undone."""
