"""qtfs serve: the host side.  Serves exported directories to authenticated DPU clients.

One connection is one mount.  Requests are read in batches and answered in
order of completion: local file operations run inline (a stat, a
page-cache read: microseconds, less than a thread hand-off costs), fsync in
a thread so that a slow flush never holds up the connection's other
requests.  Replies of one batch leave in one send; a read's data is read
straight into the buffer that is sent (no copy).

A locally stored tree is watched (`offload.qtfs.watch`) and its changes
sent as Invalidates, read before every batch of replies and sent first: a
change made before a request was answered is announced before that answer.
"""

from __future__ import annotations

import errno
import logging
import os
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from stat import S_ISREG

import trio

from offload import aio
from offload.errors import ConfigError, ProtocolError, TransportError, errno_name
from offload.net import Transport, listener_address, parse_address, remote_name, serve_listeners, translate_errors
from offload.protocol import qtfs as wire
from offload.protocol.framing import HEADER_SIZE
from offload.qtfs.backend import Backend, Export
from offload.qtfs.programs import Programs
from offload.qtfs.watch import TreeWatch, watchable
from offload.qtfs.whitelist import Whitelist

log = logging.getLogger("qtfs")

#: A client pings every few seconds; this much silence means it is gone,
#: and its open files are closed.
IDLE_TIMEOUT = 60.0
RECEIVE_SIZE = 1 << 20
#: Replies held at once before they are sent: one receive may carry tens of
#: thousands of small Reads, each answered with up to `wire.MAX_IO` bytes.
PENDING_REPLIES = 16 << 20
#: Operations that may block for long run in a thread.
THREADED = frozenset({wire.Op.FSYNC})
#: Such calls one connection may have waiting at once; beyond, EAGAIN at once.  Each waits as
#: a task of ours: a peer sending them faster than the disk syncs must not grow us without end.
MAX_THREADED = 64
#: What a request's well-formed but absurd fields make the os module raise (an offset
#: past 2**63, a NUL inside a name or a link target): that request fails with EINVAL.
ABSURD = (ValueError, OverflowError)


@dataclass(frozen=True)
class ServerConfig:
    listen: tuple[str, ...]
    exports: tuple[Export, ...]
    whitelist: Whitelist = field(default_factory=Whitelist)
    node: str = ""
    root_squash: bool = True  # uid and gid 0 of a request become nobody/nogroup (NFS's root_squash)
    programs_of: str = ""  # the host rexec_server's lock file: its programs are the DPU's to tune and watch

    def __post_init__(self) -> None:
        if not self.exports:
            raise ConfigError("nothing to serve: give at least one --export PATH")
        for export in self.exports:
            if not os.path.isdir(export.path):
                raise ConfigError(f"export {os.fsdecode(export.path)} is not a directory")


class Session:
    """One client connection: its backend (mount root, handles) and its request loop."""

    def __init__(self, config: ServerConfig, stream: trio.abc.Stream, peer: str, epoch: int) -> None:
        self.config = config
        self.stream = stream
        self.peer = peer
        self.epoch = epoch
        self.conn = wire.QtfsConnection(client=False)
        programs = Programs(config.programs_of) if config.programs_of else None
        self.backend = Backend(config.exports, config.whitelist, config.root_squash, programs)
        self.handlers = self.backend.handlers()
        self.send_lock = trio.Lock()
        self.watch: TreeWatch | None = None
        self.threaded = 0  # calls of THREADED operations waiting or running
        self.mounting = False  # a Mount's tree watch is being set up (in a thread)

    async def run(self) -> None:
        try:
            async with aio.open_nursery() as nursery:
                await self.stream.send_all(
                    self.conn.send(wire.Hello(self.config.node or os.uname().nodename, epoch=self.epoch))
                )
                while True:
                    with trio.fail_after(IDLE_TIMEOUT):
                        data = await self.stream.receive_some(RECEIVE_SIZE)
                    self.conn.receive_data(data)
                    while True:
                        out: list[bytes | memoryview] = []
                        closed = self._drain(out, nursery)
                        if out and self.watch is not None:
                            out[:0] = self._invalidations()
                        if out:
                            await self._send(out)
                        if closed is not None:
                            break
                    if closed:
                        break
                nursery.cancel_scope.cancel()
        finally:
            if self.watch is not None:
                self.watch.close()
            self.backend.close()

    async def _answer_later(self, id: int, request: wire.Request, work: Callable[[], Awaitable[wire.Message]]) -> None:
        """Answer ``request`` with what ``work()`` returns, from a task of its own (other requests go on)."""
        try:
            data = self.conn.send(wire.Result(id, await work()))
        except (OSError, *ABSURD) as exc:
            data = self._failure(id, request, exc)
        await self._send([data])

    async def _in_thread(self, request: wire.Request) -> wire.Message:
        try:
            return await trio.to_thread.run_sync(self.handlers[request.OP], request)
        finally:
            self.threaded -= 1

    async def _start_watch(self, reply: wire.MountReply, nursery: trio.Nursery) -> wire.MountReply:
        """Watch the mounted tree if inotify can see its changes; the reply says whether it is watched.

        Adding a watch on every directory of a big export takes a while: it
        runs in a thread, so other connections are served meanwhile.
        """
        base = self.backend.base
        try:
            if self.watch is not None:
                trio.lowlevel.notify_closing(self.watch.fd)
                self.watch.close()
                self.watch = None
            if self.backend.facts is not None or not watchable(self.backend.root):
                return reply
            watch = await trio.to_thread.run_sync(TreeWatch, base, abandon_on_cancel=False)
        except OSError as exc:
            log.warning("not watching %s (clients will not cache): %s", os.fsdecode(base), exc)
            return reply
        finally:
            self.mounting = False
        if not watch.complete or self.watch is not None:  # unwatchable, or a later Mount won
            watch.close()
            return reply
        self.watch = watch
        nursery.start_soon(self._watching, watch)
        log.debug("watching %d directories under %s", len(watch), os.fsdecode(self.backend.base))
        flags = reply.flags | wire.MOUNT_WATCHED
        if self.config.whitelist.enforced:
            flags |= wire.MOUNT_OPEN_CHECKED
        return wire.MountReply(reply.attr, flags)

    def _invalidations(self) -> list[bytes | memoryview]:
        assert self.watch is not None
        return [self.conn.send(item) for item in self.watch.read()]

    async def _watching(self, watch: TreeWatch) -> None:
        while self.watch is watch:
            try:
                await trio.lowlevel.wait_readable(watch.fd)
            except trio.ClosedResourceError:
                return  # a second Mount replaced it
            if self.watch is not watch:
                return
            out = self._invalidations()
            if out:
                await self._send(out)

    async def _send(self, parts: list[bytes | memoryview]) -> None:
        async with self.send_lock:
            if len(parts) == 1:
                await self.stream.send_all(parts[0])
            elif hasattr(self.stream, "send_parts"):
                await self.stream.send_parts(tuple(parts))
            else:
                await self.stream.send_all(b"".join(parts))

    def _drain(self, out: list[bytes | memoryview], nursery: trio.Nursery) -> bool | None:
        """Answer the requests received: True once the peer has closed, False when
        more data is needed, None when ``out`` is full and must be sent first."""
        conn = self.conn
        pending = 0
        while pending < PENDING_REPLIES:
            held = len(out)
            event = conn.next_event()
            if event is wire.NEED_DATA:
                return False
            if isinstance(event, wire.Closed):
                return True
            if isinstance(event, wire.Call):
                self._call(event, out, nursery)
            elif isinstance(event, wire.BadCall):
                log.warning("refused a request from %s: %s", self.peer, event.reason)
                out.append(conn.send(wire.Failure(event.id, "EACCES")))
            elif isinstance(event, wire.Ping):
                out.append(conn.send(wire.Pong(event.token)))
            pending += sum(len(part) for part in out[held:])
        return None

    def _call(self, call: wire.Call, out: list[bytes | memoryview], nursery: trio.Nursery) -> None:
        request = call.request
        op = request.OP
        try:
            if isinstance(request, wire.Read):
                out.append(self._read(call.id, request))
                return
            if op in THREADED:
                if self.threaded >= MAX_THREADED:
                    raise OSError(errno.EAGAIN, f"{MAX_THREADED} calls already wait for a thread")
                self.threaded += 1
                nursery.start_soon(self._answer_later, call.id, request, partial(self._in_thread, request))
                return
            if op is wire.Op.MOUNT and self.mounting:  # each walks the whole tree in a thread
                raise OSError(errno.EBUSY, "the last Mount's tree is still being watched")
            reply = self.handlers[op](request)
            if isinstance(reply, wire.MountReply):
                self.mounting = True
                nursery.start_soon(self._answer_later, call.id, request, partial(self._start_watch, reply, nursery))
                return
        except (OSError, *ABSURD) as exc:
            out.append(self._failure(call.id, request, exc))
            return
        out.append(self.conn.send(wire.Result(call.id, reply)))

    def _read(self, id: int, request: wire.Read) -> memoryview:
        fd = self.backend.files.get(request.handle)
        size = min(request.size, wire.MAX_IO)
        stat = os.fstat(fd)
        if stat.st_size > 0 and S_ISREG(stat.st_mode):
            # No more than the file holds (procfs and sysfs files say 0 and hold more).
            size = min(size, max(0, stat.st_size - request.offset))
        buffer = bytearray(HEADER_SIZE + size)
        view = memoryview(buffer)
        count = os.preadv(fd, [view[HEADER_SIZE:]], request.offset)
        view[:HEADER_SIZE] = self.conn.send_header(wire.Result, id, count)
        if count < size:
            # A short read: the reply keeps only what it carries, not the whole buffer.
            return memoryview(bytes(view[: HEADER_SIZE + count]))
        return view[: HEADER_SIZE + count]

    def _failure(self, id: int, request: wire.Request, exc: Exception) -> bytes:
        """The Failure answering ``request``: the OSError's errno, EINVAL for an `ABSURD` field."""
        number = (exc.errno or errno.EIO) if isinstance(exc, OSError) else errno.EINVAL
        if number not in (errno.ENOENT, errno.ENODATA, errno.EEXIST, errno.ENOTEMPTY):
            log.debug("%s %s from %s: %s", request.OP.name, request, self.peer, os.strerror(number))
        return self.conn.send(wire.Failure(id, errno_name(number)))


async def serve(
    config: ServerConfig, transport: Transport, *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED
) -> None:
    # The client's kernel applied the caller's umask already; ours must not
    # apply a second one.  (Given back when serving ends: serve may run in a
    # process that goes on.)
    umask = os.umask(0)
    try:
        epoch = random.getrandbits(63) or 1
        listeners = []
        for text in config.listen:
            listeners.extend(await transport.listen(parse_address(text)))

        async def session(raw: trio.SocketStream) -> None:
            connected = await transport.admit(raw, remote_name(raw), log)
            if connected is None:
                return
            async with connected.stream:
                try:
                    with translate_errors(connected.peer, "serving"):
                        await Session(config, connected.stream, connected.peer, epoch).run()
                except (TransportError, ProtocolError) as exc:
                    log.info("connection from %s ended: %s", connected.peer, exc or type(exc).__name__)
                except trio.TooSlowError:
                    log.info("connection from %s idle for %.0f s: closed", connected.peer, IDLE_TIMEOUT)

        async with aio.open_nursery() as nursery:
            nursery.start_soon(serve_listeners, listeners, session, log, "qtfs", transport.limits)
            bound = [listener_address(listener) for listener in listeners]
            log.info(
                "qtfs ready on %s, exporting %s",
                ", ".join(bound),
                ", ".join(os.fsdecode(e.path) + (" (ro)" if e.readonly else "") for e in config.exports),
            )
            task_status.started(bound)
    finally:
        os.umask(umask)
