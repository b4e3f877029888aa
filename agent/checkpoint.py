"""Node checkpoints in safetensors: parameters, optimizer state and RNG state, written atomically.

One format for the simulator's ``node-<i>/final.safetensors`` and the agent's periodic checkpoints:

* ``generator.*`` / ``discriminator.*``: the players' state-dict entries (what a user loads);
* ``optimizer.direction``, ``optimizer.moment1``, ``optimizer.moment2``: the algorithm's local state;
* ``rng.stream``: the node's torch.Generator state (uint8), so a resumed run draws the same batches;
* metadata: ``config`` (JSON), ``iteration``, ``step``, ``algorithm``, ``schema_hash``, ``format``.

A write goes to a temporary file in the same folder, is fsynced, then renamed over the target, so a
crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from agent.files import write_atomic

FORMAT_VERSION = "dpgan-checkpoint-1"
OPTIMIZER_PREFIX = "optimizer."
RNG_KEY = "rng.stream"


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, or does not match what the caller expects."""


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


def save_checkpoint(path: Path, checkpoint: Checkpoint) -> None:
    tensors: dict[str, torch.Tensor] = {
        k: v.detach().cpu().contiguous() for k, v in checkpoint.parameters.items()
    }
    for name, tensor in checkpoint.optimizer.items():
        tensors[OPTIMIZER_PREFIX + name] = tensor.detach().cpu().contiguous()
    if checkpoint.rng_state is not None:
        tensors[RNG_KEY] = checkpoint.rng_state.detach().cpu().contiguous()
    metadata = {
        "format": FORMAT_VERSION,
        "config": json.dumps(checkpoint.config, sort_keys=True),
        "iteration": str(checkpoint.iteration),
        "step": str(checkpoint.step),
        "schema_hash": checkpoint.schema_hash,
        "algorithm": checkpoint.algorithm,
    }
    write_atomic(path, save(tensors, metadata=metadata))


def load_checkpoint(path: Path) -> Checkpoint:
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
    try:
        iteration = int(metadata["iteration"])
        step = int(metadata["step"])
        config = json.loads(metadata["config"])
    except (KeyError, ValueError) as error:
        raise CheckpointError(f"checkpoint {path} has damaged metadata: {error}") from error
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
    )
