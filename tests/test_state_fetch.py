"""fetch_at_boundary gives up on a member that stopped advancing (two out-of-step nodes that chose each
other to re-enter through used to wait for each other for ever)."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from agent.node import state
from agent.transport.state import StateSnapshot

pytestmark = pytest.mark.timeout(30)


class Member:
    """A FetchState source whose served iteration follows ``iterations`` and then stays put."""

    address = "127.0.0.1:1"

    def __init__(self, iterations: list[int]) -> None:
        self.iterations = iterations

    async def fetch_state(self, timeout: float) -> StateSnapshot:
        iteration = self.iterations.pop(0) if len(self.iterations) > 1 else self.iterations[0]
        return StateSnapshot(iteration=iteration, round=0, tensors={"x": torch.zeros(1)})


def test_a_member_that_reaches_the_boundary_is_waited_for(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(state, "MIN_STALL_S", 0.2)
    snapshot = asyncio.run(state.fetch_at_boundary(Member([10, 10, 20, 30]), 30, timeout=0.05))  # type: ignore[arg-type]
    assert snapshot.iteration == 30


def test_a_member_that_stopped_advancing_is_given_up_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(state, "MIN_STALL_S", 0.3)
    started = time.monotonic()
    with pytest.raises(state.SourceStalled, match="stayed at iteration 80 for 0 s, short of the boundary"):
        asyncio.run(state.fetch_at_boundary(Member([70, 80]), 100, timeout=0.05))  # type: ignore[arg-type]
    assert 0.3 <= time.monotonic() - started < 5


def test_a_member_that_says_it_stopped_training_is_given_up_on_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Two out-of-step nodes that chose each other: each serves the iteration it stopped at and says it
    # does not train. The first poll that sees that gives up, long before the stall patience.
    monkeypatch.setattr(state, "MIN_STALL_S", 60.0)
    statuses = iter([True, True, False])
    started = time.monotonic()
    with pytest.raises(
        state.SourceNotTraining, match="is not training \\(at iteration 30, short of the boundary 60"
    ):
        asyncio.run(
            state.fetch_at_boundary(Member([30]), 60, timeout=0.05, training=lambda: next(statuses))  # type: ignore[arg-type]
        )
    assert time.monotonic() - started < 5
    # A member that trains is waited for whatever it says.
    snapshot = asyncio.run(
        state.fetch_at_boundary(Member([10, 20, 60]), 60, timeout=0.05, training=lambda: True)  # type: ignore[arg-type]
    )
    assert snapshot.iteration == 60
