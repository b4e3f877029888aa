"""The membership controller: applies the pure rules of ``agent.core.membership`` to what this node
observes (handshakes, probes, pushes, round deadlines) and holds the resulting view.

It decides nothing itself: every decision is one of the pure functions (``on_peer_event``,
``view_at_boundary``, ``resync_source``, ``on_reachable_peers``), called with this node's facts. The
lifecycle (``agent.node.agent``) acts on the answers: it rebuilds the data shard when the view changes,
re-enters the cluster when ``resync_source`` names a peer, pauses or exits when isolation says so.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from agent.core.config import TrainConfig
from agent.core.membership import (
    Isolation,
    IsolationAction,
    IsolationPolicy,
    Membership,
    PeerAction,
    PeerEvent,
    PeerHealth,
    PeerPosition,
    on_peer_event,
    on_reachable_peers,
    resync_source,
    view_at_boundary,
)
from agent.node.peers import PeerRegistry
from agent.train.simulate import schedule_from
from agent.transport._generated.dpgan.v1 import dpgan_pb2 as pb

# A neighbour in step but late (held up by a frozen node two hops away) is left out of at most this many
# rounds in a row before it is marked down; an out-of-step one is marked down at its first deadline.
MAX_MISSED_ROUNDS = 2
# In-step check at a missed deadline: iterations a delayed neighbour may be from ours.
IN_STEP_ITERATIONS = 2


def position_from_status(node_id: str, status: pb.PeerStatus) -> PeerPosition:
    return PeerPosition(
        node_id=node_id,
        training=status.training,
        iteration=status.iteration,
        members=tuple(status.members),
        ready_from=status.ready_from_iteration if status.ready else None,
        paused=status.paused,
    )


class ViewController:
    """This node's current view, its neighbours' health within it, and who it left out since when."""

    def __init__(self, node_id: str, config: TrainConfig, registry: PeerRegistry, log: Any) -> None:
        self.node_id = node_id
        self.config = config
        self.registry = registry
        self.log = log
        self.view = Membership.of([node_id])
        self.index = 0
        self.schedule = schedule_from(config, 1)
        self.health: dict[str, PeerHealth] = {}
        # node id -> the iteration at which this node left it out; it stays out of views until it
        # declares a later ready-from (counts_in_view).
        self.left_out: dict[str, int] = {}
        # How often a member was left out, by reason kind (metrics: dpgan_peers_left_out_total).
        self.left_out_counts: Counter[str] = Counter()
        self.instances: dict[str, str] = {}  # incarnation of each member when the view was formed
        self.isolation = Isolation()
        self.mismatch_logged: set[tuple[str, int]] = set()

    # ---- the view ------------------------------------------------------------------------------------

    def set_view(self, view: Membership, iteration: int) -> Membership:
        previous = self.view
        self.view = view
        self.index = view.index(self.node_id)
        self.schedule = schedule_from(self.config, view.size)
        self.health = {n: PeerHealth() for n in view.node_ids if n != self.node_id}
        self.instances = {n: self.registry.instances.get(n, "") for n in self.health}
        self.log.info(
            "membership view",
            iteration=iteration,
            members=list(view.node_ids),
            epoch=view.epoch,
            joined=sorted(set(view.node_ids) - set(previous.node_ids)),
            left=sorted(set(previous.node_ids) - set(view.node_ids)),
        )
        return previous

    def forget_left_out(self) -> None:
        """A node that (re-)enters starts with a clean slate: its new members just admitted it."""
        self.left_out.clear()

    def at_boundary(self, iteration: int) -> bool:
        """Recompute the view at boundary ``iteration``; True when it changed."""
        self.note_departures(iteration)
        view = view_at_boundary(self.node_id, self.registry.usable_records(), iteration, self.left_out)
        if view != self.view:
            self.set_view(view, iteration)
            return True
        return False

    def note_departures(self, iteration: int) -> None:
        """Members that probes found dead, or that restarted, are left out from ``iteration`` on."""
        for node_id, health in self.health.items():
            if not health.alive:
                continue
            record = self.registry.records.get(node_id)
            if record is None or not record.alive:
                self.leave_out(node_id, iteration, "probes found it unreachable", "unreachable")
            elif self.restarted(node_id):
                self.leave_out(node_id, iteration, "it restarted (new incarnation)", "restarted")

    def restarted(self, node_id: str) -> bool:
        known = self.instances.get(node_id, "")
        current = self.registry.instances.get(node_id, "")
        return bool(known and current and known != current)

    def leave_out(self, node_id: str, iteration: int, reason: str, kind: str = "other") -> None:
        """Stop mixing with a member of the current view; it stays out of later views until it declares
        a ready-from after ``iteration`` (it re-enters as a joiner). ``kind``: a short reason for metrics."""
        if node_id in self.health and not self.health[node_id].alive:
            return
        self.left_out_counts[kind] += 1
        self.left_out[node_id] = max(iteration, self.left_out.get(node_id, iteration))
        self.health[node_id] = PeerHealth(alive=False)
        self.log.warning(
            "leaving peer out until it re-enters", peer=node_id, iteration=iteration, reason=reason
        )

    # ---- events within a view --------------------------------------------------------------------------

    def record(self, node_id: str, event: PeerEvent, iteration: int, reason: str = "") -> None:
        health, action = on_peer_event(self.health[node_id], event, MAX_MISSED_ROUNDS)
        if action is PeerAction.MARK_DOWN:
            self.leave_out(
                node_id, iteration, f"{event.value}: {reason}" if reason else event.value, event.value
            )
            if event is PeerEvent.UNREACHABLE:
                self.registry.mark_dead(node_id, reason)
        self.health[node_id] = health

    def live_neighbours(self, neighbours: list[str], iteration: int) -> list[str]:
        """Neighbours still healthy in this view; a neighbour that restarted is left out at once."""
        for node_id in neighbours:
            if self.health[node_id].alive and self.restarted(node_id):
                self.leave_out(node_id, iteration, "it restarted (new incarnation)", "restarted")
        return [node_id for node_id in neighbours if self.health[node_id].alive]

    def classify_late(self, status: pb.PeerStatus | None, iteration: int) -> PeerEvent | None:
        """What a neighbour's missed deadline means, from a probe of it right after the deadline.

        MISSED_DEADLINE: it trains in this very view within ``IN_STEP_ITERATIONS`` of ``iteration``, so
        it is only held up (by a frozen node two hops away); None: it is in step but holds another view
        for a moment (it learned of a departure later or earlier than we did; views agree again at the
        next boundary), so it is left out of this round only; OUT_OF_STEP: anything else.
        """
        if (
            status is None
            or not status.training
            or self.node_id not in status.members
            or abs(int(status.iteration) - iteration) > IN_STEP_ITERATIONS
        ):
            return PeerEvent.OUT_OF_STEP
        if tuple(sorted(status.members)) != self.view.node_ids:
            return None
        return PeerEvent.MISSED_DEADLINE

    # ---- out of step, isolation -------------------------------------------------------------------------

    def positions(self) -> list[PeerPosition]:
        status = self.registry.remote_status
        return [position_from_status(n, status[n]) for n in self.registry.alive() if n in status]

    def resync_source(self, ready_from: int | None) -> PeerPosition | None:
        return resync_source(self.node_id, self.view.node_ids, ready_from, self.positions())

    def isolation_action(self, needed: int, bound: float, policy: IsolationPolicy) -> IsolationAction:
        if needed <= 0:
            return IsolationAction.NONE
        before = self.isolation.since
        self.isolation, action = on_reachable_peers(
            self.isolation, len(self.registry.alive()), needed, time.monotonic(), bound, policy
        )
        reachable = len(self.registry.alive())
        if before is None and self.isolation.since is not None:
            self.log.warning(
                "isolated", reachable=reachable, needed=needed, policy=policy.value, bound_s=bound
            )
        elif before is not None and self.isolation.since is None:
            self.log.info("no longer isolated", reachable=reachable)
        return action
