"""wire_dtype float32-auto (the default) on real links: agents on hosts whose links are shaped to
20 Mbit/s code their vectors (against the last vector sent on each edge: fewer bytes per iteration) and
still compute float32's run bit for bit; the decision itself is tested in tests/test_wire_choice.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli import main
from tests.agents import EQUIVALENCE_FLAGS, assert_bit_for_bit, log_events, wait_all
from tests.netns import NetnsCluster

pytest_plugins = ["tests.netns"]
pytestmark = [pytest.mark.multihost, pytest.mark.slow]

PORT = 7070
NODES = 3
# The equivalence run, shortened: 25 iterations of one gossip round (two vectors out per iteration).
FLAGS = [*EQUIVALENCE_FLAGS, "--rounds", "1", "--iterations", "25", "--eval-every", "25"]


@pytest.mark.timeout(150)
def test_agents_code_on_a_slow_link_and_keep_float32_bit_for_bit(netns_cluster, tmp_path: Path) -> None:
    cluster: NetnsCluster = netns_cluster(NODES, subnet="10.79.0.0/24")
    addresses = [f"{host.address}:{PORT}" for host in cluster.hosts]
    processes = []
    for i, host in enumerate(cluster.hosts):
        cluster.set_rate(host, 20)
        out = tmp_path / "agents" / f"node-{i}"
        out.mkdir(parents=True)
        argv = [
            sys.executable, "-m", "agent.cli", "--listen", addresses[i], "--node-id", f"node-{i}",
            "--peers", ",".join(a for j, a in enumerate(addresses) if j != i), "--insecure",
            "--out", str(out), "--log-format", "json", "--startup-timeout", "60", *FLAGS,
        ]  # no --wire-dtype: float32-auto is the default  # fmt: skip
        with (out / "agent.log").open("w") as log:
            env = os.environ | {"PYTHONUNBUFFERED": "1"}
            processes.append(cluster.popen(host, argv, stdout=log, stderr=subprocess.STDOUT, env=env))
    assert main(["simulate", *FLAGS, "--nodes", str(NODES), "--out", str(tmp_path / "sim")]) == 0
    assert wait_all(processes, timeout=120) == [0] * NODES
    for i in range(NODES):
        agent, _ = assert_bit_for_bit(tmp_path / "agents", tmp_path / "sim", i, 25)
        events = log_events(tmp_path / "agents" / f"node-{i}" / "agent.log")
        switched = [e for e in events if e.get("event") == "float32-auto: coding on"]
        assert switched, f"node {i} never coded at 20 Mbit/s"
        assert switched[0]["push_rate_mbit_s"] < 30, switched[0]
        # Each iteration pushes x to both ring neighbours: 2 vectors.
        plain = 2 * 4 * sum(tensor.numel() for tensor in agent.parameters.values())
        sent = [e["bytes_sent"] for e in events if e.get("event") == "iteration" and e["iteration"] > 5]
        assert sent and max(sent) < 0.75 * plain, f"node {i} sent {max(sent)} bytes an iteration of {plain}"
