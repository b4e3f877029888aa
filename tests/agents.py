"""Helpers to run real dpgan-agent processes on loopback in tests."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from agent.checkpoint import Checkpoint, load_checkpoint
from agent.node.local import free_ports

# The cluster-wide keys of the equivalence configuration (shared by the agents and the simulator).
EQUIVALENCE_FLAGS = [
    "--dataset", "ring8", "--topology", "ring", "--rounds", "2", "--iterations", "50",
    "--eval-every", "50", "--eval-samples", "200", "--seed", "7",
]  # fmt: skip


def start_agents(tmp_path: Path, count: int, flags: list[str], extra: dict[int, list[str]] | None = None):
    ports = free_ports(count)
    addresses = [f"127.0.0.1:{p}" for p in ports]
    processes = []
    for i, address in enumerate(addresses):
        out = tmp_path / f"node-{i}"
        out.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable, "-m", "agent.cli", "--listen", address, "--node-id", f"node-{i}",
            "--peers", ",".join(a for j, a in enumerate(addresses) if j != i),
            "--out", str(out), "--log-format", "json", "--startup-timeout", "30", *flags,
            *(extra or {}).get(i, []),
        ]  # fmt: skip
        log = (out / "agent.log").open("w")
        env = os.environ | {"PYTHONUNBUFFERED": "1"}
        processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env))
    return processes, addresses


def wait_all(processes, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    codes = []
    try:
        for process in processes:
            codes.append(process.wait(timeout=max(0.1, deadline - time.monotonic())))
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                process.wait()
    return codes


def log_events(path: Path) -> list[dict]:
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events


def wait_for_event(path: Path, predicate, timeout: float) -> dict | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            for event in log_events(path):
                if predicate(event):
                    return event
        time.sleep(0.1)
    return None


def events_named(path: Path, name: str) -> list[dict]:
    return [event for event in log_events(path) if event.get("event") == name]


class CountingListener:
    """A TCP server that accepts and at once closes every connection ("not a dpgan server"), counting."""

    def __init__(self) -> None:
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.accepted: list[float] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.socket.accept()
            except OSError:
                return
            self.accepted.append(time.time())
            connection.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.socket.shutdown(socket.SHUT_RDWR)
        self.socket.close()


def assert_bit_for_bit(
    agents: Path, simulated: Path, node: int, iteration: int
) -> tuple[Checkpoint, Checkpoint]:
    """Node ``node``'s final checkpoint under ``agents`` equals the simulator's under ``simulated``, bit for
    bit: the iteration, every parameter and every optimizer tensor. Returns (agent's, simulator's)."""
    import torch

    agent = load_checkpoint(agents / f"node-{node}" / "final.safetensors")
    sim = load_checkpoint(simulated / f"node-{node}" / "final.safetensors")
    assert agent.iteration == sim.iteration == iteration
    for name, tensor in sim.parameters.items():
        assert torch.equal(tensor, agent.parameters[name]), f"node {node}: {name} differs"
    for name, tensor in sim.optimizer.items():
        assert torch.equal(tensor, agent.optimizer[name]), f"node {node}: optimizer {name} differs"
    return agent, sim
