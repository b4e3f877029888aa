"""One DPOSG peer: serves its gossip endpoint, finds its peers, trains, checkpoints, stops cleanly.

The lifecycle only wires parts together; the math lives in ``agent.core`` (the same functions the
simulator calls, so a cluster of agents reproduces ``dpgan-agent simulate`` exactly), the wire in
``agent.transport``, peer knowledge in ``agent.node.peers``. Training steps and mixing run in a worker
thread so the gRPC server stays responsive while a step computes.

Membership (see docs/membership.md): founders that meet before training agree on the first view; after
that views change only at boundaries (multiples of ``view_period``), where every node recomputes its
view from the peers it knows to be alive and ready. A late joiner announces the boundary it will join
at, fetches parameters and optimizer state from a member once that member reaches the boundary, and
enters gossip there. Every pushed vector carries the epoch of its sender's view and is mixed only by
receivers holding the same view.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from agent.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
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
from agent.core.membership import (
    Membership,
    PeerAction,
    PeerEvent,
    PeerHealth,
    is_boundary,
    join_iteration,
    on_peer_event,
    view_at_boundary,
)
from agent.core.mixing import mix_row, renormalized_row, row_for_round
from agent.discovery import PeerTable, build_discovery
from agent.files import write_atomic
from agent.logs import get_logger
from agent.node.peers import CandidateSource, PeerRegistry
from agent.train.data import load_dataset, partition
from agent.train.evaluate import Evaluator
from agent.train.simulate import hyper_from, node_checkpoint, schedule_from
from agent.train.workload import GanProblem, NodeOperator, node_generator, resolve_device
from agent.transport._generated.dpgan.v1 import dpgan_pb2 as pb
from agent.transport.client import PeerRpcError, PeerUnavailable
from agent.transport.codec import PROTOCOL_VERSION, PeerIdentity, StateSnapshot, WireError, prepare_vector
from agent.transport.inbox import Inbox
from agent.transport.options import DEFAULT_CHUNK_BYTES
from agent.transport.positions import PeerPositions
from agent.transport.server import GossipServer

CHECKPOINT_NAME = "checkpoint.safetensors"
FINAL_NAME = "final.safetensors"
STATE_POLL_SECONDS = 0.02
PUSH_RETRY_SECONDS = 0.01
# Positions (rounds) a neighbour may be ahead of us and still be buffered. Partners on time-varying
# graphs (one-peer exponential) drift apart by up to one period of the schedule (log2 n iterations):
# 16 iterations' worth covers clusters of up to 2^16 nodes.
AHEAD_ITERATIONS = 16


def _init_compute_thread(threads: int) -> None:
    # torch's intra-op thread count is per OS thread (an OpenMP setting): a fresh worker thread would
    # run every op with one thread per core, which cost ~0.5 ms per local step on 2 cores.
    torch.set_num_threads(threads)


class StopRequested(Exception):
    """A stop signal arrived while the node was waiting."""


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
    min_peers: int | None = None  # None: every static peer (or 1 with discovery)
    settle_seconds: float = 0.0  # founders wait this long without new peers before starting
    view_period: int = 10
    probe_interval: float = 1.0
    mdns: bool = False
    dns_names: tuple[str, ...] = ()
    dns_interval: float = 5.0
    interfaces: tuple[str, ...] | None = None
    # Paced pushes (agent/transport/positions.py): "auto" paces on time-varying graphs, where partners
    # change every round and drift apart; "on" and "off" force it.
    pace: str = "auto"


@dataclass
class Traffic:
    compute_seconds: float = 0.0
    communication_seconds: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0
    participants: set[str] = field(default_factory=set)
    iterations: int = 1


class PeerAgent:
    def __init__(
        self, config: TrainConfig, options: AgentOptions, source: CandidateSource | None = None
    ) -> None:
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
        self.source = source or self._discovery()
        self.registry = PeerRegistry(
            self.identity, self.source, self._status, self.log, probe_interval=options.probe_interval
        )
        self.inbox = Inbox(rounds_per_iteration=config.rounds, ahead_window=AHEAD_ITERATIONS * config.rounds)
        self.positions = PeerPositions()
        self.server = GossipServer(
            identity=self.identity,
            inbox=self.inbox,
            vector_length=self.problem.layout.numel,
            handshake_policy=self._handshake_policy,
            state_provider=self._state_snapshot,
            status_provider=self._status,
            host=options.listen_host,
            port=options.listen_port,
            device=self.device,
            positions=self.positions,
        )
        self.hyper = hyper_from(config)
        self.stop_requested = asyncio.Event()
        self.state: NodeState | None = None
        self.iteration = 0
        self.ready_from: int | None = None
        self.training = False
        self.view = Membership.of([options.node_id])
        self.index = 0
        self.schedule = schedule_from(config, 1)
        self.health: dict[str, PeerHealth] = {}
        self.stream = torch.Generator()
        self.operator: NodeOperator | None = None
        self.boundary_state: tuple[int, NodeState] | None = None
        self.mismatch_logged: set[tuple[str, int]] = set()
        # All torch work runs on this one thread, off the event loop that serves gRPC: steps, mixing,
        # encoding, evaluation and checkpoints never overlap, and the thread keeps its torch settings.
        self.compute = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix=f"dpgan-compute-{options.node_id}",
            initializer=_init_compute_thread,
            initargs=(config.threads,),
        )

    async def _in_compute(self, function: Callable[..., Any], *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.compute, functools.partial(function, *args))

    def _discovery(self) -> PeerTable:
        options = self.options
        return build_discovery(
            node_id=options.node_id,
            advertise=options.advertise,
            listen_port=options.listen_port,
            peers=options.peers,
            dns_names=options.dns_names,
            mdns=options.mdns,
            interfaces=options.interfaces,
            txt={
                "proto": str(PROTOCOL_VERSION),
                "schema": self.identity.schema_hash,
                "config": self.identity.config_hash,
            },
            dns_interval=options.dns_interval,
            log=self.log,
        )

    # ---- what peers see ----------------------------------------------------------------------------

    def _status(self) -> pb.PeerStatus:
        return pb.PeerStatus(
            ready=self.ready_from is not None,
            ready_from_iteration=self.ready_from or 0,
            training=self.training,
            iteration=self.iteration,
            view_period=self.options.view_period,
            members=list(self.view.node_ids) if self.training else [],
        )

    def _handshake_policy(self, request: pb.HandshakeRequest) -> tuple[bool, str]:
        period = request.status.view_period
        if period and period != self.options.view_period:
            return False, f"view_period differs: local {self.options.view_period}, peer {period}"
        return self.registry.on_inbound_handshake(request)

    def _state_snapshot(self) -> StateSnapshot:
        """The state at the latest view boundary: what a joiner entering at that boundary starts from."""
        if self.boundary_state is None:
            raise RuntimeError("this node has no training state yet")
        iteration, state = self.boundary_state
        tensors = dict(state.tensors()) | {"step": torch.tensor([float(state.step)])}
        return StateSnapshot(iteration=iteration, round=0, tensors=tensors)

    # ---- views -------------------------------------------------------------------------------------

    def _set_view(self, view: Membership, iteration: int) -> None:
        previous = self.view
        self.view = view
        self.index = view.index(self.options.node_id)
        self.schedule = schedule_from(self.config, view.size)
        shards = partition(
            self.dataset,
            view.size,
            self.config.split,
            seed=self.config.seed,
            classes_per_node=self.config.classes_per_node,
        )
        self.operator = self.problem.node_operator(shards[self.index], self.stream)
        self.health = {node_id: PeerHealth() for node_id in view.node_ids if node_id != self.options.node_id}
        self.log.info(
            "membership view",
            iteration=iteration,
            members=list(view.node_ids),
            epoch=view.epoch,
            joined=sorted(set(view.node_ids) - set(previous.node_ids)),
            left=sorted(set(previous.node_ids) - set(view.node_ids)),
        )

    def _at_boundary(self, iteration: int) -> None:
        assert self.state is not None
        self.boundary_state = (iteration, self.state)
        view = view_at_boundary(self.options.node_id, self.registry.usable_records(), iteration)
        if view != self.view:
            self._set_view(view, iteration)
        else:
            # Peers left out during the last period get another chance if probes found them alive.
            for node_id in self.health:
                if self.registry.records.get(node_id) and self.registry.records[node_id].alive:
                    self.health[node_id] = PeerHealth()

    # ---- start-up ----------------------------------------------------------------------------------

    def _min_peers(self) -> int:
        if self.options.min_peers is not None:
            return self.options.min_peers
        static_only = not self.options.mdns and not self.options.dns_names
        return len(self.options.peers) if static_only else 1

    async def _await_peers(self) -> None:
        needed = self._min_peers()
        deadline = time.monotonic() + self.options.startup_timeout
        self.registry.start()
        while len(self.registry.alive()) < needed:
            if time.monotonic() > deadline:
                refusals = "; ".join(f"{a}: {r}" for a, r in self.registry.refusals.items())
                raise AgentError(
                    f"only {len(self.registry.alive())} of {needed} peers answered within "
                    f"{self.options.startup_timeout:.0f} s" + (f" (refused: {refusals})" if refusals else "")
                )
            await self._until_stop(self.registry.wait_for_change(0.5))
        if self.options.settle_seconds > 0:
            # Founders that meet by discovery give late arrivals a moment so they start with one view.
            quiet_since = time.monotonic()
            while time.monotonic() - quiet_since < self.options.settle_seconds:
                before = set(self.registry.alive())
                await self._until_stop(self.registry.wait_for_change(self.options.settle_seconds / 4))
                if set(self.registry.alive()) != before:
                    quiet_since = time.monotonic()

    def _training_peers(self) -> list[tuple[str, pb.PeerStatus]]:
        return [
            (node_id, self.registry.remote_status[node_id])
            for node_id in self.registry.alive()
            if self.registry.remote_status.get(node_id) is not None
            and self.registry.remote_status[node_id].training
        ]

    async def _found(self, members: list[str] | None = None) -> None:
        """Start training with the peers present now (all of them founders too), or with the first
        view of a founder that already started and counts this node in."""
        start = 0
        checkpoint_path = self.options.out / CHECKPOINT_NAME
        checkpoint = None
        if self.options.resume and checkpoint_path.exists():
            checkpoint = load_checkpoint(checkpoint_path)
            start = checkpoint.iteration
        peers = [m for m in members if m != self.options.node_id] if members else self.registry.alive()
        self.registry.mark_founders(peers, start)
        view = Membership.of([self.options.node_id, *peers])
        self.stream = node_generator(self.config.seed, view.index(self.options.node_id))
        self._set_view(view, start)
        if checkpoint is not None:
            self._restore(checkpoint_path, checkpoint)
        else:
            assert self.operator is not None
            needs_gradient = needs_initial_gradient(self.algorithm)
            initial = await self._in_compute(self.operator, self.problem.x0) if needs_gradient else None
            self.state = initial_state(self.algorithm, self.problem.x0, initial)
        self.iteration = start
        self.ready_from = start
        self.boundary_state = (start, self.state)  # type: ignore[assignment]
        self.inbox.expect(start, 0)

    async def _join(self, peers: list[tuple[str, pb.PeerStatus]]) -> None:
        """Enter a running cluster at a future boundary with a member's parameters and optimizer state."""
        source_id, source_status = max(peers, key=lambda item: item[1].iteration)
        boundary = join_iteration(
            source_status.iteration, self.options.view_period, 2 * self.options.view_period
        )
        assert self.config.iterations is not None
        if boundary >= self.config.iterations:
            raise AgentError(
                f"the running cluster is at iteration {source_status.iteration} and finishes at "
                f"{self.config.iterations}, before the next join boundary {boundary}: nothing to join"
            )
        self.ready_from = boundary
        self.inbox.expect(boundary, 0)
        await self.registry.refresh()  # tell every member now, not at its next probe
        self.log.info("joining running cluster", at_iteration=boundary, state_from=source_id)
        client = self.registry.clients[source_id]
        while True:
            try:
                snapshot = await self._until_stop(client.fetch_state(timeout=self.options.round_timeout))
            except (PeerUnavailable, PeerRpcError, WireError) as error:
                raise AgentError(f"could not fetch state from {source_id}: {error}") from error
            if snapshot.iteration >= boundary:
                break
            await asyncio.sleep(STATE_POLL_SECONDS)
        if snapshot.iteration > boundary:  # we were slow: enter at the boundary the member is at
            boundary = snapshot.iteration
            self.ready_from = boundary
            self.inbox.expect(boundary, 0)
        tensors = {name: tensor.to(self.device) for name, tensor in snapshot.tensors.items()}
        step = int(tensors.pop("step").item()) if "step" in tensors else 0
        self.state = NodeState(
            x=tensors["x"],
            direction=tensors.get("direction"),
            moment1=tensors.get("moment1"),
            moment2=tensors.get("moment2"),
            step=step,
        )
        view = view_at_boundary(self.options.node_id, self.registry.usable_records(), boundary)
        self.stream = node_generator(self.config.seed, view.index(self.options.node_id))
        self.iteration = boundary
        self.log.info("fetched state", iteration=boundary, source=source_id, members=list(view.node_ids))

    def _restore(self, path: Path, checkpoint: Any) -> None:
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
        self.log.info("resumed from checkpoint", path=str(path), iteration=checkpoint.iteration)

    # ---- gossip ------------------------------------------------------------------------------------

    def _record(self, node_id: str, event: PeerEvent, reason: str = "") -> None:
        health, action = on_peer_event(self.health[node_id], event, self.options.max_missed_rounds)
        self.health[node_id] = health
        if action is PeerAction.MARK_DOWN:
            self.log.warning(
                "neighbour down; mixing without it", neighbour=node_id, cause=event.value, reason=reason
            )
            if event is PeerEvent.UNREACHABLE:
                self.registry.mark_dead(node_id, reason)

    def _paced(self) -> bool:
        pace = self.options.pace
        return pace == "on" or (pace == "auto" and self.schedule.period > 1)

    async def _announce(self, node_id: str, iteration: int, round_: int) -> bool:
        """Tell a neighbour of this round that we entered it; False if it cannot be reached."""
        client = self.registry.clients.get(node_id)
        if client is None:
            return False  # _push records it
        try:
            ack = await client.announce(
                iteration=iteration, round=round_, epoch=self.view.epoch, timeout=self.options.round_timeout
            )
        except PeerUnavailable as error:
            self._record(node_id, PeerEvent.UNREACHABLE, str(error))
            return False
        except (PeerRpcError, RuntimeError) as error:  # RuntimeError: the client lost its handshake
            self.log.debug("announce failed", neighbour=node_id, error=str(error))
            return True
        if not ack.accepted:
            self.log.debug("announce refused", neighbour=node_id, reason=ack.reason)
        return True

    async def _paced_wait(
        self, node_id: str, position: tuple[int, int], announcement: asyncio.Future[bool], deadline: float
    ) -> bool:
        """Wait until the neighbour has entered ``position``; True to push now, False to skip the push
        (the neighbour is unreachable, or a stop was requested: the round will not be mixed).

        Our own announcement's ack is not waited for: under a congested link it can come back after
        the neighbour's announcement. Past the deadline we push anyway; its inbox buffers or refuses
        as it would without pacing.
        """
        reached = asyncio.ensure_future(
            self.positions.wait_reached(node_id, position, deadline - time.monotonic())
        )
        stop = asyncio.ensure_future(self.stop_requested.wait())
        pending: set[asyncio.Future[Any]] = {reached, stop, announcement}
        try:
            while True:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if stop in done:
                    return False
                if announcement in done and not announcement.result():
                    if self.registry.clients.get(node_id) is None:
                        self._record(node_id, PeerEvent.UNREACHABLE, "no connection")
                    return False
                if reached in done:
                    if not reached.result():
                        self.log.debug(
                            "neighbour did not announce the round; pushing anyway", neighbour=node_id
                        )
                    return True
        finally:
            reached.cancel()
            stop.cancel()

    async def _push(
        self,
        node_id: str,
        wire: Any,
        iteration: int,
        round_: int,
        traffic: Traffic,
        announcement: asyncio.Future[bool] | None = None,
    ) -> None:
        deadline = time.monotonic() + self.options.round_timeout
        if announcement is not None and not await self._paced_wait(
            node_id, (iteration, round_), announcement, deadline
        ):
            return
        client = self.registry.clients.get(node_id)
        if client is None:
            self._record(node_id, PeerEvent.UNREACHABLE, "no connection")
            return
        sent_before = client.bytes_sent
        try:
            while True:
                ack = await client.push_vector(
                    wire,
                    iteration=iteration,
                    round=round_,
                    epoch=self.view.epoch,
                    chunk_bytes=self.options.chunk_bytes,
                    timeout=max(0.1, deadline - time.monotonic()),
                )
                # A neighbour still finishing an earlier round refuses us as too far ahead; it will get
                # there (partners of time-varying graphs drift apart by up to a period), so try again.
                if ack.status != pb.PUSH_STATUS_TOO_FAR_AHEAD or time.monotonic() > deadline:
                    break
                await asyncio.sleep(PUSH_RETRY_SECONDS)
        except (PeerUnavailable, PeerRpcError) as error:
            self._record(node_id, PeerEvent.UNREACHABLE, str(error))
            return
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # our own cancellation (stop requested)
            # The channel was closed under the call (the peer re-handshook from a new address).
            self._record(node_id, PeerEvent.UNREACHABLE, "push cancelled by a channel change")
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
        view = self.view
        round_index = iteration * self.config.rounds + round_
        row = self.schedule.row(self.index, round_index)
        neighbours = [view.node_id(j) for j, _ in row if j != self.index]
        live = [node_id for node_id in neighbours if self.health[node_id].alive]
        self.inbox.expect(iteration, round_)
        if not live:
            return x if len(row) == 1 else mix_row(renormalized_row(row, {self.index}), {self.index: x})
        # Announce first, so neighbours already in this round can send to us while we encode.
        announcements: dict[str, asyncio.Future[bool]] = (
            {n: asyncio.ensure_future(self._announce(n, iteration, round_)) for n in live}
            if self._paced()
            else {}
        )
        try:
            wire = await self._in_compute(prepare_vector, x, self.config.wire_dtype)
            received_before = self.server.bytes_received
            # Not interrupted by a stop: a push in flight finishes (the round boundary is where we stop),
            # and a paced push still waiting for its neighbour is skipped (_paced_wait).
            await asyncio.gather(
                *(
                    self._push(node_id, wire, iteration, round_, traffic, announcements.get(node_id))
                    for node_id in live
                )
            )
        finally:
            for task in announcements.values():
                task.cancel()
        reachable = [node_id for node_id in live if self.health[node_id].alive]
        messages = await self._until_stop(
            self.inbox.wait_for_messages(iteration, round_, reachable, timeout=self.options.round_timeout)
        )
        traffic.bytes_received += self.server.bytes_received - received_before
        arrived = {view.index(n): m.epoch for n, m in messages.items()}
        row, missing, other_view = row_for_round(row, self.index, arrived, view.epoch)
        for node_id in reachable:
            j = view.index(node_id)
            if j in missing:
                self._record(node_id, PeerEvent.MISSED_DEADLINE)
            elif j in other_view:
                # Mixed under another view: left out of this round, but it is alive.
                if (node_id, messages[node_id].epoch) not in self.mismatch_logged:
                    self.mismatch_logged.add((node_id, messages[node_id].epoch))
                    self.log.info("neighbour holds another view; not mixing with it", neighbour=node_id)
            else:
                self._record(node_id, PeerEvent.DELIVERED)
        vectors = {self.index: x} | {
            j: messages[view.node_id(j)].vector.to(x.device) for j, _ in row if j != self.index
        }
        traffic.participants.update(view.node_id(j) for j, _ in row if j != self.index)
        # Neighbours already marked down were logged once when they went down.
        left_out = sorted(n for n in reachable if view.index(n) in missing or view.index(n) in other_view)
        if left_out:
            self.log.info(
                "round mixed without neighbours", iteration=iteration, round=round_, missing=left_out
            )
        return await self._in_compute(mix_row, row, vectors)

    # ---- training ----------------------------------------------------------------------------------

    def _steps_until_event(self) -> int:
        """Iterations from now to the next one that logs, checkpoints, evaluates, ends the run or is a
        view boundary (where a peer may join): a node alone runs that many steps in one go."""
        config, options, k = self.config, self.options, self.iteration
        assert config.iterations is not None and config.eval_every is not None
        periods = (options.log_every, options.checkpoint_every, config.eval_every, options.view_period)
        next_event = min(min((k // period + 1) * period for period in periods), config.iterations)
        return max(1, next_event - k)

    def _local_steps(self, steps: int) -> int:
        """Run up to ``steps`` local iterations back to back (on the compute thread); stop early once a
        stop is requested. Returns how many ran."""
        for done in range(steps):
            if self.stop_requested.is_set():  # a plain flag read; safe from this thread
                return done
            assert self.state is not None and self.operator is not None
            self.state = local_iteration(self.algorithm, self.state, self.state.x, self.operator, self.hyper)
        return steps

    async def _iterate(self, iteration: int) -> Traffic | None:
        """One DPOSG iteration, or for a node alone every iteration up to the next event; None when a
        stop was requested (at a round boundary)."""
        assert self.state is not None and self.operator is not None
        if self.stop_requested.is_set():
            return None
        traffic = Traffic()
        if self.view.size == 1:
            # Nothing to exchange: run the steps without a round trip to the event loop between them,
            # which cost ~0.2 ms per iteration (bench/agent_overhead.py).
            compute_started = time.perf_counter()
            traffic.iterations = await self._in_compute(self._local_steps, self._steps_until_event())
            traffic.compute_seconds = time.perf_counter() - compute_started
            return traffic if traffic.iterations > 0 else None
        x = self.state.x
        started = time.perf_counter()
        for round_ in range(self.config.rounds):
            if self.stop_requested.is_set():
                return None
            try:
                x = await self._gossip_round(x, iteration, round_, traffic)
            except StopRequested:
                return None
        traffic.communication_seconds = time.perf_counter() - started
        compute_started = time.perf_counter()
        self.state = await self._in_compute(
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
        evaluator = Evaluator(self.dataset, config.eval_samples, config.seed)
        metrics_path = out / "metrics.jsonl"
        if not (self.options.resume and metrics_path.exists()):
            metrics_path.write_text("")
        started = time.perf_counter()
        totals = Traffic()
        record: dict[str, Any] = {}
        self.training = True
        while self.iteration < config.iterations:
            if is_boundary(self.iteration, self.options.view_period):
                self._at_boundary(self.iteration)
            traffic = await self._iterate(self.iteration)
            if traffic is None:
                break
            self.iteration += traffic.iterations
            totals.compute_seconds += traffic.compute_seconds
            totals.communication_seconds += traffic.communication_seconds
            totals.bytes_sent += traffic.bytes_sent
            totals.bytes_received += traffic.bytes_received
            k = self.iteration
            assert self.operator is not None and self.state is not None
            if k % self.options.log_every == 0 or k == config.iterations:
                self.log.info(
                    "iteration",
                    iteration=k,
                    **self.operator.losses(),
                    # per iteration (a node alone runs several iterations per Traffic record)
                    compute_s=round(traffic.compute_seconds / traffic.iterations, 5),
                    communication_s=round(traffic.communication_seconds / traffic.iterations, 5),
                    bytes_sent=traffic.bytes_sent,
                    bytes_received=traffic.bytes_received,
                    neighbours=sorted(traffic.participants),
                    members=self.view.size,
                )
            if k % self.options.checkpoint_every == 0:
                await self._in_compute(self._checkpoint, CHECKPOINT_NAME)
            if k % config.eval_every == 0 or k == config.iterations:
                record = {
                    "iteration": k,
                    "node": self.options.node_id,
                    "wall_seconds": round(time.perf_counter() - started, 3),
                    "quality": await self._in_compute(evaluator.evaluate, self.problem, self.state.x),
                    "members": self.view.size,
                    **self.operator.losses(),
                }
                with metrics_path.open("a") as handle:
                    handle.write(json.dumps(record) + "\n")
        self.training = False
        finished = self.iteration >= config.iterations
        await self._in_compute(self._checkpoint, CHECKPOINT_NAME)
        if finished:
            await self._in_compute(self._checkpoint, FINAL_NAME)
            assert self.state is not None
            evaluator.save_samples(self.problem, self.state.x, out / "samples-final.png")
        summary = {
            "mode": "agent",
            "node": self.options.node_id,
            "index": self.index,
            "members": list(self.view.node_ids),
            "iterations": self.iteration,
            "finished": finished,
            "wall_seconds": round(time.perf_counter() - started, 3),
            "compute_seconds": round(totals.compute_seconds, 3),
            "communication_seconds": round(totals.communication_seconds, 3),
            "bytes_sent": totals.bytes_sent,
            "bytes_received": totals.bytes_received,
            "paced_pushes": self._paced(),
            # How neighbours' pushes met this node's inbox: with paced pushes none arrive ahead.
            "pushes_received": {outcome.value: count for outcome, count in self.inbox.outcome_counts.items()},
            "final": record,
            "parameters": self.problem.layout.numel,
            "schema_hash": self.identity.schema_hash,
            "config_hash": self.identity.config_hash,
            "config": config.to_dict(),
        }
        write_atomic(out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
        return summary

    async def run(self) -> dict[str, Any]:
        self.options.out.mkdir(parents=True, exist_ok=True)
        await self.server.start()
        self.log.info("listening", address=self.server.address, advertise=self.options.advertise)
        if isinstance(self.source, PeerTable):
            await self.source.start()
        try:
            await self._await_peers()
            running = self._training_peers()
            founding_view = next(
                (list(s.members) for _, s in running if self.options.node_id in s.members), None
            )
            if running and founding_view is None:
                await self._join(running)
            else:
                await self._found(founding_view)
            await self.server.set_serving(True)
            return await self.train()
        except StopRequested:
            self.log.info("stopped before training started")
            return {"finished": False, "iterations": self.iteration, "final": {}}
        finally:
            await self.shutdown()

    async def shutdown(self) -> None:
        with contextlib.suppress(Exception):
            await self.server.set_serving(False)
        await self.registry.stop()
        if isinstance(self.source, PeerTable):
            await self.source.stop()  # sends the mDNS goodbye
        await self.server.stop(grace=1.0)
        self.compute.shutdown(wait=True)
