"""Stop confirmation (agent/node/stopping.py): a node at the agreed stop keeps telling the members that
have not confirmed it, returns once all have, gives up after the grace naming the silent ones, and trains
on when a member reports a position past the stop (StopCoordinator with fake members)."""

from __future__ import annotations

import asyncio

import pytest
import structlog

from agent.node.stopping import StopCoordinator, confirm_stop

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
        missing = await confirm_stop(
            100, ["a", "b", "c"], members.reported, members.tell, lambda: 100, 10.0, log
        )
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
        missing = await confirm_stop(70, ["a", "gone"], members.reported, members.tell, lambda: 70, 0.5, log)
        return missing, loop.time() - began

    missing, waited = asyncio.run(scenario())
    assert missing == ["gone"]
    assert 0.5 <= waited < 1.5
    assert members.told["a"] == 1 and members.told["gone"] >= 2


def test_a_member_reporting_another_stop_is_not_confirmed() -> None:
    members = Members({"a": 0}, stop_at=90)  # reports 90 while this node stopped at 80

    async def scenario() -> list[str]:
        return await confirm_stop(80, ["a"], members.reported, members.tell, lambda: 80, 0.3, log)

    assert asyncio.run(scenario()) == ["a"]


def test_a_member_whose_port_refuses_is_gone_and_not_waited_for() -> None:
    """An exited member (connection refused) cannot learn the stop any more; a frozen one (handshakes
    time out) can, when it thaws: only the latter is waited for."""
    members = Members({"exited": None, "frozen": 4}, stop_at=50, gone=frozenset({"exited"}))

    async def scenario() -> tuple[list[str], float]:
        loop = asyncio.get_running_loop()
        began = loop.time()
        missing = await confirm_stop(
            50, ["exited", "frozen"], members.reported, members.tell, lambda: 50, 10.0, log
        )
        return missing, loop.time() - began

    missing, waited = asyncio.run(scenario())
    assert missing == []
    assert waited < 2.0
    assert members.told["exited"] == 1 and members.told["frozen"] == 4


def test_returns_none_when_the_stop_moves_on() -> None:
    members = Members({"a": None}, stop_at=80)
    held = [80]

    async def tell(member: str) -> bool:
        held[0] = 90  # the answer showed a member past 80
        return False

    async def scenario() -> list[str] | None:
        return await confirm_stop(80, ["a"], members.reported, tell, lambda: held[0], 5.0, log)

    assert asyncio.run(scenario()) is None


class View:
    """Fake view for StopCoordinator: this node's position, members' reported positions and stops."""

    def __init__(self, position: int, members: dict[str, tuple[int, int]]) -> None:
        self.position = position
        self.members = members  # member -> (reported position, reported stop; 0 = none)
        self.relays = 0
        self.coordinator = StopCoordinator(
            10, lambda: self.position, self.floor, self.relay, self.confirm, log
        )

    def floor(self) -> int:
        return max([self.position, *(position for position, _ in self.members.values())])

    def relay(self) -> None:
        self.relays += 1

    async def confirm(self, stop_at: int) -> bool:
        def agreed() -> int | None:
            for _, stop in self.members.values():
                self.coordinator.offer(stop, source="member")
            return self.coordinator.stop_at

        async def tell(member: str) -> bool:
            await asyncio.sleep(0.01)
            return False

        def reported(member: str) -> int:
            return self.members[member][1]

        return await confirm_stop(stop_at, list(self.members), reported, tell, agreed, 2.0, log) is not None


def test_a_stale_proposal_behind_a_member_does_not_stop_the_node() -> None:
    """The staggered-stop race: this node waits at 80 with 90 agreed; a thawed node, out of date at 79,
    proposes 80. Taken blindly, this node stopped at 80 while member c, at 81, trained on to 90."""

    async def scenario() -> tuple[bool, int | None, bool]:
        view = View(80, {"thawed": (79, 80), "c": (79, 90)})  # c's last report predates its step past 80
        stop = view.coordinator
        stop.offer(90, source="c")
        stop.offer(80, source="thawed")
        assert stop.stop_at == 80 and stop.at_stop()
        view.members["c"] = (81, 90)  # what the confirmation's handshake brings back
        view.members["thawed"] = (79, 90)  # the thawed node learns the same and gives up 80
        stopped = await stop.settle()
        return stopped, stop.stop_at, stop.reached.is_set()

    assert asyncio.run(scenario()) == (False, 90, False)


def test_a_confirmed_stop_is_reached() -> None:
    async def scenario() -> tuple[bool, int | None]:
        view = View(40, {"a": (40, 40), "b": (39, 40)})
        stop = view.coordinator
        stop.offer(40, source="a")
        return await stop.settle(), stop.stop_at

    assert asyncio.run(scenario()) == (True, 40)


def test_a_signal_proposes_past_the_furthest_member() -> None:
    async def scenario() -> int | None:
        view = View(38, {"a": (41, 0)})
        view.coordinator.request(training=True)
        return view.coordinator.stop_at

    assert asyncio.run(scenario()) == 50


def test_a_proposal_for_the_iteration_being_stepped_moves_to_the_next_boundary() -> None:
    """A node that has mixed iteration 80 and is computing its step can no longer stop before 80 (its
    position is 81): a proposal of 80 arriving then becomes 90 instead of being lost or overshot."""

    async def scenario() -> int | None:
        view = View(81, {"a": (80, 0)})
        view.coordinator.offer(80, source="a")
        return view.coordinator.stop_at

    assert asyncio.run(scenario()) == 90
