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
again through the peer ``resync_source`` names). Before the first session ``agent.node.runs`` prepares
--out (resume, a finished run, a run of another configuration); after the last one ``agent.node.finished``
exits or, with --when-finished serve, keeps serving the finished run.
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
from pathlib import Path
from typing import Any

import torch

from agent.checkpoint import Checkpoint, save_checkpoint, save_series
from agent.core.algorithms import (
    AlgorithmName,
    NodeState,
    check_algorithm,
    check_finite,
    local_iteration,
    mixes,
)
from agent.core.config import TrainConfig
from agent.core.membership import (
    IsolationAction,
    IsolationPolicy,
    Membership,
    is_boundary,
)
from agent.discovery import TXT_RUN, PeerTable, build_discovery
from agent.logs import get_logger
from agent.node.entry import ClusterEntry
from agent.node.finished import FinishedRun
from agent.node.gossip import GossipRounds, RoundSettings, Traffic
from agent.node.options import (
    AgentError,
    AgentOptions,
    NothingToJoin,
    Outcome,
    StopRequested,
    describe_security,
)
from agent.node.overlap import OverlappedIterations
from agent.node.peers import CandidateSource, PeerRegistry
from agent.node.recorder import CHECKPOINT_NAME, RunRecorder, finished_summary
from agent.node.runs import prepare_run_folder
from agent.node.state import snapshot_of
from agent.node.stopping import StopCoordinator, confirm_stop
from agent.node.telemetry import MetricsEndpoint
from agent.node.views import ViewController
from agent.train.data import load_dataset, partition
from agent.train.evaluate import Evaluator
from agent.train.simulate import compression_from, hyper_from, node_checkpoint
from agent.train.workload import GanProblem, NodeOperator, resolve_device
from agent.transport._generated.dpgan.v1 import dpgan_pb2 as pb
from agent.transport.codecs import GossipKind
from agent.transport.identity import PeerIdentity
from agent.transport.inbox import Inbox
from agent.transport.positions import PeerPositions
from agent.transport.protocol import PROTOCOL_VERSION
from agent.transport.server import GossipServer

# Positions (rounds) a neighbour may be ahead of us and still be buffered. Partners on time-varying
# graphs (one-peer exponential) drift apart by up to one period of the schedule (log2 n iterations):
# 16 iterations' worth covers clusters of up to 2^16 nodes.
AHEAD_ITERATIONS = 16


RPC_DRAIN_SECONDS = 0.5


async def _rpc_tasks_ended(timeout: float) -> None:
    """grpc.aio's ``Server.stop`` returns while the tasks that ran its RPCs may still be pending
    (grpc/grpc#37239); the loop then cancelled them as the process exited, and cygrpc printed a
    CancelledError traceback (``_schedule_rpc_coro``) into the agent's log after "agent finished" (once in
    the fault suite). Give them up to ``timeout`` seconds to end on their own; nothing waits when none
    is left."""
    current = asyncio.current_task()
    pending = [
        task
        for task in asyncio.all_tasks()
        if task is not current
        and getattr(task.get_coro(), "__qualname__", "") in ("_schedule_rpc_coro", "_handle_exceptions")
    ]
    if pending:
        await asyncio.wait(pending, timeout=timeout)


def _init_compute_thread(threads: int) -> None:
    # torch's intra-op thread count is per OS thread (an OpenMP setting): a fresh worker thread would
    # run every op with one thread per core, which cost ~0.5 ms per local step on 2 cores.
    torch.set_num_threads(threads)


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
            config_json=json.dumps(config.cluster_dict(), sort_keys=True, allow_nan=False),
            instance_id=secrets.token_hex(8),
            run_id=config.effective_run_id(),
        )
        self.source = source or self._discovery()
        self.registry = PeerRegistry(
            self.identity,
            self.source,
            self.status,
            self.log,
            probe_interval=options.probe_interval,
            security=options.security,
        )
        self.inbox = Inbox(rounds_per_iteration=config.rounds, ahead_window=AHEAD_ITERATIONS * config.rounds)
        self.positions = PeerPositions()
        compression = compression_from(config)
        self.server = GossipServer(
            identity=self.identity,
            inbox=self.inbox,
            vector_length=self.problem.layout.numel,
            handshake_policy=self._handshake_policy,
            state_provider=lambda: snapshot_of(self.boundary_state),
            status_provider=self.status,
            host=options.listen_host,
            port=options.listen_port,
            device=self.device,
            positions=self.positions,
            stall_timeout=options.round_timeout,
            security=options.security,
            data_port=options.data_port,
            gossip=GossipKind(
                compression.compressor if compression is not None else None, wire_dtype=config.wire_dtype
            ),
        )
        self.hyper = hyper_from(config)
        self.state: NodeState | None = None
        self.iteration = 0
        self.ready_from: int | None = None
        self.training = False
        self.paused = False
        self.iterations_alone = 0
        self.views = ViewController(options.node_id, config, self.registry, self.log)
        # The iteration count this node's step in progress will reach: from the moment its rounds are done
        # and the step is computed it can no longer stop before that (a stop adopted then moves on).
        self.committed_to = 0
        self.stop = StopCoordinator(
            options.view_period,
            self._stop_position,
            self._stop_floor,
            self._relay,
            self._confirm_stop,
            self.log,
        )
        self.stream = torch.Generator()
        self.operator: NodeOperator | None = None
        self.boundary_state: tuple[int, NodeState] | None = None
        self.resume_checkpoint: tuple[Path, Checkpoint] | None = None
        self._relay_task: asyncio.Future[None] | None = None
        self.entry = ClusterEntry(self)
        self.recorder: RunRecorder | None = None  # the current run's, once training starts
        self.metrics: MetricsEndpoint | None = None  # --metrics-port
        self.finished = FinishedRun(self)
        # All torch work runs on this one thread, off the event loop that serves gRPC: steps, mixing,
        # encoding, evaluation and checkpoints never overlap, and the thread keeps its torch settings.
        self.compute = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix=f"dpgan-compute-{options.node_id}",
            initializer=_init_compute_thread,
            initargs=(config.threads,),
        )
        # overlap: each iteration's gradient on its own thread while the compute thread encodes and mixes.
        self.overlapped = (
            OverlappedIterations(self, _init_compute_thread, config.threads) if config.overlap else None
        )
        self.gossip = GossipRounds(
            config,
            RoundSettings(
                rounds=config.rounds,
                wire_dtype=config.wire_dtype,
                chunk_bytes=options.chunk_bytes,
                round_timeout=options.round_timeout,
                pace=options.pace,
                compression=compression,
            ),
            views=self.views,
            registry=self.registry,
            inbox=self.inbox,
            server=self.server,
            positions=self.positions,
            in_compute=self.in_compute,
            deadline_seconds=self._deadline,
            stop_event=self.stop.reached,
            log=self.log,
        )

    async def in_compute(self, function: Callable[..., Any], *args: Any) -> Any:
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
                TXT_RUN: self.identity.run_id,
            },
            dns_interval=options.dns_interval,
            log=self.log,
        )

    # ---- what peers see, what they tell us -----------------------------------------------------------

    def status(self) -> pb.PeerStatus:
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
        if self.finished.serving:
            return self.finished.handshake_policy(request)
        period = request.status.view_period
        if period and period != self.options.view_period:
            return False, f"view_period differs: this node: {self.options.view_period}, peer: {period}"
        accepted, reason = self.registry.on_inbound_handshake(request)
        if accepted and request.status.stop_at_iteration and self.training:
            self.stop.offer(request.status.stop_at_iteration, source=request.node_id)
        return accepted, reason

    def _absorb_stop_proposals(self) -> None:
        """Proposals and positions that came back in probe answers (the other direction of the handshake)."""
        self.stop.offer(0, source="positions")  # a member past the agreed stop moves it on
        for node_id in self.views.view.node_ids:
            status = self.registry.remote_status.get(node_id)
            if status is not None and status.stop_at_iteration and status.training:
                self.stop.offer(status.stop_at_iteration, source=node_id)

    def _stop_position(self) -> int:
        """The first iteration this node can still stop before."""
        return max(self.iteration, self.committed_to)

    async def commit_step(self, iteration: int) -> bool:
        """The rounds of ``iteration`` are done: before its step, stop here if that is the agreed, confirmed
        stop (False: abandon the iteration), else commit to the step."""
        if self.stop.at_stop() and await self.stop.settle():
            return False
        self.committed_to = iteration + 1
        return True

    def _stop_floor(self) -> int:
        """The furthest position known in the view: this node's and every training member's last report."""
        positions = [self._stop_position()]
        for node_id in self.views.view.node_ids:
            status = self.registry.remote_status.get(node_id)
            if status is not None and status.training:
                positions.append(status.iteration)
        return max(positions)

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

    def install_view(self, view: Membership, iteration: int) -> None:
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
            steps = self._steps_until_event()
            self.committed_to = iteration + steps
            traffic.iterations = await self.in_compute(self._local_steps, steps)
            traffic.compute_seconds = time.perf_counter() - compute_started
            return traffic
        if self.overlapped is not None:
            return await self.overlapped.iterate(iteration, traffic)
        x: torch.Tensor | None = self.state.x
        started = time.perf_counter()
        for round_ in range(self.config.rounds):
            assert x is not None
            x = await self.gossip.round(x, iteration, round_, traffic)
            if x is None:
                return None
        if not await self.commit_step(iteration):
            return None
        traffic.communication_seconds = time.perf_counter() - started
        compute_started = time.perf_counter()
        self.state = await self.in_compute(
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
            action = self.views.isolation_action(self.entry.isolation_needed(), bound, policy)
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
            if self.stop.at_stop() and await self.stop.settle():
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
            self.committed_to = 0
            check_finite([self.state], self.iteration, [self.options.node_id])  # diverged: stop, exit 1
            if not traffic.participants:
                self.iterations_alone += traffic.iterations
            await recorder.after(traffic)
        return Outcome("finished")

    async def train(self) -> dict[str, Any]:
        """Train until the run ends or stops, entering again after pauses and resynchronisations."""
        # Off the event loop: building the evaluator trains the FID classifier for image data sets, and
        # a loop blocked for seconds right after the handshakes failed the neighbours' probes (digits
        # agents were left out at start-up and never formed their cluster).
        evaluator = await self.in_compute(Evaluator, self.dataset, self.config.eval_samples, self.config.seed)
        recorder = self.recorder = RunRecorder(self, evaluator)
        outcome = Outcome("stopped")
        resync: str | None = None
        while True:
            try:
                await self.entry.enter(resync)
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
                await self.entry.await_peers(self.entry.isolation_needed(), None)
            except StopRequested:
                break
            self.log.info("peers answer again; re-entering", iteration=self.iteration)
        self.stop.close()
        return await recorder.finish(outcome)

    async def _confirm_stop(self, stop_at: int) -> bool:
        """Every member's confirmation of ``stop_at`` (``confirm_stop``); False when the stop moved on."""
        registry = self.registry

        def reported(node_id: str) -> int:
            status = registry.remote_status.get(node_id)
            return status.stop_at_iteration if status is not None else 0

        async def tell(node_id: str) -> bool:
            """Handshake the member; True when it is gone (no address, or its port refuses)."""
            record = registry.records.get(node_id)
            if record is None:
                return True
            answered = await registry.handshake(record.address)
            return answered is None and registry.refuses_connections(node_id)

        def agreed() -> int | None:
            self._absorb_stop_proposals()
            return self.stop.stop_at

        members = [n for n in self.views.view.node_ids if n != self.options.node_id]
        missing = await confirm_stop(
            stop_at, members, reported, tell, agreed, self.options.stop_grace, self.log
        )
        return missing is not None

    async def run(self) -> dict[str, Any]:
        self.options.out.mkdir(parents=True, exist_ok=True)
        await self.finished.register()
        await self.server.start()
        self.log.info(
            "listening",
            address=self.server.address,
            advertise=self.options.advertise,
            instance=self.identity.instance_id,
            **describe_security(self.config, self.options.security),
        )
        if self.options.metrics_port is not None:
            self.metrics = MetricsEndpoint(self, self.options.listen_host, self.options.metrics_port)
            self.log.info("metrics", url=f"http://{self.options.listen_host}:{self.metrics.port}/metrics")
        try:
            if isinstance(self.source, PeerTable):
                await self.source.start()  # inside: a discovery failure still shuts the server down
            # --out prepared (agent/node/runs.py): a finished run is kept as it is, else resumed or new.
            prepared = prepare_run_folder(self.options, self.config, self.problem, self.log)
            if prepared.finished is not None:
                summary = finished_summary(self.options.out, prepared.finished[1].iteration)
                return await self.finished.after(summary, prepared.finished)
            if prepared.resume is not None:
                # Peers see where we are at once: a differing set of checkpoints reconciles.
                self.resume_checkpoint = prepared.resume
                self.iteration = prepared.resume[1].iteration
            self.registry.start()
            await self.entry.await_peers(self.entry.needed_peers(), self.options.startup_timeout)
            await self.entry.settle()
            return await self.finished.after(await self.train())  # --when-finished serve waits here
        except StopRequested:
            self.log.info("stopped before training started")
            return {"finished": False, "iterations": self.iteration, "final": {}}
        finally:
            await self.shutdown()

    def checkpoint(self, name: str) -> None:
        """Write ``name`` in --out; the periodic/stop checkpoint (CHECKPOINT_NAME) goes to the series that
        keeps the last --keep-checkpoints copies."""
        assert self.state is not None
        checkpoint = node_checkpoint(self.problem, self.state, self.stream, self.iteration, self.config)
        if name == CHECKPOINT_NAME:
            save_series(self.options.out, checkpoint, keep=self.options.keep_checkpoints)
        else:
            save_checkpoint(self.options.out / name, checkpoint)

    async def shutdown(self) -> None:
        with contextlib.suppress(Exception):
            await self.server.set_serving(False)
        if self._relay_task is not None:
            self._relay_task.cancel()
        await self.gossip.freezes.close()
        await self.registry.stop()
        if isinstance(self.source, PeerTable):
            await self.source.stop()  # sends the mDNS goodbye
        await self.server.stop(grace=1.0)
        await _rpc_tasks_ended(RPC_DRAIN_SECONDS)
        if self.metrics is not None:
            self.metrics.close()
        self.compute.shutdown(wait=True)
        if self.overlapped is not None:
            self.overlapped.close()
