"""Temporary re-exports for agent/node; removed once its imports move.

The codec was split by job: `protocol` (version, RPC names), `frames` (one tensor on the wire),
`state` (FetchState streams), `buffers` (receive memory), `identity` (handshake). New code imports
from those modules; only the names agent/node still takes from here are re-exported.
"""

from __future__ import annotations

# temporary re-exports for agent/node; removed once its imports move
from agent.transport.frames import WireError, prepare_vector
from agent.transport.identity import PeerIdentity, identity_mismatch
from agent.transport.protocol import PROTOCOL_VERSION
from agent.transport.state import StateSnapshot

__all__ = [
    "PROTOCOL_VERSION",
    "PeerIdentity",
    "StateSnapshot",
    "WireError",
    "identity_mismatch",
    "prepare_vector",
]
