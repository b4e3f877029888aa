"""One DPOSG peer: serves its gossip endpoint, finds its peers, trains, checkpoints, stops cleanly.

The lifecycle only wires parts together; the math lives in ``agent.core`` (the same functions the
simulator calls, so a cluster of agents reproduces ``dpgan-agent simulate`` exactly), the wire in
``agent.transport``. Training steps and mixing run in a worker thread so the gRPC server stays
responsive while a step computes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from agent.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, write_atomic
from agent.core.algorithms import (
    AlgorithmName,
    NodeState,
    check_algorithm,
    initial_state,
    local_iteration,
    mixes,
    needs_initial_gradient,
)
from agent.core.config import TrainConfig
from agent.core.membership import Membership, PeerAction, PeerEvent, PeerHealth, on_peer_event
from agent.core.mixing import mix_row, renormalized_row
from agent.logs import get_logger
from agent.train.data import load_dataset, partition
from agent.train.evaluate import Evaluator
from agent.train.simulate import hyper_from, node_checkpoint, schedule_from
from agent.train.workload import GanProblem, node_generator, resolve_device
from agent.transport.client import HandshakeRefused, PeerClient, PeerUnavailable
from agent.transport.codec import PeerIdentity, StateSnapshot, prepare_vector
from agent.transport.inbox import Inbox
from agent.transport.options import DEFAULT_CHUNK_BYTES
from agent.transport.server import GossipServer

CHECKPOINT_NAME = "checkpoint.safetensors"
FINAL_NAME = "final.safetensors"


class StopRequested(Exception):
    """A stop signal arrived while the node was waiting inside a round."""


class AgentError(RuntimeError):
    """The agent cannot start or continue (unreachable peers, refused handshake, bad checkpoint)."""


@dataclass(frozen=True)
class AgentOptions:
    """Node-local settings of the networked agent (the cluster-wide ones are in TrainConfig)."""

    node_id: str
    listen_host: str
    listen_port: int
    advertise: str
    peers: tuple[str, ...]
    out: Path
    resume: bool = False
    checkpoint_every: int = 100
    log_every: int = 50
    round_timeout: float = 10.0
    startup_timeout: float = 60.0
    max_missed_rounds: int = 3
    chunk_bytes: int = DEFAULT_CHUNK_BYTES


@dataclass
class Traffic:
    compute_seconds: float = 0.0
    communication_seconds: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0
    participants: set[str] = field(default_factory=set)


class PeerAgent:
    def __init__(self, config: TrainConfig, options: AgentOptions) -> None:
        self.config = config
        self.options = options
        self.algorithm: AlgorithmName = check_algorithm(config.algorithm)
        if not mixes(self.algorithm):
            raise AgentError(
                f"algorithm {config.algorithm!r} is the centralized baseline (gradients all-reduced every "
                "iteration); agents gossip parameters. Run it with 'dpgan-agent simulate' or bench/."
            )
        self.log = get_logger(node=options.node_id)
        self.device = resolve_device(config.device)
        self.dataset = load_dataset(
            config.dataset, path=config.data_path, image_size=config.image_size, seed=config.seed
        )
        self.problem = GanProblem.build(config, self.dataset.spec, self.device)
        self.identity = PeerIdentity(
            node_id=options.node_id,
            advertise_address=options.advertise,
            schema_hash=self.problem.layout.schema_hash(),
            config_hash=config.config_hash(),
            config_json=json.dumps(config.cluster_dict(), sort_keys=True),
        )
        self.inbox = Inbox(rounds_per_iteration=config.rounds)
        self.server = GossipServer(
            identity=self.identity,
            inbox=self.inbox,
            vector_length=self.problem.layout.numel,
            state_provider=self._state_snapshot,
            host=options.listen_host,
            port=options.listen_port,
            device=self.device,
        )
        self.clients: dict[str, PeerClient] = {}  # node id -> client
        self.health: dict[str, PeerHealth] = {}
        self.stop_requested = asyncio.Event()
        self.state: NodeState | None = None
        self.iteration = 0
        self.stream = torch.Generator()
        self.membership: Membership | None = None

    # ---- start-up ----------------------------------------------------------------------------------

    async def _connect(self, address: str, deadline: float) -> tuple[str, PeerClient]:
        client = PeerClient(address)
        delay = 0.05
        while True:
            try:
                response = await client.handshake(self.identity, timeout=2.0)
                return response.node_id, client
            except HandshakeRefused as refused:
                await client.close()
                raise AgentError(f"peer {address} refused the handshake: {refused}") from refused
            except PeerUnavailable:
                if time.monotonic() > deadline:
                    await client.close()
                    raise AgentError(
                        f"peer {address} unreachable for {self.options.startup_timeout:.0f} s"
                    ) from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def connect_peers(self) -> Membership:
        deadline = time.monotonic() + self.options.startup_timeout
        results = await asyncio.gather(
            *(self._connect(address, deadline) for address in self.options.peers), return_exceptions=True
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        connected = [r for r in results if not isinstance(r, BaseException)]
        for node_id, client in connected:
            if node_id in self.clients:
                errors.append(AgentError(f"two peer addresses answer as node {node_id!r}"))
                await client.close()
            else:
                self.clients[node_id] = client
        if errors:
            raise AgentError("; ".join(str(e) for e in errors))
        membership = Membership.of([self.options.node_id, *self.clients])
        self.health = {node_id: PeerHealth() for node_id in self.clients}
        self.log.info("membership formed", members=list(membership.node_ids), epoch=membership.epoch)
        return membership

    def _prepare_training(self, membership: Membership) -> None:
        config = self.config
        index = membership.index(self.options.node_id)
        shards = partition(
            self.dataset,
            membership.size,
            config.split,
            seed=config.seed,
            classes_per_node=config.classes_per_node,
        )
        self.index = index
        self.schedule = schedule_from(config, membership.size)
        self.stream = node_generator(config.seed, index)
        self.operator = self.problem.node_operator(shards[index], self.stream)
        self.hyper = hyper_from(config)
        checkpoint_path = self.options.out / CHECKPOINT_NAME
        if self.options.resume and checkpoint_path.exists():
            self._restore(checkpoint_path)
            return
        initial = self.operator(self.problem.x0) if needs_initial_gradient(self.algorithm) else None
        self.state = initial_state(self.algorithm, self.problem.x0, initial)
        self.iteration = 0

    def _restore(self, path: Path) -> None:
        checkpoint = load_checkpoint(path)
        if checkpoint.schema_hash != self.problem.layout.schema_hash():
            raise CheckpointError(
                f"checkpoint {path} was written for a different model (schema hash differs)"
            )
        # The iteration goal may grow on resume (train longer); everything else must match.
        current = {k: v for k, v in self.config.cluster_dict().items() if k != "iterations"}
        differing = sorted(k for k, v in current.items() if checkpoint.config.get(k) != v)
        if differing:
            raise CheckpointError(
                f"checkpoint {path} was written with a different configuration: {differing}"
            )
        x = self.problem.layout.flatten(checkpoint.parameters).to(self.device)
        optimizer = {k: v.to(self.device) for k, v in checkpoint.optimizer.items()}
        self.state = NodeState(
            x=x,
            direction=optimizer.get("direction"),
            moment1=optimizer.get("moment1"),
            moment2=optimizer.get("moment2"),
            step=checkpoint.step,
        )
        if checkpoint.rng_state is not None:
            self.stream.set_state(checkpoint.rng_state)
        self.iteration = checkpoint.iteration
        self.inbox.expect(self.iteration, 0)
        self.log.info("resumed from checkpoint", path=str(path), iteration=self.iteration)

    def _state_snapshot(self) -> StateSnapshot:
        assert self.state is not None
        return StateSnapshot(iteration=self.iteration, round=0, tensors=self.state.tensors())

    # ---- gossip ------------------------------------------------------------------------------------

    def _record(self, node_id: str, event: PeerEvent, reason: str = "") -> None:
        health, action = on_peer_event(self.health[node_id], event, self.options.max_missed_rounds)
        self.health[node_id] = health
        if action is PeerAction.MARK_DOWN:
            self.log.warning(
                "neighbour down; mixing without it", neighbour=node_id, cause=event.value, reason=reason
            )

    async def _push(self, node_id: str, wire: Any, iteration: int, round_: int, traffic: Traffic) -> None:
        client = self.clients[node_id]
        sent_before = client.bytes_sent
        try:
            ack = await client.push_vector(
                wire,
                iteration=iteration,
                round=round_,
                chunk_bytes=self.options.chunk_bytes,
                timeout=self.options.round_timeout,
            )
        except PeerUnavailable as error:
            self._record(node_id, PeerEvent.UNREACHABLE, str(error))
            return
        finally:
            traffic.bytes_sent += client.bytes_sent - sent_before
        if not ack.accepted:
            self.log.debug("push refused", neighbour=node_id, reason=ack.reason)

    async def _until_stop(self, awaitable: Any) -> Any:
        """Await ``awaitable`` unless a stop is requested first (then cancel it and raise StopRequested)."""
        task = asyncio.ensure_future(awaitable)
        stop = asyncio.ensure_future(self.stop_requested.wait())
        try:
            await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise StopRequested
        return task.result()

    async def _gossip_round(
        self, x: torch.Tensor, iteration: int, round_: int, traffic: Traffic
    ) -> torch.Tensor:
        assert self.membership is not None
        membership = self.membership
        round_index = iteration * self.config.rounds + round_
        row = self.schedule.row(self.index, round_index)
        neighbours = [membership.node_id(j) for j, _ in row if j != self.index]
        live = [node_id for node_id in neighbours if self.health[node_id].alive]
        self.inbox.expect(iteration, round_)
        if not live:
            return x if len(row) == 1 else mix_row(renormalized_row(row, {self.index}), {self.index: x})
        wire = await asyncio.to_thread(prepare_vector, x, self.config.wire_dtype)
        received_before = self.server.bytes_received
        await asyncio.gather(*(self._push(node_id, wire, iteration, round_, traffic) for node_id in live))
        reachable = [node_id for node_id in live if self.health[node_id].alive]
        received = await self._until_stop(
            self.inbox.wait_for(iteration, round_, reachable, timeout=self.options.round_timeout)
        )
        traffic.bytes_received += self.server.bytes_received - received_before
        for node_id in reachable:
            if node_id in received:
                self._record(node_id, PeerEvent.DELIVERED)
            else:
                self._record(node_id, PeerEvent.MISSED_DEADLINE)
        traffic.participants.update(received)
        present = {self.index} | {membership.index(node_id) for node_id in received}
        vectors = {self.index: x} | {
            membership.index(node_id): v.to(x.device) for node_id, v in received.items()
        }
        if len(present) < len(row):
            missing = sorted(set(neighbours) - set(received))
            self.log.info(
                "round mixed without neighbours", iteration=iteration, round=round_, missing=missing
            )
            row = renormalized_row(row, present)
        return await asyncio.to_thread(mix_row, row, vectors)

    # ---- training ----------------------------------------------------------------------------------

    async def _iterate(self, iteration: int) -> Traffic | None:
        """One DPOSG iteration; None when a stop was requested at a round boundary."""
        assert self.state is not None
        traffic = Traffic()
        x = self.state.x
        started = time.perf_counter()
        if self.membership is not None and self.membership.size > 1:
            for round_ in range(self.config.rounds):
                if self.stop_requested.is_set():
                    return None
                try:
                    x = await self._gossip_round(x, iteration, round_, traffic)
                except StopRequested:
                    return None
        traffic.communication_seconds = time.perf_counter() - started
        compute_started = time.perf_counter()
        self.state = await asyncio.to_thread(
            local_iteration, self.algorithm, self.state, x, self.operator, self.hyper
        )
        traffic.compute_seconds = time.perf_counter() - compute_started
        return traffic

    def _checkpoint(self, name: str) -> None:
        assert self.state is not None
        checkpoint = node_checkpoint(self.problem, self.state, self.stream, self.iteration, self.config)
        save_checkpoint(self.options.out / name, checkpoint)

    async def train(self) -> dict[str, Any]:
        config = self.config
        assert config.iterations is not None and config.eval_every is not None
        out = self.options.out
        out.mkdir(parents=True, exist_ok=True)
        evaluator = Evaluator(self.dataset, config.eval_samples, config.seed)
        metrics_path = out / "metrics.jsonl"
        if not (self.options.resume and metrics_path.exists()):
            metrics_path.write_text("")
        started = time.perf_counter()
        totals = Traffic()
        record: dict[str, Any] = {}
        while self.iteration < config.iterations:
            traffic = await self._iterate(self.iteration)
            if traffic is None:
                break
            self.iteration += 1
            totals.compute_seconds += traffic.compute_seconds
            totals.communication_seconds += traffic.communication_seconds
            totals.bytes_sent += traffic.bytes_sent
            totals.bytes_received += traffic.bytes_received
            k = self.iteration
            if k % self.options.log_every == 0 or k == config.iterations:
                self.log.info(
                    "iteration",
                    iteration=k,
                    **self.operator.losses(),
                    compute_s=round(traffic.compute_seconds, 5),
                    communication_s=round(traffic.communication_seconds, 5),
                    bytes_sent=traffic.bytes_sent,
                    bytes_received=traffic.bytes_received,
                    neighbours=sorted(traffic.participants),
                )
            if k % self.options.checkpoint_every == 0:
                await asyncio.to_thread(self._checkpoint, CHECKPOINT_NAME)
            if k % config.eval_every == 0 or k == config.iterations:
                assert self.state is not None
                record = {
                    "iteration": k,
                    "node": self.options.node_id,
                    "wall_seconds": round(time.perf_counter() - started, 3),
                    "quality": await asyncio.to_thread(evaluator.evaluate, self.problem, self.state.x),
                    **self.operator.losses(),
                }
                with metrics_path.open("a") as handle:
                    handle.write(json.dumps(record) + "\n")
        finished = self.iteration >= config.iterations
        await asyncio.to_thread(self._checkpoint, CHECKPOINT_NAME)
        if finished:
            await asyncio.to_thread(self._checkpoint, FINAL_NAME)
            assert self.state is not None
            evaluator.save_samples(self.problem, self.state.x, out / "samples-final.png")
        summary = {
            "mode": "agent",
            "node": self.options.node_id,
            "index": self.index,
            "members": list(self.membership.node_ids) if self.membership else [],
            "iterations": self.iteration,
            "finished": finished,
            "wall_seconds": round(time.perf_counter() - started, 3),
            "compute_seconds": round(totals.compute_seconds, 3),
            "communication_seconds": round(totals.communication_seconds, 3),
            "bytes_sent": totals.bytes_sent,
            "bytes_received": totals.bytes_received,
            "final": record,
            "parameters": self.problem.layout.numel,
            "schema_hash": self.identity.schema_hash,
            "config_hash": self.identity.config_hash,
            "config": config.to_dict(),
        }
        write_atomic(out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
        return summary

    async def run(self) -> dict[str, Any]:
        await self.server.start()
        self.log.info("listening", address=self.server.address, advertise=self.options.advertise)
        try:
            self.membership = await self.connect_peers()
            await asyncio.to_thread(self._prepare_training, self.membership)
            await self.server.set_serving(True)
            return await self.train()
        finally:
            await self.shutdown()

    async def shutdown(self) -> None:
        with contextlib.suppress(Exception):
            await self.server.set_serving(False)
        for client in self.clients.values():
            with contextlib.suppress(Exception):
                await client.close()
        await self.server.stop(grace=1.0)
