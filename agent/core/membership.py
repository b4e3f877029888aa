"""Membership decisions as pure functions: who is in the cluster, which index each node has, and
how a node's view of one neighbour's health changes with each event.

Every node derives the same topology from the same membership: node ids sorted, position = index
into the mixing schedule. No coordinator assigns ranks.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
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
    # Nothing from it by the round deadline, but a probe found it training in this view at this
    # position: it is held up by a neighbour of its own (a frozen node two hops away), not out of step.
    MISSED_DEADLINE = "missed_deadline"
    # Nothing by the deadline and the probe did not answer in time, or answered from another position
    # or view: it is out of step (frozen, cut off, restarted, behind or ahead).
    OUT_OF_STEP = "out_of_step"
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
    """Liveness comes from gRPC: an unreachable or out-of-step peer is down at once; one that is in step
    but late after ``max_missed_rounds`` deadlines in a row (each missed round already leaves it out).
    The agent uses ``max_missed_rounds=2``, so nobody waits for an out-of-step neighbour more than one
    round timeout; a neighbour marked down stays out of later views until it re-enters as a joiner
    (``counts_in_view``)."""
    if not health.alive:
        return health, PeerAction.NONE
    if event is PeerEvent.DELIVERED:
        return replace(health, consecutive_misses=0), PeerAction.NONE
    if event in (PeerEvent.UNREACHABLE, PeerEvent.OUT_OF_STEP):
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


def counts_in_view(peer: PeerRecord, boundary: int, left_out_at: int | None = None) -> bool:
    """Whether ``peer`` is a member of this node's view from ``boundary`` on.

    It must be alive, ready from an iteration <= ``boundary`` and, if this node left it out at
    iteration ``left_out_at`` (it missed a round deadline, became unreachable, restarted or was found
    out of step), it must have declared since then a ready-from iteration after ``left_out_at``: an
    out-of-step peer is never taken back at positions it cannot match; it re-enters as a joiner does.
    """
    if not peer.alive or peer.ready_from is None or peer.ready_from > boundary:
        return False
    return left_out_at is None or peer.ready_from > left_out_at


def view_at_boundary(
    self_id: str,
    peers: Iterable[PeerRecord],
    boundary: int,
    left_out: Mapping[str, int] | None = None,
) -> Membership:
    """Itself plus every peer that ``counts_in_view`` at ``boundary`` (``left_out``: node id -> the
    iteration at which this node left it out)."""
    left_out = left_out or {}
    members = [self_id]
    members += [p.node_id for p in peers if counts_in_view(p, boundary, left_out.get(p.node_id))]
    return Membership.of(members)


def join_iteration(cluster_iteration: int, period: int, lead_iterations: int) -> int:
    """The boundary at which a late joiner enters: far enough ahead that every member hears of it first."""
    return next_boundary(cluster_iteration + 1, period, lead_iterations)


# ---- out-of-step nodes -------------------------------------------------------------------------------
#
# The one rule (docs/membership.md, "Out of step"): a node that a member of its view left out (it was
# frozen, cut off, restarted, resumed from an older checkpoint, or simply missed one deadline) does not
# try to catch up inside that view. It re-enters the running cluster exactly as a late joiner does: it
# declares a ready-from boundary ahead of the cluster, fetches parameters and optimizer state from a
# member at that boundary and gossips from there. Its members take it back at that boundary because its
# new ready-from is later than the iteration at which they left it out (``counts_in_view``).


@dataclass(frozen=True)
class PeerPosition:
    """What this node last heard from one peer about where it is (its ``PeerStatus``)."""

    node_id: str
    training: bool
    iteration: int
    members: tuple[str, ...] = ()  # its current view while training
    ready_from: int | None = None
    paused: bool = False


def left_out_by(self_id: str, ready_from: int | None, peers: Sequence[PeerPosition]) -> list[PeerPosition]:
    """The training peers whose view does not count this node although they are past the boundary
    from which this node gossips (a peer still before ``ready_from`` has not adopted that view yet)."""
    if ready_from is None:
        return []
    return [
        p for p in peers if p.training and p.iteration > ready_from and self_id not in p.members and p.members
    ]


def resync_source(
    self_id: str, own_view: Sequence[str], ready_from: int | None, peers: Sequence[PeerPosition]
) -> PeerPosition | None:
    """The peer to re-enter through, or None when this node stays in its view.

    A node resynchronises when training peers left it out *and* their view outranks its own: it is
    larger, or as large and holding the smallest node id of the two. So of two halves of a healed
    partition exactly one re-enters through the other (never both, which would leave no one to fetch
    from); the node returned is the most advanced member of the winning view.
    """
    excluding = left_out_by(self_id, ready_from, peers)
    if not excluding:
        return None
    # This node's side: itself and the members of its view that have not left it out.
    excluding_ids = {peer.node_id for peer in excluding}
    own = tuple(sorted({self_id} | {n for n in own_view if n not in excluding_ids}))
    groups: dict[tuple[str, ...], list[PeerPosition]] = {}
    for peer in excluding:
        groups.setdefault(tuple(sorted(peer.members)), []).append(peer)
    best = min(groups, key=lambda members: (-len(members), min(members)))
    if len(best) < len(own) or (len(best) == len(own) and min(best) > min(own)):
        return None
    return max(groups[best], key=lambda p: p.iteration)


def entry_source(self_id: str, chosen: str, peers: Sequence[PeerPosition]) -> str | None:
    """The member to fetch state through while entering (joining or resynchronising), given fresh
    positions of the live peers: ``chosen`` while it trains; else the most advanced member of the largest
    training view (as ``entry_plan`` joins); None when no peer trains.

    A node that is not training serves no state past the iteration it stopped at, so waiting on it
    would wait for ever. That is what two out-of-step nodes that chose each other at the same boundary
    (each read that the other's view outranked its own) used to do: each re-enters through a member that
    trains instead. When none does, the node waits for as many peers as at start, and ``entry_plan``
    decides again (founding with the peers at the highest iteration, never alone from scratch).
    """
    training = [p for p in peers if p.training and p.members and p.node_id != self_id]
    if any(p.node_id == chosen for p in training):
        return chosen
    return _most_advanced_of_largest_view(training).node_id if training else None


def _most_advanced_of_largest_view(training: Sequence[PeerPosition]) -> PeerPosition:
    return max(training, key=lambda p: (len(p.members), p.iteration))


# ---- where to enter: start, resume, re-found after a pause ----------------------------------------------


@dataclass(frozen=True)
class Found:
    """Start training at ``iteration`` with ``members`` (this node included), keeping local state."""

    members: tuple[str, ...]
    iteration: int


@dataclass(frozen=True)
class Join:
    """Enter the running (or about to run) cluster through ``source`` as a late joiner does; ``at``: the
    boundary its founders already count this node at (a lagging checkpoint catching up), else None (the
    joiner declares a boundary ahead of the cluster)."""

    source: str
    at: int | None = None


@dataclass(frozen=True)
class Wait:
    """Not yet: wait for the peers named in ``reason`` to move."""

    reason: str


def entry_plan(
    self_id: str, own_iteration: int, peers: Sequence[PeerPosition], period: int
) -> Found | Join | Wait:
    """How a node that is not training (starting, resuming, or paused) enters, given the live peers.

    - A peer that just founded (it is less than a view period past its ready-from iteration R) a view
      counting this node: at R == this node's iteration, found with that view; at R ahead of it (this
      node's checkpoint is older), join at R, fetching the founder's state there.
    - Other training peers: join through the most advanced one of the largest view.
    - No training peer: the nodes at the highest iteration found with every live peer, keeping their
      state, so a consistent set of checkpoints resumes exactly; a node behind them waits until they
      train, then catches up by fetching their state at their starting iteration (instead of timing out).
    """
    training = [p for p in peers if p.training and p.members]
    for peer in training:
        if self_id not in peer.members or peer.ready_from is None:
            continue
        if peer.iteration >= peer.ready_from + period:
            continue
        if peer.ready_from == own_iteration:
            return Found(tuple(sorted(peer.members)), own_iteration)
        if peer.ready_from > own_iteration:
            return Join(peer.node_id, at=peer.ready_from)
    if training:
        return Join(_most_advanced_of_largest_view(training).node_id)
    highest = max([own_iteration, *(p.iteration for p in peers)])
    if own_iteration < highest:
        ahead = sorted(p.node_id for p in peers if p.iteration == highest)
        return Wait(f"peers {ahead} are at iteration {highest}, this node at {own_iteration}; joining them")
    return Found(tuple(sorted([self_id, *(p.node_id for p in peers)])), own_iteration)


# ---- isolation ----------------------------------------------------------------------------------------


class IsolationPolicy(StrEnum):
    CONTINUE = "continue"  # train on alone, counted in logs, summary and metrics
    PAUSE = "pause"  # stop at a boundary, report not-ready, keep probing, re-enter on heal
    EXIT = "exit"  # checkpoint and exit non-zero


class IsolationAction(StrEnum):
    NONE = "none"
    PAUSE = "pause"
    EXIT = "exit"


@dataclass(frozen=True)
class Isolation:
    """Since when (monotonic seconds) this node has reached fewer live peers than it needs."""

    since: float | None = None


def on_reachable_peers(
    state: Isolation,
    reachable: int,
    needed: int,
    now: float,
    bound: float,
    policy: IsolationPolicy,
) -> tuple[Isolation, IsolationAction]:
    """Isolation clock: reaching ``needed`` peers resets it; below that for more than ``bound``
    seconds the policy's action is due (checked by the agent at boundaries)."""
    if reachable >= needed:
        return Isolation(None), IsolationAction.NONE
    since = state.since if state.since is not None else now
    if now - since < bound or policy is IsolationPolicy.CONTINUE:
        return Isolation(since), IsolationAction.NONE
    action = IsolationAction.PAUSE if policy is IsolationPolicy.PAUSE else IsolationAction.EXIT
    return Isolation(since), action


# ---- consistent stops ---------------------------------------------------------------------------------


def propose_stop(iteration: int, period: int) -> int:
    """The boundary a node asked to stop proposes: the first boundary after ``iteration`` (at least one
    iteration ahead, so members a little behind or ahead of this node can all still reach it)."""
    return next_boundary(iteration + 1, period)


def adopt_stop(current: int | None, proposed: int, floor: int, period: int) -> int | None:
    """Stop proposals merge to the earliest boundary every member can still reach.

    ``floor``: the furthest position known in the view (this node's first iteration it can still stop
    before, and every training member's last reported iteration). A member at position p can stop at
    boundaries >= p only, so a proposal behind the floor, or an adopted stop the floor has passed (a
    member trained past it, e.g. while the proposer was frozen and out of date), becomes the first
    boundary at or after the floor: a stop asked for is never dropped, only moved later. Every member
    hears every proposal and every position (they travel with the handshake status and are relayed), so
    all of them settle on the same boundary and their checkpoints hold one iteration. ``proposed`` 0:
    none. Returns the stop to keep (None: no stop asked for).
    """

    def reachable(stop: int) -> int:
        return stop if stop >= floor else next_boundary(floor, period)

    stops = [reachable(stop) for stop in (current, proposed if proposed > 0 else None) if stop is not None]
    return min(stops) if stops else None
