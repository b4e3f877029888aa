"""One agent alone (no peers): it runs its local steps back to back between events, and must still be
exactly the one-node simulator and stop promptly on SIGTERM."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import torch

from agent.checkpoint import load_checkpoint
from agent.cli import main
from tests.agents import EQUIVALENCE_FLAGS, events_named, log_events, start_agents, wait_all, wait_for_event

pytestmark = pytest.mark.timeout(120)

ALONE = ["--discovery", "none", "--min-peers", "0"]


def test_agent_alone_equals_the_one_node_simulator(tmp_path: Path) -> None:
    # Log, checkpoint and evaluation periods that do not divide each other: the step batches end at
    # every one of them.
    flags = [*EQUIVALENCE_FLAGS, "--eval-every", "20"]
    agent_flags = ["--log-every", "7", "--checkpoint-every", "13", *ALONE]
    processes, _ = start_agents(tmp_path / "agent", 1, [*flags, *agent_flags])
    assert main(["simulate", *flags, "--nodes", "1", "--out", str(tmp_path / "sim")]) == 0
    assert wait_all(processes, timeout=90) == [0]
    agent = load_checkpoint(tmp_path / "agent" / "node-0" / "final.safetensors")
    simulated = load_checkpoint(tmp_path / "sim" / "node-0" / "final.safetensors")
    assert agent.iteration == simulated.iteration == 50
    for name, tensor in simulated.parameters.items():
        assert torch.equal(tensor, agent.parameters[name]), name
    for name, tensor in simulated.optimizer.items():
        assert torch.equal(tensor, agent.optimizer[name]), name
    assert torch.equal(agent.rng_state, simulated.rng_state)
    logged = [e["iteration"] for e in events_named(tmp_path / "agent" / "node-0" / "agent.log", "iteration")]
    assert logged == [7, 14, 21, 28, 35, 42, 49, 50]


def test_agent_alone_stops_promptly_on_sigterm(tmp_path: Path) -> None:
    flags = ["--dataset", "ring8", "--iterations", "1000000", "--eval-every", "1000000", "--log-every", "5",
             "--checkpoint-every", "1000000", *ALONE]  # fmt: skip
    processes, _ = start_agents(tmp_path, 1, flags)
    assert wait_for_event(tmp_path / "node-0" / "agent.log", lambda e: e.get("iteration", 0) >= 20, 60)
    stop_sent = time.monotonic()
    processes[0].send_signal(signal.SIGTERM)
    assert wait_all(processes, timeout=30) == [0]
    assert time.monotonic() - stop_sent < 10
    stopped = load_checkpoint(tmp_path / "node-0" / "checkpoint.safetensors")
    assert stopped.iteration >= 20
    events = log_events(tmp_path / "node-0" / "agent.log")
    assert any(e.get("event") == "agent stopped" and e.get("iterations") == stopped.iteration for e in events)
