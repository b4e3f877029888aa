"""Progress an operator sees: iteration lines with total, percent and ETA, a sample grid at every
evaluation, wall time that continues across a resume; the bar itself on a terminal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.progress import ProgressBar
from tests.agents import events_named, start_agents, wait_all

pytestmark = pytest.mark.timeout(120)

FLAGS = ["--dataset", "ring8", "--eval-every", "20", "--eval-samples", "200", "--log-every", "10",
         "--checkpoint-every", "10", "--discovery", "none", "--min-peers", "0"]  # fmt: skip


def test_progress_lines_samples_and_wall_time_across_a_resume(tmp_path: Path) -> None:
    processes, _ = start_agents(tmp_path, 1, [*FLAGS, "--iterations", "20"])
    assert wait_all(processes, timeout=90) == [0]
    out = tmp_path / "node-0"
    first = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    processes, _ = start_agents(tmp_path, 1, [*FLAGS, "--iterations", "40", "--resume"])
    assert wait_all(processes, timeout=90) == [0]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [20, 40]
    assert records[1]["wall_seconds"] > first[-1]["wall_seconds"]  # continues, not from 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["wall_seconds"] >= records[1]["wall_seconds"]
    for record in records:
        assert (out / record["samples"]).is_file()
    assert (out / "samples-0000020.png").is_file() and (out / "samples-0000040.png").is_file()
    lines = events_named(out / "agent.log", "iteration")
    last = lines[-1]
    assert last["iteration"] == 40 and last["total"] == 40 and last["percent"] == 100.0
    assert last["eta_s"] == 0.0
    assert all("eta_s" in line for line in lines if line["iteration"] > 20)


def test_progress_bar_eta_and_terminal_bar(capsys: pytest.CaptureFixture[str]) -> None:
    quiet = ProgressBar(100, desc="x", initial=20, enabled=False)
    assert quiet.eta_fields(20) == {"total": 100, "percent": 20.0}
    fields = quiet.eta_fields(60)
    assert fields["total"] == 100 and fields["percent"] == 60.0 and fields["eta_s"] >= 0
    quiet.update_to(60)
    quiet.write("a line\n")
    quiet.close()
    assert capsys.readouterr().err == "a line\n"
    bar = ProgressBar(10, desc="node-0", enabled=True)
    bar.update_to(5, loss_g=0.123456)
    bar.write("above the bar\n")
    bar.close()
    err = capsys.readouterr().err
    assert "node-0" in err and "5/10" in err and "loss_g=0.1235" in err and "above the bar" in err


def test_the_simulator_reports_progress_between_evaluations(tmp_path: Path, monkeypatch) -> None:
    """No minutes of silence: with PROGRESS_EVERY_S at 0 a line per iteration, each with an ETA."""
    import agent.simulate_cli as simulate_cli
    from agent.cli import main
    from agent.logs import configure_logging

    monkeypatch.setattr(simulate_cli, "PROGRESS_EVERY_S", 0.0)
    log = tmp_path / "log.jsonl"
    with log.open("w") as stream:
        monkeypatch.setattr(
            simulate_cli, "configure_logging", lambda: configure_logging(stream=stream, json=True)
        )
        argv = ["simulate", "--dataset", "ring8", "--nodes", "2", "--iterations", "6", "--eval-every", "6",
                "--eval-samples", "200", "--out", str(tmp_path / "out")]  # fmt: skip
        try:
            assert main(argv) == 0
        finally:
            configure_logging()  # later tests must not log into this file once it is closed
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    progress = [line for line in lines if line["event"] == "progress"]
    assert [line["iteration"] for line in progress] == [1, 2, 3, 4, 5, 6]
    assert progress[-1]["total"] == 6 and progress[-1]["percent"] == 100.0 and "eta_s" in progress[-1]
