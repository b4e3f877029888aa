"""A throwaway cluster PKI for `dpgan-agent --local N` (and benchmarks): a CA and one certificate per
node in one folder, so even a one-command local cluster runs over mutual TLS."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from agent.security.certs import (
    CertificateError,
    create_ca,
    issue_node_certificate,
    load_node_credentials,
    write_certificate,
    write_private_key,
)


def throwaway_pki(folder: Path, node_ids: Sequence[str]) -> dict[str, list[str]]:
    """A throwaway cluster CA and one certificate per node in ``folder`` (reused when they still verify,
    so a resumed cluster keeps them); returns each node's --tls-* flags."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    ca_cert, ca_key = folder / "ca.crt", folder / "ca.key"
    if not (ca_cert.is_file() and ca_key.is_file()):
        cert_pem, key_pem = create_ca(common_name="dpgan --local throwaway CA")
        write_certificate(ca_cert, cert_pem)
        write_private_key(ca_key, key_pem)
    flags = {}
    for node_id in node_ids:
        cert, key = folder / f"{node_id}.crt", folder / f"{node_id}.key"
        try:
            load_node_credentials(cert, key, ca_cert)
        except CertificateError:
            cert_pem, key_pem = issue_node_certificate(ca_cert.read_bytes(), ca_key.read_bytes(), node_id)
            write_certificate(cert, cert_pem)
            write_private_key(key, key_pem)
        flags[node_id] = ["--tls-cert", str(cert), "--tls-key", str(key), "--tls-ca", str(ca_cert)]
    return flags
