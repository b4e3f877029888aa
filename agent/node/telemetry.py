"""Live metrics of one agent in the Prometheus text format (`--metrics-port`), via prometheus-client.

A custom collector reads the agent's state when Prometheus scrapes (nothing is pushed from the training
loop, so metrics cost nothing between scrapes). Everything is per node: labels `node` and `run` on
every series. Series (units in the name, as Prometheus recommends):

| metric | type | meaning |
|---|---|---|
| dpgan_info{version} | gauge (1) | agent version, node, run |
| dpgan_iteration | gauge | iterations completed |
| dpgan_iterations_target | gauge | the run's `iterations` |
| dpgan_iterations_per_second | gauge | since the previous scrape (since the start on the first) |
| dpgan_training / dpgan_paused / dpgan_finished | gauge (0/1) | where the node is |
| dpgan_loss{player} | gauge | last generator / discriminator loss |
| dpgan_view_members | gauge | members of the current membership view, this node included |
| dpgan_peers_left_out_total{reason} | counter | members left out of a view, by reason |
| dpgan_iterations_alone_total | counter | iterations trained with no neighbour |
| dpgan_compute_seconds_total / dpgan_round_wait_seconds_total | counter | local steps / gossip rounds |
| dpgan_sent_bytes_total{peer} / dpgan_received_bytes_total{peer} | counter | gossip bytes per peer |
| dpgan_data_plane_pushes_total{peer} | counter | pushes sent over the peer's data plane (`--data-port`) |
| dpgan_reference_bytes | gauge | float32-delta's reference vectors held (as sender and receiver) |
| dpgan_wire_coding | gauge (0/1) | `wire_dtype: float32-auto` only: 1 while vectors are coded |
| dpgan_push_rate_bytes_per_second | gauge | `float32-auto` only: the push rate it decides on |
| dpgan_wire_vectors_total{wire_dtype} | counter | `float32-auto` only: vectors pushed and answered |
| dpgan_checkpoint_age_seconds | gauge | since checkpoint.safetensors was written |
| dpgan_quality{metric} | gauge | the last evaluation (modes_covered, high_quality, ...) |
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

import agent as package
from agent.node.recorder import CHECKPOINT_NAME

if TYPE_CHECKING:
    from agent.node.agent import PeerAgent
    from agent.node.recorder import RunRecorder


class AgentCollector(Collector):
    """Reads one PeerAgent at scrape time (prometheus-client's HTTP thread; reads only, copies dicts)."""

    def __init__(self, agent: PeerAgent) -> None:
        self.agent = agent
        self._started = time.monotonic()
        self._previous: tuple[float, int] | None = None

    def collect(self) -> Iterator[Metric]:
        agent = self.agent
        labels = {"node": agent.options.node_id, "run": agent.identity.run_id}
        names, values = list(labels), list(labels.values())

        def gauge(name: str, help: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, help, labels=names)
            family.add_metric(values, value)
            return family

        def counter(name: str, help: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, help, labels=names)
            family.add_metric(values, value)
            return family

        info = GaugeMetricFamily("dpgan_info", "agent version, node and run", labels=[*names, "version"])
        info.add_metric([*values, package.__version__], 1)
        yield info
        iteration = agent.iteration
        yield gauge("dpgan_iteration", "iterations completed", iteration)
        yield gauge("dpgan_iterations_target", "iterations of the run", agent.config.iterations or 0)
        yield gauge("dpgan_iterations_per_second", "since the previous scrape", self._rate(iteration))
        yield gauge("dpgan_training", "1 while the node trains", float(agent.training))
        yield gauge("dpgan_paused", "1 while isolated and paused", float(agent.paused))
        finished = iteration >= (agent.config.iterations or 0) and not agent.training
        yield gauge("dpgan_finished", "1 once the run is finished", float(finished))
        losses = agent.operator.losses() if agent.operator is not None else {}
        loss = GaugeMetricFamily("dpgan_loss", "last loss per player", labels=[*names, "player"])
        for key, player in (("loss_g", "generator"), ("loss_d", "discriminator")):
            if key in losses and math.isfinite(losses[key]):
                loss.add_metric([*values, player], losses[key])
        yield loss
        yield gauge("dpgan_view_members", "members of the current view", agent.views.view.size)
        left_out = CounterMetricFamily(
            "dpgan_peers_left_out", "members left out of a view, by reason", labels=[*names, "reason"]
        )
        for reason, count in dict(agent.views.left_out_counts).items():
            left_out.add_metric([*values, reason], count)
        yield left_out
        yield counter("dpgan_iterations_alone", "iterations with no neighbour", agent.iterations_alone)
        recorder: RunRecorder | None = agent.recorder
        totals = recorder.totals if recorder is not None else None
        yield counter(
            "dpgan_compute_seconds", "local steps", totals.compute_seconds if totals is not None else 0.0
        )
        yield counter(
            "dpgan_round_wait_seconds",
            "gossip rounds: pushing and waiting for neighbours",
            totals.communication_seconds if totals is not None else 0.0,
        )
        sent = CounterMetricFamily("dpgan_sent_bytes", "gossip bytes sent, per peer", labels=[*names, "peer"])
        for peer, client in dict(agent.registry.clients).items():
            sent.add_metric([*values, peer], client.bytes_sent)
        yield sent
        data_plane = CounterMetricFamily(
            "dpgan_data_plane_pushes",
            "pushes a peer's data plane carried (--data-port)",
            labels=[*names, "peer"],
        )
        for peer, client in dict(agent.registry.clients).items():
            data_plane.add_metric([*values, peer], client.data_plane_pushes)
        yield data_plane
        received = CounterMetricFamily(
            "dpgan_received_bytes", "gossip bytes received, per peer", labels=[*names, "peer"]
        )
        for peer, count in agent.server.bytes_received_by_peer.items():
            received.add_metric([*values, peer], count)
        yield received
        deltas = agent.gossip.deltas
        held = agent.server.reference_bytes + (deltas.references.bytes_held if deltas is not None else 0)
        yield gauge("dpgan_reference_bytes", "float32-delta reference vectors held, both ends", held)
        yield from self._wire_choice(gauge, names, values)
        try:
            age = time.time() - (agent.options.out / CHECKPOINT_NAME).stat().st_mtime
            yield gauge("dpgan_checkpoint_age_seconds", "since the last checkpoint", max(0.0, age))
        except OSError:
            pass  # no checkpoint yet: no sample rather than a made-up age
        quality = GaugeMetricFamily("dpgan_quality", "last evaluation", labels=[*names, "metric"])
        record = recorder.record if recorder is not None else {}
        for metric, value in dict(record.get("quality") or {}).items():
            if isinstance(value, int | float) and math.isfinite(value):
                quality.add_metric([*values, metric], float(value))
        yield quality

    def _wire_choice(
        self, gauge: Callable[[str, str, float], GaugeMetricFamily], names: list[str], values: list[str]
    ) -> Iterator[Metric]:
        """float32-auto's choice (agent.transport.wire_choice); nothing for other wire dtypes or compressed
        gossip."""
        choice = self.agent.gossip.wire_choice
        if choice is None:
            return
        yield gauge("dpgan_wire_coding", "1 while float32-auto codes its vectors", float(choice.coding))
        rate = choice.push_rate
        if rate is not None:
            yield gauge("dpgan_push_rate_bytes_per_second", "push rate float32-auto decides on", rate)
        vectors = CounterMetricFamily(
            "dpgan_wire_vectors", "vectors sent (one per neighbour)", labels=[*names, "wire_dtype"]
        )
        for wire_dtype, count in dict(choice.vectors).items():
            vectors.add_metric([*values, wire_dtype], count)
        yield vectors

    def _rate(self, iteration: int) -> float:
        now = time.monotonic()
        since, start = self._previous or (self._started, 0)
        self._previous = (now, iteration)
        elapsed = now - since
        return (iteration - start) / elapsed if elapsed > 0 and iteration >= start else 0.0


class MetricsEndpoint:
    """The /metrics HTTP endpoint of one agent, served by prometheus-client in a daemon thread."""

    def __init__(self, agent: PeerAgent, host: str, port: int) -> None:
        """Listen on `host`:`port` (0: any free port). OSError naming the address when it cannot."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(AgentCollector(agent))
        try:
            self._server, _thread = start_http_server(port, addr=host, registry=registry)
        except OSError as error:
            why = error.strerror or str(error)
            raise OSError(f"--metrics-port: cannot listen on {host}:{port}: {why}") from None
        self.port: int = self._server.server_address[1]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
