"""gRPC client side of the gossip transport: one PeerClient per neighbour, one channel each.

Every call carries a gRPC deadline, so nothing waits on a peer longer than the caller's timeout;
connection failures and deadlines surface as PeerUnavailable, refusals as HandshakeRefused, and any
other RPC failure as PeerRpcError. Data coming back from a peer (FetchState) is validated exactly
like pushed data on the server side.

Vectors go over one long-lived PushStream per client (opened on the first push, reopened after any
error, replaced when older than options.PUSH_STREAM_MAX_AGE_S): one vector at a time, each bounded by
its own timeout, so a push costs no RPC setup. A push that finds the stream busy (another push to the
same peer still in flight) and every push to a peer without PushStream (UNIMPLEMENTED, remembered for
the client's life) use one PushVector call instead, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import Final, Self

import grpc
import structlog
import torch

from agent.transport._generated.dpgan.v1 import dpgan_pb2 as pb
from agent.transport._generated.dpgan.v1 import dpgan_pb2_grpc as pb_grpc
from agent.transport.data_plane import DataPlaneClient, DataPlaneError, DataPlaneRefusal, DataPlaneTimeout
from agent.transport.frames import WireVector, header_message, iter_frames, parse_chunk, prepare_vector
from agent.transport.identity import PeerIdentity, identity_mismatch
from agent.transport.options import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_STALL_TIMEOUT_S,
    MAX_CHUNK_BYTES,
    PUSH_STREAM_MAX_AGE_S,
    channel_options,
    validate_chunk_bytes,
)
from agent.transport.protocol import FETCH_STATE_METHOD, GOSSIP_SERVICE_NAME, PUSH_VECTOR_METHOD
from agent.transport.state import StateSnapshot, StateStreamDecoder
from agent.transport.tls import TransportSecurity
from agent.transport.watchdog import StallWatchdog

DEFAULT_RPC_TIMEOUT_S: Final = 10.0
# A late joiner downloads parameters plus optimizer state; 4 GiB covers any model this agent targets
# while still stopping a misbehaving peer from making us allocate without bound.
DEFAULT_MAX_STATE_BYTES: Final = 4 << 30

# Codes that mean "could not talk to the peer (in time)", as opposed to "the peer said no".
_UNAVAILABLE_CODES: Final = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
)
PUSH_STREAM_METHOD: Final = f"/{GOSSIP_SERVICE_NAME}/PushStream"
# Agents push over PushVector calls unless DPGAN_PUSH_STREAM=1: with long-lived PushStreams from its
# neighbours, an agent flooded by stalled pushes grew by up to 15 MiB per wave of 150 (tests/faults.py
# stalled streams, settled RSS; 0.4-2.9 MiB with PushVector), and the stream did not reach its throughput
# goal (docs/transport.md). Servers always accept both.
PUSH_STREAM_DEFAULT: bool = os.environ.get("DPGAN_PUSH_STREAM", "0") == "1"
# A reused PushStream failing with these lost its connection (peer restarted, connection renewed) or was
# ended by the peer (idle) before or while this vector went out, and no ack came: the vector is sent once
# more on a fresh stream. INTERNAL: grpc.aio's local error for a write on a call the peer has just ended.
_STREAM_RETRY_CODES: Final = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL}
)

_log = structlog.get_logger(__name__)


def _stream_frames(frames: Iterator[bytes], chunk_bytes: int) -> Iterator[tuple[bytes, bool]]:
    """(frame, is_last) of one vector on a PushStream, with the stream's end-of-vector rule applied: a
    vector ends with its first chunk carrying fewer than chunk_bytes payload bytes, so a payload that
    fills its last chunk is followed by one empty chunk (b"", an empty VectorChunk message)."""
    current = next(frames)
    for following in frames:
        yield current, False
        current = following
    # A frame shorter than chunk_bytes cannot carry a full chunk; only a longer one needs parsing.
    if len(current) >= chunk_bytes and len(parse_chunk(current).data) == chunk_bytes:
        yield current, False
        yield b"", True
    else:
        yield current, True


def _stream_chunk_bytes(payload_bytes: int, chunk_bytes: int) -> int:
    """The chunk size for a vector on a PushStream: the caller's, or 4 bytes more (element alignment kept)
    when the payload would exactly fill its last chunk. Then the last chunk is short and ends the vector
    by itself, with as many chunks as asked for; the empty end chunk would cost one more message per
    vector (as much as a data chunk's per-message overhead: ~0.1 ms on each side)."""
    if payload_bytes == 0 or payload_bytes % chunk_bytes:
        return chunk_bytes
    wider = chunk_bytes + 4
    if wider <= MAX_CHUNK_BYTES and payload_bytes % wider:
        return wider
    return chunk_bytes


def _consume_outcome(task: asyncio.Future[object]) -> None:
    # A cancelled ack read's exception is the stream's business (it is dropped); never "unretrieved".
    if not task.cancelled():
        task.exception()


class PeerUnavailable(ConnectionError):
    """The peer could not be reached, dropped the connection, or did not answer before the deadline
    (``timed_out``: the last case, where a frozen peer may still answer later)."""

    def __init__(self, message: str, *, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


class HandshakeRefused(Exception):
    """The handshake completed but the two nodes are incompatible; `reason` names the difference."""

    def __init__(self, address: str, reason: str) -> None:
        super().__init__(f"handshake with {address} refused: {reason}")
        self.reason = reason


class PeerRpcError(RuntimeError):
    """The peer answered an RPC with an error status other than unavailability."""

    def __init__(self, message: str, code: grpc.StatusCode) -> None:
        super().__init__(message)
        self.code = code


def _validate_timeout(timeout: float) -> float:
    if not timeout > 0:  # also rejects NaN
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    return timeout


class PeerClient:
    """Talks to one neighbour's GossipServer over a single reused gRPC channel.

    Handshake first: pushes and state fetches are sent as the handshaken identity. Create it inside
    the event loop that will use it (grpc.aio channels belong to one loop).
    """

    def __init__(
        self,
        address: str,
        *,
        default_timeout: float = DEFAULT_RPC_TIMEOUT_S,
        stall_timeout: float = DEFAULT_STALL_TIMEOUT_S,
        security: TransportSecurity | None = None,
        push_stream: bool | None = None,
    ) -> None:
        """`stall_timeout`: a FetchState download that delivers no chunk for this long is aborted
        (pass the agent's round timeout). `security`: mutual TLS (agent/transport/tls.py); None dials
        plaintext. `push_stream`: True sends vectors over one long-lived PushStream, False each as its own
        PushVector call; None: `PUSH_STREAM_DEFAULT` (off unless DPGAN_PUSH_STREAM=1, see below)."""
        if not address or ":" not in address:
            raise ValueError(f"peer address must be host:port, got {address!r}")
        self._address = address
        self._default_timeout = _validate_timeout(default_timeout)
        self._stall_timeout = _validate_timeout(stall_timeout)
        security = security or TransportSecurity.insecure()
        self._tls = security.enabled
        if security.enabled:
            self._channel = grpc.aio.secure_channel(
                address,
                security.channel_credentials(),
                options=[*channel_options(), *security.channel_options()],
            )
        else:
            self._channel = grpc.aio.insecure_channel(address, options=channel_options())
        self._stub = pb_grpc.GossipStub(self._channel)
        # PushVector and FetchState bypass protobuf message objects on the hot path: requests go out
        # as frames frames already serialized, responses are parsed by frames.parse_chunk without
        # copying payloads. The wire bytes are the .proto's messages either way.
        self._push_vector = self._channel.stream_unary(
            PUSH_VECTOR_METHOD,
            request_serializer=None,
            response_deserializer=pb.PushAck.FromString,
        )
        self._fetch_state = self._channel.unary_stream(
            FETCH_STATE_METHOD,
            request_serializer=pb.StateRequest.SerializeToString,
            response_deserializer=None,
        )
        self._push_stream_rpc = self._channel.stream_stream(
            PUSH_STREAM_METHOD,
            request_serializer=None,
            response_deserializer=pb.PushAck.FromString,
        )
        self._use_push_stream = PUSH_STREAM_DEFAULT if push_stream is None else push_stream
        self._push_stream: grpc.aio.StreamStreamCall | None = None
        self._push_stream_opened = 0.0
        self._push_stream_lock = asyncio.Lock()  # one vector in flight per stream
        self._identity: PeerIdentity | None = None
        self._remote: pb.HandshakeResponse | None = None
        self._bytes_sent = 0
        self._bytes_received = 0
        # The peer's data plane (agent/transport/data_plane.py), when its handshake announced one.
        self._data_plane: DataPlaneClient | None = None
        self.data_plane_pushes = 0  # pushes the data plane carried (the rest went over gRPC)
        self._data_plane_failing = False

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def address(self) -> str:
        return self._address

    @property
    def bytes_sent(self) -> int:
        """Serialized chunk bytes handed to gRPC in PushVector streams (including failed pushes)."""
        return self._bytes_sent

    @property
    def bytes_received(self) -> int:
        """Serialized chunk bytes received in FetchState streams."""
        return self._bytes_received

    @property
    def push_streaming(self) -> bool:
        """True while pushes go over a PushStream; False when disabled or the peer lacks PushStream."""
        return self._use_push_stream

    @property
    def data_plane_ready(self) -> bool:
        """Whether the next push can go over the peer's data plane (announced, connected, not busy)."""
        return self._data_plane is not None and self._data_plane.ready

    @property
    def remote(self) -> pb.HandshakeResponse | None:
        """The peer's identity from the last accepted handshake, or None before one succeeded."""
        return self._remote

    async def close(self) -> None:
        self._drop_push_stream()
        if self._data_plane is not None:
            await self._data_plane.close()
        await self._channel.close()

    async def handshake(
        self, identity: PeerIdentity, *, timeout: float | None = None, status: pb.PeerStatus | None = None
    ) -> pb.HandshakeResponse:
        """Introduce `identity` to the peer; return the peer's response if both sides are compatible.

        Raises HandshakeRefused if the peer refuses us, or if the peer's own identity (protocol,
        schema, config) is incompatible with ours even though it accepted; PeerUnavailable on
        connection failure or timeout.
        """
        try:
            response: pb.HandshakeResponse = await self._stub.Handshake(
                identity.handshake_request(status), timeout=self._timeout(timeout)
            )
        except grpc.aio.AioRpcError as error:
            raise self._translate(error, "Handshake") from error
        if not response.accepted:
            self._forget_handshake()
            # The reason is the peer's own words ("this node" is the peer): say whose they are.
            raise HandshakeRefused(self._address, f"the peer says: {response.reason or '(no reason given)'}")
        mismatch = identity_mismatch(identity, response)
        if mismatch is not None:
            self._forget_handshake()
            raise HandshakeRefused(self._address, f"peer accepted, but this node refuses it: {mismatch}")
        self._identity = identity
        self._remote = response
        data_plane = await self._data_plane_for(response)
        if data_plane is not None:
            data_plane.connect_soon()  # ready by the first push, usually
        return response

    async def push_vector(
        self,
        vector: torch.Tensor | WireVector,
        *,
        iteration: int,
        round: int,
        epoch: int | None = None,
        wire_dtype: str = "float32",
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        timeout: float | None = None,
    ) -> pb.PushAck:
        """Push one gossip vector for (iteration, round); return the peer's ack.

        `vector` is a flat float32 tensor, or a WireVector from frames.prepare_vector: prepare once
        and push the same WireVector to every neighbour to convert and checksum only once (then
        `wire_dtype` is taken from it). The tensor must not be modified until this returns.
        `epoch` defaults to the handshaken identity's membership_epoch. A refused push (stale,
        duplicate, malformed, ...) is a normal ack with accepted=False, not an exception. `timeout`
        bounds the whole push (a timed-out push cancels the client's PushStream; the next one reopens it).
        """
        identity = self._require_handshake("push_vector")
        deadline = self._timeout(timeout)
        validate_chunk_bytes(chunk_bytes)
        if isinstance(vector, WireVector):
            prepared = vector
        else:
            if isinstance(vector, torch.Tensor) and vector.dim() != 1:
                raise ValueError(f"the gossip vector must be 1-D, got shape {tuple(vector.shape)}")
            # Conversion and CRC are a full pass over up to 100+ MB: keep the event loop free for
            # the server side of this node meanwhile (the CRC and torch release the GIL).
            prepared = await asyncio.to_thread(prepare_vector, vector, wire_dtype)

        streamed = self._use_push_stream and not self._push_stream_lock.locked()
        if streamed:
            chunk_bytes = _stream_chunk_bytes(prepared.payload_bytes, chunk_bytes)

        position = {"iteration": iteration, "round": round}
        position["epoch"] = identity.membership_epoch if epoch is None else epoch

        def frames() -> Iterator[bytes]:
            return iter_frames(prepared, sender_id=identity.node_id, chunk_bytes=chunk_bytes, **position)

        first = frames()  # validates the arguments before anything is sent
        data_plane = await self._data_plane_for(self._remote)
        if data_plane is not None and data_plane.ready:
            header = header_message(prepared, sender_id=identity.node_id, chunk_bytes=chunk_bytes, **position)
            try:
                ack = await data_plane.push(header, prepared.payload, deadline)
            except DataPlaneRefusal as error:
                raise PeerRpcError(
                    f"push to {self._address} (data plane) failed: {error}", error.code
                ) from None
            except DataPlaneTimeout as error:
                raise PeerUnavailable(f"push to {self._address} failed: {error}", timed_out=True) from None
            except DataPlaneError:
                pass  # sent over gRPC below; logged once below
            else:
                if self._data_plane_failing:
                    _log.info("data plane works again", peer=self._address)
                    self._data_plane_failing = False
                self._bytes_sent += 12 + len(header) + prepared.payload.nbytes
                self.data_plane_pushes += 1
                if self.data_plane_pushes == 1:
                    _log.info("pushing over the data plane", peer=self._address, data_port=data_plane.port)
                return ack
        if data_plane is not None:
            data_plane.connect_soon()  # in the background: this push goes over gRPC meanwhile
            if data_plane.last_error and not self._data_plane_failing:
                # Once per outage: a blocked port would otherwise log at every retry.
                _log.info(
                    "data plane failed; pushing over gRPC", peer=self._address, error=data_plane.last_error
                )
                self._data_plane_failing = True
        if not streamed:
            # A second push to this peer while one is in flight does not queue behind it.
            return await self._push_unary(first, deadline)
        async with self._push_stream_lock:
            return await self._push_streamed(first, frames, chunk_bytes, deadline)

    async def _push_unary(self, frames: Iterator[bytes], timeout: float) -> pb.PushAck:
        try:
            ack: pb.PushAck = await self._push_vector(self._counting(frames), timeout=timeout)
        except grpc.aio.AioRpcError as error:
            raise self._translate(error, "PushVector") from error
        return ack

    async def _push_streamed(
        self,
        frames: Iterator[bytes],
        make_frames: Callable[[], Iterator[bytes]],
        chunk_bytes: int,
        timeout: float,
    ) -> pb.PushAck:
        """One vector over the client's PushStream, within `timeout` in all. A reused stream that turns out
        to be dead (the peer ended it or lost the connection without answering) is replaced and the
        vector sent once more; a peer without PushStream gets the vector, and all later ones, by
        PushVector."""
        loop = asyncio.get_running_loop()
        expires = loop.time() + timeout
        try:
            async with asyncio.timeout_at(expires):
                for attempt in range(2):
                    call, reused = self._push_stream_call(loop)
                    retry = reused and attempt == 0
                    try:
                        vector = _stream_frames(frames, chunk_bytes)
                        ack = await self._exchange(call, vector, fresh=not reused)
                    except grpc.aio.AioRpcError as error:
                        self._drop_push_stream()
                        if error.code() is grpc.StatusCode.UNIMPLEMENTED:
                            self._use_push_stream = False
                            _log.info("peer_lacks_push_stream", peer=self._address, fallback="PushVector")
                            break
                        if retry and error.code() in _STREAM_RETRY_CODES:
                            frames = make_frames()
                            continue
                        raise self._translate(error, "PushStream") from error
                    if ack is not None:
                        return ack
                    self._drop_push_stream()
                    if not retry:
                        raise PeerUnavailable(
                            f"PushStream to {self._address} ended without an ack (the peer is stopping?)"
                        )
                    frames = make_frames()
        except TimeoutError:
            self._drop_push_stream()
            raise PeerUnavailable(
                f"PushStream to {self._address} failed: DEADLINE_EXCEEDED: no ack within {timeout:g} s",
                timed_out=True,
            ) from None
        remaining = expires - loop.time()
        if remaining <= 0:
            raise PeerUnavailable(
                f"PushVector to {self._address} failed: DEADLINE_EXCEEDED: no time left after PushStream "
                "was refused as unimplemented",
                timed_out=True,
            )
        return await self._push_unary(make_frames(), remaining)

    def _push_stream_call(self, loop: asyncio.AbstractEventLoop) -> tuple[grpc.aio.StreamStreamCall, bool]:
        """(the PushStream to send on, whether it was opened for an earlier vector)."""
        call = self._push_stream
        if call is not None and (
            call.done() or loop.time() - self._push_stream_opened >= PUSH_STREAM_MAX_AGE_S
        ):
            self._drop_push_stream()
            call = None
        if call is not None:
            return call, True
        # No deadline: the stream lives for many vectors; each vector is bounded by its push's timeout.
        call = self._push_stream_rpc()
        self._push_stream, self._push_stream_opened = call, loop.time()
        return call, False

    def _drop_push_stream(self) -> None:
        call, self._push_stream = self._push_stream, None
        if call is not None and not call.done():
            call.cancel()

    async def _exchange(
        self, call: grpc.aio.StreamStreamCall, frames: Iterator[tuple[bytes, bool]], *, fresh: bool
    ) -> pb.PushAck | None:
        """Send one vector on `call` and read its ack; None when the peer ended the stream without one
        (it did not take the vector). The ack is read while the vector is written: an ack that comes
        before the whole vector went out (refused from its header) stops the sending, and the stream is
        dropped, since the peer cannot find the next vector's start in a vector cut short."""
        reader = asyncio.ensure_future(call.read())
        try:
            if fresh:
                # The peer answers a new stream with its headers at once, or ends it (UNIMPLEMENTED,
                # RESOURCE_EXHAUSTED). Waiting for that keeps writes from racing such an end: a write on
                # an ended call fails with a local INTERNAL error that hides the peer's status.
                await call.initial_metadata()
            whole = False
            if not call.done():
                with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                    # These two: the call ended; the read says how (the peer's status, or EOF).
                    for frame, last in frames:
                        if reader.done():
                            break
                        self._bytes_sent += len(frame)
                        await call.write(frame)
                        whole = last
            response = await reader
            if response is grpc.aio.EOF:
                self._drop_push_stream()
                return None
            if not whole:
                self._drop_push_stream()
            ack: pb.PushAck = response
            return ack
        except BaseException:
            # Cancelled, timed out or failed mid-vector: the stream is out of step; the next push reopens.
            self._drop_push_stream()
            raise
        finally:
            if not reader.done():
                reader.cancel()
            reader.add_done_callback(_consume_outcome)

    async def announce(
        self, *, iteration: int, round: int, epoch: int | None = None, timeout: float | None = None
    ) -> pb.AnnounceAck:
        """Tell the peer this node has entered gossip round (iteration, round): it may push its vector
        for that round now (paced pushes). A refusal is a normal ack with accepted=False."""
        identity = self._require_handshake("announce")
        request = pb.RoundAnnouncement(
            sender_id=identity.node_id,
            iteration=iteration,
            round=round,
            membership_epoch=identity.membership_epoch if epoch is None else epoch,
        )
        try:
            ack: pb.AnnounceAck = await self._stub.Announce(request, timeout=self._timeout(timeout))
        except grpc.aio.AioRpcError as error:
            raise self._translate(error, "Announce") from error
        return ack

    async def fetch_state(
        self,
        names: Sequence[str] = (),
        *,
        timeout: float | None = None,
        chunk_bytes: int = 0,
        max_total_bytes: int = DEFAULT_MAX_STATE_BYTES,
        device: torch.device | str = "cpu",
        stall_timeout: float | None = None,
    ) -> StateSnapshot:
        """Download named state tensors (all the peer offers if `names` is empty).

        Everything received is validated; a malformed stream raises frames.WireError. `chunk_bytes`
        0 lets the peer choose. `timeout` bounds the whole download; a download that delivers no
        chunk for `stall_timeout` (default: the client's) is cancelled with PeerUnavailable, and what
        it had received is released.
        """
        stall = self._stall_timeout if stall_timeout is None else _validate_timeout(stall_timeout)
        identity = self._require_handshake("fetch_state")
        if isinstance(names, str):
            raise ValueError("names must be a sequence of tensor names, not a single string")
        if chunk_bytes:
            validate_chunk_bytes(chunk_bytes)
        decoder = StateStreamDecoder(
            requested=names,
            max_total_bytes=max_total_bytes,
            expected_sender=self._remote.node_id if self._remote is not None else None,
            device=device,
        )
        request = pb.StateRequest(requester_id=identity.node_id, names=names, chunk_bytes=chunk_bytes)
        call = self._fetch_state(request, timeout=self._timeout(timeout))
        try:
            async with StallWatchdog(stall) as watchdog:
                async for frame in call:
                    watchdog.fed()
                    self._bytes_received += len(frame)
                    decoder.add(parse_chunk(frame))
        except grpc.aio.AioRpcError as error:
            decoder.release()
            raise self._translate(error, "FetchState") from error
        except TimeoutError:
            call.cancel()
            decoder.release()
            raise PeerUnavailable(
                f"FetchState from {self._address} stalled: no chunk for {stall:g} s; download aborted"
            ) from None
        except BaseException:
            call.cancel()
            decoder.release()
            raise
        return decoder.finish()

    # ---- helpers ---------------------------------------------------------------------------------

    def _counting(self, frames: Iterator[bytes]) -> Iterator[bytes]:
        for frame in frames:
            self._bytes_sent += len(frame)
            yield frame

    def _timeout(self, timeout: float | None) -> float:
        return self._default_timeout if timeout is None else _validate_timeout(timeout)

    def _require_handshake(self, operation: str) -> PeerIdentity:
        if self._identity is None:
            raise RuntimeError(f"{operation} to {self._address} before a successful handshake")
        return self._identity

    def _forget_handshake(self) -> None:
        self._identity = None
        self._remote = None

    async def _data_plane_for(self, remote: pb.HandshakeResponse | None) -> DataPlaneClient | None:
        """The client of the data plane the peer's last handshake announced (a new one when the port
        changed: a restarted peer); None when it announced none."""
        port = remote.data_port if remote is not None else 0
        current = self._data_plane
        if current is not None and current.port != port:
            self._data_plane = None
            await current.close()
        if port and self._data_plane is None and not self._tls:
            # Plaintext only: a TLS client never sends a vector outside TLS, whatever a peer announces.
            self._data_plane = DataPlaneClient(self._address.rsplit(":", 1)[0], port)
        return self._data_plane

    def _translate(self, error: grpc.aio.AioRpcError, operation: str) -> Exception:
        code = error.code()
        message = f"{operation} to {self._address} failed: {code.name}: {error.details()}"
        if self._tls and code is grpc.StatusCode.UNAVAILABLE:
            # A refused TLS handshake looks like any unreachable peer to gRPC: say what else it may be.
            message += (
                " (over mutual TLS: also the case when the peer's certificate is not signed by this "
                "cluster's CA, has expired, or the peer refused this node's certificate)"
            )
        if code in _UNAVAILABLE_CODES:
            return PeerUnavailable(message, timed_out=code == grpc.StatusCode.DEADLINE_EXCEEDED)
        return PeerRpcError(message, code)
