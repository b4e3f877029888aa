"""How an agent trusts its peers: the configuration's TLS keys turned into TransportSecurity, the node id
they imply, and the refusal to run plaintext on a network (docs/security.md).

Rules:
- `tls_cert`, `tls_key` and `tls_ca` come together or not at all; each file is checked at start
  (agent.security.certs.load_node_credentials) and every problem names the file.
- With TLS the node id IS the certificate's common name: `--node-id` may repeat it, never differ.
- Without TLS an agent listens only on loopback, unless the operator passes `--insecure`, which is then
  logged once at start as a warning.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from agent.core.config import TrainConfig
from agent.security.certs import CertificateError, expires_soon, load_node_credentials
from agent.transport.tls import TransportSecurity


@dataclass(frozen=True, slots=True)
class Trust:
    """What build_options needs: the transport security, the node id it fixes (None without TLS) and
    the warnings to log once the agent's logger exists."""

    security: TransportSecurity
    node_id: str | None
    warnings: tuple[str, ...] = ()


def is_loopback_host(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost'; False for wildcards and every other address."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a hostname: assume it is reachable from the network


def allowlist(value: str | None) -> frozenset[str] | None:
    """The allow_node_ids key as a set; None when not given. ValueError when it lists nothing."""
    if value is None:
        return None
    ids = frozenset(part.strip() for part in value.split(",") if part.strip())
    if not ids:
        raise ValueError("allow_node_ids: lists no node id (leave it out to admit every certificate)")
    return ids


def configure_trust(
    config: TrainConfig, *, node_id: str | None, hosts: tuple[str, ...], insecure: bool
) -> Trust:
    """Check the TLS keys and the plaintext policy. `hosts`: the listen and advertise hosts.

    Raises ValueError (naming the key, the flag or the file) when the keys are incomplete, a file is
    unusable, --node-id contradicts the certificate, TLS and --insecure are both given, or plaintext is
    asked for on a non-loopback address without --insecure.
    """
    paths = {"tls_cert": config.tls_cert, "tls_key": config.tls_key, "tls_ca": config.tls_ca}
    given = [key for key, value in paths.items() if value]
    allowed = allowlist(config.allow_node_ids)
    if given and len(given) < len(paths):
        missing = [f"--{key.replace('_', '-')}" for key in paths if key not in given]
        raise ValueError(
            f"TLS needs --tls-cert, --tls-key and --tls-ca together; missing {', '.join(missing)} "
            "(create them with 'dpgan-agent certs init' and 'dpgan-agent certs issue')"
        )
    if not given:
        if allowed is not None:
            raise ValueError("allow_node_ids needs TLS: identities come from certificates (--tls-*)")
        exposed = [host for host in hosts if not is_loopback_host(host)]
        if exposed and not insecure:
            raise ValueError(
                f"refusing to serve plaintext gRPC on {exposed[0]}: anyone who reaches the port could join, "
                "push parameters and read the model. Give --tls-cert, --tls-key and --tls-ca (see "
                "'dpgan-agent certs --help'), or --insecure to accept that on a trusted network"
            )
        warnings = (
            ("--insecure: plaintext gRPC on a network address; any host that reaches the port can join "
             "this run, push parameters and read the model",)
            if exposed
            else ()
        )
        return Trust(TransportSecurity.insecure(), None, warnings)
    if insecure:
        raise ValueError("--insecure contradicts --tls-cert/--tls-key/--tls-ca; give one or the other")
    try:
        credentials = load_node_credentials(
            Path(str(config.tls_cert)),
            Path(str(config.tls_key)),
            Path(str(config.tls_ca)),
            flags={"cert": "--tls-cert", "key": "--tls-key", "ca": "--tls-ca"},
        )
    except CertificateError as error:
        raise ValueError(str(error)) from None
    if node_id is not None and node_id != credentials.node_id:
        raise ValueError(
            f"--node-id {node_id!r} differs from the node id in --tls-cert {config.tls_cert} "
            f"({credentials.node_id!r}); with TLS a node is who its certificate says (drop --node-id)"
        )
    warnings: tuple[str, ...] = ()
    if expires_soon(credentials, datetime.now(UTC)):
        warnings = (
            f"--tls-cert {config.tls_cert} expires at {credentials.not_valid_after.isoformat()}: issue a "
            "new one ('dpgan-agent certs issue') and restart the agent before then",
        )
    return Trust(TransportSecurity(credentials, allowed), credentials.node_id, warnings)


def certificate_id(path: Path) -> str | None:
    """The common name of the certificate at ``path``, or None when it cannot be read (configure_trust
    then names the problem)."""
    from agent.security.certs import CertificateError, certificate_node_id

    try:
        return certificate_node_id(path.read_bytes())
    except (OSError, CertificateError, ValueError):
        return None


def persistent_node_id(path: Path, given: str | None, default: str | None = None) -> str:
    """The node id kept in `path` (--node-id-file), so a container re-created over the same data volume
    keeps its identity whatever its new hostname or address.

    The file's id wins; `given` (--node-id) must then agree with it. Without the file, the id is
    `given`, else `default` (the certificate's common name), else this host's name (a compose
    replica's container name, a pod's name), and it is written
    to `path` before the agent starts. ValueError naming the file when it is unreadable, empty,
    contradicts --node-id, or no id can be chosen.
    """
    from agent.core.membership import MembershipError, check_node_id
    from agent.files import write_atomic

    try:
        stored = path.read_text().strip() if path.exists() else None
    except OSError as error:
        raise ValueError(f"--node-id-file {path}: cannot read it: {error.strerror}") from None
    if stored is not None:
        if not stored:
            raise ValueError(f"--node-id-file {path}: the file is empty (delete it to choose a new id)")
        if given is not None and given != stored:
            raise ValueError(
                f"--node-id {given!r} contradicts --node-id-file {path} ({stored!r}): a node keeps its id "
                "for its data; drop --node-id, or delete the file to rename the node"
            )
        chosen = stored
    else:
        chosen = given or default or socket.gethostname().split(".")[0]
    try:
        check_node_id(chosen)
    except MembershipError as error:
        raise ValueError(f"--node-id-file {path}: {error}") from None
    if stored is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, (chosen + "\n").encode())
    return chosen


def issue_own_certificate(ca_dir: Path, node_id: str, folder: Path) -> tuple[str, str, str]:
    """--tls-issue-from: this node's certificate from the CA in `ca_dir` (ca.crt, ca.key), kept as
    `folder`/node.crt and node.key (fixed names, so health probes find them) and re-issued only when
    missing, unusable, expiring within 30 days, for another node id or from another CA. Returns the
    (cert, key, CA) paths. For clusters whose nodes share one trust domain (compose on one host): every
    node that holds the CA key can mint any identity. ValueError naming the file on a problem."""
    from datetime import UTC, datetime

    from agent.security.certs import (
        CertificateError,
        issue_node_certificate,
        write_certificate,
        write_private_key,
    )

    ca_cert, ca_key = ca_dir / "ca.crt", ca_dir / "ca.key"
    cert, key = folder / "node.crt", folder / "node.key"
    try:
        current = load_node_credentials(cert, key, ca_cert)
        if current.node_id == node_id and not expires_soon(current, datetime.now(UTC)):
            return str(cert), str(key), str(ca_cert)
    except CertificateError:
        pass  # missing, expired, another CA's, damaged: issue a new one
    try:
        cert_pem, key_pem = issue_node_certificate(ca_cert.read_bytes(), ca_key.read_bytes(), node_id)
    except OSError as error:
        raise ValueError(f"--tls-issue-from {ca_dir}: cannot read {error.filename}: {error.strerror}") from None  # noqa: E501
    except CertificateError as error:
        raise ValueError(f"--tls-issue-from {ca_dir}: {error}") from None
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    write_private_key(key, key_pem)
    write_certificate(cert, cert_pem)
    return str(cert), str(key), str(ca_cert)
