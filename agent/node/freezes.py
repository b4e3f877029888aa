"""Noticing that this process itself was not running (SIGSTOP, a paused VM or container, a loop blocked
by synchronous work), so that a deadline it missed meanwhile is not blamed on a neighbour.

A push that spans this process's own freeze ends in DEADLINE_EXCEEDED on thaw: gRPC deadlines are wall
clock. The push used to be retried only when the call took longer than its timeout plus one second, so a
freeze a little longer than the round timeout went unnoticed: the fault tester froze two adjacent nodes
for 2.5 and 3 s while a stop was agreed, and the first to thaw — which had not heard of the stop yet —
left both neighbours out for a timeout that was its own, trained alone to the stop, and the stopped
checkpoints no longer equalled the uninterrupted run (2 of 3 runs).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Final

TICK_SECONDS: Final = 0.1
LATE_SECONDS: Final = 0.3  # a tick this much later than asked: the process did not run meanwhile


class FreezeDetector:
    """A ticker on the event loop: a sleep of ``tick`` seconds that took more than ``tick + late`` means
    the process (or its loop) was frozen for the difference. ``frozen_since(t)``: whether a freeze ended
    after ``time.monotonic()`` reading ``t``, or one is ending now (the ticker itself is overdue: its
    wake-up has not run yet after the thaw). Start with ``start()`` on the running loop; ``close()``."""

    def __init__(self, tick: float = TICK_SECONDS, late: float = LATE_SECONDS) -> None:
        if not tick > 0 or not late > 0:
            raise ValueError(f"tick and late must be > 0 seconds, got {tick} and {late}")
        self.tick = tick
        self.late = late
        self.freezes = 0
        self.frozen_seconds = 0.0
        self._last_thaw: float | None = None
        self._tick_started = time.monotonic()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._tick_started = time.monotonic()
            self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            self._tick_started = time.monotonic()
            await asyncio.sleep(self.tick)
            now = time.monotonic()
            overslept = now - self._tick_started - self.tick
            if overslept > self.late:
                self.freezes += 1
                self.frozen_seconds += overslept
                self._last_thaw = now

    def frozen_since(self, since: float) -> bool:
        if self._task is None or self._task.done():
            return False
        overdue = time.monotonic() - self._tick_started > self.tick + self.late
        return overdue or (self._last_thaw is not None and self._last_thaw > since)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
