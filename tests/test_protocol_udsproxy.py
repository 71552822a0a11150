"""The udsproxy wire, sans-io: bytes in, bytes out."""

from __future__ import annotations

import pytest

from offload.errors import LocalProtocolError, RemoteProtocolError
from offload.protocol import messages
from offload.protocol import udsproxy as wire
from offload.protocol.framing import encode_frame, split_frames


def opened() -> tuple[wire.UdsProxyConnection, wire.UdsProxyConnection]:
    return wire.UdsProxyConnection.opened(client=True), wire.UdsProxyConnection.opened(client=False)


def test_the_relays_frames_round_trip() -> None:
    client, server = opened()
    fds = (
        wire.FdDescription(
            "file", path="/var/lib/libvirt/images/a.img", access="rw", append=False, offset=4096, dev=2049, ino=77
        ),
        wire.FdDescription("null", access="w"),
        wire.FdDescription("pipe_r", channel=2),
        wire.FdDescription("pipe_w", channel=4),
    )
    events = [
        wire.Data(b"hello"),
        wire.Eof(),
        wire.Fds(fds),
        wire.FdsResult("EACCES"),
        wire.FdsResult(),
        wire.Window(4, 65536),
        wire.Data(b"abc", 2),
        wire.Eof(2),
    ]
    stream = b"".join(client.send(event) for event in events)
    assert stream.startswith(encode_frame(wire.T_DATA, 1, b"hello") + encode_frame(wire.T_EOF, 1))
    frames, used = split_frames(memoryview(stream), wire.MAX_FRAME)
    assert used == len(stream)
    assert [server.event_of(kind, channel, bytes(payload)) for kind, channel, payload in frames] == events
    server.receive_data(stream)
    assert [server.next_event() for _ in events] == events


@pytest.mark.parametrize(
    ("frame", "match"),
    [
        (encode_frame(wire.T_WINDOW, 2, b"\x00\x05"), "window of 2 bytes"),
        (encode_frame(wire.T_WINDOW, 1, bytes(4)), "Window on channel 1"),
        (encode_frame(wire.T_FDS_RESULT, 2, messages.dump({"error": ""})), "FdsResult on channel 2"),
        (encode_frame(wire.T_HELLO, 0, messages.dump({"node": "x", "service": "udsproxy"})), "a second Hello"),
        (encode_frame(wire.T_CONNECT, 0, messages.dump({"path": "/a", "type": "stream", "user": "u"})), "in state"),
        (encode_frame(0x77, 1, b""), "unknown udsproxy frame type 0x77"),
    ],
)
def test_bad_frames_in_the_open_state_are_the_peers_fault(frame: bytes, match: str) -> None:
    _, server = opened()
    [(kind, channel, payload)], _ = split_frames(memoryview(frame), wire.MAX_FRAME)
    with pytest.raises(RemoteProtocolError, match=match):
        server.event_of(kind, channel, bytes(payload))
    assert server.error is not None


def test_the_relays_frames_wait_for_the_setup() -> None:
    client = wire.UdsProxyConnection(client=True)
    client.send(wire.Hello("dpu"))
    client.receive_data(wire.UdsProxyConnection(client=False).send(wire.Hello("host")))
    client.next_event()
    with pytest.raises(LocalProtocolError, match="Window from the client in state idle"):
        client.send(wire.Window(2, 1))


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
    _, server = opened()
    with pytest.raises(RemoteProtocolError):
        server.event_of(wire.T_FDS, wire.DATA_CHANNEL, messages.dump(document))


def test_two_pipes_on_one_channel_are_the_peers_fault() -> None:
    _, server = opened()
    one = b'{"fds":[{"kind":"pipe_r","channel":2},{"kind":"pipe_w","channel":4}]}'
    event = server.event_of(wire.T_FDS, wire.DATA_CHANNEL, one)
    assert event == wire.Fds((wire.FdDescription("pipe_r", channel=2), wire.FdDescription("pipe_w", channel=4)))
    _, server = opened()
    two = b'{"fds":[{"kind":"pipe_r","channel":2},{"kind":"null","access":"r"},{"kind":"pipe_w","channel":2}]}'
    with pytest.raises(RemoteProtocolError, match="two pipes on channel 2"):
        server.event_of(wire.T_FDS, wire.DATA_CHANNEL, two)
    assert server.error is not None


def test_a_pipe_without_a_channel_is_never_sent() -> None:
    with pytest.raises(LocalProtocolError):
        opened()[0].send(wire.Fds((wire.FdDescription("pipe_r"),)))


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
