"""udsproxyd: carry UNIX socket connections to the machine where the socket lives.

Locally it answers the LD_PRELOAD shim (native/qtfs_shim.c) on
``<run dir>/udsproxy.sock``: a request names a path that does not exist
here; udsproxyd asks its peer to connect to that path there and, when the
peer did, hands the shim one end of a socketpair whose other end it relays
to the peer.  Towards the peer it is the acting side for requests that
come from there.  Both sides enforce their own ``--allow`` prefixes; one
authenticated connection per proxied connection, so a slow reader only
ever slows its own connection (TCP flow control).
"""

from __future__ import annotations

import argparse
import contextlib
import errno as errno_module
import logging
import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

import trio

from offload import aio
from offload import log as log_module
from offload.errors import ProtocolError, TransportError
from offload.net import Address, Transport, listen_unix, listener_address, parse_address
from offload.protocol import udsproxy as wire
from offload.protocol.framing import NEED_DATA, Frame, FrameDecoder, encode_frame
from offload.rexecd.policy import is_shared

log = logging.getLogger("udsproxyd")

SHIM_CONNECT = 0x50
SHIM_CONNECTED = 0x51
CONNECT_TIMEOUT = 5.0
_TYPES: dict[int, str] = {socket.SOCK_STREAM: "stream", socket.SOCK_SEQPACKET: "seqpacket"}


@dataclass(frozen=True)
class ProxyConfig:
    listen: tuple[str, ...]
    peer: str
    allow: tuple[str, ...]
    run_dir: str = "/var/run/udsproxy"
    node: str = ""

    @property
    def shim_socket(self) -> str:
        return str(Path(self.run_dir) / "udsproxy.sock")

    @property
    def node_name(self) -> str:
        return self.node or os.uname().nodename


def errno_name(number: int) -> str:
    return errno_module.errorcode.get(number, "EIO")


def errno_number(name: str) -> int:
    value = getattr(errno_module, name, None) if name.startswith("E") else None
    return value if isinstance(value, int) else errno_module.EIO


class PeerStream:
    """A udsproxy connection over an authenticated stream: events in, events out."""

    def __init__(self, stream: trio.abc.Stream, client: bool) -> None:
        self.stream = stream
        self.conn = wire.UdsProxyConnection(client)

    async def send(self, event: wire.Event) -> None:
        await self.stream.send_all(self.conn.send(event))

    async def next(self) -> wire.Event:
        while (event := self.conn.next_event()) is None:
            self.conn.receive_data(bytes(await self.stream.receive_some(wire.MAX_DATA + 64)))
        return event


async def relay(peer: PeerStream, local: trio.socket.SocketType, seqpacket: bool) -> None:
    """Bytes (or packets) both ways; end of file each way is carried as a half-close."""

    async def local_to_peer() -> None:
        while True:
            data, ancdata, _, _ = await local.recvmsg(wire.MAX_DATA, socket.CMSG_SPACE(253 * 4))
            passed = [
                payload for level, kind, payload in ancdata if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS
            ]
            if passed:
                # Carrying fds is not implemented yet; dropping them quietly
                # would lose them, so the connection ends, loudly.
                count = 0
                for payload in passed:
                    for (fd,) in struct.iter_unpack("i", payload[: len(payload) - len(payload) % 4]):
                        os.close(fd)
                        count += 1
                log.error(
                    "a program passed %d fd(s) over a proxied connection; fd passing is not carried yet, closing it",
                    count,
                )
                raise TransportError("file descriptors cannot be carried yet")
            if not data:
                break
            await peer.send(wire.Data(data))
        await peer.send(wire.Eof())

    async def peer_to_local(cancel: trio.CancelScope) -> None:
        while True:
            event = await peer.next()
            if isinstance(event, wire.Data):
                view = memoryview(event.data)
                if seqpacket:
                    await local.send(view)
                    continue
                while view:
                    view = view[await local.send(view) :]
            elif isinstance(event, wire.Eof):
                with contextlib.suppress(OSError):
                    local.shutdown(socket.SHUT_WR)
                return
            else:  # the peer went away without an end of file
                cancel.cancel()
                return

    async with aio.open_nursery() as nursery:
        nursery.start_soon(local_to_peer)
        nursery.start_soon(peer_to_local, nursery.cancel_scope)


class Daemon:
    def __init__(self, config: ProxyConfig, transport: Transport) -> None:
        self.config = config
        self.transport = transport
        self.peer: Address | None = parse_address(config.peer) if config.peer else None

    # -- the shim's side ---------------------------------------------------------------

    async def serve_shim(self, sock: trio.socket.SocketType) -> None:
        with sock:
            decoder = FrameDecoder(max_payload=1024)
            frame: Frame | object = NEED_DATA
            with trio.move_on_after(CONNECT_TIMEOUT):
                while frame is NEED_DATA:
                    data = await sock.recv(1024)
                    decoder.receive_data(data)
                    try:
                        frame = decoder.next_frame()
                    except ProtocolError as exc:
                        log.warning("bad request from the shim: %s", exc)
                        return
            if not isinstance(frame, Frame) or frame.type != SHIM_CONNECT or len(frame.payload) < 3:
                log.warning("bad request from the shim: %r", frame)
                return
            (kind,) = struct.unpack("!H", frame.payload[:2])
            path = frame.payload[2:].decode(errors="surrogateescape")
            error, peer = await self._open(path, kind)
            reply = encode_frame(SHIM_CONNECTED, 0, struct.pack("!I", error))
            if peer is None:
                await sock.send(reply)
                return
            ours, theirs = socket.socketpair(socket.AF_UNIX, kind)
            try:
                await sock.sendmsg([reply], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", theirs.fileno()))])
            finally:
                theirs.close()
        async with peer.stream:
            with (
                trio.socket.from_stdlib_socket(ours) as local,
                contextlib.suppress(TransportError, trio.BrokenResourceError, ProtocolError, OSError),
            ):
                await relay(peer, local, kind == socket.SOCK_SEQPACKET)

    async def _open(self, path: str, kind: int) -> tuple[int, PeerStream | None]:
        """Ask the peer to connect to ``path``: (0, stream) or (errno, None)."""
        if kind not in _TYPES:
            return errno_module.EPROTOTYPE, None
        try:
            request = wire.Connect(path, _TYPES[kind])
        except ValueError as exc:
            log.warning("refused %r: %s", path, exc)
            return errno_module.EINVAL, None
        if not is_shared(path, self.config.allow):
            log.warning("refused %s: not under an --allow prefix here", path)
            return errno_module.EACCES, None
        if self.peer is None:
            return errno_module.EHOSTUNREACH, None
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                connected = await self.transport.connect(self.peer)
                peer = PeerStream(connected.stream, client=True)
                await peer.send(wire.Hello(self.config.node_name))
                await peer.next()
                await peer.send(request)
                answer = await peer.next()
        except (TransportError, ProtocolError, trio.TooSlowError, trio.BrokenResourceError) as exc:
            log.warning("cannot carry %s to %s: %s", path, self.peer, exc or "timed out")
            return errno_module.EHOSTUNREACH, None
        if not isinstance(answer, wire.Connected) or answer.error:
            await trio.aclose_forcefully(connected.stream)
            reason = answer.error if isinstance(answer, wire.Connected) else "EIO"
            log.info("%s on %s: %s", path, self.peer, reason)
            return errno_number(reason), None
        return 0, peer

    # -- the peer's side ----------------------------------------------------------------

    async def serve_peer(self, raw: trio.SocketStream, where: str) -> None:
        try:
            connected = await self.transport.accept(raw, where)
        except (TransportError, trio.TooSlowError) as exc:
            log.warning("refused a connection from %s: %s", where, exc)
            await trio.aclose_forcefully(raw)
            return
        async with connected.stream:
            peer = PeerStream(connected.stream, client=False)
            try:
                with trio.fail_after(CONNECT_TIMEOUT):
                    await peer.send(wire.Hello(self.config.node_name))
                    await peer.next()
                    request = await peer.next()
                if not isinstance(request, wire.Connect):
                    return
                try:
                    local = await self._connect_here(request)
                except OSError as exc:
                    await peer.send(wire.Connected(errno_name(exc.errno or errno_module.EIO)))
                    return
                await peer.send(wire.Connected())
                with local:
                    await relay(peer, local, request.type == "seqpacket")
            except (TransportError, ProtocolError, trio.TooSlowError, trio.BrokenResourceError, OSError) as exc:
                log.warning("connection from %s ended: %s", connected.peer, exc or type(exc).__name__)

    async def _connect_here(self, request: wire.Connect) -> trio.socket.SocketType:
        """Connect to the requested socket on this machine; OSError carries the errno to answer."""
        if not is_shared(request.path, self.config.allow):
            log.warning("peer asked for %s, which is not under an --allow prefix here", request.path)
            raise PermissionError(errno_module.EACCES, "not allowed")
        kind = socket.SOCK_SEQPACKET if request.type == "seqpacket" else socket.SOCK_STREAM
        sock = trio.socket.socket(socket.AF_UNIX, kind)
        try:
            await sock.connect(request.path)
        except BaseException:
            sock.close()
            raise
        return sock


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

        async def accept_peers(listener: trio.SocketListener) -> None:
            async with aio.open_nursery() as sessions:
                while True:
                    raw = await listener.accept()
                    sessions.start_soon(
                        aio.guarded, log, "peer connection", lambda r=raw: daemon.serve_peer(r, _where(r))
                    )

        async def accept_shims() -> None:
            async with aio.open_nursery() as sessions:
                while True:
                    sock, _ = await shim.socket.accept()
                    sessions.start_soon(aio.guarded, log, "shim request", lambda s=sock: daemon.serve_shim(s))

        for listener in listeners:
            nursery.start_soon(accept_peers, listener)
        nursery.start_soon(accept_shims)
        bound = [listener_address(listener) for listener in listeners]
        log.info("udsproxyd ready: peers on %s, shim on %s", ", ".join(bound) or "-", config.shim_socket)
        task_status.started(bound)


def _where(raw: trio.SocketStream) -> str:
    try:
        name = raw.socket.getpeername()
    except OSError:
        return "?"
    return f"{name[0]}:{name[1]}" if isinstance(name, tuple) else str(name or "unix peer")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="udsproxyd", description="Carry UNIX socket connections to the peer machine.")
    parser.add_argument(
        "--listen", action="append", default=[], metavar="ADDR", help="address for the peer's connections"
    )
    parser.add_argument("--peer", default="", metavar="ADDR", help="the peer udsproxyd")
    parser.add_argument(
        "--allow", action="append", default=[], metavar="PREFIX", help="socket path prefix carried (repeatable)"
    )
    parser.add_argument("--pki", metavar="DIR", help="TLS credentials (default /etc/offload/pki)")
    parser.add_argument("--insecure", action="store_true", help="plaintext, unauthenticated (tests only)")
    parser.add_argument("--run-dir", default="/var/run/udsproxy", metavar="DIR")
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
        config = ProxyConfig(tuple(args.listen), args.peer, tuple(args.allow), args.run_dir, args.node)
        return config, Transport.from_options(args.pki, args.insecure)

    aio.run_service(log, serve, build)


if __name__ == "__main__":
    main()
