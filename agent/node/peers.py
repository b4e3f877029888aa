"""The peers a node knows: handshaken identities, their status, one gRPC client each, kept fresh.

Candidates come from discovery (mDNS, static ``--peers``, DNS names); a candidate becomes a known peer
only after a successful gRPC handshake, and liveness comes from gRPC too: every known peer is probed
(a handshake that also carries both sides' training status) every ``probe_interval`` seconds. What
the registry records feeds ``agent.core.membership.view_at_boundary``.

Identity: a peer is its node id *and* its incarnation (``instance_id``, random, new at every start).

- The same node id and incarnation answering at another address (a name resolving to 127.0.0.1 and
  ::1, two IPs of one host, an advertised name next to a dialled IP) is the same peer: the registry
  keeps one client (the first address that worked) and remembers the other address as an alias, never
  dialled again while the peer is alive and never refused.
- The same node id with another incarnation is a restart: the new incarnation replaces the old one at
  once (old client closed, a fresh record from the new status), logged once as "peer restarted". An
  incarnation that was replaced and then answers again to a handshake started later means two live
  processes share one node id: that one is refused, naming both incarnations.

Candidates that never answered are retried with exponential backoff and jitter (``backoff_initial``
doubling up to ``backoff_cap``), their failure reason logged once per address (connection refused,
timeout, not a dpgan server, refused handshake), and dropped after ``give_up_tries`` failures or
``give_up_seconds`` until discovery lists them anew (the address leaves a source's list and comes back,
or its candidate changes) or the peer handshakes with us. Static ``--peers`` are never dropped, only
backed off. Known peers (the address a handshake confirmed) are never dropped: they are probed every
``probe_interval``, after failures at most every 2 × ``probe_interval``, so a healed peer is found fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final, Protocol

import grpc

from agent.core.membership import PeerRecord
from agent.discovery import SOURCE_STATIC, Candidate
from agent.transport._generated.dpgan.v1 import dpgan_pb2 as pb
from agent.transport.client import HandshakeRefused, PeerClient, PeerRpcError, PeerUnavailable
from agent.transport.identity import PeerIdentity, identity_mismatch
from agent.transport.tls import TransportSecurity

BACKOFF_INITIAL_S: Final = 0.25
BACKOFF_CAP_S: Final = 30.0
GIVE_UP_TRIES: Final = 8
GIVE_UP_SECONDS: Final = 120.0
JITTER: Final = 0.25  # each delay is drawn from [(1 - JITTER) * d, d]
CONNECTION_REFUSED: Final = "connection refused"  # a handshake failure reason: nothing listens there


class CandidateSource(Protocol):
    """What the registry needs of discovery (agent.discovery.PeerTable provides it).

    A source may also offer ``alias(address, node_id)`` (PeerTable does): the address answered as
    ``node_id`` but is not the address the registry uses for it."""

    def candidates(self) -> Sequence[Candidate]: ...

    def confirm(self, address: str, node_id: str) -> None: ...

    def forget(self, node_id: str) -> None: ...


def cancelled_by_us() -> bool:
    """Inside ``except CancelledError``: True when this task itself is being cancelled (re-raise), False
    when gRPC cancelled the call because the registry closed its channel (a peer moved or restarted)."""
    current = asyncio.current_task()
    return current is not None and current.cancelling() > 0


def record_from_status(node_id: str, address: str, status: pb.PeerStatus) -> PeerRecord:
    ready_from = status.ready_from_iteration if status.ready else None
    return PeerRecord(node_id=node_id, address=address, alive=True, ready_from=ready_from)


def failure_reason(error: BaseException, timeout: float | None = None) -> str:
    """Why a handshake with a candidate failed, in words an operator can act on."""
    if isinstance(error, HandshakeRefused):
        return f"handshake refused: {error.reason}"
    cause = error.__cause__
    if isinstance(cause, grpc.aio.AioRpcError):
        code, details = cause.code(), cause.details() or ""
        lowered = details.lower()
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            within = f" within {timeout:g} s" if timeout else ""
            return f"timeout (no answer{within})"
        if code == grpc.StatusCode.UNIMPLEMENTED:
            return "not a dpgan server (a gRPC server without the dpgan Gossip service)"
        if CONNECTION_REFUSED in lowered:
            return CONNECTION_REFUSED
        if "http/2" in lowered or "http2" in lowered or "frame" in lowered:
            return f"not a dpgan server (no gRPC/HTTP2 answer: {_last_error(details)})"
        if "socket closed" in lowered or "connection reset" in lowered or "end of tcp stream" in lowered:
            return "not a dpgan server (it closed the connection without a gRPC answer)"
        if code == grpc.StatusCode.UNAVAILABLE:
            return f"unreachable ({_last_error(details)})"
        return f"not a dpgan server ({code.name}: {_last_error(details)})"
    if isinstance(error, PeerUnavailable | PeerRpcError):
        return f"unreachable ({error})"
    return f"handshake failed: {error!r}"


def _last_error(details: str) -> str:
    # "failed to connect to all addresses; last error: UNAVAILABLE: ipv4:1.2.3.4:5: Socket closed"
    return details.rsplit(": ", 1)[-1] if "last error" in details else details


@dataclass
class _Attempts:
    """Failed handshakes with one address since it last answered (or was listed anew)."""

    failures: int = 0
    first_failure: float = 0.0
    dropped: bool = False
    dropped_candidate: Candidate | None = None  # what discovery listed when it was dropped
    absent: bool = False  # discovery stopped listing it after the drop


_STALE = object()  # a handshake answered by an incarnation replaced while it was in flight


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
        backoff_initial: float = BACKOFF_INITIAL_S,
        backoff_cap: float = BACKOFF_CAP_S,
        give_up_tries: int = GIVE_UP_TRIES,
        give_up_seconds: float = GIVE_UP_SECONDS,
        rng: random.Random | None = None,
        security: TransportSecurity | None = None,
    ) -> None:
        self.identity = identity
        self.security = security
        self.source = source
        self.status = status
        self.log = log
        self.probe_interval = probe_interval
        self.handshake_timeout = handshake_timeout
        self.backoff_initial = backoff_initial
        self.backoff_cap = backoff_cap
        self.give_up_tries = give_up_tries
        self.give_up_seconds = give_up_seconds
        self.rng = rng if rng is not None else random.Random()
        self.records: dict[str, PeerRecord] = {}
        self.clients: dict[str, PeerClient] = {}  # only clients whose handshake succeeded
        self.remote_status: dict[str, pb.PeerStatus] = {}
        self.instances: dict[str, str] = {}  # node id -> its incarnation (instance_id)
        self.aliases: dict[str, str] = {}  # address -> node id, for addresses not used for that node
        self.refusals: dict[str, str] = {}  # address -> why the handshake was refused (logged once)
        self.failures: dict[str, str] = {}  # address -> why its latest handshake failed (any reason)
        self._logged: dict[str, str] = {}  # address -> the failure reason last logged for it
        self._address_of: dict[str, str] = {}  # dialled address -> node id
        self._retired: dict[str, dict[str, float]] = {}  # node id -> replaced incarnation -> when
        self._attempts: dict[str, _Attempts] = {}
        self._listed: dict[str, Candidate] = {}  # address -> what discovery lists for it
        self._retry_at: dict[str, float] = {}
        self._in_flight: dict[str, asyncio.Future[str | None]] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # ---- identity: one peer per node id and incarnation ---------------------------------------------

    def _incarnation(
        self, node_id: str, instance: str, address: str, started: float, keep: PeerClient | None = None
    ) -> object:
        """Apply the incarnation rule before a handshake's result is used: None to go on, a refusal
        reason (str), or _STALE when an older incarnation answered a handshake begun before it was
        replaced (drop the answer quietly). ``keep``: the client that just reached the new incarnation
        (a probe on the old channel to the same address), not closed with the old incarnation."""
        known = self.instances.get(node_id)
        if known is None:
            self.instances[node_id] = instance
            return None
        if known == instance:
            return None
        retired = self._retired.setdefault(node_id, {})
        if instance in retired:
            if started < retired[instance]:
                return _STALE
            return (
                f"node id {node_id!r} is used by two live processes (incarnations {instance} at "
                f"{address} and {known}); node ids must be unique"
            )
        retired[known] = time.monotonic()
        self.instances[node_id] = instance
        old = self.clients.pop(node_id, None)
        if old is not None and old is not keep:
            self._close_later(old)
        self.records.pop(node_id, None)
        self.remote_status.pop(node_id, None)
        self._drop_aliases(node_id)
        self.log.info("peer restarted", peer=node_id, address=address, instance=instance, previous=known)
        self._changed.set()
        return None

    def _add_alias(self, address: str, node_id: str) -> None:
        self._address_of[address] = node_id
        if self.aliases.get(address) == node_id:
            return
        self.aliases[address] = node_id
        self.log.info(
            "peer also answers at another address; keeping the first",
            peer=node_id,
            address=self.records[node_id].address if node_id in self.records else None,
            alias=address,
        )
        alias = getattr(self.source, "alias", None)
        if alias is not None:
            alias(address, node_id)

    def _drop_aliases(self, node_id: str) -> None:
        for address in [a for a, owner in self.aliases.items() if owner == node_id]:
            del self.aliases[address]

    def _close_later(self, client: PeerClient) -> None:
        task = asyncio.ensure_future(client.close())
        self._closing.add(task)  # type: ignore[arg-type]
        task.add_done_callback(self._closing.discard)

    # ---- inbound: a peer handshook with our server ---------------------------------------------------

    def on_inbound_handshake(self, request: pb.HandshakeRequest) -> tuple[bool, str]:
        """The server's handshake policy: identity checks, then remember the caller."""
        mismatch = identity_mismatch(self.identity, request)
        if mismatch is not None:
            return False, mismatch
        node_id, advertised = request.node_id, request.advertise_address
        verdict = self._incarnation(node_id, request.instance_id, advertised, time.monotonic())
        if isinstance(verdict, str):
            self._log_failure(advertised, verdict)
            return False, verdict
        known = self.records.get(node_id)
        client = self.clients.get(node_id)
        if known is not None and known.alive and client is not None and known.address != advertised:
            # Another address of a live peer we already talk to: keep ours, remember this one.
            self._remember(node_id, known.address, request.status)
            self._add_alias(advertised, node_id)
            return True, ""
        self._remember(node_id, advertised, request.status)
        usable = client is not None and client.address == advertised and known is not None and known.alive
        if not usable:
            # It is alive and says so: forget its failures and dial back now rather than at the next
            # refresh (pushes need our own handshake with it; a healed peer must not wait out a backoff).
            self._relisted(advertised)
            self.handshake(advertised)
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
            # Within one incarnation a live peer does not become un-ready: this status was sent before
            # it started (founders record each other as ready when they start together). A restart
            # (a new instance_id) dropped the previous record, so a new incarnation starts over; a
            # ready status (even from a later boundary, for a node that re-joins) is always taken.
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

    def _primary_of(self, address: str) -> str | None:
        """The node id whose record uses ``address``, if any."""
        node_id = self._address_of.get(address)
        record = self.records.get(node_id) if node_id is not None else None
        return node_id if record is not None and record.address == address else None

    async def _handshake(self, address: str) -> str | None:
        started = time.monotonic()
        owner = self._primary_of(address)
        current = self.clients.get(owner) if owner is not None else None
        # A live peer is probed on the channel pushes use; anything else gets a fresh channel, which
        # connects at once (a failed channel would wait out gRPC's own reconnect backoff).
        reuse = current is not None and current.address == address and self.records[owner].alive
        try:
            client = current if reuse and current is not None else PeerClient(address, security=self.security)
        except ValueError as error:  # e.g. a peer that advertises no usable address
            self._failed(address, f"not a dialable address: {error}")
            return None
        try:
            response = await client.handshake(
                self.identity, timeout=self.handshake_timeout, status=self.status()
            )
        except asyncio.CancelledError:
            if not reuse:
                await client.close()
            raise
        except Exception as error:  # every failure is named and backed off, never raised
            reason = failure_reason(error, self.handshake_timeout)
            if isinstance(error, HandshakeRefused):
                self.refusals[address] = str(error)
            if reuse:
                # A refused probe left this client without a handshake: never hand it out again.
                if self.clients.get(owner) is client:  # type: ignore[arg-type]
                    del self.clients[owner]  # type: ignore[arg-type]
                self._close_later(client)
            else:
                await client.close()
            self._failed(address, reason, dead=owner if reuse else None)
            return None
        node_id = response.node_id
        verdict = self._incarnation(node_id, response.instance_id, address, started, keep=client)
        if verdict is not None:
            if not reuse:
                await client.close()
            if isinstance(verdict, str):
                self.refusals[address] = verdict
                self._failed(address, verdict, dead=owner if reuse else None)
            return None
        self._succeeded(address)
        record = self.records.get(node_id)
        current = self.clients.get(node_id)
        if current is not None and current is not client:
            if record is not None and record.alive and current.address != address:
                # The same incarnation at another address: one peer, one client (the first that worked).
                await client.close()
                self._remember(node_id, record.address, response.status)
                self._add_alias(address, node_id)
                return node_id
            # The peer moved or came back: calls on the old channel fail as unavailable or cancelled.
            self._close_later(current)
        self.clients[node_id] = client
        self.aliases.pop(address, None)
        self._address_of[address] = node_id
        self.source.confirm(address, node_id)
        self._remember(node_id, address, response.status)
        return node_id

    # ---- failures and backoff ------------------------------------------------------------------------

    def _known(self, address: str) -> bool:
        """A peer's confirmed address (alive or not): probed forever, never dropped."""
        return self._primary_of(address) is not None

    def _succeeded(self, address: str) -> None:
        self._attempts.pop(address, None)
        self.failures.pop(address, None)
        self.refusals.pop(address, None)
        if self._logged.pop(address, None) is not None:
            self.log.info("candidate answers now", address=address)
        self._retry_at[address] = time.monotonic() + self.probe_interval

    def _failed(self, address: str, reason: str, *, dead: str | None = None) -> None:
        """A handshake with ``address`` failed; ``dead``: the live peer whose push channel it was."""
        now = time.monotonic()
        self.failures[address] = reason
        record = self.records.get(dead) if dead is not None else None
        if record is not None and record.alive and record.address == address:
            self.mark_dead(record.node_id, reason)  # logs it
            self._logged[address] = reason
        attempts = self._attempts.get(address)
        if attempts is None:
            attempts = self._attempts[address] = _Attempts(first_failure=now)
        attempts.failures += 1
        if self._known(address):
            delay = min(2 * self.probe_interval, self.probe_interval * 2 ** (attempts.failures - 1))
        else:
            delay = min(self.backoff_cap, self.backoff_initial * 2 ** (attempts.failures - 1))
        self._retry_at[address] = now + delay * self.rng.uniform(1 - JITTER, 1)
        self._log_failure(address, reason)
        listed = self._listed.get(address)
        static = listed is not None and listed.source == SOURCE_STATIC
        if (
            not self._known(address)
            and not static
            and not attempts.dropped
            and (
                attempts.failures >= self.give_up_tries
                or now - attempts.first_failure >= self.give_up_seconds
            )
        ):
            attempts.dropped = True
            attempts.dropped_candidate = listed
            attempts.absent = listed is None
            self.log.info(
                "candidate dropped until discovery lists it again",
                address=address,
                tries=attempts.failures,
                seconds=round(now - attempts.first_failure, 1),
            )

    def _log_failure(self, address: str, reason: str) -> None:
        if self._logged.get(address) == reason:
            return
        self._logged[address] = reason
        if reason.startswith("handshake refused") or "two live processes" in reason:
            self.log.error("peer refused", address=address, reason=reason)
        else:
            self.log.warning(
                "candidate does not answer; retrying with backoff", address=address, reason=reason
            )

    def _relisted(self, address: str) -> None:
        """Discovery (or the peer itself) announced ``address`` anew: forget its failures."""
        attempts = self._attempts.pop(address, None)
        if attempts is not None:
            self._retry_at.pop(address, None)

    def _note_listing(self, listed: dict[str, Candidate]) -> None:
        for address, attempts in list(self._attempts.items()):
            if not attempts.dropped:
                continue
            candidate = listed.get(address)
            if candidate is None:
                attempts.absent = True
            elif attempts.absent or candidate != attempts.dropped_candidate:
                self.log.info("dropped candidate listed again; retrying", address=address)
                self._relisted(address)
        self._listed = listed

    def mark_dead(self, node_id: str, reason: str) -> None:
        record = self.records.get(node_id)
        if record is not None and record.alive:
            self.records[node_id] = replace(record, alive=False)
            self._drop_aliases(node_id)  # another address may work now
            self.source.forget(node_id)
            self.log.warning("peer unreachable", peer=node_id, reason=reason)
            self._changed.set()

    def _alive(self, node_id: str | None) -> bool:
        record = self.records.get(node_id) if node_id is not None else None
        return record is not None and record.alive and node_id in self.clients

    async def refresh(self) -> None:
        """Handshake with due candidates and re-probe every known peer, concurrently."""
        now = time.monotonic()
        own = (self.identity.advertise_address, self.identity.node_id)
        listed: dict[str, Candidate] = {}
        for candidate in self.source.candidates():
            if candidate.address in own or candidate.node_id in own:
                continue
            # A live peer is probed at its confirmed address; for any other node every address is tried.
            addresses = (candidate.address,) if self._alive(candidate.node_id) else candidate.addresses
            for address in addresses:
                listed.setdefault(address, candidate)
        self._note_listing(listed)
        addresses = set(listed) | {record.address for record in self.records.values()}
        due = []
        for address in sorted(addresses):
            if self._alive(self.aliases.get(address)):
                continue  # another address of a live peer: not dialled again
            attempts = self._attempts.get(address)
            if attempts is not None and attempts.dropped and not self._known(address):
                continue
            if self._retry_at.get(address, 0.0) <= now:
                due.append(address)
        await asyncio.gather(*(self.handshake(a) for a in due), return_exceptions=True)

    async def probe_status(self, node_id: str, timeout: float) -> pb.PeerStatus | None:
        """A live peer's status right now (a handshake on its push channel, which also tells it ours), or
        None when it does not answer within ``timeout`` seconds, refuses, or its channel is replaced
        under the call. Unlike ``handshake`` it changes nothing in the registry."""
        client = self.clients.get(node_id)
        if client is None:
            return None
        try:
            response = await client.handshake(self.identity, timeout=timeout, status=self.status())
        except asyncio.CancelledError:
            if cancelled_by_us():
                raise
            return None  # the channel was closed under the call (the peer moved or restarted)
        except Exception:  # refused, unavailable, timed out: no status, whatever the cause
            return None
        return response.status

    async def reach(self, node_ids: Sequence[str]) -> None:
        """Handshake now, whatever their backoff, the known peers among ``node_ids`` that are not alive
        (a joiner must reach every member of the view it enters before it declares its boundary)."""
        addresses = sorted(
            {self.records[n].address for n in node_ids if n in self.records and not self._alive(n)}
        )
        await asyncio.gather(*(self.handshake(a) for a in addresses), return_exceptions=True)

    async def broadcast(self) -> None:
        """Handshake every live peer now, whatever its probe schedule: tells them this node's status (a
        join boundary, a stop proposal) and brings back theirs."""
        addresses = sorted({self.records[n].address for n in self.alive()})
        await asyncio.gather(*(self.handshake(a) for a in addresses), return_exceptions=True)

    async def maintain(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(min(0.25, self.probe_interval, self.backoff_initial))

    def start(self) -> None:
        self._task = asyncio.create_task(self.maintain())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for attempt in self._in_flight.values():
            attempt.cancel()
        for attempt in self._in_flight.values():
            with contextlib.suppress(BaseException):
                await attempt
        for client in self.clients.values():
            with contextlib.suppress(Exception):
                await client.close()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    async def wait_for_change(self, timeout: float) -> None:
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)

    def refuses_connections(self, node_id: str) -> bool:
        """Whether the latest handshake with the peer's address was refused a connection: nothing listens
        there any more (it exited or was killed; a frozen process still accepts connections)."""
        record = self.records.get(node_id)
        return record is not None and self.failures.get(record.address) == CONNECTION_REFUSED

    def alive(self) -> list[str]:
        """Live peers we can push to (our own handshake with them succeeded)."""
        return sorted(n for n, record in self.records.items() if record.alive and n in self.clients)

    def usable_records(self) -> list[PeerRecord]:
        return [self.records[node_id] for node_id in self.alive()]

    def mark_founders(self, node_ids: Sequence[str], start: int) -> None:
        for node_id in node_ids:
            if node_id in self.records:
                self.records[node_id] = replace(self.records[node_id], ready_from=start)
