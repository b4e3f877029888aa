"""Membership decisions as pure functions: who is in the cluster, which index each node has, and
how a node's view of one neighbour's health changes with each event.

Every node derives the same topology from the same membership: node ids sorted, position = index
into the mixing schedule. No coordinator assigns ranks.
"""

from __future__ import annotations

import re
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


@dataclass(frozen=True)
class Membership:
    """The sorted node ids of one cluster view; ``epoch`` numbers successive views."""

    node_ids: tuple[str, ...]
    epoch: int = 0

    @classmethod
    def of(cls, node_ids: list[str] | tuple[str, ...] | set[str], epoch: int = 0) -> Membership:
        ids = [check_node_id(node_id) for node_id in node_ids]
        duplicates = sorted({node_id for node_id in ids if ids.count(node_id) > 1})
        if duplicates:
            raise MembershipError(f"duplicate node ids in membership: {duplicates}")
        if not ids:
            raise MembershipError("membership is empty")
        return cls(tuple(sorted(ids)), epoch)

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
