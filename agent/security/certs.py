"""X.509 certificates for the cluster's mutual TLS: a cluster CA, node certificates, and their checks.

Every certificate is built and parsed by the ``cryptography`` library (never by hand). Keys are EC P-256
(SECP256R1) in unencrypted PKCS#8 PEM, signatures ECDSA with SHA-256.

A node certificate (RFC 5280 profile):

* subject CN = the node id. This is the identity the server reads from the TLS peer (gRPC's auth context
  key ``x509_common_name``), so a node may speak only for the id its certificate names.
* subjectAltName: DNS ``CLUSTER_SERVER_NAME`` always (peers dial each other by IP address and verify
  the server against this one name with ``grpc.ssl_target_name_override``), the node id when it is a
  valid DNS name, and any extra DNS names / IP addresses the operator asks for.
* basicConstraints CA:FALSE, keyUsage digitalSignature + keyAgreement, extendedKeyUsage serverAuth +
  clientAuth (each node is server and client), authority and subject key identifiers.

Every time here is a timezone-aware UTC ``datetime``; a naive ``now`` is taken as UTC. This module
imports only the standard library, ``cryptography`` and ``agent.files`` (no grpc, no torch).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    PrivateKeyTypes,
    PublicKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.files import write_atomic

# The DNS subjectAltName every node certificate carries; clients check servers against it.
CLUSTER_SERVER_NAME: Final = "dpgan-peer"
CA_DAYS: Final = 3650  # default validity of the cluster CA, days
NODE_DAYS: Final = 365  # default validity of a node certificate, days
EXPIRY_WARNING_DAYS: Final = 30  # a node certificate expiring within this many days deserves a warning
CLOCK_SKEW: Final = timedelta(minutes=5)  # not_valid_before is backdated by this much
MAX_NODE_ID_LENGTH: Final = 64  # ub-common-name, RFC 5280 Appendix A.1

# File names `dpgan-agent certs` uses in a CA folder.
CA_CERT_FILE: Final = "ca.crt"
CA_KEY_FILE: Final = "ca.key"

CERT_FILE_MODE: Final = 0o644
KEY_FILE_MODE: Final = 0o600

_DNS_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_DNS_NAME = re.compile(rf"{_DNS_LABEL}(?:\.{_DNS_LABEL})*")
_PEM_BEGIN = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----")
_UNSAFE_FILE_CHARACTERS = re.compile(r"[^A-Za-z0-9._-]")


class CertificateError(ValueError):
    """A certificate, key or node id is unusable; the message is one line and names the file or value."""


@dataclass(frozen=True)
class NodeCredentials:
    """A node's checked TLS material: what grpc's ssl credentials take, plus where it came from.

    ``certificate_pem`` / ``private_key_pem`` / ``ca_pem``: the files' bytes as read (PEM).
    ``node_id``: the certificate's subject CN. ``not_valid_after``: its expiry (UTC).
    """

    certificate_pem: bytes
    private_key_pem: bytes
    ca_pem: bytes
    node_id: str
    not_valid_after: datetime
    cert_path: Path
    key_path: Path
    ca_path: Path


# --------------------------------------------------------------------------------------------- helpers


def _utc(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    return now.replace(tzinfo=UTC) if now.tzinfo is None else now.astimezone(UTC)


def format_time(moment: datetime) -> str:
    """``moment`` as ``YYYY-MM-DD HH:MM:SS UTC``."""
    return f"{_utc(moment):%Y-%m-%d %H:%M:%S} UTC"


def _new_private_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _public_key_der(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _signature_hash(key: PrivateKeyTypes) -> hashes.HashAlgorithm | None:
    # Ed25519 / Ed448 sign without a separate hash; everything else here signs SHA-256.
    return None if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey) else hashes.SHA256()


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _common_name(cert: x509.Certificate) -> str | None:
    values = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not values:
        return None
    value = values[0].value
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _dns_names(cert: x509.Certificate) -> list[str]:
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return names.get_values_for_type(x509.DNSName)


def _pem_labels(data: bytes) -> list[str]:
    return [match.decode("ascii") for match in _PEM_BEGIN.findall(data)]


def is_dns_name(name: str) -> bool:
    """Whether ``name`` is a lowercase DNS name: labels of 1-63 letters, digits and inner hyphens, joined
    by dots, 253 characters at most (RFC 1035 / RFC 5280 §4.2.1.6 dNSName)."""
    return len(name) <= 253 and _DNS_NAME.fullmatch(name) is not None


def validate_node_id(node_id: str) -> str:
    """Return ``node_id`` if it can be a certificate subject CN, else raise CertificateError.

    A node id is 1-64 characters (the CN upper bound of RFC 5280 Appendix A.1) of printable ASCII
    without whitespace or commas (a comma would be ambiguous in the comma-separated name lists of
    flags such as --allow-node-ids and in RFC 4514 subject strings).
    """
    if not isinstance(node_id, str) or not node_id:
        raise CertificateError("node id is empty")
    if len(node_id) > MAX_NODE_ID_LENGTH:
        raise CertificateError(
            f"node id {node_id[:20]!r}... is {len(node_id)} characters; a certificate common name "
            f"holds at most {MAX_NODE_ID_LENGTH}"
        )
    bad = sorted({character for character in node_id if not ("!" <= character <= "~") or character == ","})
    if bad:
        raise CertificateError(
            f"node id {node_id!r} contains {', '.join(repr(c) for c in bad)}; use printable ASCII "
            "without whitespace or commas"
        )
    return node_id


def node_file_stem(node_id: str) -> str:
    """The file name (without suffix) of a node's certificate and key: the node id with every character
    outside ``[A-Za-z0-9._-]`` replaced by ``_``."""
    return _UNSAFE_FILE_CHARACTERS.sub("_", node_id)


def certificate_fingerprint(cert_pem: bytes) -> str:
    """SHA-256 fingerprint of the first certificate in ``cert_pem`` (DER), as colon-separated hex pairs.

    Raises CertificateError when ``cert_pem`` holds no PEM certificate."""
    cert = _parse_certificates(cert_pem, "certificate")[0]
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def certificate_node_id(cert_pem: bytes) -> str:
    """The node id a certificate is for: the subject common name of the first certificate in ``cert_pem``.

    Raises CertificateError when ``cert_pem`` holds no PEM certificate or the subject has no CN."""
    cert = _parse_certificates(cert_pem, "certificate")[0]
    name = _common_name(cert)
    if name is None:
        raise CertificateError(f"certificate subject {cert.subject.rfc4514_string()!r} has no common name")
    return name


# -------------------------------------------------------------------------------------------- creating


def create_ca(
    common_name: str = "dpgan cluster CA", days: int = CA_DAYS, now: datetime | None = None
) -> tuple[bytes, bytes]:
    """Create a self-signed cluster CA; returns (certificate PEM, unencrypted PKCS#8 private key PEM).

    ``days``: validity in days from ``now`` (default: the current time); not_valid_before is backdated
    by CLOCK_SKEW (5 minutes). Extensions (RFC 5280 §4.2.1): basicConstraints CA:TRUE pathlen 0 and
    keyUsage keyCertSign + cRLSign, both critical, and a subject key identifier. Raises CertificateError
    for days < 1 or a common name outside 1-64 characters.
    """
    if days < 1:
        raise CertificateError(f"CA validity must be at least 1 day, not {days}")
    if not common_name or len(common_name) > MAX_NODE_ID_LENGTH:
        raise CertificateError(f"CA common name must be 1-{MAX_NODE_ID_LENGTH} characters: {common_name!r}")
    moment = _utc(now)
    key = _new_private_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(moment - CLOCK_SKEW)
        .not_valid_after(moment + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _private_key_pem(key)


def issue_node_certificate(
    ca_cert_pem: bytes,
    ca_key_pem: bytes,
    node_id: str,
    *,
    days: int = NODE_DAYS,
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
    now: datetime | None = None,
) -> tuple[bytes, bytes]:
    """Issue a node certificate signed by the CA; returns (certificate PEM, unencrypted PKCS#8 key PEM).

    The profile is in the module docstring. ``days``: validity in days from ``now`` (default: the
    current time), cut to the CA's own expiry (a chain is valid only while every certificate in it is,
    RFC 5280 §6.1.3); not_valid_before is backdated by CLOCK_SKEW. ``dns_names`` / ``ip_addresses``:
    extra subjectAltName entries (lowercase DNS names; IPv4 or IPv6 addresses).

    Raises CertificateError for an invalid node id, DNS name or IP address, days < 1, a CA file that
    is not a CA certificate or has expired, or a CA key that does not match the CA certificate.
    """
    validate_node_id(node_id)
    if days < 1:
        raise CertificateError(f"certificate validity must be at least 1 day, not {days}")
    ca_cert = _parse_certificates(ca_cert_pem, "CA certificate")[0]
    ca_key = _parse_private_key(ca_key_pem, "CA key")
    if not _is_ca(ca_cert):
        raise CertificateError(f"{ca_cert.subject.rfc4514_string()!r} is not a CA certificate")
    if not isinstance(ca_key, CertificateIssuerPrivateKeyTypes):
        raise CertificateError(f"the CA key ({type(ca_key).__name__}) cannot sign certificates")
    if _public_key_der(ca_key.public_key()) != _public_key_der(ca_cert.public_key()):
        raise CertificateError("the CA key does not match the CA certificate (its public key differs)")
    moment = _utc(now)
    if moment >= ca_cert.not_valid_after_utc:
        raise CertificateError(
            f"the CA certificate expired on {format_time(ca_cert.not_valid_after_utc)}; create a new CA "
            "and re-issue every node certificate"
        )

    names: list[x509.GeneralName] = []
    seen: set[str] = set()

    def add_dns(name: str) -> None:
        if name not in seen:
            seen.add(name)
            names.append(x509.DNSName(name))

    add_dns(CLUSTER_SERVER_NAME)
    if is_dns_name(node_id):
        add_dns(node_id)
    for raw in dns_names:
        name = raw.strip().lower().rstrip(".")
        wildcard = name.startswith("*.")
        if not is_dns_name(name[2:] if wildcard else name):
            raise CertificateError(f"{raw!r} is not a DNS name (letters, digits, hyphens, dots)")
        add_dns(name)
    addresses: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for raw in ip_addresses:
        try:
            address = ipaddress.ip_address(raw.strip() if isinstance(raw, str) else raw)
        except ValueError:
            raise CertificateError(f"{raw!r} is not an IP address") from None
        if address not in addresses:
            addresses.append(address)
    names.extend(x509.IPAddress(address) for address in addresses)

    try:
        authority_key_id = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
            ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        )
    except x509.ExtensionNotFound:
        # the CA key's public half: the same key as the certificate's (checked above)
        authority_key_id = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())

    key = _new_private_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(moment - CLOCK_SKEW)
        .not_valid_after(min(moment + timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,  # EC keys: ECDH(E) key agreement
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(authority_key_id, critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(ca_key, _signature_hash(ca_key))
    )
    return cert.public_bytes(serialization.Encoding.PEM), _private_key_pem(key)


# ------------------------------------------------------------------------------------------- parsing


def _parse_certificates(data: bytes, where: str) -> list[x509.Certificate]:
    """Every certificate in a PEM blob; CertificateError naming ``where`` when there is none."""
    labels = _pem_labels(data)
    if not labels:
        if not data.strip():
            raise CertificateError(f"{where}: is empty")
        if data[:1] == b"\x30":
            raise CertificateError(
                f"{where}: looks like DER, not PEM "
                "(convert it: openssl x509 -inform der -in FILE -out FILE.pem)"
            )
        raise CertificateError(f"{where}: is not PEM (no '-----BEGIN CERTIFICATE-----' line)")
    if "CERTIFICATE" not in labels:
        raise CertificateError(f"{where}: holds a {labels[0]}, not a certificate")
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as error:
        raise CertificateError(f"{where}: is not a valid PEM certificate ({error})") from None


def _parse_private_key(data: bytes, where: str) -> PrivateKeyTypes:
    labels = _pem_labels(data)
    if not labels:
        raise CertificateError(
            f"{where}: is empty" if not data.strip() else f"{where}: is not PEM (no '-----BEGIN' line)"
        )
    if not any(label.endswith("PRIVATE KEY") for label in labels):
        raise CertificateError(f"{where}: holds a {labels[0]}, not a private key")
    encrypted = (
        f"{where}: the private key is encrypted; gRPC needs it unencrypted (protect the file: mode 0600)"
    )
    if "ENCRYPTED PRIVATE KEY" in labels:
        raise CertificateError(encrypted)
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise CertificateError(encrypted) from None
    except (ValueError, UnsupportedAlgorithm) as error:
        raise CertificateError(f"{where}: is not a valid PEM private key ({error})") from None


def _read(path: Path, where: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CertificateError(f"{where}: no such file") from None
    except IsADirectoryError:
        raise CertificateError(f"{where}: is a folder, not a file") from None
    except PermissionError:
        raise CertificateError(f"{where}: cannot be read (permission denied)") from None
    except OSError as error:
        raise CertificateError(f"{where}: cannot be read ({error.strerror or error})") from None


def _check_valid_now(cert: x509.Certificate, where: str, moment: datetime) -> None:
    if moment < cert.not_valid_before_utc:
        raise CertificateError(
            f"{where}: is not valid yet: valid from {format_time(cert.not_valid_before_utc)}, it is now "
            f"{format_time(moment)} (check this machine's clock)"
        )
    if moment > cert.not_valid_after_utc:
        raise CertificateError(
            f"{where}: expired on {format_time(cert.not_valid_after_utc)} (it is now {format_time(moment)}); "
            "issue a new one with `dpgan-agent certs issue`"
        )


# ------------------------------------------------------------------------------------------- loading


def load_node_credentials(
    cert_path: Path,
    key_path: Path,
    ca_path: Path,
    *,
    now: datetime | None = None,
    flags: Mapping[str, str] | None = None,
) -> NodeCredentials:
    """Read and check a node's certificate, private key and the cluster CA (PEM files).

    ``now``: the time to check validity at (default: the current time). ``flags``: optional names of
    where each path came from, keys ``"cert"``, ``"key"``, ``"ca"`` (e.g. ``{"cert": "--tls-cert"}``):
    messages then read ``--tls-cert /x/node-1.crt: ...``.

    The CA file may hold several CA certificates (during a CA rotation); every one must be a CA
    certificate, and the one that signed the node certificate must be valid now. The checks (RFC 5280
    §4.2.1.9 basicConstraints, §4.2.1.12 extendedKeyUsage, §4.2.1.6 subjectAltName, §6.1.3 validity and
    signature) each raise CertificateError with a one-line message naming the file: a missing,
    unreadable or non-PEM file; a file holding no certificate / no (unencrypted) private key; a key that
    does not match the certificate; a certificate that is itself a CA, is not signed by the CA, is
    expired or not yet valid, whose extendedKeyUsage (when present) lacks serverAuth or clientAuth,
    whose keyUsage (when present) lacks digitalSignature, that lacks the DNS name CLUSTER_SERVER_NAME,
    or whose subject CN is not a valid node id. An absent extendedKeyUsage extension allows every
    purpose (RFC 5280 §4.2.1.12) and is accepted. Use `expires_soon` to warn about a close expiry.
    """
    labels = dict(flags or {})

    def where(kind: str, path: Path) -> str:
        flag = labels.get(kind)
        return f"{flag} {path}" if flag else str(path)

    cert_where, key_where, ca_where = where("cert", cert_path), where("key", key_path), where("ca", ca_path)
    moment = _utc(now)

    ca_pem = _read(ca_path, ca_where)
    ca_certs = _parse_certificates(ca_pem, ca_where)
    for ca in ca_certs:
        if not _is_ca(ca):
            raise CertificateError(
                f"{ca_where}: {ca.subject.rfc4514_string()!r} is not a CA certificate (basicConstraints "
                "CA:TRUE); give the cluster CA's certificate (ca.crt of `dpgan-agent certs init`)"
            )
    certificate_pem = _read(cert_path, cert_where)
    cert = _parse_certificates(certificate_pem, cert_where)[0]
    private_key_pem = _read(key_path, key_where)
    key = _parse_private_key(private_key_pem, key_where)

    if _public_key_der(key.public_key()) != _public_key_der(cert.public_key()):
        raise CertificateError(
            f"{key_where}: this private key does not belong to the certificate {cert_where} "
            "(their public keys differ)"
        )
    if _is_ca(cert):
        raise CertificateError(
            f"{cert_where}: is a CA certificate, not a node certificate; issue one with "
            "`dpgan-agent certs issue --node-id NAME --ca-dir DIR`"
        )

    issuer = None
    for ca in ca_certs:
        if cert.issuer != ca.subject:
            continue
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            continue
        issuer = ca
        break
    if issuer is None:
        same_name = any(cert.issuer == ca.subject for ca in ca_certs)
        hint = (
            " (the issuer name matches but the signature does not: was the CA re-created with --force?)"
            if same_name
            else f" (issued by {cert.issuer.rfc4514_string()!r})"
        )
        raise CertificateError(f"{cert_where}: is not signed by the CA in {ca_path}{hint}")
    _check_valid_now(issuer, ca_where, moment)
    _check_valid_now(cert, cert_where, moment)

    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usages = None
    if usages is not None and ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE not in usages:
        missing = [
            name
            for oid, name in (
                (ExtendedKeyUsageOID.SERVER_AUTH, "serverAuth"),
                (ExtendedKeyUsageOID.CLIENT_AUTH, "clientAuth"),
            )
            if oid not in usages
        ]
        if missing:
            raise CertificateError(
                f"{cert_where}: extendedKeyUsage lacks {' and '.join(missing)}; every node is both a TLS "
                "server and a TLS client, so it needs serverAuth and clientAuth"
            )
    try:
        key_usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        key_usage = None
    if key_usage is not None and not key_usage.digital_signature:
        raise CertificateError(f"{cert_where}: keyUsage lacks digitalSignature, which TLS needs")

    node_id = _common_name(cert)
    if CLUSTER_SERVER_NAME not in _dns_names(cert):
        raise CertificateError(
            f"{cert_where}: lacks the DNS subjectAltName {CLUSTER_SERVER_NAME!r}; peers dial each other by "
            "IP address and check the server's certificate for that name, so every node certificate needs "
            f"it: issue one with `dpgan-agent certs issue --node-id {node_id or 'NAME'} --ca-dir DIR`"
        )
    if node_id is None:
        raise CertificateError(f"{cert_where}: the subject has no common name (CN), which is the node id")
    try:
        validate_node_id(node_id)
    except CertificateError as error:
        raise CertificateError(f"{cert_where}: subject common name: {error}") from None

    return NodeCredentials(
        certificate_pem=certificate_pem,
        private_key_pem=private_key_pem,
        ca_pem=ca_pem,
        node_id=node_id,
        not_valid_after=cert.not_valid_after_utc,
        cert_path=cert_path,
        key_path=key_path,
        ca_path=ca_path,
    )


def expires_soon(
    creds: NodeCredentials, now: datetime | None = None, days: int = EXPIRY_WARNING_DAYS
) -> bool:
    """Whether the node certificate expires within ``days`` days of ``now`` (default: the current time)."""
    return creds.not_valid_after - _utc(now) <= timedelta(days=days)


# ------------------------------------------------------------------------------------------- writing


def write_file_atomic(path: Path, payload: bytes, mode: int) -> None:
    """Write ``payload`` to ``path`` with permission bits ``mode`` so a reader sees the old file or the
    new one, never a partial one (agent.files.write_atomic). Raises OSError when the folder is not
    writable."""
    write_atomic(path, payload, mode)


def write_certificate(path: Path, cert_pem: bytes) -> None:
    """Atomically write a certificate, mode 0644 (public)."""
    write_file_atomic(path, cert_pem, CERT_FILE_MODE)


def write_private_key(path: Path, key_pem: bytes) -> None:
    """Atomically write a private key, mode 0600 (owner only)."""
    write_file_atomic(path, key_pem, KEY_FILE_MODE)
