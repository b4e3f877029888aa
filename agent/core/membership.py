"""Membership decisions as pure functions: who is in the cluster, which index each node has, and
how a node's view of one neighbour's health changes with each event.

Every node derives the same topology from the same membership: node ids sorted, position = index
into the mixing schedule. No coordinator assigns ranks.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from enum import StrEnum

NODE_ID_PATTERN = re.compile(r"^[A-Za-z0-9\[][A-Za-z0-9._:\-\[\]]{0,127}$")


class MembershipError(ValueError):
    """Node ids are missing, duplicated or malformed."""


def check_node_id(node_id: str) -> str:
    if not NODE_ID_PATTERN.match(node_id):
        raise MembershipError(
            f"node id {node_id!r} is invalid: use 1-128 letters, digits and . _ : - [ ] starting alphanumeric"
        )
    return node_id


def view_epoch(node_ids: Iterable[str]) -> int:
    """The epoch of a view: a 63-bit hash of its sorted member ids.

    Derived from the members alone, so two nodes holding the same view agree on its epoch without
    exchanging a counter; a vector mixed under another view carries another epoch.
    """
    digest = hashlib.sha256("\n".join(sorted(node_ids)).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


@dataclass(frozen=True)
class Membership:
    """The sorted node ids of one cluster view and its epoch (``view_epoch`` of the ids)."""

    node_ids: tuple[str, ...]
    epoch: int

    @classmethod
    def of(cls, node_ids: Iterable[str]) -> Membership:
        ids = [check_node_id(node_id) for node_id in node_ids]
        duplicates = sorted({node_id for node_id in ids if ids.count(node_id) > 1})
        if duplicates:
            raise MembershipError(f"duplicate node ids in membership: {duplicates}")
        if not ids:
            raise MembershipError("membership is empty")
        return cls(tuple(sorted(ids)), view_epoch(ids))

    @property
    def size(self) -> int:
        return len(self.node_ids)

    def index(self, node_id: str) -> int:
        try:
            return self.node_ids.index(node_id)
        except ValueError:
            raise MembershipError(f"node {node_id!r} is not a member of {list(self.node_ids)}") from None

    def node_id(self, index: int) -> str:
        return self.node_ids[index]


class PeerEvent(StrEnum):
    DELIVERED = "delivered"  # the neighbour's vector for the round arrived in time
    MISSED_DEADLINE = "missed_deadline"  # nothing from it by the round deadline
    UNREACHABLE = "unreachable"  # a push to it failed at the transport level (refused, reset, timeout)


class PeerAction(StrEnum):
    NONE = "none"
    LEAVE_OUT_THIS_ROUND = "leave_out_this_round"
    MARK_DOWN = "mark_down"  # stop mixing with it and stop waiting for it


@dataclass(frozen=True)
class PeerHealth:
    alive: bool = True
    consecutive_misses: int = 0


def on_peer_event(
    health: PeerHealth, event: PeerEvent, max_missed_rounds: int
) -> tuple[PeerHealth, PeerAction]:
    """Liveness comes from gRPC: an unreachable peer is down at once; a silent one after
    ``max_missed_rounds`` deadlines in a row (each missed round already leaves it out)."""
    if not health.alive:
        return health, PeerAction.NONE
    if event is PeerEvent.DELIVERED:
        return replace(health, consecutive_misses=0), PeerAction.NONE
    if event is PeerEvent.UNREACHABLE:
        return PeerHealth(alive=False, consecutive_misses=health.consecutive_misses), PeerAction.MARK_DOWN
    misses = health.consecutive_misses + 1
    if misses >= max_missed_rounds:
        return PeerHealth(alive=False, consecutive_misses=misses), PeerAction.MARK_DOWN
    return PeerHealth(alive=True, consecutive_misses=misses), PeerAction.LEAVE_OUT_THIS_ROUND


# ---- views that change -------------------------------------------------------------------------------
#
# The rule (documented in docs/membership.md): views change only at boundaries, iterations that are
# multiples of the view period P. At a boundary B every node recomputes its view as itself plus every
# peer it has handshaken with that is alive (answered its last probe) and ready from an iteration <= B.
# Each pushed vector carries the epoch of the sender's view; a round mixes only vectors whose epoch
# equals the receiver's, renormalising its row over those. Two nodes whose knowledge differs at a
# boundary therefore simply do not mix with each other until their views agree again; rows always
# sum to 1, so no node's parameters are scaled, and the disagreement lasts at most until the next
# boundary after the probes converge.


@dataclass(frozen=True)
class PeerRecord:
    """What this node knows of one handshaken peer."""

    node_id: str
    address: str
    alive: bool = True
    ready_from: int | None = None  # the first iteration the peer gossips at; None: not ready yet


def is_boundary(iteration: int, period: int) -> bool:
    return iteration % period == 0


def next_boundary(iteration: int, period: int, lead: int = 0) -> int:
    """The first boundary at or after ``iteration + lead``."""
    target = iteration + lead
    return -(-target // period) * period


def view_at_boundary(self_id: str, peers: Iterable[PeerRecord], boundary: int) -> Membership:
    members = [self_id]
    members += [p.node_id for p in peers if p.alive and p.ready_from is not None and p.ready_from <= boundary]
    return Membership.of(members)


def join_iteration(cluster_iteration: int, period: int, lead_iterations: int) -> int:
    """The boundary at which a late joiner enters: far enough ahead that every member hears of it first."""
    return next_boundary(cluster_iteration + 1, period, lead_iterations)
