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
import logging
import os
import socket
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import trio

from offload.errors import AuthenticationError, ConfigError, TransportError
from offload.pki import TlsConfig, peer_name

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0
T = TypeVar("T")


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
    """TLS over a non-blocking ssl.SSLSocket, driven by trio.

    trio.SSLStream returns at most one TLS record (16 KiB) per
    receive_some, so a relay pays its whole per-chunk cost sixty-four times
    per MiB.  Here one receive drains every record the kernel already has,
    up to ``max_bytes``, in a loop of C calls: the relay sees 256 KiB
    chunks.  Sends and receives may run concurrently (one task each).
    """

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self.socket = sock

    @classmethod
    async def wrap(cls, raw: trio.SocketStream, context: ssl.SSLContext, *, server_side: bool) -> TlsStream:
        plain = socket.socket(fileno=raw.socket.detach())
        plain.setblocking(False)
        stream = cls(context.wrap_socket(plain, server_side=server_side, do_handshake_on_connect=False))
        try:
            await stream._retry(stream.socket.do_handshake)
        except BaseException:
            stream.socket.close()
            raise
        return stream

    async def _retry(self, call: Callable[..., T], *args: object) -> T:
        while True:
            try:
                return call(*args)
            except ssl.SSLWantReadError:
                await trio.lowlevel.wait_readable(self.socket)
            except ssl.SSLWantWriteError:
                await trio.lowlevel.wait_writable(self.socket)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        limit = max_bytes or 1 << 18
        chunks: list[bytes] = []
        size = 0
        while size < limit:
            try:
                chunk = self.socket.recv(limit - size)
            except ssl.SSLWantReadError:
                if chunks:
                    break
                await trio.lowlevel.wait_readable(self.socket)
                continue
            except ssl.SSLZeroReturnError:
                chunk = b""
            except (ssl.SSLError, OSError) as exc:
                raise trio.BrokenResourceError(exc) from exc
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        await trio.lowlevel.checkpoint_if_cancelled()
        return b"".join(chunks)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while view:
            try:
                sent = await self._retry(self.socket.send, view[: 1 << 20])
            except (ssl.SSLError, OSError) as exc:
                raise trio.BrokenResourceError(exc) from exc
            view = view[sent:]
        await trio.lowlevel.checkpoint_if_cancelled()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.wait_writable(self.socket)

    def getpeercert(self) -> dict | None:
        return self.socket.getpeercert()

    async def aclose(self) -> None:
        if self.socket.fileno() >= 0:
            trio.lowlevel.notify_closing(self.socket)
            self.socket.close()
        await trio.lowlevel.checkpoint()


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
