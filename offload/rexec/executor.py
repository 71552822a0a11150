"""The server side of a session: run the program and be its caller's hands here.

The program gets, at the caller's fd numbers: pipes and socketpairs whose
other ends we relay, /dev/null, shared regular files re-opened as the
program's user, and for every listening socket of the caller a private
listener of ours to which each bridged connection is delivered.  The
program runs as the caller's user (mapped), in its own process group, with
an allowlisted environment and the caller's resource limits (set as that
user, so never above what the user may have here).  If the caller goes away (the stand-in was
killed, the link was lost) the program gets SIGTERM and, after a grace
period, SIGKILL: no orphans on this machine.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import signal
import socket
import stat
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import psutil
import trio

from offload import aio, fdpass, proc, ptys, users
from offload.config import RexecConfig
from offload.errors import OffloadError, RefusedError, TransportError
from offload.fdio import ByteEnd, StreamEnd, grow_pipe
from offload.net import bind_unix
from offload.protocol.rexec import (
    Closed,
    Daemonized,
    Exec,
    ExecRequest,
    Exited,
    FdKind,
    Open,
    OpenPty,
    Refused,
    Reset,
    Signal,
    Started,
    Ticket,
)
from offload.rexec import attached, policy
from offload.rexec.attached import Grant, Grants
from offload.rexec.link import ChannelState, LinkFailed, SessionLink
from offload.udsproxy.prefixes import open_beneath

log = logging.getLogger(__name__)

#: After the program exits, how long its output may go without progress
#: before we stop waiting for end of file (a background child may hold it).
OUTPUT_LINGER = 2.0

#: A daemon pidfile holds a decimal pid and a newline; anything longer is not one.
MAX_PIDFILE = 32

_session_ids = itertools.count(1)


@dataclass
class ServerState:
    """What every session on this server shares."""

    config: RexecConfig
    whitelist: policy.Whitelist
    bridges: Path
    grants: Grants = field(default_factory=Grants)


async def serve_session(link: SessionLink, state: ServerState) -> None:
    """Run the sessions an authenticated link asks for, one after another."""
    while True:
        event = await link.control.receive()
        if isinstance(event, Closed | LinkFailed):
            return  # an idle connection being retired, or a dead one
        if isinstance(event, Signal):
            continue  # sent for the last session as it ended (queued before our Exited went out)
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
        self.user: policy.RemoteUser | None = None
        self.started_at = 0.0  # the program's start time, in psutil's clock
        self.daemon_pidfd: int | None = None
        self.ends: dict[int, tuple[ByteEnd, bool, bool]] = {}  # channel -> (end, inbound, outbound)
        self.bridges: dict[int, str] = {}  # fd -> path of our private listener
        self.outputs: list[tuple[ChannelState, trio.Event]] = []

    async def run(self) -> None:
        request = self.request
        try:
            path = self.state.whitelist.resolve(request.program, self.node)
            # A root caller acts as nobody here unless the operator maps root.
            user = policy.map_user(request.user, users.squashing_root(self.config.users), self.node)
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
            self.user = user
            with contextlib.suppress(psutil.NoSuchProcess):
                self.started_at = psutil.Process(self.process.pid).create_time()
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
                opens.append((spec.fd, os.devnull, fdpass.open_flags(spec.access), 0))
            elif spec.kind is FdKind.FILE:
                # The agent chose to carry it; we still decide what we open.
                if not policy.is_shared(spec.path, self.config.shared_path):
                    raise RefusedError(f"fd {spec.fd}: {spec.path} is not a shared path on {self.node}")
                opens.append((spec.fd, spec.path, fdpass.open_flags(spec.access, spec.append), spec.offset))
            elif spec.kind in (FdKind.PIPE_IN, FdKind.PIPE_OUT):
                read_end, write_end = os.pipe2(os.O_CLOEXEC)
                grow_pipe(read_end)
                theirs, ours = (read_end, write_end) if spec.kind is FdKind.PIPE_IN else (write_end, read_end)
                child_ends.callback(os.close, theirs)
                dups[spec.fd] = theirs
                outbound = spec.kind is FdKind.PIPE_OUT
                self.ends[spec.channel] = (StreamEnd.from_fd(ours), not outbound, outbound)
            elif spec.kind is FdKind.SOCKET:
                ours_sock, theirs_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                child_ends.callback(theirs_sock.close)
                dups[spec.fd] = theirs_sock.fileno()
                self.ends[spec.channel] = (StreamEnd.from_fd(ours_sock.detach()), True, True)
            elif spec.kind is FdKind.LISTENER:
                bridge = str(self.state.bridges / f"{self.id}-{spec.fd}.sock")
                # A plain blocking listener: the program accepts on it, not us.
                listener = bind_unix(bridge, 0o600)
                child_ends.callback(listener.close)
                self.bridges[spec.fd] = bridge
                dups[spec.fd] = listener.fileno()
        rlimits, lowered = policy.grantable_rlimits(request.rlimits, user.uid)
        for line in lowered:
            log.warning("session %d: %s: lowered %s, above what %s may have here", self.id, path, line, user.name)
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
            rlimits=rlimits,
        )

    async def _supervise(self) -> None:
        assert self.process is not None
        self.state.grants.open_session(self.id)
        async with aio.open_nursery() as nursery:
            for channel, (end, inbound, outbound) in self.ends.items():
                done = self._output(channel, outbound)
                nursery.start_soon(
                    partial(self.link.relay, channel, end, inbound=inbound, outbound=outbound, outbound_done=done)
                )
            self.ends.clear()  # the relays own them now
            control = trio.CancelScope()
            nursery.start_soon(self._control_loop, nursery, control)
            status = await self.process.wait()
            # Its pid may name another process from now on: no ticket may open anything by it.
            self.state.grants.revoke_tickets(self.id)
            await self._await_output()
            if not (self.request.daemon_pidfile and status == 0):  # else a daemon goes on with them
                await self._await_bridged()
            exited: Exited | Refused = _exited(status)
            if self.request.daemon_pidfile and status == 0:
                exited = await self._follow_daemon()
            log.info("session %d: %s", self.id, _describe_exit(exited))
            # Once the peer reads our last word it may send the next
            # session's Exec on this link at once: our control loop must
            # not be there to swallow it.
            control.cancel()
            await self.link.send(exited)
            nursery.cancel_scope.cancel()

    async def _await_bridged(self) -> None:
        """Wait until what the program wrote on bridged connections was sent (each relay's `sent`)."""
        for relay in self.state.grants.bridged(self.id):
            waited = partial(relay.sent.wait, OUTPUT_LINGER)
            if not await trio.to_thread.run_sync(waited, abandon_on_cancel=True, limiter=trio.CapacityLimiter(1)):
                log.info(
                    "session %d: %s still open %.0f s after exit; not waiting for it",
                    self.id,
                    relay.name,
                    OUTPUT_LINGER,
                )
                return

    def _output(self, channel: int, outbound: bool) -> trio.Event | None:
        """For a channel the program writes to: the event set once all it wrote was sent."""
        if not outbound:
            return None
        done = trio.Event()
        self.outputs.append((self.link.add_channel(channel), done))
        return done

    async def _await_output(self) -> None:
        """Wait until what the program wrote (pipes, sockets, bridged connections) was sent, unless it stalls.

        A program that writes and exits at once leaves its last bytes in
        our ends; Exited must follow them, and ending the session cancels
        every relay.
        """
        for output, done in self.outputs:
            while not done.is_set():
                before = output.read
                with trio.move_on_after(OUTPUT_LINGER):
                    await done.wait()
                if not done.is_set() and output.read == before:
                    log.info(
                        "session %d: output still open %.0f s after exit; not waiting for it", self.id, OUTPUT_LINGER
                    )
                    return

    async def _control_loop(self, nursery: trio.Nursery, scope: trio.CancelScope) -> None:
        with scope:
            async for event in self.link.control:
                if isinstance(event, Signal):
                    self._signal(event.signum)
                elif isinstance(event, Open):
                    nursery.start_soon(self._bridge, event)
                elif isinstance(event, OpenPty):
                    nursery.start_soon(self._pty, event)
                elif isinstance(event, Closed | LinkFailed):
                    raise TransportError(f"session {self.id}: {_why_gone(event)}")

    def _signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if signum not in policy.FORWARDED_SIGNALS:
            # A stand-in forwards only these; anything else (SIGSTOP, SIGSEGV...) is not a caller's.
            log.warning("session %d: refused %s from %s: not a forwarded signal", self.id, name, self.link.peer)
            return
        log.debug("session %d: forwarding %s", self.id, name)
        with contextlib.suppress(ProcessLookupError):
            if self.daemon_pidfd is not None:
                signal.pidfd_send_signal(self.daemon_pidfd, signum)
            elif self.process is not None and self.process.returncode is None:
                self.process.send_signal(signum)

    async def _bridge(self, event: Open) -> None:
        """Answer with a ticket for a connection to the program's bridged listener ``event.fd``.

        The connection goes on a connection of its own (`offload.rexec.attached`),
        carrying the fds its programs pass: files re-opened as the program's user.
        """
        assert self.user is not None and self.process is not None
        path = self.bridges.get(event.fd)
        if path is None:
            log.warning("session %d: refused a bridged connection for fd %d: not a bridged listener", self.id, event.fd)
            await self._refuse(event.channel, f"fd {event.fd} is not a bridged listener")
            return
        grant = Grant(
            self.id,
            self.process,
            attached.who(self.link.peer, self.link.stream),
            bridge=path,
            user=self.user,
            shared=self.config.shared_path,
        )
        await self._grant(event.channel, grant)

    async def _pty(self, event: OpenPty) -> None:
        """Answer with a ticket for a pty whose master the program holds (qemu's serial console).

        Only the program's own ptys: the peer names a number, and the end
        is opened from the master the program holds (`offload.ptys`), never
        by path; any other number is refused with a log line.  The pty is
        relayed on a connection of its own (`offload.rexec.attached`).
        """
        try:
            if self.process is None or self.process.returncode is not None:
                raise PermissionError(errno.ESRCH, "the program has ended")
            os.close(ptys.program_pty_peer(self.process.pid, event.index))
        except OSError as exc:
            log.warning("session %d: refused pty %d to %s: %s", self.id, event.index, self.link.peer, exc)
            await self._refuse(event.channel, f"pty {event.index}: {exc.strerror or exc}")
            return
        grant = Grant(self.id, self.process, attached.who(self.link.peer, self.link.stream), pty=event.index)
        await self._grant(event.channel, grant)

    async def _grant(self, channel: int, grant: Grant) -> None:
        token = self.state.grants.issue(grant)
        if token is None:
            log.warning("session %d: refused %s to %s: too many unused tickets", self.id, grant.what, self.link.peer)
            await self._refuse(channel, f"{grant.what}: too many unused tickets")
        else:
            await self.link.send(Ticket(channel, token))
            self.link.drop_channel(channel)

    async def _refuse(self, channel: int, why: str) -> None:
        await self.link.send(Reset(channel, why))
        self.link.drop_channel(channel)

    async def _follow_daemon(self) -> Exited | Refused:
        """The foreground exited 0: follow the daemon its pidfile names, if the program started it.

        Anything else (a pid the program did not start, a pidfile we may not
        read) is refused: the stand-in reports it and no daemon is followed,
        so no signal of the caller's ever reaches that process.
        """
        assert self.request.daemon_pidfile is not None
        try:
            pid, self.daemon_pidfd = await self._open_daemon(self.request.daemon_pidfile)
        except RefusedError as exc:
            log.warning("session %d from %s: no daemon followed: %s", self.id, self.link.peer, exc)
            return Refused(exc.exit_code, f"no daemon followed on {self.node}: {exc}")
        log.info("session %d: daemon pid %d from %s", self.id, pid, self.request.daemon_pidfile)
        await self.link.send(Daemonized(0, pid))
        await trio.lowlevel.wait_readable(self.daemon_pidfd)
        # The daemon is not the program, so its status is not the session's.
        return Exited(code=0)

    async def _open_daemon(self, path: str) -> tuple[int, int]:
        """The pid and a pidfd of the daemon ``path`` names, once it is known to be the program's; RefusedError otherwise."""
        assert self.user is not None and self.process is not None
        pid = await self._read_daemon_pid(path, self.user)
        try:
            # Opened before the checks: from here on it names this process,
            # whatever happens to the pid, and the checks are about it.
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            raise RefusedError(f"{path} names pid {pid}, which is not running") from None
        try:
            # Once reaped, the program's pid may name someone else's process.
            program = self.process.pid if self.process.returncode is None else None
            _check_started_by(pid, program, self.started_at, self.user)
            signal.pidfd_send_signal(pidfd, 0)  # still alive: the checks saw this process, not a successor
        except ProcessLookupError:
            os.close(pidfd)
            raise RefusedError(f"{path} names pid {pid}, which is not running") from None
        except BaseException:
            os.close(pidfd)
            raise
        return pid, pidfd

    async def _read_daemon_pid(self, path: str, user: policy.RemoteUser) -> int:
        """The pid in ``path``, read as ``user``; qemu writes it before its foreground exits, allow a moment anyway."""
        read = partial(users.run_as, user, partial(_read_pidfile, path, self.config.shared_path, self.node))
        for _ in range(50):
            # In a thread: a file on a network or FUSE mount may take its time.
            pid = await trio.to_thread.run_sync(read)
            if pid is not None:
                return pid
            await trio.sleep(0.02)
        raise RefusedError(f"{path} holds no pid after the foreground exited")

    async def _cleanup(self) -> None:
        self.state.grants.revoke(self.id)
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
            # In a thread that runs to its end even when we are cancelled: the daemon is always ended.
            await trio.to_thread.run_sync(proc.end_pidfd, pidfd, self.config.kill_grace)
        finally:
            os.close(pidfd)


def _read_pidfile(path: str, shared: tuple[str, ...], node: str) -> int | None:
    """The pid in the daemon pidfile ``path``, None while it is missing or empty; RefusedError otherwise.

    Called as the requester's user.  The file must be a regular file of a
    pid's size beneath a --shared-path prefix (the pidfile names the same
    file on both machines; the caller's cwd is theirs to choose, so it
    bounds nothing).  O_NONBLOCK: a FIFO planted there must not stall us;
    no link is followed out of the prefix, nor at the file itself.
    """
    try:
        fd = open_beneath(path, shared, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except PermissionError as exc:
        raise RefusedError(f"{path}: {exc.strerror} (pidfiles must be beneath a shared path on {node})") from None
    except OSError as exc:
        reason = "a symbolic link" if exc.errno == errno.ELOOP else exc.strerror
        raise RefusedError(f"{path}: {reason}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RefusedError(f"{path} is not a regular file")
        if st.st_size > MAX_PIDFILE:
            raise RefusedError(f"{path} is {st.st_size} bytes, too long for a pid")
        text = os.read(fd, MAX_PIDFILE + 1).strip()
    finally:
        os.close(fd)
    if not text:
        return None
    if not text.isdigit() or int(text) <= 0:
        raise RefusedError(f"{path} does not hold a pid")
    return int(text)


def _check_started_by(pid: int, program: int | None, since: float, user: policy.RemoteUser) -> None:
    """RefusedError unless ``pid`` is the program or a process it started, running as ``user``.

    Its parent chain must reach the program, or, once the program has
    exited, this server with an orphan we adopted (`proc.adopt_orphans`:
    a daemon's parents have exited) that started no earlier than the
    program.  Another session's program, or any process that is not our
    descendant (the host's own daemons), never qualifies.
    """
    server = os.getpid()
    try:
        process = psutil.Process(pid)
        if set(process.uids()[:2]) != {user.uid}:
            raise RefusedError(f"pid {pid} does not run as {user.name}")
        while process.pid != program:
            parent = process.ppid()
            if parent == server:
                if proc.is_program(process.pid) or process.create_time() < since:
                    raise RefusedError(f"pid {pid} was not started by the program")
                return
            if parent <= 1:
                raise RefusedError(f"pid {pid} was not started by the program")
            process = psutil.Process(parent)
    except psutil.NoSuchProcess:
        raise RefusedError(f"pid {pid} was not started by the program (a process on its way is gone)") from None
    except psutil.AccessDenied:
        raise RefusedError(f"pid {pid} cannot be inspected") from None


def _why_gone(event: Closed | LinkFailed) -> str:
    if isinstance(event, LinkFailed):
        return str(event.error)
    return "the caller closed the session (the stand-in is gone)"


def _exited(status: int) -> Exited:
    return Exited(signal=-status) if status < 0 else Exited(code=status & 0xFF)


def _describe_exit(event: Exited | Daemonized | Refused) -> str:
    if isinstance(event, Refused):
        return f"refused: {event.reason}"
    if isinstance(event, Daemonized):
        return f"daemonized as pid {event.pid}"
    if event.signal is not None:
        return f"killed by {signal.Signals(event.signal).name}"
    return f"exited with status {event.code}"


__all__ = ["Execution", "OffloadError", "ServerState", "serve_session"]
