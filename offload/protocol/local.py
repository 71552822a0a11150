"""Messages between the rexec stand-in and its local rexec_server (the agent).

The stand-in starts for every remote program, so this module stays tiny and
is shared by both ends: the same frames and JSON control payloads as the
peer protocol (`offload.protocol.framing`), over a local UNIX socket.  File
descriptors ride beside the request frame as SCM_RIGHTS, in the order of the
request's ``passed`` list.

Stand-in -> agent: REQUEST (once, with fds), SIGNAL, ADOPT (daemon mode: the
detached stand-in announces its pid).  Agent -> stand-in: STARTED (with the
locked pidmap file), REFUSED, EXITED, DAEMONIZED, LINK_LOST.
"""

from __future__ import annotations

import _json

from offload.protocol.framing import encode_frame

L_REQUEST = 0x40
L_STARTED = 0x41
L_REFUSED = 0x42
L_EXITED = 0x43
L_DAEMONIZED = 0x44
L_SIGNAL = 0x45
L_LINK_LOST = 0x46
L_ADOPT = 0x47

#: Where a stand-in finds its agent unless REXEC_AGENT_SOCKET says otherwise.
DEFAULT_AGENT_SOCKET = "/var/run/rexec/rexec.sock"
AGENT_SOCKET_ENV = "REXEC_AGENT_SOCKET"
#: The request carries argv and environment, so it may be large (ARG_MAX is 2 MiB).
MAX_REQUEST = 3 << 20

#: The resource limits a stand-in carries in its request (``"rlimits"``:
#: NAME -> [soft, hard], each a number or ``"unlimited"``): those libvirt
#: sets in the child it forks before it execs the emulator (memtune's
#: hard_limit or locked memory; qemu.conf's max_files, max_processes and
#: max_core).  The host applies them to the program as the program's user.
RLIMITS = ("CORE", "MEMLOCK", "NOFILE", "NPROC")
UNLIMITED = "unlimited"


# The stand-in starts for every remote program, and `import json` costs it
# more than the rest of its start-up (json imports re, which imports enum).
# These two functions drive the same C code json uses (_json) directly.


def _dump(value: object) -> str:
    if isinstance(value, str):
        return _json.encode_basestring_ascii(value)
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return int.__repr__(value)
    if isinstance(value, dict):
        return "{" + ",".join(_dump(str(k)) + ":" + _dump(v) for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(_dump(v) for v in value) + "]"
    raise TypeError(f"cannot encode {type(value).__name__}")


class _ScannerContext:
    # The attributes _json.make_scanner reads from a json.JSONDecoder.
    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    memo: dict = {}

    @staticmethod
    def parse_constant(name: str) -> object:
        raise ValueError(f"{name} is not allowed")


_scan = _json.make_scanner(_ScannerContext())  # type: ignore[arg-type]  # duck-typed JSONDecoder


def encode(type: int, document: dict) -> bytes:
    return encode_frame(type, 0, _dump(document).encode("ascii"), max_payload=MAX_REQUEST)


def decode(payload: bytes) -> dict:
    """Parse a control payload; raises ValueError when it is not one JSON object."""
    try:
        text = payload.decode("ascii")
        document, end = _scan(text, 0)
    except UnicodeDecodeError as exc:
        raise ValueError(f"payload is not JSON: {exc}") from None
    except StopIteration as exc:
        raise ValueError(f"payload is not JSON: no value at character {exc.value}") from None
    except RecursionError:
        # json's scanner recurses per level: any local user can nest deeply.
        raise ValueError("payload is nested too deeply") from None
    if end != len(text) or not isinstance(document, dict):
        raise ValueError("payload is not one JSON object")
    return document
