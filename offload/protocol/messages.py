"""Control payload encoding shared by the rexec protocols.

Control frames carry small JSON documents.  Strings that came from the
operating system as bytes (argv, environment, paths) travel as
``os.fsdecode`` text, so arbitrary bytes survive the trip as lone
surrogates (``surrogateescape``) that JSON escapes and restores.  Signals
and errno values travel by name, because their numbers differ between
architectures.
"""

from __future__ import annotations

import json
import signal
from typing import Any

from offload.errors import RemoteProtocolError
from offload.protocol import local

#: The longest path any protocol carries (PATH_MAX).
MAX_PATH = 4096


def dump(document: dict[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode("ascii")


def load(payload: bytes, what: str) -> dict[str, Any]:
    """Parse one control payload as the stand-in's protocol does; anything but one JSON object is the peer's error."""
    try:
        return local.decode(payload)
    except ValueError as exc:
        raise RemoteProtocolError(f"{what}: {exc}") from None


def field(document: dict[str, Any], name: str, kind: type | tuple[type, ...], what: str) -> Any:
    """Return ``document[name]`` if present and of ``kind``, else blame the peer."""
    try:
        value = document[name]
    except KeyError:
        raise RemoteProtocolError(f"{what}: missing field {name!r}") from None
    # bool is an int subclass; a JSON true must never pass for a pid or a size.
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise RemoteProtocolError(f"{what}: field {name!r} has the wrong type")
    return value


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def signal_number(name: object, what: str) -> int:
    if not isinstance(name, str) or not name.startswith("SIG"):
        raise RemoteProtocolError(f"{what}: {name!r} is not a signal name")
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise RemoteProtocolError(f"{what}: unknown signal {name!r}") from None


def check_path(path: str, what: str) -> None:
    """Absolute, bounded, no NUL and no ``..`` component: the only paths we carry."""
    if not isinstance(path, str) or not path.startswith("/"):
        raise ValueError(f"{what}: path {path!r} is not absolute")
    if len(path) > MAX_PATH or "\0" in path:
        raise ValueError(f"{what}: path is too long or contains NUL")
    if ".." in path.split("/"):
        raise ValueError(f"{what}: path {path!r} has a '..' component")
