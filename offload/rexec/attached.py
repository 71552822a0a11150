"""Connections of their own beside a session's link, for a program's ptys and bridged connections.

On the link every message costs several trio turns in both daemons, too many for a console's
keystroke and its echo or for libvirt's hundreds of monitor round trips: each goes on a connection
of its own, relayed by a thread on each side.  The agent asks on the session's link (`OpenPty`,
`Open`); the host checks the request against the session's program and answers with a ticket
(`Ticket`): a random token, for that pty or bridged listener of that session, for one use, by the
peer that session's link authenticated.  The agent presents it in the Hello of a connection of its
own; the host opens the local end (the pty again from the program's master,
`ptys.program_pty_peer`; or a connection to the bridged listener) and answers `Attached`.

Ownership: the host's grants live in `Grants`, one per rexec_server; a session's unused tickets are
revoked and its relays stopped when it ends.  The relay threads run in the task that serves the
connection, so a stopped daemon stops them too; each relay closes its local end and its connection.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import itertools
import logging
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import trio

from offload import fdpass, ptys, users
from offload.errors import TransportError
from offload.net import Address, TlsStream, Transport, translate_errors
from offload.protocol.rexec import NEED_DATA, TICKET_BYTES, Attached, Closed, Hello, RexecConnection, Role
from offload.rexec.console import MAX_PTYS
from offload.rexec.keep import Keep
from offload.udsproxy.relay import Relay, detach, run_in_thread

log = logging.getLogger(__name__)

#: How long the agent waits for the host to take its ticket.
ATTACH_TIMEOUT = 10.0
#: Unused tickets one session may hold at once: one for each pty the agent maps, and as
#: many bridged connections being attached.
MAX_TICKETS = 2 * MAX_PTYS
#: A ticket not presented within this long opens nothing: an attach that failed on the way
#: (a timeout, a refused connection) must not hold one of its session's tickets for good.
TICKET_LIFETIME = 2 * ATTACH_TIMEOUT


class Program(Protocol):
    """A session's program as a grant sees it (`trio.Process`, or one a restarted server adopted)."""

    @property
    def pid(self) -> int: ...
    @property
    def returncode(self) -> int | None: ...


class BridgedEnds:
    """A session's connections to its program's bridged listeners, by number, held across lost links.

    Each relay gets a copy: a relay whose link was lost leaves the
    connection open for the next (qemu never sees its monitor client go),
    and the fd store keeps it across a restart of the server (``keep``).
    """

    def __init__(self, keeping: Keep, held: dict[int, int] | None = None) -> None:
        self.keep = keeping
        self._held = {conn: socket.socket(fileno=fd) for conn, fd in (held or {}).items()}
        self._numbers = itertools.count(max(self._held, default=0) + 1)

    def number(self) -> int:
        """A number for a new connection."""
        return next(self._numbers)

    def holds(self, conn: int) -> bool:
        return conn in self._held

    def open(self, conn: int, path: str) -> socket.socket:
        """A copy of connection ``conn``, made to ``path`` if it is new; OSError says why not."""
        held = self._held.get(conn)
        if held is None:
            held = _connect(path)
            self._held[conn] = held
            self.keep.keep(f"b{conn}", held.fileno())
        return held.dup()

    def ended(self, conn: int, *, again: bool) -> None:
        """The relay of ``conn`` ended; unless it may be ``again`` attached, the connection is closed."""
        held = self._held.get(conn)
        if held is not None and not again:
            del self._held[conn]
            held.close()
            self.keep.drop(f"b{conn}")

    def close(self) -> None:
        """Our copies go; the fd store's, if any, stay for the next server."""
        for held in self._held.values():
            held.close()
        self._held.clear()


@dataclasses.dataclass(eq=False)
class Grant:
    """What a ticket opens, for ``peer`` only: pty ``pty`` of the program ``process`` of session
    ``session``, or connection ``conn`` (of ``ends``) to its bridged listener at ``bridge`` (ours),
    carrying fds as ``user``.

    Only while that program runs: once reaped, its pid may name another process.
    """

    session: int
    process: Program
    peer: str
    pty: int = -1
    bridge: str = ""
    user: users.RemoteUser | None = None
    shared: tuple[str, ...] = ()
    conn: int = 0
    ends: BridgedEnds | None = None

    @property
    def what(self) -> str:
        return f"pty {self.pty}" if self.bridge == "" else f"bridged listener {self.bridge}"


class Grants:
    """The host's outstanding tickets and the relays they became, by session."""

    def __init__(self) -> None:
        self._tickets: dict[str, tuple[Grant, float]] = {}  # token -> grant, when it expires
        self._relays: dict[int, set[Relay]] = {}
        #: The server stops (SIGTERM) and pauses its relays: no ticket opens anything from now on, and
        #: no request for one is answered; a session kept in the fd store leaves its program running.
        self.stopping = False

    def issue(self, grant: Grant) -> str | None:
        """A ticket for ``grant``; None if its session already holds `MAX_TICKETS` unused ones."""
        now = time.monotonic()
        for token, (_, expires) in list(self._tickets.items()):
            if expires <= now:
                del self._tickets[token]
        if sum(1 for held, _ in self._tickets.values() if held.session == grant.session) >= MAX_TICKETS:
            return None
        token = secrets.token_hex(TICKET_BYTES)
        self._tickets[token] = (grant, now + TICKET_LIFETIME)
        return token

    def take(self, token: str) -> Grant | None:
        """The grant of ``token``, which is used up by this (None if there is none, or it expired)."""
        grant, expires = self._tickets.pop(token, (None, 0.0))
        return grant if expires > time.monotonic() and not self.stopping else None

    def revoke_tickets(self, session: int) -> None:
        """Session ``session``'s unused tickets open nothing from now on (its program has exited)."""
        for token, (grant, _) in list(self._tickets.items()):
            if grant.session == session:
                del self._tickets[token]

    def revoke(self, session: int) -> None:
        """Session ``session`` ended: its tickets open nothing, and its relays stop."""
        self.revoke_tickets(session)
        for relay in self._relays.pop(session, set()):
            relay.stop()

    def open_session(self, session: int) -> None:
        """Tickets of ``session`` may be issued and used from now until `revoke`."""
        self._relays.setdefault(session, set())

    def alive(self, session: int) -> bool:
        return session in self._relays

    def bridged(self, session: int) -> list[Relay]:
        """Session ``session``'s relays of bridged connections (those carry fds; a pty's does not)."""
        return [relay for relay in self._relays.get(session, ()) if relay.user is not None]

    def add(self, session: int, relay: Relay) -> bool:
        """Stop ``relay`` with ``session``; False if the session already ended."""
        relays = self._relays.get(session)
        if relays is None:
            return False
        relays.add(relay)
        return True

    def discard(self, session: int, relay: Relay) -> None:
        self._relays.get(session, set()).discard(relay)

    def relays(self) -> list[Relay]:
        """Every relay of every session."""
        return [relay for relays in self._relays.values() for relay in relays]


async def pause_all(relays: Iterable[Relay], timeout: float) -> None:
    """Pause each relay (`Relay.pause`: nothing in flight is lost) and wait for them to end, ``timeout`` at most."""
    relays = list(relays)
    for relay in relays:
        relay.pause()
    deadline = trio.current_time() + timeout
    for relay in relays:
        left = deadline - trio.current_time()
        if left <= 0 or not await waited(relay.ended, left):
            log.warning("%s: not paused within %.1f s; it ends as it is", relay.name, timeout)


async def waited(event: threading.Event, timeout: float) -> bool:
    """Whether a relay's thread set ``event`` within ``timeout``.  Waited for in a thread that is abandoned if
    we are cancelled, with a limiter of its own: these waits take none of the threads trio's others share."""
    return await trio.to_thread.run_sync(event.wait, timeout, abandon_on_cancel=True, limiter=trio.CapacityLimiter(1))


def who(peer: str, stream: object) -> str:
    """The peer as a ticket binds it: the node its certificate names (without TLS, the address's host)."""
    return peer if isinstance(stream, TlsStream) else peer.rsplit(":", 1)[0]


def close_local(local: ptys.PtyEnd | socket.socket) -> None:
    """Close a local end that will not be relayed.  A socket's client reads an end of file:
    closed with bytes unread, it would read a reset instead."""
    if isinstance(local, socket.socket):
        with contextlib.suppress(OSError):
            local.shutdown(socket.SHUT_WR)
            local.setblocking(False)
            while local.recv(1 << 16):
                pass
    local.close()


def _open_local(grant: Grant) -> ptys.PtyEnd | socket.socket:
    """The host's end of what ``grant`` opens; OSError says why not."""
    if grant.bridge == "":
        return ptys.PtyEnd(ptys.program_pty_peer(grant.process.pid, grant.pty), console=False)
    assert grant.ends is not None  # a bridged listener's grant holds its connections
    return grant.ends.open(grant.conn, grant.bridge)


def _connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
    try:
        # Non-blocking: a program that stopped accepting (its backlog full) refuses, it does not stall us.
        sock.connect(path)
    except BlockingIOError:
        sock.close()
        raise OSError(errno.EAGAIN, "the program does not accept connections", path) from None
    except BaseException:
        sock.close()
        raise
    return sock


async def serve_attach(stream: trio.abc.Stream, peer: str, conn: RexecConnection, token: str, grants: Grants) -> None:
    """The host's side: the connection whose Hello presented ``token`` becomes that relay, or is closed."""
    grant = grants.take(token)
    if grant is None or not grants.alive(grant.session):
        log.warning("attached connection from %s: its ticket opens nothing (used, revoked, or never issued)", peer)
        return
    if who(peer, stream) != grant.peer:
        log.warning("attached connection from %s: the ticket was issued to %s; refused", peer, grant.peer)
        return
    # No await from this check to the open: the pid cannot be reaped and reused in between.
    # `trio.Process.returncode` polls: the program is reaped by this check if it has exited.
    # (A bridged listener is a path of ours, named by no pid: a daemon the program left holds it.)
    if grant.bridge == "" and grant.process.returncode is not None:
        log.warning("session %d: %s not opened for %s: the program has exited", grant.session, grant.what, peer)
        return
    try:
        local = _open_local(grant)
    except OSError as exc:
        log.warning("session %d: %s no longer opens for %s: %s", grant.session, grant.what, peer, exc)
        return
    bridged = grant.bridge != ""
    relay: Relay | None = None
    try:
        with translate_errors(peer, "sending to"):
            await stream.send_all(conn.send(Attached()))
        # Files the caller's program passes are re-opened as the program's user; its own are named from its root.
        relay = _relay(
            stream,
            local,
            client=False,
            name=f"session {grant.session} {grant.what}",
            shared=grant.shared,
            user=grant.user,
            root=fdpass.root_of(grant.process.pid) if bridged else "/",
            drop_uncarried=bridged,
        )
    finally:
        if relay is None:
            local.close()
    if not grants.add(grant.session, relay):
        relay.stop()  # the session ended meanwhile; run() still closes everything
    log.info("session %d: %s of pid %d relayed for %s", grant.session, grant.what, grant.process.pid, peer)
    try:
        await run_in_thread(relay)
    finally:
        grants.discard(grant.session, relay)
        if grant.ends is not None:
            grant.ends.ended(grant.conn, again=relay.link_lost or relay.stopped)


async def attach(
    transport: Transport,
    address: Address,
    node: str,
    token: str,
    local: ptys.PtyEnd | socket.socket,
    name: str,
    *,
    shared: tuple[str, ...] = (),
    user: users.RemoteUser | None = None,
    root: str = "/",
    rewrite: Callable[[bytes], bytes] | None = None,
) -> Relay:
    """The DPU's side: present ``token`` on a connection of its own; the Relay of ``local`` on it, to run.

    Owns ``local`` from the call on, on every path (then the relay does).
    The keywords are the Relay's: which fds a bridged connection carries
    and as whom, and how a monitor's replies are rewritten.
    """
    relay: Relay | None = None
    try:
        connected = await transport.connect(address)
        stream = connected.stream
        try:
            conn = RexecConnection(Role.CLIENT)
            with trio.fail_after(ATTACH_TIMEOUT), translate_errors(address, "attaching a connection at"):
                await stream.send_all(conn.send(Hello(node, attach=token)))
                while True:
                    event = conn.next_event()
                    if event is NEED_DATA:
                        conn.receive_data(await stream.receive_some(64 << 10))
                    elif isinstance(event, Attached):
                        break
                    elif isinstance(event, Closed):
                        raise TransportError(f"{address} refused the ticket", address=str(address))
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        relay = _relay(
            stream,
            local,
            client=True,
            leftover=conn.leftover(),
            name=name,
            shared=shared,
            user=user,
            root=root,
            rewrite=rewrite,
            drop_uncarried=user is not None,
        )
    finally:
        if relay is None:
            close_local(local)
    return relay


def _relay(stream: trio.abc.Stream, local: ptys.PtyEnd | socket.socket, **options: Any) -> Relay:
    """The `Relay` of ``local`` on ``stream``'s connection, which it takes over (closed if the Relay cannot be made)."""
    link, cipher = detach(stream)
    try:
        return Relay(link, cipher, local, **options)
    except BaseException:
        link.close()
        raise
