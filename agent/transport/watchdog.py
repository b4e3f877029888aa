"""A stall watchdog that does not blame a peer for this process's own freeze.

A stream that makes no progress for ``limit`` seconds is aborted (a stalled PushVector, a requester that
stops reading FetchState). A plain ``asyncio.timeout`` measures loop time, which keeps running while the
process itself is stopped (SIGSTOP, a paused VM or container, a host under memory pressure): on thaw the
timer is long overdue and fires at once, before gRPC's threads have handed the loop the chunks that
arrived meanwhile. The fault suite caught exactly that: a node frozen mid-receive aborted a neighbour's
complete 268 KB push as "stalled", left the neighbour out of its last round before an agreed stop, and
its stopped checkpoint no longer equalled the uninterrupted run.

``StallWatchdog`` fires like ``asyncio.timeout`` but checks how late its timer ran: a timer that runs more
than ``FROZEN_SLACK_SECONDS`` after it was due means this process was not running, so the peer gets one
whole ``limit`` again, counted from the thaw. The agent's gossip rounds make the same judgement for
their own deadlines (``agent.node.gossip``).
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType
from typing import Final

# A timer that runs this much after it was due was not run because the process was stopped (or its loop
# blocked that long), not because the peer was silent.
FROZEN_SLACK_SECONDS: Final = 1.0


class StallWatchdog:
    """``async with StallWatchdog(limit):`` raises TimeoutError in the enclosed block after ``limit``
    seconds without ``fed()`` (seconds of this process running, to ``FROZEN_SLACK_SECONDS``).

    ``fed()``: the peer made progress; the limit counts from now. ``expire_now()``: end the block now
    (TimeoutError), e.g. when what arrives has become useless. ``disarm()``: no limit any more.
    ``thaws``: how many times a late timer gave the peer a new window.
    Raises ValueError for a ``limit`` that is not > 0.
    """

    def __init__(self, limit: float, slack: float = FROZEN_SLACK_SECONDS) -> None:
        if not limit > 0:  # also rejects NaN
            raise ValueError(f"stall limit must be > 0 seconds, got {limit}")
        self.limit = float(limit)
        self.slack = float(slack)
        self.thaws = 0
        self._timeout = asyncio.timeout(None)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0

    async def __aenter__(self) -> StallWatchdog:
        self._loop = asyncio.get_running_loop()
        await self._timeout.__aenter__()
        self._due = self._loop.time() + self.limit
        self._handle = self._loop.call_at(self._due, self._check)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool | None:
        self._cancel_timer()
        return await self._timeout.__aexit__(exc_type, exc, traceback)

    def fed(self) -> None:
        if self._loop is not None and self._handle is not None:
            self._due = self._loop.time() + self.limit  # the timer re-arms itself when it runs early

    def expire_now(self) -> None:
        self._cancel_timer()
        if self._loop is not None and not self._timeout.expired():
            # RuntimeError: the block is already exiting; it checks its own state.
            with contextlib.suppress(RuntimeError):
                self._timeout.reschedule(self._loop.time())

    def disarm(self) -> None:
        self._cancel_timer()
        with contextlib.suppress(RuntimeError):
            self._timeout.reschedule(None)

    def expired(self) -> bool:
        return self._timeout.expired()

    def _cancel_timer(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _check(self) -> None:
        loop = self._loop
        assert loop is not None
        self._handle = None
        now = loop.time()
        if self._due - now > 1e-3:  # fed since it was armed (or run early by the clock's resolution)
            self._handle = loop.call_at(self._due, self._check)
            return
        if now - self._due > self.slack:
            # This timer ran long after it was due: the process was frozen (or its loop blocked), so
            # whatever the peer sent meanwhile has not been read yet. A whole limit again, from now.
            self.thaws += 1
            self._due = now + self.limit
            self._handle = loop.call_at(self._due, self._check)
            return
        with contextlib.suppress(RuntimeError):
            self._timeout.reschedule(now)
