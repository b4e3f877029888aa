"""Compressed gossip in an agent: the edge copies of ``agent.core.choco`` applied to one round's messages.

``GossipRounds`` moves the bytes; this module decides what to send each neighbour (a compressed
difference, or a reset carrying x when the edge has no consistent copy), and mixes what arrived with
CHOCO's consensus step. It does what ``agent.core.choco.choco_round`` does for the simulator, message for
message, so a cluster without faults reproduces the simulator bit for bit; under faults it keeps the
copies consistent as described there (a lost or refused message costs the edge a reset, never a wrong
copy).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from agent.core.choco import EdgeCopies, EdgeMessage, consensus_step
from agent.core.compression import randk_seed
from agent.core.membership import Membership
from agent.transport.frames import WireVector, prepare_edge_message
from agent.transport.inbox import InboxMessage


class EdgeGossip:
    """One agent's compressed-gossip state: its edge copies, keyed by neighbour node id.

    ``settings``: an ``agent.core.engine.CompressedGossip`` (compressor, γ, run seed)."""

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.copies = EdgeCopies(settings.compressor)
        self._epoch: int | None = None

    def outgoing(
        self, x: torch.Tensor, neighbours: Sequence[str], own_index: int, round_index: int, view: Membership
    ) -> dict[str, tuple[EdgeMessage, WireVector]]:
        """This round's message to each neighbour, encoded (the sent copies advance now)."""
        if view.epoch != self._epoch:
            # Members that left the view keep no copies (a returning member starts with a reset).
            self.copies.forget(set(view.node_ids))
            self._epoch = view.epoch
        seed = randk_seed(self.settings.seed, round_index, own_index)
        prepared = {}
        for node_id in neighbours:
            message = self.copies.outgoing(node_id, x, seed)
            prepared[node_id] = (message, prepare_edge_message(message))
        return prepared

    def undelivered(self, node_id: str) -> None:
        """Our push to ``node_id`` was refused or lost: its copy of us is unknown, the next one resets."""
        self.copies.drop_sent(node_id)

    def mix(
        self,
        x: torch.Tensor,
        row: Sequence[tuple[int, float]],
        own_index: int,
        view: Membership,
        sent: Mapping[str, EdgeMessage],
        arrived: Mapping[str, InboxMessage],
    ) -> torch.Tensor:
        """x after the consensus step over the neighbours of ``row`` whose message ``arrived`` (of this
        view) and whose edge is consistent; every arrived message updates its copy first."""
        terms = []
        for j, weight in sorted(row):
            if j == own_index:
                continue
            node_id = view.node_id(j)
            message = arrived.get(node_id)
            if message is None or message.edge is None:
                continue
            received = EdgeMessage(
                reset=message.edge.reset, base=message.edge.base, seen=message.edge.seen, dense=message.vector
            )
            own = sent.get(node_id)
            if self.copies.incoming(node_id, own, received):
                terms.append((j, weight, self.copies.term(node_id)))
        return consensus_step(x, self.settings.gamma, terms)
