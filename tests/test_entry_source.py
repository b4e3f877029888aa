"""Entering through a member that trains: a joiner or an out-of-step node whose chosen member stops
training (it froze, or it is itself re-entering) enters through another member instead of waiting on it.

Before this rule two out-of-step nodes that chose each other at one boundary waited for each other until
their state transfers timed out, and retried the same member (docs/membership.md, "Out of step").
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from agent.core.membership import PeerPosition, entry_source
from tests.faults import AGENT_FLAGS, CLUSTER_FLAGS, Cluster, iteration_flags, read_events, samples


def _training(node_id: str, iteration: int, members: tuple[str, ...]) -> PeerPosition:
    return PeerPosition(node_id, training=True, iteration=iteration, members=members, ready_from=0)


def _entering(node_id: str, iteration: int) -> PeerPosition:
    return PeerPosition(node_id, training=False, iteration=iteration, members=(), ready_from=iteration + 20)


@pytest.mark.timeout(10)
def test_the_chosen_member_is_kept_while_it_trains() -> None:
    peers = [_training("a", 90, ("a", "b", "me")), _training("b", 95, ("a", "b", "me"))]
    assert entry_source("me", "a", peers) == "a"  # not the most advanced, but chosen and training


@pytest.mark.timeout(10)
def test_a_member_that_does_not_train_is_replaced_by_the_most_advanced_of_the_largest_view() -> None:
    # Two out-of-step nodes that chose each other: each sees the other entering, and a third training.
    peers = [_entering("b", 30), _training("c", 9000, ("c",))]
    assert entry_source("a", "b", peers) == "c"
    peers = [
        _entering("b", 30),
        _training("c", 200, ("c",)),
        _training("d", 150, ("d", "e")),
        _training("e", 160, ("d", "e")),
    ]
    assert entry_source("a", "b", peers) == "e"  # the larger view, then the furthest member of it
    # A member that left the live peers (unreachable) is replaced the same way.
    assert entry_source("a", "gone", [_training("c", 10, ("c",))]) == "c"


@pytest.mark.timeout(10)
def test_no_member_trains_so_there_is_no_source() -> None:
    assert entry_source("a", "b", [_entering("b", 30), _entering("c", 30)]) is None
    assert entry_source("a", "b", []) is None
    # A paused peer reports training false: it is no source either.
    paused = PeerPosition("b", training=False, iteration=50, members=(), ready_from=None, paused=True)
    assert entry_source("a", "b", [paused]) is None
    # This node itself is never its own source, whatever a stale status of it says.
    assert entry_source("a", "a", [_training("a", 50, ("a",))]) is None


def _first(path: Path, predicate, timeout: float) -> dict | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in read_events(path):
            if predicate(event):
                return event
        time.sleep(0.05)
    return None


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_a_joiner_whose_member_freezes_mid_join_enters_through_another(tmp_path: Path) -> None:
    """3 agents train; a 4th joins and, while it waits for its member's state at the join boundary, that
    member freezes for 30 s. The joiner enters through another member within seconds and trains with the
    cluster. (Before: it retried the frozen member until its attempts ran out and exited with an error.)"""
    # A long view period gives the join a lead of 400 iterations: seconds in which to freeze the member.
    flags = [*CLUSTER_FLAGS, *AGENT_FLAGS, *iteration_flags(1_000_000), "--view-period", "200"]
    cluster = Cluster(tmp_path, flags, extra={i: ["--min-peers", "2"] for i in range(3)})
    with cluster:
        for i in range(3):
            cluster.spawn(i)
        joiner = cluster.nodes[3]
        deadline = time.monotonic() + 40
        while min(max((s.iteration for s in samples(read_events(n.log))), default=-1)
                  for n in cluster.nodes[:3]) < 20:  # fmt: skip
            assert time.monotonic() < deadline, cluster.tail()
            time.sleep(0.2)
        cluster.spawn(3)
        joining = _first(joiner.log, lambda e: e.get("event") == "joining running cluster", 40)
        assert joining is not None, cluster.tail()
        frozen = int(joining["state_from"].removeprefix("node-"))
        cluster.signal(frozen, signal.SIGSTOP)
        frozen_at = time.time()
        try:
            fetched = _first(joiner.log, lambda e: e.get("event") == "fetched state", 25)
            assert fetched is not None, f"no entry while node-{frozen} was frozen: {cluster.tail()}"
            assert fetched["source"] != f"node-{frozen}"
            assert joiner.process is not None and joiner.process.poll() is None, cluster.tail()
            # It trains with the cluster (iterations in which it mixed with a neighbour) while the member
            # it first chose is still frozen.
            mixed = _first(
                joiner.log, lambda e: e.get("event") == "iteration" and bool(e.get("neighbours")), 15
            )
            assert mixed is not None, cluster.tail()
            entered = mixed["_t"] - frozen_at
            print(f"the joiner mixed {entered:.1f} s after node-{frozen} froze")
            assert entered < 25, mixed
        finally:
            cluster.signal(frozen, signal.SIGCONT)
        codes = cluster.stop(timeout=30)
        assert codes == [0, 0, 0, 0], cluster.tail()


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_a_joiner_whose_members_all_stop_waits_for_them_and_never_trains_alone(tmp_path: Path) -> None:
    """2 agents train; a 3rd joins, and while it waits for the join boundary the 2 stop (SIGTERM: an agreed
    stop) and exit. The joiner has no member to enter through: it waits for its peers as at start, and
    does not found a cluster of its own from scratch. When the 2 resume, it joins them."""
    flags = [*CLUSTER_FLAGS, *AGENT_FLAGS, *iteration_flags(1_000_000), "--view-period", "200"]
    cluster = Cluster(tmp_path, flags, count=3, extra={i: ["--min-peers", "1"] for i in range(2)})
    with cluster:
        for i in range(2):
            cluster.spawn(i)
        deadline = time.monotonic() + 40
        while min(max((s.iteration for s in samples(read_events(n.log))), default=-1)
                  for n in cluster.nodes[:2]) < 20:  # fmt: skip
            assert time.monotonic() < deadline, cluster.tail()
            time.sleep(0.2)
        joiner = cluster.spawn(2)
        assert _first(joiner.log, lambda e: e.get("event") == "joining running cluster", 40), cluster.tail()
        cluster.signal(0, signal.SIGTERM)
        assert cluster.wait(40, indices=[0, 1]) == [0, 0], cluster.tail()
        waiting = _first(
            joiner.log, lambda e: e.get("event") == "no member to enter through; planning again", 20
        )
        assert waiting is not None, cluster.tail()
        time.sleep(3)
        assert not [s for s in samples(read_events(joiner.log))], "the joiner trained alone"
        assert joiner.process is not None and joiner.process.poll() is None
        # The members resume where they stopped; the joiner enters through them.
        for i in range(2):
            cluster.spawn(i, ["--resume"])
        fetched = _first(joiner.log, lambda e: e.get("event") == "fetched state", 40)
        assert fetched is not None and fetched["source"] in ("node-0", "node-1"), cluster.tail()
        mixed = _first(joiner.log, lambda e: e.get("event") == "iteration" and bool(e.get("neighbours")), 20)
        assert mixed is not None, cluster.tail()
        assert cluster.stop(timeout=30) == [0, 0, 0], cluster.tail()
