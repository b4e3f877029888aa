"""--when-finished: a finished agent exits 0 (exit, the default) or stays up (serve): healthy, reporting
the run finished, answering handshakes and FetchState with its final state, and exiting 0 promptly on
SIGTERM without touching its results (real agent processes throughout)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import subprocess
import time
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from agent.checkpoint import load_checkpoint
from agent.configfile import config_from_args
from agent.node import healthcheck
from agent.node.finished import FINISHED_HEALTH_SERVICE, SERVING_EVENT
from agent.node.main import agent_parser
from agent.train.data import load_dataset
from agent.train.workload import GanProblem
from agent.transport.client import PeerClient
from agent.transport.identity import PeerIdentity
from agent.transport.state import StateSnapshot
from tests.agents import events_named, start_agents, wait_all, wait_for_event

pytestmark = pytest.mark.timeout(120)

CONFIG = ["--dataset", "ring8", "--iterations", "20", "--eval-every", "10", "--eval-samples", "200"]
FLAGS = [*CONFIG, "--log-every", "5", "--checkpoint-every", "10", "--discovery", "none", "--min-peers", "0"]
RESULTS = (
    "summary.json",
    "final.safetensors",
    "metrics.jsonl",
    "checkpoint.safetensors",
    "samples-final.png",
)


def digests(folder: Path) -> dict[str, str]:
    """Every file of the run folder but the log the test harness writes."""
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.iterdir())
        if path.is_file() and path.name != "agent.log"
    }


def probe_identity() -> tuple[PeerIdentity, GanProblem]:
    """A handshake identity compatible with the agents these tests start, and their model."""
    config = config_from_args(agent_parser().parse_args(CONFIG))
    dataset = load_dataset(
        config.dataset, path=config.data_path, image_size=config.image_size, seed=config.seed
    )
    problem = GanProblem.build(config, dataset.spec, torch.device("cpu"))
    identity = PeerIdentity(
        node_id="probe",
        advertise_address="127.0.0.1:1",
        schema_hash=problem.layout.schema_hash(),
        config_hash=config.config_hash(),
        config_json=json.dumps(config.cluster_dict(), sort_keys=True),
        instance_id="probe-instance",
        run_id=config.effective_run_id(),
    )
    return identity, problem


def fetch_final(address: str) -> tuple[bool, int, StateSnapshot]:
    """Handshake with the agent at ``address`` and fetch its state: (training, iteration, snapshot)."""
    identity, _ = probe_identity()

    async def scenario() -> tuple[bool, int, StateSnapshot]:
        client = PeerClient(address)
        try:
            response = await client.handshake(identity, timeout=10)
            snapshot = await client.fetch_state(timeout=10)
        finally:
            await client.close()
        return response.status.training, response.status.iteration, snapshot

    return asyncio.run(scenario())


def assert_serves_the_final_model(address: str, out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert healthcheck.main(["--address", address, "--finished", "--timeout", "5"]) == 0
    assert capsys.readouterr().out.strip() == f"{address}: finished"
    assert healthcheck.main(["--address", address, "--timeout", "5"]) == 0
    assert capsys.readouterr().out.strip() == f"{address}: SERVING"
    training, iteration, snapshot = fetch_final(address)
    assert not training and iteration == 20 and snapshot.iteration == 20
    _, problem = probe_identity()
    final = load_checkpoint(out / "final.safetensors")
    assert torch.equal(snapshot.tensors["x"], problem.layout.flatten(final.parameters))
    assert int(snapshot.tensors["step"].item()) == final.step


def stop_promptly(process: subprocess.Popen) -> None:
    stop_sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    assert wait_all([process], timeout=10) == [0]
    assert time.monotonic() - stop_sent < 2.0


def test_serve_keeps_a_finished_agent_up_until_sigterm(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    processes, addresses = start_agents(tmp_path, 1, [*FLAGS, "--when-finished", "serve"])
    out, log = tmp_path / "node-0", tmp_path / "node-0" / "agent.log"
    try:
        serving = wait_for_event(log, lambda e: e.get("event") == SERVING_EVENT, 90)
        assert serving is not None and serving["iteration"] == 20 and serving["out"] == str(out)
        time.sleep(0.5)
        assert processes[0].poll() is None
        before = digests(out)
        assert set(RESULTS) <= set(before)
        assert_serves_the_final_model(addresses[0], out, capsys)
        stop_promptly(processes[0])
    finally:
        wait_all(processes, timeout=0.1)
    assert digests(out) == before
    assert len(events_named(log, "agent finished")) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] and summary["iterations"] == 20


def test_exit_by_default_then_resume_serves_the_finished_run_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    processes, _ = start_agents(tmp_path, 1, FLAGS)
    assert wait_all(processes, timeout=90) == [0]
    out, log = tmp_path / "node-0", tmp_path / "node-0" / "agent.log"
    assert not events_named(log, SERVING_EVENT) and len(events_named(log, "agent finished")) == 1
    before = digests(out)

    processes, addresses = start_agents(tmp_path, 1, [*FLAGS, "--resume", "--when-finished", "serve"])
    try:
        assert wait_for_event(log, lambda e: e.get("event") == SERVING_EVENT, 60) is not None
        assert processes[0].poll() is None
        assert len(events_named(log, "run already finished; keeping its results")) == 1
        assert not events_named(log, "iteration") and not events_named(log, "resumed from checkpoint")
        assert_serves_the_final_model(addresses[0], out, capsys)
        stop_promptly(processes[0])
    finally:
        wait_all(processes, timeout=0.1)
    assert digests(out) == before


class _HealthServer:
    def __init__(self) -> None:
        self.server = grpc.aio.server()
        self.servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, self.server)
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"


@pytest.mark.timeout(30)
def test_healthcheck_finished_says_training_until_the_run_is_finished(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert healthcheck.FINISHED_HEALTH_SERVICE == FINISHED_HEALTH_SERVICE

    async def scenario() -> list[tuple[int, str]]:
        health_server = _HealthServer()
        await health_server.server.start()
        results = []
        try:
            await health_server.servicer.set(health.OVERALL_HEALTH, health_pb2.HealthCheckResponse.SERVING)
            for status in (
                health_pb2.HealthCheckResponse.NOT_SERVING,
                health_pb2.HealthCheckResponse.SERVING,
            ):
                await health_server.servicer.set(FINISHED_HEALTH_SERVICE, status)
                argv = ["--address", health_server.address, "--finished", "--timeout", "5"]
                code = await asyncio.to_thread(healthcheck.main, argv)
                results.append((code, capsys.readouterr().out.strip()))
        finally:
            await health_server.server.stop(None)
        return results

    (training, finished) = asyncio.run(scenario())
    assert training[0] == 1 and training[1].endswith(": training")
    assert finished[0] == 0 and finished[1].endswith(": finished")
    with pytest.raises(SystemExit):
        healthcheck.main(["--finished", "--service", "x"])


def test_a_run_stopped_before_its_end_says_training_and_exits_even_with_serve(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = ["--dataset", "ring8", "--iterations", "1000000", "--eval-every", "1000000", "--log-every", "5",
             "--checkpoint-every", "1000000", "--discovery", "none", "--min-peers", "0", "--when-finished",
             "serve"]  # fmt: skip
    processes, addresses = start_agents(tmp_path, 1, flags)
    log = tmp_path / "node-0" / "agent.log"
    try:
        assert wait_for_event(log, lambda e: e.get("iteration", 0) >= 20, 60)
        assert healthcheck.main(["--address", addresses[0], "--finished", "--timeout", "5"]) == 1
        assert capsys.readouterr().out.strip() == f"{addresses[0]}: training"
        assert healthcheck.main(["--address", addresses[0], "--timeout", "5"]) == 0
        processes[0].send_signal(signal.SIGTERM)
        assert wait_all(processes, timeout=30) == [0]
    finally:
        wait_all(processes, timeout=0.1)
    assert not events_named(log, SERVING_EVENT) and len(events_named(log, "agent stopped")) == 1


def test_a_local_cluster_refuses_when_finished_serve(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from agent.node.main import agent_main

    assert agent_main(["--local", "2", "--when-finished", "serve", "--out", str(tmp_path)]) == 2
    assert "--local: --when-finished cannot be used" in capsys.readouterr().err
