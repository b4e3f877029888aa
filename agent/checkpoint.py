"""Node checkpoints in safetensors: parameters, optimizer state and RNG state, written atomically and
verified when read.

One format for the simulator's ``node-<i>/final.safetensors`` and the agent's periodic checkpoints:

* ``generator.*`` / ``discriminator.*``: the players' state-dict entries (what a user loads);
* ``optimizer.direction``, ``optimizer.moment1``, ``optimizer.moment2``: the algorithm's local state;
* ``rng.stream``: the node's torch.Generator state (uint8), so a resumed run draws the same batches;
* metadata: ``config`` (JSON), ``iteration``, ``step``, ``algorithm``, ``schema_hash``, ``format`` and
  ``sha256``, a SHA-256 over every tensor (name, dtype, shape, bytes) and every other metadata entry;
  optionally ``run_id``, the run the node trained in (written since it existed; older files lack it).

A write goes to a temporary file in the same folder, is fsynced, then renamed over the target, so a
crash mid-write leaves the previous checkpoint intact. A read refuses, naming the file, anything
unreadable, a checksum that does not match (a flipped bit, a truncated or edited file) and any NaN or
Inf in the parameters or the optimizer state (naming the tensor). Files written before the checksum
existed are accepted unverified (``Checkpoint.unverified``; the agent logs a warning).

An agent keeps a series in its folder (``save_series``/``load_latest``): the well-known
``checkpoint.safetensors`` (always the newest: what ``--resume`` and users read) plus copies
``checkpoint-<iteration>.safetensors`` of the last K; a damaged ``checkpoint.safetensors`` falls back
to the newest numbered copy that verifies.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from agent.files import write_atomic

FORMAT_VERSION = "dpgan-checkpoint-1"
OPTIMIZER_PREFIX = "optimizer."
RNG_KEY = "rng.stream"
CHECKSUM_KEY = "sha256"
RUN_ID_KEY = "run_id"  # optional: absent in files written before it existed
CHECKPOINT_NAME = "checkpoint.safetensors"  # the newest checkpoint of a series
DEFAULT_KEEP = 3
_NUMBERED = re.compile(r"^checkpoint-(\d+)\.safetensors$")


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, damaged, or does not match what the caller expects."""


@dataclass
class Checkpoint:
    parameters: dict[str, torch.Tensor]  # generator.* and discriminator.*
    optimizer: dict[str, torch.Tensor]  # direction / moment1 / moment2 (names without the prefix)
    rng_state: torch.Tensor | None
    iteration: int
    step: int
    config: dict[str, object]
    schema_hash: str
    algorithm: str
    unverified: bool = False  # read from a file written before checkpoints carried a checksum
    run_id: str | None = None  # the run the node trained in; None: written before it was stored


def checksum(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes and the metadata (but the checksum)."""
    digest = hashlib.sha256(FORMAT_VERSION.encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    rest = {k: v for k, v in metadata.items() if k != CHECKSUM_KEY}
    digest.update(json.dumps(rest, sort_keys=True, allow_nan=False).encode())
    return digest.hexdigest()


def serialize(checkpoint: Checkpoint) -> bytes:
    tensors: dict[str, torch.Tensor] = {
        k: v.detach().cpu().contiguous() for k, v in checkpoint.parameters.items()
    }
    for name, tensor in checkpoint.optimizer.items():
        tensors[OPTIMIZER_PREFIX + name] = tensor.detach().cpu().contiguous()
    if checkpoint.rng_state is not None:
        tensors[RNG_KEY] = checkpoint.rng_state.detach().cpu().contiguous()
    metadata = {
        "format": FORMAT_VERSION,
        "config": json.dumps(checkpoint.config, sort_keys=True, allow_nan=False),
        "iteration": str(checkpoint.iteration),
        "step": str(checkpoint.step),
        "schema_hash": checkpoint.schema_hash,
        "algorithm": checkpoint.algorithm,
    }
    if checkpoint.run_id is not None:
        metadata[RUN_ID_KEY] = checkpoint.run_id
    metadata[CHECKSUM_KEY] = checksum(tensors, metadata)
    return save(tensors, metadata=metadata)


def save_checkpoint(path: Path, checkpoint: Checkpoint) -> None:
    write_atomic(path, serialize(checkpoint))


def _non_finite(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    for name in sorted(tensors):
        tensor = tensors[name]
        if tensor.is_floating_point() or tensor.is_complex():
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                raise CheckpointError(
                    f"checkpoint {path}: tensor {name!r} holds {bad} non-finite value(s) (NaN or Inf)"
                )


def load_checkpoint(path: Path) -> Checkpoint:
    """Read and verify one checkpoint file; every error names the file (CheckpointError)."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        tensors = load_file(str(path))
        with open(path, "rb") as handle:
            header_length = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(header_length))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"checkpoint {path} is not a readable safetensors file: {error}") from error
    metadata = header.get("__metadata__") or {}
    if metadata.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format {metadata.get('format')!r}, expected {FORMAT_VERSION!r}"
        )
    stored = metadata.get(CHECKSUM_KEY)
    if stored is not None and stored != checksum(tensors, metadata):
        raise CheckpointError(
            f"checkpoint {path} is damaged: its SHA-256 checksum does not match its tensors and metadata"
        )
    try:
        iteration = int(metadata["iteration"])
        step = int(metadata["step"])
        config = json.loads(metadata["config"])
    except (KeyError, ValueError) as error:
        raise CheckpointError(f"checkpoint {path} has damaged metadata: {error}") from error
    _non_finite(path, tensors)
    parameters = {k: v for k, v in tensors.items() if k.startswith(("generator.", "discriminator."))}
    optimizer = {
        k.removeprefix(OPTIMIZER_PREFIX): v for k, v in tensors.items() if k.startswith(OPTIMIZER_PREFIX)
    }
    return Checkpoint(
        parameters=parameters,
        optimizer=optimizer,
        rng_state=tensors.get(RNG_KEY),
        iteration=iteration,
        step=step,
        config=config,
        schema_hash=metadata.get("schema_hash", ""),
        algorithm=metadata.get("algorithm", ""),
        unverified=stored is None,
        run_id=metadata.get(RUN_ID_KEY),
    )


# ---- a series of checkpoints in one folder ---------------------------------------------------------------


def numbered_name(iteration: int) -> str:
    return f"checkpoint-{iteration}.safetensors"


def numbered_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """``checkpoint-<iteration>.safetensors`` files in ``folder``, newest (highest iteration) first."""
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _NUMBERED.match(path.name)
        if match and path.is_file():
            found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


def save_series(folder: Path, checkpoint: Checkpoint, keep: int = DEFAULT_KEEP) -> list[Path]:
    """Write ``checkpoint.safetensors`` and ``checkpoint-<iteration>.safetensors`` (both atomically, the
    well-known name first so it is never older than a numbered copy), then delete numbered copies beyond
    the newest ``keep``. Returns the deleted files."""
    if keep < 1:
        raise ValueError(f"keep: must be at least 1, got {keep}")
    payload = serialize(checkpoint)
    write_atomic(folder / CHECKPOINT_NAME, payload)
    write_atomic(folder / numbered_name(checkpoint.iteration), payload)
    removed = [path for _, path in numbered_checkpoints(folder)[keep:]]
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


@dataclass
class Latest:
    """The checkpoint a resume starts from, and the newer files that were refused on the way."""

    path: Path
    checkpoint: Checkpoint
    rejected: list[tuple[Path, str]] = field(default_factory=list)  # (file, why), newest first


def load_latest(folder: Path) -> Latest | None:
    """The newest checkpoint of ``folder`` that verifies: ``checkpoint.safetensors``, else the numbered
    copies from the highest iteration down. None when the folder holds no checkpoint at all; a
    CheckpointError naming every file and why when none of them verifies."""
    candidates = [folder / CHECKPOINT_NAME] if (folder / CHECKPOINT_NAME).is_file() else []
    candidates += [path for _, path in numbered_checkpoints(folder)]
    rejected: list[tuple[Path, str]] = []
    for path in candidates:
        try:
            return Latest(path, load_checkpoint(path), rejected)
        except CheckpointError as error:
            rejected.append((path, str(error)))
    if rejected:
        reasons = "; ".join(why for _, why in rejected)
        raise CheckpointError(f"no usable checkpoint in {folder}: {reasons}")
    return None
