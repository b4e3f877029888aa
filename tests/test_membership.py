"""Membership and neighbour-health decisions are pure functions: (state, event) -> (state, action)."""

from __future__ import annotations

import pytest

from agent.core.membership import (
    Found,
    Isolation,
    IsolationAction,
    IsolationPolicy,
    Join,
    Membership,
    MembershipError,
    PeerAction,
    PeerEvent,
    PeerHealth,
    PeerPosition,
    PeerRecord,
    Wait,
    adopt_stop,
    check_node_id,
    counts_in_view,
    entry_plan,
    on_peer_event,
    on_reachable_peers,
    propose_stop,
    resync_source,
    view_at_boundary,
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


# ---- out of step, entering, isolation, stops (pure rules; no processes) -------------------------------


def _training(node_id: str, iteration: int, members: tuple[str, ...], ready_from: int = 0) -> PeerPosition:
    return PeerPosition(node_id, training=True, iteration=iteration, members=members, ready_from=ready_from)


def test_a_peer_left_out_stays_out_until_it_declares_a_later_ready_from() -> None:
    peer = PeerRecord("b", "b:1", alive=True, ready_from=0)
    assert counts_in_view(peer, 100)
    assert not counts_in_view(peer, 100, left_out_at=57)  # frozen, then answering probes again
    rejoined = PeerRecord("b", "b:1", alive=True, ready_from=80)
    assert counts_in_view(rejoined, 80, left_out_at=57)
    assert not counts_in_view(rejoined, 70, left_out_at=57)  # not before its boundary
    view = view_at_boundary("a", [peer, PeerRecord("c", "c:1", ready_from=0)], 100, {"b": 57})
    assert view.node_ids == ("a", "c")


def test_a_frozen_node_resyncs_through_the_majority_that_left_it_out() -> None:
    majority = ("a", "b", "c")
    peers = [_training(n, 1100 + i, majority) for i, n in enumerate(majority)]
    source = resync_source("f", ("a", "b", "c", "f"), 0, peers)
    assert source is not None and source.node_id == "c"  # the most advanced member of the majority


def test_members_that_count_the_node_do_not_trigger_a_resync() -> None:
    full = ("a", "b", "f")
    assert resync_source("f", full, 0, [_training("a", 50, full), _training("b", 51, full)]) is None
    # A joiner declared ready from 40; a member still before 40 has not adopted that view yet.
    assert resync_source("f", ("f",), 40, [_training("a", 39, ("a", "b"))]) is None
    assert resync_source("f", ("f",), 40, [_training("a", 41, ("a", "b"))]).node_id == "a"
    assert resync_source("f", ("f",), None, [_training("a", 41, ("a", "b"))]) is None


def test_exactly_one_half_of_a_healed_even_split_resyncs() -> None:
    left, right = ("a", "b"), ("c", "d")
    from_left = resync_source("a", left, 0, [_training("c", 500, right), _training("d", 500, right)])
    from_right = resync_source("c", right, 0, [_training("a", 700, left), _training("b", 700, left)])
    assert from_left is None and from_right is not None and from_right.node_id in left


def test_entry_plans_found_join_or_wait() -> None:
    idle = [PeerPosition(n, training=False, iteration=300) for n in ("b", "c")]
    assert entry_plan("a", 300, idle, 10) == Found(("a", "b", "c"), 300)  # consistent resume
    behind = [PeerPosition("b", False, iteration=310), PeerPosition("c", False, iteration=300)]
    assert isinstance(entry_plan("a", 300, behind, 10), Wait)  # a lagging checkpoint waits, then joins
    # The furthest founds with everyone it reaches; the lagging node catches up at the founders' start.
    assert entry_plan("b", 310, [PeerPosition("a", False, 300)], 10) == Found(("a", "b"), 310)
    founded = [_training("b", 312, ("a", "b"), ready_from=310)]
    assert entry_plan("a", 300, founded, 10) == Join("b", at=310)
    running = [_training("b", 2940, ("a", "b"), ready_from=0)]
    assert entry_plan("a", 0, running, 10) == Join("b")  # restarted with the same id: never found
    early = [_training("b", 3, ("a", "b"), ready_from=0)]
    assert entry_plan("a", 0, early, 10) == Found(("a", "b"), 0)  # a founder a moment late


def test_isolation_applies_the_policy_only_after_the_bound() -> None:
    state, action = on_reachable_peers(Isolation(), 0, 1, now=10.0, bound=4.0, policy=IsolationPolicy.PAUSE)
    assert action is IsolationAction.NONE and state.since == 10.0
    state, action = on_reachable_peers(state, 0, 1, now=14.5, bound=4.0, policy=IsolationPolicy.PAUSE)
    assert action is IsolationAction.PAUSE
    _, action = on_reachable_peers(state, 0, 1, now=14.5, bound=4.0, policy=IsolationPolicy.EXIT)
    assert action is IsolationAction.EXIT
    _, action = on_reachable_peers(state, 0, 1, now=99.0, bound=4.0, policy=IsolationPolicy.CONTINUE)
    assert action is IsolationAction.NONE
    state, action = on_reachable_peers(state, 1, 1, now=15.0, bound=4.0, policy=IsolationPolicy.PAUSE)
    assert state.since is None and action is IsolationAction.NONE


def test_stop_proposals_merge_to_the_earliest_reachable_boundary() -> None:
    assert propose_stop(37, 10) == 40 and propose_stop(40, 10) == 50
    assert adopt_stop(None, 40, floor=38, period=10) == 40
    assert adopt_stop(50, 40, floor=38, period=10) == 40  # an earlier proposal wins
    assert adopt_stop(40, 50, floor=38, period=10) == 40
    assert adopt_stop(None, 40, floor=40, period=10) == 40  # in the middle of iteration 40: stop before it
    assert adopt_stop(40, 0, floor=39, period=10) == 40  # no proposal: keep
    assert adopt_stop(None, 0, floor=39, period=10) is None  # no stop asked for


def test_a_stop_some_member_has_passed_moves_to_the_next_reachable_boundary() -> None:
    """The staggered-stop race: a node frozen at 79 thaws and proposes 80 while the others agreed 90 and
    one of them is already at 81. Whoever learns that position moves 80 on; the stop is never lost."""
    assert adopt_stop(90, 80, floor=81, period=10) == 90  # a member at 81: 80 is out of reach
    assert adopt_stop(80, 0, floor=81, period=10) == 90  # adopted before the position was known: moved
    assert adopt_stop(None, 40, floor=41, period=10) == 50  # already past it: the next boundary
    assert adopt_stop(80, 90, floor=80, period=10) == 80  # nobody past 80: the earliest still wins
    assert adopt_stop(120, 80, floor=81, period=10) == 90  # moved, then the earliest reachable
