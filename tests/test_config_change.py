"""--on-config-change: a --resume over a run of another configuration (or run id) is refused naming the
keys and the way on (refuse, the default), or moves that run into <out>/previous/ untouched and starts a
new one (new-run); an unchanged configuration resumes as before."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
import torch

from agent.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from agent.core.config import TrainConfig
from agent.files import check_run_folder, previous_run_files
from agent.node.runs import archive_label, config_differences, move_run_aside, run_differences
from tests.agents import events_named, start_agents, wait_all

pytestmark = pytest.mark.timeout(150)

FLAGS = ["--dataset", "ring8", "--eval-every", "10", "--eval-samples", "200", "--log-every", "5",
         "--checkpoint-every", "10", "--discovery", "none", "--min-peers", "0"]  # fmt: skip


def digests(folder: Path) -> dict[str, str]:
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.iterdir())
        if path.is_file() and path.name != "agent.log"
    }


def run(tmp_path: Path, *flags: str) -> int:
    processes, _ = start_agents(tmp_path, 1, [*FLAGS, *flags])
    return wait_all(processes, timeout=90)[0]


def test_a_changed_configuration_is_refused_or_starts_a_new_run(tmp_path: Path) -> None:
    out, log = tmp_path / "node-0", tmp_path / "node-0" / "agent.log"
    assert run(tmp_path, "--iterations", "20", "--rounds", "1") == 0
    first = digests(out)
    (listening,) = events_named(log, "listening")
    assert load_checkpoint(out / "final.safetensors").run_id == listening["run"]

    # A larger goal and another number of rounds: refused by default, naming the key and the ways on.
    assert run(tmp_path, "--iterations", "40", "--rounds", "2", "--resume") == 1
    text = log.read_text()
    assert "written with a different configuration: ['rounds']" in text
    assert "--on-config-change new-run" in text and "new --out" in text
    assert digests(out) == first and not (out / "previous").exists()

    # new-run: the previous run moves into previous/<run id>-<UTC time>/, byte for byte; a new run starts.
    assert (
        run(tmp_path, "--iterations", "40", "--rounds", "2", "--resume", "--on-config-change", "new-run") == 0
    )
    (moved,) = events_named(log, "configuration changed: moved the previous run aside and starting a new run")
    assert moved["changed"] == ["rounds"] and moved["level"] == "warning"
    (archive,) = (out / "previous").iterdir()
    assert moved["moved_to"] == str(archive) and archive.name.startswith("cfg-")
    assert digests(archive) == first
    final = load_checkpoint(out / "final.safetensors")
    assert final.iteration == 40 and final.config["rounds"] == 2 and final.config["iterations"] == 40
    assert not events_named(log, "resumed from checkpoint")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [10, 20, 30, 40]

    # The same configuration again (a larger goal): resumed as before, nothing moved.
    assert (
        run(tmp_path, "--iterations", "50", "--rounds", "2", "--resume", "--on-config-change", "new-run") == 0
    )
    (resumed,) = events_named(log, "resumed from checkpoint")
    assert resumed["iteration"] == 40
    assert [p.name for p in (out / "previous").iterdir()] == [archive.name]
    assert digests(archive) == first
    assert load_checkpoint(out / "final.safetensors").iteration == 50
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [10, 20, 30, 40, 50]

    # A finished run of another configuration is a new run too; without --resume previous/ is no run.
    assert run(tmp_path, "--iterations", "50", "--rounds", "1", "--resume") == 1
    assert (
        run(tmp_path, "--iterations", "20", "--rounds", "1", "--resume", "--on-config-change", "new-run") == 0
    )
    assert len(list((out / "previous").iterdir())) == 2
    assert load_checkpoint(out / "final.safetensors").iteration == 20


def make_checkpoint(config: dict[str, object], run_id: str | None) -> Checkpoint:
    return Checkpoint(
        parameters={"generator.w": torch.zeros(2)},
        optimizer={},
        rng_state=None,
        iteration=10,
        step=10,
        config=config,
        schema_hash="abc",
        algorithm="dposg",
        run_id=run_id,
    )


def test_the_comparison_skips_iterations_and_compares_explicit_run_ids() -> None:
    config = TrainConfig(dataset="ring8", iterations=100, rounds=2)
    stored = TrainConfig(dataset="ring8", iterations=20, rounds=2).to_dict()
    assert config_differences(stored, config) == [] and run_differences(stored, config) == []
    assert run_differences(stored | {"rounds": 1, "lr": 0.5}, config) == ["lr", "rounds"]
    named = TrainConfig(dataset="ring8", iterations=100, rounds=2, run_id="exp-2")
    assert run_differences(stored, named) == ["run_id"]  # giving a run id starts another run
    assert run_differences(stored | {"run_id": "exp-1"}, named) == ["run_id"]
    assert run_differences(stored | {"run_id": "exp-2"}, named) == []
    assert run_differences(stored | {"run_id": "exp-1"}, config) == ["run_id"]
    older = {k: v for k, v in stored.items() if k != "run_id"}  # a file from before run ids existed
    assert run_differences(older, named) == ["run_id"]
    assert run_differences(older, config) == []  # derived ids: the keys decide


def test_the_run_id_is_an_optional_checkpoint_entry(tmp_path: Path) -> None:
    for run_id in ("exp-1", None):
        save_checkpoint(tmp_path / "c.safetensors", make_checkpoint({"dataset": "ring8"}, run_id))
        loaded = load_checkpoint(tmp_path / "c.safetensors")
        assert loaded.run_id == run_id and not loaded.unverified


def test_moving_a_run_aside_keeps_every_file_and_previous_is_no_run(tmp_path: Path) -> None:
    names = ["checkpoint.safetensors", "checkpoint-10.safetensors", "final.safetensors", "metrics.jsonl",
             "summary.json", "samples-final.png"]  # fmt: skip
    for name in names:
        (tmp_path / name).write_text(name)
    (tmp_path / "agent.log").write_text("log")
    (tmp_path / "tls").mkdir()
    (tmp_path / "tls" / "summary.json").write_text("{}")
    when = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    folder, moved = move_run_aside(tmp_path, "exp-1", when)
    assert folder == tmp_path / "previous" / "exp-1-20300102T030405Z"
    assert sorted(p.name for p in moved) == sorted(names)
    assert all((folder / name).read_text() == name for name in names)
    assert (tmp_path / "agent.log").read_text() == "log"
    assert previous_run_files(tmp_path) == []
    check_run_folder(tmp_path, resume=False, overwrite=False)  # previous/ and tls/ are no run in --out
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    second, _ = move_run_aside(tmp_path, "exp-1", when)
    assert second.name == "exp-1-20300102T030405Z-2" and (second / "metrics.jsonl").read_text() == "{}\n"


def test_the_archive_is_named_after_the_run() -> None:
    assert archive_label(make_checkpoint({}, "exp-1")) == "exp-1"
    assert archive_label(make_checkpoint({"run_id": "named"}, None)) == "named"
    assert archive_label(make_checkpoint({"run_id": None, "rounds": 2}, None)).startswith("cfg-")
    assert archive_label(make_checkpoint({}, "../../etc")) == "etc"


def test_a_local_cluster_refuses_on_config_change_new_run(
    capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    from agent.node.main import agent_main

    assert agent_main(["--local", "2", "--on-config-change", "new-run", "--out", str(tmp_path)]) == 2
    assert "--local: --on-config-change cannot be used" in capsys.readouterr().err
