"""rexec_server against bad peers and bad input, in-process over real UNIX sockets."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import ssl
from pathlib import Path

import pytest
import trio

from offload import pki
from offload.config import RexecConfig
from offload.errors import ConfigError
from offload.net import Transport, parse_address
from offload.pki import TlsConfig
from offload.protocol.framing import HEADER, VERSION, encode_frame
from offload.protocol.rexec import (
    NEED_DATA,
    Closed,
    Exec,
    ExecRequest,
    Exited,
    Hello,
    Refused,
    RexecConnection,
    Role,
    Started,
)
from offload.rexec.policy import Whitelist
from offload.rexec.server import serve

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the whitelist must be root-owned")


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    pki.init(tmp_path / "pki", pki.HOST_AND_DPU)
    pki.init(tmp_path / "rogue", [pki.Identity("dpu", "dpu")])
    whitelist = tmp_path / "whitelist"
    whitelist.write_text("/bin/true\n/bin/sh\n")
    whitelist.chmod(0o400)
    return tmp_path


def config(tree: Path) -> RexecConfig:
    return RexecConfig(
        listen=(f"unix://{tree}/peer.sock",),
        whitelist=str(tree / "whitelist"),
        run_dir=str(tree / "run"),
        node="host",
        keepalive=5.0,
    )


@pytest.fixture
async def server(tree: Path, nursery: trio.Nursery) -> str:
    transport = Transport(TlsConfig.load(tree / "pki" / "host"))
    bound = await nursery.start(serve, config(tree), transport)
    return bound[0]


async def exec_once(tree: Path, argv: tuple[str, ...], identity: str = "pki/dpu") -> list:
    transport = Transport(TlsConfig.load(tree / identity))
    connected = await transport.connect(parse_address(f"unix://{tree}/peer.sock"))
    conn = RexecConnection(Role.CLIENT)
    events = []
    async with connected.stream as stream:
        await stream.send_all(conn.send(Hello("test")))
        while conn.peer_hello is None:
            conn.receive_data(await stream.receive_some())
            while (event := conn.next_event()) is not NEED_DATA:
                pass
        await stream.send_all(conn.send(Exec(ExecRequest(argv=argv, user="root"))))
        while not events or not isinstance(events[-1], Exited | Refused | Closed):
            conn.receive_data(await stream.receive_some())
            while (event := conn.next_event()) is not NEED_DATA:
                events.append(event)
    return events


async def test_authenticated_exec(tree: Path, server: str) -> None:
    with trio.fail_after(20):
        events = await exec_once(tree, ("/bin/sh", "-c", "exit 5"))
    assert isinstance(events[0], Started)
    assert events[-1] == Exited(code=5)


async def test_certificate_from_another_ca_refused(tree: Path, server: str, caplog: pytest.LogCaptureFixture) -> None:
    # The rogue client does not trust the server either; make it skip that
    # check so that the server's verification is what is tested.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.load_cert_chain(tree / "rogue/dpu/cert.pem", tree / "rogue/dpu/key.pem")
    with trio.fail_after(20):
        raw = await trio.open_unix_socket(f"{tree}/peer.sock")
        stream = trio.SSLStream(raw, context)
        with pytest.raises((trio.BrokenResourceError, ssl.SSLError)):
            await stream.do_handshake()
            await stream.send_all(encode_frame(0x01, 0, b'{"node":"x","service":"rexec"}'))
            assert await stream.receive_some() == b""
            raise trio.BrokenResourceError("closed")
        await trio.aclose_forcefully(stream)
        # The server is still serving honest peers.
        assert (await exec_once(tree, ("/bin/true",)))[-1] == Exited(code=0)
    assert "refused a connection" in caplog.text


async def test_plaintext_peer_refused(tree: Path, server: str, caplog: pytest.LogCaptureFixture) -> None:
    with trio.fail_after(20):
        async with await trio.open_unix_socket(f"{tree}/peer.sock") as raw:
            await raw.send_all(encode_frame(0x01, 0, b'{"node":"x","service":"rexec"}'))
            # The server drops the connection: EOF, or a reset since our bytes went unread.
            with contextlib.suppress(trio.BrokenResourceError):
                while await raw.receive_some():
                    pass
        assert (await exec_once(tree, ("/bin/true",)))[-1] == Exited(code=0)
    assert "refused a connection" in caplog.text


@pytest.mark.parametrize(
    "garbage",
    [
        b"XXXX" + bytes(8),  # bad magic
        HEADER.pack(b"OF", VERSION, 0x10, 0, 64 << 20),  # oversized
        encode_frame(0x10, 0, b"{not json"),  # malformed exec
        encode_frame(0x11, 0, b'{"pid":1}'),  # a server-only frame from a client
        encode_frame(0x20, 9, b"data"),  # data before exec
        encode_frame(0x10, 0, b"[" * 20000 + b"]" * 20000),  # nested past the decoder's recursion limit
        encode_frame(0x10, 0, b'{"a":' * 20000 + b"1" + b"}" * 20000),
    ],
)
async def test_malformed_frames_close_only_that_session(
    tree: Path, server: str, garbage: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    transport = Transport(TlsConfig.load(tree / "pki/dpu"))
    with trio.fail_after(20):
        connected = await transport.connect(parse_address(f"unix://{tree}/peer.sock"))
        async with connected.stream as stream:
            await stream.send_all(RexecConnection(Role.CLIENT).send(Hello("bad")) + garbage)
            with pytest.raises(trio.BrokenResourceError):
                while await stream.receive_some():
                    pass
                raise trio.BrokenResourceError("closed")
        assert (await exec_once(tree, ("/bin/true",)))[-1] == Exited(code=0)
    assert "session with dpu ended" in caplog.text


async def test_stalled_half_frame_does_not_block_others(tree: Path, server: str) -> None:
    transport = Transport(TlsConfig.load(tree / "pki/dpu"))
    with trio.fail_after(20):
        connected = await transport.connect(parse_address(f"unix://{tree}/peer.sock"))
        async with connected.stream as stream:
            await stream.send_all(RexecConnection(Role.CLIENT).send(Hello("slow")) + b"OF\x01")
            assert (await exec_once(tree, ("/bin/true",)))[-1] == Exited(code=0)


async def test_sighup_reloads_whitelist(tree: Path, server: str) -> None:
    with trio.fail_after(20):
        refused = (await exec_once(tree, ("/bin/false",)))[-1]
        assert refused == Refused(126, "/bin/false: not allowed on host")
        whitelist = tree / "whitelist"
        whitelist.chmod(0o600)
        whitelist.write_text("/bin/true\n/bin/false\n")
        whitelist.chmod(0o400)
        os.kill(os.getpid(), signal.SIGHUP)
        while (await exec_once(tree, ("/bin/false",)))[-1] != Exited(code=1):
            await trio.sleep(0.05)


def test_whitelist_must_be_root_owned_and_not_writable(tmp_path: Path) -> None:
    path = tmp_path / "whitelist"
    path.write_text("/bin/true\nrelative\n/a/../b\n")
    path.chmod(0o664)
    with pytest.raises(ConfigError, match="group- or world-writable"):
        Whitelist.load(str(path))
    path.chmod(0o400)
    os.chown(path, 65534, 65534)
    with pytest.raises(ConfigError, match="owned by root"):
        Whitelist.load(str(path))
    os.chown(path, 0, 0)
    assert Whitelist.load(str(path)).programs == {"/bin/true"}
    # No file: nothing runs here for the peer (how a DPU ships).
    assert Whitelist.load(str(tmp_path / "missing")).programs == frozenset()
    with pytest.raises(ConfigError, match="not a regular file"):
        Whitelist.load(str(tmp_path))


def test_insecure_warns(caplog: pytest.LogCaptureFixture) -> None:
    Transport.from_options(None, insecure=True)
    assert "--insecure" in caplog.text and "neither authenticated nor encrypted" in caplog.text


def test_config_json_round_trip(tree: Path) -> None:
    original = config(tree)
    assert RexecConfig.from_json(original.to_json()) == original
    with pytest.raises(ConfigError, match="unknown setting"):
        RexecConfig.from_json({"nope": 1})
    with pytest.raises(ConfigError, match="keepalive"):
        RexecConfig.from_json({"keepalive": 0.1})


def test_pki_layout_and_modes(tree: Path) -> None:
    node = tree / "pki" / "dpu"
    assert {p.name for p in node.iterdir()} == {"ca.pem", "cert.pem", "key.pem"}
    assert (node / "key.pem").stat().st_mode & 0o777 == 0o600
    assert (tree / "pki" / "ca-key.pem").stat().st_mode & 0o777 == 0o600
    again = pki.init(tree / "pki", [pki.Identity("dpu", "dpu")])
    assert any("kept" in line for line in again)


def test_real_process_listens_on_cmd_net_addr_and_stops_on_sigterm(tree: Path) -> None:
    """CMD_NET_ADDR is the default listening address; SIGTERM stops the server cleanly; --insecure warns."""
    import subprocess
    import sys
    import time

    from offload import proc

    peer = tree / "env-peer.sock"
    env = dict(os.environ, CMD_NET_ADDR=f"unix://{peer}")
    env.pop("NOTIFY_SOCKET", None)
    argv = [
        sys.executable,
        "-m",
        "offload.rexec_server",
        "--insecure",
        "--whitelist",
        str(tree / "whitelist"),
        "--run-dir",
        str(tree / "proc-run"),
    ]
    server = proc.spawn(argv, env=env, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not (peer.exists() and (tree / "proc-run" / "rexec.sock").exists()):
            assert server.poll() is None and time.monotonic() < deadline, "rexec_server did not start"
            time.sleep(0.05)
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=10) == 0
        log = server.stderr.read().decode()
    finally:
        server.kill()
        server.wait()
    assert "INSECURE" in log and "--insecure" in log
    assert "stopping on SIGTERM" in log
    assert not (tree / "proc-run" / "rexec.sock").exists()  # the agent socket is removed on the way out


@pytest.mark.parametrize("first_ends_first", [True, False])
def test_two_servers_in_one_process_leave_its_signal_handlers_as_they_were(tree: Path, first_ends_first: bool) -> None:
    """Signal handling belongs to the process: a second server must not leave a finished run's handler behind.

    (One was left when two servers ended in the order they started; the
    next SIGCHLD then raised RunFinishedError in whatever ran.)
    """
    watched = (signal.SIGCHLD, signal.SIGHUP, signal.SIGTERM, signal.SIGINT)
    before = {signum: signal.getsignal(signum) for signum in watched}

    async def main() -> None:
        transport = Transport(TlsConfig.load(tree / "pki" / "host"))
        async with trio.open_nursery() as outer:
            scopes = []
            for name in ("one", "two"):
                scope = trio.CancelScope()
                scopes.append(scope)
                settings = dataclasses.replace(
                    config(tree), listen=(f"unix://{tree}/{name}.sock",), run_dir=str(tree / name)
                )

                async def run(
                    settings: RexecConfig = settings,
                    scope: trio.CancelScope = scope,
                    *,
                    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
                ) -> None:
                    with scope:
                        await serve(settings, transport, task_status=task_status)

                await outer.start(run)
            for scope in scopes if first_ends_first else reversed(scopes):
                scope.cancel()
                await trio.sleep(0)

    trio.run(main)
    assert {signum: signal.getsignal(signum) for signum in watched} == before
