"""FreezeDetector (agent/node/freezes.py): a loop that stood still is seen as a freeze, both once the
ticker has run again and in the moment right after the thaw, before it has; a loop that ran is not."""

from __future__ import annotations

import asyncio
import time

import pytest

from agent.node.freezes import FreezeDetector

pytestmark = pytest.mark.timeout(20)


def test_a_loop_that_stood_still_is_a_freeze_and_a_running_one_is_not() -> None:
    async def scenario() -> tuple[bool, bool, bool, int, bool]:
        detector = FreezeDetector(tick=0.05, late=0.2)
        detector.start()
        await asyncio.sleep(0.3)
        before = time.monotonic()
        running = detector.frozen_since(before)
        time.sleep(0.6)  # the loop stands still, as a SIGSTOPped process's does
        overdue = detector.frozen_since(before)  # the ticker has not run since: it is overdue
        await asyncio.sleep(0.15)
        seen = detector.frozen_since(before)
        later = time.monotonic()
        await asyncio.sleep(0.4)
        quiet = detector.frozen_since(later)
        await detector.close()
        return running, overdue, seen, detector.freezes, quiet

    running, overdue, seen, freezes, quiet = asyncio.run(scenario())
    assert (running, overdue, seen, freezes, quiet) == (False, True, True, 1, False)


def test_a_detector_that_is_not_running_sees_nothing_and_bad_settings_are_refused() -> None:
    assert not FreezeDetector().frozen_since(0.0)
    with pytest.raises(ValueError, match="must be > 0"):
        FreezeDetector(tick=0)
