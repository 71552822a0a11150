"""The qtfs protocol between the FUSE client (DPU) and the qtfs server (host), sans-io.

One authenticated connection per mount, on the shared frame layer
(`offload.protocol.framing`): `codec` lays out payloads, `messages`
declares the operations and their replies, `connection` turns bytes into
events and back.  Callers use this package's names: ``from
offload.protocol import qtfs as wire``.
"""

from offload.protocol.qtfs.codec import *  # noqa: F403
from offload.protocol.qtfs.connection import *  # noqa: F403
from offload.protocol.qtfs.messages import *  # noqa: F403
