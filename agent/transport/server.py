"""gRPC server side of the gossip transport: Handshake, PushVector/PushStream, FetchState, and health.

The server makes no training decisions. Whom to accept is the agent's HandshakePolicy; where pushed
vectors go is the agent's Inbox; what state to hand a late joiner is the agent's StateProvider.
What the server does own is wire hygiene: only handshaken peers may push or fetch, every byte is
validated (frames.VectorAssembler), and partial or invalid data never reaches the inbox.

It also bounds what a slow, stuck or hostile peer can pin. A PushVector stream that delivers no chunk
for `stall_timeout` seconds, or whose position goes stale while it is still arriving (the inbox moved
past it), is aborted and its receive buffer released at once; concurrent PushVector streams are
capped per sender and in total (extras get RESOURCE_EXHAUSTED); a FetchState response the requester
stops reading is aborted after `stall_timeout` per send; idle connections are closed by gRPC
(options.server_options). Every abort is counted in `rejection_counts` and logged with its reason
(once per peer and kind, like every other refusal).

PushStream carries a peer's vectors one after another on one long-lived stream; each vector goes
through exactly the code path of a PushVector call (`_receive_push`: caps, watchdog, claim check,
validation, inbox) and gets the PushAck that call would get. A vector ends with its first chunk shorter
than its header's chunk_bytes (`_VectorChunks`). After a refused vector the stream goes on (the rest of
a vector refused from its header is read and dropped) unless the server cannot tell where the next
vector starts or cancelled a read (a push that went stale while arriving): then it ends the stream
with OK right after the ack, and the sender opens a new one. Outcomes that abort a PushVector call
(stall, RESOURCE_EXHAUSTED) abort the stream with the same status. A stream idle between vectors for
the connection idle limit is ended (OK) so that idle connections are still closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final

import grpc
import structlog
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from agent.transport._generated.dpgan.v1 import dpgan_pb2 as pb
from agent.transport.codecs import GossipKind
from agent.transport.data_plane import DataPlaneServer, PushPayload
from agent.transport.frames import (
    DecodedVector,
    ExpectedVector,
    Position,
    RawChunk,
    VectorAssembler,
    WireError,
    WireErrorKind,
    parse_chunk,
)
from agent.transport.identity import PeerIdentity, identity_mismatch
from agent.transport.inbox import Inbox, InboxMessage, PutOutcome
from agent.transport.options import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_STALL_TIMEOUT_S,
    MAX_CHUNK_BYTES,
    MAX_PUSH_STREAMS,
    MAX_PUSH_STREAMS_PER_PEER,
    SERVER_MAX_CONNECTION_IDLE_MS,
    server_options,
    validate_chunk_bytes,
)
from agent.transport.positions import PeerPositions
from agent.transport.protocol import GOSSIP_SERVICE_NAME, PROTOCOL_VERSION
from agent.transport.references import Reference, References
from agent.transport.state import StateSnapshot, encode_state
from agent.transport.tls import TransportSecurity, caller_identity, claim_refusal
from agent.transport.watchdog import StallWatchdog

HandshakePolicy = Callable[[pb.HandshakeRequest], tuple[bool, str]]
StateProvider = Callable[[], StateSnapshot | Awaitable[StateSnapshot]]
StatusProvider = Callable[[], pb.PeerStatus]

_log = structlog.get_logger(__name__)

_STATUS_BY_OUTCOME: Final = {
    PutOutcome.ACCEPTED: pb.PUSH_STATUS_ACCEPTED,
    PutOutcome.BUFFERED_AHEAD: pb.PUSH_STATUS_BUFFERED_AHEAD,
    PutOutcome.STALE: pb.PUSH_STATUS_STALE,
    PutOutcome.DUPLICATE: pb.PUSH_STATUS_DUPLICATE,
    PutOutcome.TOO_FAR_AHEAD: pb.PUSH_STATUS_TOO_FAR_AHEAD,
}
_STATUS_BY_WIRE_ERROR: Final = {
    WireErrorKind.STALE: pb.PUSH_STATUS_STALE,
    WireErrorKind.TOO_FAR_AHEAD: pb.PUSH_STATUS_TOO_FAR_AHEAD,
    WireErrorKind.EPOCH_MISMATCH: pb.PUSH_STATUS_EPOCH_MISMATCH,
    WireErrorKind.REFERENCE_MISSING: pb.PUSH_STATUS_REFERENCE_MISSING,
}


class _StreamAborted(Exception):
    """Internal: a push stream was aborted between two chunks (see _PushStream.abort)."""


@dataclass(slots=True, eq=False)
class _PushStream:
    """One PushVector stream being received, and the watchdog that aborts it.

    `deadline` is the stall watchdog around the stream's reads: pushed forward by every chunk
    (`fed`), or pulled to now by `abort` (the inbox moved past `position`), which cancels the pending
    read; the handler then answers with `aborted`'s reason.
    """

    peer: str
    stall_timeout: float
    deadline: StallWatchdog | None = None
    sender: str | None = None  # header's sender_id, once it is counted against the per-peer cap
    position: Position | None = None
    received_bytes: int = 0
    aborted: tuple[str, str] | None = field(default=None)  # (kind, reason)

    def fed(self) -> None:
        if self.deadline is not None and self.aborted is None:
            self.deadline.fed()

    def abort(self, kind: str, reason: str) -> None:
        if self.aborted is not None:
            return
        self.aborted = (kind, reason)
        if self.deadline is not None:
            self.deadline.expire_now()  # the stream's read block checks `aborted` itself once it ends


class _VectorChunks:
    """The chunks of one vector on a PushStream, read from the stream's shared request iterator.

    Iteration ends after the vector's last chunk: the first one carrying fewer than the header's
    chunk_bytes payload bytes (a sender whose payload fills its last chunk sends one more, empty, chunk).
    Only the framing is looked at here (it is the same for every wire dtype); VectorAssembler validates
    everything else. `desync` says why the vector's end cannot be found (a chunk that does not parse, no
    valid chunk_bytes in a first chunk, a second header, a chunk longer than chunk_bytes, or, while the
    rest of a refused vector is skipped, more payload than any vector this node takes): the chunk is
    still yielded, so the vector is refused exactly as PushVector would refuse it, and then the stream
    must end. `closed`: the sender half-closed the stream.
    """

    def __init__(self, first: RawChunk | WireError, source: AsyncIterator[RawChunk | WireError]) -> None:
        self._pending: RawChunk | WireError | None = first
        self._source = source
        self._chunk_bytes: int | None = None
        self.payload_bytes = 0
        self.header_sender = ""
        self.complete = False
        self.closed = False
        self.desync: str | None = None

    def sender(self, peer: str, authenticated: str | None) -> str:
        """Whom to count and log this vector's bytes against, as _handle_push does."""
        return peer if authenticated is not None else (self.header_sender or peer)

    def __aiter__(self) -> _VectorChunks:
        return self

    async def __anext__(self) -> RawChunk | WireError:
        if self.complete or self.closed or self.desync is not None:
            raise StopAsyncIteration
        chunk = self._pending
        if chunk is None:
            try:
                chunk = await anext(self._source)
            except StopAsyncIteration:
                self.closed = True
                raise
        self._pending = None
        self._track(chunk)
        return chunk

    def _track(self, chunk: RawChunk | WireError) -> None:
        if isinstance(chunk, WireError):
            self.desync = "a chunk that does not parse"
            return
        if self._chunk_bytes is None:
            if chunk.header is None:
                self.desync = "a vector whose first chunk carries no header"
                return
            self.header_sender = chunk.header.sender_id
            try:
                self._chunk_bytes = validate_chunk_bytes(chunk.header.chunk_bytes)
            except ValueError:
                self.desync = f"a header with an invalid chunk_bytes ({chunk.header.chunk_bytes})"
                return
        elif chunk.header is not None:
            self.desync = "a second header inside a vector"
            return
        size = len(chunk.data)
        self.payload_bytes += size
        if size > self._chunk_bytes:
            self.desync = f"a {size}-byte chunk in a vector of {self._chunk_bytes}-byte chunks"
        elif size < self._chunk_bytes:
            self.complete = True


class BindError(OSError):
    """The server could not bind its address (typically: the port is already in use)."""


@dataclass(frozen=True, slots=True)
class HandshakenPeer:
    """A peer whose most recent handshake was accepted."""

    node_id: str
    advertise_address: str
    membership_epoch: int
    agent_version: str


def default_handshake_policy(local: PeerIdentity) -> HandshakePolicy:
    """Accept exactly the peers with the same protocol, schema hash and config hash as `local`."""

    def policy(request: pb.HandshakeRequest) -> tuple[bool, str]:
        reason = identity_mismatch(local, request)
        return (reason is None, reason or "")

    return policy


def _format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def _parse_or_error(raw: bytes) -> RawChunk | WireError:
    # A deserializer that raises makes gRPC fail the call with an opaque INTERNAL status; handing the
    # error to the handler instead lets it answer with a PushAck that names the problem.
    try:
        return parse_chunk(raw)
    except WireError as error:
        return error


class GossipServer:
    """One node's gRPC endpoint. Create, `await start()`, `await set_serving(True)`, `await stop()`."""

    def __init__(
        self,
        *,
        identity: PeerIdentity,
        inbox: Inbox,
        vector_length: int,
        handshake_policy: HandshakePolicy | None = None,
        state_provider: StateProvider | None = None,
        status_provider: StatusProvider | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        device: torch.device | str = "cpu",
        state_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        positions: PeerPositions | None = None,
        stall_timeout: float = DEFAULT_STALL_TIMEOUT_S,
        max_push_streams_per_peer: int = MAX_PUSH_STREAMS_PER_PEER,
        max_push_streams: int = MAX_PUSH_STREAMS,
        max_connection_idle_s: float = SERVER_MAX_CONNECTION_IDLE_MS / 1000,
        security: TransportSecurity | None = None,
        gossip: GossipKind | None = None,
        data_port: int | None = None,
    ) -> None:
        """`stall_timeout`: seconds without a chunk before a PushVector stream (or without progress
        before a FetchState send) is aborted; pass the agent's round timeout. `max_push_streams*`:
        concurrent PushVector streams per sender and in total. `max_connection_idle_s`: a connection
        with no RPC for this long is closed (grpc.max_connection_idle_ms). `security`: mutual TLS and
        the allowlist (agent/transport/tls.py); None serves plaintext and trusts claimed node ids.
        `gossip`: the run's kind of gossip (plain or one compressor's); pushes of another kind are refused
        as malformed. None accepts any kind (tests of the transport alone). `data_port`: also listen for
        pushes on this TCP port (agent/transport/data_plane.py; plaintext, so not with TLS `security`;
        0: any free port), announced in every handshake answer; None: PushVector and PushStream only."""
        if vector_length < 0:
            raise ValueError(f"vector_length must be >= 0, got {vector_length}")
        for name, value in (("port", port), ("data_port", 0 if data_port is None else data_port)):
            if not 0 <= value <= 65535:
                raise ValueError(f"{name} must be in [0, 65535], got {value}")
        self._identity = identity
        self._security = security or TransportSecurity.insecure()
        self._inbox = inbox
        self._positions = positions
        self._vector_length = vector_length
        self._gossip = gossip
        self._handshake_policy = handshake_policy or default_handshake_policy(identity)
        self._state_provider = state_provider
        self._status_provider = status_provider
        self._host = host
        self._requested_port = port
        self._requested_data_port = data_port or 0
        self._device = device
        self._state_chunk_bytes = validate_chunk_bytes(state_chunk_bytes)
        if not stall_timeout > 0:  # also rejects NaN
            raise ValueError(f"stall_timeout must be > 0 seconds, got {stall_timeout}")
        if not max_connection_idle_s > 0:
            raise ValueError(f"max_connection_idle_s must be > 0 seconds, got {max_connection_idle_s}")
        for name, cap in (
            ("max_push_streams_per_peer", max_push_streams_per_peer),
            ("max_push_streams", max_push_streams),
        ):
            if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
                raise ValueError(f"{name} must be an int >= 1, got {cap!r}")
        self._stall_timeout = float(stall_timeout)
        self._max_push_streams_per_peer = max_push_streams_per_peer
        self._max_push_streams = max_push_streams
        self._max_connection_idle_ms = max(1, round(max_connection_idle_s * 1000))
        self._push_streams: set[_PushStream] = set()
        self._push_streams_by_sender: Counter[str] = Counter()
        self._push_stream_calls = 0  # PushStream RPCs open now (idle or receiving)
        self._push_stream_calls_started = 0
        self._idle_push_streams: set[asyncio.Timeout] = set()  # PushStreams waiting for their next vector
        inbox.add_advance_listener(self._abort_stale_pushes)
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._bound_port: int | None = None
        self._peers: dict[str, HandshakenPeer] = {}
        self._bytes_received_by_peer: dict[str, int] = {}
        self._bytes_received = 0
        self._logged_rejections: set[tuple[str, str]] = set()
        self._rejection_counts: Counter[tuple[str, str]] = Counter()
        # float32-delta: per sender, the last vector it pushed with keep_reference (transport.references)
        self._references = References()
        if data_port is not None and self._security.enabled:
            raise ValueError("data_port: the data plane is plaintext; it cannot serve a TLS-secured node")
        self._data_plane = (
            None
            if data_port is None
            else DataPlaneServer(
                host,
                data_port,
                self._receive_push,
                stall_timeout=self._stall_timeout,
                max_connections=max_push_streams,
            )
        )

    # ---- lifecycle -------------------------------------------------------------------------------

    @property
    def bound_port(self) -> int:
        if self._bound_port is None:
            raise RuntimeError("GossipServer is not started; bound_port is known after start()")
        return self._bound_port

    @property
    def address(self) -> str:
        """host:port clients can dial (the bound port, not the requested 0)."""
        return _format_address(self._host, self.bound_port)

    async def start(self) -> None:
        """Bind and start serving; health starts NOT_SERVING until `set_serving(True)`."""
        if self._server is not None:
            raise RuntimeError("GossipServer.start() called twice")
        server = grpc.aio.server(options=server_options(max_connection_idle_ms=self._max_connection_idle_ms))
        handlers = self._method_handlers()
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(GOSSIP_SERVICE_NAME, handlers),)
        )
        server.add_registered_method_handlers(GOSSIP_SERVICE_NAME, handlers)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        requested = _format_address(self._host, self._requested_port)
        try:
            if self._security.enabled:
                bound_port = server.add_secure_port(requested, self._security.server_credentials())
            else:
                bound_port = server.add_insecure_port(requested)
        except RuntimeError as error:
            raise BindError(
                f"cannot bind gossip server to {requested}: {error} "
                "(is another agent already using this port? SO_REUSEPORT is disabled on purpose)"
            ) from error
        if bound_port == 0:
            # Older grpcio signals bind failure by returning port 0 instead of raising.
            raise BindError(f"cannot bind gossip server to {requested} (port in use or address invalid)")
        if self._data_plane is not None:
            try:
                await self._data_plane.start()
            except OSError as error:
                await server.stop(None)
                where = _format_address(self._host, self._requested_data_port)
                raise BindError(f"cannot bind the data plane to {where}: {error}") from error
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.start()
        self._server = server
        self._bound_port = bound_port
        _log.info(
            "gossip_server_started",
            address=self.address,
            node_id=self._identity.node_id,
            tls=self._security.enabled,
            **({"data_port": self._data_plane.port} if self._data_plane is not None else {}),
        )

    @property
    def data_plane_connections(self) -> tuple[int, int]:
        """Data-plane connections (served, refused at the cap) since start; (0, 0) without a data plane."""
        plane = self._data_plane
        return (plane.connections_accepted, plane.connections_refused) if plane is not None else (0, 0)

    @property
    def data_port(self) -> int:
        """The bound port of the data plane; 0 when there is none."""
        return self._data_plane.port if self._data_plane is not None and self._server is not None else 0

    async def stop(self, grace: float = 1.0) -> None:
        """Report NOT_SERVING, then stop; in-flight RPCs get `grace` seconds to finish."""
        server, self._server = self._server, None
        if server is None:
            return
        await self._health.enter_graceful_shutdown()
        # PushStreams waiting for their next vector end now (OK) instead of holding stop() for `grace`.
        now = asyncio.get_running_loop().time()
        for waiting in list(self._idle_push_streams):
            with contextlib.suppress(RuntimeError):
                waiting.reschedule(now)
        if self._data_plane is not None:
            await self._data_plane.stop()
        await server.stop(grace)
        _log.info("gossip_server_stopped", node_id=self._identity.node_id)

    async def set_serving(self, serving: bool) -> None:
        """Health status seen by probes: SERVING while training, NOT_SERVING otherwise."""
        serving_status = health_pb2.HealthCheckResponse
        await self._set_health(serving_status.SERVING if serving else serving_status.NOT_SERVING)

    async def set_health(self, service: str, serving: bool) -> None:
        """Health status of one more named service (e.g. the agent's "run finished" entry), apart from the
        overall status `set_serving` drives. May be called before `start()`."""
        serving_status = health_pb2.HealthCheckResponse
        await self._health.set(service, serving_status.SERVING if serving else serving_status.NOT_SERVING)

    async def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        # Both the overall ("") and the per-service entry, so either kind of probe sees the same thing.
        await self._health.set(health.OVERALL_HEALTH, status)
        await self._health.set(GOSSIP_SERVICE_NAME, status)

    # ---- observability ---------------------------------------------------------------------------

    @property
    def bytes_received(self) -> int:
        """Serialized chunk bytes received in PushVector streams, from all peers, accepted or not."""
        return self._bytes_received

    @property
    def bytes_received_by_peer(self) -> dict[str, int]:
        return dict(self._bytes_received_by_peer)

    @property
    def rejection_counts(self) -> dict[tuple[str, str], int]:
        """How often each (peer, reason kind) was refused, including the occurrences not logged."""
        return dict(self._rejection_counts)

    @property
    def push_streams_in_flight(self) -> int:
        """Pushes currently admitted (each may hold one receive buffer): PushVector calls, and vectors
        arriving on PushStreams."""
        return len(self._push_streams)

    @property
    def push_stream_calls(self) -> int:
        """PushStream RPCs open now, idle between vectors or receiving one."""
        return self._push_stream_calls

    @property
    def push_stream_calls_started(self) -> int:
        """PushStream RPCs accepted since start (a client reuses one for many vectors)."""
        return self._push_stream_calls_started

    @property
    def handshaken_peers(self) -> dict[str, HandshakenPeer]:
        return dict(self._peers)

    def forget_peer(self, node_id: str) -> None:
        """Require `node_id` to handshake again before its next push (e.g. after a membership change)."""
        self._peers.pop(node_id, None)
        self._references.drop(node_id)

    def retain_references(self, senders: set[str]) -> None:
        """Keep float32-delta references only for these senders (the members of the current view)."""
        self._references.retain(senders)

    @property
    def reference_bytes(self) -> int:
        """Bytes held as float32-delta references of the senders (one vector per sender that asks)."""
        return self._references.bytes_held

    # ---- RPC handlers ----------------------------------------------------------------------------

    def _method_handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        """Handlers for the Gossip service as declared in the .proto, with zero-copy chunk codecs.

        Hand-built rather than via the generated add_GossipServicer_to_server so that PushVector
        requests are parsed by frames.parse_chunk (payload stays a view into the received message) and
        FetchState responses are sent as frames state.encode_state already serialized. The bytes on the
        wire are exactly the protobuf messages, so generated stubs interoperate.
        """
        return {
            "Handshake": grpc.unary_unary_rpc_method_handler(
                self._rpc_handshake,
                request_deserializer=pb.HandshakeRequest.FromString,
                response_serializer=pb.HandshakeResponse.SerializeToString,
            ),
            "PushVector": grpc.stream_unary_rpc_method_handler(
                self._rpc_push_vector,
                request_deserializer=_parse_or_error,
                response_serializer=pb.PushAck.SerializeToString,
            ),
            "PushStream": grpc.stream_stream_rpc_method_handler(
                self._rpc_push_stream,
                request_deserializer=_parse_or_error,
                response_serializer=pb.PushAck.SerializeToString,
            ),
            "FetchState": grpc.unary_stream_rpc_method_handler(
                self._rpc_fetch_state,
                request_deserializer=pb.StateRequest.FromString,
                response_serializer=None,  # state.encode_state yields serialized VectorChunks
            ),
            "Announce": grpc.unary_unary_rpc_method_handler(
                self._rpc_announce,
                request_deserializer=pb.RoundAnnouncement.FromString,
                response_serializer=pb.AnnounceAck.SerializeToString,
            ),
        }

    async def _rpc_handshake(
        self, request: pb.HandshakeRequest, context: grpc.aio.ServicerContext
    ) -> pb.HandshakeResponse:
        authenticated = caller_identity(context)
        refusal = claim_refusal(self._security, authenticated, request.node_id, "handshake")
        return self._handle_handshake(request, authenticated or context.peer(), refusal)

    async def _rpc_push_vector(
        self, chunks: AsyncIterator[RawChunk | WireError], context: grpc.aio.ServicerContext
    ) -> pb.PushAck:
        authenticated = caller_identity(context)  # once per stream: it reads the TLS auth context
        peer = authenticated or context.peer()
        result, _ = await self._receive_push(chunks, peer, authenticated)
        if isinstance(result, pb.PushAck):
            return result
        code, reason = result
        await context.abort(code, reason)
        raise AssertionError("unreachable: context.abort raises")

    async def _rpc_push_stream(
        self, requests: AsyncIterator[RawChunk | WireError], context: grpc.aio.ServicerContext
    ) -> None:
        """Vector after vector on one stream, one PushAck each, in order (see the module docstring)."""
        authenticated = caller_identity(context)
        peer = authenticated or context.peer()
        if self._push_stream_calls >= self._max_push_streams:
            reason = (
                f"{self._identity.node_id!r} has {self._push_stream_calls} PushStream calls open, "
                f"the most it admits at once; retry later"
            )
            self._log_once(peer, "push_stream_calls_exhausted", reason)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, reason)
        self._push_stream_calls += 1
        self._push_stream_calls_started += 1
        source = aiter(requests)
        try:
            # Headers at once: the sender waits for them before its first vector (PeerClient._exchange).
            await context.send_initial_metadata(())
            while (first := await self._next_pushed_vector(source)) is not None:
                vector = _VectorChunks(first, source)
                result, interrupted = await self._receive_push(vector, peer, authenticated)
                if not isinstance(result, pb.PushAck):
                    await context.abort(*result)
                await self._send_ack(context, peer, result)
                if interrupted or vector.closed or vector.desync is not None:
                    # A read was cancelled (the stream cannot be read on), or the next vector's start is
                    # unknown: end here; the sender opens a new stream for its next vector.
                    self._log_desync(vector, peer, authenticated)
                    return
                if not vector.complete and not await self._skip_rest(vector, peer, authenticated, context):
                    return
        finally:
            self._push_stream_calls -= 1

    async def _next_pushed_vector(
        self, source: AsyncIterator[RawChunk | WireError]
    ) -> RawChunk | WireError | None:
        """The first chunk of a PushStream's next vector; None when the sender closed the stream, it was
        idle for the connection idle limit (so idle connections still close), or the server stops."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout_at(loop.time() + self._max_connection_idle_ms / 1000) as waiting:
                self._idle_push_streams.add(waiting)
                try:
                    return await anext(source)
                finally:
                    self._idle_push_streams.discard(waiting)
        except (StopAsyncIteration, TimeoutError):
            return None

    async def _send_ack(self, context: grpc.aio.ServicerContext, peer: str, ack: pb.PushAck) -> None:
        try:
            async with StallWatchdog(self._stall_timeout):
                await context.write(ack)
        except TimeoutError:
            reason = f"PushStream stalled: {peer!r} read no ack for {self._stall_timeout:g} s"
            self._log_once(peer, "push_stalled", reason)
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, reason)

    async def _skip_rest(
        self, vector: _VectorChunks, peer: str, authenticated: str | None, context: grpc.aio.ServicerContext
    ) -> bool:
        """Read and drop the rest of a vector refused before its end (the sender may already have sent it
        all); False when the stream must end. The stall limit applies per chunk, as while receiving."""
        sender = vector.sender(peer, authenticated)
        # A bound on what is skipped (a peer sending full chunks forever): far more than any wire form
        # of this node's vector; past it the stream ends instead.
        limit = 16 * self._vector_length + MAX_CHUNK_BYTES
        try:
            while vector.payload_bytes <= limit:
                async with StallWatchdog(self._stall_timeout):
                    chunk = await anext(vector)
                if not isinstance(chunk, WireError):
                    self._count_received(sender, chunk.message_bytes)
            if not vector.complete and vector.desync is None:
                vector.desync = f"more than {limit} payload bytes in one refused vector"
        except StopAsyncIteration:
            pass
        except TimeoutError:
            reason = f"PushStream stalled: no chunk from {sender!r} for {self._stall_timeout:g} s"
            self._log_once(sender, "push_stalled", reason)
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, reason)
        self._log_desync(vector, peer, authenticated)
        return vector.complete

    def _log_desync(self, vector: _VectorChunks, peer: str, authenticated: str | None) -> None:
        if vector.desync is not None:
            reason = f"PushStream ended after {vector.desync}"
            self._log_once(vector.sender(peer, authenticated), "push_stream_desync", reason)

    async def _receive_push(
        self, chunks: AsyncIterator[RawChunk | WireError], peer: str, authenticated: str | None
    ) -> tuple[pb.PushAck | tuple[grpc.StatusCode, str], bool]:
        """One pushed vector, for PushVector and PushStream alike: the total cap, the stall/stale
        watchdog and the per-sender cap, then `_handle_push`. Returns the ack (or the status code and
        reason to abort the RPC with), and whether a read of `chunks` was interrupted by an abort."""
        if len(self._push_streams) >= self._max_push_streams:
            reason = (
                f"{self._identity.node_id!r} is receiving {len(self._push_streams)} PushVector streams, "
                f"the most it admits at once; retry later"
            )
            self._log_once(peer, "push_streams_exhausted", reason)
            return (grpc.StatusCode.RESOURCE_EXHAUSTED, reason), False
        stream = _PushStream(peer=peer, stall_timeout=self._stall_timeout)
        self._push_streams.add(stream)
        try:
            result = await self._handle_push(chunks, stream, authenticated)
        finally:
            self._push_streams.discard(stream)
            if stream.sender is not None:
                self._push_streams_by_sender[stream.sender] -= 1
                if self._push_streams_by_sender[stream.sender] <= 0:
                    del self._push_streams_by_sender[stream.sender]
        return result, stream.aborted is not None

    async def _rpc_fetch_state(self, request: pb.StateRequest, context: grpc.aio.ServicerContext) -> None:
        # context.write instead of yielding frames, so every send can be bounded: a requester that
        # stops reading would otherwise pin the snapshot for as long as its connection lives.
        sent = 0
        async for frame in self._handle_fetch_state(request, context):
            try:
                async with StallWatchdog(self._stall_timeout):
                    await context.write(frame)
            except TimeoutError:
                reason = (
                    f"FetchState stalled: requester {request.requester_id!r} read nothing for "
                    f"{self._stall_timeout:g} s; aborted after {sent} bytes"
                )
                self._log_once(request.requester_id or context.peer(), "fetch_state_stalled", reason)
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, reason)
            sent += len(frame)

    async def _rpc_announce(
        self, request: pb.RoundAnnouncement, context: grpc.aio.ServicerContext
    ) -> pb.AnnounceAck:
        authenticated = caller_identity(context)
        refusal = claim_refusal(self._security, authenticated, request.sender_id, "announcement")
        if refusal is not None:
            self._log_once(authenticated or context.peer(), "announce_forbidden", refusal)
            return pb.AnnounceAck(accepted=False, reason=refusal)
        if request.sender_id not in self._peers:
            reason = (
                f"node {request.sender_id!r} has not completed a handshake with "
                f"{self._identity.node_id!r}; handshake before announcing"
            )
            self._log_once(request.sender_id or context.peer(), "announce_refused", reason)
            return pb.AnnounceAck(accepted=False, reason=reason)
        if self._positions is not None:
            await self._positions.announce(request.sender_id, request.iteration, request.round)
        return pb.AnnounceAck(accepted=True)

    def _handle_handshake(
        self, request: pb.HandshakeRequest, peer: str, refusal: str | None = None
    ) -> pb.HandshakeResponse:
        """``peer``: the caller's certificate identity over TLS, else its address. ``refusal``: why the
        caller may not speak for ``request.node_id`` (claim_refusal); such a refusal never touches the
        claimed node's own acceptance."""
        reason = refusal or self._transport_refusal(request)
        accepted = reason is None
        if accepted:
            try:
                accepted, reason = self._handshake_policy(request)
            except Exception as error:
                # A crashing policy must not turn into an opaque UNKNOWN status at the peer.
                _log.exception("handshake_policy_failed", peer=peer, node_id=request.node_id)
                accepted, reason = False, f"handshake policy failed on this node: {error!r}"
        if not accepted and not reason:
            reason = "refused by this node's handshake policy (it gave no reason)"
        if accepted:
            # The first acceptance is news; the liveness probes that repeat it every second are not.
            repeat = request.node_id in self._peers
            self._peers[request.node_id] = HandshakenPeer(
                node_id=request.node_id,
                advertise_address=request.advertise_address,
                membership_epoch=request.membership_epoch,
                agent_version=request.agent_version,
            )
            (_log.debug if repeat else _log.info)("handshake_accepted", peer=peer, node_id=request.node_id)
        elif refusal is not None:
            # Someone else's claim: the real node keeps its acceptance; the log names the caller.
            self._log_once(peer, "handshake_refused", reason)
        else:
            # A refused re-handshake revokes an earlier acceptance: the peer changed incompatibly.
            self._peers.pop(request.node_id, None)
            self._log_once(request.node_id or peer, "handshake_refused", reason)
        status = self._status_provider() if self._status_provider is not None else None
        response = self._identity.handshake_response(accepted=accepted, reason=reason or "", status=status)
        if accepted:
            response.data_port = self.data_port
        return response

    def _transport_refusal(self, request: pb.HandshakeRequest) -> str | None:
        """Checks no policy may override: without them the wire protocol itself cannot work."""
        if request.protocol_version != PROTOCOL_VERSION:
            return (
                f"protocol_version differs: this node speaks {PROTOCOL_VERSION}, "
                f"peer sent {request.protocol_version}"
            )
        if not request.node_id:
            return "handshake carries an empty node_id"
        if request.node_id == self._identity.node_id:
            return f"peer claims this node's own node_id {request.node_id!r}"
        return None

    async def _handle_push(
        self, chunks: AsyncIterator[RawChunk | WireError], stream: _PushStream, authenticated: str | None
    ) -> pb.PushAck | tuple[grpc.StatusCode, str]:
        """Receive one push; return its ack, or the (status code, reason) to abort the RPC with.

        `authenticated`: the caller's certificate identity (None on plaintext); a header claiming
        another sender is refused before any payload is read."""
        sender = stream.peer  # replaced by the header's sender_id once known; used for accounting and logs
        assembler: VectorAssembler | None = None
        try:
            async with StallWatchdog(self._stall_timeout) as deadline:
                stream.deadline = deadline
                async for chunk in chunks:
                    if stream.aborted is not None:
                        raise _StreamAborted
                    stream.fed()
                    if isinstance(chunk, WireError):
                        raise chunk
                    if (
                        authenticated is None
                        and assembler is None
                        and chunk.header is not None
                        and chunk.header.sender_id
                    ):
                        sender = chunk.header.sender_id
                    self._count_received(sender, chunk.message_bytes)
                    stream.received_bytes += chunk.message_bytes
                    if assembler is not None:
                        assembler.add(chunk)
                        continue
                    header = chunk.header
                    if header is None:
                        raise WireError(
                            WireErrorKind.MISSING_HEADER, "first chunk of the stream carries no VectorHeader"
                        )
                    refusal = claim_refusal(self._security, authenticated, header.sender_id, "push")
                    if refusal is not None:
                        return self._reject(sender, pb.PUSH_STATUS_FORBIDDEN, refusal, "push_forbidden")
                    known_peer = self._peers.get(header.sender_id)
                    if known_peer is None:
                        return self._reject(
                            sender,
                            pb.PUSH_STATUS_NOT_HANDSHAKEN,
                            f"node {header.sender_id!r} has not completed a handshake with "
                            f"{self._identity.node_id!r}; handshake before pushing",
                        )
                    if self._push_streams_by_sender[sender] >= self._max_push_streams_per_peer:
                        reason = (
                            f"{sender!r} already has {self._push_streams_by_sender[sender]} PushVector "
                            f"streams open to {self._identity.node_id!r}, the most one peer may; "
                            "retry when one finishes"
                        )
                        self._log_once(sender, "push_streams_per_peer", reason)
                        return grpc.StatusCode.RESOURCE_EXHAUSTED, reason
                    stream.sender = sender
                    self._push_streams_by_sender[sender] += 1
                    assembler = VectorAssembler(
                        ExpectedVector(
                            element_count=self._vector_length,
                            earliest=self._inbox.position,
                            latest=self._inbox.latest_accepted,
                            rounds_per_iteration=self._inbox.rounds_per_iteration,
                            # Any epoch is accepted here: the agent compares each vector's epoch with its
                            # own view when it mixes (views change at boundaries, not at handshakes).
                            membership_epoch=None,
                            device=self._device,
                            gossip=self._gossip,
                            references=self._references,
                        )
                    )
                    if isinstance(chunks, PushPayload):
                        chunks.bind(assembler)  # the data plane reads the payload into its slots
                    assembler.add(chunk)
                    stream.position = Position(header.iteration, header.round)
                    if self._inbox.classify(sender, header.iteration, header.round) is PutOutcome.DUPLICATE:
                        # Refuse from the header: no point receiving megabytes we will throw away.
                        return self._reject(
                            sender,
                            pb.PUSH_STATUS_DUPLICATE,
                            f"already received a vector from {sender!r} for "
                            f"(iteration {header.iteration}, round {header.round})",
                        )
                if stream.aborted is not None:
                    raise _StreamAborted
                # Reading is over: an abort from here on would cancel nothing.
                deadline.disarm()
                stream.deadline = None
            if assembler is None:
                raise WireError(WireErrorKind.MISSING_HEADER, "push stream carried no chunks")
            if assembler.inflates:
                # Milliseconds per MB: off the loop that serves every other RPC of this node.
                decoded = await self._finish_in_thread(assembler)
            else:
                decoded = assembler.finish()
        except WireError as error:
            status = _STATUS_BY_WIRE_ERROR.get(error.kind, pb.PUSH_STATUS_MALFORMED)
            return self._reject(sender, status, str(error), error.kind)
        except (TimeoutError, _StreamAborted):
            return self._aborted_push(stream, sender, assembler)
        finally:
            stream.deadline = None
            if assembler is not None:
                assembler.release()  # an unfinished stream's buffer goes back to the pool now

        # The inbox may have moved on while the payload streamed in; put() re-checks the position.
        outcome = self._inbox.put(
            InboxMessage(
                sender_id=decoded.sender_id,
                iteration=decoded.iteration,
                round=decoded.round,
                vector=decoded.vector,
                epoch=decoded.membership_epoch,
                edge=decoded.edge,
            )
        )
        if outcome.delivered:
            # The sender codes its next float32-delta push to us against this vector, or stops coding.
            if decoded.keep_reference:
                reference = Reference.of(decoded.iteration, decoded.round, decoded.vector)
                self._references.keep(decoded.sender_id, reference)
            else:
                self._references.drop(decoded.sender_id)
            return pb.PushAck(accepted=True, status=_STATUS_BY_OUTCOME[outcome])
        return self._reject(
            sender,
            _STATUS_BY_OUTCOME[outcome],
            f"vector for (iteration {decoded.iteration}, round {decoded.round}) not delivered: "
            f"{outcome.value}; inbox is at {tuple(self._inbox.position)}",
        )

    @staticmethod
    async def _finish_in_thread(assembler: VectorAssembler) -> DecodedVector:
        """``assembler.finish()`` in a worker thread. A push cancelled meanwhile (its sender timed out) waits
        for the decode to end before it lets go of its place under the push caps, so cancelled pushes
        cannot pile up decode work and receive buffers beyond them."""
        decoding = asyncio.get_running_loop().run_in_executor(None, assembler.finish)
        try:
            return await asyncio.shield(decoding)
        except asyncio.CancelledError:
            await asyncio.wait([decoding])
            if not decoding.cancelled():
                decoding.exception()  # retrieved: the push is gone, its outcome does not matter
            raise

    def _aborted_push(
        self, stream: _PushStream, sender: str, assembler: VectorAssembler | None
    ) -> pb.PushAck | tuple[grpc.StatusCode, str]:
        progress = f"aborted after {stream.received_bytes} bytes"
        if assembler is not None and assembler.header is not None:
            header = assembler.header
            progress += (
                f" of the vector for (iteration {header.iteration}, round {header.round}), "
                f"{assembler.received_bytes} of its payload bytes"
            )
        if stream.aborted is None:
            reason = f"PushVector stalled: no chunk from {sender!r} for {self._stall_timeout:g} s; {progress}"
            self._log_once(sender, "push_stalled", reason)
            return grpc.StatusCode.DEADLINE_EXCEEDED, reason
        kind, reason = stream.aborted
        return self._reject(sender, pb.PUSH_STATUS_STALE, f"{reason}; {progress}", kind)

    def _abort_stale_pushes(self, position: Position) -> None:
        """Inbox listener: abort every push still arriving for a position the inbox has left."""
        for stream in list(self._push_streams):
            if stream.position is not None and stream.position < position:
                stream.abort(
                    "stale_while_arriving",
                    f"vector for (iteration {stream.position.iteration}, round {stream.position.round}) "
                    f"became stale while arriving: inbox moved to "
                    f"(iteration {position.iteration}, round {position.round})",
                )

    async def _handle_fetch_state(
        self, request: pb.StateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        requester = request.requester_id
        authenticated = caller_identity(context)
        refusal = claim_refusal(self._security, authenticated, requester, "state request")
        if refusal is not None:
            self._log_once(authenticated or context.peer(), "fetch_state_forbidden", refusal)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, refusal)
        if requester not in self._peers:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"node {requester!r} has not completed a handshake with {self._identity.node_id!r}",
            )
        if self._state_provider is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this node does not serve state")
        try:
            chunk_bytes = validate_chunk_bytes(request.chunk_bytes or self._state_chunk_bytes)
        except ValueError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"StateRequest.{error}")

        try:
            provided = self._state_provider()
            snapshot = await provided if inspect.isawaitable(provided) else provided
        except Exception as error:
            _log.exception("state_provider_failed", requester=requester)
            await context.abort(grpc.StatusCode.INTERNAL, f"state provider failed on this node: {error!r}")
        names = list(request.names) or list(snapshot.tensors)
        if not names:
            await context.abort(grpc.StatusCode.NOT_FOUND, "this node has no state tensors to offer")
        if len(set(names)) != len(names):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "StateRequest.names contains duplicates")
        unknown = [name for name in names if name not in snapshot.tensors]
        if unknown:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"unknown state tensor(s): {', '.join(unknown)}; available: {', '.join(snapshot.tensors)}",
            )
        try:
            for frame in encode_state(
                {name: snapshot.tensors[name] for name in names},
                sender_id=self._identity.node_id,
                iteration=snapshot.iteration,
                round=snapshot.round,
                epoch=self._identity.membership_epoch,
                chunk_bytes=chunk_bytes,
            ):
                yield frame
        except ValueError as error:
            _log.error("state_not_transferable", requester=requester, error=str(error))
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"state not transferable: {error}")

    # ---- helpers ---------------------------------------------------------------------------------

    def _count_received(self, sender: str, byte_count: int) -> None:
        self._bytes_received += byte_count
        self._bytes_received_by_peer[sender] = self._bytes_received_by_peer.get(sender, 0) + byte_count

    def _reject(self, sender: str, status: int, reason: str, kind: str | None = None) -> pb.PushAck:
        self._log_once(sender, kind or pb.PushStatus.Name(status), reason)
        return pb.PushAck(accepted=False, reason=reason, status=status)

    def _log_once(self, sender: str, kind: str, reason: str) -> None:
        # Once per (peer, kind): a peer that is persistently stale or broken would otherwise log
        # every round (or every chunk) and drown everything else. The counter keeps the full tally.
        key = (sender, kind)
        self._rejection_counts[key] += 1
        if key in self._logged_rejections:
            return
        self._logged_rejections.add(key)
        _log.warning("gossip_rejected", peer=sender, kind=kind, reason=reason, repeats_suppressed=True)
