"""How a node enters a cluster: wait for peers, then found a view or join a running cluster through a
member's state at a boundary (``entry_plan`` in ``agent.core.membership`` decides which). The same path
serves a fresh start, a resume (consistent checkpoints found together; a lagging one joins), a node that
paused while isolated, and an out-of-step node resynchronising.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from typing import TYPE_CHECKING, Any

from agent.core.algorithms import initial_state, needs_initial_gradient
from agent.core.membership import (
    Found,
    Join,
    Membership,
    entry_plan,
    entry_source,
    join_iteration,
    view_at_boundary,
)
from agent.node.options import AgentError, NothingToJoin, StopRequested
from agent.node.peers import cancelled_by_us
from agent.node.state import SourceNotTraining, fetch_at_boundary, restore_state, state_from_snapshot
from agent.train.workload import node_generator
from agent.transport.client import PeerRpcError, PeerUnavailable
from agent.transport.frames import WireError
from agent.transport.state import StateSnapshot

if TYPE_CHECKING:
    from agent.node.agent import PeerAgent

# State transfers that may fail in a row before joining gives up.
FETCH_ATTEMPTS = 5
# While waiting for peers at start, the candidates that do not answer are named at most this often.
WAIT_REPORT_S = 3.0


class NoTrainingSource(Exception):
    """No live peer trains: there is no member to enter through, so the entry is planned again."""


def describe(reasons: dict[str, str]) -> str:
    """'address: reason; ...' for an error line."""
    return "; ".join(f"{address}: {reason}" for address, reason in sorted(reasons.items()))


class ClusterEntry:
    """Waiting for peers and entering (found / join / resync) on behalf of one ``PeerAgent``."""

    def __init__(self, agent: PeerAgent) -> None:
        self.agent = agent

    def needed_peers(self) -> int:
        if self.agent.options.min_peers is not None:
            return self.agent.options.min_peers
        static_only = not self.agent.options.mdns and not self.agent.options.dns_names
        return len(self.agent.options.peers) if static_only else 1

    def isolation_needed(self) -> int:
        if self.agent.options.isolation_min_peers is not None:
            return self.agent.options.isolation_min_peers
        return 1 if self.needed_peers() > 0 else 0

    async def until_stop(self, awaitable: Any) -> Any:
        """Await ``awaitable`` unless a stop is requested first (then cancel it and raise StopRequested)."""
        task = asyncio.ensure_future(awaitable)
        stop = asyncio.ensure_future(self.agent.stop.requested.wait())
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

    async def await_peers(self, needed: int, timeout: float | None) -> None:
        """Wait until ``needed`` peers answer. While waiting, every few seconds one line names each
        candidate that does not answer and why (refused, unreachable, timeout, TLS); with static peers
        only, a refusal that leaves too few peers fails at once instead of at the timeout."""
        registry, options = self.agent.registry, self.agent.options
        started = time.monotonic()
        deadline = None if timeout is None else started + timeout
        reported: dict[str, str] = {}
        last_report = started
        while len(registry.alive()) < needed:
            now = time.monotonic()
            failing = {**registry.failures, **registry.refusals}
            if failing != reported and now - last_report >= WAIT_REPORT_S:
                reported, last_report = dict(failing), now
                self.agent.log.warning(
                    "waiting for peers",
                    answered=len(registry.alive()),
                    needed=needed,
                    waited_s=round(now - started),
                    not_answering=failing,
                )
            static_only = not options.mdns and not options.dns_names
            left = [peer for peer in options.peers if peer not in registry.refusals]
            if static_only and registry.refusals and len(left) < needed:
                raise AgentError(
                    f"{len(options.peers) - len(left)} of the --peers refused this node, so {needed} can "
                    f"never answer: {describe(registry.refusals)}"
                )
            if deadline is not None and now > deadline:
                raise AgentError(
                    f"only {len(registry.alive())} of {needed} peers answered within {timeout:.0f} s"
                    + (f"; not answering: {describe(failing)}" if failing else "; no candidate found")
                )
            await self.until_stop(registry.wait_for_change(0.5))

    async def settle(self) -> None:
        if self.agent.options.settle_seconds > 0:
            # Founders that meet by discovery give late arrivals a moment so they start with one view.
            quiet_since = time.monotonic()
            while time.monotonic() - quiet_since < self.agent.options.settle_seconds:
                before = set(self.agent.registry.alive())
                await self.until_stop(
                    self.agent.registry.wait_for_change(self.agent.options.settle_seconds / 4)
                )
                if set(self.agent.registry.alive()) != before:
                    quiet_since = time.monotonic()

    async def enter(self, resync: str | None) -> None:
        """Found a view or join the running cluster (``entry_plan``); ``resync`` names the peer an
        out-of-step node re-enters through."""
        waiting_logged = ""
        while True:
            try:
                if resync is not None:
                    await self._join(resync, resync=True)
                    return
                plan = entry_plan(
                    self.agent.options.node_id,
                    self.agent.iteration,
                    self.agent.views.positions(),
                    self.agent.options.view_period,
                )
                if isinstance(plan, Found):
                    await self._found(plan)
                    return
                if isinstance(plan, Join):
                    await self._join(plan.source, resync=self.agent.state is not None, at=plan.at)
                    return
            except NoTrainingSource as error:
                # The member to enter through stopped training and no other peer trains: wait for as
                # many peers as at start (never found alone because the others went away; past
                # --startup-timeout the agent exits as at start), then plan again from fresh positions
                # (founding with the peers at the highest iteration, or waiting for them).
                self.agent.log.info("no member to enter through; planning again", reason=str(error))
                resync = None
                await self.until_stop(self.agent.registry.wait_for_change(0.5))
                await self.await_peers(self.needed_peers(), self.agent.options.startup_timeout)
                continue
            if plan.reason != waiting_logged:
                waiting_logged = plan.reason
                self.agent.log.info("waiting to enter", reason=plan.reason)
            await self.until_stop(self.agent.registry.wait_for_change(0.5))

    async def _found(self, plan: Found) -> None:
        """Start training at ``plan.iteration`` with ``plan.members``, keeping local state (a fresh
        start, a consistent resume, or nodes that paused re-founding together)."""
        start = plan.iteration
        peers = [m for m in plan.members if m != self.agent.options.node_id]
        self.agent.registry.mark_founders(peers, start)
        view = Membership.of(plan.members)
        self.agent.views.forget_left_out()
        if self.agent.state is None:
            self.agent.stream = node_generator(self.agent.config.seed, view.index(self.agent.options.node_id))
            self.agent.install_view(view, start)
            if self.agent.resume_checkpoint is not None:
                path, checkpoint = self.agent.resume_checkpoint
                self.agent.state = restore_state(
                    self.agent.problem, self.agent.config, path, checkpoint, self.agent.device
                )
                if checkpoint.rng_state is not None:
                    self.agent.stream.set_state(checkpoint.rng_state)
                self.agent.log.info("resumed from checkpoint", path=str(path), iteration=checkpoint.iteration)
            else:
                assert self.agent.operator is not None
                needs_gradient = needs_initial_gradient(self.agent.algorithm)
                initial = (
                    await self.agent.in_compute(self.agent.operator, self.agent.problem.x0)
                    if needs_gradient
                    else None
                )
                self.agent.state = initial_state(self.agent.algorithm, self.agent.problem.x0, initial)
        else:
            self.agent.install_view(view, start)
        self.agent.iteration = start
        self.agent.ready_from = start
        self.agent.boundary_state = (start, self.agent.state)  # type: ignore[assignment]
        self.agent.inbox.enter(start, 0)

    async def _join(self, source_id: str, *, resync: bool, at: int | None = None) -> None:
        """Enter a running cluster at a future boundary with a member's parameters and optimizer state
        (a late joiner, a restarted node, or an out-of-step node resynchronising). ``at``: the boundary
        the founders already count this node at (a lagging checkpoint catching up on resume)."""
        assert self.agent.config.iterations is not None
        lead = 2 * self.agent.options.view_period
        failures = 0
        while at is not None:
            # Catching up: the founders started at ``at`` counting this node; their state there is served
            # at once. If they moved on before we fetched, fall back to joining ahead of them.
            self.agent.ready_from = at
            self.agent.inbox.enter(at, 0)
            await self.agent.registry.broadcast()
            client = self.agent.registry.clients.get(source_id)
            if client is None:
                break
            self.agent.log.info(
                "catching up with founders",
                at_iteration=at,
                state_from=source_id,
                from_iteration=self.agent.iteration,
            )
            try:
                snapshot = await self.until_stop(client.fetch_state(timeout=self.agent.options.round_timeout))
            except asyncio.CancelledError:
                if cancelled_by_us():
                    raise
                break
            except (PeerUnavailable, PeerRpcError, WireError, RuntimeError):
                break
            if snapshot.iteration == at:
                self._enter_at(snapshot, at, source_id)
                return
            break
        while True:
            # Fresh statuses first: a probe answer up to --probe-interval old may lag the cluster by more
            # than the lead, and every member (not only the source) must hear of us before the boundary.
            self.agent.training = False
            self.agent.ready_from = None
            await self.agent.registry.broadcast()
            source_id = self._source_that_trains(source_id)
            status = self.agent.registry.remote_status.get(source_id)
            client = self.agent.registry.clients.get(source_id)
            if status is None or client is None:
                raise AgentError(f"could not reach {source_id} to join the running cluster")
            # Every member of the view we enter must hear our boundary before it gets there, including
            # peers our registry still backs off from (they were unreachable a moment ago: a healed cut).
            await self.agent.registry.reach([m for m in status.members if m != self.agent.options.node_id])
            furthest = max(
                [status.iteration, *(p.iteration for p in self.agent.views.positions() if p.training)]
            )
            boundary = join_iteration(furthest, self.agent.options.view_period, lead)
            if boundary >= self.agent.config.iterations:
                raise NothingToJoin(
                    f"the running cluster is at iteration {status.iteration} and finishes at "
                    f"{self.agent.config.iterations}, before the next join boundary {boundary}: "
                    "nothing to join"
                )
            self.agent.ready_from = boundary
            self.agent.inbox.enter(boundary, 0)
            await self.agent.registry.broadcast()  # tell every member now, not at its next probe
            self.agent.log.info(
                "resynchronising" if resync else "joining running cluster",
                at_iteration=boundary,
                state_from=source_id,
                from_iteration=self.agent.iteration,
            )
            try:
                snapshot: StateSnapshot = await self.until_stop(
                    fetch_at_boundary(
                        client,
                        boundary,
                        self.agent.options.round_timeout,
                        training=functools.partial(self._trains, source_id),
                    )
                )
            except SourceNotTraining as error:
                # It is re-entering itself (two out-of-step nodes that chose each other), paused or done:
                # choose again at once, through a member that trains.
                self.agent.log.info("the member stopped training; choosing again", reason=str(error))
                continue
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
                self.agent.log.warning(
                    "state transfer failed; trying again", source=source_id, error=error_text
                )
                await asyncio.sleep(self.agent.options.probe_interval)
                continue
            view = (
                await self._view_counting_us(source_id, boundary) if snapshot.iteration == boundary else None
            )
            if view is not None:
                break
            # The member was past the boundary before it heard of us (it ran faster than our announcement
            # travelled): its view there does not count us. Declare a later boundary, with more lead.
            self.agent.log.info(
                "members did not count this node at the boundary; joining later", boundary=boundary
            )
            lead *= 2
        self._enter_at(snapshot, boundary, source_id, view)

    def _trains(self, node_id: str) -> bool:
        """Whether ``node_id`` last said it trains (its latest status: a probe answer or its handshake)."""
        status = self.agent.registry.remote_status.get(node_id)
        return status is not None and status.training

    def _source_that_trains(self, chosen: str) -> str:
        """``chosen`` while it trains, else another member that does (``entry_source``); raises
        NoTrainingSource when no live peer trains."""
        source = entry_source(self.agent.options.node_id, chosen, self.agent.views.positions())
        if source is None:
            raise NoTrainingSource(f"no live peer is training (this node meant to enter through {chosen})")
        if source != chosen:
            reason = "it is not training" if chosen in self.agent.registry.alive() else "it does not answer"
            self.agent.log.info("entering through another member", chosen=chosen, source=source, why=reason)
        return source

    def _enter_at(
        self, snapshot: StateSnapshot, boundary: int, source_id: str, view: Membership | None = None
    ) -> None:
        """Take the fetched state and enter at ``boundary`` with the source's view there (it counts this
        node), or, without one, the view this node's own peer records give."""
        self.agent.state = state_from_snapshot(snapshot, self.agent.device)
        self.agent.views.forget_left_out()
        if view is None:
            view = view_at_boundary(
                self.agent.options.node_id, self.agent.registry.usable_records(), boundary
            )
        self.agent.stream = node_generator(self.agent.config.seed, view.index(self.agent.options.node_id))
        self.agent.install_view(view, boundary)
        self.agent.iteration = boundary
        self.agent.log.info(
            "fetched state", iteration=boundary, source=source_id, members=list(view.node_ids)
        )

    async def _view_counting_us(self, source_id: str, boundary: int) -> Membership | None:
        """The view the source holds at ``boundary`` if it and every member of it count this node there
        (a member still before the boundary has just been told our ready-from iteration by this very
        probe); None otherwise."""
        me = self.agent.options.node_id
        timeout = self.agent.options.round_timeout
        status = await self.agent.registry.probe_status(source_id, timeout)
        if status is None or me not in status.members:
            return None
        others = [m for m in status.members if m not in (me, source_id)]
        await self.agent.registry.reach(others)
        probes = [self.agent.registry.probe_status(m, timeout) for m in others]
        for member_status in await asyncio.gather(*probes):
            if member_status is None:
                return None
            # A member that does not train (it is re-entering itself) holds no view to count us in: it
            # takes the source's view when it enters. Only a training member past the boundary can
            # have left us out.
            if (
                member_status.training
                and member_status.iteration >= boundary
                and me not in member_status.members
            ):
                return None
        return Membership.of(status.members)
