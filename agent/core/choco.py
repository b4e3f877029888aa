"""Compressed gossip with error feedback: CHOCO-Gossip (Koloskova, Stich, Jaggi, ICML 2019), kept per edge.

CHOCO replaces a gossip round x_i ← Σ_j w_ij x_j by
    q_i = Q(x_i − x̂_i);  x̂_j += q_j for i and its neighbours;  x_i ← x_i + γ Σ_j w_ij (x̂_j − x̂_i)
where x̂_j are *public copies* every neighbour of j holds identically, Q is a contractive compressor
(``agent.core.compression``) and γ ∈ (0, 1] the consensus step size. Only q travels; the error
x − x̂ is not lost but sent later (error feedback). Σ_i x_i is preserved exactly (W doubly stochastic).

dpgan's graphs are time-varying (one-peer exponential pairs every node with one partner per round) and
members come and go, so copies are kept **per directed edge**: node i holds S_ij (the copy of x_i that
neighbour j holds) and R_ji (its copy of x_j), and a round with neighbours N does
    q_ij = Q(x_i − S_ij); S_ij += q_ij; send q_ij;   R_ji += q_ji on receipt
    x_i ← x_i + Σ_{j ∈ N, ascending} (R_ji − S_ij) · (γ w_ij)
On a static graph with a deterministic compressor every S_ij of node i follows the same sequence, so
this *is* CHOCO-Gossip; on any symmetric W the edge terms of i and j cancel, so the average is kept.
With γ = 1 and an exact Q it is plain gossip.

Keeping copies equal at both ends (what the cancellation needs) when messages are lost:
* The first message on an edge, and the first after any inconsistency, is a *reset*: the sender's x
  itself in float32; both ends set their copy to it (sequence number 0).
* Every other message carries ``base``, the sequence number of the copy the difference applies to,
  and ``seen``, the sequence number of the sender's copy of the receiver (−1: none). Both ends of a
  pair evaluate the same predicate on the two messages of the round (``edge_consistent``): the edge
  term is used only when each message applies to the copy the other end holds. Otherwise both skip it,
  the receiver drops its copy, the sender drops its own (its next message is a reset).
* A push that was not accepted drops the sender's copy at once.
So a lost message costs the edge one or two pairings of compressed exchange and one full vector,
never a wrong copy. Pure torch; the simulator and the agents share every line of it.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from agent.core.compression import Compressed, Compressor, compress_with_dense

# γ used when the configuration leaves consensus_step unset (measured on ring8 with 8 nodes, one-peer
# exponential, docs/compression.md): int8 is nearly exact, top-k/random-k at 1 % need a small step.
DEFAULT_CONSENSUS_STEP = {"int8": 1.0, "topk": 0.04, "randk": 0.01}


@dataclass
class EdgeCopy:
    """One copy of a neighbour's (or our own, as a neighbour holds it) vector: float32 (d,)."""

    vector: torch.Tensor
    seq: int


@dataclass(frozen=True, eq=False)
class EdgeMessage:
    """What a node sends one neighbour in one round.

    ``reset``: ``dense`` is the sender's x itself (float32 on the wire); otherwise ``dense`` is
    decompress(``compressed``), the difference applied to the copy numbered ``base``. ``seen``: the
    sequence number of the sender's copy of the receiver before this round, −1 when it has none.
    """

    reset: bool
    base: int
    seen: int
    dense: torch.Tensor
    compressed: Compressed | None = None


def edge_consistent(own: EdgeMessage, received: EdgeMessage) -> bool:
    """Whether the edge term of this round may be used: each message applies to the copy its receiver
    holds. Both ends compute the same value from the same two messages (own ↔ received swapped)."""
    ours_fits = own.reset or own.base == received.seen
    theirs_fits = received.reset or received.base == own.seen
    return ours_fits and theirs_fits


class EdgeCopies:
    """One node's copies of every edge it gossiped over, keyed by the neighbour (index or node id)."""

    def __init__(self, compressor: Compressor) -> None:
        self.compressor = compressor
        self.sent: dict[Hashable, EdgeCopy] = {}
        self.received: dict[Hashable, EdgeCopy] = {}

    def seen(self, neighbour: Hashable) -> int:
        copy = self.received.get(neighbour)
        return -1 if copy is None else copy.seq

    def outgoing(self, neighbour: Hashable, x: torch.Tensor, seed: int = 0) -> EdgeMessage:
        """This round's message to ``neighbour`` (updates the sent copy): a reset when no copy exists."""
        seen = self.seen(neighbour)
        copy = self.sent.get(neighbour)
        if copy is None:
            # A private copy (the caller may reuse x's memory); the message carries x itself.
            self.sent[neighbour] = EdgeCopy(x.detach().to("cpu", copy=True), 0)
            return EdgeMessage(reset=True, base=0, seen=seen, dense=x)
        compressed, dense = compress_with_dense(x.detach().to("cpu") - copy.vector, self.compressor, seed)
        base = copy.seq
        copy.vector.add_(dense)  # the copy is private to this table (a reset stores a copy of x)
        copy.seq += 1
        return EdgeMessage(reset=False, base=base, seen=seen, dense=dense, compressed=compressed)

    def drop_sent(self, neighbour: Hashable) -> None:
        """Forget the copy ``neighbour`` holds of us (a push was refused or lost): next message resets."""
        self.sent.pop(neighbour, None)

    def incoming(self, neighbour: Hashable, own: EdgeMessage | None, received: EdgeMessage) -> bool:
        """Apply ``received`` from ``neighbour``; True when the round's edge term may be used.

        ``own`` is what this node sent the neighbour this round (None: nothing was sent, e.g. the push
        failed). Copies that cannot stay consistent are dropped (the next message on them resets)."""
        if received.reset:
            self.received[neighbour] = EdgeCopy(received.dense.detach().to("cpu", copy=True), 0)
        else:
            copy = self.received.get(neighbour)
            if copy is None or copy.seq != received.base:
                self.received.pop(neighbour, None)
            else:
                copy.vector.add_(received.dense.to("cpu"))
                copy.seq += 1
        if own is None or neighbour not in self.sent:
            return False
        if not edge_consistent(own, received):
            # The neighbour cannot apply what we sent (it will drop its copy of us): resend from scratch.
            if not (own.reset or own.base == received.seen):
                self.drop_sent(neighbour)
            return False
        return neighbour in self.received

    def term(self, neighbour: Hashable) -> torch.Tensor:
        """R_ji − S_ij for a consistent edge."""
        return self.received[neighbour].vector - self.sent[neighbour].vector

    def forget(self, keep: set[Hashable]) -> None:
        """Drop the copies of neighbours not in ``keep`` (members that left the view)."""
        for table in (self.sent, self.received):
            for key in [k for k in table if k not in keep]:
                del table[key]


def consensus_step(
    x: torch.Tensor, gamma: float, terms: Sequence[tuple[int, float, torch.Tensor]]
) -> torch.Tensor:
    """x + Σ (R_ji − S_ij) · (γ w_ij) over ``terms`` = (j, w_ij, R_ji − S_ij), summed in ascending j.

    The products γ·w are formed in float64 and rounded to x's dtype once, so the simulator and every
    agent add the same numbers in the same order (bit-identical results)."""
    acc = x
    for _, weight, difference in sorted(terms, key=lambda term: term[0]):
        scale = float(np.float32(gamma * weight)) if x.dtype == torch.float32 else gamma * weight
        acc = acc + difference.to(x.device) * torch.tensor(scale, dtype=x.dtype, device=x.device)
    return acc if acc is not x else x.clone()


def consensus_step_size(kind: str, configured: float | None) -> float:
    """γ: ``configured`` (the consensus_step key) or the compressor's tested default."""
    return DEFAULT_CONSENSUS_STEP[kind] if configured is None else configured


def choco_round(
    states: Sequence[torch.Tensor],
    rows: Sequence[Sequence[tuple[int, float]]],
    copies: Sequence[EdgeCopies],
    gamma: float,
    seeds: Sequence[int],
) -> list[torch.Tensor]:
    """One compressed gossip round of every node, with no message lost (the simulator).

    ``states[i]``: node i's x (float32 (d,)); ``rows[i]``: its mixing row; ``copies[i]``: its edge copies,
    keyed by neighbour index; ``seeds[i]``: the randk seed of node i's messages this round. Each node
    does exactly what an agent does with the messages it receives (``agent.node.gossip``)."""
    n = len(states)
    sent = [{j: copies[i].outgoing(j, states[i], seeds[i]) for j, _ in rows[i] if j != i} for i in range(n)]
    mixed = []
    for i in range(n):
        terms = []
        for j, weight in rows[i]:
            if j != i and copies[i].incoming(j, sent[i][j], sent[j][i]):
                terms.append((j, weight, copies[i].term(j)))
        mixed.append(consensus_step(states[i], gamma, terms))
    return mixed
