"""Every listener's frame decoder, fuzzed: whatever a peer sends, the only failure is the peer's protocol error.

Each protocol's sans-io connection is fed, after a valid Hello from the
peer (so that the fuzz reaches the states past the handshake), frames of
the protocol's own types and of any type, with payloads that are random
bytes, JSON documents of any shape and depth, or valid payloads with
bytes flipped, cut or appended; and plain garbage, as before
authentication.  The bytes arrive whole and split at random points.  A
decoder may refuse them only with ProtocolError (which ends that one
connection); any other exception would escape into a daemon.  The budget
of examples bounds the time (seconds for all of them).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from types import ModuleType

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from offload.errors import ProtocolError
from offload.protocol import local
from offload.protocol import qtfs as qtfs_wire
from offload.protocol import rexec as rexec_wire
from offload.protocol import udsproxy as udsproxy_wire
from offload.protocol.framing import HEADER, MAGIC, NEED_DATA, VERSION

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def frame_types(module: ModuleType) -> list[int]:
    return sorted({value for name, value in vars(module).items() if name.startswith("T_") and isinstance(value, int)})


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@st.composite
def payloads(draw: st.DrawFn, samples: list[bytes]) -> bytes:
    kind = draw(st.sampled_from(["bytes", "json", "deep", "mutated"]))
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    if kind == "json":
        return json.dumps(draw(json_values)).encode()
    if kind == "deep":
        depth = draw(st.integers(1, 5000))
        return b"[" * depth + b"]" * depth
    sample = bytearray(draw(st.sampled_from(samples)))
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["flip", "cut", "append"]))
        if action == "flip" and sample:
            at = draw(st.integers(0, len(sample) - 1))
            sample[at] ^= draw(st.integers(1, 255))
        elif action == "cut":
            del sample[draw(st.integers(0, len(sample))) :]
        else:
            sample += draw(st.binary(min_size=1, max_size=20))
    return bytes(sample)


@st.composite
def streams(draw: st.DrawFn, types: list[int], samples: list[bytes]) -> list[bytes]:
    """A stream of frames (or garbage), cut into chunks at random points."""
    parts = []
    for _ in range(draw(st.integers(1, 6))):
        if draw(st.integers(0, 9)) == 0:
            parts.append(draw(st.binary(min_size=1, max_size=64)))  # garbage: bad magic, version, length
            continue
        kind = draw(st.sampled_from(types) | st.integers(0, 255))
        channel = draw(st.sampled_from([0, 1, 2, 3, 7]) | st.integers(0, 2**32 - 1))
        payload = draw(payloads(samples))
        parts.append(HEADER.pack(MAGIC, VERSION, kind, channel, len(payload)) + payload)
    data = b"".join(parts)
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=4)))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


def drive(connection: object, chunks: list[bytes], closed: tuple[type, ...]) -> None:
    """Feed the chunks and take every event; ProtocolError is the only allowed failure."""
    receive: Callable[[bytes], None] = connection.receive_data  # type: ignore[attr-defined]
    next_event: Callable[[], object] = connection.next_event  # type: ignore[attr-defined]
    try:
        for chunk in [*chunks, b""]:
            receive(chunk)
            for _ in range(10_000):
                event = next_event()
                if event is None or event is NEED_DATA or isinstance(event, closed):
                    break
    except ProtocolError:
        pass


def _rexec_samples() -> list[bytes]:
    client = rexec_wire.RexecConnection(rexec_wire.Role.CLIENT)
    server = rexec_wire.RexecConnection(rexec_wire.Role.SERVER)
    return [
        client.send(rexec_wire.Hello("dpu"))[HEADER.size :],
        server.send(rexec_wire.Hello("host"))[HEADER.size :],
        json.dumps(
            {"program": "/bin/true", "argv": ["true"], "fds": [{"fd": 1, "kind": "pipe_out", "channel": 2}]}
        ).encode(),
        json.dumps({"code": 0}).encode(),
        json.dumps({"signal": "SIGTERM"}).encode(),
        b"data bytes",
    ]


REXEC_TYPES = frame_types(rexec_wire)
REXEC_SAMPLES = _rexec_samples()


@FUZZ
@given(role=st.sampled_from(list(rexec_wire.Role)), chunks=streams(REXEC_TYPES, REXEC_SAMPLES))
def test_rexec_decoder(role: rexec_wire.Role, chunks: list[bytes]) -> None:
    peer_role = rexec_wire.Role.SERVER if role is rexec_wire.Role.CLIENT else rexec_wire.Role.CLIENT
    connection = rexec_wire.RexecConnection(role)
    connection.send(rexec_wire.Hello("us"))
    hello = rexec_wire.RexecConnection(peer_role).send(rexec_wire.Hello("peer"))
    drive(connection, [hello, *chunks], (rexec_wire.Closed,))


UDSPROXY_TYPES = frame_types(udsproxy_wire)
UDSPROXY_SAMPLES = [
    udsproxy_wire.UdsProxyConnection(client=True).send(udsproxy_wire.Hello("dpu"))[HEADER.size :],
    json.dumps({"path": "/run/x.sock", "type": "stream", "user": "root"}).encode(),
    json.dumps({"error": ""}).encode(),
    json.dumps({"fds": [{"kind": "pipe_r", "channel": 2}]}).encode(),
    b"payload",
]


@FUZZ
@given(client=st.booleans(), chunks=streams(UDSPROXY_TYPES, UDSPROXY_SAMPLES))
def test_udsproxy_decoder(client: bool, chunks: list[bytes]) -> None:
    connection = udsproxy_wire.UdsProxyConnection(client=client)
    connection.send(udsproxy_wire.Hello("us"))
    hello = udsproxy_wire.UdsProxyConnection(client=not client).send(udsproxy_wire.Hello("peer"))
    drive(connection, [hello, *chunks], (udsproxy_wire.Closed,))


QTFS_REQUESTS = [
    qtfs_wire.Mount(b"/var/lib/libvirt"),
    qtfs_wire.Lookup(b"dir/file"),
    qtfs_wire.Open(b"dir/file", os.O_RDONLY),
    qtfs_wire.Read(1, 0, 4096),
    qtfs_wire.Opendir(b"dir"),
]
QTFS_TYPES = frame_types(qtfs_wire)
QTFS_SAMPLES = [
    qtfs_wire.QtfsConnection(client=True).send(qtfs_wire.Hello("dpu"))[HEADER.size :],
    *(bytes((qtfs_wire.OP_OF[type(request)],)) + request.encode() for request in QTFS_REQUESTS),
    b"ENOENT",
    bytes(104),  # the size of a stat reply's fields, zeros
]


@FUZZ
@given(client=st.booleans(), chunks=streams(QTFS_TYPES, QTFS_SAMPLES))
def test_qtfs_decoder(client: bool, chunks: list[bytes]) -> None:
    connection = qtfs_wire.QtfsConnection(client=client)
    connection.send(qtfs_wire.Hello("us"))
    if client:  # replies decode by the pending request of their id
        for number, request in enumerate(QTFS_REQUESTS, start=1):
            connection.send(qtfs_wire.Call(number, request))
    hello = qtfs_wire.QtfsConnection(client=not client).send(qtfs_wire.Hello("peer"))
    drive(connection, [hello, *chunks], (qtfs_wire.Closed,))


@FUZZ
@given(payload=payloads([local.encode(1, {"pid": 1})[HEADER.size :], b'{"argv":["x"]}']))
def test_local_agent_decoder(payload: bytes) -> None:
    """What a stand-in (any local user) sends the agent: ValueError is its decoder's refusal."""
    with contextlib.suppress(ValueError):
        local.decode(payload)
