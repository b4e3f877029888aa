"""Consistent stops: a stop asked of one node (SIGTERM/SIGINT) becomes a stop of its whole view at one
boundary, so every checkpoint of the view holds the same iteration.

The node asked to stop proposes the next boundary (``propose_stop``); the proposal travels in the
``stop_at_iteration`` field of the status every handshake and probe carries, in both directions, and
each node relays what it adopted. Every node stops at the earliest proposal it can still reach
(``adopt_stop``). While a stop is being agreed a silent member is waited for longer (``stop_grace``):
leaving it out would make the stopped checkpoints diverge from an uninterrupted run.

A node that reached the agreed stop hands it over before it exits (``hand_over_stop``): it keeps
handshaking the members of its view until each reports the same stop position, for up to the stop grace.
Without that, a member frozen through the agreement thawed to find its neighbours gone and, asked to stop
itself, proposed the next boundary and trained on alone to it (the fault tester's staggered stops: 3 of
25 runs ended with checkpoints at different iterations).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
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


HAND_OVER_POLL_SECONDS = 0.1


async def hand_over_stop(
    stop_at: int,
    members: Sequence[str],
    reported: Callable[[str], int],
    tell: Callable[[str], Awaitable[bool]],
    grace: float,
    log: Any,
) -> list[str]:
    """After stopping at ``stop_at``: until every one of ``members`` (the view, this node excluded)
    ``reported`` that stop position (0: none) or is gone, ``tell`` the others (a handshake carries this
    node's status, stop included, and brings back theirs; it answers True when nothing listens at the
    member's address any more — a frozen process still accepts connections, an exited one refuses them),
    for up to ``grace`` seconds. Returns the members that never confirmed and are not known gone."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    deadline = began + grace
    gone: set[str] = set()
    while True:
        missing = [member for member in members if member not in gone and reported(member) != stop_at]
        remaining = deadline - loop.time()
        if not missing or remaining <= 0:
            break
        # Not cancelled at the deadline: a handshake attempt may be shared with the registry's own.
        attempts = {member: asyncio.ensure_future(tell(member)) for member in missing}
        await asyncio.wait(attempts.values(), timeout=remaining)
        for member, attempt in attempts.items():
            if (
                attempt.done()
                and not attempt.cancelled()
                and attempt.exception() is None
                and attempt.result()
            ):
                gone.add(member)
        await asyncio.sleep(min(HAND_OVER_POLL_SECONDS, max(0.0, deadline - loop.time())))
    waited = round(loop.time() - began, 2)
    if missing:
        log.warning("stop not confirmed by every member", stop_at=stop_at, missing=missing, waited_s=waited)
    elif waited > 1.0 or gone:
        log.info("stop handed over", stop_at=stop_at, gone=sorted(gone), waited_s=waited)
    return missing
