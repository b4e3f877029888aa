"""A stall watchdog that does not blame a peer for this process's own freeze.

A stream that makes no progress for ``limit`` seconds is aborted (a stalled PushVector, a requester that
stops reading FetchState). A plain ``asyncio.timeout`` measures loop time, which keeps running while the
process itself is stopped (SIGSTOP, a paused VM or container, a host under memory pressure): on thaw the
timer is long overdue and fires at once, before gRPC's threads have handed the loop the chunks that
arrived meanwhile. The fault suite caught exactly that: a node frozen mid-receive aborted a neighbour's
complete 268 KB push as "stalled", left the neighbour out of its last round before an agreed stop, and
its stopped checkpoint no longer equalled the uninterrupted run.

``StallWatchdog`` counts the peer's silence in slices of a quarter of the limit, as the gossip rounds
count their deadlines. A slice that took more than twice its length (the process was frozen, or its loop
blocked) counts nothing the first time after the peer's last progress, and one slice's length after
that. So the first freeze, of any length, costs the peer nothing and the chunks that arrived meanwhile
are read before the limit can run out; yet a peer that stays silent is dropped after about the limit of
running time, however often this process is frozen and thawed in between.
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType
from typing import Final

SLICES_PER_LIMIT: Final = 4


class StallWatchdog:
    """``async with StallWatchdog(limit):`` raises TimeoutError in the enclosed block once the peer has been
    silent (no ``fed()``) for ``limit`` seconds of this process running, counted in slices of
    ``limit / SLICES_PER_LIMIT``, each counting at most its own length (the first late one since the
    last progress: nothing); it fires within one slice after.

    ``fed()``: the peer made progress; the silence starts again. ``expire_now()``: end the block now
    (TimeoutError), e.g. when what arrives has become useless. ``disarm()``: no limit any more.
    ``late_slices``: slices that took longer than twice their length (frozen or blocked).
    Raises ValueError for a ``limit`` that is not a finite number > 0.
    """

    def __init__(self, limit: float) -> None:
        if not 0 < limit < float("inf"):  # also rejects NaN
            raise ValueError(f"stall limit must be a finite number of seconds > 0, got {limit}")
        self.limit = float(limit)
        self.slice = self.limit / SLICES_PER_LIMIT
        self.late_slices = 0
        self._timeout = asyncio.timeout(None)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._silent = 0.0  # seconds of silence counted so far
        self._checked = 0.0  # loop time of the last slice's end
        self._fed_at: float | None = None  # loop time of the last fed() since then
        self._grace = True  # the next late slice counts nothing (reset by progress)

    async def __aenter__(self) -> StallWatchdog:
        self._loop = asyncio.get_running_loop()
        await self._timeout.__aenter__()
        self._checked = self._loop.time()
        self._handle = self._loop.call_at(self._checked + self.slice, self._check)
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
        if self._loop is not None:
            self._fed_at = self._loop.time()
            self._grace = True

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
        elapsed = now - self._checked
        late = elapsed > 2 * self.slice
        self.late_slices += late
        if self._fed_at is not None:
            # Fed during this slice: only the time since then is silence (at most one slice).
            self._silent = 0.0 if late else min(now - self._fed_at, self.slice)
            self._fed_at = None
        elif late and self._grace:
            self._grace = False  # the first freeze since the peer's last progress is not its fault
        else:
            self._silent += min(elapsed, self.slice)
        self._checked = now
        if self._silent >= self.limit - 1e-9:
            with contextlib.suppress(RuntimeError):
                self._timeout.reschedule(now)
            return
        self._handle = loop.call_at(now + self.slice, self._check)
