"""Moving this node's vector of a gossip round to each neighbour: announcing the round, waiting until the
neighbour has entered it (pacing), pushing with retries that a frozen process or an agreed stop calls for,
and, on the float32 wires, the fallback for a neighbour that lost its reference (``agent.node.delta_wires``).

What a failed push means for the view is the view controller's (``agent.node.views``); this module reports
it there and moves bytes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc

from agent.core.membership import PeerEvent
from agent.node.delta_wires import DeltaWires, RoundWires
from agent.node.freezes import FreezeDetector
from agent.node.peers import CONNECTION_REFUSED, PeerRegistry, cancelled_by_us
from agent.node.views import ViewController
from agent.transport._generated.dpgan.v1 import dpgan_pb2 as pb
from agent.transport.client import PeerRpcError, PeerUnavailable
from agent.transport.positions import PeerPositions
from agent.transport.wire_choice import WireChoice

if TYPE_CHECKING:
    from agent.node.gossip import RoundSettings, Traffic

PUSH_RETRY_SECONDS = 0.01
# A call that took this much longer than its timeout means this process was frozen meanwhile (the
# server's stall limits make the same allowance: agent/transport/watchdog.py).
FROZEN_SLACK_SECONDS = 1.0


class Pushes:
    """A node's pushes to its neighbours. ``deadline_seconds`` gives the current per-round deadline (longer
    while a stop is being agreed)."""

    def __init__(
        self,
        settings: RoundSettings,
        *,
        views: ViewController,
        registry: PeerRegistry,
        positions: PeerPositions,
        in_compute: Callable[..., Awaitable[Any]],
        deadline_seconds: Callable[[], float],
        stop_event: asyncio.Event,
        freezes: FreezeDetector,
        log: Any,
        deltas: DeltaWires | None,
        wire_choice: WireChoice | None,
    ) -> None:
        self.settings = settings
        self.views = views
        self.registry = registry
        self.positions = positions
        self.in_compute = in_compute
        self.deadline_seconds = deadline_seconds
        self.stop_event = stop_event
        self.freezes = freezes
        self.log = log
        self.deltas = deltas
        self.wire_choice = wire_choice

    async def announce(self, node_id: str, iteration: int, round_: int) -> bool:
        """Tell a neighbour of this round that we entered it; False if it cannot be reached."""
        client = self.registry.clients.get(node_id)
        if client is None:
            return False  # push() records it
        try:
            ack = await client.announce(
                iteration=iteration,
                round=round_,
                epoch=self.views.view.epoch,
                timeout=self.settings.round_timeout,
            )
        except PeerUnavailable as error:
            self.views.record(node_id, PeerEvent.UNREACHABLE, iteration, str(error))
            return False
        except (PeerRpcError, RuntimeError) as error:  # RuntimeError: the client lost its handshake
            self.log.debug("announce failed", neighbour=node_id, error=str(error))
            return True
        except asyncio.CancelledError:
            if cancelled_by_us():
                raise
            return True  # the channel was replaced under the call; the push finds out what happened
        if not ack.accepted:
            self.log.debug("announce refused", neighbour=node_id, reason=ack.reason)
        return True

    async def paced_wait(
        self, node_id: str, position: tuple[int, int], announcement: asyncio.Future[bool], deadline: float
    ) -> bool:
        """Wait until the neighbour has entered ``position``; True to push now, False to skip the push
        (the neighbour is unreachable, or the agreed stop was reached: the round will not be mixed).

        Our own announcement's ack is not waited for: under a congested link it can come back after
        the neighbour's announcement. Past the deadline we push anyway; its inbox buffers or refuses
        as it would without pacing.
        """
        reached = asyncio.ensure_future(
            self.positions.wait_reached(node_id, position, deadline - time.monotonic())
        )
        stop = asyncio.ensure_future(self.stop_event.wait())
        pending: set[asyncio.Future[Any]] = {reached, stop, announcement}
        try:
            while True:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if stop in done:
                    return False
                if announcement in done and not announcement.result():
                    if self.registry.clients.get(node_id) is None:
                        self.views.record(node_id, PeerEvent.UNREACHABLE, position[0], "no connection")
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

    async def push(
        self,
        node_id: str,
        wire: Any,
        iteration: int,
        round_: int,
        traffic: Traffic,
        announcement: asyncio.Future[bool] | None = None,
        prepared: RoundWires | None = None,
    ) -> bool:
        """Push ``wire`` to ``node_id``; True when the neighbour accepted it (now or buffered ahead).
        ``prepared``: the round's wires of exact gossip, whose fallback goes to a neighbour that refuses a
        float32-delta push for want of its reference, and whose references follow the outcome."""
        ack = await self.deliver(node_id, wire, iteration, round_, traffic, announcement)
        self._count(wire, ack)
        if prepared is None or self.deltas is None:
            return ack is not None and ack.accepted
        if ack is not None and ack.status == pb.PUSH_STATUS_REFERENCE_MISSING:
            self.log.info("neighbour holds no reference; sending the vector itself", neighbour=node_id)
            wire = await self.in_compute(prepared.fallback)
            ack = await self.deliver(node_id, wire, iteration, round_, traffic)
            self._count(wire, ack)
        accepted = ack is not None and ack.accepted
        self.deltas.pushed(node_id, prepared, wire, accepted)
        return accepted

    def _count(self, wire: Any, ack: pb.PushAck | None) -> None:
        """float32-auto's count of vectors sent, by encoding: those the neighbour answered."""
        if self.wire_choice is not None and ack is not None:
            self.wire_choice.count_sent(wire.wire_dtype)

    async def deliver(
        self,
        node_id: str,
        wire: Any,
        iteration: int,
        round_: int,
        traffic: Traffic,
        announcement: asyncio.Future[bool] | None = None,
    ) -> pb.PushAck | None:
        """Push ``wire`` to ``node_id`` until the neighbour answers or the deadline passes; its answer, or
        None when it could not be reached (recorded with the view controller)."""
        started = time.monotonic()
        deadline = started + self.deadline_seconds()
        if announcement is not None and not await self.paced_wait(
            node_id, (iteration, round_), announcement, deadline
        ):
            return None
        ack: pb.PushAck | None = None
        thawed = False
        attempts = 0
        while ack is None:
            attempts += 1
            client = self.registry.clients.get(node_id)
            timeout = max(0.1, deadline - time.monotonic())
            call_started = time.monotonic()
            try:
                if client is None:
                    raise PeerUnavailable(f"no connection to {node_id}")
                sent_before = client.bytes_sent
                try:
                    ack = await client.push_vector(
                        wire,
                        iteration=iteration,
                        round=round_,
                        epoch=self.views.view.epoch,
                        chunk_bytes=self.settings.chunk_bytes,
                        timeout=timeout,
                    )
                    if self.wire_choice is not None:
                        pushed = client.bytes_sent - sent_before
                        self.wire_choice.observe_push(pushed, time.monotonic() - call_started)
                finally:
                    traffic.bytes_sent += client.bytes_sent - sent_before
                # A neighbour still finishing an earlier round refuses us as too far ahead; it will get
                # there (partners of time-varying graphs drift apart by up to a period), so try again.
                if ack.status == pb.PUSH_STATUS_TOO_FAR_AHEAD and time.monotonic() <= deadline:
                    ack = None
                    await asyncio.sleep(PUSH_RETRY_SECONDS)
                continue
            except asyncio.CancelledError:
                if cancelled_by_us():
                    raise
                reason = "push cancelled by a channel change"  # the registry replaced the channel
            # RuntimeError: the client lost its handshake; UsageError: its channel was closed meanwhile.
            except (PeerUnavailable, PeerRpcError, RuntimeError, grpc.aio.UsageError) as error:
                reason = str(error) or type(error).__name__
                if isinstance(error, PeerRpcError):
                    self.views.record(node_id, PeerEvent.UNREACHABLE, iteration, reason)
                    return None
                if self.stop_agreed() and self.exited(node_id, reason):
                    # A stop is being agreed and nothing listens at the neighbour's address any more: it
                    # exited (it stopped, or was killed); a frozen process would still accept connections.
                    # Retrying for the stop grace only held this node's own stop back (11 s after a kill).
                    self.views.record(node_id, PeerEvent.UNREACHABLE, iteration, reason)
                    return None
                if (
                    isinstance(error, PeerUnavailable)
                    and error.timed_out
                    and not thawed
                    and (
                        time.monotonic() - call_started > timeout + FROZEN_SLACK_SECONDS
                        or self.freezes.frozen_since(call_started)
                    )
                ):
                    # This process itself was frozen during the call (it took far longer than its
                    # timeout, or the freeze detector saw the process stand still): the neighbour is not
                    # to blame; give it one whole deadline again.
                    thawed = True
                    started = time.monotonic()
            # While a stop is being agreed the deadline grows (stop grace): a neighbour that failed may be
            # frozen (probes time out and the registry replaces its channel) and thaw in time to stop at
            # the same boundary, so push again rather than leave it out (the stopped state would then
            # differ from an uninterrupted run). Without a stop pending, the deadline is one round timeout.
            deadline = started + self.deadline_seconds()
            retry = self.stop_agreed() or thawed
            if not retry or self.stop_event.is_set() or time.monotonic() >= deadline:
                self.views.record(node_id, PeerEvent.UNREACHABLE, iteration, reason)
                return None
            await asyncio.sleep(PUSH_RETRY_SECONDS * 10)
        # STALE means the neighbour moved past this position: we are behind it. Not after a retry, though:
        # an earlier attempt whose answer was lost (this process froze mid-call) may have been delivered.
        if ack.status == pb.PUSH_STATUS_STALE and attempts == 1:
            traffic.behind.add(node_id)
        if not ack.accepted:
            self.log.debug("push refused", neighbour=node_id, reason=ack.reason)
        return ack

    def stop_agreed(self) -> bool:
        """A stop is being agreed: the deadline grew from one round timeout to the stop grace."""
        return self.settings.round_timeout < self.deadline_seconds()

    def exited(self, node_id: str, reason: str) -> bool:
        """Whether nothing listens at the neighbour's address any more: this push, or the registry's last
        handshake with it, was refused a connection."""
        return CONNECTION_REFUSED in reason.lower() or self.registry.refuses_connections(node_id)


__all__ = ["Pushes"]
