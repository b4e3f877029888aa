"""What the rounds log while views disagree: "round mixed without neighbours" once when the missing
neighbours change, then at most every MIXED_WITHOUT_LOG_SECONDS with the number of rounds it stands for
(a fresh tester's split logged 3641 such lines per node, one per round)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from agent.node import gossip
from agent.node.gossip import GossipRounds

pytestmark = pytest.mark.timeout(10)


class _Log:
    def __init__(self) -> None:
        self.lines: list[tuple[str, dict[str, Any]]] = []

    def info(self, event: str, **fields: Any) -> None:
        self.lines.append((event, fields))


def test_rounds_mixed_without_neighbours_are_logged_once_per_change_or_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [100.0]
    monkeypatch.setattr(gossip.time, "monotonic", lambda: clock[0])
    log = _Log()
    rounds = SimpleNamespace(log=log, _mixed_without=None, _mixed_without_rounds=0)

    def note(missing: tuple[str, ...], iteration: int) -> None:
        GossipRounds._note_mixed_without(rounds, missing, iteration, 0)  # type: ignore[arg-type]

    for iteration in range(50):  # 50 rounds without node-1 within the interval: one line
        clock[0] += 0.1
        note(("node-1",), iteration)
    assert [fields["rounds"] for _, fields in log.lines] == [1]
    clock[0] += gossip.MIXED_WITHOUT_LOG_SECONDS
    note(("node-1",), 50)  # the interval passed: one line for the 49 silent rounds and this one
    note(("node-1", "node-2"), 51)  # other neighbours missing: logged at once
    note(("node-1", "node-2"), 52)
    assert [(f["iteration"], f["missing"], f["rounds"]) for _, f in log.lines] == [
        (0, ["node-1"], 1),
        (50, ["node-1"], 50),
        (51, ["node-1", "node-2"], 1),
    ]
    assert {event for event, _ in log.lines} == {"round mixed without neighbours"}
