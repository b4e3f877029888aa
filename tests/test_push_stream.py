"""PushStream: one long-lived bidirectional stream per neighbour carries vector after vector, one PushAck
each, in order, with every protection of a PushVector call (real gRPC servers on 127.0.0.1, port 0)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from pathlib import Path
from typing import Any

import grpc
import pytest
import structlog
import torch

import agent.transport.client as client_module
from agent.transport._generated.dpgan.v1 import dpgan_pb2 as pb
from agent.transport._generated.dpgan.v1 import dpgan_pb2_grpc as pb_grpc
from agent.transport.client import PUSH_STREAM_METHOD, PeerClient, PeerUnavailable, _stream_chunk_bytes
from agent.transport.frames import iter_frames, parse_chunk, prepare_vector
from agent.transport.identity import PeerIdentity
from agent.transport.inbox import Inbox
from agent.transport.options import MAX_CHUNK_BYTES, MIN_CHUNK_BYTES, channel_options
from agent.transport.server import GossipServer
from tests.pki import Pki
from tests.test_transport import bits, gossip_node, identity

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def _push_streams_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """Agents push over PushVector by default (client.PUSH_STREAM_DEFAULT); these tests are of PushStream."""
    monkeypatch.setattr(client_module, "PUSH_STREAM_DEFAULT", True)

CHUNK = MIN_CHUNK_BYTES  # 64 KiB: multi-chunk vectors stay small
STALL = 0.4


def run(scenario: Callable[[], Coroutine[Any, Any, None]], timeout: float = 40.0) -> None:
    asyncio.run(asyncio.wait_for(scenario(), timeout))


def stream_frames(
    vector: torch.Tensor, sender: str, iteration: int, round: int, *, chunk_bytes: int = CHUNK, **header: Any
) -> list[bytes]:
    """One vector's frames as PushStream wants them: PushVector's frames, plus an empty chunk when the
    payload fills its last chunk (a vector ends with its first chunk shorter than chunk_bytes)."""
    frames = list(
        iter_frames(
            prepare_vector(vector),
            sender_id=sender,
            iteration=iteration,
            round=round,
            chunk_bytes=chunk_bytes,
            **header,
        )
    )
    if len(parse_chunk(frames[-1]).data) == chunk_bytes:
        frames.append(b"")
    return frames


def raw_stream(channel: grpc.aio.Channel) -> Callable[..., grpc.aio.StreamStreamCall]:
    return channel.stream_stream(
        PUSH_STREAM_METHOD, request_serializer=None, response_deserializer=pb.PushAck.FromString
    )


async def write_all(call: grpc.aio.StreamStreamCall, frames: Iterable[bytes]) -> None:
    for frame in frames:
        await call.write(frame)


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


# ---------------------------------------------------------------------------------------------------
# many vectors, one stream
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "length",
    [
        3 * CHUNK // 4 + 5,  # last chunk partial: the vector ends with it
        2 * CHUNK // 4,  # payload fills its last chunk: an empty chunk ends the vector
        100,  # a single short chunk
    ],
)
def test_many_vectors_over_one_stream_arrive_in_order_with_their_acks(length: int) -> None:
    vectors = [torch.randn(length, generator=torch.Generator().manual_seed(seed)) for seed in range(12)]

    async def scenario() -> None:
        async with (
            gossip_node("b", vector_length=length) as node,
            PeerClient(node.server.address) as client,
        ):
            await client.handshake(identity("a"))
            for index, vector in enumerate(vectors):
                iteration, round_ = divmod(index, 2)
                node.inbox.expect(iteration, round_)
                ack = await client.push_vector(vector, iteration=iteration, round=round_, chunk_bytes=CHUNK)
                assert ack.accepted and ack.status == pb.PUSH_STATUS_ACCEPTED, ack.reason
                received = await node.inbox.wait_for(iteration, round_, {"a"}, timeout=2.0)
                assert torch.equal(bits(received["a"]), bits(vector))
            assert client.push_streaming
            assert node.server.push_stream_calls_started == 1  # every vector on the same stream
            assert node.server.push_streams_in_flight == 0
            assert client.bytes_sent == node.server.bytes_received
            assert node.server.bytes_received_by_peer == {"a": client.bytes_sent}
        await until(lambda: node.server.push_stream_calls == 0)  # closing the client closed the stream

    run(scenario)


def test_the_client_sizes_chunks_so_that_no_empty_end_chunk_is_needed() -> None:
    assert _stream_chunk_bytes(3 * CHUNK + 5, CHUNK) == CHUNK
    assert _stream_chunk_bytes(2 * CHUNK, CHUNK) == CHUNK + 4  # two chunks still, the last one short
    assert _stream_chunk_bytes(0, CHUNK) == CHUNK
    assert _stream_chunk_bytes(MAX_CHUNK_BYTES, MAX_CHUNK_BYTES) == MAX_CHUNK_BYTES  # then the empty chunk


@pytest.mark.parametrize("length", [3 * CHUNK // 4 + 5, 2 * CHUNK // 4, 0])
def test_pipelined_vectors_get_one_ack_each_in_order(length: int) -> None:
    """The wire protocol itself, through the generated stub: five vectors written back to back before
    any ack is read; the acks come back one per vector, in the vectors' order. Payloads that end in a
    partial chunk, fill their last chunk (an empty chunk follows), or are empty (one header chunk)."""
    vector = torch.randn(length, generator=torch.Generator().manual_seed(1))

    async def scenario() -> None:
        async with (
            gossip_node("b", vector_length=length) as node,
            grpc.aio.insecure_channel(node.server.address, options=channel_options()) as channel,
        ):
            await pb_grpc.GossipStub(channel).Handshake(identity("a").handshake_request(), timeout=5)
            node.inbox.expect(1, 0)
            positions = [(1, 0), (1, 1), (1, 0), (0, 1), (1, 1)]
            frames = [frame for it, rnd in positions for frame in stream_frames(vector, "a", it, rnd)]
            call = raw_stream(channel)(iter(frames))
            statuses = [ack.status async for ack in call]
            assert statuses == [
                pb.PUSH_STATUS_ACCEPTED,
                pb.PUSH_STATUS_BUFFERED_AHEAD,
                pb.PUSH_STATUS_DUPLICATE,
                pb.PUSH_STATUS_STALE,
                pb.PUSH_STATUS_DUPLICATE,
            ]
            assert await call.code() == grpc.StatusCode.OK
            assert node.server.push_stream_calls_started == 1

    run(scenario)


# ---------------------------------------------------------------------------------------------------
# refusals
# ---------------------------------------------------------------------------------------------------


def test_refused_vectors_get_their_ack_and_the_stream_goes_on() -> None:
    vector = torch.ones(1000)

    async def scenario() -> None:
        async with (
            gossip_node("b", vector_length=vector.numel()) as node,
            PeerClient(node.server.address) as client,
        ):
            await client.handshake(identity("a"))
            node.inbox.expect(3, 0)
            first = await client.push_vector(vector, iteration=3, round=0)
            assert first.accepted
            again = await client.push_vector(vector, iteration=3, round=0)
            assert again.status == pb.PUSH_STATUS_DUPLICATE and "already received" in again.reason
            stale = await client.push_vector(vector, iteration=2, round=1)
            assert stale.status == pb.PUSH_STATUS_STALE and "stale" in stale.reason
            far = await client.push_vector(vector, iteration=9, round=0)
            assert far.status == pb.PUSH_STATUS_TOO_FAR_AHEAD
            wrong_length = await client.push_vector(torch.ones(999), iteration=3, round=1)
            assert (
                wrong_length.status == pb.PUSH_STATUS_MALFORMED and "element_count 999" in wrong_length.reason
            )
            ahead = await client.push_vector(vector, iteration=3, round=1)
            assert ahead.status == pb.PUSH_STATUS_BUFFERED_AHEAD
            # One-chunk vectors: each was sent whole before its ack came, so one stream carried them all.
            assert node.server.push_stream_calls_started == 1
            assert node.inbox.buffered_count == 2

    run(scenario)


def test_rest_of_a_vector_refused_from_its_header_is_skipped_and_the_next_vector_is_taken() -> None:
    length = 5 * CHUNK // 4 + 7  # six chunks
    vector = torch.randn(length, generator=torch.Generator().manual_seed(2))

    async def scenario() -> None:
        async with (
            gossip_node("b", vector_length=length) as node,
            grpc.aio.insecure_channel(node.server.address, options=channel_options()) as channel,
        ):
            await pb_grpc.GossipStub(channel).Handshake(identity("a").handshake_request(), timeout=5)
            node.inbox.expect(2, 0)
            stale = stream_frames(vector, "a", 1, 0)  # refused from its header chunk
            corrupt = stream_frames(vector, "a", 2, 0)
            flipped = bytearray(corrupt[2])
            flipped[-1] ^= 0x01  # the last payload byte of the third chunk: caught by the CRC at the end
            corrupt[2] = bytes(flipped)
            good = stream_frames(vector, "a", 2, 0)
            call = raw_stream(channel)(iter([*stale, *corrupt, *good]))
            acks = [ack async for ack in call]
            assert [ack.status for ack in acks] == [
                pb.PUSH_STATUS_STALE,
                pb.PUSH_STATUS_MALFORMED,
                pb.PUSH_STATUS_ACCEPTED,
            ]
            assert "checksum mismatch" in acks[1].reason
            received = await node.inbox.wait_for(2, 0, {"a"}, timeout=1.0)
            assert torch.equal(bits(received["a"]), bits(vector))
            # Every byte was read (the stale vector's too), and counted.
            assert node.server.bytes_received == sum(len(frame) for frame in [*stale, *corrupt, *good])

    run(scenario)


def test_a_vector_whose_end_cannot_be_found_is_refused_and_ends_the_stream() -> None:
    vector = torch.ones(1000)

    async def scenario() -> None:
        async with (
            gossip_node("b", vector_length=vector.numel()) as node,
            grpc.aio.insecure_channel(node.server.address, options=channel_options()) as channel,
        ):
            await pb_grpc.GossipStub(channel).Handshake(identity("a").handshake_request(), timeout=5)
            header = pb.VectorHeader(
                sender_id="a", dtype=pb.WIRE_DTYPE_FLOAT32, element_count=1000, chunk_bytes=17
            )
            bad = pb.VectorChunk(header=header, data=b"\x00" * 17).SerializeToString()
            with structlog.testing.capture_logs() as logs:
                call = raw_stream(channel)(iter([bad, *stream_frames(vector, "a", 0, 0)]))
                acks = [ack async for ack in call]
            # The same ack PushVector gives; then the server ends the stream (OK) without reading on.
            assert [ack.status for ack in acks] == [pb.PUSH_STATUS_MALFORMED]
            assert "chunk_bytes" in acks[0].reason
            assert await call.code() == grpc.StatusCode.OK
            assert node.inbox.buffered_count == 0
            assert node.server.rejection_counts[("a", "push_stream_desync")] == 1
            assert any("invalid chunk_bytes (17)" in entry.get("reason", "") for entry in logs)

    run(scenario)


def test_not_handshaken_sender_is_refused_on_the_stream() -> None:
    vector = torch.ones(1000)

    async def scenario() -> None:
        async with (
            gossip_node("b", vector_length=vector.numel()) as node,
            grpc.aio.insecure_channel(node.server.address, options=channel_options()) as channel,
        ):
            call = raw_stream(channel)(iter(stream_frames(vector, "stranger", 0, 0) * 2))
            acks = [ack async for ack in call]
            assert [ack.status for ack in acks] == [pb.PUSH_STATUS_NOT_HANDSHAKEN] * 2
            assert "'stranger' has not completed a handshake" in acks[0].reason
            assert node.server.rejection_counts[("stranger", "PUSH_STATUS_NOT_HANDSHAKEN")] == 2

    run(scenario)


def test_a_big_refused_vector_is_not_sent_whole_and_the_next_push_reopens() -> None:
    """An ack that comes before the vector is all sent (refused from its header) stops the sending:
    the client drops that stream and the next push opens another."""
    length = 4 << 20  # 16 MiB: far more than gRPC buffers before the ack arrives
    vector = torch.ones(length)

    async def scenario() -> None:
        async with (
            gossip_node("b", vector_length=length) as node,
            PeerClient(node.server.address) as client,
        ):
            await client.handshake(identity("a"))
            node.inbox.expect(5, 0)
            prepared = prepare_vector(vector)
            stale = await client.push_vector(prepared, iteration=1, round=0, chunk_bytes=CHUNK, timeout=20)
            assert stale.status == pb.PUSH_STATUS_STALE
            assert client.bytes_sent < length * 4  # stopped early: not sent whole
            ack = await client.push_vector(prepared, iteration=5, round=0, timeout=20)
            assert ack.accepted, ack.reason
            assert node.server.push_stream_calls_started == 2

    run(scenario)


def test_a_push_going_stale_while_arriving_is_acked_and_the_stream_replaced() -> None:
    length = 5 * CHUNK // 4 + 7
    vector = torch.ones(length)

    async def scenario() -> None:
        async with (
            gossip_node("b", vector_length=length, stall_timeout=10.0) as node,
            grpc.aio.insecure_channel(node.server.address, options=channel_options()) as channel,
        ):
            await pb_grpc.GossipStub(channel).Handshake(identity("a").handshake_request(), timeout=5)
            call = raw_stream(channel)()
            await write_all(call, stream_frames(vector, "a", 0, 0)[:3])
            await until(lambda: node.server.push_streams_in_flight == 1)
            node.inbox.expect(0, 1)
            ack = await call.read()
            assert ack.status == pb.PUSH_STATUS_STALE and "became stale while arriving" in ack.reason
            # A read was cancelled: the server ends the stream rather than read on.
            assert await call.read() is grpc.aio.EOF
            assert await call.code() == grpc.StatusCode.OK
            assert node.server.push_streams_in_flight == 0

    run(scenario)


# ---------------------------------------------------------------------------------------------------
# watchdogs, timeouts, restarts
# ---------------------------------------------------------------------------------------------------


def test_a_vector_stalled_on_the_stream_is_aborted_but_an_idle_stream_is_not() -> None:
    length = 5 * CHUNK // 4 + 7
    vector = torch.ones(length)

    async def scenario() -> None:
        async with (
            gossip_node("b", vector_length=length, rounds_per_iteration=1, stall_timeout=STALL) as node,
            grpc.aio.insecure_channel(node.server.address, options=channel_options()) as channel,
        ):
            await pb_grpc.GossipStub(channel).Handshake(identity("a").handshake_request(), timeout=5)
            call = raw_stream(channel)()
            await write_all(call, stream_frames(vector, "a", 0, 0))
            assert (await call.read()).accepted
            await asyncio.sleep(3 * STALL)  # idle between vectors: no stall
            node.inbox.expect(1, 0)
            await write_all(call, stream_frames(vector, "a", 1, 0)[:3])
            stalled = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await call.read()
            assert raised.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            assert "stalled: no chunk from 'a'" in (raised.value.details() or "")
            assert time.monotonic() - stalled < 2 * STALL + 0.5
            assert node.server.push_streams_in_flight == 0
            assert node.server.rejection_counts[("a", "push_stalled")] == 1

    run(scenario)


def test_a_timeout_mid_vector_reopens_the_stream_for_the_next_push() -> None:
    length = 4 << 20  # 16 MiB in 64 KiB chunks: far from done after 20 ms
    sent = torch.randn(length, generator=torch.Generator().manual_seed(5))
    vector = prepare_vector(sent)

    async def scenario() -> None:
        async with (
            gossip_node("b", vector_length=length, rounds_per_iteration=1) as node,
            PeerClient(node.server.address) as client,
        ):
            await client.handshake(identity("a"))
            ack = await client.push_vector(vector, iteration=0, round=0, timeout=20)
            assert ack.accepted
            node.inbox.expect(1, 0)
            started = time.monotonic()
            with pytest.raises(PeerUnavailable, match="DEADLINE_EXCEEDED") as raised:
                await client.push_vector(vector, iteration=1, round=0, chunk_bytes=CHUNK, timeout=0.02)
            assert raised.value.timed_out
            assert time.monotonic() - started < 1.0
            assert client.bytes_sent - node.server.bytes_received > 0  # it was cut mid-vector
            await until(lambda: node.server.push_streams_in_flight == 0)
            assert node.inbox.buffered_count == 0
            ack = await client.push_vector(vector, iteration=1, round=0, timeout=20)
            assert ack.accepted, ack.reason
            assert node.server.push_stream_calls_started == 2
            received = await node.inbox.wait_for(1, 0, {"a"}, timeout=1.0)
            assert torch.equal(received["a"], sent)

    run(scenario)


def test_the_client_reconnects_after_the_server_restarts() -> None:
    vector = torch.ones(1000)

    async def scenario() -> None:
        inbox = Inbox(rounds_per_iteration=1)
        first = GossipServer(identity=identity("b"), inbox=inbox, vector_length=1000)
        await first.start()
        port = first.bound_port
        async with PeerClient(first.address) as client:
            await client.handshake(identity("a"))
            assert (await client.push_vector(vector, iteration=0, round=0)).accepted
            started = time.monotonic()
            await first.stop(5)  # the idle stream ends at once, not after the 5 s grace
            assert time.monotonic() - started < 2.0
            with pytest.raises(PeerUnavailable):
                await client.push_vector(vector, iteration=0, round=0, timeout=2)

            inbox = Inbox(rounds_per_iteration=1)
            second = GossipServer(identity=identity("b"), inbox=inbox, vector_length=1000, port=port)
            await second.start()
            try:
                # The channel is in reconnect backoff after the failed push: retry as the registry's
                # probes do until the new server answers.
                for _ in range(100):
                    with contextlib.suppress(PeerUnavailable):
                        await client.handshake(identity("a"), timeout=1)
                        break
                    await asyncio.sleep(0.1)
                ack = await client.push_vector(vector, iteration=0, round=0, timeout=5)
                assert ack.accepted, ack.reason
                assert (await client.push_vector(vector, iteration=0, round=0)).status == (
                    pb.PUSH_STATUS_DUPLICATE
                )
                assert second.push_stream_calls_started == 1
                assert client.push_streaming
            finally:
                await second.stop(0)

    run(scenario)


def test_a_stream_idle_for_the_connection_idle_limit_is_ended_and_replaced() -> None:
    vector = torch.ones(1000)

    async def scenario() -> None:
        async with (
            gossip_node("b", vector_length=1000, rounds_per_iteration=1, max_connection_idle_s=0.3) as node,
            PeerClient(node.server.address) as client,
        ):
            await client.handshake(identity("a"))
            assert (await client.push_vector(vector, iteration=0, round=0)).accepted
            assert node.server.push_stream_calls == 1
            await until(lambda: node.server.push_stream_calls == 0)  # ended by the server, idle
            node.inbox.expect(1, 0)
            await client.handshake(identity("a"))
            assert (await client.push_vector(vector, iteration=1, round=0)).accepted
            assert node.server.push_stream_calls_started == 2

    run(scenario)


def test_concurrent_pushes_to_one_peer_do_not_queue_behind_each_other() -> None:
    length = 1 << 20  # 4 MiB
    vector = prepare_vector(torch.ones(length))

    async def scenario() -> None:
        async with (
            gossip_node("b", vector_length=length) as node,
            PeerClient(node.server.address) as client,
        ):
            await client.handshake(identity("a"))
            acks = await asyncio.gather(
                client.push_vector(vector, iteration=0, round=0, timeout=20),
                client.push_vector(vector, iteration=0, round=1, timeout=20),
            )
            assert [ack.status for ack in acks] == [pb.PUSH_STATUS_ACCEPTED, pb.PUSH_STATUS_BUFFERED_AHEAD]
            # The second found the stream busy and went as a PushVector call of its own.
            assert node.server.push_stream_calls_started == 1
            assert client.bytes_sent == node.server.bytes_received

    run(scenario)


# ---------------------------------------------------------------------------------------------------
# peers without PushStream
# ---------------------------------------------------------------------------------------------------


class UnaryOnlyServer(GossipServer):
    """A peer of an older version: no PushStream method."""

    def _method_handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        handlers = super()._method_handlers()
        del handlers["PushStream"]
        return handlers


def test_a_peer_without_push_stream_gets_pushvector_calls() -> None:
    vector = torch.randn(3 * CHUNK // 4 + 5, generator=torch.Generator().manual_seed(6))

    async def scenario() -> None:
        server = UnaryOnlyServer(
            identity=identity("b"), inbox=Inbox(rounds_per_iteration=2), vector_length=vector.numel()
        )
        await server.start()
        try:
            async with PeerClient(server.address) as client:
                await client.handshake(identity("a"))
                with structlog.testing.capture_logs() as logs:
                    ack = await client.push_vector(vector, iteration=0, round=0, chunk_bytes=CHUNK)
                assert ack.accepted, ack.reason
                assert not client.push_streaming  # remembered: no second try
                assert [entry["event"] for entry in logs] == ["peer_lacks_push_stream"]
                ahead = await client.push_vector(vector, iteration=0, round=1, chunk_bytes=CHUNK)
                assert ahead.status == pb.PUSH_STATUS_BUFFERED_AHEAD
                received = await server._inbox.wait_for(0, 0, {"a"}, timeout=1.0)
                assert torch.equal(bits(received["a"]), bits(vector))
                assert server.push_stream_calls_started == 0
        finally:
            await server.stop(0)

    run(scenario)


# ---------------------------------------------------------------------------------------------------
# mutual TLS
# ---------------------------------------------------------------------------------------------------


def tls_identity(node_id: str) -> PeerIdentity:
    return PeerIdentity(
        node_id=node_id,
        advertise_address="127.0.0.1:1",
        schema_hash="schema",
        config_hash="config",
        config_json="{}",
        run_id="run-a",
    )


@contextlib.asynccontextmanager
async def tls_node(pki: Pki, vector_length: int) -> AsyncIterator[GossipServer]:
    server = GossipServer(
        identity=tls_identity("node-0"),
        inbox=Inbox(rounds_per_iteration=1),
        vector_length=vector_length,
        security=pki.security("node-0"),
    )
    await server.start()
    try:
        yield server
    finally:
        await server.stop(0)


def test_a_member_cannot_push_in_another_members_name_over_the_stream(tmp_path: Path) -> None:
    """node-3 holds a valid certificate and handshook as itself; vectors it sends on a PushStream in
    node-1's name are refused as FORBIDDEN, its own vectors on the same stream are taken."""
    pki = Pki.create(tmp_path / "pki")
    vector = torch.ones(1000)

    async def scenario() -> None:
        async with tls_node(pki, vector.numel()) as server:
            security = pki.security("node-3")
            with structlog.testing.capture_logs() as logs:
                async with PeerClient(server.address, security=security) as forger:
                    await forger.handshake(tls_identity("node-3"))
                    assert (await forger.push_vector(vector, iteration=0, round=0)).accepted
                    # The client itself speaking for node-1 (as a tampered agent would):
                    forger._identity = tls_identity("node-1")
                    forged = await forger.push_vector(vector, iteration=0, round=0)
                    assert forged.status == pb.PUSH_STATUS_FORBIDDEN and not forged.accepted
                    assert "claims node 'node-1'" in forged.reason
                    assert "certificate is for 'node-3'" in forged.reason
                    assert server.push_stream_calls_started == 1
                options = [*channel_options(), *security.channel_options()]
                async with grpc.aio.secure_channel(
                    server.address, security.channel_credentials(), options=options
                ) as channel:
                    server._inbox.expect(1, 0)
                    frames = [
                        *stream_frames(vector, "node-1", 1, 0),
                        *stream_frames(vector, "node-3", 1, 0),
                        *stream_frames(vector, "node-1", 1, 0),
                    ]
                    acks = [ack async for ack in raw_stream(channel)(iter(frames))]
            assert [ack.status for ack in acks] == [
                pb.PUSH_STATUS_FORBIDDEN,
                pb.PUSH_STATUS_ACCEPTED,
                pb.PUSH_STATUS_FORBIDDEN,
            ]
            assert server._inbox.buffered_count == 1
            received = await server._inbox.wait_for(1, 0, {"node-1", "node-3"}, timeout=0.2)
            assert set(received) == {"node-3"}
            forbidden = [e for e in logs if e["event"] == "gossip_rejected" and e["kind"] == "push_forbidden"]
            assert len(forbidden) == 1  # logged once, counted every time
            assert server.rejection_counts[("node-3", "push_forbidden")] == 3

    run(scenario)
