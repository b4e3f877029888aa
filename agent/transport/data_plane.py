"""The data plane: gossip pushes over one plain TCP connection per neighbour, beside gRPC.

gRPC's receive path costs more than the link at 1–16 MiB on loopback (docs/transport.md: its HTTP/2
framing, two copies inside grpcio and a thread hop per message). Here a push is a length-prefixed
VectorChunk holding only the VectorHeader, then the payload's raw bytes, which the receiver reads
straight into the assembler's receive buffer (``VectorAssembler.slot``) one ``chunk_bytes`` piece at a
time, and the sender writes from its prepared vector's memory without a copy (``sock_sendall``). Every
check of a PushVector push still runs, in the same code (``GossipServer._receive_push``): the caps, the
handshake check, the stall watchdog, the position, the CRC-32, the finite check and the inbox. The
answer is the same PushAck.

Wire format (all integers little-endian):

- client → server, once per connection: ``PREAMBLE`` (8 bytes);
- client → server, per push: u32 ``n`` (1 ≤ n ≤ ``MAX_HEADER_MESSAGE_BYTES``), u64 ``p``, ``n`` bytes of
  a serialized VectorChunk with only its header field, then ``p`` payload bytes: those the header
  announces (``element_count`` elements of its dtype, or its coded/compressed byte count). ``p`` lets
  the server skip the payload of a push it refuses and keep the connection;
- server → client, per push: one byte kind, u32 ``m``, ``m`` bytes: kind ``ACK`` carries a serialized
  PushAck; kind ``ERROR`` a u32 gRPC status code and a UTF-8 reason (what PushVector would have ended
  the call with: a cap reached, a stall). After an ``ERROR`` the server closes the connection; the
  client opens a new one for its next push.

Security: plaintext only, so an agent with TLS credentials refuses ``--data-port`` (agent/node/main.py).
It trusts the header's sender as plaintext gRPC does, and reads pushes only from senders that completed
a gRPC handshake (run id, configuration, schema). TLS through asyncio's SSL layer moved 0.24–0.54× of
the plaintext bytes on loopback, slower than gRPC's own TLS (docs/transport.md), so it is not offered.
The data plane is off unless the operator gives ``--data-port``. A client connects in the background
and pushes over gRPC until connected; a client whose connection fails pushes over gRPC and tries the
data plane again after ``RETRY_AFTER_S`` (doubling while failures repeat).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Final

import grpc
import structlog

from agent.transport._generated.dpgan.v1 import dpgan_pb2 as pb
from agent.transport.frames import (
    PayloadInPlace,
    RawChunk,
    VectorAssembler,
    WireError,
    WireErrorKind,
    parse_chunk,
)

PREAMBLE: Final = b"DPGANDP1"
MAX_HEADER_MESSAGE_BYTES: Final = 64 * 1024
ACK: Final = 0
ERROR: Final = 1
_U32: Final = struct.Struct("<I")
_PUSH_PREFIX: Final = struct.Struct("<IQ")
_RESPONSE: Final = struct.Struct("<BI")
# A connection that carries no push for this long is closed (the client reconnects on its next push).
IDLE_TIMEOUT_S: Final = 300.0
# After a failed connection the client pushes over gRPC for this long before it dials again; the wait
# doubles while failures repeat, up to MAX_RETRY_AFTER_S.
RETRY_AFTER_S: Final = 10.0
MAX_RETRY_AFTER_S: Final = 300.0
# A connection not made within this long counts as failed (a port that drops packets: a firewall).
CONNECT_TIMEOUT_S: Final = 5.0
# Bytes a transport may hand over while no read waits (reading is paused then; a safety bound).
_MAX_PENDING_BYTES: Final = 4 * 1024 * 1024

_log = structlog.get_logger(__name__)

PushResult = pb.PushAck | tuple[grpc.StatusCode, str]
# GossipServer._receive_push: (chunks, peer, authenticated node id) -> (result, interrupted).
ReceivePush = Callable[
    [AsyncIterator[RawChunk | WireError], str, str | None], Awaitable[tuple[PushResult, bool]]
]


class DataPlaneError(ConnectionError):
    """The data plane could not carry a push (connect, write, read or framing): send it over gRPC."""


class DataPlaneTimeout(DataPlaneError):
    """The push did not end within its timeout (the peer is slow or frozen): as a timed-out PushVector."""


# ---- server --------------------------------------------------------------------------------------------


class _Connection(asyncio.BufferedProtocol):
    """One data-plane connection, read into buffers the reader names (``read_into``), never copied on
    the way: the transport reads straight into the assembler's slot. Reading is paused between reads,
    so bytes wait in the kernel's buffers until the server asks for them."""

    def __init__(self, on_open: Callable[[_Connection], None]) -> None:
        self._on_open = on_open
        self.transport: asyncio.Transport | None = None
        self._target: memoryview | None = None
        self._filled = 0
        self._waiter: asyncio.Future[None] | None = None
        self._pending = bytearray()  # bytes handed over with no read waiting
        self._scratch = memoryview(bytearray(64 * 1024))
        self.closed = False
        self.last_read = 0  # bytes the last read_into placed, also when it was cancelled midway

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.pause_reading()
        self._on_open(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._target is not None:
            return self._target[self._filled :]
        return self._scratch

    def buffer_updated(self, nbytes: int) -> None:
        if self._target is None:
            self._pending += self._scratch[:nbytes]
            if len(self._pending) > _MAX_PENDING_BYTES:
                self.close()
            return
        self._filled += nbytes
        if self._filled == len(self._target):
            assert self.transport is not None
            self.transport.pause_reading()
            if self._waiter is not None and not self._waiter.done():
                self._waiter.set_result(None)

    def eof_received(self) -> bool:
        return False  # close

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(ConnectionError("the peer closed the data-plane connection"))

    async def read_into(self, view: memoryview) -> None:
        """Fill ``view`` completely; raises ConnectionError if the connection ends first."""
        taken = min(len(self._pending), len(view))
        if taken:
            view[:taken] = self._pending[:taken]
            del self._pending[:taken]
        self.last_read = taken
        if taken == len(view):
            return
        if self.closed or self.transport is None:
            raise ConnectionError("the data-plane connection is closed")
        self._target, self._filled = view, taken
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.resume_reading()
        try:
            await self._waiter
        finally:
            self.last_read = self._filled
            self._target, self._waiter = None, None
            if not self.closed:
                self.transport.pause_reading()

    async def read_exactly(self, count: int) -> bytes:
        buffer = bytearray(count)
        await self.read_into(memoryview(buffer))
        return bytes(buffer)

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        self.closed = True


class PushPayload:
    """The chunks ``_receive_push`` reads for one data-plane push: the header, then the payload read
    into the assembler's slots (``bind``: the server hands over the assembler it made for the header)."""

    def __init__(self, connection: _Connection, header_chunk: RawChunk, payload_bytes: int) -> None:
        self._connection = connection
        self._header_chunk: RawChunk | None = header_chunk
        self._payload_bytes = payload_bytes
        self._consumed = 0  # payload bytes taken off the connection, a chunk cut off midway included
        self.assembler: VectorAssembler | None = None

    def bind(self, assembler: VectorAssembler) -> None:
        self.assembler = assembler

    def __aiter__(self) -> PushPayload:
        return self

    async def __anext__(self) -> RawChunk | PayloadInPlace | WireError:
        if self._header_chunk is not None:
            chunk, self._header_chunk = self._header_chunk, None
            return chunk
        if self.assembler is None:
            raise StopAsyncIteration
        if self.assembler.received_bytes == 0 and self.assembler.expected_bytes != self._payload_bytes:
            return WireError(
                WireErrorKind.LENGTH,
                f"the push announces {self._payload_bytes} payload bytes; its header, "
                f"{self.assembler.expected_bytes}",
            )
        slot = self.assembler.slot()
        if not len(slot):
            raise StopAsyncIteration
        try:
            await self._connection.read_into(slot)
        finally:
            # A push aborted while this chunk arrived (stale, stall) took part of it off the connection.
            self._consumed += self._connection.last_read
        return PayloadInPlace(len(slot))

    def unread_bytes(self) -> int:
        """Payload bytes of this push still on the connection (all of them if it was refused early)."""
        return self._payload_bytes - self._consumed


class DataPlaneServer:
    """Listens on ``host:port`` and hands every push to ``receive`` (``GossipServer._receive_push``)."""

    def __init__(
        self,
        host: str,
        port: int,
        receive: ReceivePush,
        *,
        stall_timeout: float,
        max_connections: int,
    ) -> None:
        self._host, self._port = host, port
        self._receive = receive
        self._stall_timeout = stall_timeout
        self._max_connections = max_connections
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.connections_accepted = 0  # served (the preamble not yet checked)
        self.connections_refused = 0  # closed at once: max_connections were open
        self._refusal_logged_at = -60.0

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            raise RuntimeError("the data plane is not listening")
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        host = self._host.strip("[]") or None
        self._server = await loop.create_server(
            lambda: _Connection(self._opened), host, self._port, reuse_port=False
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)

    def _opened(self, connection: _Connection) -> None:
        if len(self._tasks) >= self._max_connections:
            self.connections_refused += 1
            now = time.monotonic()
            if now - self._refusal_logged_at >= 60.0:
                self._refusal_logged_at = now
                _log.warning(
                    "data_plane_connections_exhausted",
                    open=len(self._tasks),
                    refused_so_far=self.connections_refused,
                    hint="peers refused here push over gRPC",
                )
            connection.close()
            return
        self.connections_accepted += 1
        task = asyncio.get_running_loop().create_task(self._serve(connection))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, connection: _Connection) -> None:
        assert connection.transport is not None
        peer = _peer_name(connection.transport)
        try:
            preamble = await asyncio.wait_for(connection.read_exactly(len(PREAMBLE)), self._stall_timeout)
            if preamble != PREAMBLE:
                return
            while not connection.closed:
                if not await self._serve_push(connection, peer):
                    return
        except (ConnectionError, TimeoutError):
            return
        except Exception:  # a bug here must not pass silently, nor take the server down
            _log.exception("data_plane_connection_failed", peer=peer)
        finally:
            connection.close()

    async def _serve_push(self, connection: _Connection, peer: str) -> bool:
        """One push and its answer; False when the connection must close."""
        prefix = await asyncio.wait_for(connection.read_exactly(_PUSH_PREFIX.size), IDLE_TIMEOUT_S)
        length, payload_bytes = _PUSH_PREFIX.unpack(prefix)
        if not 1 <= length <= MAX_HEADER_MESSAGE_BYTES:
            reason = f"data-plane header message of {length} bytes (1 to {MAX_HEADER_MESSAGE_BYTES} allowed)"
            connection.write(_error(grpc.StatusCode.INVALID_ARGUMENT, reason))
            return False
        raw = await asyncio.wait_for(connection.read_exactly(length), self._stall_timeout)
        try:
            parsed = parse_chunk(raw)
            if parsed.header is None or len(parsed.data):
                raise WireError(
                    WireErrorKind.FRAMING, "a data-plane push must begin with a header-only chunk"
                )
        except WireError as error:
            connection.write(_error(grpc.StatusCode.INVALID_ARGUMENT, str(error)))
            return False
        header_chunk = RawChunk(parsed.header, b"", _PUSH_PREFIX.size + length, header_only=True)
        payload = PushPayload(connection, header_chunk, payload_bytes)
        result, _ = await self._receive(payload, peer, None)  # plaintext: no certificate identity
        if isinstance(result, tuple):
            code, reason = result
            connection.write(_error(code, reason))
            return False
        # A push refused before or while its payload arrived (duplicate, stale, malformed): skip the rest
        # of its bytes, so that the connection stays in step for the next push.
        await self._skip(connection, payload.unread_bytes())
        connection.write(_response(ACK, result.SerializeToString()))
        return True

    async def _skip(self, connection: _Connection, count: int) -> None:
        """Read and drop ``count`` bytes, each piece within the stall timeout."""
        if count <= 0:
            return
        scratch = memoryview(bytearray(min(count, 1 << 20)))
        while count:
            piece = scratch[: min(count, len(scratch))]
            await asyncio.wait_for(connection.read_into(piece), self._stall_timeout)
            count -= len(piece)


def _peer_name(transport: asyncio.BaseTransport) -> str:
    address = transport.get_extra_info("peername")
    if isinstance(address, tuple) and len(address) >= 2:
        host = f"[{address[0]}]" if ":" in str(address[0]) else str(address[0])
        return f"data:{host}:{address[1]}"
    return "data:unknown"


def _response(kind: int, body: bytes) -> bytes:
    return _RESPONSE.pack(kind, len(body)) + body


def _error(code: grpc.StatusCode, reason: str) -> bytes:
    return _response(ERROR, _U32.pack(code.value[0]) + reason.encode("utf-8", "replace"))


# ---- client --------------------------------------------------------------------------------------------


class _PlainConnection:
    """A client connection: the payload goes from the sender's memory to the kernel with no copy
    (``sock_sendall`` of a memoryview), where a stream transport would buffer a copy."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    @classmethod
    async def open(cls, host: str, port: int) -> _PlainConnection:
        loop = asyncio.get_running_loop()
        family, kind, protocol, _, address = (
            await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
        )[0]
        sock = socket.socket(family, kind, protocol)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            await loop.sock_connect(sock, address)
        except BaseException:
            sock.close()
            raise
        connection = cls(sock)
        await loop.sock_sendall(sock, PREAMBLE)
        return connection

    async def send(self, head: bytes, payload: memoryview) -> None:
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(self._sock, head)
        await loop.sock_sendall(self._sock, payload)

    async def receive(self, count: int) -> bytes:
        loop = asyncio.get_running_loop()
        buffer = bytearray(count)
        view, filled = memoryview(buffer), 0
        while filled < count:
            got = await loop.sock_recv_into(self._sock, view[filled:])
            if not got:
                raise asyncio.IncompleteReadError(bytes(buffer[:filled]), count)
            filled += got
        return bytes(buffer)

    async def close(self) -> None:
        self._sock.close()


class DataPlaneClient:
    """Pushes to one peer's data plane over one connection, one push at a time.

    The connection is made in the background (``ready`` is False meanwhile, and the caller pushes over
    gRPC), so a port that drops packets (a firewall) never holds a push up. A failure makes the client
    wait ``RETRY_AFTER_S`` before it dials again, doubling while failures repeat (up to
    ``MAX_RETRY_AFTER_S``)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host.strip("[]"), port
        self._connection: _PlainConnection | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._inflight: asyncio.Future[pb.PushAck] | None = None
        self._failures = 0
        self._retry_at = 0.0
        self.last_error = ""

    @property
    def ready(self) -> bool:
        """Connected, and no push in flight: the next push can go over the data plane."""
        return self._connection is not None and not self._lock.locked()

    def connect_soon(self) -> None:
        """Start connecting in the background unless connected, connecting, or waiting to retry."""
        if self._connection is not None or self._connecting is not None or time.monotonic() < self._retry_at:
            return
        self._connecting = asyncio.ensure_future(self._connect())

    async def _connect(self) -> None:
        try:
            self._connection = await asyncio.wait_for(
                _PlainConnection.open(self.host, self.port), CONNECT_TIMEOUT_S
            )
        except TimeoutError:
            self._failed(TimeoutError(f"no connection within {CONNECT_TIMEOUT_S:g} s"))
        except OSError as error:
            self._failed(error)
        finally:
            self._connecting = None

    def _failed(self, error: BaseException) -> None:
        self._failures += 1
        delay = min(MAX_RETRY_AFTER_S, RETRY_AFTER_S * 2 ** (self._failures - 1))
        self._retry_at = time.monotonic() + delay
        self.last_error = str(error) or type(error).__name__

    async def close(self) -> None:
        """Close the connection; a push in flight ends at once (CancelledError in its caller, which is
        not itself cancelled: as a gRPC call on a closed channel)."""
        if self._inflight is not None and not self._inflight.done():
            self._inflight.cancel()
        if self._connecting is not None:
            self._connecting.cancel()
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.close()

    async def push(self, header: bytes, payload: memoryview, timeout: float) -> pb.PushAck:
        """Send one push (``header``: ``frames.header_message``; ``payload``: the prepared bytes) over the
        connection (``ready`` must be True) and return the receiver's PushAck. Raises DataPlaneTimeout
        past ``timeout`` seconds, DataPlaneError when the connection failed (send the push over gRPC
        instead), and DataPlaneRefusal for what PushVector would have ended the call with (a cap
        reached, a stall)."""
        async with self._lock:
            connection = self._connection
            if connection is None:
                raise DataPlaneError(f"data plane {self.host}:{self.port}: not connected")
            self._inflight = asyncio.ensure_future(self._push(connection, header, payload))
            try:
                ack = await asyncio.wait_for(self._inflight, timeout)
            except DataPlaneRefusal:
                await self._drop()
                raise
            except TimeoutError:
                await self._drop(TimeoutError(f"no answer within {timeout:g} s"))
                raise DataPlaneTimeout(
                    f"data plane {self.host}:{self.port}: no answer within {timeout:g} s"
                ) from None
            except (OSError, asyncio.IncompleteReadError, ValueError) as error:
                await self._drop(error)
                raise DataPlaneError(f"data plane {self.host}:{self.port}: {self.last_error}") from None
            except asyncio.CancelledError:
                await self._drop()  # a push cut off mid-payload leaves the connection out of step
                raise
            finally:
                self._inflight = None
            self._failures, self.last_error = 0, ""
            return ack

    async def _drop(self, error: BaseException | None = None) -> None:
        """Close the connection after a failed push; ``error``: a failure that makes us wait to retry."""
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.close()
        if error is not None:
            self._failed(error)
        else:
            self.last_error = ""

    @staticmethod
    async def _push(connection: _PlainConnection, header: bytes, payload: memoryview) -> pb.PushAck:
        await connection.send(_PUSH_PREFIX.pack(len(header), payload.nbytes) + header, payload)
        kind, length = _RESPONSE.unpack(await connection.receive(_RESPONSE.size))
        if length > MAX_HEADER_MESSAGE_BYTES:
            raise ValueError(f"data-plane response of {length} bytes")
        body = await connection.receive(length)
        if kind == ACK:
            return pb.PushAck.FromString(body)
        if kind == ERROR and length >= 4:
            (code,) = _U32.unpack(body[:4])
            raise DataPlaneRefusal(body[4:].decode("utf-8", "replace"), _status_code(code))
        raise ValueError(f"unknown data-plane response kind {kind}")


class DataPlaneRefusal(RuntimeError):
    """The receiver ended a push as PushVector would end the call (``code``: its gRPC status code)."""

    def __init__(self, message: str, code: grpc.StatusCode) -> None:
        super().__init__(message)
        self.code = code


def _status_code(value: int) -> grpc.StatusCode:
    for code in grpc.StatusCode:
        if code.value[0] == value:
            return code
    return grpc.StatusCode.UNKNOWN
