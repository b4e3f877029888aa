"""Progress of a run, with rate and ETA: a tqdm bar on a terminal, plain lines otherwise.

One class for the three places that train (an agent, `dpgan-agent simulate`, the `--local` launcher).
On a terminal the bar stays at the bottom and log lines print above it (agent.logs routes them through
`write`); when stderr is not a terminal (a file, a pipe, a container log) there is no bar and the
caller's own log lines carry `total`/`eta_s` (see `eta_fields`), so JSON logs stay one object per line.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from tqdm import tqdm

_active: ProgressBar | None = None


def active() -> ProgressBar | None:
    """The bar currently drawn on this process's terminal, if any."""
    return _active


class ProgressBar:
    """Iterations ``initial..total`` of one run. ``update_to(k)`` moves it; ``close()`` ends it.

    ``enabled=None`` draws only when stderr is a terminal; disabled, every method is a no-op except
    ``eta_fields``.
    """

    def __init__(self, total: int, *, desc: str, initial: int = 0, enabled: bool | None = None) -> None:
        global _active
        self.total = total
        self.initial = initial
        self.started = time.monotonic()
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._bar: tqdm[Any] | None = None
        if self.enabled:
            self._bar = tqdm(
                total=total, initial=initial, desc=desc, unit="it", file=sys.stderr, dynamic_ncols=True
            )
            _active = self

    def update_to(self, iteration: int, **postfix: float) -> None:
        if self._bar is None:
            return
        self._bar.update(max(0, iteration - self._bar.n))
        if postfix:
            self._bar.set_postfix({key: f"{value:.4g}" for key, value in postfix.items()}, refresh=False)

    def eta_fields(self, iteration: int) -> dict[str, float | int]:
        """``total``, ``percent`` and ``eta_s`` (seconds, from the rate since this bar started) for a log
        line; ``eta_s`` is absent until an iteration was done."""
        fields: dict[str, float | int] = {
            "total": self.total,
            "percent": round(100.0 * iteration / self.total, 1) if self.total else 100.0,
        }
        done = iteration - self.initial
        elapsed = time.monotonic() - self.started
        if done > 0 and elapsed > 0:
            fields["eta_s"] = round(max(0, self.total - iteration) * elapsed / done, 1)
        return fields

    def write(self, text: str) -> None:
        """Print ``text`` above the bar (the bar is redrawn below it)."""
        if self._bar is None:
            sys.stderr.write(text)
        else:
            tqdm.write(text.rstrip("\n"), file=sys.stderr)

    def close(self) -> None:
        global _active
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if _active is self:
            _active = None
