"""Addresses and authenticated transports: the I/O seam of every link.

Addresses: ``tcp://HOST:PORT`` (also bare ``HOST:PORT``, as the reference's
CMD_NET_ADDR allows), ``vsock://CID:PORT`` and ``unix:///PATH``.  Links are
mutual TLS 1.3 (`offload.pki`) unless the operator asks for ``--insecure``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import math
import os
import socket
import ssl
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from offload import aio
from offload.errors import AuthenticationError, ConfigError, TransportError
from offload.pki import DEFAULT_PKI_DIR, TlsConfig, peer_identity
from offload.users import peer_credentials

if TYPE_CHECKING:
    from offload.config import RexecConfig

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0
#: How long a local client (a stand-in, the udsproxy shim) has to send its
#: complete first request; after it, a session may wait as long as it likes.
REQUEST_TIMEOUT = HANDSHAKE_TIMEOUT
#: accept() errors that mean "out of resources for now", not "the listener broke"
#: (the ones trio's serve_listeners retries).
ACCEPT_RETRY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: How long an accept loop that ran out of resources waits before it tries again;
#: the pause doubles while the shortage lasts, up to ACCEPT_PAUSE_MAX.
ACCEPT_PAUSE = 0.1
ACCEPT_PAUSE_MAX = 2.0
#: What a TLS handshake reads at a time: a handshake is a few KiB, and an
#: unauthenticated peer must not make us hold more (after it, TlsStream reads 1 MiB).
HANDSHAKE_CHUNK = 16 << 10
#: Refused connections are logged at most this often (seconds), with their count.
REFUSAL_LOG_PAUSE = 10.0


@dataclass(frozen=True)
class ConnectionLimits:
    """How many connections one listener set serves at once: per peer and in total.

    A peer is an IP address, a vsock CID, or on a UNIX socket the caller's
    uid.  A rexec session, udsproxy connection or qtfs mount is one connection.
    """

    total: int = 4096
    #: A VM holds about four: its session's link, its monitor's and console's connections, a spare.
    per_peer: int = 1024

    def __post_init__(self) -> None:
        if not 1 <= self.per_peer <= self.total:
            raise ConfigError(f"connection limits: need 1 <= per peer ({self.per_peer}) <= total ({self.total})")


@dataclass(frozen=True)
class Address:
    scheme: str  # tcp, vsock, unix
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.scheme == "unix":
            return f"unix://{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    @property
    def display_host(self) -> str:
        """How messages name the machine at this address."""
        return self.path if self.scheme == "unix" else self.host


def parse_address(text: str) -> Address:
    """Parse an address; raise ConfigError naming what is wrong with it."""
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "tcp", text  # reference CMD_NET_ADDR also allows HOST:PORT
    if scheme == "unix":
        if not rest.startswith("/"):
            raise ConfigError(f"address {text!r}: a unix address needs an absolute path (unix:///run/x.sock)")
        return Address("unix", path=rest)
    if scheme not in ("tcp", "vsock"):
        raise ConfigError(f"address {text!r}: unknown scheme {scheme!r} (use tcp://, vsock:// or unix://)")
    if rest.startswith("["):
        host, bracket, port_text = rest[1:].partition("]")
        if not bracket or not port_text.startswith(":"):
            raise ConfigError(f"address {text!r}: expected [IPv6]:PORT")
        port_text = port_text[1:]
    else:
        host, colon, port_text = rest.rpartition(":")
        if not colon:
            raise ConfigError(f"address {text!r}: missing :PORT")
    if not host:
        raise ConfigError(f"address {text!r}: missing host")
    if "/" in host:
        raise ConfigError(f"address {text!r}: host {host!r} contains '/' (the form is tcp://HOST:PORT)")
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"address {text!r}: port {port_text!r} is not a number") from None
    if not 0 <= port <= 0xFFFFFFFF if scheme == "vsock" else not 0 <= port <= 65535:
        raise ConfigError(f"address {text!r}: port {port} out of range")
    if scheme == "vsock" and not host.isdigit():
        raise ConfigError(f"address {text!r}: a vsock address needs a numeric CID")
    return Address(scheme, host=host, port=port)


@contextlib.contextmanager
def translate_errors(address: Address | str, action: str) -> Iterator[None]:
    """Turn foreign I/O exceptions into TransportError naming ``address``."""
    try:
        yield
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        cause = exc if isinstance(exc, OSError) else exc.__cause__
        if isinstance(cause, ssl.SSLError):
            raise AuthenticationError(
                f"{action} {address}: TLS failed: {cause.reason or cause}", address=str(address)
            ) from None
        detail = exc.strerror or exc if isinstance(exc, OSError) else f"connection broken ({cause or exc})"
        raise TransportError(f"{action} {address}: {detail}", address=str(address)) from None


class TlsStream(trio.abc.Stream):
    """TLS through memory BIOs over a trio socket stream.

    Two costs shape it.  trio.SSLStream returns at most one TLS record
    (16 KiB) per receive_some, so a relay would pay its per-chunk cost
    sixty-four times per MiB; and an ssl.SSLSocket makes one send or recv
    system call per record.  Here a send encrypts the whole buffer into a
    memory BIO and writes it with one call, and a receive reads up to 1 MiB
    from the socket and decrypts every complete record it holds.  One task
    may send while another receives.
    """

    RAW_CHUNK = 1 << 20

    def __init__(self, raw: trio.SocketStream, context: ssl.SSLContext, *, server_side: bool) -> None:
        self.raw = raw
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(self._incoming, self._outgoing, server_side=server_side)
        self._send_lock = trio.Lock()  # the raw stream allows one sender at a time

    def session(self) -> tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]:
        """The TLS session and its two memory BIOs, for a caller that takes over (udsproxyd's relay thread)."""
        return self._ssl, self._incoming, self._outgoing

    @classmethod
    async def wrap(cls, raw: trio.SocketStream, context: ssl.SSLContext, *, server_side: bool) -> TlsStream:
        stream = cls(raw, context, server_side=server_side)
        try:
            while True:
                try:
                    stream._ssl.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    await stream._flush()
                    # An unauthenticated peer must not make us hold more than a record at a time.
                    await stream._fill(HANDSHAKE_CHUNK)
            await stream._flush()
        except BaseException:
            await trio.aclose_forcefully(raw)
            raise
        return stream

    async def _flush(self) -> None:
        """Send whatever the TLS engine has produced."""
        async with self._send_lock:
            if data := self._outgoing.read():
                await self.raw.send_all(data)

    async def _fill(self, size: int = RAW_CHUNK) -> None:
        # A fresh buffer per read, sized by what arrived: a long-lived 1 MiB
        # buffer per connection would cost 100 MiB at 100 sessions.
        if data := await self.raw.receive_some(size):
            self._incoming.write(data)
        else:
            self._incoming.write_eof()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        limit = max_bytes or 1 << 18
        chunks: list[bytes] = []
        size = 0
        while size < limit:
            try:
                chunk = self._ssl.read(limit - size)
            except ssl.SSLWantReadError:
                if chunks:
                    break
                await self._fill()
                continue
            except ssl.SSLZeroReturnError:
                break  # the peer's close_notify: end of stream
            except ssl.SSLError as exc:
                raise trio.BrokenResourceError(exc) from exc
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if self._outgoing.pending:
            await self._flush()  # e.g. a KeyUpdate answer
        await trio.lowlevel.checkpoint_if_cancelled()
        return b"".join(chunks)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.send_parts((data,))

    async def send_parts(self, parts: tuple[bytes | bytearray | memoryview, ...]) -> None:
        """Encrypt several buffers and send them with one flush (no joining copy)."""
        try:
            for part in parts:
                self._ssl.write(part)
        except ssl.SSLError as exc:
            raise trio.BrokenResourceError(exc) from exc
        await self._flush()

    async def wait_send_all_might_not_block(self) -> None:
        await self.raw.wait_send_all_might_not_block()

    def getpeercert(self) -> dict | None:
        return self._ssl.getpeercert()

    async def aclose(self) -> None:
        await self.raw.aclose()


@dataclass
class Connected:
    """An established, authenticated byte stream and who is at the other end."""

    stream: trio.abc.Stream
    peer: str  # the node its certificate names, or the address when insecure


class Transport:
    """Makes authenticated connections and listeners from one node's credentials.

    ``peer_names``: when not empty, the only nodes accepted or connected to
    (besides being of the other role, which is always required).
    """

    def __init__(
        self, tls: TlsConfig | None, *, peer_names: Iterable[str] = (), limits: ConnectionLimits = ConnectionLimits()
    ) -> None:
        self.tls = tls
        self.peer_names = frozenset(peer_names)
        self.limits = limits
        if tls is None and self.peer_names:
            raise ConfigError("--peer-name needs certificates to check: it cannot be used with --insecure")
        self._server_context = tls.server_context() if tls else None
        self._client_context = tls.client_context() if tls else None

    @classmethod
    def from_options(
        cls,
        pki: str | None,
        insecure: bool,
        peer_names: Iterable[str] = (),
        limits: ConnectionLimits = ConnectionLimits(),
    ) -> Transport:
        """The transport an entry point asked for; plaintext only when explicit."""
        if insecure:
            log.warning(
                "running with --insecure: links are neither authenticated nor encrypted; anyone who can reach the listening address can run whitelisted programs"
            )
            return cls(None, peer_names=peer_names, limits=limits)
        if not pki and not DEFAULT_PKI_DIR.exists():
            raise ConfigError(
                f"no TLS credentials: {DEFAULT_PKI_DIR} does not exist; create them with 'offload pki init', pass --pki DIR, or run with --insecure"
            )
        return cls(TlsConfig.load(Path(pki) if pki else DEFAULT_PKI_DIR), peer_names=peer_names, limits=limits)

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser, *, serving: bool) -> None:
        """The options of `from_arguments`, for daemons without a config file (rexec's RexecConfig has them)."""
        parser.add_argument("--pki", metavar="DIR", help="TLS credentials of this node (default /etc/offload/pki)")
        parser.add_argument("--insecure", action="store_true", help="plaintext, unauthenticated (tests only)")
        parser.add_argument(
            "--peer-name",
            action="append",
            default=[],
            metavar="NAME",
            help="the only peer node accepted or connected to (repeatable; default: any of the other role)",
        )
        limits = (
            ("--max-connections", ConnectionLimits.total, "listener set"),
            ("--max-peer-connections", ConnectionLimits.per_peer, "peer address or local uid"),
        )
        for flag, default, per in limits if serving else ():
            text = f"connections served at once per {per} (default {default})"
            parser.add_argument(flag, type=int, default=default, metavar="N", help=text)

    @classmethod
    def from_arguments(cls, args: argparse.Namespace | RexecConfig) -> Transport:
        """The transport of the options `add_arguments` adds, or of rexec_server's settings."""
        limits = ConnectionLimits()
        if hasattr(args, "max_connections"):
            limits = ConnectionLimits(args.max_connections, args.max_peer_connections)
        return cls.from_options(args.pki, args.insecure, args.peer_name, limits)

    async def connect(self, address: Address, *, timeout: float = HANDSHAKE_TIMEOUT) -> Connected:
        with translate_errors(address, "connecting to"), trio.fail_after(timeout):
            raw = await _open_raw(address)
            if self._client_context is None:
                return Connected(raw, str(address))
            stream = await TlsStream.wrap(raw, self._client_context, server_side=False)
        try:
            return await self._authorize(stream, str(address))
        except AuthenticationError as exc:
            log.warning("refused to connect to %s: %s", address, exc)
            raise

    async def admit(self, raw: trio.abc.Stream, where: str, logger: logging.Logger) -> Connected | None:
        """Authenticate a connection a listener accepted, or refuse it: log why, close it and return None."""
        if self._server_context is None:
            return Connected(raw, where)
        assert isinstance(raw, trio.SocketStream)
        try:
            with translate_errors(where, "handshake with"), trio.fail_after(HANDSHAKE_TIMEOUT):
                stream = await TlsStream.wrap(raw, self._server_context, server_side=True)
            return await self._authorize(stream, where)
        except (TransportError, trio.TooSlowError) as exc:
            logger.warning("refused a connection from %s: %s", where, exc)
            await trio.aclose_forcefully(raw)
            return None

    async def _authorize(self, stream: TlsStream, where: str) -> Connected:
        """Who the handshake proved is at ``where``, if this node deals with them; else AuthenticationError.

        The CA vouches only that a certificate is ours; which of our
        certificates may talk to us is decided here, for both directions:
        the other role only (a second DPU never runs programs on a DPU, the
        host never passes for a DPU), and a listed name when names are listed.
        """
        assert self.tls is not None
        ours = self.tls.identity
        why = ""
        try:
            peer = peer_identity(stream.getpeercert(), where)
        except ConfigError as exc:
            why = str(exc)
        else:
            if peer.role != ours.peer_role:
                why = f"peer {peer.node} has role {peer.role}: a {ours.role} deals only with {ours.peer_role} peers"
            elif self.peer_names and peer.node not in self.peer_names:
                why = (
                    f"peer {peer.node} (role {peer.role}) is not one of the configured peer names "
                    f"({', '.join(sorted(self.peer_names))})"
                )
        if why:
            await trio.aclose_forcefully(stream)
            raise AuthenticationError(why, address=where)
        return Connected(stream, peer.node)

    async def listen(self, address: Address) -> list[trio.SocketListener]:
        with translate_errors(address, "listening on"):
            if address.scheme == "tcp":
                return await trio.open_tcp_listeners(address.port, host=address.host)
            if address.scheme == "unix":
                return [await listen_unix(address.path, 0o600)]
            sock = trio.socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
            try:
                await sock.bind((int(address.host), address.port))
                sock.listen(128)
            except BaseException:
                sock.close()
                raise
            return [trio.SocketListener(sock)]


async def serve_listeners(
    listeners: Sequence[trio.SocketListener],
    handle: Callable[[trio.SocketStream], Awaitable[object]],
    logger: logging.Logger,
    what: str,
    limits: ConnectionLimits,
) -> None:
    """The accept loop of every daemon: accept on ``listeners`` until cancelled.

    Whatever ``handle`` raises ends that connection only (`aio.guarded` logs
    it).  Running out of fds or memory (the errnos trio's serve_listeners
    retries) pauses accepting, longer while it lasts, so a flood never ends
    the daemon; any other accept error propagates.  A connection beyond
    ``limits`` is closed at once, unserved.
    """
    acceptor = _Acceptor(handle, logger, what, limits)
    async with aio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(acceptor.accept_loop, listener)


@dataclass
class _Acceptor:
    """The accept loop of one listener set, and the connections it serves, per peer and in all.

    Refusals are logged at most once per REFUSAL_LOG_PAUSE, with how many
    there were: a flood must not turn into a flood of log lines.  Only peers
    with open connections are remembered, so memory is bounded by the limits.
    """

    handle: Callable[[trio.SocketStream], Awaitable[object]]
    logger: logging.Logger
    what: str
    limits: ConnectionLimits
    open: Counter[str] = field(default_factory=Counter)
    total: int = 0
    unlogged: int = 0  # refusals since the last log line
    quiet_until: float = -math.inf

    async def accept_loop(self, listener: trio.SocketListener) -> None:
        pause = ACCEPT_PAUSE
        async with aio.open_nursery() as nursery:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno not in ACCEPT_RETRY_ERRNOS:
                        raise
                    if pause == ACCEPT_PAUSE:
                        self.logger.error(
                            "cannot accept %s connections: %s; pausing until resources are freed",
                            self.what,
                            exc.strerror or exc,
                        )
                    await trio.sleep(pause)
                    pause = min(pause * 2, ACCEPT_PAUSE_MAX)
                    continue
                if pause != ACCEPT_PAUSE:
                    self.logger.warning("accepting %s connections again", self.what)
                    pause = ACCEPT_PAUSE
                key = peer_key(stream.socket)
                if self.enter(key):
                    nursery.start_soon(self.serve, stream, key, f"{self.what} connection from {remote_name(stream)}")
                else:
                    stream.socket.close()

    async def serve(self, stream: trio.SocketStream, key: str, what: str) -> None:
        try:
            await aio.guarded(self.logger, what, partial(self.handle, stream))
        finally:
            self.leave(key)

    def enter(self, key: str) -> bool:
        if self.total < self.limits.total and self.open[key] < self.limits.per_peer:
            self.open[key] += 1
            self.total += 1
            return True
        self.unlogged += 1
        now = trio.current_time()
        if now >= self.quiet_until:
            self.logger.warning(
                "refused %d %s connection(s), the latest from %s: %d open from it, %d in all "
                "(limits: %d per peer, %d in all)",
                self.unlogged,
                self.what,
                key,
                self.open[key],
                self.total,
                self.limits.per_peer,
                self.limits.total,
            )
            self.unlogged = 0
            self.quiet_until = now + REFUSAL_LOG_PAUSE
        return False

    def leave(self, key: str) -> None:
        self.total -= 1
        self.open[key] -= 1
        if not self.open[key]:
            del self.open[key]


@contextlib.contextmanager
def first_request(timeout: float, logger: logging.Logger, what: str) -> Iterator[trio.CancelScope]:
    """Bound the time a local client takes to send its first request, read inside this block.

    A client that connects and never speaks, or stops in the middle of its
    request, would hold its slot (`ConnectionLimits`) for ever.  When
    ``timeout`` passes first, the read is cancelled and logged, and the
    scope's ``cancelled_caught`` tells the handler to close the connection.
    """
    with trio.move_on_after(timeout) as scope:
        yield scope
    if scope.cancelled_caught:
        logger.warning("closed %s: no complete request within %g seconds", what, timeout)


def peer_key(sock: trio.socket.SocketType) -> str:
    """Whose a connection is, for the per-peer limit: an IP address, a vsock CID, a local uid."""
    try:
        if sock.family == socket.AF_UNIX:
            return f"uid {peer_credentials(sock)[1]}"
        name = sock.getpeername()
    except OSError:
        return "?"  # already gone: counted together with the others that went
    return f"cid {name[0]}" if sock.family == socket.AF_VSOCK else str(name[0])


def remote_name(raw: trio.SocketStream) -> str:
    """Who is on the other end of an accepted connection, for log lines."""
    try:
        name = raw.socket.getpeername()
    except OSError:
        return "?"
    return f"{name[0]}:{name[1]}" if isinstance(name, tuple) else str(name or "unix peer")


async def _open_raw(address: Address) -> trio.SocketStream:
    if address.scheme == "tcp":
        return await trio.open_tcp_stream(address.host, address.port)
    if address.scheme == "unix":
        return await trio.open_unix_socket(address.path)
    sock = trio.socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    try:
        await sock.connect((int(address.host), address.port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


def bind_unix(path: str, mode: int, backlog: int = 512) -> socket.socket:
    """A listening UNIX stream socket at ``path`` with ``mode``, replacing a stale socket."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        # Bind under a restrictive umask so the socket never exists with wider
        # rights than ``mode``, then widen it if asked.
        old = os.umask(0o177)
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, mode)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


async def listen_unix(path: str, mode: int, backlog: int = 512) -> trio.SocketListener:
    sock = bind_unix(path, mode, backlog)
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock))


def listener_address(listener: trio.SocketListener) -> str:
    name = listener.socket.getsockname()
    return str(
        Address("tcp", host=str(name[0]), port=name[1]) if isinstance(name, tuple) else Address("unix", path=name)
    )
