"""udsproxyd: carry UNIX socket connections to the machine where the socket lives.

The shim (native/qtfs_shim.c) asks on ``<run dir>/udsproxy.sock`` for a path
that does not exist here; udsproxyd asks its peer to connect to it there,
as the caller's mapped user, and hands the shim one end of a socketpair
whose other end a `Relay` carries.  What each side checks, and as whom it
acts, is in README.md ("udsproxyd") and SECURITY.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno as errno_module
import logging
import math
import os
import socket
import stat
import struct
from pathlib import Path
from typing import Any

import trio

from offload import aio, fdpass, users
from offload import log as log_module
from offload.errors import (
    ConfigError,
    ProtocolError,
    RefusedError,
    TransportError,
    UnsupportedFdError,
    errno_name,
    errno_number,
)
from offload.net import (
    REQUEST_TIMEOUT,
    Address,
    Transport,
    first_request,
    listen_unix,
    listener_address,
    parse_address,
    remote_name,
    serve_listeners,
    translate_errors,
)
from offload.prefix import is_shared, open_beneath
from offload.protocol import udsproxy as wire
from offload.protocol.framing import Frame, FrameDecoder
from offload.udsproxy.relay import (
    CONTROL_SPACE,
    LOCAL_BUFFER,
    Relay,
    Submission,
    close_all,
    detach,
    prepare_all,
    run_in_thread,
)

log = logging.getLogger("udsproxyd")

CONNECT_TIMEOUT = 5.0
#: The biggest shim request: one sendmsg's bytes with fds (the shim sends at most this much at once).
MAX_SHIM_REQUEST = wire.MAX_DATA
_TYPES: dict[int, str] = {socket.SOCK_STREAM: "stream", socket.SOCK_SEQPACKET: "seqpacket"}
#: SO_PEERGROUPS (Linux 4.13): the peer's supplementary groups as they were at connect().
_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
#: Python's getsockopt takes at most 1024 bytes: 256 groups.  A caller in
#: more groups (ERANGE) acts with its account's groups instead.
_GROUPS_SPACE = 1024


@dataclasses.dataclass(frozen=True)
class ProxyConfig:
    listen: tuple[str, ...]
    peer: str
    allow: tuple[str, ...]
    run_dir: str = "/var/run/udsproxy"
    node: str = ""
    #: Where regular files passed with SCM_RIGHTS are the same files on both machines.
    share: tuple[str, ...] = ()
    #: CALLER=LOCAL: the peer's user CALLER acts as LOCAL here (root acts as nobody unless mapped).
    user_map: tuple[str, ...] = ()
    #: Seconds the shim has to send its whole request before its connection is closed.
    request_timeout: float = REQUEST_TIMEOUT

    def __post_init__(self) -> None:
        if not self.request_timeout > 0:
            raise ConfigError(f"request timeout {self.request_timeout} must be positive")
        for item in self.user_map:
            if item.count("=") != 1 or not all(item.split("=")):
                raise ConfigError(f"user map {item!r} is not CALLER=LOCAL")

    @property
    def users(self) -> dict[str, str]:
        return users.squashing_root(dict(item.split("=", 1) for item in self.user_map))

    @property
    def shim_socket(self) -> str:
        return str(Path(self.run_dir) / "udsproxy.sock")

    @property
    def node_name(self) -> str:
        return self.node or os.uname().nodename


def shim_caller(sock: trio.socket.SocketType) -> tuple[users.RemoteUser, str]:
    """The program that asked the shim: its account (SO_PEERCRED, SO_PEERGROUPS) and its root directory."""
    groups: tuple[int, ...] | None = None
    pid, uid, gid = users.peer_credentials(sock)
    with contextlib.suppress(OSError):
        raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, _GROUPS_SPACE)
        groups = struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) - len(raw) % 4])
    return users.local_user(uid, gid, groups), fdpass.root_of(pid) if pid > 0 else "/"


class PeerStream:
    """The setup of a udsproxy connection over an authenticated stream: events in, events out."""

    def __init__(self, stream: trio.abc.Stream, client: bool) -> None:
        self.stream = stream
        self.client = client
        self.conn = wire.UdsProxyConnection(client)

    async def send(self, event: wire.Event) -> None:
        await self.stream.send_all(self.conn.send(event))

    async def next(self) -> wire.Event:
        while (event := self.conn.next_event()) is wire.NEED_DATA:
            self.conn.receive_data(bytes(await self.stream.receive_some(64 << 10)))
        return event


class Daemon:
    def __init__(self, config: ProxyConfig, transport: Transport) -> None:
        self.config = config
        self.transport = transport
        self.peer: Address | None = parse_address(config.peer) if config.peer else None
        #: Carried connections by the inode of the socket the shim holds.
        self.relays: dict[int, Relay] = {}
        # One thread per carried connection: trio's default limit (40) would
        # make the 41st connection wait for another to end.
        self.threads = trio.CapacityLimiter(math.inf)

    def _relay(self, peer: PeerStream, local: socket.socket, user: users.RemoteUser, root: str, name: str) -> Relay:
        """The `Relay` that carries on the connection ``peer`` set up (not used again), between its link and ``local``."""
        link, cipher = detach(peer.stream)
        return Relay(
            link,
            cipher,
            local,
            client=peer.client,
            seqpacket=local.type == socket.SOCK_SEQPACKET,
            shared=self.config.share,
            user=user,
            root=root,
            leftover=peer.conn.leftover(),
            name=name,
        )

    # -- the shim's side ---------------------------------------------------------------

    async def serve_shim(self, stream: trio.SocketStream) -> None:
        sock = stream.socket
        passed: list[int] = []
        try:
            request = None
            with first_request(self.config.request_timeout, log, "a shim connection"):
                request = await self._shim_request(sock, passed)
            if request is None:
                return
            kind, payload = request
            if kind == wire.SHIM_CONNECT:
                close_all(passed)  # now: the connection may be carried for long
                await self._shim_connect(sock, payload)
            elif kind == wire.SHIM_SEND_FDS:
                await self._shim_send_fds(sock, payload, passed)
            else:
                log.warning("bad request from the shim: frame type %#x", kind)
        finally:
            close_all(passed)
            sock.close()

    async def _shim_request(self, sock: trio.socket.SocketType, passed: list[int]) -> tuple[int, bytes] | None:
        """One request frame (and the fds that came with it), or None after logging why not."""
        decoder = FrameDecoder(MAX_SHIM_REQUEST + 1024)
        received = 0
        while True:
            data, ancillary, flags, _ = await sock.recvmsg(64 << 10, CONTROL_SPACE, socket.MSG_CMSG_CLOEXEC)
            passed.extend(fdpass.fds_of(ancillary))
            # Each piece may bring fds: a shim that sends its request a byte at
            # a time must not make us hold more than one sendmsg can carry.
            if flags & socket.MSG_CTRUNC or len(passed) > wire.MAX_FDS:
                log.warning("bad request from the shim: too many fds")
                return None
            if not data:
                log.warning("bad request from the shim: it ended after %d bytes", received)
                return None
            received += len(data)
            try:
                decoder.receive_data(data)
                if isinstance(frame := decoder.next_frame(), Frame):
                    return frame.type, frame.payload
            except ProtocolError as exc:
                log.warning("bad request from the shim: %s", exc)
                return None

    async def _shim_connect(self, sock: trio.socket.SocketType, payload: bytes) -> None:
        try:
            kind, path = wire.shim_connect_request(payload)
        except ValueError as exc:
            log.warning("bad connect request from the shim: %s", exc)
            await sock.send(wire.shim_reply(wire.SHIM_CONNECTED, errno_module.EINVAL))
            return
        try:
            # Whom the far side acts for; fds passed back are re-opened here as this user.
            caller, root = shim_caller(sock)
        except RefusedError as exc:
            log.warning("refused %r: %s", path, exc)
            await sock.send(wire.shim_reply(wire.SHIM_CONNECTED, errno_module.EACCES))
            return
        error, peer = await self._open(path, kind, caller.name)
        reply = wire.shim_reply(wire.SHIM_CONNECTED, error)
        if peer is None:
            await sock.send(reply)
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC)
        try:
            # The program's end too: its writes reach the relay in bigger steps.
            theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, LOCAL_BUFFER)
            key = os.fstat(theirs.fileno()).st_ino
            await sock.sendmsg([reply], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", theirs.fileno()))])
            relay = self._relay(peer, ours, caller, root, path)
        except BaseException:
            ours.close()
            await trio.aclose_forcefully(peer.stream)
            raise
        finally:
            theirs.close()
        self.relays[key] = relay
        try:
            await run_in_thread(relay, self.threads)
        finally:
            self.relays.pop(key, None)

    async def _shim_send_fds(self, sock: trio.socket.SocketType, payload: bytes, passed: list[int]) -> None:
        """A sendmsg with SCM_RIGHTS on a carried socket (the first of ``passed``): the fds travel in order with its bytes."""
        if len(passed) < 2:
            log.warning("bad fd request from the shim: %d fds", len(passed))
            error = errno_module.EINVAL
        elif (relay := self.relays.get(os.fstat(passed[0]).st_ino)) is None:
            error = errno_module.EPIPE  # the connection is no longer carried
        else:
            try:
                prepared = prepare_all(passed[1:], self.config.share, fdpass.peer_root(sock))
            except UnsupportedFdError as exc:
                log.error(
                    "%s: refused a sendmsg passing fd #%d of %d: it is %s, which cannot be carried",
                    relay.name,
                    passed.index(exc.fd),
                    len(passed) - 1,
                    exc.kind,
                )
                error = errno_module.EOPNOTSUPP
            else:
                close_all(passed)
                # The relay thread answers once the far side has delivered the fds.
                answer_to = socket.socket(fileno=sock.detach())

                def answer(code: int) -> None:
                    with answer_to, contextlib.suppress(OSError):
                        answer_to.setblocking(True)
                        answer_to.send(wire.shim_reply(wire.SHIM_SENT, code))

                submission = Submission(payload, prepared, answer)
                if not relay.submit(submission):
                    submission.fail(errno_module.EPIPE)
                return
        close_all(passed)
        await sock.send(wire.shim_reply(wire.SHIM_SENT, error))

    async def _open(self, path: str, kind: int, user: str) -> tuple[int, PeerStream | None]:
        """Ask the peer to connect to ``path`` for ``user``: (0, stream) or (errno, None)."""
        if kind not in _TYPES:
            log.warning("refused %r: socket type %d is not carried", path, kind)
            return errno_module.EPROTOTYPE, None
        try:
            request = wire.Connect(path, _TYPES[kind], user)
        except ValueError as exc:
            log.warning("refused %r: %s", path, exc)
            return errno_module.EINVAL, None
        if not is_shared(path, self.config.allow):
            log.warning("not carrying %s: not under an --allow prefix here", path)
            return wire.SHIM_NOT_CARRIED, None
        if self.peer is None:
            return errno_module.EHOSTUNREACH, None
        try:
            with trio.fail_after(CONNECT_TIMEOUT), translate_errors(self.peer, "carrying a connect to"):
                connected = await self.transport.connect(self.peer)
                try:
                    peer = PeerStream(connected.stream, client=True)
                    await peer.send(wire.Hello(self.config.node_name))
                    await peer.next()
                    await peer.send(request)
                    answer = await peer.next()
                except BaseException:
                    await trio.aclose_forcefully(connected.stream)
                    raise
        except (TransportError, ProtocolError, trio.TooSlowError) as exc:
            log.warning("cannot carry %s to %s: %s", path, self.peer, exc or "timed out")
            return errno_module.EHOSTUNREACH, None
        if not isinstance(answer, wire.Connected) or answer.error:
            await trio.aclose_forcefully(connected.stream)
            reason = answer.error if isinstance(answer, wire.Connected) else "EIO"
            log.info("%s on %s: %s", path, self.peer, reason)
            return errno_number(reason), None
        return 0, peer

    # -- the peer's side ----------------------------------------------------------------

    async def serve_peer(self, raw: trio.SocketStream) -> None:
        connected = await self.transport.admit(raw, remote_name(raw), log)
        if connected is None:
            return
        async with connected.stream:
            peer = PeerStream(connected.stream, client=False)
            try:
                with translate_errors(connected.peer, "serving"):
                    with trio.fail_after(CONNECT_TIMEOUT):
                        await peer.send(wire.Hello(self.config.node_name))
                        await peer.next()
                        request = await peer.next()
                    if not isinstance(request, wire.Connect):
                        log.warning("%s sent %s instead of a connect request", connected.peer, type(request).__name__)
                        return
                    try:
                        user = users.map_user(request.user, self.config.users, self.config.node_name)
                        local = await self._connect_here(request, user)
                    except RefusedError as exc:
                        log.warning("%s asked for %s for user %s: %s", connected.peer, request.path, request.user, exc)
                        await peer.send(wire.Connected("EACCES"))
                        return
                    except OSError as exc:
                        await peer.send(wire.Connected(errno_name(exc.errno or errno_module.EIO)))
                        return
                    try:
                        await peer.send(wire.Connected())
                        relay = self._relay(peer, local, user, fdpass.peer_root(local), request.path)
                    except BaseException:
                        local.close()
                        raise
            except (TransportError, ProtocolError, trio.TooSlowError) as exc:
                log.warning("connection from %s ended: %s", connected.peer, exc or type(exc).__name__)
                return
        await run_in_thread(relay, self.threads)

    async def _connect_here(self, request: wire.Connect, user: users.RemoteUser) -> socket.socket:
        """Connect to the requested socket on this machine as ``user``; OSError carries the errno to answer."""
        if not is_shared(request.path, self.config.allow):
            log.warning("peer asked for %s, which is not under an --allow prefix here", request.path)
            raise PermissionError(errno_module.EACCES, "not allowed")
        kind = socket.SOCK_SEQPACKET if request.type == "seqpacket" else socket.SOCK_STREAM
        allow = self.config.allow

        def connect() -> socket.socket:
            # The socket file is resolved beneath its prefix, then connected
            # to through its O_PATH fd (Linux follows /proc/self/fd/N to the
            # very inode): what was checked is what gets connected to.
            target = open_beneath(request.path, allow, os.O_PATH)
            try:
                if not stat.S_ISSOCK(os.fstat(target).st_mode):
                    raise ConnectionRefusedError(errno_module.ECONNREFUSED, "not a socket", request.path)
                sock = socket.socket(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
                try:
                    # Non-blocking: a full backlog answers EAGAIN rather than holding the thread.
                    sock.connect(f"/proc/self/fd/{target}")
                except BaseException:
                    sock.close()
                    raise
                return sock
            finally:
                os.close(target)

        try:
            return await trio.to_thread.run_sync(users.run_as, user, connect, limiter=self.threads)
        except PermissionError as exc:
            log.warning("peer asked for %s as %s: refused here: %s", request.path, user.name, exc.strerror)
            raise


async def serve(
    config: ProxyConfig, transport: Transport, *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED
) -> None:
    daemon = Daemon(config, transport)
    Path(config.run_dir).mkdir(parents=True, exist_ok=True)
    listeners = []
    for text in config.listen:
        listeners.extend(await transport.listen(parse_address(text)))
    # Anyone may ask: the answer is only ever a socket the caller could
    # have connected to had it lived here, and both sides check --allow.
    shim = await listen_unix(config.shim_socket, 0o666)
    async with aio.open_nursery() as nursery:
        nursery.start_soon(serve_listeners, listeners, daemon.serve_peer, log, "peer", transport.limits)
        nursery.start_soon(serve_listeners, [shim], daemon.serve_shim, log, "shim", transport.limits)
        bound = [listener_address(listener) for listener in listeners]
        log.info("udsproxyd ready: peers on %s, shim on %s", ", ".join(bound) or "-", config.shim_socket)
        task_status.started(bound)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="udsproxyd", description="Carry UNIX socket connections to the peer machine.")
    for option, metavar, text in (
        ("--listen", "ADDR", "address for the peer's connections"),
        ("--allow", "PREFIX", "socket path prefix carried (repeatable)"),
        (
            "--share",
            "PREFIX",
            "path prefix of files that are the same on both machines: passed fds of such files are re-opened there",
        ),
        (
            "--user-map",
            "CALLER=LOCAL",
            "the peer's user CALLER acts as LOCAL here (repeatable); root acts as nobody unless mapped, e.g. root=root",
        ),
    ):
        parser.add_argument(option, action="append", default=[], metavar=metavar, help=text)
    parser.add_argument("--peer", default="", metavar="ADDR", help="the peer udsproxyd")
    Transport.add_arguments(parser, serving=True)
    parser.add_argument("--run-dir", default="/var/run/udsproxy", metavar="DIR")
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=REQUEST_TIMEOUT,
        metavar="SECONDS",
        help=f"seconds the shim has to send its request before its connection is closed (default {REQUEST_TIMEOUT:g})",
    )
    parser.add_argument("--node", default="", metavar="NAME")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("reference", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    log_module.setup("udsproxyd", args.log_level)
    log_module.raise_fd_limit()
    if args.reference:
        # The reference's form: udsproxyd THREADS ADDR PORT PEER_ADDR PEER_PORT (TCP).
        if len(args.reference) != 5:
            parser.error("the reference form is: udsproxyd THREADS ADDR PORT PEER_ADDR PEER_PORT")
        _, host, port, peer_host, peer_port = args.reference
        args.listen.append(f"tcp://{host}:{port}")
        args.peer = f"tcp://{peer_host}:{peer_port}"

    def build() -> tuple[ProxyConfig, Transport]:
        # Each option is named as the field it sets; a repeatable one arrives as a list.
        settings = {name: tuple(value) if isinstance(value, list) else value for name, value in vars(args).items()}
        fields: dict[str, Any] = {field.name: settings[field.name] for field in dataclasses.fields(ProxyConfig)}
        return ProxyConfig(**fields), Transport.from_arguments(args)

    aio.run_service(log, serve, build)


if __name__ == "__main__":
    main()
