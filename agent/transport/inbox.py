"""Per-node store of vectors received from neighbours, keyed by (iteration, round, sender).

Gossip positions are ordered lexicographically by (iteration, round); with `rounds_per_iteration`
rounds per iteration, position (k, r) has linear index k * rounds_per_iteration + r, so "the next
round" after (k, t-1) is (k+1, 0).

The inbox accepts messages for its current position, buffers messages up to `ahead_window` positions
ahead (a neighbour may legitimately finish a round before we do), drops anything older than the
current position as stale, and refuses anything further ahead so a runaway or buggy peer cannot make
us buffer without bound. Worst-case memory is therefore
(ahead_window + 1) x neighbours x vector size.

Not thread-safe: all methods must be called from the one event loop that runs the gRPC server and
the agent. put() is synchronous so the server can call it without yielding to the loop.
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

import torch

from agent.transport.frames import Position

DEFAULT_AHEAD_WINDOW: Final = 2


class PutOutcome(StrEnum):
    """What happened to a message offered to the inbox."""

    ACCEPTED = "accepted"  # for the current position
    BUFFERED_AHEAD = "buffered_ahead"  # for a position within the ahead window; kept until then
    STALE = "stale"  # older than the current position; dropped
    DUPLICATE = "duplicate"  # this sender already delivered this position; the first copy wins
    TOO_FAR_AHEAD = "too_far_ahead"  # beyond the ahead window; refused

    @property
    def delivered(self) -> bool:
        return self in (PutOutcome.ACCEPTED, PutOutcome.BUFFERED_AHEAD)


@dataclass(frozen=True, slots=True)
class InboxMessage:
    """A verified vector from one neighbour for one gossip position."""

    sender_id: str
    iteration: int
    round: int
    vector: torch.Tensor
    epoch: int = 0  # the sender's membership view (agent.core.membership.view_epoch)
    # Compressed gossip (agent.core.choco): the EdgeCopy header; ``vector`` is then the dense difference,
    # or the sender's vector for a reset. None for plain gossip.
    edge: Any = None

    @property
    def position(self) -> Position:
        return Position(self.iteration, self.round)


class Inbox:
    """Asyncio store of neighbours' vectors with stale/ahead/duplicate handling.

    Typical use per gossip round: `expect(k, r)`, push own vector, then
    `await wait_for(k, r, neighbours, timeout)` which removes and returns what arrived.
    """

    def __init__(
        self,
        rounds_per_iteration: int,
        ahead_window: int = DEFAULT_AHEAD_WINDOW,
        start: tuple[int, int] = (0, 0),
    ) -> None:
        if isinstance(rounds_per_iteration, bool) or not isinstance(rounds_per_iteration, int):
            raise ValueError(
                f"rounds_per_iteration must be an int, got {type(rounds_per_iteration).__name__}"
            )
        if rounds_per_iteration < 1:
            raise ValueError(f"rounds_per_iteration must be >= 1, got {rounds_per_iteration}")
        if isinstance(ahead_window, bool) or not isinstance(ahead_window, int) or ahead_window < 0:
            raise ValueError(f"ahead_window must be an int >= 0, got {ahead_window!r}")
        self._rounds_per_iteration = rounds_per_iteration
        self._ahead_window = ahead_window
        self._position = self._validated(*start)
        self._vectors: dict[Position, dict[str, InboxMessage]] = {}
        # Senders whose vector for a position was already handed out; a re-send is a duplicate, not new.
        self._taken: dict[Position, set[str]] = {}
        self._waiters: set[asyncio.Future[None]] = set()
        self._advance_listeners: list[Callable[[Position], None]] = []
        self.outcome_counts: Counter[PutOutcome] = Counter()

    @property
    def rounds_per_iteration(self) -> int:
        return self._rounds_per_iteration

    @property
    def ahead_window(self) -> int:
        return self._ahead_window

    @property
    def position(self) -> Position:
        """The position currently being collected; older messages are stale."""
        return self._position

    @property
    def latest_accepted(self) -> Position:
        """The furthest position a message may have and still be buffered."""
        return self._from_index(self._index(self._position) + self._ahead_window)

    @property
    def buffered_count(self) -> int:
        """Number of vectors currently held (delivered but not yet taken)."""
        return sum(len(by_sender) for by_sender in self._vectors.values())

    def add_advance_listener(self, listener: Callable[[Position], None]) -> None:
        """Call `listener(new_position)` synchronously each time expect() moves the inbox forward.

        The server uses it to abort pushes that become stale while their payload is still arriving.
        """
        self._advance_listeners.append(listener)

    def expect(self, iteration: int, round: int) -> None:
        """Move to (iteration, round): discard everything older; it counts as stale from now on.

        Moving backwards is a programming error (ValueError): it would resurrect dropped rounds.
        """
        target = self._validated(iteration, round)
        if target < self._position:
            raise ValueError(f"inbox cannot move backwards from {tuple(self._position)} to {tuple(target)}")
        if target == self._position:
            return
        self._position = target
        for stale in [position for position in self._vectors if position < target]:
            del self._vectors[stale]
        for stale in [position for position in self._taken if position < target]:
            del self._taken[stale]
        self._wake_waiters()
        for listener in self._advance_listeners:
            listener(target)

    def enter(self, iteration: int, round: int) -> None:
        """Move to (iteration, round) when the agent (re-)enters a run, backwards if need be.

        A node that trained on while its members had left it out can resynchronise to a majority behind
        it: everything buffered or taken belongs to the abandoned positions and is dropped. Forward this is
        ``expect``."""
        target = self._validated(iteration, round)
        if target >= self._position:
            self.expect(iteration, round)
            return
        self._position = target
        self._vectors.clear()
        self._taken.clear()
        self._wake_waiters()
        for listener in self._advance_listeners:
            listener(target)

    def classify(self, sender_id: str, iteration: int, round: int) -> PutOutcome:
        """What put() would do with a message at this position, without storing anything.

        Lets the server refuse a stale or duplicate push from its header, before reading the payload.
        """
        position = self._validated(iteration, round)
        if position < self._position:
            return PutOutcome.STALE
        if position > self.latest_accepted:
            return PutOutcome.TOO_FAR_AHEAD
        if sender_id in self._vectors.get(position, {}) or sender_id in self._taken.get(position, ()):
            return PutOutcome.DUPLICATE
        if position == self._position:
            return PutOutcome.ACCEPTED
        return PutOutcome.BUFFERED_AHEAD

    def put(self, message: InboxMessage) -> PutOutcome:
        """Offer a verified message; it is stored only if the outcome is ACCEPTED or BUFFERED_AHEAD."""
        if not message.sender_id:
            raise ValueError("InboxMessage.sender_id must be non-empty")
        outcome = self.classify(message.sender_id, message.iteration, message.round)
        self.outcome_counts[outcome] += 1
        if outcome.delivered:
            self._vectors.setdefault(message.position, {})[message.sender_id] = message
            self._wake_waiters()
        return outcome

    async def wait_for(
        self, iteration: int, round: int, senders: Iterable[str], timeout: float
    ) -> dict[str, torch.Tensor]:
        """Like ``wait_for_messages`` but returns the vectors only."""
        messages = await self.wait_for_messages(iteration, round, senders, timeout)
        return {sender: message.vector for sender, message in messages.items()}

    async def wait_for_messages(
        self, iteration: int, round: int, senders: Iterable[str], timeout: float
    ) -> dict[str, InboxMessage]:
        """Wait until every sender's vector for (iteration, round) arrived, or `timeout` seconds pass.

        Returns (and removes from the inbox) the vectors that did arrive, keyed by sender; missing
        senders are simply absent, and the caller decides what to do about them. Returns as soon as
        all have arrived. The position must be the current one (call expect() first).
        """
        target = self._validated(iteration, round)
        wanted = frozenset(senders)
        if not math.isfinite(timeout) or timeout < 0:
            raise ValueError(f"timeout must be a finite number of seconds >= 0, got {timeout}")
        self._require_current(target)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not wanted <= self._vectors.get(target, {}).keys():
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.add(waiter)
            try:
                await asyncio.wait((waiter,), timeout=remaining)
            finally:
                self._waiters.discard(waiter)
            self._require_current(target)
        return self._take(target, wanted)

    def _take(self, position: Position, senders: frozenset[str]) -> dict[str, InboxMessage]:
        by_sender = self._vectors.get(position, {})
        taken = {sender: by_sender.pop(sender) for sender in senders if sender in by_sender}
        if not by_sender:
            self._vectors.pop(position, None)
        if taken:
            self._taken.setdefault(position, set()).update(taken)
        return taken

    def _require_current(self, target: Position) -> None:
        if target != self._position:
            raise RuntimeError(
                f"wait_for({tuple(target)}) needs the inbox at that position, but it is at "
                f"{tuple(self._position)}; call expect() first and do not move it while waiting"
            )

    def _wake_waiters(self) -> None:
        # Waiters re-check their own condition, so waking all of them on any change is correct.
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _validated(self, iteration: int, round: int) -> Position:
        for name, value in (("iteration", iteration), ("round", round)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if round >= self._rounds_per_iteration:
            raise ValueError(
                f"round {round} is out of range: rounds_per_iteration={self._rounds_per_iteration}"
            )
        return Position(iteration, round)

    def _index(self, position: Position) -> int:
        return position.iteration * self._rounds_per_iteration + position.round

    def _from_index(self, index: int) -> Position:
        return Position(*divmod(index, self._rounds_per_iteration))
