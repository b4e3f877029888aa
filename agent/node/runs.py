"""Which run an agent's ``--out`` folder holds, and what a start makes of it: clear what interrupted
writes left, replace a run (``--overwrite``), continue it (``--resume``), keep a finished one, and when
the folder holds a run of another configuration or run id, refuse (``--on-config-change refuse``) or
move that run aside into ``<out>/previous/`` and start a new one (``--on-config-change new-run``).

The comparison is the one ``restore_state`` applies to the checkpoint it resumes from
(``config_differences``): every cluster-wide key but ``iterations``, which may grow (train longer).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.checkpoint import Checkpoint, CheckpointError, Latest, load_checkpoint, load_latest
from agent.core.config import TrainConfig, comparable_value, compared_keys, default_run_id
from agent.files import PREVIOUS_FOLDER, clear_run_files, previous_run_files, remove_stale_temporaries
from agent.node.options import AgentOptions
from agent.node.recorder import CHECKPOINT_NAME, FINAL_NAME
from agent.train.workload import GanProblem

ON_CONFIG_CHANGE = ("refuse", "new-run")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_CLUSTER_KEYS = frozenset(compared_keys())  # what agents compare: not the simulator-only nodes


def config_differences(stored: Mapping[str, Any], config: TrainConfig) -> list[str]:
    """The cluster-wide keys (sorted) whose value in ``stored`` (the configuration a checkpoint records)
    differs from ``config``'s. ``iterations`` is not compared: the goal may grow on resume."""
    current = {k: v for k, v in config.cluster_dict().items() if k != "iterations"}
    return sorted(k for k, v in current.items() if comparable_value(k, stored.get(k)) != v)


def run_differences(stored: Mapping[str, Any], config: TrainConfig) -> list[str]:
    """``config_differences``, plus ``run_id`` when the explicit run ids (``--run-id`` / config key
    ``run_id``; None when derived from the configuration) differ: giving a run id, changing it or dropping
    it starts another run. Two derived ids are not compared: the configuration keys already are (and the
    derived id follows ``iterations``, which may grow on a resume)."""
    differing = config_differences(stored, config)
    if stored.get("run_id") != config.run_id:
        differing.append("run_id")
    return differing


def config_change_message(path: Path, differing: list[str]) -> str:
    """The refusal of a checkpoint of another configuration, naming the keys and the ways on."""
    return (
        f"checkpoint {path} was written with a different configuration: {differing}; to start a new run "
        f"in this folder give --on-config-change new-run (the previous run is moved to "
        f"{path.parent / PREVIOUS_FOLDER}/, nothing is deleted), or choose a new --out"
    )


def archive_label(checkpoint: Checkpoint) -> str:
    """What the previous run's folder under ``previous/`` is named after: its run id, else (a checkpoint
    written before the run id was stored) ``cfg-`` and a prefix of its configuration's hash."""
    label = checkpoint.run_id or checkpoint.config.get("run_id")
    if not isinstance(label, str) or not label:
        cluster = {k: comparable_value(k, v) for k, v in checkpoint.config.items() if k in _CLUSTER_KEYS}
        canonical = json.dumps(cluster, sort_keys=True, separators=(",", ":"), allow_nan=False)
        label = default_run_id(hashlib.sha256(canonical.encode()).hexdigest())
    return _UNSAFE.sub("_", label)[:63].strip("._") or "run"


def move_run_aside(out: Path, label: str, now: datetime | None = None) -> tuple[Path, list[Path]]:
    """Move every file of the run in ``out`` (``previous_run_files``) into a new folder
    ``out/previous/<label>-<UTC time>/`` by renames within ``out``'s file system (each atomic; nothing
    is deleted or copied). Returns the folder and the files' new paths."""
    files = previous_run_files(out)
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    parent = out / PREVIOUS_FOLDER
    parent.mkdir(exist_ok=True)
    target = parent / f"{label}-{stamp}"
    suffix = 1
    while True:
        try:
            target.mkdir()
            break
        except FileExistsError:
            suffix += 1
            target = parent / f"{label}-{stamp}-{suffix}"
    moved = []
    for path in files:
        destination = target / path.name
        os.rename(path, destination)
        moved.append(destination)
    for folder in (target, parent, out):  # make the renames durable
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
    return target, moved


@dataclass(frozen=True)
class Prepared:
    """What ``prepare_run_folder`` found: at most one of the two is set."""

    finished: tuple[Path, Checkpoint] | None = None  # --resume on a finished run: its final model
    resume: tuple[Path, Checkpoint] | None = None  # the checkpoint to continue from


def _final(out: Path) -> Checkpoint | None:
    try:
        return load_checkpoint(out / FINAL_NAME)
    except CheckpointError:
        return None


def prepare_run_folder(options: AgentOptions, config: TrainConfig, problem: GanProblem, log: Any) -> Prepared:
    """Prepare ``--out``: clear temporary files of interrupted writes, clear a replaced run's results
    (--overwrite), and for --resume: move aside or refuse a run of another configuration (see the
    module), keep a finished run (its final model reached --iterations) as it is, else load the newest
    checkpoint that verifies, warning about every newer one that did not."""
    out = options.out
    stale = remove_stale_temporaries(out)
    if stale:
        log.info("removed temporary files of interrupted writes", files=[p.name for p in stale])
    if options.overwrite and not options.resume:
        removed = clear_run_files(out)
        if removed:
            log.warning("--overwrite: removed the previous run's results", files=[p.name for p in removed])
    if not options.resume:
        return Prepared()
    assert config.iterations is not None
    final = _final(out)
    try:
        latest: Latest | None = load_latest(out)
        unusable: CheckpointError | None = None
    except CheckpointError as error:  # raised below unless the run is finished or moved aside
        latest, unusable = None, error
    recorded = (latest.path, latest.checkpoint) if latest is not None else None
    if recorded is None and final is not None:
        recorded = (out / FINAL_NAME, final)
    if recorded is not None:
        differing = run_differences(recorded[1].config, config)
        if differing and options.on_config_change != "new-run":
            raise CheckpointError(config_change_message(recorded[0], differing))
        if differing:
            folder, moved = move_run_aside(out, archive_label(recorded[1]))
            log.warning(
                "configuration changed: moved the previous run aside and starting a new run",
                changed=differing,
                moved_to=str(folder),
                files=[p.name for p in moved],
            )
            return Prepared()
    if final is not None and final.iteration >= config.iterations:
        log.info("run already finished; keeping its results", iteration=final.iteration, out=str(out))
        return Prepared(finished=(out / FINAL_NAME, final))
    if unusable is not None:
        raise unusable
    if latest is None:
        log.info("no checkpoint to resume from; starting fresh", path=str(out / CHECKPOINT_NAME))
        return Prepared()
    for path, why in latest.rejected:
        log.warning("checkpoint refused; falling back to an older one", path=str(path), error=why)
    if latest.checkpoint.unverified:
        log.warning(
            "checkpoint has no checksum (written by an older version); accepted unverified",
            path=str(latest.path),
        )
    if latest.checkpoint.schema_hash == problem.layout.schema_hash():  # else restore_state refuses
        try:
            problem.layout.flatten(latest.checkpoint.parameters)
        except ValueError as error:
            raise CheckpointError(f"checkpoint {latest.path} does not fit this model: {error}") from error
    return Prepared(resume=(latest.path, latest.checkpoint))
