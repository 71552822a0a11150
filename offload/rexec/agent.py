"""The agent: the local side of every session, serving stand-ins on a UNIX socket (ARCHITECTURE.md).

The caller's identity is SO_PEERCRED, never what the stand-in says.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import pwd
import socket
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import psutil
import trio

from offload import aio, fdpass, ptys, users
from offload.config import RexecConfig
from offload.errors import ConfigError, OffloadError, ProtocolError, RefusedError, TransportError
from offload.fdio import ByteEnd, borrow
from offload.net import Address, Transport, first_request, listen_unix, parse_address, serve_listeners
from offload.protocol import local, messages
from offload.protocol.framing import CLOSED, NEED_DATA, Frame, FrameDecoder
from offload.protocol.ptypaths import PtyPathRewriter
from offload.protocol.rexec import (
    BRIDGE_CHANNELS,
    MAX_FDS,
    Closed,
    Daemonized,
    Exec,
    ExecRequest,
    Exited,
    FdKind,
    FdSpec,
    Hangup,
    Open,
    OpenPty,
    Refused,
    Resume,
    Resumed,
    Role,
    Signal,
    Started,
    State,
    parse_rlimits,
)
from offload.rexec import attached, console, keep, policy
from offload.rexec.link import LinkFailed, SessionLink
from offload.rexec.pidmap import PidmapDir
from offload.udsproxy.relay import Relay, run_in_thread

log = logging.getLogger(__name__)

EXIT_FAILURE = 255
#: How long an Exec may go unanswered before it is logged (again).
SLOW_ANSWER = 10.0
#: How long the exit waits for a bridged connection's last bytes to reach the caller's program.
DELIVERY_WAIT = 2.0
#: A relay that lost its connection while its session's link lives is attached again on that link
#: after this long, at most this many times in a row.
REATTACH_DELAY = 0.1
MAX_REATTACH = 10
#: Connections one session's bridged listeners may have relayed at once (libvirt keeps one per
#: monitor): each is a connection to the peer's rexec_server, from a budget its peers share.
MAX_BRIDGED = 16
#: The kinds of carried fd the program writes to: their bytes are delivered before its end is told.
_INBOUND = (FdKind.PIPE_OUT, FdKind.SOCKET)


class PeerPool:
    """Authenticated links to peers, a few kept warm so a session starts at once."""

    def __init__(self, transport: Transport, config: RexecConfig, nursery: trio.Nursery) -> None:
        self.transport = transport
        self.config = config
        self.nursery = nursery
        self._idle: dict[Address, collections.deque[SessionLink]] = collections.defaultdict(collections.deque)
        self._filling: set[Address] = set()
        #: The server stops (SIGTERM): sessions kept in the fd store are left as they are.
        self.stopping = False
        #: The relays of bridged connections and ptys running now, paused when the server stops.
        self.relays: set[Relay] = set()
        #: Connections to peers each unprivileged uid holds through its sessions: the peers'
        #: budget (max_peer_connections) is shared with libvirt's, which runs as root.
        self._held: collections.Counter[int] = collections.Counter()

    @contextlib.contextmanager
    def held(self, uid: int) -> Iterator[bool]:
        """One more connection of ``uid``'s for the block; False (nothing counted) past max_user_links."""
        if uid == 0:
            yield True
            return
        if self._held[uid] >= self.config.max_user_links:
            yield False
            return
        self._held[uid] += 1
        try:
            yield True
        finally:
            self._held[uid] -= 1
            if self._held[uid] <= 0:
                del self._held[uid]

    def give_back(self, address: Address, link: SessionLink) -> bool:
        """Keep a link whose session ended cleanly for the next session."""
        idle = self._idle[address]
        if link.conn.state is not State.DONE or len(idle) >= self.config.warm + 2 or not link.ready_for_session():
            return False
        idle.append(link)
        return True

    async def take(self, address: Address) -> SessionLink:
        idle = self._idle[address]
        while idle:
            link = idle.popleft()
            if link.ready_for_session():
                break
            await link.aclose()
        else:
            link = await self._connect(address)
        self._refill(address)
        return link

    async def _connect(self, address: Address) -> SessionLink:
        connected = await self.transport.connect(address)
        link = SessionLink(connected, Role.CLIENT, self.config.node_name, keepalive=self.config.keepalive)
        try:
            with trio.fail_after(10):
                await link.handshake()
        except BaseException:
            await link.aclose()
            raise
        await self.nursery.start(self._run, address, link)
        return link

    async def _run(
        self, address: Address, link: SessionLink, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run ``link`` in the daemon's nursery; it reports its own failures and never raises.

        A link that ends while it waits in the pool (its peer restarted) is
        closed and forgotten at once: its socket is not kept until a session
        would have found it dead.
        """
        await link.run(task_status=task_status)
        idle = self._idle[address]
        if link in idle:
            idle.remove(link)
            await link.aclose()

    def _refill(self, address: Address) -> None:
        if address not in self._filling and self.config.warm:
            self._filling.add(address)
            self.nursery.start_soon(aio.guarded, log, f"warming links to {address}", partial(self._fill, address))

    async def _fill(self, address: Address) -> None:
        try:
            idle = self._idle[address]
            while sum(link.alive for link in idle) < self.config.warm:
                idle.append(await self._connect(address))
        except (TransportError, ProtocolError, trio.TooSlowError) as exc:
            log.debug("cannot warm a link to %s: %s", address, exc)
        finally:
            self._filling.discard(address)


@dataclass(frozen=True)
class Caller:
    pid: int
    uid: int
    gid: int
    user: str


class AgentSession:
    """One stand-in and its remote program."""

    def __init__(self, sock: trio.socket.SocketType, pool: PeerPool, config: RexecConfig, pidmaps: PidmapDir) -> None:
        self.sock = sock
        self.pool = pool
        self.config = config
        self.pidmaps = pidmaps
        self.decoder = FrameDecoder(max_payload=local.MAX_REQUEST)
        #: Received from the stand-in, not yet paired with a spec; None once the request was read (only it carries fds).
        self.fds: list[int] | None = []
        self._relayed: dict[int, tuple[FdSpec, int]] = {}  # paired, not yet owned by a relay
        self.carried: dict[int, tuple[FdSpec, int]] = {}  # channel -> its fd: each link's relays get a copy
        self.link: SessionLink | None = None
        self.resume: tuple[str, str] | None = None  # (name, secret): how the session is carried on
        self._relinked = trio.Event()  # set (and replaced) when another link carries the session
        self._unsent: list[Signal] = []  # signals for a link that was lost, sent on the next
        self.address: Address | None = None
        self.pidmap_pids: list[int] = []
        self.remote_pid = 0
        self.bridge_channels = iter(BRIDGE_CHANNELS)
        self.monitors: set[int] = set()  # fd numbers of the program's QMP monitor listeners
        self.delivering: set[Relay] = set()  # bridged connections' relays: their last bytes precede the exit
        self.bridged = 0  # connections to the program's bridged listeners being relayed
        self.consoles: console.SessionConsoles | None = None
        self.caller: Caller | None = None  # SO_PEERCRED's, or an adopted session's from its facts
        self._hung_up = False  # the session was cut short: its link is not reused
        self.keep: keep.Keep | None = None  # what of the session outlives this server
        self.adopted: keep.Kept | None = None  # what the server before a restart kept, until taken over

    # -- talking to the stand-in -------------------------------------------------

    async def tell(self, type: int, document: dict, fds: Sequence[int] = ()) -> None:
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))] if fds else []
        with contextlib.suppress(OSError):
            await self.sock.sendmsg([local.encode(type, document)], rights)

    async def refuse(self, code: int, message: str) -> None:
        log.info("stand-in refused: %s", message)
        await self.tell(local.L_REFUSED, {"code": code, "message": message})

    async def next_message(self) -> tuple[int, dict] | None:
        """The next frame from the stand-in (collecting passed fds), or None at EOF."""
        while True:
            frame = self.decoder.next_frame()
            if frame is CLOSED:
                return None
            if isinstance(frame, Frame):
                return frame.type, local.decode(frame.payload)
            assert frame is NEED_DATA
            data, ancdata, flags, _ = await self.sock.recvmsg(
                65536, socket.CMSG_SPACE(MAX_FDS * 4), socket.MSG_CMSG_CLOEXEC
            )
            fds = fdpass.fds_of(ancdata)
            if self.fds is not None:
                self.fds.extend(fds)
            else:
                for fd in fds:
                    os.close(fd)
            if flags & socket.MSG_CTRUNC:
                raise RefusedError("the stand-in passed more file descriptors than one message can carry")
            self.decoder.receive_data(data)

    # -- the session -------------------------------------------------------------------

    async def run(self) -> None:
        """The stand-in's session, from its request, or one the server before a restart carried (`adopt`), from
        its resumption on a new link."""
        try:
            request = None
            if self.adopted is None:
                self.caller = self._caller()
                message = None
                what = f"the stand-in connection of pid {self.caller.pid} (uid {self.caller.uid})"
                with first_request(self.config.request_timeout, log, what):
                    message = await self.next_message()
                if message is None:
                    return
                type, document = message
                if type != local.L_REQUEST:
                    raise RefusedError(f"expected a request, got message {type:#x}", exit_code=EXIT_FAILURE)
                request = self._request(document, self.caller)
            caller = self.caller
            assert caller is not None
            with self.pidmaps.claim(caller.pid), self.pool.held(caller.uid) as held:
                if not held:
                    limit = self.config.max_user_links
                    raise RefusedError(
                        f"uid {caller.uid} holds {limit} connections to peers already; no session",
                        exit_code=EXIT_FAILURE,
                    )
                if request is None:
                    await self._follow(caller, None)
                else:
                    await self._run_remote(caller, request)
        except RefusedError as exc:
            await self.refuse(exc.exit_code, str(exc))
        except TransportError as exc:
            log.info("session to %s failed: %s", self.address, exc)
            host = self.address.display_host if self.address else "the peer"
            await self.tell(local.L_LINK_LOST, {"message": f"link to {host} lost"})
        except (ValueError, KeyError, TypeError, OffloadError) as exc:
            await self.refuse(EXIT_FAILURE, f"bad request: {exc}")
        finally:
            with trio.CancelScope(shield=True):
                await self._cleanup()

    @classmethod
    def adopt(cls, kept: keep.Kept, pool: PeerPool, config: RexecConfig, pidmaps: PidmapDir) -> AgentSession | None:
        """A session the server before a restart carried, to carry on (`run`); takes ``kept``'s fds.

        None (its fds closed, the session forgotten) if it cannot be carried on.
        """
        facts = kept.facts
        keeping = kept.keeping()
        try:
            if "standin" not in kept.fds:
                raise ValueError("no stand-in connection")
            caller = Caller(**facts["caller"])
            address = parse_address(str(facts["address"]))
            resume = (str(facts["name"]), str(facts["secret"]))
            specs = {int(c): FdSpec.from_json(spec) for c, spec in facts["channels"].items()}
            remote_pid, monitors = int(facts["remote_pid"]), {int(fd) for fd in facts["monitors"]}
        except (KeyError, TypeError, ValueError, ConfigError) as exc:
            log.warning("stand-in session %s: its facts do not read (%s); not carried on", kept.name, exc)
            kept.close()
            keeping.forget()
            return None
        standin = socket.socket(fileno=kept.take("standin")[""])
        session = cls(trio.socket.from_stdlib_socket(standin), pool, config, pidmaps)
        session.fds = None
        session.caller, session.address, session.resume = caller, address, resume
        session.remote_pid, session.monitors = remote_pid, monitors
        session.pidmap_pids = [caller.pid]
        session.keep = keeping
        channels = {int(c): fd for c, fd in kept.take("ch").items()}
        session.carried = {c: (specs[c], fd) for c, fd in channels.items() if c in specs}
        for c in channels.keys() - specs.keys():
            os.close(channels[c])
        session.adopted = kept
        log.info("carrying on the session of stand-in %d (remote pid %d)", caller.pid, remote_pid)
        return session

    def _caller(self) -> Caller:
        pid, uid, gid = users.peer_credentials(self.sock)
        if pid <= 0:
            # 0: the caller is outside our pid namespace.  No process of its can be named: not
            # for its pidmap, its ptys or its root, and not as the parent a daemon is adopted by.
            raise RefusedError(f"the caller's pid is not visible here (SO_PEERCRED gave {pid})")
        try:
            user = pwd.getpwuid(uid).pw_name
        except KeyError:
            raise RefusedError(f"uid {uid} has no user name on this machine") from None
        return Caller(pid, uid, gid, user)

    def _request(self, document: dict, caller: Caller) -> ExecRequest:
        self.address = self._target(document.get("target"))
        descriptions = document["fds"]
        # Any local user may send this: entries that are not objects are the request's fault (a refusal).
        if not isinstance(descriptions, list) or not all(isinstance(d, dict) for d in descriptions):
            raise ValueError("fds must be a list of objects")
        passed = [d["fd"] for d in descriptions if d.get("passed")]
        if len(set(passed)) != len(passed):
            raise RefusedError("the stand-in described an fd number twice")
        fds = self.fds or []
        if len(passed) != len(fds):
            raise RefusedError(f"the stand-in announced {len(passed)} fds but passed {len(fds)}")
        plan = policy.plan_fds(descriptions, self.config.shared_path, self.config.leave_behind)
        received = dict(zip(passed, fds, strict=True))
        self._relayed = {number: (spec, received[number]) for number, spec in plan.relayed.items()}
        for number in passed:
            if number not in plan.relayed:  # passed but left behind
                os.close(received[number])
        self.fds = None
        request = ExecRequest(
            argv=tuple(document["argv"]),
            env=policy.filter_environment(dict(document["env"]), self.config.env),
            cwd=document["cwd"] if str(document["cwd"]).startswith("/") else "/",
            umask=int(document["umask"]),
            user=caller.user,
            fds=plan.specs,
            daemon_pidfile=document.get("daemon_pidfile"),
            rlimits=parse_rlimits(document.get("rlimits")),
        )
        return request

    def _target(self, asked: object) -> Address:
        """The configured peer; the stand-in's CMD_NET_ADDR may only name it.

        We connect as root with this node's certificate: the address must be
        the operator's choice, never the caller's (a listener of theirs would
        get our handshake and could answer as it likes).
        """
        if not self.config.peer:
            raise RefusedError("no remote rexec_server: start rexec_server with --peer", exit_code=EXIT_FAILURE)
        peer = parse_address(self.config.peer)
        if not asked:
            return peer
        try:
            address = parse_address(str(asked))
        except ConfigError as exc:
            raise RefusedError(f"CMD_NET_ADDR: {exc}", exit_code=EXIT_FAILURE) from None
        if address != peer:
            log.warning("stand-in asked for %s, which is not a configured peer; refused", address)
            raise RefusedError(f"{asked} is not a configured peer", exit_code=EXIT_FAILURE)
        return peer

    async def _run_remote(self, caller: Caller, request: ExecRequest) -> None:
        assert self.address is not None
        try:
            self.link = link = await self.pool.take(self.address)
        except (TransportError, ProtocolError, trio.TooSlowError) as exc:
            raise RefusedError(f"cannot reach {self.address}: {exc}", exit_code=EXIT_FAILURE) from None
        await link.send(Exec(request))
        reply = await self._answer_to(link, request)
        if isinstance(reply, Refused):
            raise RefusedError(reply.reason, exit_code=reply.code)
        if not isinstance(reply, Started):
            # LinkFailed or Closed: the state machine admits nothing else.
            raise RefusedError(f"link to {self.address.display_host} lost", exit_code=EXIT_FAILURE)
        self.remote_pid = reply.pid
        await self._publish_pidmap(caller.pid)
        self.monitors = console.monitor_fds(request.argv)
        if reply.session:
            self.resume = (reply.session, reply.secret)
        await self._follow(caller, link)

    async def _follow(self, caller: Caller, link: SessionLink | None) -> None:
        """Relay the session until its end is told: on ``link``, then on each that replaces a lost one
        (an adopted session starts without one)."""
        async with aio.open_nursery() as nursery:
            self.consoles = console.SessionConsoles(caller.pid, nursery, self._relay_pty)
            listeners = {spec.fd: fd for spec, fd in self._relayed.values() if spec.kind is FdKind.LISTENER}
            self.carried.update((s.channel, (s, fd)) for s, fd in self._relayed.values() if s.channel)
            for spec, fd in self._relayed.values():
                if spec.kind is not FdKind.LISTENER and not spec.channel:
                    os.close(fd)  # /dev/null or a shared file: the peer opens its own, nothing is relayed
            self._relayed = {}
            if self.adopted is None:
                self._keep(caller, listeners)
            else:
                listeners = {int(fd): held for fd, held in self.adopted.take("l").items()}
                self._take_over(self.adopted, nursery, caller)
            for target_fd, fd in listeners.items():
                nursery.start_soon(self._bridge_listener, target_fd, fd, caller)
            nursery.start_soon(self._from_stand_in, nursery, caller)
            carried = link is not None or await self._resumed()
            while carried and await self._attend():
                carried = await self._resumed()
            nursery.cancel_scope.cancel()

    def _keep(self, caller: Caller, listeners: dict[int, int]) -> None:
        """Keep what the session needs to outlive this server in the fd store (`offload.rexec.keep`)."""
        if self.resume is None or self.address is None:
            return  # daemon mode: it ends with its link
        self.keep = keep.Keep("agent", self.resume[0], root=caller.uid == 0)
        start = keep.start_of(caller.pid)
        if start is None:
            return
        self.keep.record(
            {
                "name": self.resume[0],
                "secret": self.resume[1],
                "pid": caller.pid,
                "start": start,
                "caller": dataclasses.asdict(caller),
                "address": str(self.address),
                "remote_pid": self.remote_pid,
                "monitors": sorted(self.monitors),
                "channels": {channel: spec.to_json() for channel, (spec, _) in self.carried.items()},
            },
            {
                "standin": self.sock.fileno(),
                **{f"ch{channel}": fd for channel, (_, fd) in self.carried.items()},
                **{f"l{target_fd}": fd for target_fd, fd in listeners.items()},
            },
        )
        if self.consoles is not None:
            self.consoles.keep = self.keep

    def _take_over(self, adopted: keep.Kept, nursery: trio.Nursery, caller: Caller) -> None:
        """An adopted session's connections from libvirt and its ptys go on where they were."""
        assert self.consoles is not None
        self.consoles.keep = self.keep
        for host_index, master in adopted.take("p").items():
            self.consoles.adopt(int(host_index), master)
        for name, fd in adopted.take("b").items():
            target_fd, conn = (int(part) for part in name.split("x"))
            sock = socket.socket(fileno=fd)
            nursery.start_soon(self._bridge, target_fd, caller, sock, conn)
        adopted.close()
        self.adopted = None

    async def _attend(self) -> bool:
        """Carry the session on ``self.link`` until its end was told (False) or the link was lost (True)."""
        assert self.link is not None
        async with aio.open_nursery() as nursery:
            for spec, fd in self.carried.values():
                inbound = spec.kind in _INBOUND
                end = borrow(os.dup(fd), writing=inbound)
                self.link.add_channel(spec.channel)
                outbound = spec.kind in (FdKind.PIPE_IN, FdKind.SOCKET)
                nursery.start_soon(self._relay, self.link, spec.channel, end, inbound, outbound)
            with contextlib.suppress(TransportError):  # a link lost again: they wait for the next
                for event in list(self._unsent):
                    await self.link.send(event)
                    self._unsent.remove(event)
            lost = await self._from_peer()
            nursery.cancel_scope.cancel()
        return lost

    async def _resumed(self) -> bool:
        """Carry the session on over another link, within the resume window; False (the stand-in told) if not."""
        assert self.address is not None and self.resume is not None
        if self.link is not None:
            await self.link.aclose()
        host = self.address.display_host
        log.info(
            "link to %s lost under remote pid %d; resuming it for up to %.0f s",
            host,
            self.remote_pid,
            self.config.resume_window,
        )
        delay = 0.05
        with trio.move_on_after(self.config.resume_window):
            while True:
                link: SessionLink | None = None
                reply: object = None
                try:
                    link = await self.pool.take(self.address)
                    await link.send(Resume(*self.resume, tuple(sorted(self.carried))))
                    reply = await link.control.receive()
                except (TransportError, ProtocolError, trio.TooSlowError) as exc:
                    reply = LinkFailed(exc)
                finally:
                    # Also when cancelled (the stand-in went): a link the peer may resume the session on
                    # is closed, so that the peer ends the program when its window is over.
                    if link is not None and not isinstance(reply, Resumed):
                        with trio.CancelScope(shield=True):
                            await link.aclose()
                if isinstance(reply, Resumed):
                    log.info("session of remote pid %d resumed on a new link to %s", self.remote_pid, host)
                    self.link = link
                    self._relinked.set()
                    self._relinked = trio.Event()
                    return True
                if isinstance(reply, Refused):
                    log.warning("session of remote pid %d not resumed: %s", self.remote_pid, reply.reason)
                    break
                await trio.sleep(delay)
                delay = min(2 * delay, 0.5)
        await self.tell(local.L_LINK_LOST, {"message": f"link to {host} lost"})
        return False

    async def _carried_on(self, link: SessionLink | None, tries: int) -> bool:
        """A relay attached on ``link`` lost its connection (``tries`` times in a row on it): True when it
        may be attached again, once a link carries the session; False if it may not.

        While ``link`` lives the relay is attached again on it, after a
        moment (the relay's connection may have gone before its link, whose
        server stops), a few times at most.
        """
        if self.resume is None or self.pool.stopping:
            return False  # stopping: the next server attaches it
        if link is not None and link.alive:
            if tries >= MAX_REATTACH:
                log.warning("session of remote pid %d: a relay could not be attached again", self.remote_pid)
                return False
            await trio.sleep(REATTACH_DELAY)
            return True
        while self.link is link or self.link is None:
            await self._relinked.wait()
        return True

    async def _answer_to(self, link: SessionLink, request: ExecRequest) -> object:
        """The peer's answer to our Exec (Started, Refused, or the link's end), however long it takes.

        A program starts within milliseconds; an answer that keeps us
        waiting is logged every SLOW_ANSWER seconds, with what identifies
        the link, so that a stall can be told from a slow machine.
        """
        waited = 0.0
        while True:
            with trio.move_on_after(SLOW_ANSWER):
                return await link.control.receive()
            waited += SLOW_ANSWER
            log.warning(
                "no answer from %s to the exec of %s for %.0f s (link generation %d, state %s, alive %s)",
                link.peer,
                request.argv[0] if request.argv else "?",
                waited,
                link.generation,
                link.conn.state.value,
                link.alive,
            )

    async def _publish_pidmap(self, pid: int) -> None:
        fd = self.pidmaps.create(pid, self.remote_pid)
        self.pidmap_pids.append(pid)
        try:
            await self.tell(local.L_STARTED, {"pid": self.remote_pid}, [fd])
        finally:
            os.close(fd)  # the stand-in's copy holds the lock from here on

    async def _relay(self, link: SessionLink, channel: int, end: ByteEnd, inbound: bool, outbound: bool) -> None:
        """One channel on ``link``; once both ways ended (not when the link is lost) our fd is let go: the
        caller's reader sees its end of file only once no copy of ours is left."""
        with contextlib.suppress(TransportError):
            await link.relay(channel, end, inbound=inbound, outbound=outbound)
            if link.alive or link.conn.state is State.DONE:
                _, fd = self.carried.pop(channel)
                os.close(fd)
                if self.keep is not None:
                    self.keep.drop(f"ch{channel}")

    async def _bridge_listener(self, target_fd: int, fd: int, caller: Caller) -> None:
        """Carry each connection accepted on the caller's listener to the remote one.

        The daemons' one accept loop serves it: running out of fds pauses
        accepting instead of ending the session, and whatever ends one
        bridged connection (a remote side that refused it, a broken local
        peer) ends that connection only, logged.
        """
        # The stand-in never accepts on it and libvirt closed its copy, so
        # making this description non-blocking disturbs nobody.
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(socket.socket(fileno=fd)))
        try:
            what = f"bridged fd {target_fd} of remote pid {self.remote_pid}"
            serve = partial(self._bridge_one, target_fd, caller)
            await serve_listeners([listener], serve, log, what, self.config.limits)
        finally:
            listener.socket.close()

    async def _bridge_one(self, target_fd: int, caller: Caller, stream: trio.SocketStream) -> None:
        """One connection to the caller's listener (libvirt's monitor), on a connection of its own."""
        await self._bridge(target_fd, caller, socket.socket(fileno=stream.socket.detach()), 0)

    async def _bridge(self, target_fd: int, caller: Caller, sock: socket.socket, conn: int) -> None:
        """Relay ``sock`` (owned) to the program's listener as the host's connection ``conn`` (once it has a
        number: one the server before a restart relayed has it already), attached again each time a lost link
        is replaced.  Files passed back by the remote program are re-opened as the caller; paths of files the
        program here passes are named as it sees them (libvirtd runs chrooted).  A monitor's replies name the
        program's ptys: libvirt opens them, so they must be ours."""
        name = f"bridged fd {target_fd} of remote pid {self.remote_pid}"
        rewrite = None
        if target_fd in self.monitors and self.consoles is not None:
            rewrite = PtyPathRewriter(partial(_from_trio, self.consoles.translate)).feed
        with self.pool.held(caller.uid) as held:
            if self.bridged >= MAX_BRIDGED or not held:
                log.warning("%s: over the session's or the user's connection limit; this one is closed", name)
                attached.close_local(sock)
                return
            self.bridged += 1
            try:
                tries = 0
                while True:
                    link = self.link
                    ticket = await self._ticket(partial(Open, fd=target_fd, conn=conn), name)
                    if ticket is None and link is not None and link.alive and not conn:
                        return  # refused; one attached before is tried again: libvirt must not read an end
                    if ticket is not None:
                        if not conn:
                            conn = ticket[1]
                            if self.keep is not None:
                                self.keep.keep(f"b{target_fd}x{conn}", sock.fileno())
                        relay = await self._attach(
                            ticket[0],
                            sock.dup(),
                            name,
                            shared=self.config.shared_path,
                            user=users.local_user(caller.uid, caller.gid),
                            root=fdpass.peer_root(sock),
                            rewrite=rewrite,
                        )
                        if relay is not None and not relay.link_lost:
                            return
                    tries = tries + 1 if link is self.link else 1
                    if not await self._carried_on(link, tries):
                        return
            finally:
                self.bridged -= 1
                if self._leaving():
                    sock.close()  # the store's copy waits for the next server: libvirt must not see an end
                else:
                    attached.close_local(sock)
                    if self.keep is not None and conn:
                        self.keep.drop(f"b{target_fd}x{conn}")

    async def _relay_pty(self, host_index: int, end: ptys.PtyEnd) -> None:
        """Carry our pty standing for the program's pty ``host_index`` to it, on each link that carries the session."""
        assert self.caller is not None
        name = f"pty {host_index} of remote pid {self.remote_pid}"
        with self.pool.held(self.caller.uid) as held:
            if not held:
                log.warning("%s: over the user's connection limit; not relayed", name)
                end.close()
                return
            tries = 0
            attached_once = False
            while True:
                link = self.link
                ticket = await self._ticket(lambda channel: OpenPty(channel, host_index), name, end.close)
                if ticket is None and link is not None and link.alive and not attached_once:
                    return  # refused
                if ticket is not None:
                    relay = await self._attach(ticket[0], end, name)
                    attached_once |= relay is not None
                    if relay is not None and not relay.link_lost:
                        return
                tries = tries + 1 if link is self.link else 1
                if not await self._carried_on(link, tries) or self.consoles is None:
                    return
                reopened = self.consoles.reopen(host_index)
                if reopened is None:
                    return
                end = reopened

    async def _ticket(
        self, request: Callable[[int], Open | OpenPty], name: str, close: Callable[[], object] | None = None
    ) -> tuple[str, int] | None:
        """Ask the peer for a ticket on a new channel: (token, the peer's number for the connection), or
        None (``close`` called) if it refused or the link was lost."""
        ticket = None
        try:
            while self.link is None:  # an adopted session, not resumed yet
                await self._relinked.wait()
            link = self.link
            channel = next(self.bridge_channels)
            state = link.add_channel(channel)
            try:
                await link.send(request(channel))
            except TransportError:
                state.reset = True
            while state.ticket is None and not state.reset:
                await state.changed.wait()
            link.drop_channel(channel)
            if state.ticket is not None:
                ticket = state.ticket, state.conn
        finally:
            if ticket is None and close is not None:
                close()
        if ticket is None and link.alive:
            log.warning("%s: the peer refused it", name)
        return ticket

    async def _attach(self, token: str, local: ptys.PtyEnd | socket.socket, name: str, **options: Any) -> Relay | None:
        """Relay ``local`` on the connection ``token`` opens until either ends (`attached.attach`'s ``options``).

        The relay, once it ended; None if the connection could not be made.
        """
        assert self.address is not None
        try:
            relay = await attached.attach(
                self.pool.transport, self.address, self.config.node_name, token, local, name, **options
            )
        except (TransportError, trio.TooSlowError) as exc:
            log.warning("%s: %s", name, exc or "no answer")
            return None
        if relay.user is not None:  # a bridged connection's, whose last bytes precede the exit
            self.delivering.add(relay)
        self.pool.relays.add(relay)
        try:
            await run_in_thread(relay)
        finally:
            self.delivering.discard(relay)
            self.pool.relays.discard(relay)
        return relay

    async def _from_stand_in(self, nursery: trio.Nursery, caller: Caller) -> None:
        while True:
            try:
                message = await self.next_message()
            except OSError:
                message = None
            if message is None:
                # The stand-in is gone (killed, perhaps by SIGKILL): the peer ends the
                # program.  (After Exited it is just the stand-in exiting as told.)
                if self.link is None or self.link.conn.state is not State.DONE:
                    log.info("stand-in %d for remote pid %d is gone; ending the session", caller.pid, self.remote_pid)
                await self._hang_up()
                nursery.cancel_scope.cancel()
                return
            type, document = message
            if type == local.L_SIGNAL:
                await self._signal(Signal(messages.signal_number(document.get("signal"), "stand-in")))
            elif type == local.L_ADOPT:
                await self._adopt(int(document.get("pid", 0)), caller)

    async def _signal(self, event: Signal) -> None:
        """Forward a signal; one for a lost link goes on the link that replaces it."""
        if self.link is not None and self.link.alive:
            with contextlib.suppress(TransportError):
                await self.link.send(event)
                return
        if self.resume is None:
            return  # nothing will carry it: the session ends with its link
        self._unsent.append(event)

    async def _adopt(self, pid: int, caller: Caller) -> None:
        """Daemon mode: the detached stand-in (a child of the first) takes over the pidmap."""
        try:
            ours = psutil.Process(pid).ppid() == caller.pid
        except psutil.NoSuchProcess:
            ours = False
        if not ours:
            log.warning("stand-in %d claimed pid %d, which is not its child; refused", caller.pid, pid)
            await self.refuse(EXIT_FAILURE, f"pid {pid} is not a child of the stand-in {caller.pid}")
            return
        for old in self.pidmap_pids:
            self.pidmaps.remove(old)
        self.pidmap_pids.clear()
        await self._publish_pidmap(pid)

    async def _from_peer(self) -> bool:
        """Follow the session on its link until its end was told (False) or the link was lost (True)."""
        assert self.link is not None and self.address is not None
        async for event in self.link.control:
            if isinstance(event, Exited):
                await self._drain_inbound()
                await self.tell(local.L_EXITED, event.to_json())
                return False
            if isinstance(event, Refused):  # the program ran, its daemon was not followed
                await self._drain_inbound()
                await self.refuse(event.code, event.reason)
                return False
            if isinstance(event, Daemonized):
                self.remote_pid = event.pid
                await self._drain_inbound(bridged=False)  # the daemon goes on with them
                await self.tell(local.L_DAEMONIZED, {"code": event.code, "pid": event.pid})
            elif isinstance(event, LinkFailed | Closed):
                if self.resume is not None:
                    return True
                await self.tell(local.L_LINK_LOST, {"message": f"link to {self.address.display_host} lost"})
                return False
        return False

    async def _drain_inbound(self, bridged: bool = True) -> None:
        """Deliver every byte the program wrote before reporting how it ended."""
        assert self.link is not None
        self.link.finish_inbound()
        for spec, _ in list(self.carried.values()):
            if spec.kind in _INBOUND:
                await self.link.wait_drained(spec.channel)
        # Its bridged connections' last bytes (qemu's SHUTDOWN event), too: libvirt tells a
        # shutdown from a crash by them.  A relay that the peer never ends is not waited for long.
        for relay in list(self.delivering) if bridged else ():
            if not await attached.waited(relay.delivered, DELIVERY_WAIT):
                log.info("%s: not delivered %.0f s after the exit; not waiting for it", relay.name, DELIVERY_WAIT)
                break

    async def _cleanup(self) -> None:
        if self.adopted is not None:
            self.adopted.close()
        if self._leaving():
            # Kept for the next server: nothing is said to anyone, no file removed.
            log.info("session of remote pid %d kept for the next rexec_server", self.remote_pid)
            self._close_fds()
            if self.link is not None:
                await self.link.aclose()
            return
        # This server stops under a running session: its stand-in reads the end of our
        # connection as a lost link, so the program must not wait to be resumed.
        await self._hang_up()
        self._close_fds()
        for pid in self.pidmap_pids:
            self.pidmaps.remove(pid)
        if self.keep is not None:
            self.keep.forget()
        # A link whose session was cut short (Hangup: its relays were cancelled, perhaps halfway
        # through a TLS record) is never given to another session.
        reusable = self.link is not None and self.link.conn.state is State.DONE and not self._hung_up
        if self.link is not None and not (reusable and self.address and self.pool.give_back(self.address, self.link)):
            await self.link.aclose()

    async def _hang_up(self) -> None:
        """Tell the peer the caller is gone, if the session runs on a live link: said, not left to the link's
        end, since a session outlives its link (during an outage the peer ends the program once its resume
        window is over).  The program's end may cross it (the link is then DONE: nothing to say)."""
        if self.link is not None and self.link.alive and self.link.conn.state is State.RUNNING:
            with trio.move_on_after(1), contextlib.suppress(TransportError, ProtocolError):
                await self.link.send(Hangup())
            self._hung_up = True

    def _leaving(self) -> bool:
        """This server stops under a session it keeps for the next: it is left as it is."""
        return self.pool.stopping and self.keep is not None and self.keep.enabled

    def _close_fds(self) -> None:
        if self.consoles is not None:
            self.consoles.close()
        for fd in self.fds or ():
            os.close(fd)
        self.fds = None
        for _, fd in (*self._relayed.values(), *self.carried.values()):
            os.close(fd)
        self._relayed = {}
        self.carried = {}
        with contextlib.suppress(OSError):
            self.sock.close()


async def serve_stand_ins(
    config: RexecConfig,
    pool: PeerPool,
    pidmaps: PidmapDir,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept stand-ins on the agent socket until cancelled."""

    async def session(stream: trio.SocketStream) -> None:
        await AgentSession(stream.socket, pool, config, pidmaps).run()

    # Anyone may ask; SO_PEERCRED says who asked, and the peer runs the
    # program as that user (libvirt starts qemu as libvirt-qemu, not root).
    listener = await listen_unix(config.agent_socket, 0o666)
    task_status.started(config.agent_socket)
    try:
        await serve_listeners([listener], session, log, "stand-in", config.limits)
    finally:
        listener.socket.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(config.agent_socket)


def _from_trio(function: Callable[[int], int | None], argument: int) -> int | None:
    """``function(argument)`` run by trio, for a relay thread; None once trio has ended."""
    try:
        return trio.from_thread.run_sync(function, argument)
    except trio.RunFinishedError:
        return None
