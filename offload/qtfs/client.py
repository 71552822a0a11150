"""The DPU side's link to a qtfs server: one authenticated connection, requests multiplexed by id.

README.md ("qtfs", Reliability) says what a lost link costs a caller.  A
request in flight when the link went down is sent again only if its op is
idempotent (`offload.protocol.qtfs.IDEMPOTENT`) and path-based; open file
handles belong to one connection (`generation`).  ``on_invalidate`` gets the
server's Invalidates in wire order among the replies; ``on_reset`` is called
when the link is lost and when it is back: what the host changed meanwhile
was never announced.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import trio

from offload import aio
from offload.errors import ProtocolError, RemoteProtocolError, TransportError
from offload.net import Address, Transport, translate_errors
from offload.protocol import qtfs as wire
from offload.protocol.qtfs.messages import ReplyT

log = logging.getLogger(__name__)

RECEIVE_SIZE = 1 << 20
CONNECT_TIMEOUT = 5.0
#: How long a request may wait for its reply.  A server that leaves one
#: unanswered this long while answering pings is not trusted with the
#: link's state any more: the call fails with EIO and the link is
#: re-established.
REQUEST_TIMEOUT = 60.0


class LinkDown(OSError):
    """The link was lost while a request was in flight; its outcome is unknown."""

    def __init__(self) -> None:
        super().__init__(errno.EIO, "link to the qtfs server lost")


@dataclass(slots=True)
class _Waiter:
    event: trio.Event = field(default_factory=trio.Event)
    outcome: wire.Message | OSError | None = None


@dataclass
class _Connection:
    stream: trio.abc.Stream
    conn: wire.QtfsConnection
    generation: int
    lost: trio.Event
    next_id: int = 1


@dataclass(frozen=True)
class Mounted:
    root: wire.Attr
    readonly: bool
    server: str
    epoch: int
    watched: bool = False  # the server sends Invalidate for every change on the host
    open_checked: bool = False  # the server checks opens against rules: every open must ask it


class Link:
    def __init__(
        self,
        transport: Transport,
        address: Address,
        remote: bytes,
        *,
        node: str = "",
        keepalive: float = 6.0,
        reconnect_timeout: float | None = None,
        request_timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        self.transport = transport
        self.address = address
        self.remote = remote
        self.node = node or os.uname().nodename
        self.keepalive = keepalive
        self.reconnect_timeout = keepalive if reconnect_timeout is None else reconnect_timeout
        self.request_timeout = request_timeout
        self.mounted: Mounted | None = None
        self.generation = 0
        self._current: _Connection | None = None
        self._up = trio.Event()
        self._send_lock = trio.Lock()
        self._waiters: dict[int, _Waiter] = {}
        self.on_invalidate: Callable[[wire.Invalidate], None] = lambda invalidate: None
        self.on_reset: Callable[[], None] = lambda: None

    @property
    def is_up(self) -> bool:
        return self._current is not None

    # -- calls ------------------------------------------------------------------------------

    async def call(self, request: wire.Request[ReplyT], *, retry: bool | None = None) -> ReplyT:
        """Send ``request`` and return its reply; OSError (by the remote errno, or EIO) on failure.

        ``retry``: send again after a lost link (default: the op is idempotent).
        """
        return (await self.call_on(request, retry=retry))[0]

    async def call_on(self, request: wire.Request[ReplyT], *, retry: bool | None = None) -> tuple[ReplyT, int]:
        """`call`, also naming the connection (generation) that answered: handles belong to it."""
        if retry is None:
            retry = request.OP in wire.IDEMPOTENT
        deadline = trio.current_time() + self.reconnect_timeout
        while True:
            try:
                return await self._call_once(request, deadline)
            except LinkDown:
                if not retry or trio.current_time() >= deadline:
                    raise

    async def _call_once(self, request: wire.Request[ReplyT], deadline: float) -> tuple[ReplyT, int]:
        current = self._current
        if current is None:
            with trio.move_on_at(deadline):
                await self._up.wait()
            current = self._current
            if current is None:
                raise OSError(errno.EIO, f"no link to the qtfs server at {self.address}")
        id = current.next_id
        while id in self._waiters or id == 0:
            id = id + 1 if id < wire.MAX_ID else 1
        current.next_id = id + 1 if id < wire.MAX_ID else 1
        waiter = _Waiter()
        self._waiters[id] = waiter
        try:
            try:
                data = current.conn.send(wire.Call(id, request))
            except ProtocolError as exc:  # the connection is in its ERROR state: no call goes on it
                self._lose(current, f"could not send a {type(request).__name__}: {exc}")
                raise OSError(errno.EIO, f"a {type(request).__name__} could not be sent: {exc}") from None
            try:
                async with self._send_lock:
                    with translate_errors(self.address, "sending to"):
                        await current.stream.send_all(data)
            except TransportError as exc:
                self._lose(current, f"send failed: {exc}")
            with trio.move_on_after(self.request_timeout):
                await waiter.event.wait()
            if waiter.outcome is None:
                self._lose(current, f"no reply to a {type(request).__name__} in {self.request_timeout:g} s")
                raise OSError(errno.EIO, f"the qtfs server at {self.address} did not answer in time")
        finally:
            del self._waiters[id]
        outcome = waiter.outcome
        if isinstance(outcome, OSError):
            raise outcome
        # The connection decoded the reply by the request's op: it is a ReplyT.
        return cast(ReplyT, outcome), current.generation

    # -- the connection ----------------------------------------------------------------------

    async def connect(self) -> Mounted:
        """Open a connection and mount; the first call's errors are the mount's errors."""
        with trio.fail_after(CONNECT_TIMEOUT):
            connected = await self.transport.connect(self.address, timeout=CONNECT_TIMEOUT)
        stream = connected.stream
        try:
            conn = wire.QtfsConnection(client=True, keepalive=self.keepalive, now=trio.current_time())
            with trio.fail_after(CONNECT_TIMEOUT):
                await stream.send_all(
                    conn.send(wire.Hello(self.node)) + conn.send(wire.Call(1, wire.Mount(self.remote)))
                )
                hello: wire.Hello | None = None
                reply: wire.Event | None = None
                while reply is None:
                    conn.receive_data(await stream.receive_some(RECEIVE_SIZE))
                    while (event := conn.next_event()) is not wire.NEED_DATA:
                        if isinstance(event, wire.Hello):
                            hello = event
                        elif isinstance(event, wire.Result | wire.Failure) and event.id == 1:
                            reply = event
                        elif isinstance(event, wire.Closed):
                            raise TransportError(f"{self.address} closed the connection", address=str(self.address))
            if isinstance(reply, wire.Failure):
                raise OSError(
                    reply.errno,
                    f"{self.address} refused to mount {os.fsdecode(self.remote)}: {os.strerror(reply.errno)}",
                )
            if hello is None or not isinstance(reply, wire.Result) or not isinstance(reply.reply, wire.MountReply):
                raise RemoteProtocolError("the server answered the mount out of order")
            try:
                root = wire.Attr.decode_from(reply.reply.attr)
            except struct.error as exc:
                raise RemoteProtocolError(f"malformed mount reply: {exc}") from None
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        mounted = Mounted(
            root,
            bool(reply.reply.flags & wire.MOUNT_READONLY),
            hello.node,
            hello.epoch,
            bool(reply.reply.flags & wire.MOUNT_WATCHED),
            bool(reply.reply.flags & wire.MOUNT_OPEN_CHECKED),
        )
        if self.mounted is not None and mounted.epoch != self.mounted.epoch:
            log.info("qtfs server %s restarted (new epoch); reconnected", self.address)
        reconnected = self.mounted is not None
        self.mounted = mounted
        self.generation += 1
        conn.heard(trio.current_time())
        self._current = _Connection(stream, conn, self.generation, trio.Event(), 2)
        if reconnected:
            self.on_reset()
        self._up.set()
        return mounted

    def _lose(self, current: _Connection, why: str) -> None:
        if self._current is not current:
            return
        log.warning("link to the qtfs server %s lost: %s", self.address, why)
        self._current = None
        self._up = trio.Event()
        current.lost.set()
        self.on_reset()
        for waiter in self._waiters.values():
            if waiter.outcome is None:
                waiter.outcome = LinkDown()
                waiter.event.set()

    async def run(self, *, task_status: trio.TaskStatus[Mounted] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect (errors propagate), then keep the link up until cancelled."""
        mounted = await self.connect()
        task_status.started(mounted)
        while True:
            current = self._current
            assert current is not None
            try:
                async with aio.open_nursery() as nursery:
                    nursery.start_soon(self._reader, current)
                    nursery.start_soon(self._pinger, current)
                    await current.lost.wait()
                    nursery.cancel_scope.cancel()
            finally:
                with trio.CancelScope(shield=True):
                    await trio.aclose_forcefully(current.stream)
            await self._reconnect()

    async def _reconnect(self) -> None:
        delay = 0.05
        while True:
            try:
                await self.connect()
                return
            except (TransportError, ProtocolError, OSError, trio.TooSlowError) as exc:
                log.debug("reconnecting to %s: %s", self.address, exc)
            await trio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def _reader(self, current: _Connection) -> None:
        conn = current.conn
        waiters = self._waiters
        try:
            while True:
                with translate_errors(self.address, "receiving from"):
                    data = await current.stream.receive_some(RECEIVE_SIZE)
                conn.heard(trio.current_time())
                conn.receive_data(data)
                while (event := conn.next_event()) is not wire.NEED_DATA:
                    if isinstance(event, (wire.Result, wire.Failure)):
                        waiter = waiters.get(event.id)
                        if waiter is not None:
                            if isinstance(event, wire.Result):
                                waiter.outcome = event.reply
                            else:
                                waiter.outcome = OSError(event.errno, os.strerror(event.errno))
                            waiter.event.set()
                    elif isinstance(event, wire.Invalidate):
                        try:
                            self.on_invalidate(event)
                        except Exception as exc:  # what the host named does not fit: resync
                            self._lose(current, f"an Invalidate could not be applied: {exc!r}")
                            return
                    elif isinstance(event, wire.Closed):
                        self._lose(current, "the server closed the connection")
                        return
        except (TransportError, ProtocolError) as exc:
            self._lose(current, str(exc) or type(exc).__name__)

    async def _pinger(self, current: _Connection) -> None:
        conn = current.conn
        while True:
            await trio.sleep_until(conn.deadline)
            try:
                ping = conn.poll(trio.current_time())
                if not ping:
                    continue
                # A send cut short leaves the stream unusable, and a send this slow means a dead link.
                with trio.fail_after(conn.ping_every), translate_errors(self.address, "pinging"):
                    async with self._send_lock:
                        await current.stream.send_all(ping)
            except (ProtocolError, TransportError, trio.TooSlowError) as exc:
                self._lose(current, str(exc) or f"a ping could not be sent in {conn.ping_every:g} s")
                return
