"""Consistent stops: a stop asked of one node (SIGTERM/SIGINT) becomes a stop of its whole view at one
boundary, so every checkpoint of the view holds the same iteration.

The node asked to stop proposes the next boundary (``propose_stop``); the proposal travels in the
``stop_at_iteration`` field of the status every handshake and probe carries, in both directions, and
each node relays what it adopted. Every node keeps the earliest proposal that every member can still
reach (``adopt_stop``, against the furthest position any member reported). While a stop is being agreed
a silent member is waited for longer (``stop_grace``): leaving it out would make the stopped checkpoints
diverge from an uninterrupted run.

A node that reaches the agreed stop does not stop yet: it confirms it (``confirm_stop``), handshaking the
members of its view until each reports the same stop position, for up to the stop grace. A member that
reports a position past the stop vetoes it, and the node trains on to the later stop that member holds.
Without the confirmation a member frozen through the agreement thawed out of date and, asked to stop
itself, proposed a boundary behind the agreed one: neighbours waiting at that boundary took it and
stopped while a third, already past it, trained on to the agreed one (checkpoints [80, 90, 80, 80]); or
it found its neighbours gone and trained on alone (the fault tester's staggered stops: 3 of 25 runs).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from agent.core.membership import adopt_stop, propose_stop


class StopCoordinator:
    """One node's side of the stop agreement.

    ``position()``: the first iteration this node can still stop before (its iteration in progress, or
    the next one once it has mixed and is computing the step); ``floor()``: the furthest position known in the
    view (``adopt_stop``); ``relay()``: tell every known peer now (a round of handshakes); ``confirm(s)``:
    await every member's confirmation of stop ``s`` (``confirm_stop``; True: stop there, False: it moved).
    ``reached`` is set once this node is at the agreed stop and the stop is confirmed.
    """

    def __init__(
        self,
        period: int,
        position: Callable[[], int],
        floor: Callable[[], int],
        relay: Callable[[], None],
        confirm: Callable[[int], Awaitable[bool]],
        log: Any,
    ) -> None:
        self.period = period
        self.position = position
        self.floor = floor
        self.relay = relay
        self.confirm = confirm
        self.log = log
        self.requested = asyncio.Event()  # a stop was asked of this node (signal)
        self.reached = asyncio.Event()  # at the agreed stop, confirmed: stop now
        self.stop_at: int | None = None
        self._confirming: asyncio.Task[None] | None = None

    @property
    def pending(self) -> bool:
        return self.stop_at is not None

    def request(self, training: bool) -> None:
        """A signal arrived. Before training there is nothing to agree: stop at once."""
        self.requested.set()
        if not training:
            self.reached.set()
            return
        self.offer(propose_stop(max(self.position(), self.floor()), self.period), source="signal")

    def offer(self, proposed: int, source: str) -> None:
        """A proposal from a signal or a peer's status (0 = none: only re-check against the floor)."""
        previous = self.stop_at
        adopted = adopt_stop(previous, proposed, self.floor(), self.period)
        if adopted != previous:
            self.stop_at = adopted
            if previous is not None and adopted is not None and adopted > previous:
                self.log.warning(
                    "stop moved: a member is past it", dropped=previous, stop_at=adopted, floor=self.floor()
                )
            else:
                self.log.info("stop agreed", stop_at=adopted, proposed_by=source, iteration=self.position())
            self.relay()
        self.check()

    def at_stop(self) -> bool:
        return self.stop_at is not None and self.position() >= self.stop_at

    def check(self) -> None:
        """At the stop position (not yet confirmed): start the confirmation unless one is running."""
        if self.reached.is_set() or not self.at_stop():
            return
        if self._confirming is None or self._confirming.done():
            self._confirming = asyncio.ensure_future(self._confirm(self.stop_at))  # type: ignore[arg-type]

    async def _confirm(self, stop_at: int) -> None:
        confirmed = await self.confirm(stop_at)
        if confirmed and self.stop_at == stop_at and self.at_stop():
            self.reached.set()

    def close(self) -> None:
        """Training ended: a confirmation still running has nothing left to decide."""
        if self._confirming is not None and not self._confirming.done():
            self._confirming.cancel()

    async def settle(self) -> bool:
        """At the stop position: wait for the confirmation. True: stop here; False: the stop moved on."""
        self.check()
        while self._confirming is not None and not self._confirming.done():
            await asyncio.shield(self._confirming)
            self.check()  # a confirmation of an earlier stop position ended: maybe start the next
        return self.reached.is_set()


CONFIRM_POLL_SECONDS = 0.1


async def confirm_stop(
    stop_at: int,
    members: Sequence[str],
    reported: Callable[[str], int],
    tell: Callable[[str], Awaitable[bool]],
    agreed: Callable[[], int | None],
    grace: float,
    log: Any,
) -> list[str] | None:
    """At ``stop_at``: until every one of ``members`` (the view, this node excluded) ``reported`` that stop
    position (0: none) or is gone, ``tell`` the others (a handshake carries this node's status, stop
    included, and brings back theirs, position included; it answers True when nothing listens at the
    member's address any more — a frozen process still accepts connections, an exited one refuses them),
    for up to ``grace`` seconds. ``agreed()`` re-reads the stop this node holds after the statuses that
    came back (a member past ``stop_at`` moves it on).

    Returns None when the stop moved, else the members that never confirmed and are not known gone
    (logged; the node stops anyway: a member frozen longer than the grace cannot hold the others)."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    deadline = began + grace
    gone: set[str] = set()
    while True:
        if agreed() != stop_at:
            return None
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
        await asyncio.sleep(min(CONFIRM_POLL_SECONDS, max(0.0, deadline - loop.time())))
    waited = round(loop.time() - began, 2)
    if missing:
        log.warning("stop not confirmed by every member", stop_at=stop_at, missing=missing, waited_s=waited)
    elif waited > 1.0 or gone:
        log.info("stop confirmed", stop_at=stop_at, gone=sorted(gone), waited_s=waited)
    return missing
