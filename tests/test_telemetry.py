"""--metrics-port: a real agent serves Prometheus metrics while it trains and after it finished; the text
parses with prometheus-client's own parser and the values agree with the agent's files."""

from __future__ import annotations

import json
import signal
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.agents import start_agents, wait_all, wait_for_event

pytestmark = pytest.mark.timeout(120)

FLAGS = [
    "--dataset", "ring8", "--iterations", "40", "--eval-every", "20", "--eval-samples", "200",
    "--log-every", "5", "--checkpoint-every", "10", "--discovery", "none", "--min-peers", "0",
    "--metrics-port", "0", "--when-finished", "serve",
]  # fmt: skip


def scrape(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    matching = [v for sample_labels, v in samples[name] if labels.items() <= sample_labels.items()]
    assert len(matching) == 1, (name, labels, samples.get(name))
    return matching[0]


def test_a_finished_agent_reports_its_run_on_the_metrics_endpoint(tmp_path: Path) -> None:
    processes, _ = start_agents(tmp_path, 1, FLAGS)
    log = tmp_path / "node-0" / "agent.log"
    try:
        announced = wait_for_event(log, lambda e: e.get("event") == "metrics", 60)
        assert announced is not None
        url = announced["url"]
        serving = wait_for_event(log, lambda e: e.get("event", "").startswith("run finished; serving"), 90)
        assert serving is not None
        samples = scrape(url)
        node = {"node": "node-0"}
        assert value(samples, "dpgan_iteration", **node) == 40
        assert value(samples, "dpgan_iterations_target", **node) == 40
        assert value(samples, "dpgan_finished", **node) == 1 and value(samples, "dpgan_training", **node) == 0
        assert value(samples, "dpgan_view_members", **node) == 1
        assert value(samples, "dpgan_iterations_alone_total", **node) == 40  # no neighbours at all
        assert value(samples, "dpgan_compute_seconds_total", **node) > 0
        assert value(samples, "dpgan_checkpoint_age_seconds", **node) >= 0
        run = value(samples, "dpgan_info", **node, version="0.1.0")
        assert run == 1
        final = json.loads((tmp_path / "node-0" / "summary.json").read_text())["final"]
        for metric, number in final["quality"].items():
            assert value(samples, "dpgan_quality", **node, metric=metric) == pytest.approx(number)
        assert value(samples, "dpgan_loss", **node, player="generator") == pytest.approx(final["loss_g"])
        # float32-auto (the default wire) with no neighbour: nothing sent, nothing measured.
        assert value(samples, "dpgan_wire_coding", **node) == 0
        assert "dpgan_push_rate_bytes_per_second" not in samples
        assert sum(v for _, v in samples["dpgan_wire_vectors_total"]) == 0
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        assert wait_all(processes, timeout=20) == [0]
    time.sleep(0.2)
    with pytest.raises(OSError):
        scrape(url)  # the endpoint went away with the agent


def test_float32_auto_reports_its_choice_on_the_metrics_endpoint(tmp_path: Path) -> None:
    """Two agents on the default wire (float32-auto): every vector sent is counted by the wire dtype
    chosen, beside the push rate the choice was made on."""
    processes, _ = start_agents(tmp_path, 2, [*FLAGS, "--min-peers", "1"])
    log = tmp_path / "node-0" / "agent.log"
    try:
        announced = wait_for_event(log, lambda e: e.get("event") == "metrics", 60)
        assert announced is not None
        serving = wait_for_event(log, lambda e: e.get("event", "").startswith("run finished; serving"), 90)
        assert serving is not None
        samples = scrape(announced["url"])
        node = {"node": "node-0"}
        by_dtype = {labels["wire_dtype"]: v for labels, v in samples["dpgan_wire_vectors_total"]}
        assert set(by_dtype) == {"float32", "float32-huffman", "float32-delta"}
        assert 30 <= sum(by_dtype.values()) <= 40  # one neighbour, one vector per round: 40 rounds
        assert value(samples, "dpgan_push_rate_bytes_per_second", **node) > 0
        assert value(samples, "dpgan_wire_coding", **node) in (0, 1)
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        assert wait_all(processes, timeout=20) == [0, 0]


def test_pushes_over_the_data_plane_are_counted_per_peer(tmp_path: Path) -> None:
    """Two agents with --data-port: the pushes each peer's data plane carried, beside the bytes sent."""
    processes, _ = start_agents(tmp_path, 2, [*FLAGS, "--min-peers", "1", "--data-port", "0"])
    log = tmp_path / "node-0" / "agent.log"
    try:
        announced = wait_for_event(log, lambda e: e.get("event") == "metrics", 60)
        assert announced is not None
        assert wait_for_event(log, lambda e: e.get("event") == "pushing over the data plane", 90)
        serving = wait_for_event(log, lambda e: e.get("event", "").startswith("run finished; serving"), 90)
        assert serving is not None
        samples = scrape(announced["url"])
        (labels, pushes), *others = samples["dpgan_data_plane_pushes_total"]
        assert not others and labels["node"] == "node-0" and labels["peer"] == "node-1"
        assert 30 <= pushes <= 40  # the first push may go over gRPC while the data plane connects
        assert value(samples, "dpgan_sent_bytes_total", node="node-0", peer="node-1") > 0
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        assert wait_all(processes, timeout=20) == [0, 0]
