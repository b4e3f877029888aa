"""A throwaway cluster PKI for tests: a CA, node certificates, and the agent flags that use them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from agent.security.certs import (
    NodeCredentials,
    certificate_node_id,
    create_ca,
    issue_node_certificate,
    load_node_credentials,
    write_certificate,
    write_private_key,
)
from agent.transport.tls import TransportSecurity


@dataclass(frozen=True)
class Pki:
    """Files of one CA and the node certificates issued from it, under ``root``."""

    root: Path
    ca_cert: bytes
    ca_key: bytes

    @classmethod
    def create(cls, root: Path, *, now: datetime | None = None) -> Pki:
        root.mkdir(parents=True, exist_ok=True)
        cert, key = create_ca(now=now)
        write_certificate(root / "ca.crt", cert)
        write_private_key(root / "ca.key", key)
        return cls(root, cert, key)

    @classmethod
    def at(cls, root: Path) -> Pki:
        """The PKI in ``root``, created on first use (agents of one test share it)."""
        if (root / "ca.crt").is_file():
            return cls(root, (root / "ca.crt").read_bytes(), (root / "ca.key").read_bytes())
        return cls.create(root)

    @property
    def ca_path(self) -> Path:
        return self.root / "ca.crt"

    def issue(self, node_id: str, *, now: datetime | None = None, days: int = 30) -> tuple[Path, Path]:
        cert, key = issue_node_certificate(self.ca_cert, self.ca_key, node_id, now=now, days=days)
        cert_path, key_path = self.root / f"{node_id}.crt", self.root / f"{node_id}.key"
        write_certificate(cert_path, cert)
        write_private_key(key_path, key)
        return cert_path, key_path

    def flags(self, node_id: str) -> list[str]:
        """Agent flags that run ``node_id`` over mutual TLS (issuing its certificate when missing)."""
        cert, key = self.root / f"{node_id}.crt", self.root / f"{node_id}.key"
        if not cert.exists():
            cert, key = self.issue(node_id)
        return ["--tls-cert", str(cert), "--tls-key", str(key), "--tls-ca", str(self.ca_path)]

    def security(self, node_id: str, **kwargs: object) -> TransportSecurity:
        """TransportSecurity for ``node_id``, checked as an agent checks it at start."""
        cert, key = self.root / f"{node_id}.crt", self.root / f"{node_id}.key"
        if not cert.exists():
            cert, key = self.issue(node_id)
        return TransportSecurity(load_node_credentials(cert, key, self.ca_path), **kwargs)  # type: ignore[arg-type]

    def unchecked_security(self, node_id: str) -> TransportSecurity:
        """TransportSecurity from ``node_id``'s files as they are (an attacker's expired certificate)."""
        cert, key = self.root / f"{node_id}.crt", self.root / f"{node_id}.key"
        credentials = NodeCredentials(
            certificate_pem=cert.read_bytes(),
            private_key_pem=key.read_bytes(),
            ca_pem=self.ca_cert,
            node_id=certificate_node_id(cert.read_bytes()),
            not_valid_after=datetime.max,
            cert_path=cert,
            key_path=key,
            ca_path=self.ca_path,
        )
        return TransportSecurity(credentials)
