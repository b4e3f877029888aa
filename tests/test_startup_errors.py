"""Start-up failures an operator meets, as real agent processes: each ends quickly in one line
`dpgan-agent: error: ...` naming the peer or the port and the reason, with a non-zero exit and no
traceback."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from agent.node.local import free_ports
from tests.agents import start_agents, wait_all

if TYPE_CHECKING:
    from tests.netns import NetnsCluster

pytest_plugins = ["tests.netns"]
pytestmark = pytest.mark.timeout(120)

TINY = ["--dataset", "ring8", "--iterations", "20", "--eval-samples", "200", "--log-format", "json"]


def run_agent(argv: list[str], timeout: float) -> tuple[int, str, float]:
    started = time.monotonic()
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "agent.cli", *argv], capture_output=True, text=True, timeout=timeout, env=env
    )
    return done.returncode, done.stdout + done.stderr, time.monotonic() - started


def test_a_missing_peer_is_named_with_the_reason_while_waiting_and_in_the_error(tmp_path: Path) -> None:
    own, missing = (f"127.0.0.1:{port}" for port in free_ports(2))
    argv = ["--listen", own, "--node-id", "a", "--peers", missing, "--startup-timeout", "8", "--out",
            str(tmp_path / "a"), *TINY]  # fmt: skip
    code, output, elapsed = run_agent(argv, 60)
    assert code != 0 and "Traceback" not in output
    error = [line for line in output.splitlines() if line.startswith("dpgan-agent: error:")]
    assert len(error) == 1, output
    assert f"only 0 of 1 peers answered within 8 s; not answering: {missing}: connection refused" in error[0]
    waiting = [line for line in output.splitlines() if '"waiting for peers"' in line]
    assert waiting and missing in waiting[0], output  # named while waiting, not only at the end
    assert elapsed < 20


def test_a_refused_handshake_fails_fast_instead_of_waiting_out_the_timeout(tmp_path: Path) -> None:
    flags = [*TINY, "--startup-timeout", "60", "--discovery", "none"]
    processes, _ = start_agents(tmp_path, 2, flags, extra={1: ["--lr", "0.5"]})
    started = time.monotonic()
    codes = wait_all(processes, timeout=40)
    assert all(code != 0 for code in codes)
    assert time.monotonic() - started < 30  # not the 60 s startup timeout
    log = (tmp_path / "node-0" / "agent.log").read_text()
    assert "refused this node, so 1 can never answer" in log and "lr (" in log


@pytest.mark.multihost
def test_mdns_port_held_exclusively_ends_in_one_line(netns_cluster, tmp_path: Path) -> None:
    """Another mDNS stack owns UDP 5353 exclusively (avahi with disallow-other-stacks=yes): the agent
    says so and how to go on, exits non-zero, shuts its gRPC server down cleanly."""
    cluster: NetnsCluster = netns_cluster(1)
    host = cluster.hosts[0]
    holder = cluster.popen(
        host.name,
        [sys.executable, "-c", "import socket, time; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
         "s.bind(('0.0.0.0', 5353)); print('bound', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout is not None and holder.stdout.readline().strip() == "bound"
    argv = [sys.executable, "-m", "agent.cli", "--listen", f"{host.address}:5000", "--node-id", "a",
            "--discovery", "mdns", "--insecure", "--out", str(tmp_path / "a"), *TINY]  # fmt: skip
    agent = cluster.popen(host.name, argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output, _ = agent.communicate(timeout=60)
    assert agent.returncode != 0
    assert (
        "Traceback" not in output
        and "was never awaited" not in output
        and "Event loop is closed" not in output
    )
    error = [line for line in output.splitlines() if line.startswith("dpgan-agent: error:")]
    assert len(error) == 1 and "port 5353 is held exclusively by another mDNS stack" in error[0], output
    holder.kill()
