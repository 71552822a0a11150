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
from collections.abc import Iterator
from dataclasses import dataclass

import trio

from offload.errors import AuthenticationError, ConfigError, TransportError
from offload.pki import TlsConfig, peer_name

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0


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
                stream = trio.SSLStream(raw, self._client_context, server_hostname=None)
                try:
                    await stream.do_handshake()
                except BaseException:
                    await trio.aclose_forcefully(raw)
                    raise
                return Connected(stream, peer_name(stream.getpeercert()))

    async def accept(self, raw: trio.abc.Stream, where: str) -> Connected:
        """Authenticate a connection a listener accepted."""
        if self._server_context is None:
            return Connected(raw, where)
        stream = trio.SSLStream(raw, self._server_context, server_side=True)
        with translate_errors(where, "handshake with"):
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                await stream.do_handshake()
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


async def _open_raw(address: Address) -> trio.abc.Stream:
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
