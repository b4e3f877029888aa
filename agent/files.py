"""Atomic file writes, and the run folder (``--out``) a run leaves its results in.

A write goes to a temporary file ``.<name>.<random>.tmp`` in the target's folder and is renamed over the
target, so an interrupted write leaves the previous file intact; a process killed in the middle leaves
the temporary file behind, and ``remove_stale_temporaries`` clears those when a run starts there.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any

# What a run leaves in its folder: a folder holding any of these holds a previous run.
RUN_FILE_PATTERNS = (
    "checkpoint*.safetensors",
    "final*.safetensors",
    "metrics.jsonl",
    "summary.json",
    "samples-*.png",
)

# Where --on-config-change new-run moves a previous run (``<out>/previous/<run>-<UTC time>/``). Like the
# ``tls/`` certificates a --local cluster keeps, nothing in a subfolder counts as the run in --out.
PREVIOUS_FOLDER = "previous"

_TEMPORARY = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")  # what write_atomic's mkstemp call names


def finite_json(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, ±inf: a diverged run's losses, distances) replaced by
    None, in dicts, lists and tuples at any depth, so the JSON written of it is valid JSON (``null``)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(item) for item in value]
    return value


def dumps_json(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` that always writes valid JSON: non-finite floats become ``null`` (``finite_json``)
    and ``allow_nan=False`` guarantees no bare ``NaN``/``Infinity`` is ever written."""
    return json.dumps(finite_json(value), allow_nan=False, **kwargs)


def write_atomic(path: Path, payload: bytes, mode: int | None = None) -> None:
    """Write to a temporary file in the same folder, fsync it, rename it over ``path``, fsync the folder:
    a reader sees the old file or the new one, never a part. ``mode``: permission bits, set before any
    byte is written (the temporary file is created 0600); None keeps 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if mode is not None:
            os.fchmod(descriptor, mode)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files interrupted ``write_atomic`` calls left in ``folder``; call it only
    while no write to that folder is in flight (when a run starts). Returns what was removed."""
    if not folder.is_dir():
        return []
    removed = []
    for path in sorted(folder.iterdir()):
        if _TEMPORARY.match(path.name) and path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def previous_run_files(folder: Path) -> list[Path]:
    """The files of an earlier run in ``folder`` (checkpoints, final model, metrics, summary, samples).

    Only files directly in ``folder`` count: runs moved aside into ``previous/`` and the ``tls/``
    certificates are not a run in ``folder``."""
    if not folder.is_dir():
        return []
    found = {
        path
        for pattern in RUN_FILE_PATTERNS
        for path in folder.glob(pattern)
        if path.parent == folder and path.is_file()
    }
    return sorted(found)


def check_run_folder(folder: Path, *, resume: bool, overwrite: bool, holds: list[Path] | None = None) -> None:
    """Refuse (ValueError) to start a fresh run over a previous run's results unless told what to do.

    ``holds``: the previous run's files when the caller looked for them itself (a --local cluster
    looks in every node folder too); default: ``previous_run_files(folder)``."""
    if resume and overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite replaces it: give one of them")
    if resume or overwrite:
        return
    found = previous_run_files(folder) if holds is None else holds
    if not found:
        return
    shown = ", ".join(str(path.relative_to(folder)) for path in found[:4]) + (
        ", ..." if len(found) > 4 else ""
    )
    raise ValueError(
        f"--out {folder} holds a previous run ({shown}); continue it with --resume, replace it with "
        f"--overwrite (deletes those results), or choose a new folder with --out"
    )


def clear_run_files(folder: Path) -> list[Path]:
    """``--overwrite``: delete a previous run's files from ``folder`` (nothing else). Returns them."""
    removed = previous_run_files(folder)
    for path in removed:
        path.unlink(missing_ok=True)
    return removed
