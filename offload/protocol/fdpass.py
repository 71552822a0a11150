"""One passed file descriptor as it crosses a link, sans-io.

Both carriers of SCM_RIGHTS use this description: udsproxy's carried
connections and rexec's bridged connections (libvirt's QMP monitor, whose
``getfd`` and ``add-fd`` commands come with an fd).  What each kind means,
and how each side turns an fd into a description and back, is
`offload.fdpass`; the framing around the list is each protocol's own.
"""

from __future__ import annotations

from dataclasses import dataclass

from offload.errors import RemoteProtocolError
from offload.protocol import messages
from offload.protocol.framing import MAX_CHANNEL
from offload.protocol.messages import check_path

#: SCM_MAX_FD in the kernel: no sendmsg carries more.
MAX_FDS = 253
ACCESS = ("r", "w", "rw")
#: The fields each kind carries on the wire, with their JSON types.
_WIRE_FIELDS: dict[str, tuple[tuple[str, type], ...]] = {
    "file": (("path", str), ("access", str), ("append", bool), ("offset", int), ("dev", int), ("ino", int)),
    "null": (("access", str),),
    "pipe_r": (("channel", int),),
    "pipe_w": (("channel", int),),
}


@dataclass(frozen=True, slots=True)
class FdDescription:
    """One passed fd as it crosses the link.

    ``file``: re-opened by path over there (same access, O_APPEND, offset),
    and delivered only if it is the file the sender had: ``dev`` and ``ino``
    are its st_dev and st_ino as the sender sees them;
    ``null``: /dev/null there; ``pipe_r``: the receiver gets the read end of
    a new pipe that ``channel`` fills; ``pipe_w``: the receiver gets the
    write end of a new pipe whose bytes go back on ``channel``.  Which
    channel numbers a pipe may use is the carrying protocol's rule.
    """

    kind: str
    path: str = ""
    access: str = "r"
    append: bool = False
    offset: int = 0
    channel: int = 0
    dev: int = 0
    ino: int = 0

    def __post_init__(self) -> None:
        if self.kind not in _WIRE_FIELDS:
            raise ValueError(f"fd kind {self.kind!r} is not carried")
        if self.access not in ACCESS:
            raise ValueError(f"access {self.access!r}")
        if self.kind == "file":
            check_path(self.path, "passed file")
            if not 0 <= self.offset < 1 << 63:
                raise ValueError(f"offset {self.offset} out of range")
            if not (0 <= self.dev < 1 << 64 and 0 <= self.ino < 1 << 64):
                raise ValueError(f"file identity {self.dev}:{self.ino} out of range")
        # 0: a pipe end the sender has not numbered a channel for yet.
        if not 0 <= self.channel <= MAX_CHANNEL:
            raise ValueError(f"pipe channel {self.channel} out of range")

    @property
    def is_pipe(self) -> bool:
        return self.kind in ("pipe_r", "pipe_w")

    def to_json(self) -> dict:
        return {"kind": self.kind, **{name: getattr(self, name) for name, _ in _WIRE_FIELDS[self.kind]}}


def decode(entries: object, what: str, channels: range) -> tuple[FdDescription, ...]:
    """The descriptions a peer sent; a pipe's channel must lie in ``channels``.

    Anything malformed, too many fds, a pipe channel outside the range, or
    two pipes on one channel is the peer's error.
    """
    if not isinstance(entries, list):
        raise RemoteProtocolError(f"{what}: fds is not a list")
    if not 0 < len(entries) <= MAX_FDS:
        raise RemoteProtocolError(f"{what}: {len(entries)} fds in one message")
    result = []
    pipe_channels: set[int] = set()
    for entry in entries:
        if not isinstance(entry, dict):
            raise RemoteProtocolError(f"{what}: an entry is not an object")
        kind = messages.field(entry, "kind", str, what)
        values = {name: messages.field(entry, name, json_type, what) for name, json_type in _WIRE_FIELDS.get(kind, ())}
        try:
            fd = FdDescription(kind, **values)
            if fd.is_pipe:
                if fd.channel not in channels:
                    raise ValueError(f"pipe channel {fd.channel} out of range")
                if fd.channel in pipe_channels:
                    raise ValueError(f"two pipes on channel {fd.channel}")
                pipe_channels.add(fd.channel)
        except ValueError as exc:
            raise RemoteProtocolError(f"{what}: {exc}") from None
        result.append(fd)
    return tuple(result)
