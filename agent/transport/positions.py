"""Where each neighbour is in the gossip schedule, as it announced: the basis of paced pushes.

A node that runs ahead of a neighbour and pushes its next vector at once makes that transfer share the
neighbour's downlink with the one the neighbour is still waiting for, so the neighbour's current round
takes longer and the cluster drifts further apart (measured on the one-peer exponential graph at
20 Mbit/s, docs/benchmarks.md). With pacing a node announces each round it enters, and a push for
round (k, r) waits until the receiver has announced (k, r) or later.

Positions only move forward per sender: announcements can overtake each other on the wire. A neighbour
that restarts from an earlier checkpoint is therefore taken to be ahead until it passes its old
position again, which only costs pacing (pushes go out at once), never a stall.
"""

from __future__ import annotations

import asyncio

Position = tuple[int, int]  # (iteration, round)


class PeerPositions:
    """Latest announced position per neighbour, with waiters for "neighbour reached position p"."""

    def __init__(self) -> None:
        self._positions: dict[str, Position] = {}
        self._changed = asyncio.Condition()

    def position(self, node_id: str) -> Position | None:
        return self._positions.get(node_id)

    def reached(self, node_id: str, position: Position) -> bool:
        current = self._positions.get(node_id)
        return current is not None and current >= position

    async def announce(self, node_id: str, iteration: int, round_: int) -> None:
        position = (iteration, round_)
        current = self._positions.get(node_id)
        if current is not None and current >= position:
            return
        self._positions[node_id] = position
        async with self._changed:
            self._changed.notify_all()

    async def wait_reached(self, node_id: str, position: Position, timeout: float) -> bool:
        """Wait until ``node_id`` has announced ``position`` or later; False if ``timeout`` passed first."""
        if self.reached(node_id, position):
            return True
        try:
            async with asyncio.timeout(max(0.0, timeout)):
                async with self._changed:
                    await self._changed.wait_for(lambda: self.reached(node_id, position))
        except TimeoutError:
            return self.reached(node_id, position)
        return True
