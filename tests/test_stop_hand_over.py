"""hand_over_stop (agent/node/stopping.py): a node at the agreed stop keeps telling the members that have
not confirmed it, returns once all have, and gives up after the grace naming the silent ones."""

from __future__ import annotations

import asyncio

import pytest
import structlog

from agent.node.stopping import hand_over_stop

pytestmark = pytest.mark.timeout(20)
log = structlog.get_logger("test")


class Members:
    """Fake members: ``confirms_after[m]`` handshakes until member m reports the stop (None: never)."""

    def __init__(
        self, confirms_after: dict[str, int | None], stop_at: int, gone: frozenset[str] = frozenset()
    ) -> None:
        self.confirms_after, self.stop_at, self.gone = confirms_after, stop_at, gone
        self.told: dict[str, int] = dict.fromkeys(confirms_after, 0)

    def reported(self, member: str) -> int:
        needed = self.confirms_after[member]
        return self.stop_at if needed is not None and self.told[member] >= needed else 0

    async def tell(self, member: str) -> bool:
        await asyncio.sleep(0.01)
        self.told[member] += 1
        return member in self.gone


def test_returns_once_every_member_confirms_and_tells_only_the_missing() -> None:
    members = Members({"a": 0, "b": 1, "c": 3}, stop_at=100)
    loop_time: list[float] = []

    async def scenario() -> list[str]:
        loop = asyncio.get_running_loop()
        began = loop.time()
        missing = await hand_over_stop(100, ["a", "b", "c"], members.reported, members.tell, 10.0, log)
        loop_time.append(loop.time() - began)
        return missing

    assert asyncio.run(scenario()) == []
    assert members.told == {"a": 0, "b": 1, "c": 3}  # a had confirmed already; b once; c three times
    assert loop_time[0] < 2.0


def test_gives_up_after_the_grace_and_names_the_silent_member() -> None:
    members = Members({"a": 1, "gone": None}, stop_at=70)

    async def scenario() -> tuple[list[str], float]:
        loop = asyncio.get_running_loop()
        began = loop.time()
        missing = await hand_over_stop(70, ["a", "gone"], members.reported, members.tell, 0.5, log)
        return missing, loop.time() - began

    missing, waited = asyncio.run(scenario())
    assert missing == ["gone"]
    assert 0.5 <= waited < 1.5
    assert members.told["a"] == 1 and members.told["gone"] >= 2


def test_a_member_reporting_another_stop_is_not_confirmed() -> None:
    members = Members({"a": 0}, stop_at=90)  # reports 90 while this node stopped at 80

    async def scenario() -> list[str]:
        return await hand_over_stop(80, ["a"], members.reported, members.tell, 0.3, log)

    assert asyncio.run(scenario()) == ["a"]


def test_a_member_whose_port_refuses_is_gone_and_not_waited_for() -> None:
    """An exited member (connection refused) cannot learn the stop any more; a frozen one (handshakes
    time out) can, when it thaws: only the latter is waited for."""
    members = Members({"exited": None, "frozen": 4}, stop_at=50, gone=frozenset({"exited"}))

    async def scenario() -> tuple[list[str], float]:
        loop = asyncio.get_running_loop()
        began = loop.time()
        missing = await hand_over_stop(50, ["exited", "frozen"], members.reported, members.tell, 10.0, log)
        return missing, loop.time() - began

    missing, waited = asyncio.run(scenario())
    assert missing == []
    assert waited < 2.0
    assert members.told["exited"] == 1 and members.told["frozen"] == 4
