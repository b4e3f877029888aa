"""Security of the cluster: X.509 certificates for mutual TLS between peers (built with ``cryptography``).

``certs``: the cluster CA, node certificates and the checks the agent runs on its TLS files;
``cli``: ``dpgan-agent certs init|issue|show``.
"""

from __future__ import annotations

from agent.security.certs import (
    CA_CERT_FILE,
    CA_DAYS,
    CA_KEY_FILE,
    CLUSTER_SERVER_NAME,
    EXPIRY_WARNING_DAYS,
    NODE_DAYS,
    CertificateError,
    NodeCredentials,
    certificate_fingerprint,
    certificate_node_id,
    create_ca,
    expires_soon,
    is_dns_name,
    issue_node_certificate,
    load_node_credentials,
    node_file_stem,
    validate_node_id,
    write_certificate,
    write_private_key,
)

__all__ = [
    "CA_CERT_FILE",
    "CA_DAYS",
    "CA_KEY_FILE",
    "CLUSTER_SERVER_NAME",
    "EXPIRY_WARNING_DAYS",
    "NODE_DAYS",
    "CertificateError",
    "NodeCredentials",
    "certificate_fingerprint",
    "certificate_node_id",
    "create_ca",
    "expires_soon",
    "is_dns_name",
    "issue_node_certificate",
    "load_node_credentials",
    "node_file_stem",
    "validate_node_id",
    "write_certificate",
    "write_private_key",
]
