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

import json

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


def encode(type: int, document: dict) -> bytes:
    payload = json.dumps(document, separators=(",", ":")).encode("ascii")
    return encode_frame(type, 0, payload, max_payload=MAX_REQUEST)


def decode(payload: bytes) -> dict:
    """Parse a control payload; raises ValueError when it is not a JSON object."""
    document = json.loads(payload.decode("ascii"))
    if not isinstance(document, dict):
        raise ValueError("payload is not a JSON object")
    return document
