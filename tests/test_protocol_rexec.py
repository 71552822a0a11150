"""The rexec session state machine and its events, sans-io."""

from __future__ import annotations

import signal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from offload.errors import LocalProtocolError, RemoteProtocolError
from offload.protocol import messages
from offload.protocol.fdpass import MAX_FDS
from offload.protocol.framing import encode_frame
from offload.protocol.rexec import (
    FIRST_BRIDGE_CHANNEL,
    INITIAL_WINDOW,
    NEED_DATA,
    SESSION_BYTES,
    TICKET_BYTES,
    Closed,
    Data,
    Eof,
    Exec,
    ExecRequest,
    Exited,
    FdKind,
    FdSpec,
    Hangup,
    Hello,
    Open,
    OpenPty,
    Refused,
    Resume,
    Resumed,
    RexecConnection,
    Role,
    Signal,
    Started,
    State,
    Ticket,
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


# -- sessions that outlive their link ------------------------------------------------------------

SESSION = "5e" * SESSION_BYTES
SECRET = "c0" * TICKET_BYTES
T_STARTED, T_EXITED, T_RESUME, T_RESUMED, T_HANGUP, T_OPEN, T_TICKET = 0x11, 0x13, 0x17, 0x18, 0x19, 0x23, 0x27


RESUMABLE = Started(7, SESSION, SECRET)


def running(started: Started = RESUMABLE) -> tuple[RexecConnection, RexecConnection]:
    """A pair whose session runs (``REQUEST``: channels 2 and 3)."""
    client, server = pair()
    feed(server, client.send(Exec(REQUEST)))
    assert feed(client, server.send(started)) == [started]
    return client, server


def lost_elsewhere() -> tuple[RexecConnection, RexecConnection]:
    """A fresh pair, as a new link to the peer is: IDLE both ways, no channel open."""
    return pair()


def test_started_names_a_resumable_session_on_the_wire() -> None:
    client, server = pair()
    feed(server, client.send(Exec(REQUEST)))
    frame = server.send(Started(4242, SESSION, SECRET))
    events: list = []
    for byte in frame:  # byte by byte: the event comes whole once, at the last byte
        events += feed(client, bytes([byte]))
    assert events == [Started(4242, SESSION, SECRET)]
    assert client.state is State.RUNNING


def test_started_without_a_session_ends_with_its_link() -> None:
    client, server = running(Started(9))  # decoded as sent, both fields empty
    assert Started(9).session == Started(9).secret == ""
    assert feed(client, server.send(Exited(code=0))) == [Exited(code=0)]


@pytest.mark.parametrize(
    ("session", "secret"),
    [
        (SESSION, ""),  # a name without its secret
        ("", SECRET),  # a secret without a name
        (SESSION.upper(), SECRET),  # not the protocol's lower-case hex
        (SESSION[:-2], SECRET),  # a byte short
        (SESSION + "00", SECRET),  # a byte long
        (SESSION, SECRET[:-1] + "g"),  # not hex
        (SESSION, SESSION),  # a secret of a session name's size
    ],
)
def test_started_with_a_bad_session_is_refused(session: str, secret: str) -> None:
    with pytest.raises(ValueError):
        Started(1, session, secret)
    client, server = pair()
    feed(server, client.send(Exec(REQUEST)))
    payload = messages.dump({"pid": 1, "session": session, "secret": secret})
    with pytest.raises(RemoteProtocolError, match="malformed Started"):
        feed(client, encode_frame(T_STARTED, 0, payload))
    assert client.error is not None


@pytest.mark.parametrize("state", ["idle", "done"])
def test_resume_is_taken_between_sessions(state: str) -> None:
    """On a new link (IDLE) or one whose last session ended (DONE); the resumed channels start from fresh windows."""
    if state == "idle":
        client, server = lost_elsewhere()
    else:
        client, server = running()
        feed(client, server.send(Data(2, b"x" * 1000)))
        feed(client, server.send(Exited(code=0)))
        assert client.state is server.state is State.DONE
    resume = Resume(SESSION, SECRET, (2, 5))
    assert feed(server, client.send(resume)) == [resume]
    assert client.state is server.state is State.RESUMING
    assert feed(client, server.send(Resumed(4242))) == [Resumed(4242)]
    assert client.state is server.state is State.RUNNING
    assert server.send_credit(2) == server.send_credit(5) == INITIAL_WINDOW
    assert feed(client, server.send(Data(5, b"out"))) == [Data(5, b"out")]
    assert feed(server, client.send(Data(2, b"in"))) == [Data(2, b"in")]
    # Channel 3 of the request was not resumed: neither side has it open.
    assert 3 not in server.windows and 3 not in client.windows
    assert feed(client, server.send(Exited(code=3))) == [Exited(code=3)]
    assert client.state is server.state is State.DONE


def test_resume_refused_ends_in_done_and_the_link_serves_on() -> None:
    client, server = lost_elsewhere()
    feed(server, client.send(Resume(SESSION, SECRET)))
    assert feed(client, server.send(Refused(255, "no session to resume"))) == [Refused(255, "no session to resume")]
    assert client.state is server.state is State.DONE
    assert feed(server, client.send(Exec(REQUEST))) == [Exec(REQUEST)]


def test_resume_not_in_a_running_session() -> None:
    client, server = running()
    with pytest.raises(LocalProtocolError):
        client.send(Resume(SESSION, SECRET))
    payload = messages.dump({"session": SESSION, "secret": SECRET, "channels": []})
    with pytest.raises(RemoteProtocolError):
        feed(server, encode_frame(T_RESUME, 0, payload))
    assert server.error is not None


def test_resume_only_from_the_client() -> None:
    client, server = lost_elsewhere()
    with pytest.raises(LocalProtocolError, match="only the client"):
        server.send(Resume(SESSION, SECRET))
    payload = messages.dump({"session": SESSION, "secret": SECRET, "channels": [2]})
    with pytest.raises(RemoteProtocolError, match="Resume from the server"):
        feed(client, encode_frame(T_RESUME, 0, payload))
    assert client.error is not None
    with pytest.raises(LocalProtocolError):
        client.send(Signal(signal.SIGTERM))  # a connection in error stays there


@pytest.mark.parametrize(
    "channels",
    [
        (0,),  # the control channel
        (FIRST_BRIDGE_CHANNEL,),  # a bridged connection's: those are attached again with Open
        (-1,),
        tuple(range(1, MAX_FDS + 2)),  # more than a program has fds
    ],
)
def test_resume_channels_are_bounded(channels: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="channels out of range"):
        Resume(SESSION, SECRET, channels)
    _, server = lost_elsewhere()
    payload = messages.dump({"session": SESSION, "secret": SECRET, "channels": list(channels)})
    with pytest.raises(RemoteProtocolError):
        feed(server, encode_frame(T_RESUME, 0, payload))


@pytest.mark.parametrize(
    "document",
    [
        {"session": SESSION, "secret": SECRET, "channels": [True]},
        {"session": SESSION, "secret": SECRET, "channels": ["2"]},
        {"session": SESSION, "secret": SECRET, "channels": 2},
        {"session": SESSION, "secret": SECRET},
        {"session": SESSION, "secret": SECRET[:-2], "channels": []},
        {"session": SESSION + "00", "secret": SECRET, "channels": []},
        {"session": SESSION, "secret": SECRET + "0" * 4096, "channels": []},
    ],
)
def test_malformed_resume_is_the_peers_error(document: dict) -> None:
    _, server = lost_elsewhere()
    with pytest.raises(RemoteProtocolError):
        feed(server, encode_frame(T_RESUME, 0, messages.dump(document)))
    assert server.state is not State.RESUMING


def test_resumed_only_answers_a_resume() -> None:
    client, _ = lost_elsewhere()
    with pytest.raises(RemoteProtocolError):
        feed(client, encode_frame(T_RESUMED, 0, b'{"pid": 7}'))
    client, server = running()
    with pytest.raises(LocalProtocolError):
        server.send(Resumed(7))
    with pytest.raises(LocalProtocolError, match="only the server"):
        RexecConnection(Role.CLIENT).send(Resumed(7))


def test_hangup_ends_a_running_session() -> None:
    client, server = running()
    assert feed(server, client.send(Hangup())) == [Hangup()]
    assert client.state is server.state is State.DONE
    # The link serves the next session, as after Exited.
    assert feed(server, client.send(Exec(REQUEST))) == [Exec(REQUEST)]


def test_hangup_only_from_the_client_of_a_running_session() -> None:
    client, server = lost_elsewhere()
    with pytest.raises(LocalProtocolError):
        client.send(Hangup())  # no session to hang up
    with pytest.raises(RemoteProtocolError):
        feed(server, encode_frame(T_HANGUP, 0, b"{}"))
    client, server = running()
    with pytest.raises(LocalProtocolError):
        server.send(Hangup())
    with pytest.raises(RemoteProtocolError, match="Hangup from the server"):
        feed(client, encode_frame(T_HANGUP, 0, b"{}"))


def test_a_lost_exit_status_travels_as_lost() -> None:
    client, server = running()
    frame = server.send(Exited(lost=True))
    assert feed(client, frame) == [Exited(lost=True)]
    assert b'"lost"' in frame and b'"code"' not in frame and b'"signal"' not in frame
    assert Exited(lost=True).to_json() == {"lost": True}
    assert client.state is State.DONE


@pytest.mark.parametrize(
    "fields",
    [{"lost": True, "code": 0}, {"lost": True, "signal": signal.SIGKILL}, {"lost": False}, {}],
)
def test_an_exit_status_is_lost_or_known_not_both(fields: dict) -> None:
    with pytest.raises(ValueError):
        Exited(**fields)


@pytest.mark.parametrize(
    "document",
    [{"lost": False}, {"lost": "yes"}, {"lost": 1}, {}],
)
def test_only_a_true_lost_is_a_lost_status_on_the_wire(document: dict) -> None:
    client, _ = running()
    with pytest.raises(RemoteProtocolError):
        feed(client, encode_frame(T_EXITED, 0, messages.dump(document)))


def test_bridged_connection_numbers_round_trip() -> None:
    client, server = running()
    channel = FIRST_BRIDGE_CHANNEL + 4
    assert feed(server, client.send(Open(channel, 29, conn=12))) == [Open(channel, 29, conn=12)]
    assert feed(client, server.send(Ticket(channel, "ab" * TICKET_BYTES, conn=12))) == [
        Ticket(channel, "ab" * TICKET_BYTES, conn=12)
    ]
    # A new connection is numbered 0 by the client; the server names its own number.
    assert feed(server, client.send(Open(channel + 1, 29))) == [Open(channel + 1, 29, conn=0)]
    with pytest.raises(RemoteProtocolError):
        feed(server, encode_frame(T_OPEN, channel + 2, b'{"fd": 29, "conn": "12"}'))
