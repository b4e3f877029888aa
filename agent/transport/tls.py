"""Transport security: mutual TLS between the peers of one run, and who a caller really is.

With credentials (agent.security.certs.NodeCredentials: this node's certificate and key, and the cluster
CA) every connection is TLS in both directions: the server demands a client certificate signed by the
cluster CA (`require_client_auth`), the client verifies the server's certificate against the same CA.
gRPC core (BoringSSL) does the X.509 path validation of RFC 5280, validity dates included; a stranger,
a certificate of another CA, an expired certificate or no certificate at all fail the TLS handshake
before any RPC handler runs, so not one byte of theirs reaches training and not one byte of state
leaves.

Whom a call comes from is the certificate's subject common name (gRPC's auth context key
``x509_common_name``), never a field of the message: `caller_identity` reads it, and the server compares
it with the node id a handshake, a push header, an announcement or a state request claims.

Peers dial each other by IP address, which no certificate can list in advance for DHCP or pod networks,
so the client checks the server's certificate for the DNS name CLUSTER_SERVER_NAME that every node
certificate carries (`grpc.ssl_target_name_override`): the server proves it holds a certificate of this
cluster. Which member it is does not need proving for safety: everything a node mixes arrives in pushes
to its own server, authenticated there.

Without credentials (`TransportSecurity.insecure()`) nothing is checked and the node id of a message is
taken as given, the behaviour before TLS; the agent refuses that on a non-loopback address unless the
operator passes --insecure (agent/node/main.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import grpc

from agent.security.certs import CLUSTER_SERVER_NAME, NodeCredentials
from agent.transport.options import ChannelOption

# The auth-context key holding the peer certificate's subject common name (grpc/grpc_security_constants.h).
AUTH_COMMON_NAME: Final = "x509_common_name"


@dataclass(frozen=True, slots=True)
class TransportSecurity:
    """How one node's server and clients secure their connections.

    `credentials` None means plaintext (see the module docstring). `allowed_node_ids`: when given, only
    these authenticated identities may handshake, push, announce or fetch state (an allowlist on top
    of the CA); None admits every certificate the CA signed.
    """

    credentials: NodeCredentials | None = None
    allowed_node_ids: frozenset[str] | None = None

    @classmethod
    def insecure(cls) -> TransportSecurity:
        return cls()

    @property
    def enabled(self) -> bool:
        return self.credentials is not None

    def server_credentials(self) -> grpc.ServerCredentials:
        """Server credentials that require a client certificate signed by the cluster CA."""
        credentials = self._require()
        return grpc.ssl_server_credentials(
            [(credentials.private_key_pem, credentials.certificate_pem)],
            root_certificates=credentials.ca_pem,
            require_client_auth=True,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Channel credentials presenting this node's certificate and trusting only the cluster CA."""
        credentials = self._require()
        return grpc.ssl_channel_credentials(
            root_certificates=credentials.ca_pem,
            private_key=credentials.private_key_pem,
            certificate_chain=credentials.certificate_pem,
        )

    def channel_options(self) -> list[ChannelOption]:
        """Extra channel options: the name the server's certificate is checked against."""
        return [("grpc.ssl_target_name_override", CLUSTER_SERVER_NAME)] if self.enabled else []

    def admits(self, node_id: str) -> bool:
        return self.allowed_node_ids is None or node_id in self.allowed_node_ids

    def _require(self) -> NodeCredentials:
        if self.credentials is None:
            raise RuntimeError("TransportSecurity has no credentials (plaintext transport)")
        return self.credentials


def caller_identity(context: grpc.aio.ServicerContext) -> str | None:
    """The authenticated node id of the caller (its certificate's common name), None on plaintext."""
    return common_name(context.auth_context())


def common_name(auth_context: Mapping[str, Any]) -> str | None:
    """The certificate subject CN from a gRPC auth context, or None when the connection has none."""
    values = auth_context.get(AUTH_COMMON_NAME) or []
    if not values:
        return None
    value = values[0]
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def claim_refusal(
    security: TransportSecurity, authenticated: str | None, claimed: str, what: str
) -> str | None:
    """Why a call claiming to come from `claimed` is refused, or None when it may proceed.

    `authenticated` is `caller_identity` of the call; `what` names the claim for the message
    ("handshake", "push", ...). Plaintext transports accept every claim.
    """
    if not security.enabled:
        return None
    if authenticated is None:
        return f"{what} arrived without an authenticated client certificate"
    if claimed and claimed != authenticated:
        return (
            f"{what} claims node {claimed!r} but the caller's certificate is for {authenticated!r}; "
            "a node may speak only for itself"
        )
    if not security.admits(authenticated):
        return f"node {authenticated!r} is not in this node's --allow-node-ids list"
    return None
