"""The server side of a session: run the program and be its caller's hands here (ARCHITECTURE.md).

The program gets its caller's fds as `_plan` makes them.  It runs as the caller's user (mapped), in its
own process group, with an allowlisted environment and the caller's resource limits (set as that user,
so never above what the user may have here).  If the caller goes away (its stand-in ended: `Hangup`),
or nobody resumes its session in time (`Execution`), the program gets SIGTERM and, after a grace
period, SIGKILL: no orphans on this machine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hmac
import itertools
import logging
import os
import secrets
import select
import signal
import socket
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import psutil
import trio

from offload import aio, fdpass, proc, ptys, sd, users
from offload.config import RexecConfig
from offload.errors import OffloadError, ProtocolError, RefusedError, TransportError
from offload.fdinfo import closed_on_error
from offload.fdio import StreamEnd, grow_pipe
from offload.net import bind_unix
from offload.prefix import open_beneath
from offload.protocol.rexec import (
    SESSION_BYTES,
    TICKET_BYTES,
    Closed,
    Daemonized,
    Exec,
    ExecRequest,
    Exited,
    FdKind,
    Hangup,
    Open,
    OpenPty,
    Refused,
    Reset,
    Resume,
    Resumed,
    Signal,
    Started,
    Ticket,
)
from offload.rexec import attached, keep, policy
from offload.rexec.attached import Grant, Grants
from offload.rexec.link import ChannelState, LinkFailed, SessionLink

log = logging.getLogger(__name__)

#: After the program exits, how long its output may go without progress
#: before we stop waiting for end of file (a background child may hold it).
OUTPUT_LINGER = 2.0

#: A daemon pidfile holds a decimal pid and a newline; anything longer is not one.
MAX_PIDFILE = 32

_session_ids = itertools.count(1)

#: A refusal's exit status for the stand-in: the session to resume is not here (any more).
EXIT_NOT_RESUMED = 255


@dataclass
class ServerState:
    """What every session on this server shares."""

    config: RexecConfig
    whitelist: policy.Whitelist
    bridges: Path
    sessions_dir: Path
    #: Where sessions run: a session outlives the link that started it.
    nursery: trio.Nursery
    grants: Grants = field(default_factory=Grants)
    #: Sessions that may be resumed, by name, while their programs are ours.
    resumable: dict[str, Execution] = field(default_factory=dict)


async def serve_session(link: SessionLink, state: ServerState) -> None:
    """Run the sessions an authenticated link asks for (or carries on), one after another."""
    while True:
        event = await link.control.receive()
        if isinstance(event, Closed | LinkFailed):
            return  # an idle connection being retired, or a dead one
        if isinstance(event, Signal):
            continue  # sent for the last session as it ended (queued before our Exited went out)
        if isinstance(event, Exec):
            execution = Execution(state, event.request)
            state.nursery.start_soon(aio.guarded, log, f"session {execution.id}", execution.run)
            await execution.carry(link)
        elif isinstance(event, Resume):
            resumed = state.resumable.get(event.session)
            if resumed is None or not resumed.may_resume(event, link):
                log.warning("%s asked to resume session %s, which is not here to resume", link.peer, event.session)
                await link.send(
                    Refused(EXIT_NOT_RESUMED, f"no session {event.session} to resume on {state.config.node_name}")
                )
            elif not await resumed.carry(link, supersede=True, channels=event.channels):
                await link.send(Refused(EXIT_NOT_RESUMED, f"session {event.session} has ended"))
        else:
            raise TransportError(f"expected an exec request from {link.peer}, got {type(event).__name__}")
        if not link.alive:
            return


class AdoptedProgram:
    """The program of a session a restarted server carries on: no child of ours, so how it ends is not known."""

    def __init__(self, pid: int, pidfd: int) -> None:
        self.pid = pid
        self.pidfd = pidfd
        self.ended = False

    @property
    def returncode(self) -> int | None:
        """None while it runs; then not None, but not its status."""
        if not self.ended and select.select([self.pidfd], [], [], 0)[0]:
            self.ended = True
        return 0 if self.ended else None

    async def wait(self) -> None:
        await trio.lowlevel.wait_readable(self.pidfd)
        self.ended = True

    def send_signal(self, signum: int) -> None:
        signal.pidfd_send_signal(self.pidfd, signum)


class Execution:
    """One session: its program, and its share of whichever link carries it.

    A session that may be resumed (all but daemon mode's) outlives its link and this server
    (ARCHITECTURE.md): the program runs on while the session waits `resume_window` for its peer's
    `Resume` on another link, which gets a fresh share of each channel.
    """

    def __init__(self, state: ServerState, request: ExecRequest | None) -> None:
        self.state = state
        self.request = request
        self.config = state.config
        self.node = state.config.node_name
        self.id = next(_session_ids)
        self.name = secrets.token_hex(SESSION_BYTES)
        self.secret = ""  # set once the session may be resumed
        self.peer = ""  # the node that may resume it (`attached.who`)
        self.process: trio.Process | AdoptedProgram | None = None
        self.user: policy.RemoteUser | None = None
        self.started_at = 0.0  # the program's start time, in psutil's clock
        self.daemon_pidfd: int | None = None
        self.ends: dict[int, tuple[int, bool, bool]] = {}  # channel -> (our fd, inbound, outbound)
        self.bridges: dict[int, str] = {}  # fd -> path of our private listener
        self.status: int | None = None  # the program's, once it ended (None after: not known)
        self.ended = trio.Event()
        root = request is None or request.user == "root"  # an adopted session was a root caller's
        self.keep = keep.Keep("rexec", self.name, state.sessions_dir / self.name, root=root)
        self.bridged = attached.BridgedEnds(self.keep)
        self.link: SessionLink | None = None
        self._released = trio.Event()
        self._lost = trio.CancelScope()  # the current link's share ends when cancelled
        self._resumed_channels: set[int] = set()  # what the peer relays on the link that resumed us
        self.suspended = False  # its link was lost and it waits for another
        self._links_send, self._links = trio.open_memory_channel[tuple[SessionLink, trio.Event]](0)

    @classmethod
    def adopt(cls, state: ServerState, kept: keep.Kept) -> Execution | None:
        """A session of the server before a restart, to carry on (`run` waits for it to be resumed).

        Takes ``kept``'s fds; None (they are closed, the session forgotten) if it cannot be carried on.
        """
        facts = kept.facts
        keeping = kept.keeping(state.sessions_dir / kept.name)
        execution = cls(state, None)
        try:
            execution.secret, execution.peer = str(facts["secret"]), str(facts["peer"])
            execution.user = policy.RemoteUser(**{**facts["user"], "groups": tuple(facts["user"]["groups"])})
            program = str(facts["program"])
            start = int(facts["start"])
            execution.bridges = {int(fd): str(path) for fd, path in facts["bridges"].items()}
            directions = {int(c): (bool(i), bool(o)) for c, (i, o) in facts["channels"].items()}
            pid = int(facts["pid"])
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("session %s: its facts do not read (%s); not carried on", kept.name, exc)
            pid = 0
        pidfd = keep.open_pidfd(pid, start) if pid else None
        if pidfd is None:
            kept.close()
            keeping.forget()
            return None
        execution.name = kept.name
        execution.process = AdoptedProgram(pid, pidfd)
        execution.keep = keeping
        channels = {int(c): fd for c, fd in kept.take("ch").items()}
        execution.ends = {c: (fd, *directions.get(c, (False, False))) for c, fd in channels.items()}
        execution.bridged = attached.BridgedEnds(execution.keep, {int(n): fd for n, fd in kept.take("b").items()})
        kept.close()  # nothing else of a host session is kept
        state.resumable[execution.name] = execution
        log.info(
            "session %d: carrying on session %s of pid %d (%s) for %s",
            execution.id,
            kept.name,
            pid,
            program,
            execution.peer,
        )
        return execution

    # -- links ---------------------------------------------------------------------

    async def carry(self, link: SessionLink, *, supersede: bool = False, channels: tuple[int, ...] = ()) -> bool:
        """Lend ``link`` to this session until it is done with it; False if the session has ended.

        ``supersede``: the peer resumes the session on ``link``, so the link
        that carries it now is lost, whether or not this side has noticed;
        it carries on ``channels``, the others it has finished.
        """
        if supersede:
            self._lost.cancel()
            self._resumed_channels = set(channels)
        released = trio.Event()
        try:
            await self._links_send.send((link, released))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        await released.wait()
        return True

    def may_resume(self, event: Resume, link: SessionLink) -> bool:
        return (
            bool(self.secret)
            and hmac.compare_digest(event.secret, self.secret)
            and attached.who(link.peer, link.stream) == self.peer
        )

    async def _take_link(self) -> None:
        self._released.set()
        self.link, self._released = await self._links.receive()

    # -- the session ------------------------------------------------------------------

    async def run(self) -> None:
        """The whole session; never raises (but Cancelled): what ends it is logged."""
        try:
            with self._links:
                if self.process is None and not await self._start():
                    return
                async with aio.open_nursery() as nursery:
                    nursery.start_soon(self._watch_program)
                    # An adopted session starts without a link: its peer resumes it first.
                    carried = self.link is not None or await self._await_resume()
                    while carried and await self._attend():
                        carried = await self._await_resume()
                    nursery.cancel_scope.cancel()
        except (TransportError, ProtocolError) as exc:
            log.warning("session %d with %s ended: %s", self.id, self.peer or "the peer", exc)
        finally:
            self.state.resumable.pop(self.name, None)
            self._released.set()
            with trio.CancelScope(shield=True):
                await self._cleanup()

    async def _start(self) -> bool:
        """Take the first link and start the program; False if it was refused."""
        await self._take_link()
        assert self.link is not None and self.request is not None
        request = self.request
        try:
            path = self.state.whitelist.resolve(request.program, self.node)
            # A root caller acts as nobody here unless the operator maps root.
            user = policy.map_user(request.user, users.squashing_root(self.config.users), self.node)
            with contextlib.ExitStack() as child_ends:
                try:
                    plan = await self._plan(path, user, child_ends)
                except OSError as exc:
                    raise RefusedError(f"cannot set up {path}'s fds on {self.node}: {exc}") from None
                try:
                    self.process = await proc.start_program(plan)
                except proc.ExecFailed as exc:
                    raise RefusedError(f"{exc} on {self.node}", exit_code=exc.exit_code) from None
        except RefusedError as exc:
            log.warning("session %d from %s: refused %s: %s", self.id, self.link.peer, request.program, exc)
            await self.link.send(Refused(exc.exit_code, str(exc)))
            return False
        self.user = user
        self.peer = attached.who(self.link.peer, self.link.stream)
        if self.config.program_slice:
            await self._own_scope(path)
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
        if not request.daemon_pidfile:  # a daemon's session ends with its link
            self.secret = secrets.token_hex(TICKET_BYTES)
            self.state.resumable[self.name] = self
            self._keep(path, user)
        await self.link.send(Started(self.process.pid, self.name if self.secret else "", self.secret))
        return True

    async def _own_scope(self, path: str) -> None:
        """The program leaves this service's cgroup for a scope of its own, as libvirt's machines do."""
        assert self.process is not None
        unit = f"rexec-{self.name[:16]}.scope"
        try:
            await trio.to_thread.run_sync(
                sd.place_in_scope, self.process.pid, unit, self.config.program_slice, f"{path} for {self.peer}"
            )
        except OSError as exc:
            log.warning("session %d: pid %d stays in this service's cgroup: %s", self.id, self.process.pid, exc)

    def _keep(self, path: str, user: policy.RemoteUser) -> None:
        assert self.process is not None
        self.keep.record(
            {
                "name": self.name,
                "secret": self.secret,
                "peer": self.peer,
                "pid": self.process.pid,
                "start": keep.start_of(self.process.pid),
                "user": dataclasses.asdict(user),
                "program": path,
                "channels": {channel: [inbound, outbound] for channel, (_, inbound, outbound) in self.ends.items()},
                "bridges": self.bridges,
            },
            {f"ch{channel}": fd for channel, (fd, _, _) in self.ends.items()},
        )

    async def _plan(self, path: str, user: policy.RemoteUser, child_ends: contextlib.ExitStack) -> proc.ProgramPlan:
        request = self.request
        assert request is not None
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
                self.ends[spec.channel] = (ours, not outbound, outbound)
            elif spec.kind is FdKind.SOCKET:
                ours_sock, theirs_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                child_ends.callback(theirs_sock.close)
                dups[spec.fd] = theirs_sock.fileno()
                self.ends[spec.channel] = (ours_sock.detach(), True, True)
            elif spec.kind is FdKind.LISTENER:
                # Named by the session, not by a counter of this process: a restarted server's
                # sessions must not take the paths of those it carries on.
                bridge = str(self.state.bridges / f"{self.name[:16]}-{spec.fd}.sock")
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

    async def _watch_program(self) -> None:
        assert self.process is not None
        self.status = await self.process.wait()
        # Its pid may name another process from now on: no ticket may open anything by it.
        self.state.grants.revoke_tickets(self.id)
        self.ended.set()

    async def _attend(self) -> bool:
        """Carry the session on ``self.link`` until its end is reported (False) or the link is lost (True)."""
        link = self.link
        assert link is not None and self.process is not None
        self.state.grants.open_session(self.id)
        async with aio.open_nursery() as nursery:
            outputs: list[tuple[ChannelState, trio.Event]] = []
            for channel, (fd, inbound, outbound) in self.ends.items():
                done = None
                if outbound:
                    done = trio.Event()
                    outputs.append((link.add_channel(channel), done))
                end = StreamEnd.from_fd(os.dup(fd))
                nursery.start_soon(self._relay, link, channel, end, inbound, outbound, done)
            self._lost = lost = trio.CancelScope()
            control = trio.CancelScope()
            nursery.start_soon(self._control_loop, link, nursery, control, lost)
            with lost:
                await self.ended.wait()
                daemonized = self.request is not None and self.request.daemon_pidfile and self.status == 0
                await self._await_output(outputs, bridged=not daemonized)  # a daemon goes on with its connections
                exited = await self._follow_daemon(link) if daemonized else _exited(self.status)
                log.info("session %d: %s", self.id, _describe_exit(exited))
                # Once the peer reads our last word it may send the next
                # session's Exec on this link at once: our control loop must
                # not be there to swallow it.
                control.cancel()
                try:
                    await link.send(exited)
                except TransportError:
                    if not self.secret:
                        raise
                    lost.cancel()  # told on the next link
            nursery.cancel_scope.cancel()
        return lost.cancel_called

    @contextlib.contextmanager
    def _link_may_fail(self) -> Iterator[None]:
        """A send on a lost link ends only the task that sent, when the session may be resumed: the link's
        loss reaches the control loop as LinkFailed."""
        try:
            yield
        except TransportError:
            if not self.secret:
                raise

    async def _relay(
        self, link: SessionLink, channel: int, end: StreamEnd, inbound: bool, outbound: bool, done: trio.Event | None
    ) -> None:
        """One channel on ``link``; once both ways ended (not when the link is lost) our end is let go."""
        with self._link_may_fail():
            await link.relay(channel, end, inbound=inbound, outbound=outbound, outbound_done=done)
            if link.alive:
                fd, _, _ = self.ends.pop(channel)
                os.close(fd)  # the program reads its end of file only once no copy of ours is left
                self.keep.drop(f"ch{channel}")

    async def _await_resume(self) -> bool:
        """Wait for the session to be carried on by another link, within the resume window."""
        assert self.process is not None
        waiting = sum(1 for other in self.state.resumable.values() if other.suspended and other.peer == self.peer)
        if waiting >= self.config.max_peer_connections:
            # A peer that starts sessions and drops them must not make us keep them without bound.
            log.warning(
                "session %d: %d sessions of %s wait to be resumed already; this one ends", self.id, waiting, self.peer
            )
            return False
        log.info(
            "session %d: link to %s lost; pid %d runs on, waiting %.0f s to be resumed",
            self.id,
            self.peer,
            self.process.pid,
            self.config.resume_window,
        )
        self.suspended = True
        with trio.move_on_after(self.config.resume_window):
            while True:
                await self._take_link()
                self.suspended = False
                assert self.link is not None
                try:
                    await self.link.send(Resumed(self.process.pid))
                except TransportError as exc:
                    log.info("session %d: the link that resumed it was lost at once (%s)", self.id, exc)
                    self.suspended = True
                    continue
                log.info("session %d: resumed by %s", self.id, self.link.peer)
                # Channels the peer no longer relays ended on its side while the link was lost: so they do
                # here (a program reading its stdin reads the end the peer sent before the link broke).
                for channel in self.ends.keys() - self._resumed_channels:
                    fd, _, _ = self.ends.pop(channel)
                    os.close(fd)
                    self.keep.drop(f"ch{channel}")
                return True
        log.warning("session %d: not resumed within %.0f s", self.id, self.config.resume_window)
        return False

    async def _await_output(self, outputs: list[tuple[ChannelState, trio.Event]], bridged: bool) -> None:
        """Wait until what the program wrote (pipes, sockets, and if ``bridged`` its bridged connections: each
        relay's `sent`) was sent, unless it stalls.

        A program that writes and exits at once leaves its last bytes in
        our ends; Exited must follow them, and ending the session cancels
        every relay.
        """
        stalled = False
        for output, done in outputs:
            while not done.is_set() and not stalled:
                before = output.read
                with trio.move_on_after(OUTPUT_LINGER):
                    await done.wait()
                stalled = not done.is_set() and output.read == before
        if stalled:
            log.info("session %d: output still open %.0f s after exit; not waiting for it", self.id, OUTPUT_LINGER)
        for relay in self.state.grants.bridged(self.id) if bridged else ():
            if not await attached.waited(relay.sent, OUTPUT_LINGER):
                log.info(
                    "session %d: %s still open %.0f s after exit; not waiting for it",
                    self.id,
                    relay.name,
                    OUTPUT_LINGER,
                )
                return

    async def _control_loop(
        self, link: SessionLink, nursery: trio.Nursery, scope: trio.CancelScope, lost: trio.CancelScope
    ) -> None:
        with scope:
            async for event in link.control:
                if isinstance(event, Signal):
                    self._signal(link, event.signum)
                elif isinstance(event, Open | OpenPty) and self.state.grants.stopping:
                    continue  # paused for the next server, which answers when the peer asks again
                elif isinstance(event, Open | OpenPty):
                    nursery.start_soon(self._answer, link, event)
                elif isinstance(event, Hangup):
                    raise TransportError(f"session {self.id}: the caller is gone (its stand-in ended)")
                elif isinstance(event, Closed | LinkFailed):
                    if not self.secret:
                        gone = "the caller closed the session (the stand-in is gone)"
                        raise TransportError(
                            f"session {self.id}: {event.error if isinstance(event, LinkFailed) else gone}"
                        )
                    lost.cancel()
                    return

    def _signal(self, link: SessionLink, signum: int) -> None:
        name = signal.Signals(signum).name
        if signum not in policy.FORWARDED_SIGNALS:
            # A stand-in forwards only these; anything else (SIGSTOP, SIGSEGV...) is not a caller's.
            log.warning("session %d: refused %s from %s: not a forwarded signal", self.id, name, link.peer)
            return
        log.debug("session %d: forwarding %s", self.id, name)
        with contextlib.suppress(ProcessLookupError):
            if self.daemon_pidfd is not None:
                signal.pidfd_send_signal(self.daemon_pidfd, signum)
            elif self.process is not None and self.process.returncode is None:
                self.process.send_signal(signum)

    async def _answer(self, link: SessionLink, event: Open | OpenPty) -> None:
        """Answer with a ticket for a connection of its own (`attached`), or refuse it with a log line."""
        assert self.process is not None
        peer = attached.who(link.peer, link.stream)
        try:
            grant = self._bridge(peer, event) if isinstance(event, Open) else self._pty(peer, event)
            token = self.state.grants.issue(grant)
            if token is None:
                raise RefusedError(f"{grant.what}: too many unused tickets")
            answer: Ticket | Reset = Ticket(event.channel, token, grant.conn)
        except RefusedError as exc:
            log.warning("session %d: refused to %s: %s", self.id, link.peer, exc)
            answer = Reset(event.channel, str(exc))
        with self._link_may_fail():
            await link.send(answer)
            link.drop_channel(event.channel)

    def _bridge(self, peer: str, event: Open) -> Grant:
        """A connection to the program's bridged listener ``event.fd``, carrying the fds its programs pass as the
        program's user; ``event.conn`` names one whose link was lost, attached again."""
        assert self.user is not None and self.process is not None
        path = self.bridges.get(event.fd)
        if path is None:
            raise RefusedError(f"a connection to fd {event.fd}: not a bridged listener")
        if event.conn and not self.bridged.holds(event.conn):
            raise RefusedError(f"a connection to fd {event.fd}: it has no connection {event.conn}")
        return Grant(
            self.id,
            self.process,
            peer,
            bridge=path,
            user=self.user,
            shared=self.config.shared_path,
            conn=event.conn or self.bridged.number(),
            ends=self.bridged,
        )

    def _pty(self, peer: str, event: OpenPty) -> Grant:
        """A pty whose master the program holds (qemu's serial console).

        Only the program's own ptys: the peer names a number, and the end
        is opened from the master the program holds (`offload.ptys`), never
        by path; any other number is refused.
        """
        assert self.process is not None
        try:
            if self.process.returncode is not None:
                raise PermissionError(errno.ESRCH, "the program has ended")
            os.close(ptys.program_pty_peer(self.process.pid, event.index))
        except OSError as exc:
            raise RefusedError(f"pty {event.index}: {exc.strerror or exc}") from None
        return Grant(self.id, self.process, peer, pty=event.index)

    async def _follow_daemon(self, link: SessionLink) -> Exited | Refused:
        """The foreground exited 0: follow the daemon its pidfile names, if the program started it.

        Anything else (a pid the program did not start, a pidfile we may not
        read) is refused: the stand-in reports it and no daemon is followed,
        so no signal of the caller's ever reaches that process.
        """
        assert self.request is not None and self.request.daemon_pidfile is not None
        pidfile = self.request.daemon_pidfile
        try:
            pid, self.daemon_pidfd = await self._open_daemon(pidfile)
        except RefusedError as exc:
            log.warning("session %d from %s: no daemon followed: %s", self.id, link.peer, exc)
            return Refused(exc.exit_code, f"no daemon followed on {self.node}: {exc}")
        log.info("session %d: daemon pid %d from %s", self.id, pid, pidfile)
        await link.send(Daemonized(0, pid))
        await trio.lowlevel.wait_readable(self.daemon_pidfd)
        # The daemon is not the program, so its status is not the session's.
        return Exited(code=0)

    async def _open_daemon(self, path: str) -> tuple[int, int]:
        """The pid and a pidfd of the daemon ``path`` names, once it is known to be the program's; RefusedError otherwise."""
        assert self.user is not None and self.process is not None
        read = partial(users.run_as, self.user, partial(_read_pidfile, path, self.config.shared_path, self.node))
        for _ in range(50):  # qemu writes it before its foreground exits; allow a moment anyway
            # In a thread: a file on a network or FUSE mount may take its time.
            if (pid := await trio.to_thread.run_sync(read)) is not None:
                break
            await trio.sleep(0.02)
        else:
            raise RefusedError(f"{path} holds no pid after the foreground exited")
        try:
            # Opened before the checks: from here on it names this process,
            # whatever happens to the pid, and the checks are about it.
            with closed_on_error(os.pidfd_open(pid)) as pidfd:
                # Once reaped, the program's pid may name someone else's process.
                program = self.process.pid if self.process.returncode is None else None
                _check_started_by(pid, program, self.started_at, self.user)
                signal.pidfd_send_signal(pidfd, 0)  # still alive: the checks saw this process, not a successor
        except ProcessLookupError:
            raise RefusedError(f"{path} names pid {pid}, which is not running") from None
        return pid, pidfd

    async def _cleanup(self) -> None:
        self.state.grants.revoke(self.id)
        running = self.process if self.process is not None and self.process.returncode is None else None
        kept = running is not None and self.state.grants.stopping and bool(self.secret) and self.keep.enabled
        if running is not None and kept:
            log.info("session %d: pid %d runs on, kept for the next rexec_server", self.id, running.pid)
        elif running is not None:
            log.info("session %d: caller gone; ending pid %d", self.id, running.pid)
            if isinstance(running, AdoptedProgram):
                await trio.to_thread.run_sync(proc.end_pidfd, running.pidfd, self.config.kill_grace)
            else:
                await proc.terminate(running, self.config.kill_grace)
        if self.daemon_pidfd is not None:
            try:
                # In a thread that runs to its end even when we are cancelled: the daemon is always ended.
                await trio.to_thread.run_sync(proc.end_pidfd, self.daemon_pidfd, self.config.kill_grace)
            finally:
                os.close(self.daemon_pidfd)
        for fd, _, _ in self.ends.values():
            os.close(fd)
        self.ends.clear()
        self.bridged.close()
        if isinstance(self.process, AdoptedProgram):
            os.close(self.process.pidfd)
        if kept:
            return  # the fd store's copies wait for the next server
        self.keep.forget()
        for path in self.bridges.values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


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


def _exited(status: int | None) -> Exited:
    if status is None:
        return Exited(lost=True)
    return Exited(signal=-status) if status < 0 else Exited(code=status & 0xFF)


def _describe_exit(event: Exited | Daemonized | Refused) -> str:
    if isinstance(event, Refused):
        return f"refused: {event.reason}"
    if isinstance(event, Daemonized):
        return f"daemonized as pid {event.pid}"
    if event.lost:
        return "ended (how is not known: it was no child of this server after a restart)"
    if event.signal is not None:
        return f"killed by {signal.Signals(event.signal).name}"
    return f"exited with status {event.code}"


__all__ = ["Execution", "OffloadError", "ServerState", "serve_session"]
