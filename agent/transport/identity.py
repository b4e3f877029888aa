"""Handshake identity: what a node tells its peers about itself, and why two nodes cannot train together."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final

from agent.core.config import FLOAT32_WIRES
from agent.transport._generated.dpgan.v1 import dpgan_pb2 as pb
from agent.transport.protocol import PROTOCOL_VERSION

# Config values quoted in a handshake refusal are cut to this length so a reason stays one readable line.
_MAX_QUOTED_VALUE_CHARS: Final = 60
_MAX_LISTED_CONFIG_KEYS: Final = 8


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """What a node tells its peers about itself in a handshake."""

    node_id: str
    advertise_address: str
    schema_hash: str
    config_hash: str
    config_json: str
    membership_epoch: int = 0
    agent_version: str = ""
    # This process's incarnation: random, new at every start (HandshakeRequest.instance_id).
    instance_id: str = ""
    # The run this node trains in (docs/security.md); "" only in tests of the bare transport.
    run_id: str = ""

    def __post_init__(self) -> None:
        if not self.node_id:
            raise ValueError("node_id must be non-empty")

    def handshake_request(self, status: pb.PeerStatus | None = None) -> pb.HandshakeRequest:
        return pb.HandshakeRequest(
            status=status,
            protocol_version=PROTOCOL_VERSION,
            node_id=self.node_id,
            advertise_address=self.advertise_address,
            schema_hash=self.schema_hash,
            config_hash=self.config_hash,
            config_json=self.config_json,
            membership_epoch=self.membership_epoch,
            agent_version=self.agent_version,
            instance_id=self.instance_id,
            run_id=self.run_id,
        )

    def handshake_response(
        self, *, accepted: bool, reason: str, status: pb.PeerStatus | None = None
    ) -> pb.HandshakeResponse:
        return pb.HandshakeResponse(
            status=status,
            accepted=accepted,
            reason=reason,
            node_id=self.node_id,
            protocol_version=PROTOCOL_VERSION,
            schema_hash=self.schema_hash,
            config_hash=self.config_hash,
            config_json=self.config_json,
            membership_epoch=self.membership_epoch,
            agent_version=self.agent_version,
            instance_id=self.instance_id,
            run_id=self.run_id,
        )


def identity_mismatch(local: PeerIdentity, remote: pb.HandshakeRequest | pb.HandshakeResponse) -> str | None:
    """Return why `remote` cannot train with `local` (naming the difference), or None if compatible."""
    if remote.protocol_version != PROTOCOL_VERSION:
        return f"protocol_version differs: this node: {PROTOCOL_VERSION}, peer: {remote.protocol_version}"
    if not remote.node_id:
        return "peer sent an empty node_id"
    if remote.node_id == local.node_id:
        return f"peer uses the same node_id {remote.node_id!r} as this node"
    if remote.schema_hash != local.schema_hash:
        return (
            f"schema_hash differs (model/parameter layout): this node: {local.schema_hash!r}, "
            f"peer: {remote.schema_hash!r}"
        )
    if remote.config_hash != local.config_hash:
        return f"config_hash differs: {describe_config_difference(local.config_json, remote.config_json)}"
    # After the config: a default run id derives from it, and the differing key is the better reason.
    if remote.run_id != local.run_id:
        return (
            f"run_id differs: this node trains in run {local.run_id!r}, peer {remote.node_id!r} in run "
            f"{remote.run_id!r} (nodes of different runs never train together; see --run-id)"
        )
    return None


def describe_config_difference(local_json: str, remote_json: str) -> str:
    """Name the keys (dotted paths) whose values differ between two canonical config JSON documents,
    each as ``key (this node: X, peer: Y)``; ``local_json`` is this node's."""
    try:
        local_config = json.loads(local_json)
    except json.JSONDecodeError as error:
        return f"this node's config_json is not valid JSON ({error})"
    try:
        remote_config = json.loads(remote_json)
    except json.JSONDecodeError as error:
        return f"peer config_json is not valid JSON ({error})"
    differences: list[str] = []
    _collect_differences("", local_config, remote_config, differences)
    if not differences:
        return "config_json documents are equal, so the two nodes hash configs differently"
    listed = "; ".join(differences[:_MAX_LISTED_CONFIG_KEYS])
    more = len(differences) - _MAX_LISTED_CONFIG_KEYS
    return f"config keys differ: {listed}" + (f"; and {more} more" if more > 0 else "")


def _quote(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    if len(text) > _MAX_QUOTED_VALUE_CHARS:
        text = text[: _MAX_QUOTED_VALUE_CHARS - 3] + "..."
    return text


def _collect_differences(path: str, local: Any, remote: Any, differences: list[str]) -> None:
    if isinstance(local, dict) and isinstance(remote, dict):
        for key in sorted(local.keys() | remote.keys()):
            child = f"{path}.{key}" if path else str(key)
            if key not in remote:
                differences.append(f"{child} (this node: {_quote(local[key])}, peer: missing)")
            elif key not in local:
                differences.append(f"{child} (this node: missing, peer: {_quote(remote[key])})")
            else:
                _collect_differences(child, local[key], remote[key], differences)
    elif local != remote or type(local) is not type(remote):
        shown = (_quote_value(path, local), _quote_value(path, remote))
        differences.append(f"{path or '<root>'} (this node: {shown[0]}, peer: {shown[1]})")


def _quote_value(path: str, value: Any) -> str:
    """A value as the message shows it: the float32 wires compare as "float32" (config.comparable_value),
    which a node configured with another float32 wire would not recognise as its own."""
    if path == "wire_dtype" and value == "float32":
        return f'"float32" (any of {", ".join(FLOAT32_WIRES)})'
    return _quote(value)
