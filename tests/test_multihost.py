"""Agents on separate network namespaces joined by a bridge: discovery by mDNS alone, a joiner, a
crash, and static/DNS peers with multicast off. Needs root (skipped otherwise); always cleans up."""

from __future__ import annotations

import itertools
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from agent.checkpoint import load_checkpoint
from tests.agents import events_named, wait_for_event
from tests.pki import Pki

if TYPE_CHECKING:
    from tests.netns import NetnsCluster

pytest_plugins = ["tests.netns"]
pytestmark = [pytest.mark.multihost, pytest.mark.slow, pytest.mark.timeout(240)]

PORT = 5000
TRAINING = ["--dataset", "ring8", "--eval-samples", "200", "--log-every", "5", "--round-timeout", "3"]


def timestamp(event: dict) -> float:
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def start_agent(cluster: NetnsCluster, host: str, out: Path, *flags: str) -> subprocess.Popen:
    address = cluster.host(host).address
    out.mkdir(parents=True, exist_ok=True)
    argv = [
        sys.executable, "-m", "agent.cli", "--listen", f"0.0.0.0:{PORT}", "--advertise", f"{address}:{PORT}",
        "--node-id", f"node-{host}", "--out", str(out), "--log-format", "json", *TRAINING, *flags,
        *Pki.at(out.parent / "pki").flags(f"node-{host}"),
    ]  # fmt: skip
    return cluster.popen(host, argv, stdout=(out / "agent.log").open("w"), stderr=subprocess.STDOUT)


def wait_codes(processes: list[subprocess.Popen], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    return [p.wait(timeout=max(0.1, deadline - time.monotonic())) for p in processes]


def full_view_at(log: Path, size: int) -> float | None:
    views = [e for e in events_named(log, "membership view") if len(e["members"]) == size]
    return timestamp(views[0]) if views else None


def test_agents_find_each_other_by_mdns_alone_and_train(netns_cluster, tmp_path: Path) -> None:
    cluster: NetnsCluster = netns_cluster(4)
    started = time.time()
    flags = ["--iterations", "150", "--eval-every", "150", "--min-peers", "3", "--settle", "1"]
    processes = [start_agent(cluster, f"h{i}", tmp_path / f"h{i}", *flags) for i in range(4)]
    assert wait_codes(processes, 120) == [0, 0, 0, 0]
    for i in range(4):
        log = tmp_path / f"h{i}" / "agent.log"
        full = full_view_at(log, 4)
        assert full is not None, f"h{i} never saw all four members"
        print(f"h{i}: full membership {full - started:.2f} s after start")
        assert load_checkpoint(tmp_path / f"h{i}" / "final.safetensors").iteration == 150
        late = [e for e in events_named(log, "iteration") if e["iteration"] >= 100]
        assert late and all(len(e["neighbours"]) == 2 for e in late), "a ring of 4 mixes with 2 neighbours"


def test_a_fifth_agent_joins_mid_run(netns_cluster, tmp_path: Path) -> None:
    cluster: NetnsCluster = netns_cluster(5)
    common = ["--iterations", "500", "--eval-every", "500", "--settle", "1"]
    founders = [
        start_agent(cluster, f"h{i}", tmp_path / f"h{i}", *common, "--min-peers", "3") for i in range(4)
    ]
    assert wait_for_event(tmp_path / "h0" / "agent.log", lambda e: e.get("iteration", 0) >= 60, 90)
    joiner = start_agent(cluster, "h4", tmp_path / "h4", *common, "--min-peers", "1")
    assert wait_codes([*founders, joiner], 180) == [0] * 5
    fetched = events_named(tmp_path / "h4" / "agent.log", "fetched state")
    assert fetched and fetched[0]["iteration"] >= 60
    for i in range(4):
        assert full_view_at(tmp_path / f"h{i}" / "agent.log", 5) is not None, f"h{i} never took the joiner in"
    assert load_checkpoint(tmp_path / "h4" / "final.safetensors").iteration == 500


def test_survivors_continue_after_an_agent_is_killed(netns_cluster, tmp_path: Path) -> None:
    cluster: NetnsCluster = netns_cluster(4)
    common = ["--iterations", "400", "--eval-every", "400", "--settle", "1", "--min-peers", "3"]
    common += ["--log-every", "1"]
    processes = [start_agent(cluster, f"h{i}", tmp_path / f"h{i}", *common) for i in range(4)]
    assert wait_for_event(tmp_path / "h1" / "agent.log", lambda e: e.get("iteration", 0) >= 80, 90)
    killed_at = time.time()
    processes[1].send_signal(signal.SIGKILL)
    assert wait_codes([p for i, p in enumerate(processes) if i != 1], 150) == [0, 0, 0]
    for i in (0, 2, 3):
        log = tmp_path / f"h{i}" / "agent.log"
        assert load_checkpoint(tmp_path / f"h{i}" / "final.safetensors").iteration == 400
        assert full_view_at(log, 3) is not None, f"h{i} never dropped the dead node from its view"
        times = [timestamp(e) for e in events_named(log, "iteration")]
        before = max(t for t in times if t <= killed_at)
        after = [t for t in times if t > killed_at]
        # The longest pause in iterating around the kill: how long survivors took to carry on.
        window = [before, *after[:50]]
        stall = max(b - a for a, b in itertools.pairwise(window))
        print(f"h{i}: longest pause after the kill {stall:.3f} s")
        assert stall < 10


@pytest.mark.parametrize("mode", ["static", "dns"])
def test_static_peers_and_dns_names_work_without_multicast(netns_cluster, tmp_path: Path, mode: str) -> None:
    cluster: NetnsCluster = netns_cluster(3)
    cluster.multicast(False)
    addresses = [h.address for h in cluster.hosts]
    processes = []
    for i, host in enumerate(cluster.hosts):
        if mode == "static":
            discovery = ["--peers", ",".join(f"{a}:{PORT}" for j, a in enumerate(addresses) if j != i)]
        else:
            cluster.set_names(host.name, {"dpgan": addresses})
            discovery = ["--dns-name", f"dpgan:{PORT}", "--dns-interval", "0.5", "--min-peers", "2"]
            discovery += ["--settle", "1"]
        flags = ["--iterations", "60", "--eval-every", "60", *discovery]
        processes.append(start_agent(cluster, host.name, tmp_path / host.name, *flags))
    assert wait_codes(processes, 120) == [0, 0, 0]
    for host in cluster.hosts:
        assert full_view_at(tmp_path / host.name / "agent.log", 3) is not None


def test_two_runs_on_one_multicast_network_never_mix(netns_cluster, tmp_path: Path) -> None:
    """Two teams start the same configuration on one LAN, certificates from one CA, different run
    ids: each pair finds only its own run by mDNS (the other run's records are ignored, logged once)
    and trains as a 2-node cluster to the end."""
    cluster = netns_cluster(4)
    common = ["--iterations", "60", "--view-period", "5", "--min-peers", "1", "--settle", "3"]
    runs = {"h0": "team-a", "h1": "team-a", "h2": "team-b", "h3": "team-b"}
    processes = {
        host: start_agent(cluster, host, tmp_path / host, *common, "--run-id", run)
        for host, run in runs.items()
    }
    codes = {host: process.wait(timeout=180) for host, process in processes.items()}
    assert codes == dict.fromkeys(runs, 0)
    for host, run in runs.items():
        log = tmp_path / host / "agent.log"
        own = {f"node-{other}" for other, other_run in runs.items() if other_run == run}
        views = [set(event["members"]) for event in events_named(log, "membership view")]
        assert views and all(view == own for view in views), (host, views)
        ignored = {event["peer"] for event in events_named(log, "ignoring an agent of another run")}
        assert ignored == {f"node-{other}" for other, other_run in runs.items() if other_run != run}
        assert load_checkpoint(tmp_path / host / "final.safetensors").iteration == 60
