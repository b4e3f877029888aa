"""``dpgan-agent simulate`` end to end on tiny runs: outputs, determinism, checkpoints, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from agent.checkpoint import CheckpointError, load_checkpoint
from agent.cli import main

TINY = [
    "--dataset",
    "ring8",
    "--nodes",
    "3",
    "--iterations",
    "6",
    "--eval-every",
    "3",
    "--eval-samples",
    "200",
]


def test_simulate_writes_every_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", *TINY, "--out", str(tmp_path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary == json.loads((tmp_path / "summary.json").read_text())
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [3, 6]
    for record in records:
        assert {"wall_seconds", "quality", "node_quality", "consensus_distance", "loss_g", "loss_d"} <= set(
            record
        )
        assert len(record["node_quality"]) == 3
        assert 0 <= record["quality"]["modes_covered"] <= 8
    assert Image.open(tmp_path / "samples-final.png").size[0] > 0
    for i in range(3):
        checkpoint = load_checkpoint(tmp_path / f"node-{i}" / "final.safetensors")
        assert checkpoint.iteration == 6 and checkpoint.config["nodes"] == 3
        assert any(k.startswith("generator.") for k in checkpoint.parameters)
        assert any(k.startswith("discriminator.") for k in checkpoint.parameters)
        assert "direction" in checkpoint.optimizer and checkpoint.rng_state is not None
        assert checkpoint.schema_hash == summary["schema_hash"]


def test_same_seed_same_parameters_and_yaml_overridden_by_flags(tmp_path: Path) -> None:
    config = tmp_path / "cfg.yaml"
    config.write_text("dataset: ring8\nnodes: 3\niterations: 4\neval_every: 4\neval_samples: 100\nlr: 0.5\n")
    assert main(["simulate", "--config", str(config), "--lr", "0.01", "--out", str(tmp_path / "a")]) == 0
    assert main(["simulate", "--config", str(config), "--lr", "0.01", "--out", str(tmp_path / "b")]) == 0
    a = load_checkpoint(tmp_path / "a" / "node-1" / "final.safetensors")
    b = load_checkpoint(tmp_path / "b" / "node-1" / "final.safetensors")
    assert a.config["lr"] == 0.01
    for name, tensor in a.parameters.items():
        assert torch.equal(tensor, b.parameters[name]), name


@pytest.mark.parametrize(
    ("flags", "message"),
    [(["--lr", "-1"], "lr: must be a positive number"), (["--topology", "star"], "star")],
)
def test_bad_flags_exit_2_with_the_reason(tmp_path: Path, flags: list[str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "agent.cli", "simulate", *TINY, *flags, "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert message in result.stderr


def test_unknown_yaml_key_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "cfg.yaml"
    config.write_text("dataset: ring8\nlearning_rate: 0.1\n")
    assert main(["simulate", "--config", str(config), "--out", str(tmp_path / "x")]) == 2
    assert "learning_rate" in capsys.readouterr().err


def test_damaged_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "final.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.safetensors")
