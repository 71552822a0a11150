"""A console's own connection between the two rexec daemons, relayed by a thread on each side.

A pty is not carried on the session's link: a keystroke and its echo would
each cost several trio turns in both daemons, on top of the log pipe qemu
writes the same bytes to.  Instead the DPU's agent asks on the session's
link for the program's pty (`OpenPty`); the host checks that the session's
program holds its master and answers with a ticket (`PtyTicket`): a random
token, for that pty of that session, for one use, by the peer that session's
link authenticated.  The agent opens a connection of its own to the host's
rexec_server and presents the ticket in its Hello; the host opens the pty
from the program's master again (`ptys.program_pty_peer`), answers
`PtyAttached`, and from then on both sides hand the connection to a
`Relay` thread with the pty as its local end (`ptys.PtyEnd`).

Ownership: the host's grants live in `PtyGrants`, one per rexec_server;
a session's unused tickets are revoked and its relays stopped when it ends.
The relay threads run in the task that serves the connection, so a stopped
daemon stops them too; each relay closes its pty and its connection itself.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets

import trio

from offload import ptys
from offload.errors import TransportError
from offload.net import Address, TlsStream, Transport, translate_errors
from offload.protocol.rexec import NEED_DATA, TICKET_BYTES, Closed, Hello, PtyAttached, RexecConnection, Role
from offload.rexec.console import MAX_PTYS
from offload.udsproxy.relay import Relay, detach, run_in_thread

log = logging.getLogger(__name__)

#: How long the agent waits for the host to take its ticket.
ATTACH_TIMEOUT = 10.0
#: Unused tickets one session may hold at once: one for each pty the agent maps.
MAX_TICKETS = MAX_PTYS


@dataclasses.dataclass(eq=False)
class PtyGrant:
    """What a ticket opens: pty ``index`` of the program ``process`` of session ``session``, for ``peer`` only.

    Only while that program runs: once reaped, its pid may name another process.
    """

    session: int
    process: trio.Process
    index: int
    peer: str


class PtyGrants:
    """The host's outstanding tickets and the relays they became, by session."""

    def __init__(self) -> None:
        self._tickets: dict[str, PtyGrant] = {}
        self._relays: dict[int, set[Relay]] = {}

    def issue(self, grant: PtyGrant) -> str | None:
        """A ticket for ``grant``; None if its session already holds `MAX_TICKETS` unused ones."""
        if sum(1 for held in self._tickets.values() if held.session == grant.session) >= MAX_TICKETS:
            return None
        token = secrets.token_hex(TICKET_BYTES)
        self._tickets[token] = grant
        return token

    def take(self, token: str) -> PtyGrant | None:
        """The grant of ``token``, which is used up by this (None if there is none)."""
        return self._tickets.pop(token, None)

    def revoke_tickets(self, session: int) -> None:
        """Session ``session``'s unused tickets open nothing from now on (its program has exited)."""
        for token, grant in list(self._tickets.items()):
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

    def add(self, session: int, relay: Relay) -> bool:
        """Stop ``relay`` with ``session``; False if the session already ended."""
        relays = self._relays.get(session)
        if relays is None:
            return False
        relays.add(relay)
        return True

    def discard(self, session: int, relay: Relay) -> None:
        self._relays.get(session, set()).discard(relay)


def who(peer: str, stream: object) -> str:
    """The peer as a ticket binds it: the node its certificate names (without TLS, the address's host)."""
    return peer if isinstance(stream, TlsStream) else peer.rsplit(":", 1)[0]


async def serve_attach(
    stream: trio.abc.Stream, peer: str, conn: RexecConnection, token: str, grants: PtyGrants
) -> None:
    """The host's side: the connection whose Hello presented ``token`` becomes that pty's relay, or is closed."""
    grant = grants.take(token)
    if grant is None or not grants.alive(grant.session):
        log.warning("pty connection from %s: its ticket opens nothing (used, revoked, or never issued)", peer)
        return
    if who(peer, stream) != grant.peer:
        log.warning("pty connection from %s: the ticket was issued to %s; refused", peer, grant.peer)
        return
    # No await from this check to the open: the pid cannot be reaped and reused in between.
    # `trio.Process.returncode` polls: the program is reaped by this check if it has exited.
    if grant.process.returncode is not None:
        log.warning("session %d: pty %d not opened for %s: the program has exited", grant.session, grant.index, peer)
        return
    try:
        fd = ptys.program_pty_peer(grant.process.pid, grant.index)
    except OSError as exc:
        log.warning("session %d: pty %d no longer opens for %s: %s", grant.session, grant.index, peer, exc)
        return
    end = ptys.PtyEnd(fd, console=False)
    relay: Relay | None = None
    try:
        with translate_errors(peer, "sending to"):
            await stream.send_all(conn.send(PtyAttached()))
        link, cipher = detach(stream)
        relay = Relay(link, cipher, end, client=False, name=f"session {grant.session} pty {grant.index}")
    finally:
        if relay is None:
            end.close()
    if not grants.add(grant.session, relay):
        relay.stop()  # the session ended meanwhile; run() still closes everything
    log.info("session %d: pty %d of pid %d relayed for %s", grant.session, grant.index, grant.process.pid, peer)
    try:
        await run_in_thread(relay)
    finally:
        grants.discard(grant.session, relay)


async def attach(transport: Transport, address: Address, node: str, token: str, end: ptys.PtyEnd, name: str) -> None:
    """The DPU's side: present ``token`` on a connection of its own, then relay ``end`` on it until either ends.

    Owns ``end`` from the call on, on every path.
    """
    relay: Relay | None = None
    try:
        connected = await transport.connect(address)
        stream = connected.stream
        try:
            conn = RexecConnection(Role.CLIENT)
            with trio.fail_after(ATTACH_TIMEOUT), translate_errors(address, "attaching a pty at"):
                await stream.send_all(conn.send(Hello(node, attach=token)))
                while True:
                    event = conn.next_event()
                    if event is NEED_DATA:
                        conn.receive_data(await stream.receive_some(64 << 10))
                    elif isinstance(event, PtyAttached):
                        break
                    elif isinstance(event, Closed):
                        raise TransportError(f"{address} refused the pty ticket", address=str(address))
            leftover = conn.leftover()
            link, cipher = detach(stream)
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        try:
            relay = Relay(link, cipher, end, client=True, leftover=leftover, name=name)
        except BaseException:
            link.close()
            raise
    finally:
        if relay is None:
            end.close()
    await run_in_thread(relay)
