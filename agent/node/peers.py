"""The peers a node knows: handshaken identities, their status, one gRPC client each, kept fresh.

Candidates come from discovery (mDNS, static ``--peers``, DNS names); a candidate becomes a known peer
only after a successful gRPC handshake, and liveness comes from gRPC too: every known peer is probed
(a handshake that also carries both sides' training status) every ``probe_interval`` seconds. What
the registry records feeds ``agent.core.membership.view_at_boundary``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, Protocol

from agent.core.membership import PeerRecord
from agent.discovery import Candidate
from agent.transport._generated.dpgan.v1 import dpgan_pb2 as pb
from agent.transport.client import HandshakeRefused, PeerClient, PeerRpcError, PeerUnavailable
from agent.transport.codec import PeerIdentity, identity_mismatch


class CandidateSource(Protocol):
    """What the registry needs of discovery (agent.discovery.PeerTable provides it)."""

    def candidates(self) -> Sequence[Candidate]: ...

    def confirm(self, address: str, node_id: str) -> None: ...

    def forget(self, node_id: str) -> None: ...


def record_from_status(node_id: str, address: str, status: pb.PeerStatus) -> PeerRecord:
    ready_from = status.ready_from_iteration if status.ready else None
    return PeerRecord(node_id=node_id, address=address, alive=True, ready_from=ready_from)


class PeerRegistry:
    """Known peers keyed by node id. All methods run on the agent's event loop."""

    def __init__(
        self,
        identity: PeerIdentity,
        source: CandidateSource,
        status: Callable[[], pb.PeerStatus],
        log: Any,
        *,
        probe_interval: float = 1.0,
        handshake_timeout: float = 2.0,
    ) -> None:
        self.identity = identity
        self.source = source
        self.status = status
        self.log = log
        self.probe_interval = probe_interval
        self.handshake_timeout = handshake_timeout
        self.records: dict[str, PeerRecord] = {}
        self.clients: dict[str, PeerClient] = {}
        self.remote_status: dict[str, pb.PeerStatus] = {}
        self.refusals: dict[str, str] = {}  # address -> why the handshake was refused (logged once)
        self._address_of: dict[str, str] = {}  # dialled address -> node id
        self._retry_at: dict[str, float] = {}
        self._in_flight: dict[str, asyncio.Future[str | None]] = {}
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # ---- inbound: a peer handshook with our server ---------------------------------------------------

    def on_inbound_handshake(self, request: pb.HandshakeRequest) -> tuple[bool, str]:
        """The server's handshake policy: identity checks, then remember the caller."""
        mismatch = identity_mismatch(self.identity, request)
        if mismatch is not None:
            return False, mismatch
        known = self.records.get(request.node_id)
        if known is not None and known.alive and known.address != request.advertise_address:
            return False, (
                f"node id {request.node_id!r} is already in use by a live peer at {known.address}; "
                f"this caller advertises {request.advertise_address}"
            )
        self._remember(request.node_id, request.advertise_address, request.status)
        if request.node_id not in self.clients:
            # Dial back now rather than at the next refresh: pushes need our own handshake with it.
            self.handshake(request.advertise_address)
        return True, ""

    # ---- outbound -------------------------------------------------------------------------------------

    def _remember(self, node_id: str, address: str, status: pb.PeerStatus) -> None:
        previous = self.records.get(node_id)
        record = record_from_status(node_id, address, status)
        if (
            record.ready_from is None
            and previous is not None
            and previous.alive
            and previous.ready_from is not None
        ):
            # A live peer does not become un-ready: this status was sent before it started (founders
            # record each other as ready when they start together). Only a peer that died and came
            # back starts over as not ready.
            record = replace(record, ready_from=previous.ready_from)
        self.remote_status[node_id] = status
        if previous is None or previous != record:
            self.records[node_id] = record
            self._changed.set()

    def handshake(self, address: str) -> asyncio.Future[str | None]:
        """Handshake with ``address``; concurrent callers for one address share one attempt."""
        in_flight = self._in_flight.get(address)
        if in_flight is None or in_flight.done():
            in_flight = asyncio.ensure_future(self._handshake(address))
            self._in_flight[address] = in_flight
        return in_flight

    async def _handshake(self, address: str) -> str | None:
        client = self.clients.get(self._address_of.get(address, ""))
        fresh = client is None or client.address != address
        if fresh:
            client = PeerClient(address)
        assert client is not None
        try:
            response = await client.handshake(
                self.identity, timeout=self.handshake_timeout, status=self.status()
            )
        except HandshakeRefused as refused:
            if self.refusals.get(address) != str(refused):
                self.refusals[address] = str(refused)
                self.log.error("peer refused", address=address, reason=str(refused))
            if fresh:
                await client.close()
            return None
        except (PeerUnavailable, PeerRpcError):
            if fresh:
                await client.close()
            node_id = self._address_of.get(address)
            if node_id is not None and self.records.get(node_id, PeerRecord(node_id, address)).alive:
                self.mark_dead(node_id, "probe failed")
            return None
        node_id = response.node_id
        old = self.clients.get(node_id)
        if old is not None and old is not client:
            if old.address == address:
                # Keep the channel pushes may be using: closing it would cancel them mid-stream.
                await client.close()
                client = old
            else:
                await old.close()  # the peer moved; calls on the old address fail as unavailable
        self.clients[node_id] = client
        self._address_of[address] = node_id
        self.source.confirm(address, node_id)
        self._remember(node_id, address, response.status)
        return node_id

    def mark_dead(self, node_id: str, reason: str) -> None:
        record = self.records.get(node_id)
        if record is not None and record.alive:
            self.records[node_id] = replace(record, alive=False)
            self.source.forget(node_id)
            self.log.warning("peer unreachable", peer=node_id, reason=reason)
            self._changed.set()

    async def refresh(self) -> None:
        """Handshake with new candidates and re-probe every known peer, concurrently."""
        now = time.monotonic()
        own = (self.identity.advertise_address, self.identity.node_id)
        addresses = {
            c.address for c in self.source.candidates() if c.address not in own and c.node_id not in own
        }
        addresses |= {record.address for record in self.records.values()}
        due = [a for a in sorted(addresses) if self._retry_at.get(a, 0.0) <= now]
        results = await asyncio.gather(*(self.handshake(a) for a in due), return_exceptions=True)
        for address, result in zip(due, results, strict=True):
            if isinstance(result, BaseException):
                self.log.warning("handshake failed", address=address, error=repr(result))
            # Never-seen addresses are retried quickly (peers starting up); dead ones less often.
            ok = isinstance(result, str)
            seen_before = address in self._address_of
            backoff = 2 * self.probe_interval if seen_before else min(0.25, self.probe_interval)
            self._retry_at[address] = now + (self.probe_interval if ok else backoff)

    async def maintain(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(min(0.25, self.probe_interval))

    def start(self) -> None:
        self._task = asyncio.create_task(self.maintain())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for attempt in self._in_flight.values():
            attempt.cancel()
        for client in self.clients.values():
            with contextlib.suppress(Exception):
                await client.close()

    async def wait_for_change(self, timeout: float) -> None:
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)

    def alive(self) -> list[str]:
        """Live peers we can push to (our own handshake with them succeeded)."""
        return sorted(n for n, record in self.records.items() if record.alive and n in self.clients)

    def usable_records(self) -> list[PeerRecord]:
        return [self.records[node_id] for node_id in self.alive()]

    def mark_founders(self, node_ids: Sequence[str], start: int) -> None:
        for node_id in node_ids:
            if node_id in self.records:
                self.records[node_id] = replace(self.records[node_id], ready_from=start)
