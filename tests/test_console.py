"""The serial console of a domain whose qemu runs on the host, opened from the DPU side.

One whole lab for the module (its name is the test lab's with a "c") and
one running guest with a pty serial console.  The guest prints a tick every
second and echoes each line typed on its console (offload/lab/guest.py), so
every check is by effect: ticks arrive, a line typed comes back from the
guest.  Clients are Debian's python3-libvirt with libvirt's default event
loop (as nova's) and `virsh console` on a pty, both on the DPU side.

The host's rule, that the DPU gets only the ptys of programs it runs, is
tested against an in-process rexec_server speaking the raw protocol.
"""

from __future__ import annotations

import contextlib
import os
import pty
import secrets
import select
import subprocess
import sys
import time
import tty
import uuid
from collections.abc import Iterator
from pathlib import Path
from xml.sax.saxutils import escape

import pytest
import trio

from offload import pki, proc
from offload.config import RexecConfig
from offload.lab import SERVICES, dpu_libvirt, guest
from offload.lab.lab import Lab
from offload.lab.libvirt import IMAGES, QEMU_STATE, Virsh, install_argv, qemu_processes
from offload.net import Transport, parse_address
from offload.pki import TlsConfig
from offload.protocol import udsproxy as udsproxy_wire
from offload.protocol.rexec import (
    FIRST_BRIDGE_CHANNEL,
    NEED_DATA,
    TICKET_BYTES,
    Attached,
    Closed,
    Data,
    Exec,
    ExecRequest,
    Exited,
    FdKind,
    FdSpec,
    Hangup,
    Hello,
    OpenPty,
    Refused,
    Reset,
    Resume,
    Resumed,
    RexecConnection,
    Role,
    Started,
    Ticket,
)
from offload.rexec import attached
from offload.rexec.server import serve
from tests.conftest import gone, keep_logs, wait_for

REPO = Path(__file__).resolve().parents[1]
CLIENT = str(REPO / "tests" / "console_client.py")
DOMAIN = "console-guest"
#: What a unit file would give a client: no LD_PRELOAD or lab variables.
CLEAN_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
#: The DPU's own python, the one python3-libvirt is installed for.
DPU_PYTHON = "/usr/bin/python3"


def domain_xml(name: str, image: guest.GuestImage) -> str:
    """A guest as nova defines one for its serial console: a pty serial port with a log, and the console on it."""
    return f"""<domain type='qemu'>
  <name>{escape(name)}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{IMAGES / image.kernel.name}</kernel>
    <initrd>{IMAGES / image.initrd.name}</initrd>
    <cmdline>console=ttyS0 panic=-1 quiet</cmdline>
  </os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <serial type='pty'>
      <log file='{QEMU_STATE / (name + ".console.log")}' append='off'/>
      <target port='0'/>
    </serial>
    <console type='pty'><target type='serial' port='0'/></console>
    <memballoon model='none'/>
  </devices>
</domain>
"""


@pytest.fixture(scope="module")
def clab() -> Iterator[Lab]:
    lab = Lab(os.environ.get("OFFLOAD_TEST_LAB", "offt")[:9] + "c")
    lab.down()
    image = guest.build()
    try:
        lab.up(only=list(SERVICES))
        proc.run(lab.command("host", install_argv(image)))
        virsh = dpu_libvirt.virsh(lab)
        virsh("define", "/dev/stdin", input=domain_xml(DOMAIN, image))
        virsh("start", DOMAIN)
        yield lab
    finally:
        keep_logs(lab)
        with contextlib.suppress(Exception):
            dpu_libvirt.virsh(lab)("destroy", DOMAIN)
        lab.down()


@pytest.fixture
def virsh(clab: Lab) -> Virsh:
    return dpu_libvirt.virsh(clab)


class Client:
    """tests/console_client.py on the DPU side: one python-libvirt connection."""

    def __init__(self, lab: Lab) -> None:
        uri = f"qemu:///system?socket={dpu_libvirt.libvirt_socket(lab)}"
        self.process = proc.spawn(
            lab.command("dpu", [DPU_PYTHON, CLIENT, uri, DOMAIN], cwd="/"),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=CLEAN_ENV,
        )

    def __call__(self, command: str) -> str:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(command.encode() + b"\n")
        self.process.stdin.flush()
        assert select.select([self.process.stdout], [], [], 120)[0], f"no answer to {command!r}"
        return self.process.stdout.readline().decode().strip()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            assert self.process.stdin is not None
            self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@contextlib.contextmanager
def client(lab: Lab) -> Iterator[Client]:
    made = Client(lab)
    try:
        yield made
    finally:
        made.close()


def round_trip(console: Client) -> None:
    """Guest output arrives, and a line typed is echoed back by the guest."""
    assert console("expect " + guest.TICK).startswith("found")
    word = f"typed-{uuid.uuid4().hex[:8]}"
    assert console(f"send {word}") == "sent"
    assert console(f"expect {guest.ECHO} {word}") == f"found {guest.ECHO} {word}"


def pty_path(virsh: Virsh) -> str:
    """The pty libvirt names for the domain's serial console (its live XML)."""
    xml = virsh("dumpxml", DOMAIN)
    [path] = {line.split("'")[1] for line in xml.splitlines() if "<source path='/dev/pts/" in line}
    return path


@pytest.mark.lab
@pytest.mark.timeout(600)
def test_console_carries_output_and_keystrokes(clab: Lab, virsh: Virsh) -> None:
    # libvirt names a pty of the DPU's rootfs, not the host's.
    path = pty_path(virsh)
    assert clab.path_on("dpu", str(dpu_libvirt.target(clab)) + path).is_char_device()
    with client(clab) as console:
        assert console("open") == "opened"
        round_trip(console)
        assert console("close") == "closed"


@pytest.mark.lab
@pytest.mark.timeout(600)
def test_force_takes_the_console_over_and_it_reopens(clab: Lab) -> None:
    with client(clab) as first, client(clab) as second:
        assert first("open") == "opened"
        assert first("expect " + guest.TICK).startswith("found")
        refused = second("open")
        assert refused.startswith("error") and "console" in refused.lower(), refused
        assert second("open force") == "opened"
        assert first("ended") == "ended"
        round_trip(second)
        assert second("close") == "closed"
    with client(clab) as third:
        assert third("open") == "opened"
        round_trip(third)
        assert third("close") == "closed"
        # The same client again, on the same connection.
        assert third("open") == "opened"
        round_trip(third)


def logged_ticks(lab: Lab) -> list[int]:
    """The ticks in the console log qemu writes on the host side."""
    path = lab.path_on("host", str(QEMU_STATE / f"{DOMAIN}.console.log"))
    return guest.ticks(path.read_text(errors="replace")) if path.exists() else []


@pytest.mark.lab
@pytest.mark.timeout(600)
def test_a_console_nobody_reads_stalls_nothing_and_queues_nothing(clab: Lab) -> None:
    """As with a local pty: the guest goes on printing (its log shows it), and a console opened later starts now."""
    wait_for(lambda: len(logged_ticks(clab)) > 0, 120, "ticks in the host's console log")
    start = logged_ticks(clab)[-1]
    wait_for(lambda: logged_ticks(clab)[-1] >= start + 3, 30, "the guest ticking on with nobody on its console")
    with client(clab) as console:
        opened_at = logged_ticks(clab)[-1]
        assert console("open") == "opened"
        first = console("expect " + guest.TICK)
        assert first.startswith("found"), first
        # Nothing from before the console was opened waited in it.
        assert int(first.split()[-1]) >= opened_at, (first, opened_at)


def virsh_console(lab: Lab, *options: str) -> tuple[subprocess.Popen, int]:
    """``virsh console DOMAIN`` on the DPU side with a terminal of its own: (process, the terminal's master)."""
    master, terminal = pty.openpty()
    try:
        process = proc.spawn(
            dpu_libvirt.virsh(lab).argv("console", *options, DOMAIN),
            stdin=terminal,
            stdout=terminal,
            stderr=terminal,
            env={**CLEAN_ENV, "TERM": "dumb"},
            start_new_session=True,
        )
    except BaseException:
        os.close(master)
        raise
    finally:
        os.close(terminal)
    return process, master


def read_until(master: int, words: str, timeout: float = 60) -> str:
    seen = b""
    deadline = time.monotonic() + timeout
    while words.encode() not in seen:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([master], [], [], remaining)[0]:
            raise AssertionError(f"no {words!r} on the console in {timeout} s; it showed {seen[-300:]!r}")
        try:
            seen += os.read(master, 4096)
        except OSError:
            raise AssertionError(f"the console ended before {words!r}; it showed {seen[-300:]!r}") from None
    return seen.decode(errors="replace")


def end_virsh(process: subprocess.Popen, master: int) -> None:
    try:
        if process.poll() is None:
            os.write(master, b"\x1d")  # Ctrl-], virsh console's escape
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    finally:
        os.close(master)


@pytest.mark.lab
@pytest.mark.timeout(600)
def test_virsh_console_on_a_terminal(clab: Lab) -> None:
    process, master = virsh_console(clab)
    try:
        read_until(master, guest.TICK)
        word = f"virsh-{uuid.uuid4().hex[:8]}"
        os.write(master, word.encode() + b"\r")
        read_until(master, f"{guest.ECHO} {word}")
    finally:
        end_virsh(process, master)
    assert process.returncode == 0
    # Another virsh takes it over from a python-libvirt client with --force.
    with client(clab) as holder:
        assert holder("open") == "opened"
        process, master = virsh_console(clab, "--force")
        try:
            read_until(master, guest.TICK)
            assert holder("ended") == "ended"
            word = f"forced-{uuid.uuid4().hex[:8]}"
            os.write(master, word.encode() + b"\r")
            read_until(master, f"{guest.ECHO} {word}")
        finally:
            end_virsh(process, master)


@pytest.mark.lab
@pytest.mark.timeout(600)
def test_console_after_libvirtd_restart(clab: Lab, virsh: Virsh) -> None:
    [qemu] = qemu_processes(DOMAIN)
    before = pty_path(virsh)
    dpu_libvirt.restart_libvirtd(clab)
    assert virsh.state(DOMAIN) == "running"
    # libvirt read the path back from its status XML; it still names the same pty.
    assert pty_path(virsh) == before
    with client(clab) as console:
        assert console("open") == "opened"
        round_trip(console)
    assert [p.pid for p in qemu_processes(DOMAIN)] == [qemu.pid]


@pytest.mark.lab
@pytest.mark.timeout(600)
def test_an_open_console_outlives_restarts_of_both_rexec_servers(clab: Lab, virsh: Virsh) -> None:
    """A console stays open while rexec_server restarts under it, on either side, stopped or crashed:
    the pty relays attach again, and output and keystrokes go on through the same console."""
    [qemu] = qemu_processes(DOMAIN)
    with client(clab) as console:
        assert console("open") == "opened"
        round_trip(console)
        for service in ("host-rexec", "dpu-rexec"):
            for crash in (False, True):
                clab.restart_service(service, crash=crash)
                round_trip(console)
                assert virsh.state(DOMAIN) == "running", service
        assert console("close") == "closed"
    assert [p.pid for p in qemu_processes(DOMAIN)] == [qemu.pid]


# -- the host's rule: only its own program's ptys -------------------------------------------

#: The program the DPU runs: it makes a pty, says its number, and reports what arrives on it.
PROGRAM = r"""
import fcntl, os, struct, sys, tty
master, slave = os.openpty()
tty.setraw(slave)  # kept open: the master's reads wait for bytes instead of failing
number = struct.unpack("I", fcntl.ioctl(master, 0x80045430, b"\0" * 4))[0]
print(number, flush=True)
while True:
    try:
        data = os.read(master, 4096)
    except OSError:
        break
    print("got", data.decode().strip(), flush=True)
"""

#: A program that says its pty's number and exits a second later, leaving a child
#: that keeps writing to the session's output, so the session outlives the program.
SHORT_PROGRAM = r"""
import fcntl, os, struct, sys, time
master, slave = os.openpty()
number = struct.unpack("I", fcntl.ioctl(master, 0x80045430, b"\0" * 4))[0]
print(number, flush=True)
if os.fork() == 0:
    os.close(master)
    os.close(slave)
    for _ in range(60):
        print("tick", flush=True)
        time.sleep(0.1)
    os._exit(0)
time.sleep(1)
"""


@pytest.fixture
def server_tree(tmp_path: Path) -> Path:
    pki.init(tmp_path / "pki", pki.HOST_AND_DPU)
    whitelist = tmp_path / "whitelist"
    whitelist.write_text(f"{os.path.realpath(sys.executable)}\n")
    whitelist.chmod(0o400)
    return tmp_path


class RawPeer:
    """A DPU's connection to the in-process host server, speaking the raw rexec protocol."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.conn = RexecConnection(Role.CLIENT)
        self.events: list = []
        self.started: Started | None = None

    @classmethod
    async def connect(cls, tree: Path, attach: str = "", node: str = "dpu") -> RawPeer:
        connected = await Transport(TlsConfig.load(tree / "pki" / node)).connect(
            parse_address(f"unix://{tree}/peer.sock")
        )
        peer = cls(connected.stream)
        await peer.stream.send_all(peer.conn.send(Hello(node, attach=attach)))
        await peer.next_of(Hello)
        return peer

    async def next_of(self, kind: type, channel: int | None = None, timeout: float = 20):  # type: ignore[no-untyped-def]
        with trio.fail_after(timeout):
            while True:
                for event in self.events:
                    if isinstance(event, kind) and (channel is None or getattr(event, "channel", None) == channel):
                        self.events.remove(event)
                        return event
                if any(isinstance(event, Closed) for event in self.events):
                    raise EOFError(f"the server closed the connection before a {kind.__name__}")
                try:
                    data = bytes(await self.stream.receive_some())
                except trio.BrokenResourceError:
                    data = b""
                self.conn.receive_data(data)
                while (event := self.conn.next_event()) is not NEED_DATA:
                    self.events.append(event)
                    if isinstance(event, Closed | Attached):
                        break

    async def run_pty_program(self, program: str) -> tuple[int, int]:
        """Run ``program`` (which prints the number of a pty it holds) on this session: its pid and that number."""
        request = ExecRequest(
            argv=(os.path.realpath(sys.executable), "-c", program),
            user="root",
            fds=(FdSpec(fd=1, kind=FdKind.PIPE_OUT, channel=1),),
        )
        await self.stream.send_all(self.conn.send(Exec(request)))
        self.started = await self.next_of(Started)
        pid = self.started.pid
        return pid, int((await self.next_of(Data, 1)).data.split()[0])

    async def ticket_for_its_pty(self, program: str) -> tuple[int, str]:
        """Run ``program`` and ask for a ticket for the pty it holds: its pid and the ticket."""
        pid, own = await self.run_pty_program(program)
        await self.stream.send_all(self.conn.send(OpenPty(FIRST_BRIDGE_CHANNEL, own)))
        return pid, (await self.next_of(Ticket, FIRST_BRIDGE_CHANNEL)).token

    async def refused(self) -> bool:
        """True when the server closes this pty connection without taking its ticket."""
        try:
            await self.next_of(Attached)
        except EOFError:
            return True
        return False


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the whitelist must be root-owned")
async def test_the_dpu_gets_only_its_programs_ptys(server_tree: Path, nursery: trio.Nursery) -> None:
    await nursery.start(serve, _server_config(server_tree), Transport(TlsConfig.load(server_tree / "pki" / "host")))
    # A pty of the host that the DPU's program does not hold: the test's own,
    # its other end held open so that anything written there would wait to be read.
    theirs, their_end = os.openpty()
    tty.setraw(their_end)
    os.set_blocking(theirs, False)
    os.set_blocking(their_end, False)
    their_index = int(os.readlink(f"/proc/self/fd/{their_end}").rsplit("/", 1)[1])
    session = await RawPeer.connect(server_tree)
    try:
        _, own = await session.run_pty_program(PROGRAM)
        # Another process's pty: refused, no ticket.
        refused, other, spare = FIRST_BRIDGE_CHANNEL, FIRST_BRIDGE_CHANNEL + 1, FIRST_BRIDGE_CHANNEL + 2
        await session.stream.send_all(session.conn.send(OpenPty(refused, their_index)))
        reset = await session.next_of(Reset, refused)
        assert "pty" in reset.reason
        # The program's own pty: a ticket, good for one connection by this peer.
        await session.stream.send_all(session.conn.send(OpenPty(other, own)))
        ticket = (await session.next_of(Ticket, other)).token
        await session.stream.send_all(session.conn.send(OpenPty(spare, own)))
        unused = (await session.next_of(Ticket, spare)).token
        os.write(theirs, b"victim-secret\r")  # what a relay of their pty would read
        # A guessed ticket opens nothing.
        guessed = await RawPeer.connect(server_tree, attach=secrets.token_hex(TICKET_BYTES))
        assert await guessed.refused()
        # The ticket: the pty's bytes reach the program.
        console = await RawPeer.connect(server_tree, attach=ticket)
        await console.next_of(Attached)
        assert not console.conn.leftover()
        await console.stream.send_all(udsproxy_wire.data_header(udsproxy_wire.DATA_CHANNEL, 6) + b"hello\r")
        got = await session.next_of(Data, 1)
        assert got.data.decode().strip() == "got hello"
        # Used once: the same ticket again opens nothing.
        again = await RawPeer.connect(server_tree, attach=ticket)
        assert await again.refused()
        # The session ends (its caller is gone): its unused ticket opens nothing either.
        await session.stream.send_all(session.conn.send(Hangup()))
        await session.stream.aclose()
        await trio.sleep(0.5)
        late = await RawPeer.connect(server_tree, attach=unused)
        assert await late.refused()
        # Nothing of their pty was read by anyone: it still waits there.
        assert os.read(their_end, 4096) == b"victim-secret\r"
        with pytest.raises(BlockingIOError):
            os.read(theirs, 4096)
    finally:
        os.close(theirs)
        os.close(their_end)


def _server_config(server_tree: Path) -> RexecConfig:
    return RexecConfig(
        listen=(f"unix://{server_tree}/peer.sock",),
        whitelist=str(server_tree / "whitelist"),
        run_dir=str(server_tree / "run"),
        node="host",
        keepalive=5.0,
        user_map=("root=root",),
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the whitelist must be root-owned")
async def test_a_ticket_opens_nothing_once_its_program_has_exited(server_tree: Path, nursery: trio.Nursery) -> None:
    await nursery.start(serve, _server_config(server_tree), Transport(TlsConfig.load(server_tree / "pki" / "host")))
    session = await RawPeer.connect(server_tree)
    try:
        pid, ticket = await session.ticket_for_its_pty(SHORT_PROGRAM)
        # The program exits and is reaped; its child keeps the session open.
        with trio.fail_after(10):
            while os.path.exists(f"/proc/{pid}"):
                await trio.sleep(0.05)
        late = await RawPeer.connect(server_tree, attach=ticket)
        assert await late.refused()
        assert not any(isinstance(event, Exited) for event in session.events)
    finally:
        await session.stream.aclose()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the whitelist must be root-owned")
async def test_a_session_holds_a_bounded_number_of_unused_tickets(server_tree: Path, nursery: trio.Nursery) -> None:
    await nursery.start(serve, _server_config(server_tree), Transport(TlsConfig.load(server_tree / "pki" / "host")))
    session = await RawPeer.connect(server_tree)
    try:
        _, own = await session.run_pty_program(PROGRAM)
        channels = range(FIRST_BRIDGE_CHANNEL, FIRST_BRIDGE_CHANNEL + attached.MAX_TICKETS + 1)
        for channel in channels:
            await session.stream.send_all(session.conn.send(OpenPty(channel, own)))
        tickets = [(await session.next_of(Ticket, channel)).token for channel in channels[:-1]]
        reset = await session.next_of(Reset, channels[-1])
        assert "too many" in reset.reason
        # A ticket used frees its place.
        console = await RawPeer.connect(server_tree, attach=tickets[0])
        await console.next_of(Attached)
        await session.stream.send_all(session.conn.send(OpenPty(channels[-1] + 1, own)))
        await session.next_of(Ticket, channels[-1] + 1)
    finally:
        await session.stream.aclose()


def test_a_ticket_nobody_presents_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    """An attach that failed on the way must not hold one of its session's tickets for good."""
    monkeypatch.setattr(attached, "TICKET_LIFETIME", 0.05)
    grants = attached.Grants()
    grants.open_session(1)
    grant = attached.Grant(1, None, "dpu", pty=0)  # no program: nothing is opened here
    tokens = [grants.issue(grant) for _ in range(attached.MAX_TICKETS)]
    assert all(tokens)
    assert grants.issue(grant) is None  # the session holds all it may
    time.sleep(0.1)
    assert grants.take(tokens[0]) is None  # expired: opens nothing
    assert grants.issue(grant) is not None  # and the session may ask again


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the whitelist must be root-owned")
async def test_a_ticket_opens_nothing_for_another_peer(server_tree: Path, nursery: trio.Nursery) -> None:
    """A ticket is bound to the peer whose session asked for it: another DPU that learned it gets nothing."""
    pki.init(server_tree / "pki", [pki.Identity("dpu", "dpu2")])  # another DPU, with a valid certificate
    await nursery.start(serve, _server_config(server_tree), Transport(TlsConfig.load(server_tree / "pki" / "host")))
    session = await RawPeer.connect(server_tree)
    try:
        _, ticket = await session.ticket_for_its_pty(PROGRAM)
        thief = await RawPeer.connect(server_tree, attach=ticket, node="dpu2")
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            # Typed into the pty, were it relayed: the program would answer on the session.
            await thief.stream.send_all(udsproxy_wire.data_header(udsproxy_wire.DATA_CHANNEL, 6) + b"stolen\r")
        assert await thief.refused()
        with pytest.raises(trio.TooSlowError):
            await session.next_of(Data, 1, timeout=2)  # the program read nothing
    finally:
        await session.stream.aclose()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the whitelist must be root-owned")
async def test_a_session_is_resumed_only_by_its_peer_with_its_secret(server_tree: Path, nursery: trio.Nursery) -> None:
    """A session whose link was lost waits for its own DPU: another DPU with a valid certificate that learned
    its name and secret, or its own DPU with a wrong secret, get a refusal and leave it as it was; its own
    DPU with its secret carries it on, and its Hangup then ends the program at once."""
    pki.init(server_tree / "pki", [pki.Identity("dpu", "dpu2")])
    await nursery.start(serve, _server_config(server_tree), Transport(TlsConfig.load(server_tree / "pki" / "host")))
    session = await RawPeer.connect(server_tree)
    pid, _ = await session.run_pty_program(PROGRAM)
    assert session.started is not None and session.started.session and session.started.secret
    name, secret = session.started.session, session.started.secret
    await session.stream.aclose()  # the link is lost, without a word
    wrong = "0" * len(secret) if secret != "0" * len(secret) else "1" * len(secret)
    for node, given in (("dpu2", secret), ("dpu", wrong)):
        intruder = await RawPeer.connect(server_tree, node=node)
        await intruder.stream.send_all(intruder.conn.send(Resume(name, given, (1,))))
        assert "no session" in (await intruder.next_of(Refused)).reason
        await intruder.stream.aclose()
        assert not gone(pid), node  # refused, and the program was left running
    owner = await RawPeer.connect(server_tree)
    await owner.stream.send_all(owner.conn.send(Resume(name, secret, (1,))))
    assert (await owner.next_of(Resumed)).pid == pid
    await owner.stream.send_all(owner.conn.send(Hangup()))
    await wait_for_async(lambda: gone(pid))
    await owner.stream.aclose()


async def wait_for_async(condition, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.05)
