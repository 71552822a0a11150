"""fds passed over the bridged QMP monitor: save, restore, managedsave, dump and memory snapshots from the DPU side.

libvirt 9.0 passes qemu the write end of a pipe with ``getfd`` for ``virsh
save``, ``managedsave``, ``dump`` and a snapshot's memory (libvirt_iohelper, on the DPU side,
writes the image from the pipe's other end), and gives a restoring qemu
the read end of a pipe at an inherited fd.  The first half of this module
carries fds over one bridged channel between two real links, both ways,
with the rules of `offload.fdpass`; the second half drives the real thing
in a lab of libvirt and checks each operation by its effect on the host
side: the image's bytes, and a guest whose counter goes on.
"""

from __future__ import annotations

import array
import dataclasses
import logging
import os
import socket
import stat
from collections.abc import AsyncIterator, Iterator
from functools import partial
from pathlib import Path

import pytest
import trio

from offload import proc, users
from offload.errors import LocalProtocolError, RemoteProtocolError
from offload.fdio import PassingSocketEnd
from offload.lab import dpu_libvirt, guest
from offload.lab.lab import Lab
from offload.lab.libvirt import Domain, Virsh, guest_domain, qemu_processes, wait_for_marker
from offload.net import Connected
from offload.protocol import messages
from offload.protocol.fdpass import FdDescription
from offload.protocol.framing import encode_frame
from offload.protocol.rexec import (
    FIRST_BRIDGE_CHANNEL,
    FIRST_PASSED_CHANNEL,
    NEED_DATA,
    T_FDS,
    Data,
    Exec,
    ExecRequest,
    Hello,
    Open,
    PassFds,
    RexecConnection,
    Role,
    Started,
)
from offload.rexec.link import Passing, SessionLink, running
from tests.conftest import libvirt_lab
from tests.test_e2e_libvirt import cleanup, console_of, wait_until

# -- the PassFds event, sans-io ---------------------------------------------------------------

PIPE_FROM_CLIENT = FIRST_PASSED_CHANNEL  # even: the client numbers it
PIPE_FROM_SERVER = FIRST_PASSED_CHANNEL + 1


def running_pair() -> tuple[RexecConnection, RexecConnection]:
    """A client and a server whose program runs, with bridged connection FIRST_BRIDGE_CHANNEL open."""
    client, server = RexecConnection(Role.CLIENT), RexecConnection(Role.SERVER)
    _feed(server, client.send(Hello("dpu")))
    _feed(client, server.send(Hello("host")))
    _feed(server, client.send(Exec(ExecRequest(argv=("/usr/bin/qemu-system-x86_64",)))))
    _feed(client, server.send(Started(pid=7)))
    _feed(server, client.send(Open(FIRST_BRIDGE_CHANNEL, 29)))
    return client, server


def _feed(conn: RexecConnection, data: bytes) -> list:
    conn.receive_data(data)
    events = []
    while (event := conn.next_event()) is not NEED_DATA:
        events.append(event)
    return events


def test_passed_fds_open_their_pipes_channels_on_both_sides() -> None:
    client, server = running_pair()
    passed = PassFds(
        FIRST_BRIDGE_CHANNEL,
        (
            FdDescription("pipe_w", channel=PIPE_FROM_CLIENT),
            FdDescription("file", path="/var/lib/libvirt/a.save", access="w", dev=1, ino=2),
        ),
    )
    wire = client.send(passed)
    # Whole, and byte by byte: the same event.
    assert _feed(server, wire) == [passed]
    assert server.send_credit(PIPE_FROM_CLIENT) == client.send_credit(PIPE_FROM_CLIENT) > 0
    # The pipe's bytes flow on its own channel, back to the client.
    assert _feed(client, server.send(Data(PIPE_FROM_CLIENT, b"QEVM"))) == [Data(PIPE_FROM_CLIENT, b"QEVM")]
    # And the server passes fds of its own, on channels it numbers.
    back = PassFds(FIRST_BRIDGE_CHANNEL, (FdDescription("pipe_r", channel=PIPE_FROM_SERVER),))
    events = []
    for byte in server.send(back):
        events += _feed(client, bytes([byte]))
    assert events == [back]


@pytest.mark.parametrize(
    ("sender", "passed"),
    [
        # A channel the other side numbers.
        ("client", PassFds(FIRST_BRIDGE_CHANNEL, (FdDescription("pipe_r", channel=PIPE_FROM_SERVER),))),
        ("server", PassFds(FIRST_BRIDGE_CHANNEL, (FdDescription("pipe_r", channel=PIPE_FROM_CLIENT),))),
        # A bridged connection that was never opened.
        ("client", PassFds(FIRST_BRIDGE_CHANNEL + 1, (FdDescription("null"),))),
    ],
)
def test_passed_fds_the_sender_may_not_pass(sender: str, passed: PassFds) -> None:
    client, server = running_pair()
    ours, theirs = (client, server) if sender == "client" else (server, client)
    with pytest.raises(LocalProtocolError):
        ours.send(passed)
    # Forged on the wire, they are the peer's error.
    with pytest.raises(RemoteProtocolError):
        _feed(theirs, encode_frame(T_FDS, passed.channel, messages.dump({"fds": [fd.to_json() for fd in passed.fds]})))


@pytest.mark.parametrize(
    ("channel", "fds"),
    [
        (2, [{"kind": "null", "access": "r"}]),  # an inherited fd's channel, not a bridged connection
        (FIRST_BRIDGE_CHANNEL, [{"kind": "pipe_r", "channel": 3}]),  # a pipe below the passed pipes' range
        (FIRST_BRIDGE_CHANNEL, [{"kind": "socket"}]),
        (FIRST_BRIDGE_CHANNEL, []),
        (FIRST_BRIDGE_CHANNEL, "nope"),
    ],
)
def test_malformed_passed_fds_are_the_peers_fault(channel: int, fds: object) -> None:
    client, _ = running_pair()
    with pytest.raises(RemoteProtocolError):
        _feed(client, encode_frame(T_FDS, channel, messages.dump({"fds": fds})))


def test_pipes_passed_on_a_closed_connection_are_dropped_with_it() -> None:
    client, server = running_pair()
    server.close_channel(FIRST_BRIDGE_CHANNEL)
    passed = PassFds(FIRST_BRIDGE_CHANNEL, (FdDescription("pipe_r", channel=PIPE_FROM_CLIENT),))
    assert _feed(server, client.send(passed)) == []
    assert _feed(server, client.send(Data(PIPE_FROM_CLIENT, b"late"))) == []


# -- one bridged channel between two links ---------------------------------------------------


@dataclasses.dataclass
class Bridge:
    """A bridged connection: the program's socket on the DPU side and on the host side."""

    dpu: trio.socket.SocketType
    host: trio.socket.SocketType


@pytest.fixture
async def bridge(tmp_path: Path) -> AsyncIterator[Bridge]:
    shared = (str(tmp_path.resolve() / "shared"),)
    os.mkdir(shared[0])
    raw_client, raw_server = socket.socketpair()
    client = SessionLink(Connected(_stream(raw_client), "host"), Role.CLIENT, "dpu", keepalive=60)
    server = SessionLink(Connected(_stream(raw_server), "dpu"), Role.SERVER, "host", keepalive=60)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.handshake)
            nursery.start_soon(server.handshake)
    root = users.local_user(os.getuid(), os.getgid())
    async with running(client) as client_tasks, running(server) as server_tasks:
        with trio.fail_after(10):
            await client.send(Exec(ExecRequest(argv=("/usr/bin/qemu-system-x86_64",))))
            assert isinstance(await server.control.receive(), Exec)
            await server.send(Started(pid=os.getpid()))
            assert isinstance(await client.control.receive(), Started)
            await client.send(Open(FIRST_BRIDGE_CHANNEL, 3))
            assert isinstance(await server.control.receive(), Open)
        programs = []
        for link, tasks in ((client, client_tasks), (server, server_tasks)):
            program, ours = socket.socketpair()
            end = PassingSocketEnd(_stream(ours))
            passing = Passing(shared, root, "/", tasks)
            tasks.start_soon(
                partial(link.relay, FIRST_BRIDGE_CHANNEL, end, inbound=True, outbound=True, passing=passing)
            )
            programs.append(trio.socket.from_stdlib_socket(program))
        try:
            yield Bridge(*programs)
        finally:
            for program in programs:
                program.close()
            client_tasks.cancel_scope.cancel()
            server_tasks.cancel_scope.cancel()


def _stream(sock: socket.socket) -> trio.SocketStream:
    return trio.SocketStream(trio.socket.from_stdlib_socket(sock))


async def send_with(sock: trio.socket.SocketType, data: bytes, fds: list[int]) -> None:
    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
    assert await sock.sendmsg([data], rights) == len(data)


async def receive_with(sock: trio.socket.SocketType, size: int) -> tuple[bytes, list[int]]:
    """``size`` bytes and every fd that came with them."""
    data, fds = b"", []
    with trio.fail_after(10):
        while len(data) < size:
            chunk, ancillary, _, _ = await sock.recvmsg(size - len(data), socket.CMSG_SPACE(16 * 4))
            assert chunk, "the bridged connection ended"
            data += chunk
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.extend(array.array("i", payload[: len(payload) - len(payload) % 4]))
    return data, fds


async def read_to_end(fd: int) -> bytes:
    stream = trio.lowlevel.FdStream(fd)
    data = b""
    with trio.fail_after(10):
        while chunk := await stream.receive_some():
            data += chunk
    await stream.aclose()
    return data


def shared_file(bridge_dir: Path, content: bytes) -> int:
    path = bridge_dir / "shared" / "image"
    path.write_bytes(content)
    fd = os.open(path, os.O_RDWR)
    os.lseek(fd, 3, os.SEEK_SET)
    return fd


async def test_a_pipe_and_a_shared_file_cross_from_the_dpu(bridge: Bridge, tmp_path: Path) -> None:
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    image = shared_file(tmp_path, b"QEVMsave image")
    await send_with(bridge.dpu, b'{"execute":"getfd"}', [write_end, image])
    os.close(write_end)
    data, fds = await receive_with(bridge.host, len(b'{"execute":"getfd"}'))
    assert data == b'{"execute":"getfd"}'
    passed_pipe, passed_file = fds
    try:
        assert stat.S_ISFIFO(os.fstat(passed_pipe).st_mode)
        # The same file, at the sender's offset, writable as it was.
        assert (os.fstat(passed_file).st_dev, os.fstat(passed_file).st_ino) == (
            os.fstat(image).st_dev,
            os.fstat(image).st_ino,
        )
        assert os.read(passed_file, 4) == b"Msav"
        os.write(passed_pipe, b"migration stream")
    finally:
        os.close(passed_pipe)
        os.close(passed_file)
        os.close(image)
    # What the host's program wrote reaches the DPU's pipe, then its end.
    assert await read_to_end(read_end) == b"migration stream"


async def test_a_pipe_and_a_shared_file_cross_from_the_host(bridge: Bridge, tmp_path: Path) -> None:
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    image = shared_file(tmp_path, b"ELF core")
    await send_with(bridge.host, b"{}", [read_end, image])
    os.close(read_end)
    data, fds = await receive_with(bridge.dpu, 2)
    assert data == b"{}"
    passed_pipe, passed_file = fds
    os.close(image)
    try:
        assert os.read(passed_file, 5) == b" core"
        os.write(write_end, b"restore stream")
    finally:
        os.close(write_end)
        os.close(passed_file)
    assert await read_to_end(passed_pipe) == b"restore stream"


@pytest.mark.parametrize("direction", ["from the dpu", "from the host"])
async def test_files_outside_the_shared_paths_and_sockets_are_refused(
    bridge: Bridge, tmp_path: Path, direction: str, caplog: pytest.LogCaptureFixture
) -> None:
    sender, receiver = (bridge.dpu, bridge.host) if direction == "from the dpu" else (bridge.host, bridge.dpu)
    private = tmp_path / "private"
    private.write_bytes(b"not shared")
    one, other = socket.socketpair()
    refused = [os.open(private, os.O_RDONLY), one.fileno()]
    try:
        for fd in refused:
            caplog.clear()
            with caplog.at_level(logging.ERROR):
                await send_with(sender, b"getfd", [fd])
                # The command arrives, without the fd: qemu answers it with its own error.
                assert await receive_with(receiver, 5) == (b"getfd", [])
            assert any(record.levelno == logging.ERROR for record in caplog.records)
        # The connection goes on carrying what can be carried.
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        await send_with(sender, b"again", [write_end])
        os.close(write_end)
        data, [passed] = await receive_with(receiver, 5)
        assert data == b"again"
        os.write(passed, b"ok")
        os.close(passed)
        assert await read_to_end(read_end) == b"ok"
    finally:
        os.close(refused[0])
        one.close()
        other.close()


# -- the real thing: libvirt on the DPU side, qemu on the host side ------------------------------

#: Small enough that a memory dump and two save images fit the lab's tmpfs with room to spare.
MEMORY_MIB = 128


@pytest.fixture(scope="module")
def fdlab() -> Iterator[Lab]:
    with libvirt_lab("f") as lab:
        yield lab


@pytest.fixture
def virsh(fdlab: Lab) -> Virsh:
    return dpu_libvirt.virsh(fdlab)


def start_counting_guest(lab: Lab, virsh: Virsh, name: str) -> Domain:
    """A running guest that has printed its marker and a few ticks."""
    domain = dataclasses.replace(guest_domain(name, guest.build()), memory_mib=MEMORY_MIB)
    virsh.define(domain)
    virsh("start", name)
    wait_for_marker(lambda: console_of(lab, domain))
    wait_until(lambda: len(guest.ticks(console_of(lab, domain))) >= 2, 60, "the guest counts")
    return domain


def goes_on_from(lab: Lab, domain: Domain, before: str) -> None:
    """The guest's console after a restore continues the count ``before`` ended with.

    A restored guest prints the next number; a guest that booted again
    would print its marker and start from 0.  libvirt opens the console
    file anew for the new qemu, truncating it; should it append, only what
    follows ``before`` is new.
    """
    last = guest.ticks(before)[-1]

    def new_output() -> str:
        console = console_of(lab, domain)
        return console[len(before) :] if console.startswith(before) else console

    wait_until(lambda: guest.ticks(new_output()), 60, f"the restored guest counts on from {last}")
    after = new_output()
    assert guest.MARKER not in after, after
    assert guest.ticks(after)[0] == last + 1, after


def on_host(lab: Lab, path: str) -> Path:
    return lab.path_on("host", path)


def remove_on_host(lab: Lab, *paths: str) -> None:
    proc.run(lab.command("host", ["rm", "-f", *paths]), check=False)


@pytest.mark.lab
@pytest.mark.timeout(600)
def test_save_and_restore(fdlab: Lab, virsh: Virsh) -> None:
    name = "fds-save"
    image = f"/var/lib/libvirt/{name}.save"
    try:
        domain = start_counting_guest(fdlab, virsh, name)
        virsh("save", name, image)
        # The guest stopped on the host, and its image is there, complete.
        assert not qemu_processes(name)
        assert virsh.state(name) == "shut off"
        with on_host(fdlab, image).open("rb") as saved:
            assert saved.read(16) == b"LibvirtQemudSave"
        assert on_host(fdlab, image).stat().st_size > 1 << 20
        before = console_of(fdlab, domain)

        virsh("restore", image)
        assert virsh.state(name) == "running"
        assert len(qemu_processes(name)) == 1
        goes_on_from(fdlab, domain, before)
    finally:
        cleanup(virsh, name)
        remove_on_host(fdlab, image)


@pytest.mark.lab
@pytest.mark.timeout(600)
def test_managedsave_then_start(fdlab: Lab, virsh: Virsh) -> None:
    name = "fds-managed"
    image = f"/var/lib/libvirt/qemu/save/{name}.save"
    try:
        domain = start_counting_guest(fdlab, virsh, name)
        virsh("managedsave", name)
        assert not qemu_processes(name)
        assert virsh.state(name) == "shut off"
        with on_host(fdlab, image).open("rb") as saved:
            assert saved.read(16) == b"LibvirtQemudSave"
        before = console_of(fdlab, domain)

        virsh("start", name)
        assert virsh.state(name) == "running"
        goes_on_from(fdlab, domain, before)
        # A start from the managed save image consumes it.
        assert not on_host(fdlab, image).exists()
    finally:
        proc.run(virsh.argv("managedsave-remove", name), check=False)
        cleanup(virsh, name)


@pytest.mark.lab
@pytest.mark.timeout(600)
def test_memory_only_dump(fdlab: Lab, virsh: Virsh) -> None:
    name = "fds-dump"
    core = f"/var/lib/libvirt/{name}.core"
    try:
        domain = start_counting_guest(fdlab, virsh, name)
        virsh("dump", "--memory-only", name, core)
        # An ELF core with the guest's memory in it, written on the host side.
        with on_host(fdlab, core).open("rb") as dumped:
            assert dumped.read(4) == b"\x7fELF"
        assert on_host(fdlab, core).stat().st_size >= MEMORY_MIB << 20
        # The guest was paused for the dump, not ended: it counts on.
        assert virsh.state(name) == "running"
        before = console_of(fdlab, domain)
        last = guest.ticks(before)[-1]
        wait_until(lambda: guest.ticks(console_of(fdlab, domain))[-1] > last, 60, "the guest counts on after the dump")
    finally:
        cleanup(virsh, name)
        remove_on_host(fdlab, core)


@pytest.mark.lab
@pytest.mark.timeout(600)
def test_snapshot_with_memory(fdlab: Lab, virsh: Virsh) -> None:
    name = "fds-snap"
    memory = f"/var/lib/libvirt/{name}.mem"
    try:
        domain = start_counting_guest(fdlab, virsh, name)
        # Paused, its console holds still: the snapshot is taken after the last tick on it.
        virsh("suspend", name)
        before = console_of(fdlab, domain)
        virsh("snapshot-create-as", name, "with-memory", "--memspec", f"file={memory},snapshot=external")
        with on_host(fdlab, memory).open("rb") as saved:
            assert saved.read(16) == b"LibvirtQemudSave"
        virsh("resume", name)
        last = guest.ticks(before)[-1]
        wait_until(lambda: guest.ticks(console_of(fdlab, domain))[-1] > last, 60, "the guest counts on")

        # The memory image brings the guest back to the moment of the snapshot.
        virsh("snapshot-delete", name, "with-memory", "--metadata")
        virsh("destroy", name)
        virsh("restore", "--running", memory)
        goes_on_from(fdlab, domain, before)
    finally:
        proc.run(virsh.argv("snapshot-delete", name, "with-memory", "--metadata"), check=False)
        cleanup(virsh, name)
        remove_on_host(fdlab, memory)
