"""The server side of a session: run the program and be its caller's hands here.

The program gets, at the caller's fd numbers: pipes and socketpairs whose
other ends we relay, /dev/null, shared regular files re-opened as the
program's user, and for every listening socket of the caller a private
listener of ours to which each bridged connection is delivered.  The
program runs as the caller's user (mapped), in its own process group, with
an allowlisted environment.  If the caller goes away (the stand-in was
killed, the link was lost) the program gets SIGTERM and, after a grace
period, SIGKILL: no orphans on this machine.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import signal
import socket
from dataclasses import dataclass
from pathlib import Path

import trio

from offload import aio, proc
from offload.config import RexecConfig
from offload.errors import OffloadError, RefusedError, TransportError
from offload.fdio import ByteEnd, StreamEnd, grow_pipe
from offload.net import bind_unix
from offload.protocol.rexec import (
    ConnectionClosed,
    Daemonized,
    Exec,
    ExecRequest,
    Exited,
    FdKind,
    Open,
    Refused,
    Reset,
    Signal,
    Started,
)
from offload.rexecd import policy
from offload.rexecd.link import LinkFailed, SessionLink

log = logging.getLogger(__name__)

#: After the program exits, how long its output may go without progress
#: before we stop waiting for end of file (a background child may hold it).
OUTPUT_LINGER = 2.0

_session_ids = itertools.count(1)


@dataclass
class ServerState:
    """What every session on this server shares."""

    config: RexecConfig
    whitelist: policy.Whitelist
    bridges: Path


class CountingEnd(ByteEnd):
    """Counts bytes read through it, so a watchdog can tell progress from a stall."""

    def __init__(self, inner: ByteEnd) -> None:
        self.inner = inner
        self.count = 0

    async def read(self, max_bytes: int = 1 << 18) -> bytes:
        data = await self.inner.read(max_bytes)
        self.count += len(data)
        return data

    async def write(self, data: bytes) -> None:
        await self.inner.write(data)

    async def shutdown_write(self) -> None:
        await self.inner.shutdown_write()

    async def aclose(self) -> None:
        await self.inner.aclose()


async def serve_session(link: SessionLink, state: ServerState) -> None:
    """Run the sessions an authenticated link asks for, one after another."""
    while True:
        event = await link.control.receive()
        if isinstance(event, ConnectionClosed | LinkFailed):
            return  # an idle connection being retired, or a dead one
        if not isinstance(event, Exec):
            raise TransportError(f"expected an exec request from {link.peer}, got {type(event).__name__}")
        await Execution(link, event.request, state).run()
        if not link.alive:
            return


class Execution:
    def __init__(self, link: SessionLink, request: ExecRequest, state: ServerState) -> None:
        self.link = link
        self.request = request
        self.state = state
        self.config = state.config
        self.node = state.config.node_name
        self.id = next(_session_ids)
        self.process: trio.Process | None = None
        self.daemon_pidfd: int | None = None
        self.ends: dict[int, tuple[ByteEnd, bool, bool]] = {}  # channel -> (end, inbound, outbound)
        self.bridges: dict[int, str] = {}  # fd -> path of our private listener
        self.outputs: list[tuple[CountingEnd, trio.Event]] = []

    async def run(self) -> None:
        request = self.request
        try:
            path = self.state.whitelist.resolve(request.program, self.node)
            user = policy.map_user(request.user, self.config.users, self.node)
        except RefusedError as exc:
            log.warning("session %d from %s: refused %s: %s", self.id, self.link.peer, request.program, exc)
            await self.link.send(Refused(exc.exit_code, str(exc)))
            return
        try:
            with contextlib.ExitStack() as child_ends:
                plan = await self._plan(path, user, child_ends)
                try:
                    self.process = await proc.start_program(plan)
                except proc.ExecFailed as exc:
                    raise RefusedError(f"{exc} on {self.node}", exit_code=exc.exit_code) from None
            log.info(
                "session %d from %s: %s runs as pid %d (user %s)",
                self.id,
                self.link.peer,
                path,
                self.process.pid,
                user.name,
            )
            await self.link.send(Started(self.process.pid))
            await self._supervise()
        except RefusedError as exc:
            log.warning("session %d from %s: %s", self.id, self.link.peer, exc)
            await self.link.send(Refused(exc.exit_code, str(exc)))
        finally:
            with trio.CancelScope(shield=True):
                await self._cleanup()

    async def _plan(self, path: str, user: policy.RemoteUser, child_ends: contextlib.ExitStack) -> proc.ProgramPlan:
        request = self.request
        dups: dict[int, int] = {}
        opens: list[tuple[int, str, int, int]] = []
        for spec in request.fds:
            if spec.kind is FdKind.NULL:
                opens.append((spec.fd, os.devnull, policy.open_flags(spec), 0))
            elif spec.kind is FdKind.FILE:
                # The agent chose to carry it; we still decide what we open.
                if not policy.is_shared(spec.path, self.config.shared_path):
                    raise RefusedError(f"fd {spec.fd}: {spec.path} is not a shared path on {self.node}")
                opens.append((spec.fd, spec.path, policy.open_flags(spec), spec.offset))
            elif spec.kind in (FdKind.PIPE_IN, FdKind.PIPE_OUT):
                read_end, write_end = os.pipe2(os.O_CLOEXEC)
                grow_pipe(read_end)
                theirs, ours = (read_end, write_end) if spec.kind is FdKind.PIPE_IN else (write_end, read_end)
                child_ends.callback(os.close, theirs)
                dups[spec.fd] = theirs
                outbound = spec.kind is FdKind.PIPE_OUT
                self._add_end(spec.channel, StreamEnd.from_fd(ours), inbound=not outbound, outbound=outbound)
            elif spec.kind is FdKind.SOCKET:
                ours_sock, theirs_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                child_ends.callback(theirs_sock.close)
                dups[spec.fd] = theirs_sock.fileno()
                self._add_end(spec.channel, StreamEnd.from_fd(ours_sock.detach()), inbound=True, outbound=True)
            elif spec.kind is FdKind.LISTENER:
                bridge = str(self.state.bridges / f"{self.id}-{spec.fd}.sock")
                # A plain blocking listener: the program accepts on it, not us.
                listener = bind_unix(bridge, 0o600)
                child_ends.callback(listener.close)
                self.bridges[spec.fd] = bridge
                dups[spec.fd] = listener.fileno()
        env = policy.filter_environment(dict(request.env), self.config.env)
        env.setdefault("HOME", user.home)
        env.update(PATH=policy.REMOTE_PATH, USER=user.name, LOGNAME=user.name)
        return proc.ProgramPlan(
            path=path,
            argv=request.argv,
            env=env,
            cwd=request.cwd if os.path.isdir(request.cwd) else "/",
            umask=request.umask,
            uid=user.uid,
            gid=user.gid,
            groups=user.groups,
            dups=dups,
            opens=opens,
        )

    def _add_end(self, channel: int, end: ByteEnd, *, inbound: bool, outbound: bool) -> None:
        if outbound:
            end = CountingEnd(end)
        self.ends[channel] = (end, inbound, outbound)

    async def _supervise(self) -> None:
        assert self.process is not None
        async with aio.open_nursery() as nursery:
            for channel, (end, inbound, outbound) in self.ends.items():
                nursery.start_soon(self._relay, channel, end, inbound, outbound, self._output(end))
            self.ends.clear()  # the relays own them now
            nursery.start_soon(self._control_loop, nursery)
            status = await self.process.wait()
            await self._await_output()
            exited = _exited(status)
            if self.request.daemon_pidfile and status == 0:
                exited = await self._follow_daemon()
            log.info("session %d: %s", self.id, _describe_exit(exited))
            await self.link.send(exited)
            nursery.cancel_scope.cancel()

    def _output(self, end: ByteEnd) -> trio.Event | None:
        """For an end the program writes to: the event set once all it wrote was sent."""
        if not isinstance(end, CountingEnd):
            return None
        done = trio.Event()
        self.outputs.append((end, done))
        return done

    async def _relay(self, channel: int, end: ByteEnd, inbound: bool, outbound: bool, done: trio.Event | None) -> None:
        await self.link.relay(channel, end, inbound=inbound, outbound=outbound, outbound_done=done)

    async def _await_output(self) -> None:
        """Wait until what the program wrote (pipes, sockets, bridged connections) was sent, unless it stalls.

        A program that writes and exits at once leaves its last bytes in
        our ends; Exited must follow them, and ending the session cancels
        every relay.
        """
        for end, done in self.outputs:
            while not done.is_set():
                before = end.count
                with trio.move_on_after(OUTPUT_LINGER):
                    await done.wait()
                if not done.is_set() and end.count == before:
                    log.info(
                        "session %d: output still open %.0f s after exit; not waiting for it",
                        self.id,
                        OUTPUT_LINGER,
                    )
                    return

    async def _control_loop(self, nursery: trio.Nursery) -> None:
        async for event in self.link.control:
            if isinstance(event, Signal):
                self._signal(event.signum)
            elif isinstance(event, Open):
                nursery.start_soon(self._bridge, event)
            elif isinstance(event, ConnectionClosed | LinkFailed):
                raise TransportError(f"session {self.id}: {_why_gone(event)}")

    def _signal(self, signum: int) -> None:
        log.debug("session %d: forwarding %s", self.id, signal.Signals(signum).name)
        with contextlib.suppress(ProcessLookupError):
            if self.daemon_pidfd is not None:
                signal.pidfd_send_signal(self.daemon_pidfd, signum)
            elif self.process is not None and self.process.returncode is None:
                self.process.send_signal(signum)

    async def _bridge(self, event: Open) -> None:
        path = self.bridges.get(event.fd)
        try:
            if path is None:
                raise OSError(f"fd {event.fd} is not a bridged listener")
            stream = await trio.open_unix_socket(path)
        except OSError as exc:
            log.info("session %d: bridged connection for fd %d failed: %s", self.id, event.fd, exc)
            await self.link.send(Reset(event.channel, str(exc)))
            self.link.drop_channel(event.channel)
            return
        end = CountingEnd(StreamEnd(stream))
        await self._relay(event.channel, end, True, True, self._output(end))

    async def _follow_daemon(self) -> Exited:
        """The foreground exited 0: find the daemon from its pidfile and follow it."""
        assert self.request.daemon_pidfile is not None
        pid = await _read_pidfile(self.request.daemon_pidfile)
        if pid is None:
            log.warning(
                "session %d: %s holds no live pid after the foreground exited",
                self.id,
                self.request.daemon_pidfile,
            )
            return Exited(code=0)
        try:
            self.daemon_pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return Exited(code=0)
        log.info("session %d: daemon pid %d from %s", self.id, pid, self.request.daemon_pidfile)
        await self.link.send(Daemonized(0, pid))
        await trio.lowlevel.wait_readable(self.daemon_pidfd)
        # The daemon is not our child, so its status is not ours to read.
        return Exited(code=0)

    async def _cleanup(self) -> None:
        if self.process is not None and self.process.returncode is None:
            log.info("session %d: caller gone; ending pid %d", self.id, self.process.pid)
            await proc.terminate(self.process, self.config.kill_grace)
        if self.daemon_pidfd is not None:
            await self._end_daemon()
        for end, _, _ in self.ends.values():
            with contextlib.suppress(OSError, trio.ClosedResourceError):
                await end.aclose()
        for path in self.bridges.values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    async def _end_daemon(self) -> None:
        assert self.daemon_pidfd is not None
        pidfd, self.daemon_pidfd = self.daemon_pidfd, None
        try:
            for signum in (signal.SIGTERM, signal.SIGKILL):
                signal.pidfd_send_signal(pidfd, signum)
                with trio.move_on_after(self.config.kill_grace):
                    await trio.lowlevel.wait_readable(pidfd)
                    return
        except ProcessLookupError:
            pass
        finally:
            os.close(pidfd)


async def _read_pidfile(path: str) -> int | None:
    """qemu writes its pidfile before its foreground exits; allow a moment anyway."""
    for _ in range(50):
        with contextlib.suppress(OSError, ValueError):
            pid = int(Path(path).read_text().strip())
            if pid > 0:
                os.kill(pid, 0)
                return pid
        await trio.sleep(0.02)
    return None


def _why_gone(event: ConnectionClosed | LinkFailed) -> str:
    if isinstance(event, LinkFailed):
        return str(event.error)
    return "the caller closed the session (the stand-in is gone)"


def _exited(status: int) -> Exited:
    return Exited(signal=-status) if status < 0 else Exited(code=status & 0xFF)


def _describe_exit(event: Exited | Daemonized) -> str:
    if isinstance(event, Daemonized):
        return f"daemonized as pid {event.pid}"
    if event.signal is not None:
        return f"killed by {signal.Signals(event.signal).name}"
    return f"exited with status {event.code}"


__all__ = ["Execution", "OffloadError", "ServerState", "serve_session"]
