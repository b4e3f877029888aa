"""``dpgan-agent --local N``: which flags reach the agents, which are refused, how they are started, and
a finished cluster run left as it is (no cluster is started: Popen is replaced)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from agent.checkpoint import Checkpoint, save_checkpoint
from agent.core.config import build_config
from agent.node import local
from agent.node.local import agent_command, agent_flags
from agent.node.main import agent_main

pytestmark = pytest.mark.timeout(60)


def test_resume_and_the_per_node_flags_are_forwarded() -> None:
    argv = ["--local", "2", "--resume", "--checkpoint-every", "5", "--keep-checkpoints=2", "--pace", "on"]
    argv += ["--isolation", "exit", "--settle", "0.5", "--view-period", "20", "--dataset", "ring8"]
    flags = agent_flags(argv, 2)
    assert flags == ["--resume", "--keep-checkpoints=2", "--checkpoint-every=5", "--settle=0.5",
                     "--view-period=20", "--isolation=exit", "--pace=on"]  # fmt: skip
    command = agent_command(
        1, ["127.0.0.1:1", "127.0.0.1:2"], Path("o/node-1"), Path("o/cluster.yaml"), flags
    )
    assert command[command.index("--peers") + 1] == "127.0.0.1:1"
    assert command[command.index("--node-id") + 1] == "node-1" and "--resume" in command


def test_flags_left_at_their_defaults_are_not_forwarded() -> None:
    assert agent_flags(["--local", "3"], 3) == []
    assert agent_flags(["--local", "3", "--overwrite"], 3) == ["--overwrite"]


@pytest.mark.parametrize(
    "extra",
    [["--listen", "0.0.0.0:6000"], ["--advertise", "h:1"], ["--peers", "h:1"], ["--node-id", "a"],
     ["--discovery", "mdns"], ["--dns-name", "dpgan"], ["--interface", "eth0"], ["--log-format", "console"]],
)  # fmt: skip
def test_flags_the_launcher_decides_itself_are_refused(extra: list[str]) -> None:
    with pytest.raises(ValueError, match=f"--local: {extra[0]} cannot be used"):
        agent_flags(["--local", "2", *extra], 2)


def test_nodes_must_agree_with_local(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--local 2 sets the number of nodes, but nodes is 3"):
        agent_flags(["--local", "2", "--nodes", "3"], 2)
    assert agent_flags(["--local", "2", "--nodes", "2"], 2) == []
    config = tmp_path / "cfg.yaml"
    config.write_text("nodes: 8\n")
    with pytest.raises(ValueError, match="nodes is 8"):
        agent_flags(["--local", "2", "--config", str(config)], 2)


def test_a_refused_flag_exits_2_before_anything_starts(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    assert agent_main(["--local", "2", "--nodes", "4", "--out", str(out)]) == 2
    assert "nodes is 4" in capsys.readouterr().err and not out.exists()


class FakeAgent:
    """Stands in for an agent process: records how it was started and exits 0 at once."""

    started: ClassVar[list[tuple[list[str], dict]]] = []

    def __init__(self, command: list[str], **kwargs: object) -> None:
        FakeAgent.started.append((command, kwargs))
        self.stderr = io.StringIO("")

    def wait(self) -> int:
        return 0

    def poll(self) -> int:
        return 0


def test_agents_start_in_their_own_session_with_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A terminal's Ctrl-C goes to the launcher's process group only; the launcher forwards it once."""
    FakeAgent.started = []
    monkeypatch.setattr(local.subprocess, "Popen", FakeAgent)
    out = tmp_path / "run"
    argv = ["--local", "2", "--resume", "--dataset", "ring8", "--iterations", "20", "--out", str(out)]
    assert agent_main(argv) == 0
    assert len(FakeAgent.started) == 2
    for command, kwargs in FakeAgent.started:
        assert kwargs.get("start_new_session") is True
        assert "--resume" in command


def test_resume_of_a_finished_cluster_keeps_its_results(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_agents(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("a finished run starts no agent")

    monkeypatch.setattr(local.subprocess, "Popen", no_agents)
    out = tmp_path / "run"
    trained = build_config({"dataset": "ring8", "iterations": 20, "nodes": 2}).to_dict()
    for i in range(2):
        final = Checkpoint({"generator.w": torch.zeros(2)}, {}, None, 20, 20, trained, "", "dposg")
        save_checkpoint(out / f"node-{i}" / "final.safetensors", final)
    summary = json.dumps({"mode": "local", "wall_seconds": 119.0})
    (out / "summary.json").write_text(summary)
    argv = ["--local", "2", "--resume", "--dataset", "ring8", "--iterations", "20", "--out", str(out)]
    assert agent_main(argv) == 0
    assert (out / "summary.json").read_text() == summary
    # Another configuration is another run, finished or not: refused before any agent starts.
    assert agent_main([*argv, "--rounds", "2"]) == 2
    assert (out / "summary.json").read_text() == summary


def test_an_impossible_topology_is_refused_before_any_agent_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_agents(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("no agent may start")

    monkeypatch.setattr(local.subprocess, "Popen", no_agents)
    argv = ["--local", "5", "--topology", "random_regular", "--degree", "3", "--dataset", "ring8",
            "--out", str(tmp_path / "run")]  # fmt: skip
    assert agent_main(argv) == 2
    assert "cannot be built for 5 nodes" in capsys.readouterr().err
    # The same topology from a config file: the error names the file.
    config = tmp_path / "cluster.yaml"
    config.write_text("topology: random_regular\ndegree: 3\n")
    argv = ["--local", "5", "--config", str(config), "--dataset", "ring8", "--out", str(tmp_path / "run")]
    assert agent_main(argv) == 2
    assert f"config file {config}: topology: 'random_regular'" in capsys.readouterr().err
