"""structlog set-up: readable lines on a terminal, JSON lines otherwise, node id bound in every line."""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

from agent.files import dumps_json


class _CurrentStderr:
    """Writes to whatever ``sys.stderr`` is at the time of the write (test runners swap it)."""

    def write(self, text: str) -> int:
        from agent.progress import active  # a progress bar on the terminal: print above it

        bar = active()
        if bar is not None:
            bar.write(text)
            return len(text)
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


def configure_logging(*, level: str = "info", stream: TextIO | None = None, json: bool | None = None) -> None:
    """``json=None`` chooses by whether ``stream`` is a terminal."""
    stream = stream or _CurrentStderr()  # type: ignore[assignment]
    as_json = not stream.isatty() if json is None else json
    # dumps_json: a NaN in a field (a diverged loss) is written as null, so every line is valid JSON.
    renderer: Any = (
        structlog.processors.JSONRenderer(serializer=dumps_json)
        if as_json
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )


def get_logger(**bound: Any) -> Any:
    return structlog.get_logger("dpgan").bind(**bound)
