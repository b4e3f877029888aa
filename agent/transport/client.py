"""gRPC client side of the gossip transport: one PeerClient per neighbour, one channel each.

Every call carries a gRPC deadline, so nothing waits on a peer longer than the caller's timeout;
connection failures and deadlines surface as PeerUnavailable, refusals as HandshakeRefused, and any
other RPC failure as PeerRpcError. Data coming back from a peer (FetchState) is validated exactly
like pushed data on the server side.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Final, Self

import grpc
import torch

from agent.transport._generated.dpgan.v1 import dpgan_pb2 as pb
from agent.transport._generated.dpgan.v1 import dpgan_pb2_grpc as pb_grpc
from agent.transport.frames import WireVector, iter_frames, parse_chunk, prepare_vector
from agent.transport.identity import PeerIdentity, identity_mismatch
from agent.transport.options import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_STALL_TIMEOUT_S,
    channel_options,
    validate_chunk_bytes,
)
from agent.transport.protocol import FETCH_STATE_METHOD, PUSH_VECTOR_METHOD
from agent.transport.state import StateSnapshot, StateStreamDecoder
from agent.transport.tls import TransportSecurity

DEFAULT_RPC_TIMEOUT_S: Final = 10.0
# A late joiner downloads parameters plus optimizer state; 4 GiB covers any model this agent targets
# while still stopping a misbehaving peer from making us allocate without bound.
DEFAULT_MAX_STATE_BYTES: Final = 4 << 30

# Codes that mean "could not talk to the peer (in time)", as opposed to "the peer said no".
_UNAVAILABLE_CODES: Final = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
)


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
    ) -> None:
        """`stall_timeout`: a FetchState download that delivers no chunk for this long is aborted
        (pass the agent's round timeout). `security`: mutual TLS (agent/transport/tls.py); None dials
        plaintext."""
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
        self._identity: PeerIdentity | None = None
        self._remote: pb.HandshakeResponse | None = None
        self._bytes_sent = 0
        self._bytes_received = 0

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
    def remote(self) -> pb.HandshakeResponse | None:
        """The peer's identity from the last accepted handshake, or None before one succeeded."""
        return self._remote

    async def close(self) -> None:
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
        duplicate, malformed, ...) is a normal ack with accepted=False, not an exception.
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
        frames = iter_frames(
            prepared,
            sender_id=identity.node_id,
            iteration=iteration,
            round=round,
            epoch=identity.membership_epoch if epoch is None else epoch,
            chunk_bytes=chunk_bytes,
        )
        try:
            ack: pb.PushAck = await self._push_vector(self._counting(frames), timeout=deadline)
        except grpc.aio.AioRpcError as error:
            raise self._translate(error, "PushVector") from error
        return ack

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
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(loop.time() + stall) as watchdog:
                async for frame in call:
                    watchdog.reschedule(loop.time() + stall)
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
