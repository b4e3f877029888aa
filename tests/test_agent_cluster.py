"""Real agent processes over real gRPC on loopback: equivalence with the simulator, failures, signals."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from agent.checkpoint import load_checkpoint
from agent.cli import main
from agent.core.compression import Compressor
from tests.agents import (
    EQUIVALENCE_FLAGS,
    assert_bit_for_bit,
    events_named,
    free_ports,
    log_events,
    start_agents,
    wait_all,
    wait_for_event,
)

pytestmark = pytest.mark.timeout(180)


def test_four_agents_reproduce_the_simulator_bit_for_bit(tmp_path: Path) -> None:
    processes, _ = start_agents(tmp_path / "agents", 4, EQUIVALENCE_FLAGS)
    assert main(["simulate", *EQUIVALENCE_FLAGS, "--nodes", "4", "--out", str(tmp_path / "sim")]) == 0
    assert wait_all(processes, timeout=150) == [0, 0, 0, 0]
    worst = 0.0
    for i in range(4):
        agent = load_checkpoint(tmp_path / "agents" / f"node-{i}" / "final.safetensors")
        simulated = load_checkpoint(tmp_path / "sim" / f"node-{i}" / "final.safetensors")
        assert agent.iteration == simulated.iteration == 50
        assert agent.parameters.keys() == simulated.parameters.keys()
        for name, tensor in simulated.parameters.items():
            worst = max(worst, float((tensor - agent.parameters[name]).abs().max()))
        for name, tensor in simulated.optimizer.items():
            worst = max(worst, float((tensor - agent.optimizer[name]).abs().max()))
        assert torch.equal(agent.rng_state, simulated.rng_state)
    assert worst <= 1e-6, f"agents differ from the simulator by {worst}"


@pytest.mark.timeout(90)
def test_agents_on_a_bfloat16_wire_reproduce_the_simulator_bit_for_bit(tmp_path: Path) -> None:
    """Agents mix their own x exactly and their neighbours' as rounded on the wire; so does the simulator."""
    flags = [*EQUIVALENCE_FLAGS, "--wire-dtype", "bfloat16"]
    processes, _ = start_agents(tmp_path / "agents", 4, flags)
    assert main(["simulate", *flags, "--nodes", "4", "--out", str(tmp_path / "sim")]) == 0
    assert main(["simulate", *EQUIVALENCE_FLAGS, "--nodes", "4", "--out", str(tmp_path / "float32")]) == 0
    assert wait_all(processes, timeout=75) == [0, 0, 0, 0]
    for i in range(4):
        agent = load_checkpoint(tmp_path / "agents" / f"node-{i}" / "final.safetensors")
        simulated = load_checkpoint(tmp_path / "sim" / f"node-{i}" / "final.safetensors")
        exact = load_checkpoint(tmp_path / "float32" / f"node-{i}" / "final.safetensors")
        assert agent.iteration == simulated.iteration == 50
        for name, tensor in simulated.parameters.items():
            assert torch.equal(tensor, agent.parameters[name]), f"node {i}: {name} differs"
            assert not torch.equal(tensor, exact.parameters[name]), f"node {i}: {name} ignores the wire"
        for name, tensor in simulated.optimizer.items():
            assert torch.equal(tensor, agent.optimizer[name]), f"node {i}: optimizer {name} differs"
        assert torch.equal(agent.rng_state, simulated.rng_state)


@pytest.mark.timeout(90)
def test_agents_on_coded_float32_wires_reproduce_float32_bit_for_bit_with_fewer_bytes(
    tmp_path: Path,
) -> None:
    """float32-huffman is float32 with its exponent bytes coded, float32-delta float32 coded against the
    last vector sent on the edge: the same run, bit for bit, in fewer bytes. The float32 wires mix in one
    cluster: node 0 sends plain float32, node 1 chooses (float32-auto)."""
    wires = {0: "float32", 1: "float32-auto", 2: "float32-huffman", 3: "float32-delta"}
    extra = {i: ["--wire-dtype", wire] for i, wire in wires.items()}
    processes, _ = start_agents(tmp_path / "agents", 4, EQUIVALENCE_FLAGS, extra)
    assert main(["simulate", *EQUIVALENCE_FLAGS, "--nodes", "4", "--out", str(tmp_path / "sim")]) == 0
    assert wait_all(processes, timeout=75) == [0, 0, 0, 0]
    for i in range(4):
        agent, simulated = assert_bit_for_bit(tmp_path / "agents", tmp_path / "sim", i, 50)
        assert torch.equal(agent.rng_state, simulated.rng_state)
        # Each iteration pushes x to both ring neighbours in each of the 2 rounds: 4 vectors.
        plain = 4 * 4 * sum(tensor.numel() for tensor in agent.parameters.values())
        sent = [e["bytes_sent"] for e in log_events(tmp_path / "agents" / f"node-{i}" / "agent.log")
                if e.get("event") == "iteration" and e.get("iteration", 0) > 1]  # fmt: skip
        if wires[i] == "float32-huffman":
            assert sent and max(sent) < 0.9 * plain, (
                f"node {i} sent {max(sent)} bytes an iteration of {plain}"
            )
        elif wires[i] == "float32-delta":
            assert sent and max(sent) < 0.75 * plain, (
                f"node {i} sent {max(sent)} bytes an iteration of {plain}"
            )
        elif wires[i] == "float32":
            assert sent and min(sent) >= plain, f"node {i} sent {min(sent)} bytes an iteration of {plain}"


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("compression", "topology", "extra"),
    [
        ("topk", "ring", []),
        ("int8", "one_peer_exponential", ["--overlap"]),
        ("randk", "one_peer_exponential", []),
    ],
)
def test_agents_with_compressed_gossip_reproduce_the_simulator_bit_for_bit(
    tmp_path: Path, compression: str, topology: str, extra: list[str]
) -> None:
    """CHOCO per edge (agent.core.choco): every message a reset or a compressed difference, the same bits
    in the simulator and over gRPC; the payload is what the compressor promises. With --overlap the
    gradient runs on its own thread during the gossip rounds, taken at the node's own point."""
    flags = [*EQUIVALENCE_FLAGS, "--compression", compression, "--topology", topology, *extra]
    processes, _ = start_agents(tmp_path / "agents", 4, flags)
    assert main(["simulate", *flags, "--nodes", "4", "--out", str(tmp_path / "sim")]) == 0
    assert wait_all(processes, timeout=100) == [0, 0, 0, 0]
    for i in range(4):
        assert_bit_for_bit(tmp_path / "agents", tmp_path / "sim", i, 50)
    summary = json.loads((tmp_path / "agents" / "node-0" / "summary.json").read_text())
    parameters = summary["parameters"]
    sent = summary["bytes_sent"]
    pushes = 50 * 2 * (2 if topology == "ring" else 1)  # iterations x rounds x neighbours per round
    resets = 2  # two neighbours (ring, or one-peer's period of 2): the first message on each edge is x
    compressed = Compressor(compression, 0.01).payload_bytes(parameters)
    assert sent < 1.1 * (resets * 4 * parameters + (pushes - resets) * compressed) + 2000 * pushes
    assert sent < 0.35 * pushes * 4 * parameters  # float32 gossip would send 4 bytes per parameter
    # Every exchange is symmetric: what a node read is what its neighbours sent it (counted once each,
    # even when a neighbour's push arrives before this node encodes its own).
    received = summary["bytes_received"]
    assert abs(received - sent) <= 0.02 * sent, (received, sent)


@pytest.mark.timeout(90)
def test_diverging_agents_stop_with_status_1_naming_the_iteration(tmp_path: Path) -> None:
    flags = ["--dataset", "ring8", "--loss", "wgan_gp", "--lr", "5", "--iterations", "200",
             "--eval-every", "200", "--eval-samples", "50", "--log-every", "1"]  # fmt: skip
    processes, _ = start_agents(tmp_path, 2, flags)
    assert wait_all(processes, timeout=75) == [1, 1]
    for i in range(2):
        text = (tmp_path / f"node-{i}" / "agent.log").read_text()
        assert "training diverged at iteration" in text and f"the parameters of node node-{i}" in text
        assert not (tmp_path / f"node-{i}" / "final.safetensors").exists()


def test_killed_agent_does_not_stop_the_others(tmp_path: Path) -> None:
    flags = ["--dataset", "ring8", "--iterations", "400", "--eval-every", "400", "--eval-samples", "200",
             "--round-timeout", "2", "--log-every", "10"]  # fmt: skip
    processes, _ = start_agents(tmp_path, 4, flags)
    started = wait_for_event(tmp_path / "node-2" / "agent.log", lambda e: e.get("event") == "iteration", 60)
    assert started is not None, "training never started"
    processes[2].send_signal(signal.SIGKILL)
    codes = wait_all([p for i, p in enumerate(processes) if i != 2], timeout=120)
    assert codes == [0, 0, 0]
    for i in (0, 1, 3):
        assert load_checkpoint(tmp_path / f"node-{i}" / "final.safetensors").iteration == 400
    down = [e for i in (1, 3) for e in log_events(tmp_path / f"node-{i}" / "agent.log")
            if e.get("event", "").startswith("leaving peer out")]  # fmt: skip
    assert down and all(e["peer"] == "node-2" and e["reason"] for e in down)


def test_peer_with_a_different_config_is_refused_at_the_handshake(tmp_path: Path) -> None:
    flags = ["--dataset", "ring8", "--iterations", "20", "--eval-every", "20", "--eval-samples", "100"]
    processes, _ = start_agents(
        tmp_path,
        2,
        flags,
        extra={0: ["--startup-timeout", "5"], 1: ["--lr", "0.5", "--startup-timeout", "5"]},
    )
    codes = wait_all(processes, timeout=90)
    assert codes[0] != 0 and codes[1] != 0
    text = (tmp_path / "node-0" / "agent.log").read_text() + (tmp_path / "node-1" / "agent.log").read_text()
    assert "config_hash differs" in text and "lr" in text


def test_sigterm_checkpoints_and_resume_continues(tmp_path: Path) -> None:
    flags = ["--dataset", "ring8", "--iterations", "100000", "--eval-every", "100000", "--log-every", "5",
             "--checkpoint-every", "1000"]  # fmt: skip
    processes, _ = start_agents(tmp_path, 2, flags)
    assert wait_for_event(tmp_path / "node-0" / "agent.log", lambda e: e.get("iteration", 0) >= 20, 60)
    stop_sent = time.monotonic()
    for process in processes:
        process.send_signal(signal.SIGTERM)
    assert wait_all(processes, timeout=30) == [0, 0]
    assert time.monotonic() - stop_sent < 15
    stopped = [load_checkpoint(tmp_path / f"node-{i}" / "checkpoint.safetensors") for i in range(2)]
    assert all(c.iteration >= 20 for c in stopped)
    assert not (tmp_path / "node-0" / "final.safetensors").exists()
    # Resume both to a finite goal: they pick up from where they stopped (the same iteration in a pair,
    # since a node cannot run a round ahead of its only neighbour's).
    goal = max(c.iteration for c in stopped) + 10
    resume = ["--dataset", "ring8", "--iterations", str(goal), "--eval-every", str(goal), "--resume"]
    processes, _ = start_agents_again(tmp_path, processes, resume)
    assert wait_all(processes, timeout=90) == [0, 0]
    for i in range(2):
        events = log_events(tmp_path / f"node-{i}" / "agent.log")
        resumed = [e for e in events if e.get("event") == "resumed from checkpoint"]
        assert resumed and resumed[0]["iteration"] == stopped[i].iteration
        assert load_checkpoint(tmp_path / f"node-{i}" / "final.safetensors").iteration == goal


def start_agents_again(tmp_path: Path, _old, flags: list[str]):
    return start_agents(tmp_path, 2, flags)


def test_late_joiner_fetches_state_and_is_integrated(tmp_path: Path) -> None:
    flags = ["--dataset", "ring8", "--iterations", "600", "--eval-every", "600", "--eval-samples", "200",
             "--log-every", "10", "--round-timeout", "3"]  # fmt: skip
    founders, addresses = start_agents(tmp_path, 3, flags)
    assert wait_for_event(tmp_path / "node-0" / "agent.log", lambda e: e.get("iteration", 0) >= 50, 60)
    joiner_dir = tmp_path / "node-3"
    joiner_dir.mkdir()
    joiner_port = free_ports(1)[0]
    joiner = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "--listen", f"127.0.0.1:{joiner_port}", "--node-id", "node-3",
         "--peers", ",".join(addresses), "--out", str(joiner_dir), "--log-format", "json", *flags],
        stdout=(joiner_dir / "agent.log").open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    assert wait_all([*founders, joiner], timeout=150) == [0, 0, 0, 0]
    joined = events_named(joiner_dir / "agent.log", "fetched state")
    assert joined and joined[0]["iteration"] >= 50, "the joiner starts from the cluster's state, not from 0"
    assert load_checkpoint(joiner_dir / "final.safetensors").iteration == 600
    for i in range(3):
        views = events_named(tmp_path / f"node-{i}" / "agent.log", "membership view")
        assert any(e["joined"] == ["node-3"] and len(e["members"]) == 4 for e in views), f"node-{i} missed it"
    # Once in, the joiner mixes with its neighbours: its late iterations name them as participants.
    late = [e for e in events_named(joiner_dir / "agent.log", "iteration") if e["iteration"] > 500]
    assert late and all(e["neighbours"] for e in late)


def test_resume_from_checkpoints_at_different_iterations_reconciles(tmp_path: Path) -> None:
    """A node whose checkpoint is older (copied back from an earlier stop) catches up with the node that
    went further, by fetching its state, instead of timing out; both finish."""
    base = ["--dataset", "ring8", "--eval-samples", "200", "--log-every", "10", "--round-timeout", "3"]
    processes, _ = start_agents(tmp_path, 2, [*base, "--iterations", "30", "--eval-every", "30"])
    assert wait_all(processes, timeout=90) == [0, 0]
    older = (tmp_path / "node-0" / "checkpoint.safetensors").read_bytes()
    processes, _ = start_agents(tmp_path, 2, [*base, "--iterations", "40", "--eval-every", "40", "--resume"])
    assert wait_all(processes, timeout=90) == [0, 0]
    (tmp_path / "node-0" / "checkpoint.safetensors").write_bytes(older)  # node-0 at 30, node-1 at 40
    assert [load_checkpoint(tmp_path / f"node-{i}" / "checkpoint.safetensors").iteration for i in (0, 1)] == [
        30,
        40,
    ]
    processes, _ = start_agents(
        tmp_path, 2, [*base, "--iterations", "400", "--eval-every", "400", "--resume"]
    )
    assert wait_all(processes, timeout=90) == [0, 0]
    caught_up = events_named(tmp_path / "node-0" / "agent.log", "catching up with founders")
    assert caught_up and caught_up[-1]["at_iteration"] == 40
    for i in (0, 1):
        assert load_checkpoint(tmp_path / f"node-{i}" / "final.safetensors").iteration == 400
    # From the catch-up on, both trained in one view: node-0 mixed with node-1 in its last progress line.
    last = [e for e in log_events(tmp_path / "node-0" / "agent.log") if e.get("event") == "iteration"][-1]
    assert last["neighbours"] == ["node-1"] and last["iterations_alone"] == 0
