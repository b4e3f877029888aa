"""One DPOSG peer: the lifecycle that wires the parts together and runs the training loop.

The math lives in ``agent.core`` (the same functions the simulator calls, so a cluster of agents
reproduces ``dpgan-agent simulate`` exactly), the wire in ``agent.transport``, peer knowledge in
``agent.node.peers``, the view and every membership decision in ``agent.node.views`` (which applies the
pure rules of ``agent.core.membership``), gossip rounds in ``agent.node.gossip``, consistent stops in
``agent.node.stopping`` and state transfer in ``agent.node.state``. Training steps and mixing run on one
compute thread so the gRPC server stays responsive while a step computes.

The lifecycle is a loop over sessions (docs/membership.md): wait for peers, *enter* (found a view, or
join a running cluster by fetching a member's state at a boundary), train until the run ends, a stop is
agreed, the node is isolated (pause, then enter again once peers answer) or it is out of step (enter
again through the peer ``resync_source`` names).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from agent.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
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
    Found,
    IsolationAction,
    IsolationPolicy,
    Join,
    Membership,
    entry_plan,
    is_boundary,
    join_iteration,
    view_at_boundary,
)
from agent.discovery import PeerTable, build_discovery
from agent.files import write_atomic
from agent.logs import get_logger
from agent.node.gossip import GossipRounds, RoundSettings, Traffic, cancelled_by_us
from agent.node.peers import CandidateSource, PeerRegistry
from agent.node.state import fetch_at_boundary, restore_state, snapshot_of, state_from_snapshot
from agent.node.stopping import StopCoordinator
from agent.node.views import ViewController
from agent.train.data import load_dataset, partition
from agent.train.evaluate import Evaluator
from agent.train.simulate import hyper_from, node_checkpoint
from agent.train.workload import GanProblem, NodeOperator, node_generator, resolve_device
from agent.transport._generated.dpgan.v1 import dpgan_pb2 as pb
from agent.transport.client import PeerRpcError, PeerUnavailable
from agent.transport.frames import WireError
from agent.transport.identity import PeerIdentity
from agent.transport.inbox import Inbox
from agent.transport.options import DEFAULT_CHUNK_BYTES
from agent.transport.positions import PeerPositions
from agent.transport.protocol import PROTOCOL_VERSION
from agent.transport.server import GossipServer
from agent.transport.state import StateSnapshot

CHECKPOINT_NAME = "checkpoint.safetensors"
FINAL_NAME = "final.safetensors"
# Positions (rounds) a neighbour may be ahead of us and still be buffered. Partners on time-varying
# graphs (one-peer exponential) drift apart by up to one period of the schedule (log2 n iterations):
# 16 iterations' worth covers clusters of up to 2^16 nodes.
AHEAD_ITERATIONS = 16
# State transfers that may fail in a row before joining gives up.
FETCH_ATTEMPTS = 5
# Exit status of an agent that left because it was isolated (policy "exit").
EXIT_ISOLATED = 3


def _init_compute_thread(threads: int) -> None:
    # torch's intra-op thread count is per OS thread (an OpenMP setting): a fresh worker thread would
    # run every op with one thread per core, which cost ~0.5 ms per local step on 2 cores.
    torch.set_num_threads(threads)


class StopRequested(Exception):
    """A stop signal arrived while the node was waiting."""


class AgentError(RuntimeError):
    """The agent cannot start or continue (unreachable peers, refused handshake, bad checkpoint)."""


class NothingToJoin(AgentError):
    """The running cluster finishes before the next boundary at which this node could enter."""


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
    # Isolation (docs/membership.md): reaching fewer than isolation_min_peers live peers for longer than
    # isolation_timeout seconds (None: 2 x round_timeout) -> the policy, applied at a boundary.
    isolation: str = IsolationPolicy.PAUSE.value
    isolation_min_peers: int | None = None  # None: 1 when the run has peers at all, else 0
    isolation_timeout: float | None = None
    # While a stop is being agreed a silent member is waited for this long before it is left out.
    stop_grace: float = 10.0


@dataclass(frozen=True)
class Outcome:
    kind: str  # finished | stopped | paused | resync | isolated
    source: str = ""  # resync: the peer to re-enter through


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
            instance_id=secrets.token_hex(8),
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
            state_provider=lambda: snapshot_of(self.boundary_state),
            status_provider=self._status,
            host=options.listen_host,
            port=options.listen_port,
            device=self.device,
            positions=self.positions,
            stall_timeout=options.round_timeout,
        )
        self.hyper = hyper_from(config)
        self.state: NodeState | None = None
        self.iteration = 0
        self.ready_from: int | None = None
        self.training = False
        self.paused = False
        self.iterations_alone = 0
        self.views = ViewController(options.node_id, config, self.registry, self.log)
        self.stop = StopCoordinator(options.view_period, lambda: self.iteration, self._relay, self.log)
        self.stream = torch.Generator()
        self.operator: NodeOperator | None = None
        self.boundary_state: tuple[int, NodeState] | None = None
        self.resume_checkpoint: tuple[Path, Checkpoint] | None = None
        self._relay_task: asyncio.Future[None] | None = None
        # All torch work runs on this one thread, off the event loop that serves gRPC: steps, mixing,
        # encoding, evaluation and checkpoints never overlap, and the thread keeps its torch settings.
        self.compute = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix=f"dpgan-compute-{options.node_id}",
            initializer=_init_compute_thread,
            initargs=(config.threads,),
        )
        self.gossip = GossipRounds(
            config,
            RoundSettings(
                rounds=config.rounds,
                wire_dtype=config.wire_dtype,
                chunk_bytes=options.chunk_bytes,
                round_timeout=options.round_timeout,
                pace=options.pace,
            ),
            views=self.views,
            registry=self.registry,
            inbox=self.inbox,
            server=self.server,
            positions=self.positions,
            in_compute=self._in_compute,
            deadline_seconds=self._deadline,
            stop_event=self.stop.reached,
            log=self.log,
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

    # ---- what peers see, what they tell us -----------------------------------------------------------

    def _status(self) -> pb.PeerStatus:
        return pb.PeerStatus(
            ready=self.ready_from is not None,
            ready_from_iteration=self.ready_from or 0,
            training=self.training,
            iteration=self.iteration,
            view_period=self.options.view_period,
            members=list(self.views.view.node_ids) if self.training else [],
            stop_at_iteration=self.stop.stop_at or 0,
            paused=self.paused,
        )

    def _handshake_policy(self, request: pb.HandshakeRequest) -> tuple[bool, str]:
        period = request.status.view_period
        if period and period != self.options.view_period:
            return False, f"view_period differs: local {self.options.view_period}, peer {period}"
        accepted, reason = self.registry.on_inbound_handshake(request)
        if accepted and request.status.stop_at_iteration and self.training:
            self.stop.offer(request.status.stop_at_iteration, source=request.node_id)
        return accepted, reason

    def _absorb_stop_proposals(self) -> None:
        """Proposals that came back in probe answers (the other direction of the handshake)."""
        for node_id in self.views.view.node_ids:
            status = self.registry.remote_status.get(node_id)
            if status is not None and status.stop_at_iteration and status.training:
                self.stop.offer(status.stop_at_iteration, source=node_id)

    def _relay(self) -> None:
        """Tell every known peer our status now (a stop proposal, a join), not at its next probe."""
        if self._relay_task is None or self._relay_task.done():
            self._relay_task = asyncio.ensure_future(self.registry.broadcast())

    def request_stop(self) -> None:
        """SIGTERM/SIGINT: stop with the whole view at one boundary (before training: at once)."""
        self.stop.request(training=self.training)

    def _deadline(self) -> float:
        if self.stop.pending:
            return max(self.options.round_timeout, self.options.stop_grace)
        return self.options.round_timeout

    # ---- views -------------------------------------------------------------------------------------

    def _install_view(self, view: Membership, iteration: int) -> None:
        self.views.set_view(view, iteration)
        self._rebuild_operator()

    def _rebuild_operator(self) -> None:
        view = self.views.view
        shards = partition(
            self.dataset,
            view.size,
            self.config.split,
            seed=self.config.seed,
            classes_per_node=self.config.classes_per_node,
        )
        self.operator = self.problem.node_operator(shards[self.views.index], self.stream)

    # ---- entering: found, join, resync ---------------------------------------------------------------

    def _needed_peers(self) -> int:
        if self.options.min_peers is not None:
            return self.options.min_peers
        static_only = not self.options.mdns and not self.options.dns_names
        return len(self.options.peers) if static_only else 1

    def _isolation_needed(self) -> int:
        if self.options.isolation_min_peers is not None:
            return self.options.isolation_min_peers
        return 1 if self._needed_peers() > 0 else 0

    async def _until_stop(self, awaitable: Any) -> Any:
        """Await ``awaitable`` unless a stop is requested first (then cancel it and raise StopRequested)."""
        task = asyncio.ensure_future(awaitable)
        stop = asyncio.ensure_future(self.stop.requested.wait())
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

    async def _await_peers(self, needed: int, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while len(self.registry.alive()) < needed:
            if deadline is not None and time.monotonic() > deadline:
                refusals = "; ".join(f"{a}: {r}" for a, r in self.registry.refusals.items())
                raise AgentError(
                    f"only {len(self.registry.alive())} of {needed} peers answered within "
                    f"{timeout:.0f} s" + (f" (refused: {refusals})" if refusals else "")
                )
            await self._until_stop(self.registry.wait_for_change(0.5))

    async def _settle(self) -> None:
        if self.options.settle_seconds > 0:
            # Founders that meet by discovery give late arrivals a moment so they start with one view.
            quiet_since = time.monotonic()
            while time.monotonic() - quiet_since < self.options.settle_seconds:
                before = set(self.registry.alive())
                await self._until_stop(self.registry.wait_for_change(self.options.settle_seconds / 4))
                if set(self.registry.alive()) != before:
                    quiet_since = time.monotonic()

    async def _enter(self, resync: str | None) -> None:
        """Found a view or join the running cluster (``entry_plan``); ``resync`` names the peer an
        out-of-step node re-enters through."""
        waiting_logged = ""
        while True:
            if resync is not None:
                await self._join(resync, resync=True)
                return
            plan = entry_plan(
                self.options.node_id, self.iteration, self.views.positions(), self.options.view_period
            )
            if isinstance(plan, Found):
                await self._found(plan)
                return
            if isinstance(plan, Join):
                await self._join(plan.source, resync=self.state is not None)
                return
            if plan.reason != waiting_logged:
                waiting_logged = plan.reason
                self.log.info("waiting to enter", reason=plan.reason)
            await self._until_stop(self.registry.wait_for_change(0.5))

    async def _found(self, plan: Found) -> None:
        """Start training at ``plan.iteration`` with ``plan.members``, keeping local state (a fresh
        start, a consistent resume, or nodes that paused re-founding together)."""
        start = plan.iteration
        peers = [m for m in plan.members if m != self.options.node_id]
        self.registry.mark_founders(peers, start)
        view = Membership.of(plan.members)
        self.views.forget_left_out()
        if self.state is None:
            self.stream = node_generator(self.config.seed, view.index(self.options.node_id))
            self._install_view(view, start)
            if self.resume_checkpoint is not None:
                path, checkpoint = self.resume_checkpoint
                self.state = restore_state(self.problem, self.config, path, checkpoint, self.device)
                if checkpoint.rng_state is not None:
                    self.stream.set_state(checkpoint.rng_state)
                self.log.info("resumed from checkpoint", path=str(path), iteration=checkpoint.iteration)
            else:
                assert self.operator is not None
                needs_gradient = needs_initial_gradient(self.algorithm)
                initial = await self._in_compute(self.operator, self.problem.x0) if needs_gradient else None
                self.state = initial_state(self.algorithm, self.problem.x0, initial)
        else:
            self._install_view(view, start)
        self.iteration = start
        self.ready_from = start
        self.boundary_state = (start, self.state)  # type: ignore[assignment]
        self.inbox.expect(start, 0)

    async def _join(self, source_id: str, *, resync: bool) -> None:
        """Enter a running cluster at a future boundary with a member's parameters and optimizer state
        (a late joiner, a restarted node, or an out-of-step node resynchronising)."""
        assert self.config.iterations is not None
        lead = 2 * self.options.view_period
        failures = 0
        while True:
            # Fresh statuses first: a probe answer up to --probe-interval old may lag the cluster by more
            # than the lead, and every member (not only the source) must hear of us before the boundary.
            self.training = False
            self.ready_from = None
            await self.registry.broadcast()
            status = self.registry.remote_status.get(source_id)
            client = self.registry.clients.get(source_id)
            if status is None or client is None:
                raise AgentError(f"could not reach {source_id} to join the running cluster")
            furthest = max([status.iteration, *(p.iteration for p in self.views.positions() if p.training)])
            boundary = join_iteration(furthest, self.options.view_period, lead)
            if boundary >= self.config.iterations:
                raise NothingToJoin(
                    f"the running cluster is at iteration {status.iteration} and finishes at "
                    f"{self.config.iterations}, before the next join boundary {boundary}: nothing to join"
                )
            self.ready_from = boundary
            self.inbox.expect(boundary, 0)
            await self.registry.broadcast()  # tell every member now, not at its next probe
            self.log.info(
                "resynchronising" if resync else "joining running cluster",
                at_iteration=boundary,
                state_from=source_id,
                from_iteration=self.iteration,
            )
            try:
                snapshot: StateSnapshot = await self._until_stop(
                    fetch_at_boundary(client, boundary, self.options.round_timeout)
                )
            except asyncio.CancelledError:
                if cancelled_by_us():
                    raise
                error_text = "the channel was replaced during the transfer (the member moved or restarted)"
            # RuntimeError: the client lost its handshake (a refused re-probe) while fetching.
            except (PeerUnavailable, PeerRpcError, WireError, RuntimeError) as error:
                error_text = str(error)
            else:
                error_text = ""
            if error_text:
                failures += 1
                if failures >= FETCH_ATTEMPTS:
                    raise AgentError(f"could not fetch state from {source_id}: {error_text}")
                self.log.warning("state transfer failed; trying again", source=source_id, error=error_text)
                await asyncio.sleep(self.options.probe_interval)
                continue
            if snapshot.iteration == boundary and await self._counted_by(source_id, boundary):
                break
            # The member was past the boundary before it heard of us (it ran faster than our announcement
            # travelled): its view there does not count us. Declare a later boundary, with more lead.
            self.log.info("members did not count this node at the boundary; joining later", boundary=boundary)
            lead *= 2
        self.state = state_from_snapshot(snapshot, self.device)
        self.views.forget_left_out()
        view = view_at_boundary(self.options.node_id, self.registry.usable_records(), boundary)
        self.stream = node_generator(self.config.seed, view.index(self.options.node_id))
        self._install_view(view, boundary)
        self.iteration = boundary
        self.log.info("fetched state", iteration=boundary, source=source_id, members=list(view.node_ids))

    async def _counted_by(self, source_id: str, boundary: int) -> bool:
        """Whether ``source_id``, now at ``boundary`` or later, holds a view that counts this node."""
        client = self.registry.clients.get(source_id)
        if client is None:
            return False
        try:
            response = await client.handshake(
                self.identity, timeout=self.options.round_timeout, status=self._status()
            )
        except asyncio.CancelledError:
            if cancelled_by_us():
                raise
            return False  # the channel was replaced under the call
        except Exception:  # refused or unreachable: not counted (the loop re-reads its status)
            return False
        status = response.status
        return status.iteration < boundary or self.options.node_id in status.members

    # ---- training ----------------------------------------------------------------------------------

    def _steps_until_event(self) -> int:
        """Iterations from now to the next one that logs, checkpoints, evaluates, ends the run, is a view
        boundary (where a peer may join) or the agreed stop: a node alone runs that many steps in one go."""
        config, options, k = self.config, self.options, self.iteration
        assert config.iterations is not None and config.eval_every is not None
        periods = (options.log_every, options.checkpoint_every, config.eval_every, options.view_period)
        next_event = min(min((k // period + 1) * period for period in periods), config.iterations)
        if self.stop.stop_at is not None:
            next_event = min(next_event, self.stop.stop_at)
        return max(1, next_event - k)

    def _local_steps(self, steps: int) -> int:
        """Run up to ``steps`` local iterations back to back (on the compute thread)."""
        for _ in range(steps):
            assert self.state is not None and self.operator is not None
            self.state = local_iteration(self.algorithm, self.state, self.state.x, self.operator, self.hyper)
        return steps

    async def _iterate(self, iteration: int) -> Traffic | None:
        """One DPOSG iteration, or for a node alone every iteration up to the next event; None when the
        agreed stop position was reached while a round waited (the iteration is abandoned)."""
        assert self.state is not None and self.operator is not None
        traffic = Traffic()
        if self.views.view.size == 1:
            # Nothing to exchange: run the steps without a round trip to the event loop between them,
            # which cost ~0.2 ms per iteration (bench/agent_overhead.py).
            compute_started = time.perf_counter()
            traffic.iterations = await self._in_compute(self._local_steps, self._steps_until_event())
            traffic.compute_seconds = time.perf_counter() - compute_started
            return traffic
        x: torch.Tensor | None = self.state.x
        started = time.perf_counter()
        for round_ in range(self.config.rounds):
            assert x is not None
            x = await self.gossip.round(x, iteration, round_, traffic)
            if x is None:
                return None
        traffic.communication_seconds = time.perf_counter() - started
        compute_started = time.perf_counter()
        self.state = await self._in_compute(
            local_iteration, self.algorithm, self.state, x, self.operator, self.hyper
        )
        traffic.compute_seconds = time.perf_counter() - compute_started
        return traffic

    def _at_boundary(self) -> Outcome | None:
        """View changes, isolation and the out-of-step rule, all decided at boundaries."""
        assert self.state is not None
        self.boundary_state = (self.iteration, self.state)
        if self.views.at_boundary(self.iteration):
            self._rebuild_operator()
        if not self.stop.pending:
            bound = self.options.isolation_timeout or 2 * self.options.round_timeout
            policy = IsolationPolicy(self.options.isolation)
            action = self.views.isolation_action(self._isolation_needed(), bound, policy)
            if action is IsolationAction.PAUSE:
                return Outcome("paused")
            if action is IsolationAction.EXIT:
                return Outcome("isolated")
        source = self.views.resync_source(self.ready_from)
        if source is not None:
            self.log.warning(
                "out of step: members left this node out",
                iteration=self.iteration,
                majority=list(source.members),
                their_iteration=source.iteration,
            )
            return Outcome("resync", source.node_id)
        return None

    async def _train_session(self, recorder: RunRecorder) -> Outcome:
        config = self.config
        assert config.iterations is not None
        self.training = True
        self.paused = False
        while self.iteration < config.iterations:
            self._absorb_stop_proposals()
            if self.stop.check():
                return Outcome("stopped")
            if is_boundary(self.iteration, self.options.view_period):
                outcome = self._at_boundary()
                if outcome is not None:
                    return outcome
            traffic = await self._iterate(self.iteration)
            if traffic is None:
                return Outcome("stopped")
            if traffic.troubled or traffic.behind:
                self._relay()  # fresh statuses from everyone: the out-of-step rule needs them
            self.iteration += traffic.iterations
            if not traffic.participants:
                self.iterations_alone += traffic.iterations
            await recorder.after(traffic)
        return Outcome("finished")

    async def train(self) -> dict[str, Any]:
        """Train until the run ends or stops, entering again after pauses and resynchronisations."""
        recorder = RunRecorder(self)
        outcome = Outcome("stopped")
        resync: str | None = None
        while True:
            try:
                await self._enter(resync)
            except StopRequested:
                if self.state is None:
                    raise
                break
            except NothingToJoin as error:
                if self.state is None:
                    raise
                self.log.warning("cannot re-enter before the run ends; stopping here", reason=str(error))
                break
            await self.server.set_serving(True)
            outcome = await self._train_session(recorder)
            self.training = False
            if outcome.kind == "resync":
                self.ready_from = None
                resync = outcome.source
                continue
            if outcome.kind != "paused":
                break
            self.paused = True
            self.ready_from = None
            resync = None
            await self.server.set_serving(False)
            self.log.warning(
                "paused",
                reason="isolated: probing until peers answer",
                iteration=self.iteration,
                iterations_alone=self.iterations_alone,
            )
            try:
                await self._await_peers(self._isolation_needed(), None)
            except StopRequested:
                break
            self.log.info("peers answer again; re-entering", iteration=self.iteration)
        return await recorder.finish(outcome)

    async def run(self) -> dict[str, Any]:
        self.options.out.mkdir(parents=True, exist_ok=True)
        await self.server.start()
        self.log.info(
            "listening",
            address=self.server.address,
            advertise=self.options.advertise,
            instance=self.identity.instance_id,
        )
        if isinstance(self.source, PeerTable):
            await self.source.start()
        try:
            self._load_resume_checkpoint()
            self.registry.start()
            await self._await_peers(self._needed_peers(), self.options.startup_timeout)
            await self._settle()
            return await self.train()
        except StopRequested:
            self.log.info("stopped before training started")
            return {"finished": False, "iterations": self.iteration, "final": {}}
        finally:
            await self.shutdown()

    def _load_resume_checkpoint(self) -> None:
        if not self.options.resume:
            return
        path = self.options.out / CHECKPOINT_NAME
        if not path.exists():
            self.log.info("no checkpoint to resume from; starting fresh", path=str(path))
            return
        checkpoint = load_checkpoint(path)
        self.resume_checkpoint = (path, checkpoint)
        self.iteration = checkpoint.iteration  # peers see where we are: a differing set reconciles

    def checkpoint(self, name: str) -> None:
        assert self.state is not None
        checkpoint = node_checkpoint(self.problem, self.state, self.stream, self.iteration, self.config)
        save_checkpoint(self.options.out / name, checkpoint)

    async def shutdown(self) -> None:
        with contextlib.suppress(Exception):
            await self.server.set_serving(False)
        if self._relay_task is not None:
            self._relay_task.cancel()
        await self.registry.stop()
        if isinstance(self.source, PeerTable):
            await self.source.stop()  # sends the mDNS goodbye
        await self.server.stop(grace=1.0)
        self.compute.shutdown(wait=True)


class RunRecorder:
    """Progress lines, periodic checkpoints, evaluations (metrics.jsonl) and the summary of one run."""

    def __init__(self, agent: PeerAgent) -> None:
        self.agent = agent
        config = agent.config
        assert config.iterations is not None and config.eval_every is not None
        self.evaluator = Evaluator(agent.dataset, config.eval_samples, config.seed)
        self.metrics_path = agent.options.out / "metrics.jsonl"
        if not (agent.options.resume and self.metrics_path.exists()):
            self.metrics_path.write_text("")
        self.started = time.perf_counter()
        self.totals = Traffic()
        self.record: dict[str, Any] = {}

    async def after(self, traffic: Traffic) -> None:
        agent, config, options = self.agent, self.agent.config, self.agent.options
        assert config.iterations is not None and config.eval_every is not None
        totals = self.totals
        totals.compute_seconds += traffic.compute_seconds
        totals.communication_seconds += traffic.communication_seconds
        totals.bytes_sent += traffic.bytes_sent
        totals.bytes_received += traffic.bytes_received
        k = agent.iteration
        assert agent.operator is not None and agent.state is not None
        if k % options.log_every == 0 or k == config.iterations:
            agent.log.info(
                "iteration",
                iteration=k,
                **agent.operator.losses(),
                # per iteration (a node alone runs several iterations per Traffic record)
                compute_s=round(traffic.compute_seconds / traffic.iterations, 5),
                communication_s=round(traffic.communication_seconds / traffic.iterations, 5),
                bytes_sent=traffic.bytes_sent,
                bytes_received=traffic.bytes_received,
                neighbours=sorted(traffic.participants),
                members=agent.views.view.size,
                iterations_alone=agent.iterations_alone,
            )
        if k % options.checkpoint_every == 0:
            await agent._in_compute(agent.checkpoint, CHECKPOINT_NAME)
        if k % config.eval_every == 0 or k == config.iterations:
            self.record = {
                "iteration": k,
                "node": options.node_id,
                "wall_seconds": round(time.perf_counter() - self.started, 3),
                "quality": await agent._in_compute(self.evaluator.evaluate, agent.problem, agent.state.x),
                "members": agent.views.view.size,
                "iterations_alone": agent.iterations_alone,
                **agent.operator.losses(),
            }
            with self.metrics_path.open("a") as handle:
                handle.write(json.dumps(self.record) + "\n")

    async def finish(self, outcome: Outcome) -> dict[str, Any]:
        agent, config = self.agent, self.agent.config
        assert config.iterations is not None
        out = agent.options.out
        finished = agent.iteration >= config.iterations
        if agent.state is not None:
            await agent._in_compute(agent.checkpoint, CHECKPOINT_NAME)
            if finished:
                await agent._in_compute(agent.checkpoint, FINAL_NAME)
                self.evaluator.save_samples(agent.problem, agent.state.x, out / "samples-final.png")
        totals = self.totals
        summary = {
            "mode": "agent",
            "node": agent.options.node_id,
            "index": agent.views.index,
            "members": list(agent.views.view.node_ids),
            "iterations": agent.iteration,
            "finished": finished,
            "outcome": "finished" if finished else outcome.kind,
            "stop_at": agent.stop.stop_at,
            "iterations_alone": agent.iterations_alone,
            "wall_seconds": round(time.perf_counter() - self.started, 3),
            "compute_seconds": round(totals.compute_seconds, 3),
            "communication_seconds": round(totals.communication_seconds, 3),
            "bytes_sent": totals.bytes_sent,
            "bytes_received": totals.bytes_received,
            "paced_pushes": agent.gossip.paced(),
            # How neighbours' pushes met this node's inbox: with paced pushes none arrive ahead.
            "pushes_received": {o.value: count for o, count in agent.inbox.outcome_counts.items()},
            "final": self.record,
            "parameters": agent.problem.layout.numel,
            "schema_hash": agent.identity.schema_hash,
            "config_hash": agent.identity.config_hash,
            "config": config.to_dict(),
        }
        if outcome.kind == "isolated":
            summary["exit_code"] = EXIT_ISOLATED
            agent.log.error(
                "isolated for too long; exiting (--isolation exit)", iterations_alone=agent.iterations_alone
            )
        write_atomic(out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
        return summary
