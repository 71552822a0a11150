"""Certificates for mutual TLS between the two machines (`offload pki init`; README.md, "Deployment").

One CA signs a certificate per node, as libvirt's own TLS set-up does: its
name is the subject's CN, its role a SubjectAltName URI (`ROLE_URI`), and
`Transport` accepts only peers of the other role.  Layout of DIR::

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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from offload.errors import ConfigError

DEFAULT_PKI_DIR = Path("/etc/offload/pki")
_VALIDITY = datetime.timedelta(days=3650)
ROLES = ("host", "dpu")
#: The SubjectAltName URI that names a certificate's role: ``offload:role=dpu``.
ROLE_URI = "offload:role="
REISSUE = "re-issue the certificates with 'offload pki init --force' (see README: deployment)"


@dataclass(frozen=True)
class Identity:
    """Who holds a certificate: a role (host or dpu) and a node name."""

    role: str
    node: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ConfigError(f"role {self.role!r} is neither host nor dpu")
        if not self.node or "/" in self.node or self.node.startswith("."):
            raise ConfigError(f"node name {self.node!r} is not a plain name")

    @classmethod
    def named(cls, node: str) -> Identity:
        """The identity of ``--node NAME``: the names host and dpu say their role themselves."""
        if node not in ROLES:
            raise ConfigError(
                f"node name {node!r} names no role: use --host {node} or --dpu {node} "
                "(--node takes only 'host' or 'dpu')"
            )
        return cls(node, node)

    @property
    def peer_role(self) -> str:
        """The role this one's peers have: a host talks to DPUs, a DPU to hosts."""
        return "dpu" if self.role == "host" else "host"

    def __str__(self) -> str:
        return f"{self.role} {self.node}"


#: The two certificates of the usual pair (the lab, the README's steps).
HOST_AND_DPU = (Identity("host", "host"), Identity("dpu", "dpu"))
#: A certificate and its key (the CA's, or one just issued).
_CA = tuple[x509.Certificate, ec.EllipticCurvePrivateKey]


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write atomically with ``mode`` from the start (no window with wider rights)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "wb") as stream:
        stream.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "offload"), x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    )


def _load_ca(directory: Path) -> _CA | None:
    cert_path, key_path = directory / "ca.pem", directory / "ca-key.pem"
    if not cert_path.exists():
        return None
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError("the CA key is not an EC key", path=str(key_path))
    return cert, key


def _issue(key_path: Path, cert_path: Path, subject: str, ca: _CA | None, extensions: list) -> _CA:
    """Write a new key and its certificate for ``subject``, signed by ``ca`` (None: by itself)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(ca[0].subject if ca else _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    cert = builder.sign(ca[1] if ca else key, hashes.SHA256())
    pem = serialization.Encoding.PEM
    _write(key_path, key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()), 0o600)
    _write(cert_path, cert.public_bytes(pem), 0o644)
    return cert, key


def _make_ca(directory: Path) -> _CA:
    usage = x509.KeyUsage(False, False, False, False, False, True, True, False, False)
    extensions = [(x509.BasicConstraints(ca=True, path_length=0), True), (usage, True)]
    return _issue(directory / "ca-key.pem", directory / "ca.pem", "offload CA", None, extensions)


def _make_node(directory: Path, identity: Identity, ca: _CA) -> None:
    node = identity.node
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(ROLE_URI + identity.role), x509.DNSName(node)]
    with contextlib.suppress(ValueError):
        names.append(x509.IPAddress(ipaddress.ip_address(node)))
    usage = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    extensions = [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (x509.SubjectAlternativeName(names), False),
        (usage, False),
    ]
    node_dir = directory / node
    node_dir.mkdir(mode=0o700, exist_ok=True)
    _issue(node_dir / "key.pem", node_dir / "cert.pem", node, ca, extensions)
    _write(node_dir / "ca.pem", ca[0].public_bytes(serialization.Encoding.PEM), 0o644)


def init(directory: Path, nodes: Sequence[Identity], *, force: bool = False) -> list[str]:
    """Create the CA (unless present) and a certificate for each node; what was done, a line per item.

    Existing node certificates are kept unless ``force``; a kept one that
    names no role (made before roles existed) is an error that says to re-issue it.
    """
    done = []
    names = [identity.node for identity in nodes]
    if len(set(names)) != len(names):
        raise ConfigError(f"a node name is given twice: {', '.join(names)}")
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    ca = _load_ca(directory)
    done.append(f"{'kept' if ca else 'created'} CA {directory / 'ca.pem'}")
    ca = ca or _make_ca(directory)
    for identity in nodes:
        cert_path = directory / identity.node / "cert.pem"
        if cert_path.exists() and not force:
            kept = certificate_identity(x509.load_pem_x509_certificate(cert_path.read_bytes()), str(cert_path))
            if kept != identity:
                raise ConfigError(f"{cert_path} is for {kept}, not {identity}: {REISSUE}")
            done.append(f"kept {cert_path}")
            continue
        _make_node(directory, identity, ca)
        done.append(f"created {cert_path} for {identity}")
    return done


def certificate_identity(cert: x509.Certificate, where: str) -> Identity:
    """The role and node a certificate names; ConfigError if it names no role (or several)."""
    try:
        alternatives = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = alternatives.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    common_names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    node = str(common_names[0].value) if common_names else "?"
    return _identity(node, uris, where)


def peer_identity(certificate: dict | None, where: str) -> Identity:
    """`certificate_identity` of a peer certificate as SSLObject.getpeercert() returns it."""
    certificate = certificate or {}
    uris = [value for kind, value in certificate.get("subjectAltName", ()) if kind == "URI"]
    names = [value for rdn in certificate.get("subject", ()) for key, value in rdn if key == "commonName"]
    return _identity(str(names[0]) if names else "?", uris, where)


def _identity(node: str, uris: Iterable[str], where: str) -> Identity:
    roles = {uri.removeprefix(ROLE_URI) for uri in uris if uri.startswith(ROLE_URI)}
    if len(roles) != 1:
        what = "names no role" if not roles else f"names several roles ({', '.join(sorted(roles))})"
        raise ConfigError(f"the certificate of {node} ({where}) {what}: {REISSUE}")
    try:
        return Identity(roles.pop(), node)
    except ConfigError as exc:
        raise ConfigError(f"the certificate of {node} ({where}): {exc}") from None


@dataclass(frozen=True)
class TlsConfig:
    """One node's credentials: its certificate and key, and the CA it trusts."""

    directory: Path
    identity: Identity  # what our own certificate names

    @classmethod
    def load(cls, directory: Path) -> TlsConfig:
        for name in ("ca.pem", "cert.pem", "key.pem"):
            if not (directory / name).is_file():
                raise ConfigError(
                    f"{name} is missing (create it with 'offload pki init --dir DIR --host NAME' "
                    "or '--dpu NAME' and copy DIR/NAME here)",
                    path=str(directory),
                )
        path = directory / "cert.pem"
        try:
            cert = x509.load_pem_x509_certificate(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read the certificate: {exc}", path=str(path)) from None
        return cls(directory, certificate_identity(cert, str(path)))

    def _context(self, side: int) -> ssl.SSLContext:
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
        return self._context(ssl.PROTOCOL_TLS_SERVER)

    def client_context(self) -> ssl.SSLContext:
        return self._context(ssl.PROTOCOL_TLS_CLIENT)
