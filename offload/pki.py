"""Certificates for mutual TLS between the two machines (`offload pki init`).

One CA signs a certificate per node (host, dpu, ...), as libvirt's own TLS
set-up does.  Layout of DIR after ``init``::

    DIR/ca.pem, DIR/ca-key.pem            the CA (keep ca-key.pem off the nodes)
    DIR/NODE/{ca.pem,cert.pem,key.pem}    what node NODE needs: copy this
                                          directory to /etc/offload/pki there

Keys are ECDSA P-256: TLS handshakes with them are cheap, which matters when
every rexec session opens a connection.  Private keys are written 0600.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from offload.errors import ConfigError

DEFAULT_PKI_DIR = Path("/etc/offload/pki")
_VALIDITY = datetime.timedelta(days=3650)


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write atomically with ``mode`` from the start (no window with wider rights)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "wb") as stream:
        stream.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "offload"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    cert_path, key_path = directory / "ca.pem", directory / "ca-key.pem"
    if not cert_path.exists():
        return None
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError("the CA key is not an EC key", path=str(key_path))
    return cert, key


def _make_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("offload CA"))
        .issuer_name(_name("offload CA"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    _write(directory / "ca-key.pem", _key_pem(key), 0o600)
    _write(directory / "ca.pem", cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert, key


def _make_node(directory: Path, node: str, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    names: list[x509.GeneralName] = [x509.DNSName(node)]
    with contextlib.suppress(ValueError):
        names.append(x509.IPAddress(ipaddress.ip_address(node)))
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(node))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    node_dir = directory / node
    node_dir.mkdir(mode=0o700, exist_ok=True)
    _write(node_dir / "key.pem", _key_pem(key), 0o600)
    _write(node_dir / "cert.pem", cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _write(node_dir / "ca.pem", ca.public_bytes(serialization.Encoding.PEM), 0o644)


def init(directory: Path, nodes: list[str], *, force: bool = False) -> list[str]:
    """Create the CA (unless present) and a certificate for each node.

    Returns what was done, one line per item, for the caller to print.
    Existing node certificates are kept unless ``force``.
    """
    done = []
    for node in nodes:
        if not node or "/" in node or node.startswith("."):
            raise ConfigError(f"node name {node!r} is not a plain name")
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    loaded = _load_ca(directory)
    if loaded is None:
        loaded = _make_ca(directory)
        done.append(f"created CA {directory / 'ca.pem'}")
    else:
        done.append(f"kept CA {directory / 'ca.pem'}")
    ca, ca_key = loaded
    for node in nodes:
        if (directory / node / "cert.pem").exists() and not force:
            done.append(f"kept {directory / node}/cert.pem")
            continue
        _make_node(directory, node, ca, ca_key)
        done.append(f"created {directory / node}/cert.pem for node {node}")
    return done


@dataclass(frozen=True)
class TlsConfig:
    """One node's credentials: its certificate and key, and the CA it trusts."""

    directory: Path

    @classmethod
    def load(cls, directory: Path) -> TlsConfig:
        for name in ("ca.pem", "cert.pem", "key.pem"):
            if not (directory / name).is_file():
                raise ConfigError(
                    f"{name} is missing (create it with 'offload pki init --dir DIR --node NAME' and copy DIR/NAME here)",
                    path=str(directory),
                )
        return cls(directory)

    def _context(self, purpose: int) -> ssl.SSLContext:
        side = ssl.PROTOCOL_TLS_SERVER if purpose == 0 else ssl.PROTOCOL_TLS_CLIENT
        context = ssl.SSLContext(side)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        try:
            context.load_cert_chain(self.directory / "cert.pem", self.directory / "key.pem")
            context.load_verify_locations(self.directory / "ca.pem")
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load the TLS credentials: {exc}", path=str(self.directory)) from None
        context.verify_mode = ssl.CERT_REQUIRED
        # Peers are identified by certificates from our own CA, not by DNS
        # names: the link is usually addressed by IP or vsock CID.
        context.check_hostname = False
        return context

    def server_context(self) -> ssl.SSLContext:
        return self._context(0)

    def client_context(self) -> ssl.SSLContext:
        return self._context(1)


def peer_name(certificate: dict | None) -> str:
    """The CN of a peer certificate as returned by SSLObject.getpeercert()."""
    for rdn in (certificate or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return "?"
