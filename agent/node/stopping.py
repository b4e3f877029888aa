"""Consistent stops: a stop asked of one node (SIGTERM/SIGINT) becomes a stop of its whole view at one
boundary, so every checkpoint of the view holds the same iteration.

The node asked to stop proposes the next boundary (``propose_stop``); the proposal travels in the
``stop_at_iteration`` field of the status every handshake and probe carries, in both directions, and
each node relays what it adopted. Every node stops at the earliest proposal it can still reach
(``adopt_stop``). While a stop is being agreed a silent member is waited for longer (``stop_grace``):
leaving it out would make the stopped checkpoints diverge from an uninterrupted run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from agent.core.membership import adopt_stop, propose_stop


class StopCoordinator:
    def __init__(self, period: int, position: Callable[[], int], relay: Callable[[], None], log: Any) -> None:
        self.period = period
        self.position = position  # this node's iteration in progress
        self.relay = relay  # tell every known peer now (a round of handshakes)
        self.log = log
        self.requested = asyncio.Event()  # a stop was asked of this node (signal)
        self.reached = asyncio.Event()  # the agreed stop position is at or behind this node's position
        self.stop_at: int | None = None

    @property
    def pending(self) -> bool:
        return self.stop_at is not None

    def request(self, training: bool) -> None:
        """A signal arrived. Before training there is nothing to agree: stop at once."""
        self.requested.set()
        if not training:
            self.reached.set()
            return
        self.offer(propose_stop(self.position(), self.period), source="signal")

    def offer(self, proposed: int, source: str) -> None:
        """A proposal from a signal or a peer's status (0 = none)."""
        adopted = adopt_stop(self.stop_at, proposed, self.position())
        if adopted != self.stop_at:
            self.stop_at = adopted
            self.log.info("stop agreed", stop_at=adopted, proposed_by=source, iteration=self.position())
            self.relay()
        self.check()

    def check(self) -> bool:
        """True (and ``reached`` set) once this node is at the agreed stop position."""
        if self.stop_at is not None and self.position() >= self.stop_at:
            self.reached.set()
        return self.reached.is_set()
