"""Run folders: a previous run's results in --out are never replaced by accident, and --resume on a
finished run keeps them."""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import pytest

from agent.files import check_run_folder
from agent.node.main import agent_main
from tests.agents import events_named, start_agents, wait_all

pytestmark = pytest.mark.timeout(150)

SINGLE = ["--listen", "127.0.0.1:45999", "--discovery", "none", "--dataset", "ring8"]


def test_a_folder_with_only_a_log_or_nothing_is_fine(tmp_path: Path) -> None:
    check_run_folder(tmp_path / "missing", resume=False, overwrite=False)
    (tmp_path / "agent.log").write_text("x")
    check_run_folder(tmp_path, resume=False, overwrite=False)


@pytest.mark.parametrize("name", ["checkpoint.safetensors", "checkpoint-300.safetensors", "final.safetensors",
                                  "metrics.jsonl", "summary.json"])  # fmt: skip
def test_a_previous_run_in_out_is_refused_without_resume(
    tmp_path: Path, capsys: pytest.CaptureFixture, name: str
) -> None:
    (tmp_path / name).write_text("")
    assert agent_main([*SINGLE, "--out", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert f"--out {tmp_path} holds a previous run ({name})" in error
    assert "--resume" in error and "--overwrite" in error and "new folder" in error


def test_resume_and_overwrite_together_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert agent_main([*SINGLE, "--out", str(tmp_path), "--resume", "--overwrite"]) == 2
    assert "give one of them" in capsys.readouterr().err


def test_a_local_cluster_over_a_previous_run_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "node-1").mkdir()
    (tmp_path / "node-1" / "metrics.jsonl").write_text("{}\n")
    assert agent_main(["--local", "2", "--dataset", "ring8", "--out", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert f"--out {tmp_path} holds a previous run (node-1/metrics.jsonl)" in error
    assert not (tmp_path / "cluster.yaml").exists()


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_resume_on_a_finished_run_keeps_its_results(tmp_path: Path) -> None:
    flags = ["--dataset", "ring8", "--iterations", "20", "--eval-every", "10", "--eval-samples", "100",
             "--checkpoint-every", "5", "--keep-checkpoints", "2", "--log-every", "5"]  # fmt: skip
    processes, _ = start_agents(tmp_path, 2, flags)
    assert wait_all(processes, timeout=90) == [0, 0]
    kept = [
        "summary.json",
        "metrics.jsonl",
        "final.safetensors",
        "samples-final.png",
        "checkpoint.safetensors",
    ]
    before = {(i, name): digest(tmp_path / f"node-{i}" / name) for i in range(2) for name in kept}
    numbered = sorted(p.name for p in (tmp_path / "node-0").glob("checkpoint-*.safetensors"))
    assert numbered == ["checkpoint-15.safetensors", "checkpoint-20.safetensors"]
    stale = Path(
        tempfile.mkstemp(prefix=".checkpoint.safetensors.", suffix=".tmp", dir=tmp_path / "node-0")[1]
    )

    # Again without --resume: refused, nothing touched.
    processes, _ = start_agents(tmp_path, 2, flags)
    assert wait_all(processes, timeout=60) == [2, 2]
    assert "holds a previous run" in (tmp_path / "node-0" / "agent.log").read_text()

    processes, _ = start_agents(tmp_path, 2, [*flags, "--resume"])
    assert wait_all(processes, timeout=60) == [0, 0]
    after = {(i, name): digest(tmp_path / f"node-{i}" / name) for i in range(2) for name in kept}
    assert after == before
    for i in range(2):
        finished = events_named(
            tmp_path / f"node-{i}" / "agent.log", "run already finished; keeping its results"
        )
        assert len(finished) == 1 and finished[0]["iteration"] == 20
    assert not stale.exists()
