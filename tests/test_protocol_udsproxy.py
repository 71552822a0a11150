"""The udsproxy wire, sans-io: bytes in, bytes out."""

from __future__ import annotations

import pytest

from offload.errors import LocalProtocolError, RemoteProtocolError
from offload.protocol import messages
from offload.protocol import udsproxy as wire
from offload.protocol.framing import encode_frame

FRAMES = [
    encode_frame(wire.T_DATA, 1, b"hello"),
    encode_frame(wire.T_EOF, 1),
    wire.encode_window(4, 65536),
    wire.data_header(2, 3) + b"abc",
]


def test_split_frames_whole_byte_by_byte_and_with_trailing_bytes() -> None:
    stream = b"".join(FRAMES)
    frames, used = wire.split_frames(memoryview(stream + b"OF\x01"))
    assert used == len(stream)
    assert [(k, c, bytes(p)) for k, c, p in frames] == [
        (wire.T_DATA, 1, b"hello"),
        (wire.T_EOF, 1, b""),
        (wire.T_WINDOW, 4, (65536).to_bytes(4, "big")),
        (wire.T_DATA, 2, b"abc"),
    ]
    # Fed byte by byte, a frame appears exactly when its last byte arrives.
    buffer = bytearray()
    seen = []
    for byte in stream:
        buffer.append(byte)
        frames, used = wire.split_frames(memoryview(bytes(buffer)))
        seen += [bytes(p) for _, _, p in frames]
        del buffer[:used]
    assert seen == [b"hello", b"", (65536).to_bytes(4, "big"), b"abc"]


@pytest.mark.parametrize(
    "data",
    [b"XX\x01\x20\x00\x00\x00\x01\x00\x00\x00\x00", b"OF\x02\x20\x00\x00\x00\x01\x00\x00\x00\x00"],
    ids=["magic", "version"],
)
def test_bad_headers_are_the_peers_fault(data: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        wire.split_frames(memoryview(data))


def test_oversized_frame_is_refused_before_its_payload_arrives() -> None:
    header = wire.data_header(1, wire.MAX_FRAME + 1)
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        wire.split_frames(memoryview(header))


def test_fd_descriptions_round_trip() -> None:
    fds = (
        wire.FdDescription(
            "file", path="/var/lib/libvirt/images/a.img", access="rw", append=False, offset=4096, dev=2049, ino=77
        ),
        wire.FdDescription("null", access="w"),
        wire.FdDescription("pipe_r", channel=2),
        wire.FdDescription("pipe_w", channel=4),
    )
    frames, _ = wire.split_frames(memoryview(wire.encode_fds(fds)))
    kind, channel, payload = frames[0]
    assert (kind, channel) == (wire.T_FDS, wire.DATA_CHANNEL)
    assert wire.decode_fds(payload) == fds


def file_entry(**changes: object) -> dict:
    """A passed file's description as it travels, with ``changes``; None removes a field."""
    entry = {"kind": "file", "path": "/a", "access": "r", "append": False, "offset": 0, "dev": 1, "ino": 2}
    entry.update(changes)
    return {key: value for key, value in entry.items() if value is not None}


@pytest.mark.parametrize(
    "document",
    [
        {"fds": []},
        {"fds": [{"kind": "socket"}]},
        {"fds": [file_entry(path="/a/../etc/shadow")]},
        {"fds": [file_entry(path="relative")]},
        {"fds": [file_entry(access="x")]},
        {"fds": [file_entry(offset=-1)]},
        {"fds": [file_entry(dev=None, ino=None)]},  # a file without its identity
        {"fds": [file_entry(dev=-1)]},
        {"fds": [{"kind": "pipe_r", "channel": 0}]},
        {"fds": [{"kind": "pipe_r", "channel": 1}]},
        {"fds": [{"kind": "pipe_w", "channel": True}]},
        {"fds": [{"kind": "null", "access": "r"}] * 254},
        {"fds": "nope"},
    ],
)
def test_bad_fd_descriptions_are_the_peers_fault(document: dict) -> None:
    with pytest.raises(RemoteProtocolError):
        wire.decode_fds(messages.dump(document))


def test_a_pipe_without_a_channel_is_never_sent() -> None:
    with pytest.raises(LocalProtocolError):
        wire.encode_fds([wire.FdDescription("pipe_r")])


def test_results_and_windows() -> None:
    assert wire.decode_fds_result(messages.dump({"error": "EACCES"})) == "EACCES"
    assert wire.decode_fds_result(messages.dump({"error": ""})) == ""
    assert wire.decode_window((5).to_bytes(4, "big")) == 5
    with pytest.raises(RemoteProtocolError):
        wire.decode_window(b"\x00\x05")


@pytest.mark.parametrize(
    ("payload", "result"),
    [
        (b"\x00\x01/run/x.sock", (1, "/run/x.sock")),
        (b"\x00\x05/run/x.sock", (5, "/run/x.sock")),
        (b"\x00\x01", ValueError),
        (b"\x00\x01/run/\x00x", ValueError),
        (b"\x00\x01/" + b"x" * 107, ValueError),
    ],
)
def test_shim_connect_requests(payload: bytes, result: object) -> None:
    if result is ValueError:
        with pytest.raises(ValueError):
            wire.shim_connect_request(payload)
    else:
        assert wire.shim_connect_request(payload) == result


def test_setup_hands_over_what_came_after_connected() -> None:
    client = wire.UdsProxyConnection(client=True)
    server = wire.UdsProxyConnection(client=False)
    client.receive_data(server.send(wire.Hello("host")))
    assert client.next_event() == wire.Hello("host")
    server.receive_data(client.send(wire.Hello("dpu")) + client.send(wire.Connect("/run/x.sock")))
    assert server.next_event() == wire.Hello("dpu")
    assert server.next_event() == wire.Connect("/run/x.sock")  # the user: nobody unless named
    early = encode_frame(wire.T_DATA, 1, b"early")
    client.receive_data(server.send(wire.Connected()) + early[:5])
    assert client.next_event() == wire.Connected()
    assert client.next_event() is wire.NEED_DATA
    assert client.leftover() == early[:5]  # the relay continues from here
    client.receive_data(early[:12])  # a whole header, read before the relay takes over: handed over too
    assert client.next_event() is wire.NEED_DATA
    assert client.leftover() == early[:12]


def test_connect_names_the_callers_user() -> None:
    client = wire.UdsProxyConnection(client=True)
    server = wire.UdsProxyConnection(client=False)
    client.receive_data(server.send(wire.Hello("host")))
    client.next_event()
    server.receive_data(client.send(wire.Hello("dpu")) + client.send(wire.Connect("/run/x.sock", user="qemu")))
    server.next_event()
    assert server.next_event() == wire.Connect("/run/x.sock", user="qemu")


@pytest.mark.parametrize("user", ["", "a/b", "a\0b", "x" * 257])
def test_bad_user_names_are_refused(user: str) -> None:
    with pytest.raises(ValueError):
        wire.Connect("/run/x.sock", user=user)


def test_a_connect_without_a_user_is_the_peers_fault() -> None:
    server = wire.UdsProxyConnection(client=False)
    server.receive_data(
        encode_frame(wire.T_HELLO, 0, messages.dump({"node": "dpu", "service": "udsproxy"}))
        + encode_frame(wire.T_CONNECT, 0, messages.dump({"path": "/run/x.sock", "type": "stream"}))
    )
    server.next_event()
    with pytest.raises(RemoteProtocolError, match="user"):
        server.next_event()
