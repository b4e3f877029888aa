"""One gossip round of DPOSG over gRPC: announce, push this node's vector to its neighbours of the
round, collect theirs, and mix them with the row of the mixing matrix (``agent.core.mixing``).

Which neighbours count, and what a missed deadline or a failed push means, is decided by the view
controller (``agent.node.views``); this module only moves vectors and reports what happened.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from agent.core.config import TrainConfig
from agent.core.membership import PeerEvent
from agent.core.mixing import mix_row, renormalized_row, row_for_round
from agent.node.delta_wires import DeltaWires, RoundWires
from agent.node.edge_gossip import EdgeGossip
from agent.node.freezes import FreezeDetector
from agent.node.peers import PeerRegistry
from agent.node.pushes import Pushes
from agent.node.views import ViewController
from agent.transport.inbox import Inbox, InboxMessage
from agent.transport.positions import PeerPositions
from agent.transport.server import GossipServer
from agent.transport.wire_choice import WireChoice

# Granularity of the round deadline (see GossipRounds._collect).
WAIT_SLICE_SECONDS = 0.1
# How long a neighbour that missed a deadline has to answer a status probe (a live agent's event loop
# answers in milliseconds; a frozen or cut-off one never does).
PROBE_SECONDS = 0.5
# "round mixed without neighbours" is logged when the neighbours missing change, else at most this often,
# with the number of such rounds since the previous line (``rounds``): views that disagree for a minute
# logged thousands of lines, one per round.
MIXED_WITHOUT_LOG_SECONDS = 10.0


@dataclass
class Traffic:
    """What one iteration (or a run of solo iterations) cost and whom it mixed with."""

    compute_seconds: float = 0.0
    communication_seconds: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0
    participants: set[str] = field(default_factory=set)
    iterations: int = 1
    # A neighbour refused our vector as stale: it has moved past this position (we are behind it).
    behind: set[str] = field(default_factory=set)
    troubled: bool = False  # a neighbour missed the deadline, was unreachable or is behind


@dataclass(frozen=True)
class RoundSettings:
    rounds: int
    wire_dtype: str
    chunk_bytes: int
    round_timeout: float
    pace: str  # auto | on | off
    # Compressed gossip (agent.core.engine.CompressedGossip); None: exact DPOSG, x sent as it is.
    compression: Any = None


class GossipRounds:
    """Runs gossip rounds for the agent. ``deadline_seconds`` gives the current per-round deadline
    (longer while a stop is being agreed); ``stop_reached`` says the agreed stop position was reached, so
    a round still waiting can give up at once."""

    def __init__(
        self,
        config: TrainConfig,
        settings: RoundSettings,
        *,
        views: ViewController,
        registry: PeerRegistry,
        inbox: Inbox,
        server: GossipServer,
        positions: PeerPositions,
        in_compute: Callable[..., Awaitable[Any]],
        deadline_seconds: Callable[[], float],
        stop_event: asyncio.Event,
        log: Any,
    ) -> None:
        self.config = config
        self.settings = settings
        self.views = views
        self.registry = registry
        self.inbox = inbox
        self.server = server
        self.positions = positions
        self.in_compute = in_compute
        self.deadline_seconds = deadline_seconds
        self.stop_event = stop_event
        self.log = log
        self._mixed_without: tuple[tuple[str, ...], float] | None = None  # last line: (missing, when)
        self._mixed_without_rounds = 0  # rounds mixed without a neighbour since that line
        self.edges = EdgeGossip(settings.compression) if settings.compression is not None else None
        # Exact gossip: the wire of each neighbour (float32-delta codes per edge). wire_dtype float32-auto:
        # per vector, float32 or float32-delta, whichever is faster here (compressed gossip sends its own
        # codes: nothing to choose).
        self.deltas = DeltaWires() if self.edges is None else None
        auto = settings.wire_dtype == "float32-auto" and self.edges is None
        self.wire_choice = WireChoice() if auto else None
        self.freezes = FreezeDetector()  # started by the first round, on the running loop
        self.pushes = Pushes(
            settings,
            views=views,
            registry=registry,
            positions=positions,
            in_compute=in_compute,
            deadline_seconds=deadline_seconds,
            stop_event=stop_event,
            freezes=self.freezes,
            log=log,
            deltas=self.deltas,
            wire_choice=self.wire_choice,
        )
        self._pending_announcements: set[asyncio.Future[bool]] = set()
        self._received_cursor = server.bytes_received
        self._references_epoch: int | None = None

    def paced(self) -> bool:
        pace = self.settings.pace
        return pace == "on" or (pace == "auto" and self.views.schedule.period > 1)

    def _wire_dtype(self) -> str:
        """The dtype of this round's vector: the run's, or for float32-auto the wire choice's."""
        if self.wire_choice is None:
            return self.settings.wire_dtype
        wire_dtype, changed = self.wire_choice.next_wire_dtype()
        if changed:
            state = "on" if self.wire_choice.coding else "off"
            self.log.info(f"float32-auto: coding {state}", **self.wire_choice.describe())
        return wire_dtype

    def _stop_agreed(self) -> bool:
        return self.pushes.stop_agreed()

    def _exited(self, node_id: str, reason: str) -> bool:
        return self.pushes.exited(node_id, reason)

    async def _collect(
        self, iteration: int, round_: int, wanted: list[str]
    ) -> dict[str, InboxMessage] | None:
        """The neighbours' vectors for the round, waiting up to the deadline; None when the agreed stop
        was reached meanwhile (the round is abandoned, the state before this iteration is kept).

        The deadline counts time this process ran, in slices: a slice that took much longer than asked
        (this process was frozen: SIGSTOP, a paused VM) counts as one slice, so a node that thaws gives its
        neighbours a whole deadline instead of timing them out at once. The deadline is re-read every
        slice, so one that grows (a stop being agreed) applies to a wait already in progress.
        """
        loop = asyncio.get_running_loop()
        pending = set(wanted)
        arrived: dict[str, InboxMessage] = {}
        waited = 0.0
        while True:
            if self.stop_event.is_set():
                return None
            if pending and self._stop_agreed():
                # While a stop is agreed, a neighbour whose port now refuses connections (the registry's
                # latest handshake with it) exited after our push reached it: what it delivered before
                # exiting is taken (at the stop it sends its last vector and exits), nothing more comes.
                gone = [node_id for node_id in pending if self._exited(node_id, "")]
                if gone:
                    got = await self.inbox.wait_for_messages(iteration, round_, gone, timeout=0)
                    arrived |= got
                    pending -= set(gone)
            remaining = self.deadline_seconds() - waited
            if not pending or remaining <= 0:
                return arrived
            step = min(WAIT_SLICE_SECONDS, remaining)
            began = loop.time()
            got = await self.inbox.wait_for_messages(iteration, round_, pending, timeout=step)
            waited += min(loop.time() - began, step)
            arrived |= got
            pending -= got.keys()

    def _note_mixed_without(self, missing: tuple[str, ...], iteration: int, round_: int) -> None:
        """Log a round mixed without some neighbours: at once when the missing ones change, else at most
        every MIXED_WITHOUT_LOG_SECONDS (``rounds``: such rounds since the previous line, this one
        included)."""
        now = time.monotonic()
        self._mixed_without_rounds += 1
        last = self._mixed_without
        if last is not None and last[0] == missing and now - last[1] < MIXED_WITHOUT_LOG_SECONDS:
            return
        self.log.info(
            "round mixed without neighbours",
            iteration=iteration,
            round=round_,
            missing=list(missing),
            rounds=self._mixed_without_rounds,
        )
        self._mixed_without, self._mixed_without_rounds = (missing, now), 0

    async def round(
        self, x: torch.Tensor, iteration: int, round_: int, traffic: Traffic
    ) -> torch.Tensor | None:
        """Mix ``x`` (1-D float32, the full parameter vector) with this round's neighbours; None when the
        agreed stop position was reached while the round waited."""
        views = self.views
        view = views.view
        if view.epoch != self._references_epoch:
            # float32-delta: members that left the view keep no reference vectors at either end (a
            # returning member gets the vector itself first).
            members = set(view.node_ids)
            self.server.retain_references(members)
            if self.deltas is not None:
                self.deltas.retain(members)
            self._references_epoch = view.epoch
        round_index = iteration * self.settings.rounds + round_
        row = views.schedule.row(views.index, round_index)
        self.freezes.start()
        neighbours = [view.node_id(j) for j, _ in row if j != views.index]
        live = views.live_neighbours(neighbours, iteration)
        self.inbox.expect(iteration, round_)
        if not live:
            if neighbours:
                traffic.troubled = True
            return x if len(row) == 1 else mix_row(renormalized_row(row, {views.index}), {views.index: x})
        # Announce first, so neighbours already in this round can send to us while we encode.
        announcements: dict[str, asyncio.Future[bool]] = (
            {n: asyncio.ensure_future(self.pushes.announce(n, iteration, round_)) for n in live}
            if self.paced()
            else {}
        )
        edges, deltas = self.edges, self.deltas
        sent: dict[str, Any] = {}
        prepared: RoundWires | None = None
        try:
            if deltas is not None:
                wire_dtype = self._wire_dtype()
                prepared = await self.in_compute(deltas.prepare, x, live, (iteration, round_), wire_dtype)
                wires = prepared.wires
                if self.wire_choice is not None:
                    for wire in prepared.coded():
                        self.wire_choice.observe_coding(
                            4 * x.numel(), wire.payload_bytes, wire.coding_seconds
                        )
            else:
                assert edges is not None
                outgoing = await self.in_compute(edges.outgoing, x, live, views.index, round_index, view)
                wires = {node_id: wire for node_id, (_, wire) in outgoing.items()}
                sent = {node_id: message for node_id, (message, _) in outgoing.items()}
            # A push in flight finishes; a paced push still waiting for its neighbour is skipped once the
            # agreed stop is reached (_paced_wait).
            delivered = await asyncio.gather(
                *(
                    self.pushes.push(
                        node_id,
                        wires[node_id],
                        iteration,
                        round_,
                        traffic,
                        announcements.get(node_id),
                        prepared,
                    )
                    for node_id in live
                )
            )
            if edges is not None:
                for node_id, ok in zip(live, delivered, strict=True):
                    if not ok:
                        edges.undelivered(node_id)
                        del sent[node_id]
        except BaseException:
            for task in announcements.values():
                task.cancel()
            raise
        # An announcement still in flight is left to finish (it has its own timeout): cancelling it when
        # our push was quick aborted the call before the neighbour had it, and the neighbour then held
        # its push to us until the round deadline (10 s stalls on one-peer graphs with t = 2).
        for task in announcements.values():
            if not task.done():
                self._pending_announcements.add(task)
                task.add_done_callback(self._pending_announcements.discard)
        reachable = [node_id for node_id in live if views.health[node_id].alive]
        # A neighbour that called us stale has left us out: waiting for it would only cost the deadline.
        waited = [node_id for node_id in reachable if node_id not in traffic.behind]
        messages = await self._collect(iteration, round_, waited)
        if messages is None:
            return None
        # A neighbour we could not reach may still have reached us: at an agreed stop it exits right
        # after its last round, and the ack of our push to it is lost with it. Its vector is used (it
        # mixed ours): leaving it out would make this node's stopped state differ from an uninterrupted run.
        unwaited = [node_id for node_id in live if node_id not in reachable]
        if unwaited:
            messages |= await self.inbox.wait_for_messages(iteration, round_, unwaited, timeout=0)
        # Everything the server read since the last round (a neighbour's push may arrive before we
        # even encode ours): each byte is counted once, in the round that read it.
        received = self.server.bytes_received
        traffic.bytes_received += received - self._received_cursor
        self._received_cursor = received
        arrived = {view.index(n): m.epoch for n, m in messages.items()}
        schedule_row = row
        row, missing, other_view = row_for_round(row, views.index, arrived, view.epoch)
        late = [n for n in reachable if view.index(n) in missing and n not in traffic.behind]
        timeout = min(PROBE_SECONDS, self.settings.round_timeout / 2)
        probes = await asyncio.gather(*(self.registry.probe_status(n, timeout) for n in late))
        verdicts = {n: views.classify_late(status, iteration) for n, status in zip(late, probes, strict=True)}
        for node_id in reachable:
            j = view.index(node_id)
            if node_id in traffic.behind:
                traffic.troubled = True
            elif j in missing:
                traffic.troubled = True
                verdict = verdicts.get(node_id)
                if verdict is PeerEvent.MISSED_DEADLINE:
                    views.record(node_id, verdict, iteration, "late, but in step")
                elif verdict is PeerEvent.OUT_OF_STEP:
                    views.record(node_id, verdict, iteration, "no vector by the round deadline")
            elif j in other_view:
                # Mixed under another view: left out of this round, but it is alive.
                if (node_id, messages[node_id].epoch) not in views.mismatch_logged:
                    views.mismatch_logged.add((node_id, messages[node_id].epoch))
                    self.log.info("neighbour holds another view; not mixing with it", neighbour=node_id)
            else:
                views.record(node_id, PeerEvent.DELIVERED, iteration)
        traffic.participants.update(view.node_id(j) for j, _ in row if j != views.index)
        left_out = sorted(n for n in reachable if view.index(n) in missing or view.index(n) in other_view)
        if left_out:
            self._note_mixed_without(tuple(left_out), iteration, round_)
        if edges is not None:
            present = {j for j, _ in row}
            mixable = {n: m for n, m in messages.items() if view.index(n) in present}
            return await self.in_compute(edges.mix, x, schedule_row, views.index, view, sent, mixable)
        vectors = {views.index: x} | {
            j: messages[view.node_id(j)].vector.to(x.device) for j, _ in row if j != views.index
        }
        return await self.in_compute(mix_row, row, vectors)
