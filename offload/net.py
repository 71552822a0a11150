"""Addresses and authenticated transports: the I/O seam of every link.

Addresses: ``tcp://HOST:PORT`` (also bare ``HOST:PORT``, as the reference's
CMD_NET_ADDR allows), ``vsock://CID:PORT`` and ``unix:///PATH``.  Links are
mutual TLS 1.3 with certificates from `offload.pki` unless the operator asks
for ``--insecure``.  Foreign exceptions (OSError, ssl.SSLError, trio's
BrokenResourceError) are translated here, once, into `TransportError` and
`AuthenticationError`, naming the address.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from functools import partial

import trio

from offload import aio
from offload.errors import AuthenticationError, ConfigError, TransportError
from offload.pki import TlsConfig, peer_name

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0
#: accept() errors that mean "out of resources for now", not "the listener broke"
#: (the ones trio's serve_listeners retries).
ACCEPT_RETRY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: How long an accept loop that ran out of resources waits before it tries again.
ACCEPT_PAUSE = 0.1


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
    original = text
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "tcp", text  # reference CMD_NET_ADDR also allows HOST:PORT
    if scheme == "unix":
        if not rest.startswith("/"):
            raise ConfigError(f"address {original!r}: a unix address needs an absolute path (unix:///run/x.sock)")
        return Address("unix", path=rest)
    if scheme not in ("tcp", "vsock"):
        raise ConfigError(f"address {original!r}: unknown scheme {scheme!r} (use tcp://, vsock:// or unix://)")
    if rest.startswith("["):
        host, bracket, port_text = rest[1:].partition("]")
        if not bracket or not port_text.startswith(":"):
            raise ConfigError(f"address {original!r}: expected [IPv6]:PORT")
        port_text = port_text[1:]
    else:
        host, colon, port_text = rest.rpartition(":")
        if not colon:
            raise ConfigError(f"address {original!r}: missing :PORT")
    if not host:
        raise ConfigError(f"address {original!r}: missing host")
    if "/" in host:
        raise ConfigError(f"address {original!r}: host {host!r} contains '/' (the form is tcp://HOST:PORT)")
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"address {original!r}: port {port_text!r} is not a number") from None
    if not 0 <= port <= 0xFFFFFFFF if scheme == "vsock" else not 0 <= port <= 65535:
        raise ConfigError(f"address {original!r}: port {port} out of range")
    if scheme == "vsock" and not host.isdigit():
        raise ConfigError(f"address {original!r}: a vsock address needs a numeric CID")
    return Address(scheme, host=host, port=port)


@contextlib.contextmanager
def translate_errors(address: Address | str, action: str) -> Iterator[None]:
    """Turn foreign I/O exceptions into TransportError naming ``address``."""
    try:
        yield
    except ssl.SSLError as exc:
        raise AuthenticationError(
            f"{action} {address}: TLS failed: {exc.reason or exc}", address=str(address)
        ) from None
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        cause = exc.__cause__
        if isinstance(cause, ssl.SSLError):
            raise AuthenticationError(
                f"{action} {address}: TLS failed: {cause.reason or cause}", address=str(address)
            ) from None
        raise TransportError(f"{action} {address}: connection broken ({cause or exc})", address=str(address)) from None
    except OSError as exc:
        raise TransportError(f"{action} {address}: {exc.strerror or exc}", address=str(address)) from None


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
        """The TLS session and its two memory BIOs, for code that carries it on without trio.

        The caller takes over: this stream must not be used afterwards
        (udsproxyd's relay thread continues a connection this way).
        """
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
                    await stream._fill()
            await stream._flush()
        except BaseException:
            await trio.aclose_forcefully(raw)
            raise
        return stream

    async def _flush(self) -> None:
        """Send whatever the TLS engine has produced."""
        async with self._send_lock:
            data = self._outgoing.read()
            if data:
                await self.raw.send_all(data)

    async def _fill(self) -> None:
        # A fresh buffer per read, sized by what arrived: a long-lived 1 MiB
        # buffer per connection would cost 100 MiB at 100 sessions.
        data = await self.raw.receive_some(self.RAW_CHUNK)
        if data:
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
        try:
            self._ssl.write(data)
        except ssl.SSLError as exc:
            raise trio.BrokenResourceError(exc) from exc
        await self._flush()

    async def send_parts(self, parts: tuple[bytes, ...]) -> None:
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
    peer: str  # certificate CN, or the address when insecure


class Transport:
    """Makes authenticated connections and listeners from one node's credentials."""

    def __init__(self, tls: TlsConfig | None) -> None:
        self.tls = tls
        self._server_context = tls.server_context() if tls else None
        self._client_context = tls.client_context() if tls else None

    @classmethod
    def from_options(cls, pki: str | None, insecure: bool) -> Transport:
        """The transport an entry point asked for; plaintext only when explicit."""
        if insecure:
            log.warning(
                "running with --insecure: links are neither authenticated nor encrypted; anyone who can reach the listening address can run whitelisted programs"
            )
            return cls(None)
        from pathlib import Path

        from offload.pki import DEFAULT_PKI_DIR

        if pki is None and not DEFAULT_PKI_DIR.exists():
            raise ConfigError(
                f"no TLS credentials: {DEFAULT_PKI_DIR} does not exist; create them with 'offload pki init', pass --pki DIR, or run with --insecure"
            )
        return cls(TlsConfig.load(Path(pki) if pki else DEFAULT_PKI_DIR))

    async def connect(self, address: Address, *, timeout: float = HANDSHAKE_TIMEOUT) -> Connected:
        with translate_errors(address, "connecting to"):
            with trio.fail_after(timeout):
                raw = await _open_raw(address)
                if self._client_context is None:
                    return Connected(raw, str(address))
                stream = await TlsStream.wrap(raw, self._client_context, server_side=False)
                return Connected(stream, peer_name(stream.getpeercert()))

    async def admit(self, raw: trio.abc.Stream, where: str, logger: logging.Logger) -> Connected | None:
        """``accept``, or refuse: log why, close the connection and return None."""
        try:
            return await self.accept(raw, where)
        except (TransportError, trio.TooSlowError) as exc:
            logger.warning("refused a connection from %s: %s", where, exc)
            await trio.aclose_forcefully(raw)
            return None

    async def accept(self, raw: trio.abc.Stream, where: str) -> Connected:
        """Authenticate a connection a listener accepted."""
        if self._server_context is None:
            return Connected(raw, where)
        assert isinstance(raw, trio.SocketStream)
        with translate_errors(where, "handshake with"):
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                stream = await TlsStream.wrap(raw, self._server_context, server_side=True)
        return Connected(stream, peer_name(stream.getpeercert()))

    async def listen(self, address: Address) -> list[trio.SocketListener]:
        with translate_errors(address, "listening on"):
            if address.scheme == "tcp":
                return await trio.open_tcp_listeners(address.port, host=address.host)
            if address.scheme == "unix":
                return [await listen_unix(address.path, 0o600)]
            sock = trio.socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
            await sock.bind((int(address.host), address.port))
            sock.listen(128)
            return [trio.SocketListener(sock)]


async def serve_connections(
    listener: trio.SocketListener,
    handle: Callable[[trio.SocketStream], Awaitable[object]],
    logger: logging.Logger,
    what: str,
) -> None:
    """Accept on ``listener`` until cancelled, each connection handled in a task of its own.

    Whatever one connection's ``handle`` raises ends that connection only
    (`aio.guarded` logs it).  Running out of fds or memory is logged and
    retried after a pause, so a flood never ends the daemon; any other
    accept error means the listener itself broke, and propagates.
    """
    async with aio.open_nursery() as nursery:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in ACCEPT_RETRY_ERRNOS:
                    raise
                logger.error("cannot accept a %s connection: %s", what, exc.strerror or exc)
                await trio.sleep(ACCEPT_PAUSE)
                continue
            nursery.start_soon(
                aio.guarded, logger, f"{what} connection from {remote_name(stream)}", partial(handle, stream)
            )


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
    if isinstance(name, tuple):
        host = name[0]
        return f"tcp://[{host}]:{name[1]}" if ":" in str(host) else f"tcp://{host}:{name[1]}"
    return f"unix://{name}"
