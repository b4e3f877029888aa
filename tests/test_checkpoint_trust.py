"""Checkpoints you can trust: a checksum over tensors and metadata, no NaN/Inf, the last K kept with a
fallback to the newest one that verifies, stale temporary files cleared (real files throughout)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from agent.checkpoint import (
    CHECKPOINT_NAME,
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    load_latest,
    numbered_checkpoints,
    save_checkpoint,
    save_series,
)
from agent.files import remove_stale_temporaries

pytestmark = pytest.mark.timeout(60)


def make_checkpoint(iteration: int = 30, seed: int = 0) -> Checkpoint:
    generator = torch.Generator().manual_seed(seed)
    return Checkpoint(
        parameters={
            "generator.net.0.weight": torch.randn(4, 3, generator=generator),
            "discriminator.net.0.weight": torch.randn(2, 4, generator=generator),
        },
        optimizer={"direction": torch.randn(20, generator=generator)},
        rng_state=torch.Generator().manual_seed(seed).get_state(),
        iteration=iteration,
        step=iteration,
        config={"dataset": "ring8", "iterations": 100},
        schema_hash="abc",
        algorithm="dposg",
    )


def data_offset(path: Path) -> int:
    with path.open("rb") as handle:
        return 8 + int.from_bytes(handle.read(8), "little")


def test_round_trip_is_verified(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    original = make_checkpoint()
    save_checkpoint(path, original)
    loaded = load_checkpoint(path)
    assert not loaded.unverified and loaded.iteration == 30
    for name, tensor in original.parameters.items():
        assert torch.equal(tensor, loaded.parameters[name])


def test_a_nan_generator_weight_is_refused_naming_the_tensor(tmp_path: Path) -> None:
    checkpoint = make_checkpoint()
    checkpoint.parameters["generator.net.0.weight"][1, 2] = float("nan")
    path = tmp_path / "checkpoint.safetensors"
    save_checkpoint(path, checkpoint)  # a faithful record; the checksum matches
    with pytest.raises(CheckpointError, match=r"generator\.net\.0\.weight.*non-finite") as refused:
        load_checkpoint(path)
    assert str(path) in str(refused.value)


def test_an_inf_in_the_optimizer_state_is_refused(tmp_path: Path) -> None:
    checkpoint = make_checkpoint()
    checkpoint.optimizer["direction"][7] = float("inf")
    path = tmp_path / "checkpoint.safetensors"
    save_checkpoint(path, checkpoint)
    with pytest.raises(CheckpointError, match=r"optimizer\.direction.*non-finite") as refused:
        load_checkpoint(path)
    assert str(path) in str(refused.value)


def test_a_one_bit_flip_in_tensor_data_is_refused_by_the_checksum(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.safetensors"
    save_checkpoint(path, make_checkpoint())
    data = bytearray(path.read_bytes())
    data[data_offset(path)] ^= 0x01  # the lowest bit of the first tensor byte: still a finite number
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum") as refused:
        load_checkpoint(path)
    assert str(path) in str(refused.value)


def test_edited_metadata_is_refused_by_the_checksum(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.safetensors"
    save_checkpoint(path, make_checkpoint(iteration=30))
    data = path.read_bytes()
    assert data.count(b'"iteration":"30"') == 1
    path.write_bytes(data.replace(b'"iteration":"30"', b'"iteration":"90"'))
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(path)


def test_a_truncated_file_is_refused_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.safetensors"
    save_checkpoint(path, make_checkpoint())
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="not a readable safetensors file") as refused:
        load_checkpoint(path)
    assert str(path) in str(refused.value)


def test_an_old_checkpoint_without_a_checksum_is_accepted_unverified(tmp_path: Path) -> None:
    checkpoint = make_checkpoint()
    tensors = dict(checkpoint.parameters) | {"optimizer.direction": checkpoint.optimizer["direction"]}
    metadata = {"format": "dpgan-checkpoint-1", "config": json.dumps(checkpoint.config), "iteration": "30",
                "step": "30", "schema_hash": "abc", "algorithm": "dposg"}  # fmt: skip
    path = tmp_path / "old.safetensors"
    path.write_bytes(save(tensors, metadata=metadata))
    loaded = load_checkpoint(path)
    assert loaded.unverified and loaded.iteration == 30


def test_the_series_keeps_the_last_k(tmp_path: Path) -> None:
    for iteration in (10, 20, 30, 40):
        save_series(tmp_path, make_checkpoint(iteration, seed=iteration), keep=3)
    assert [i for i, _ in numbered_checkpoints(tmp_path)] == [40, 30, 20]
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME).iteration == 40
    latest = load_latest(tmp_path)
    assert latest is not None and latest.path == tmp_path / CHECKPOINT_NAME and not latest.rejected


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path: Path) -> None:
    for iteration in (10, 20, 30):
        save_series(tmp_path, make_checkpoint(iteration, seed=iteration), keep=3)
    newest = [tmp_path / CHECKPOINT_NAME, tmp_path / "checkpoint-30.safetensors"]  # both hold iteration 30
    for path in newest:
        data = bytearray(path.read_bytes())
        data[-3] ^= 0x10
        path.write_bytes(bytes(data))
    latest = load_latest(tmp_path)
    assert latest is not None
    assert latest.path == tmp_path / "checkpoint-20.safetensors" and latest.checkpoint.iteration == 20
    assert [path for path, _ in latest.rejected] == newest
    assert all(str(path) in why and "checksum" in why for path, why in latest.rejected)


def test_only_the_well_known_copy_damaged_falls_back_to_its_numbered_twin(tmp_path: Path) -> None:
    for iteration in (10, 20):
        save_series(tmp_path, make_checkpoint(iteration, seed=iteration))
    (tmp_path / CHECKPOINT_NAME).write_bytes(b"\x00" * 40)
    latest = load_latest(tmp_path)
    assert latest is not None and latest.checkpoint.iteration == 20
    assert latest.rejected[0][0] == tmp_path / CHECKPOINT_NAME


def test_no_checkpoint_at_all_and_none_usable(tmp_path: Path) -> None:
    assert load_latest(tmp_path) is None
    save_series(tmp_path, make_checkpoint(10), keep=1)
    for path in tmp_path.iterdir():
        path.write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="no usable checkpoint") as refused:
        load_latest(tmp_path)
    assert "checkpoint-10.safetensors" in str(refused.value) and CHECKPOINT_NAME in str(refused.value)


def test_stale_temporary_files_of_interrupted_writes_are_removed(tmp_path: Path) -> None:
    # What a write killed mid-way leaves: write_atomic's own temporary name in the target's folder.
    stale = [
        Path(tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=tmp_path)[1])
        for name in ("checkpoint.safetensors", "checkpoint-20.safetensors", "summary.json")
    ]
    keep = [tmp_path / "notes.tmp", tmp_path / ".hidden", tmp_path / "checkpoint.safetensors"]
    for path in keep:
        path.write_text("x")
    assert sorted(remove_stale_temporaries(tmp_path)) == sorted(stale)
    assert not any(path.exists() for path in stale) and all(path.exists() for path in keep)
