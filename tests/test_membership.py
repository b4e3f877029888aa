"""Membership and neighbour-health decisions are pure functions: (state, event) -> (state, action)."""

from __future__ import annotations

import pytest

from agent.core.membership import (
    Membership,
    MembershipError,
    PeerAction,
    PeerEvent,
    PeerHealth,
    check_node_id,
    on_peer_event,
)


def test_every_node_derives_the_same_indices_from_any_order() -> None:
    a = Membership.of(["node-2", "node-0", "node-1"])
    b = Membership.of({"node-1", "node-2", "node-0"})
    assert a.node_ids == b.node_ids == ("node-0", "node-1", "node-2")
    assert a.index("node-2") == 2 and a.node_id(1) == "node-1"


@pytest.mark.parametrize(
    ("ids", "message"),
    [(["a", "a"], "duplicate node ids"), ([], "empty"), (["ok", "bad id"], "invalid")],
)
def test_bad_memberships_are_refused(ids: list[str], message: str) -> None:
    with pytest.raises(MembershipError, match=message):
        Membership.of(ids)


def test_node_ids_accept_addresses() -> None:
    assert check_node_id("10.0.0.2:5000") == "10.0.0.2:5000"
    assert check_node_id("[::1]:5000") == "[::1]:5000"
    with pytest.raises(MembershipError):
        check_node_id("-leading-dash")


def test_unreachable_is_down_at_once() -> None:
    health, action = on_peer_event(PeerHealth(), PeerEvent.UNREACHABLE, max_missed_rounds=3)
    assert not health.alive and action is PeerAction.MARK_DOWN


def test_missed_deadlines_leave_out_then_mark_down() -> None:
    health = PeerHealth()
    actions = []
    for _ in range(3):
        health, action = on_peer_event(health, PeerEvent.MISSED_DEADLINE, max_missed_rounds=3)
        actions.append(action)
    assert actions == [PeerAction.LEAVE_OUT_THIS_ROUND, PeerAction.LEAVE_OUT_THIS_ROUND, PeerAction.MARK_DOWN]
    assert not health.alive
    # A down peer stays down; later events do nothing.
    assert on_peer_event(health, PeerEvent.DELIVERED, 3) == (health, PeerAction.NONE)


def test_a_delivery_resets_the_miss_count() -> None:
    health, _ = on_peer_event(PeerHealth(), PeerEvent.MISSED_DEADLINE, 3)
    health, action = on_peer_event(health, PeerEvent.DELIVERED, 3)
    assert health == PeerHealth(alive=True, consecutive_misses=0) and action is PeerAction.NONE
