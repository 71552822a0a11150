"""One rexec connection at run time: `SessionLink` drives a `RexecConnection` over an authenticated stream.

Its receiving task never blocks on a local consumer (ARCHITECTURE.md): a stalled reader of one channel (a
slow virtlogd, a QMP client that stopped reading) stalls neither another channel nor the keepalives, which
go a quarter of the timeout apart.  Control events are queued for the session logic.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
from dataclasses import dataclass, field

import trio

from offload import aio
from offload.errors import LinkLost, RemoteProtocolError, TransportError
from offload.fdio import CHUNK, ByteEnd
from offload.net import Connected, TlsStream, translate_errors
from offload.protocol.rexec import (
    MAX_DATA_CHUNK,
    NEED_DATA,
    SESSION_EVENTS,
    Closed,
    Data,
    Eof,
    Event,
    Exec,
    Hello,
    Open,
    OpenPty,
    Ping,
    Pong,
    Reset,
    RexecConnection,
    Role,
    State,
    Ticket,
    Window,
)

log = logging.getLogger(__name__)

#: Bridged connections one session may have open at once.
MAX_OPEN_CHANNELS = 1024
#: What a local end raises once its other side is gone.
_GONE = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)


@dataclass(frozen=True)
class LinkFailed:
    """Delivered on `SessionLink.control` when the link broke; ``error`` says how."""

    error: Exception


@dataclass
class ChannelState:
    chunks: collections.deque[bytes] = field(default_factory=collections.deque)
    eof: bool = False  # the peer will send no more
    reset: bool = False  # dead both ways
    changed: trio.Event = field(default_factory=trio.Event)
    drained: trio.Event = field(default_factory=trio.Event)  # pump_in delivered its last byte
    #: The outbound pump's read of its local source, while it waits.
    reading: trio.CancelScope | None = None
    #: The answer to Open or OpenPty: the ticket for a connection of its own, and the peer's number for it.
    ticket: str | None = None
    conn: int = 0
    #: Bytes the outbound pump took from its local source: progress, as a watchdog sees it.
    read: int = 0

    def wake(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def kill(self) -> None:
        """Dead both ways: a read of the local source that waits ends too (a client waiting
        for an answer that will never come gets its end of file)."""
        self.reset = True
        if self.reading is not None:
            self.reading.cancel()
        self.wake()


class SessionLink:
    def __init__(self, connected: Connected, role: Role, node: str, *, keepalive: float) -> None:
        self.stream = connected.stream
        self.peer = connected.peer
        self.node = node
        self.conn = RexecConnection(role, keepalive=keepalive, ping_every=keepalive / 4, now=trio.current_time())
        self.keepalive = keepalive
        self._send_lock = trio.Lock()
        self._channels: dict[int, ChannelState] = {}
        self._control_send, self.control = trio.open_memory_channel[Event | LinkFailed](math.inf)
        self.failure: Exception | None = None
        self.closed = False
        # Sessions follow one another on a connection and reuse channel
        # numbers (fd + 1).  A relay of the last session may still be in its
        # cleanup when the next Exec arrives; the generation keeps it from
        # touching the new session's channels.
        self.generation = 0

    # -- plumbing --------------------------------------------------------------

    async def send(self, event: Event) -> None:
        """Send one event.

        Channel events never raise transport errors: a broken link is
        reported once, by `run`, as LinkFailed on ``control``; the pumps just
        stop.  After the session ended they are not sent at all (the peer
        would drop them).  A control event on a failed connection is a
        TransportError, as on a broken stream.
        """
        if isinstance(event, SESSION_EVENTS):
            async with self._send_lock:
                # Checked under the lock: Exited may arrive while we wait for it.
                if self.conn.state is not State.RUNNING or self.failure or self.conn.error:
                    return
                parts: tuple[bytes, ...]
                if isinstance(event, Data):  # the payload goes as it is, not copied into a frame
                    self.conn.window(event.channel).sent(len(event.data))
                    parts = (self.conn.send_header(Data, event.channel, len(event.data)), event.data)
                else:
                    parts = (self.conn.send(event),)
                with contextlib.suppress(TransportError):
                    await self._send_bytes(*parts)
            return
        if isinstance(event, Exec):
            self._new_session()
        async with self._send_lock:
            if self.conn.error is not None:
                raise TransportError(f"link to {self.peer} failed: {self.conn.error}", address=self.peer)
            await self._send_bytes(self.conn.send(event))

    async def _send_bytes(self, *parts: bytes) -> None:
        with translate_errors(self.peer, "sending to"):
            if len(parts) > 1 and isinstance(self.stream, TlsStream):
                await self.stream.send_parts(parts)
            else:
                for part in parts:
                    await self.stream.send_all(part)

    async def handshake(self) -> Hello:
        """Exchange Hello frames; return the peer's."""
        await self.send(Hello(self.node))
        while self.conn.peer_hello is None:
            await self._receive_once()
        return self.conn.peer_hello

    async def _receive_once(self) -> bool:
        with translate_errors(self.peer, "receiving from"):
            data = await self.stream.receive_some(MAX_DATA_CHUNK + 64)
        self.conn.heard(trio.current_time())
        self.conn.receive_data(data)
        while (event := self.conn.next_event()) is not NEED_DATA:
            await self._dispatch(event)
            if isinstance(event, Closed):
                return False
        return True

    @property
    def alive(self) -> bool:
        return self.failure is None and self.conn.error is None and not self.closed

    def ready_for_session(self) -> bool:
        """Whether a new session may start on this link: alive, between sessions, nothing of the last left.

        What the last session's owner did not read from ``control`` goes
        here: an Exited that arrived as its stand-in went away (the session
        was cancelled before it read it) would otherwise be taken by the
        next session for the answer to its own Exec.  Nothing else can be
        queued between sessions (the connection drops a session's late
        frames in DONE) but the link's end: a Closed queued before ``run``
        has finished, which makes the link unfit too.
        """
        if not self.alive or self.conn.state not in (State.IDLE, State.DONE):
            return False
        while True:
            try:
                event = self.control.receive_nowait()
            except trio.WouldBlock:
                return True
            if isinstance(event, Closed | LinkFailed):
                return False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Receive and keep alive until the link ends; never raises (but Cancelled).

        Failures (lost link, broken stream, protocol violations, and bugs in
        handling what arrived) end this link only: they are logged and
        delivered as `LinkFailed` on ``control``, so whoever owns the session
        now hears of them, even when this task was started by someone else (a
        warm pool, in the daemon's own nursery).
        """
        try:
            async with aio.open_nursery() as nursery:
                nursery.start_soon(self._keepalive)
                task_status.started()
                while await self._receive_once():
                    pass
                nursery.cancel_scope.cancel()
        except aio.LINK_FAILURES as exc:
            if self.conn.state is State.DONE:
                # The session is over; the peer may drop the stream without
                # ceremony (no TLS close_notify).  Nothing was lost.
                self._control_send.send_nowait(Closed())
            elif not self.closed:
                log.warning("link to %s: %s", self.peer, exc)
                self._fail(exc)
        except Exception as exc:
            log.exception("link to %s failed with an internal error", self.peer)
            self._fail(exc)
        finally:
            self.closed = True
            # Nothing more arrives: a pump or a ticket waiting on a channel of this link ends.
            for state in self._channels.values():
                state.kill()

    def _fail(self, exc: Exception) -> None:
        self.failure = exc
        self._control_send.send_nowait(LinkFailed(exc))

    async def _keepalive(self) -> None:
        while True:
            await trio.sleep_until(self.conn.deadline)
            try:
                ping = self.conn.poll(trio.current_time())
            except LinkLost as exc:
                raise LinkLost(f"link to {self.peer} lost: {exc}", address=self.peer) from None
            if not ping:
                continue
            # A send cancelled halfway leaves part of a TLS record on the
            # stream, and the peer would fail the link later on a bad record:
            # the ping gets the whole period, and a link that cannot take it
            # in that time is lost (then nothing more is sent on it).
            with trio.move_on_after(self.keepalive) as waited:
                async with self._send_lock:
                    await self._send_bytes(ping)
            if waited.cancelled_caught:
                raise LinkLost(
                    f"link to {self.peer} lost: a keepalive could not be sent for {self.keepalive:.1f} s",
                    address=self.peer,
                )

    async def _dispatch(self, event: Event) -> None:
        match event:
            case Hello() | Pong():
                pass  # a Hello is recorded by the connection, and the handshake waits for it
            case Ping(token):
                await self.send(Pong(token))
            case Data(channel, data):
                # Data may arrive before our relay for the channel starts.
                state = self._channels.setdefault(channel, ChannelState())
                if not state.reset:
                    state.chunks.append(data)
                    state.wake()
                elif data:
                    # Nobody will consume it; give the window back at once.
                    await self._give_back(channel, len(data))
            case Eof(channel):
                state = self._channels.setdefault(channel, ChannelState())
                state.eof = True
                state.wake()
            case Window(channel):
                if channel in self._channels:
                    self._channels[channel].wake()
            case Ticket(channel, token, conn):
                if channel in self._channels:
                    self._channels[channel].ticket = token
                    self._channels[channel].conn = conn
                    self._channels[channel].wake()
            case Reset(channel, reason):
                log.debug("channel %d reset by peer: %s", channel, reason)
                self._channels.setdefault(channel, ChannelState()).kill()
            case Open(channel) | OpenPty(channel):
                if len(self._channels) >= MAX_OPEN_CHANNELS:
                    raise RemoteProtocolError(f"more than {MAX_OPEN_CHANNELS} channels open")
                self.add_channel(channel)
                self._control_send.send_nowait(event)
            case Exec():
                self._new_session()
                self._control_send.send_nowait(event)
            case Closed():
                self.closed = True  # not alive from now, for whoever reads this first
                self._control_send.send_nowait(event)
            case _:
                self._control_send.send_nowait(event)

    def _new_session(self) -> None:
        self._channels.clear()
        self.generation += 1

    async def _give_back(self, channel: int, count: int, generation: int | None = None) -> None:
        if generation is not None and generation != self.generation:
            return  # a window for a session that is over
        window = self.conn.windows.get(channel)
        increment = window.consumed(count) if window is not None else 0
        if increment:
            await self.send(Window(channel, increment))

    # -- channels ----------------------------------------------------------------

    def add_channel(self, channel: int) -> ChannelState:
        self.conn.open_channel(channel)
        state = self._channels.setdefault(channel, ChannelState())
        if self.closed:
            state.kill()  # nothing will arrive on it: whoever waits on it must not wait forever
        return state

    def finish_inbound(self) -> None:
        """The peer has said its last word: every channel's input ends after its buffer."""
        for state in self._channels.values():
            state.eof = True
            state.wake()

    def drop_channel(self, channel: int) -> None:
        self._channels.pop(channel, None)
        self.conn.close_channel(channel)

    async def pump_out(self, channel: int, source: ByteEnd, done: trio.Event | None = None) -> None:
        """Local source -> peer, within the channel's window, then Eof (or Reset); sets ``done`` after."""
        try:
            state = self._channels[channel]
            while True:
                while not state.reset and self.conn.send_credit(channel) <= 0:
                    await state.changed.wait()
                if state.reset:
                    return
                with trio.CancelScope() as state.reading:
                    try:
                        data = await source.read(min(self.conn.send_credit(channel), CHUNK))
                        state.read += len(data)
                    except OSError as exc:
                        await self.send(Reset(channel, f"read failed: {os.strerror(exc.errno or 0)}"))
                        return
                    finally:
                        state.reading = None
                if state.reset:
                    return
                if not data:
                    await self.send(Eof(channel))
                    return
                await self.send(Data(channel, data))
        finally:
            if done is not None:
                done.set()

    async def pump_in(self, channel: int, sink: ByteEnd) -> None:
        """Peer -> local sink, granting window as the sink takes the bytes."""
        state = self._channels[channel]
        generation = self.generation
        try:
            while True:
                if state.chunks:
                    data = state.chunks.popleft()
                    try:
                        await sink.write(data)
                    except _GONE:
                        state.kill()
                        state.chunks.clear()
                        await self.send(Reset(channel, "reader closed"))
                        return
                    await self._give_back(channel, len(data), generation)
                elif state.eof:
                    with contextlib.suppress(*_GONE):
                        await sink.shutdown_write()
                    return
                elif state.reset:
                    return
                else:
                    await state.changed.wait()
        finally:
            state.drained.set()

    async def wait_drained(self, channel: int) -> None:
        """Until everything received on ``channel`` reached its local sink."""
        state = self._channels.get(channel)
        if state is not None:
            await state.drained.wait()

    async def relay(
        self,
        channel: int,
        end: ByteEnd,
        *,
        inbound: bool,
        outbound: bool,
        outbound_done: trio.Event | None = None,
    ) -> None:
        """Run the pumps of one channel and close ``end`` when they are done.

        ``outbound_done`` is set once everything read from ``end`` was sent,
        with the Eof behind it: the session's end must not overtake it.
        """
        generation = self.generation
        self.add_channel(channel)
        try:
            async with aio.open_nursery() as nursery:
                if outbound:
                    nursery.start_soon(self.pump_out, channel, end, outbound_done)
                if inbound:
                    nursery.start_soon(self.pump_in, channel, end)
        finally:
            with trio.CancelScope(shield=True), contextlib.suppress(*_GONE):
                await end.aclose()
            if generation == self.generation:
                self.drop_channel(channel)

    async def aclose(self) -> None:
        self.closed = True
        with contextlib.suppress(TransportError, *_GONE):
            await trio.aclose_forcefully(self.stream)
