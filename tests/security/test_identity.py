"""Who may talk to whom: certificates name a role and a node, and every service checks both.

One CA signs every certificate, so the CA alone cannot tell a second DPU
from the host.  These tests run the real daemons in-process over UNIX
sockets with real TLS, and judge by effect: a program that would create a
marker file, a UNIX socket that counts its connections, a file that would
be read.

A peer that lies only to itself is modelled by a TlsConfig whose claimed
identity differs from its certificate's: its own client-side check then
lets it try, and what the server does is what is tested.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from offload import aio, pki
from offload.config import RexecConfig
from offload.errors import AuthenticationError, ConfigError, TransportError
from offload.net import Transport, parse_address
from offload.pki import Identity, TlsConfig
from offload.protocol import qtfs as qtfs_wire
from offload.protocol import udsproxy as uds_wire
from offload.protocol.rexec import NEED_DATA, Closed, Exec, ExecRequest, Exited, Hello, Refused, RexecConnection, Role
from offload.qtfs.backend import Export
from offload.qtfs.client import Link
from offload.qtfs.server import ServerConfig
from offload.qtfs.server import serve as serve_qtfs
from offload.rexec.server import serve as serve_rexec
from offload.udsproxy.daemon import PeerStream, ProxyConfig
from offload.udsproxy.daemon import serve as serve_udsproxy

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the whitelist must be root-owned")

#: Every identity the tests need, all from one CA.
NODES = (
    Identity("host", "host"),
    Identity("dpu", "dpu"),
    Identity("dpu", "dpu2"),  # a second DPU
    Identity("host", "host2"),  # a second host
)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    pki.init(tmp_path / "pki", NODES)
    whitelist = tmp_path / "whitelist"
    whitelist.write_text("/bin/sh\n")
    whitelist.chmod(0o400)
    return tmp_path


def credentials(tree: Path, node: str, *, claims: str | None = None) -> TlsConfig:
    """``node``'s credentials; ``claims``: the role it pretends to itself to have."""
    real = TlsConfig.load(tree / "pki" / node)
    return real if claims is None else TlsConfig(real.directory, Identity(claims, node))


async def start_rexec(tree: Path, nursery: trio.Nursery, node: str, *peer_names: str) -> str:
    role = TlsConfig.load(tree / "pki" / node).identity.role
    config = RexecConfig(
        listen=(f"unix://{tree}/{node}-rexec.sock",),
        whitelist=str(tree / "whitelist"),
        run_dir=str(tree / f"run-{node}"),
        node=node,
        keepalive=5.0,
        peer_name=peer_names,
        user_map=("root=root",),  # the marker is written as root, into the test's root-only directory
    )
    transport = Transport(credentials(tree, node), peer_names=peer_names)
    assert transport.tls is not None and transport.tls.identity.role == role
    bound = await nursery.start(serve_rexec, config, transport)
    return bound[0]


async def logged(caplog: pytest.LogCaptureFixture, text: str) -> None:
    """Wait for the refusal's log line: the refused client may see its connection end first."""
    with trio.fail_after(5):
        while text not in caplog.text:
            await trio.sleep(0.01)


async def try_exec(transport: Transport, address: str, marker: Path) -> str:
    """Ask the rexec_server at ``address`` to create ``marker``: how it ended, in a word."""
    try:
        connected = await transport.connect(parse_address(address))
    except TransportError:
        return "refused"
    conn = RexecConnection(Role.CLIENT)
    events: list[object] = []
    try:
        async with connected.stream as stream:
            await stream.send_all(conn.send(Hello("test")))
            # TLS 1.3: the client's handshake ends before the server has judged
            # its certificate; a refusal shows as the end of the stream.
            while conn.peer_hello is None:
                data = await stream.receive_some()
                if not data:
                    return "refused"
                conn.receive_data(bytes(data))
                while conn.next_event() is not NEED_DATA:
                    pass
            await stream.send_all(conn.send(Exec(ExecRequest(argv=("/bin/sh", "-c", f"touch {marker}"), user="root"))))
            while not events or not isinstance(events[-1], Exited | Refused | Closed):
                data = await stream.receive_some()
                conn.receive_data(bytes(data))
                while (event := conn.next_event()) is not NEED_DATA:
                    events.append(event)
    except (TransportError, trio.BrokenResourceError):
        return "refused"
    return "ran" if events[-1] == Exited(code=0) else f"ended: {events[-1]}"


async def test_a_second_dpu_cannot_run_programs_on_a_dpu(
    tree: Path, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    address = await start_rexec(tree, nursery, "dpu")
    marker = tree / "second-dpu-ran"
    with trio.fail_after(20):
        outcome = await try_exec(Transport(credentials(tree, "dpu2", claims="host")), address, marker)
    assert outcome == "refused"
    assert not marker.exists()
    await logged(caplog, "peer dpu2 has role dpu: a dpu deals only with host peers")
    # The host still runs programs there.
    with trio.fail_after(20):
        assert await try_exec(Transport(credentials(tree, "host")), address, tree / "host-ran") == "ran"
    assert (tree / "host-ran").exists()


async def test_a_dpu_refuses_to_connect_to_a_second_dpu(tree: Path, nursery: trio.Nursery) -> None:
    """The check holds on the connecting side too: a DPU never takes another DPU for its host."""
    address = await start_rexec(tree, nursery, "dpu2")
    with trio.fail_after(20), pytest.raises(AuthenticationError, match="peer dpu2 has role dpu"):
        await Transport(credentials(tree, "dpu")).connect(parse_address(address))


async def test_the_host_cannot_pass_for_a_dpu_at_a_hosts_rexec_server(
    tree: Path, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    address = await start_rexec(tree, nursery, "host")
    marker = tree / "host-as-dpu-ran"
    for node in ("host", "host2"):
        with trio.fail_after(20):
            assert await try_exec(Transport(credentials(tree, node, claims="dpu")), address, marker) == "refused"
        await logged(caplog, f"peer {node} has role host: a host deals only with dpu peers")
    assert not marker.exists()
    with trio.fail_after(20):
        assert await try_exec(Transport(credentials(tree, "dpu")), address, tree / "dpu-ran") == "ran"


async def test_peer_name_refuses_an_unlisted_peer_of_the_right_role(
    tree: Path, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    address = await start_rexec(tree, nursery, "host", "dpu")
    marker = tree / "unlisted-ran"
    with trio.fail_after(20):
        assert await try_exec(Transport(credentials(tree, "dpu2")), address, marker) == "refused"
    assert not marker.exists()
    await logged(caplog, "peer dpu2 (role dpu) is not one of the configured peer names (dpu)")
    with trio.fail_after(20):
        assert await try_exec(Transport(credentials(tree, "dpu")), address, tree / "listed-ran") == "ran"
    # And when connecting: a DPU that lists only host2 does not talk to host.
    picky = Transport(credentials(tree, "dpu"), peer_names=["host2"])
    with trio.fail_after(20), pytest.raises(AuthenticationError, match=r"peer host \(role host\) is not one"):
        await picky.connect(parse_address(address))


async def counting_server(path: str, accepted: list[int], *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await listener.bind(path)
    listener.listen(16)
    task_status.started()
    while True:
        conn, _ = await listener.accept()
        accepted.append(1)
        conn.close()


async def test_the_host_cannot_pass_for_a_dpu_at_a_hosts_udsproxyd(
    tree: Path, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    (tree / "sockets").mkdir()
    accepted: list[int] = []
    target = str(tree / "sockets" / "target.sock")
    await nursery.start(counting_server, target, accepted)
    config = ProxyConfig(
        (f"unix://{tree}/uds-peer.sock",), "", (str(tree / "sockets"),), str(tree / "uds"), "host", (), ("root=root",)
    )
    await nursery.start(serve_udsproxy, config, Transport(credentials(tree, "host")))

    async def ask(transport: Transport) -> str:
        try:
            connected = await transport.connect(parse_address(f"unix://{tree}/uds-peer.sock"))
            peer = PeerStream(connected.stream, client=True)
            await peer.send(uds_wire.Hello("test"))
            await peer.next()
            await peer.send(uds_wire.Connect(target, "stream", "root"))
            answer = await peer.next()
        except (TransportError, trio.BrokenResourceError):
            return "refused"
        await connected.stream.aclose()
        return "connected" if isinstance(answer, uds_wire.Connected) and not answer.error else f"answered {answer}"

    with trio.fail_after(20):
        assert await ask(Transport(credentials(tree, "host2", claims="dpu"))) == "refused"
    assert accepted == []
    await logged(caplog, "peer host2 has role host")
    with trio.fail_after(20):
        assert await ask(Transport(credentials(tree, "dpu"))) == "connected"
        while not accepted:
            await trio.sleep(0.01)


async def test_the_host_cannot_pass_for_a_dpu_at_a_qtfs_server(
    tree: Path, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    export = tree / "export"
    export.mkdir()
    (export / "secret").write_bytes(b"host secret")
    config = ServerConfig((f"unix://{tree}/qtfs.sock",), (Export.parse(str(export)),), node="host")
    await nursery.start(serve_qtfs, config, Transport(credentials(tree, "host")))

    async def read_secret(transport: Transport) -> bytes | str:
        link = Link(transport, parse_address(f"unix://{tree}/qtfs.sock"), os.fsencode(export), keepalive=30)
        try:
            async with aio.open_nursery() as inner:  # one failure, not a group
                await inner.start(link.run)
                opened = await link.call(qtfs_wire.Open(b"secret", os.O_RDONLY))
                assert isinstance(opened, qtfs_wire.HandleReply)
                data = await link.call(qtfs_wire.Read(opened.handle, 0, 100))
                assert isinstance(data, qtfs_wire.DataReply)
                inner.cancel_scope.cancel()
                return data.data
        except (TransportError, OSError, trio.BrokenResourceError):
            return "refused"

    with trio.fail_after(30):
        assert await read_secret(Transport(credentials(tree, "host2", claims="dpu"))) == "refused"
    await logged(caplog, "peer host2 has role host")
    with trio.fail_after(30):
        assert await read_secret(Transport(credentials(tree, "dpu"))) == b"host secret"


# -- certificates -----------------------------------------------------------------------------


def test_certificates_name_role_and_node(tree: Path) -> None:
    for identity in NODES:
        assert TlsConfig.load(tree / "pki" / identity.node).identity == identity
    cert = x509.load_pem_x509_certificate((tree / "pki" / "dpu2" / "cert.pem").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.UniformResourceIdentifier) == ["offload:role=dpu"]


def test_pki_init_command_line(tmp_path: Path) -> None:
    def offload(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "offload.cli", "pki", "init", "--dir", str(tmp_path / "pki"), *args],
            capture_output=True,
            text=True,
            check=False,
        )

    made = offload("--node", "host", "--dpu", "dpu-a", "--dpu", "dpu-b")
    assert made.returncode == 0, made.stderr
    assert {TlsConfig.load(tmp_path / "pki" / n).identity for n in ("host", "dpu-a", "dpu-b")} == {
        Identity("host", "host"),
        Identity("dpu", "dpu-a"),
        Identity("dpu", "dpu-b"),
    }
    wrong = offload("--node", "dpu-c")
    assert wrong.returncode != 0
    assert "node name 'dpu-c' names no role: use --host dpu-c or --dpu dpu-c" in wrong.stderr
    assert offload().returncode != 0
    # A kept certificate of another role is not silently reused.
    assert "is for dpu dpu-a, not host dpu-a" in offload("--host", "dpu-a").stderr


def old_certificate(tree: Path, node: str) -> Path:
    """A certificate as `offload pki init` made them before roles: no role URI."""
    ca = x509.load_pem_x509_certificate((tree / "pki" / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((tree / "pki" / "ca-key.pem").read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(node)]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    directory = tree / "old" / node
    directory.mkdir(parents=True)
    (directory / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    (directory / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return directory


async def test_old_certificates_without_a_role_are_refused_with_the_way_out(
    tree: Path, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    directory = old_certificate(tree, "dpu")
    with pytest.raises(ConfigError, match="names no role: re-issue the certificates with 'offload pki init --force'"):
        TlsConfig.load(directory)
    address = await start_rexec(tree, nursery, "host")
    marker = tree / "old-ran"
    caplog.set_level(logging.WARNING)
    with trio.fail_after(20):
        outcome = await try_exec(Transport(TlsConfig(directory, Identity("dpu", "dpu"))), address, marker)
    assert outcome == "refused"
    assert not marker.exists()
    await logged(caplog, "the certificate of dpu")
    assert "offload pki init --force" in caplog.text
