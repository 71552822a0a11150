"""The rexec session state machine and its events, sans-io."""

from __future__ import annotations

import signal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from offload.errors import LocalProtocolError, RemoteProtocolError
from offload.protocol import messages
from offload.protocol.framing import encode_frame
from offload.protocol.rexec import (
    FIRST_BRIDGE_CHANNEL,
    INITIAL_WINDOW,
    NEED_DATA,
    Closed,
    Data,
    Eof,
    Exec,
    ExecRequest,
    Exited,
    FdKind,
    FdSpec,
    Hello,
    Open,
    OpenPty,
    Refused,
    RexecConnection,
    Role,
    Signal,
    Started,
    State,
    Window,
)

REQUEST = ExecRequest(
    argv=("/usr/bin/qemu-kvm", "-name", "a b", "\udcff"),
    env={"LANG": "C.UTF-8"},
    cwd="/var/lib/libvirt",
    umask=0o027,
    user="libvirt-qemu",
    fds=(
        FdSpec(0, FdKind.NULL, access="r"),
        FdSpec(1, FdKind.PIPE_OUT, channel=2),
        FdSpec(2, FdKind.PIPE_OUT, channel=3),
        FdSpec(5, FdKind.FILE, path="/var/lib/libvirt/x", access="rw", append=True, offset=1 << 40),
        FdSpec(29, FdKind.LISTENER),
    ),
    rlimits={"NOFILE": (1024, 8192), "CORE": (0, 0), "MEMLOCK": (65536, None), "NPROC": (None, None)},
)


def pair() -> tuple[RexecConnection, RexecConnection]:
    client, server = RexecConnection(Role.CLIENT), RexecConnection(Role.SERVER)
    feed(server, client.send(Hello("dpu")))
    feed(client, server.send(Hello("host")))
    return client, server


def feed(conn: RexecConnection, data: bytes) -> list:
    conn.receive_data(data)
    events = []
    while (event := conn.next_event()) is not NEED_DATA:
        events.append(event)
        if isinstance(event, Closed):
            break
    return events


def test_full_session() -> None:
    client, server = pair()
    assert client.state is server.state is State.IDLE
    assert feed(server, client.send(Exec(REQUEST))) == [Exec(REQUEST)]
    assert feed(client, server.send(Started(4242))) == [Started(4242)]
    assert feed(server, client.send(Signal(signal.SIGTERM))) == [Signal(signal.SIGTERM)]
    assert feed(client, server.send(Data(2, b"out"))) == [Data(2, b"out")]
    assert feed(client, server.send(Eof(2))) == [Eof(2)]
    assert feed(server, client.send(Open(0x10000, 29))) == [Open(0x10000, 29)]
    assert feed(client, server.send(Exited(signal=signal.SIGKILL))) == [Exited(signal=signal.SIGKILL)]
    assert client.state is server.state is State.DONE
    # Frames that crossed Exited on the wire are dropped, not errors, and a
    # signal among them does not reach the daemon, which waits for the next Exec.
    assert feed(server, client.send(Signal(signal.SIGTERM))) == []
    assert feed(server, client.send(Exec(REQUEST))) == [Exec(REQUEST)]


def test_refusal_ends_the_session() -> None:
    client, server = pair()
    feed(server, client.send(Exec(REQUEST)))
    assert feed(client, server.send(Refused(126, "x: not allowed on host"))) == [Refused(126, "x: not allowed on host")]
    assert client.state is State.DONE


@pytest.mark.parametrize(
    "event",
    [Started(1), Exited(code=0), Data(2, b"x"), Eof(2), Refused(1, "no")],
)
def test_out_of_order_from_the_server_is_refused(event) -> None:
    client, _server = pair()
    # Forge the frame: the server's own state machine would not send it.
    wire = {Started: 0x11, Exited: 0x13, Data: 0x20, Eof: 0x21, Refused: 0x12}[type(event)]
    payload = b'{"pid":1}' if isinstance(event, Started) else b'{"code":0}' if isinstance(event, Exited) else b""
    if isinstance(event, Refused):
        payload = b'{"code":1,"reason":"no"}'
    with pytest.raises(RemoteProtocolError):
        feed(client, encode_frame(wire, 2 if isinstance(event, Data | Eof) else 0, payload))


def test_nothing_before_hello() -> None:
    server = RexecConnection(Role.SERVER)
    with pytest.raises(RemoteProtocolError, match="before Hello"):
        feed(server, encode_frame(0x02, 0, b"p"))


def test_second_exec_refused() -> None:
    client, server = pair()
    feed(server, client.send(Exec(REQUEST)))
    with pytest.raises(RemoteProtocolError):
        feed(
            server,
            encode_frame(
                0x10,
                0,
                b'{"argv":["/bin/true"],"env":{},"cwd":"/","umask":18,"user":"root","fds":[]}',
            ),
        )


def test_local_misuse_raises_local_error() -> None:
    client, server = pair()
    with pytest.raises(LocalProtocolError):
        client.send(Started(1))
    with pytest.raises(LocalProtocolError):
        server.send(Exited(code=0))


def test_flow_control_window() -> None:
    client, server = pair()
    feed(server, client.send(Exec(REQUEST)))
    feed(client, server.send(Started(7)))
    chunk = b"x" * (256 << 10)
    for _ in range(INITIAL_WINDOW // len(chunk)):
        feed(client, server.send(Data(2, chunk)))
    assert server.send_credit(2) == 0
    # The client's consumer takes half a window: a Window frame is due.
    assert client.windows[2].consumed(INITIAL_WINDOW // 4) == 0
    increment = client.windows[2].consumed(INITIAL_WINDOW // 4)
    assert feed(server, client.send(Window(2, increment))) == [Window(2, INITIAL_WINDOW // 2)]
    assert server.send_credit(2) == INITIAL_WINDOW // 2
    with pytest.raises(LocalProtocolError, match="exceed the credit"):
        server.send(Data(2, b"y" * (INITIAL_WINDOW // 2 + 1)))


def test_window_overrun_by_peer_detected() -> None:
    client, server = pair()
    feed(server, client.send(Exec(REQUEST)))
    feed(client, server.send(Started(7)))
    chunk = encode_frame(0x20, 2, b"x" * (256 << 10))
    with pytest.raises(RemoteProtocolError, match="overran"):
        feed(client, chunk * (INITIAL_WINDOW // (256 << 10) + 1))


def test_window_enforced_on_receive_after_it_was_granted_again() -> None:
    """The allowance is what was granted, not a fixed size: a peer that sends past the
    initial window plus every Window given back is refused, on a bridged channel too."""
    client, server = pair()
    feed(server, client.send(Exec(REQUEST)))
    feed(client, server.send(Started(7)))
    feed(server, client.send(Open(0x10000, 29)))
    chunk = 256 << 10
    frame = encode_frame(0x20, 0x10000, b"x" * chunk)
    feed(server, frame * (INITIAL_WINDOW // chunk))  # the whole window
    half = INITIAL_WINDOW // 2
    assert feed(client, server.send(Window(0x10000, server.windows[0x10000].consumed(half)))) == [Window(0x10000, half)]
    feed(server, frame * (half // chunk))  # exactly what was granted again
    with pytest.raises(RemoteProtocolError, match="overran its window"):
        feed(server, encode_frame(0x20, 0x10000, b"y"))


def test_exec_request_round_trip_keeps_odd_bytes() -> None:
    assert ExecRequest.from_json(REQUEST.to_json()) == REQUEST


@pytest.mark.parametrize(
    "change",
    [
        {"argv": []},
        {"cwd": "relative"},
        {"cwd": "/a/../b"},
        {"umask": 0o1000},
        {"user": "../root"},
        {"env": {"A=B": "x"}},
    ],
)
def test_bad_requests_refused_on_construction(change: dict) -> None:
    fields = REQUEST.to_json() | change
    with pytest.raises((RemoteProtocolError, ValueError)):
        ExecRequest.from_json(fields)


def test_a_request_without_rlimits_sets_none() -> None:
    document = REQUEST.to_json()
    del document["rlimits"]
    assert ExecRequest.from_json(document).rlimits == {}


@pytest.mark.parametrize(
    ("rlimits", "why"),
    [
        ({"AS": [1, 2]}, "'AS' is not one that is carried"),
        ({"NOFILE": [2, 1]}, "RLIMIT_NOFILE: soft limit above the hard limit"),
        ({"NOFILE": ["unlimited", 1]}, "soft limit above the hard limit"),
        ({"NOFILE": [-1, 1]}, "'-1' is not a limit"),
        ({"NOFILE": [1, 1 << 64]}, "is not a limit"),
        ({"NOFILE": [1, 1 << 63]}, "is not a limit"),
        ({"NOFILE": [True, 2]}, "'True' is not a limit"),
        ({"NOFILE": [1.5, 2]}, "is not a limit"),
        ({"NOFILE": ["infinity", "unlimited"]}, "'infinity' is not a limit"),
        ({"NOFILE": [1]}, "expected \\[soft, hard\\]"),
        ({"NOFILE": {"soft": 1}}, "expected"),
        ([["NOFILE", 1, 2]], "rlimits must be an object"),
    ],
)
def test_hostile_rlimits_are_the_peers_error(rlimits: object, why: str) -> None:
    _, server = pair()
    with pytest.raises(RemoteProtocolError, match=why):
        feed(server, encode_frame(0x10, 0, messages.dump(REQUEST.to_json() | {"rlimits": rlimits})))


def test_malformed_rlimits_refused_on_construction() -> None:
    with pytest.raises(ValueError, match=r"RLIMIT_NOFILE: expected \[soft, hard\]"):
        ExecRequest(argv=("/bin/true",), rlimits={"NOFILE": (1, 2, 3)})  # type: ignore[dict-item]


def test_file_spec_refuses_dotdot() -> None:
    with pytest.raises(ValueError, match=r"'\.\.'"):
        FdSpec(3, FdKind.FILE, path="/var/lib/../../etc/shadow")


def test_signal_by_name_unknown_refused() -> None:
    client, server = pair()
    feed(server, client.send(Exec(REQUEST)))
    feed(client, server.send(Started(7)))
    with pytest.raises(RemoteProtocolError, match="unknown signal"):
        feed(server, encode_frame(0x15, 0, b'{"signal":"SIGNOPE"}'))


def test_peer_close_reported() -> None:
    client, _ = pair()
    client.receive_data(b"")
    assert client.next_event() == Closed()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 0x30), st.integers(0, 3), st.binary(max_size=64)), max_size=6))
def test_server_on_arbitrary_frames(frames) -> None:
    """Arbitrary well-framed garbage: events or RemoteProtocolError, nothing else."""
    _, server = pair()
    try:
        for type, channel, payload in frames:
            feed(server, encode_frame(type, channel, payload))
        feed(server, b"")
    except RemoteProtocolError:
        pass


def test_a_header_and_its_payload_are_the_frame() -> None:
    client, server = pair()
    feed(server, client.send(Exec(REQUEST)))
    feed(client, server.send(Started(7)))
    server.window(2).sent(3)
    assert feed(client, server.send_header(Data, 2, 3) + b"abc") == [Data(2, b"abc")]
    assert server.send_credit(2) == INITIAL_WINDOW - 3


def test_open_pty_opens_a_channel_from_the_client_only() -> None:
    client, server = pair()
    feed(server, client.send(Exec(REQUEST)))
    feed(client, server.send(Started(4242)))
    frame = client.send(OpenPty(FIRST_BRIDGE_CHANNEL, 3))
    # Whole, byte by byte, and with the next frame behind it.
    assert feed(server, frame) == [OpenPty(FIRST_BRIDGE_CHANNEL, 3)]
    assert feed(server, client.send(Data(FIRST_BRIDGE_CHANNEL, b"keys"))) == [Data(FIRST_BRIDGE_CHANNEL, b"keys")]
    client2, server2 = pair()
    feed(server2, client2.send(Exec(REQUEST)))
    feed(client2, server2.send(Started(1)))
    frame = client2.send(OpenPty(FIRST_BRIDGE_CHANNEL, 7))
    events = []
    for byte in frame:
        events += feed(server2, bytes([byte]))
    assert events == [OpenPty(FIRST_BRIDGE_CHANNEL, 7)]
    with pytest.raises(LocalProtocolError):
        server.send(OpenPty(FIRST_BRIDGE_CHANNEL + 1, 3))
    with pytest.raises(RemoteProtocolError):
        feed(client, encode_frame(0x26, FIRST_BRIDGE_CHANNEL + 2, b'{"index": 3}'))


@pytest.mark.parametrize(
    "channel, payload",
    [
        (5, b'{"index": 3}'),  # an inherited fd's channel, not a bridged one
        (FIRST_BRIDGE_CHANNEL, b'{"index": -1}'),
        (FIRST_BRIDGE_CHANNEL, b'{"index": 1048576}'),
        (FIRST_BRIDGE_CHANNEL, b'{"index": "3"}'),
        (FIRST_BRIDGE_CHANNEL, b"{}"),
    ],
)
def test_open_pty_malformed_is_the_peers_error(channel: int, payload: bytes) -> None:
    client, server = pair()
    feed(server, client.send(Exec(REQUEST)))
    feed(client, server.send(Started(4242)))
    with pytest.raises(RemoteProtocolError):
        feed(server, encode_frame(0x26, channel, payload))


def test_fds_never_travel_on_the_session_link() -> None:
    """A bridged connection carries its passed fds on a connection of its own: on the link they are refused."""
    client, server = pair()
    feed(server, client.send(Exec(ExecRequest(argv=("/usr/bin/qemu-kvm",)))))
    feed(client, server.send(Started(pid=7)))
    feed(server, client.send(Open(FIRST_BRIDGE_CHANNEL, 29)))
    passed = messages.dump({"fds": [{"kind": "pipe_r", "channel": 1 << 31}]})
    with pytest.raises(RemoteProtocolError):
        feed(server, encode_frame(0x25, FIRST_BRIDGE_CHANNEL, passed))
