"""Tests for agent.transport: codec, inbox, and a real gRPC server and client on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import socket
import struct
import threading
import time
import zlib
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import structlog
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agent.transport import exponent_coding
from agent.transport._generated.dpgan.v1 import dpgan_pb2 as pb
from agent.transport._generated.dpgan.v1 import dpgan_pb2_grpc as pb_grpc
from agent.transport.buffers import ReceiveBufferPool
from agent.transport.client import HandshakeRefused, PeerClient, PeerRpcError, PeerUnavailable
from agent.transport.frames import (
    ExpectedVector,
    Position,
    VectorAssembler,
    WireError,
    WireErrorKind,
    all_finite,
    decode_vector,
    encode_vector,
    iter_chunks,
    iter_frames,
    parse_chunk,
    payload_crc32,
    prepare_vector,
)
from agent.transport.identity import PeerIdentity, describe_config_difference, identity_mismatch
from agent.transport.inbox import Inbox, InboxMessage, PutOutcome
from agent.transport.options import (
    DEFAULT_CHUNK_BYTES,
    MAX_CHUNK_BYTES,
    MIN_CHUNK_BYTES,
    channel_options,
    server_options,
    validate_chunk_bytes,
)
from agent.transport.protocol import GOSSIP_SERVICE_NAME, PROTOCOL_VERSION
from agent.transport.server import BindError, GossipServer
from agent.transport.state import StateSnapshot, StateStreamDecoder, encode_state

pytestmark = pytest.mark.timeout(60)

CHUNK = MIN_CHUNK_BYTES  # small chunks keep multi-chunk tests cheap
CONFIG = {"algorithm": "dposg", "lr": 0.0002, "model": {"width": 64, "latent_dim": 16}}


def run(scenario: Callable[[], Coroutine[Any, Any, None]], timeout: float = 30.0) -> None:
    """Run one async scenario on a fresh event loop, with a hard deadline of its own."""
    asyncio.run(asyncio.wait_for(scenario(), timeout))


def identity(node_id: str, *, config: dict[str, Any] | None = None, schema: str = "schema-1") -> PeerIdentity:
    config_json = json.dumps(CONFIG if config is None else config, sort_keys=True, separators=(",", ":"))
    return PeerIdentity(
        node_id=node_id,
        advertise_address="127.0.0.1:1",
        schema_hash=schema,
        config_hash=str(zlib.crc32(config_json.encode())),
        config_json=config_json,
    )


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(torch.int32)


def push_expectation(element_count: int, **overrides: Any) -> ExpectedVector:
    return ExpectedVector(element_count=element_count, **overrides)


def raw_chunks(
    payload: bytes,
    *,
    element_count: int,
    dtype: int = pb.WIRE_DTYPE_FLOAT32,
    checksum: int | None = None,
    chunk_bytes: int = CHUNK,
    sender_id: str = "peer",
    iteration: int = 0,
    round: int = 0,
    epoch: int = 0,
) -> list[pb.VectorChunk]:
    """Hand-built chunk stream, for feeding the decoder things our encoder would never produce."""
    header = pb.VectorHeader(
        sender_id=sender_id,
        iteration=iteration,
        round=round,
        membership_epoch=epoch,
        dtype=dtype,
        element_count=element_count,
        checksum=zlib.crc32(payload) if checksum is None else checksum,
        chunk_bytes=chunk_bytes,
    )
    pieces = [payload[offset : offset + chunk_bytes] for offset in range(0, len(payload), chunk_bytes)]
    chunks = [pb.VectorChunk(header=header, data=pieces[0] if pieces else b"")]
    chunks.extend(pb.VectorChunk(data=piece) for piece in pieces[1:])
    return chunks


def float32_bytes(values: Iterable[float]) -> bytes:
    values = list(values)
    return struct.pack(f"<{len(values)}f", *values)


# ---------------------------------------------------------------------------------------------------
# options
# ---------------------------------------------------------------------------------------------------


def test_chunk_bytes_validation_names_the_range() -> None:
    assert validate_chunk_bytes(DEFAULT_CHUNK_BYTES) == DEFAULT_CHUNK_BYTES
    assert validate_chunk_bytes(MIN_CHUNK_BYTES) == MIN_CHUNK_BYTES
    assert validate_chunk_bytes(MAX_CHUNK_BYTES) == MAX_CHUNK_BYTES
    for bad in (MIN_CHUNK_BYTES - 1, MAX_CHUNK_BYTES + 1, 0, -5):
        with pytest.raises(ValueError, match="outside the allowed range"):
            validate_chunk_bytes(bad)
    with pytest.raises(ValueError, match="must be an int"):
        validate_chunk_bytes(1.5 * MIN_CHUNK_BYTES)  # type: ignore[arg-type]


def test_options_raise_message_limits_and_disable_reuseport() -> None:
    server = dict(server_options())
    channel = dict(channel_options())
    assert server["grpc.so_reuseport"] == 0
    for options in (server, channel):
        assert options["grpc.max_send_message_length"] > MAX_CHUNK_BYTES
        assert options["grpc.max_receive_message_length"] > MAX_CHUNK_BYTES
    # The server must tolerate the client's keepalive pings, or it would GOAWAY healthy peers.
    assert server["grpc.http2.min_recv_ping_interval_without_data_ms"] <= channel["grpc.keepalive_time_ms"]


# ---------------------------------------------------------------------------------------------------
# codec: encoding and round trips
# ---------------------------------------------------------------------------------------------------


def test_float32_round_trip_is_bit_exact() -> None:
    generator = torch.Generator().manual_seed(0)
    special = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 3.4028235e38, -3.4028235e38, 1.0, -1.5])
    vector = torch.cat([special, torch.randn(50_000, generator=generator) * 1e3])
    chunks = list(encode_vector(vector, sender_id="a", iteration=7, round=1, epoch=3, chunk_bytes=CHUNK))
    decoded = decode_vector(chunks, push_expectation(vector.numel()))
    assert decoded.vector.dtype == torch.float32
    assert torch.equal(bits(decoded.vector), bits(vector))
    assert (decoded.sender_id, decoded.position, decoded.membership_epoch) == ("a", Position(7, 1), 3)
    assert decoded.wire_dtype == "float32"


@pytest.mark.parametrize(
    ("wire_dtype", "relative_tolerance"),
    [("bfloat16", 2.0**-8), ("float16", 2.0**-10)],
)
def test_half_precision_round_trip_within_precision(wire_dtype: str, relative_tolerance: float) -> None:
    generator = torch.Generator().manual_seed(1)
    # Magnitudes kept in float16's normal range so the relative bound is the format's own epsilon.
    vector = torch.randn(40_000, generator=generator).clamp(-100, 100)
    vector[vector.abs() < 1e-3] = 1e-3
    chunks = list(
        encode_vector(
            vector, sender_id="a", iteration=0, round=0, epoch=0, wire_dtype=wire_dtype, chunk_bytes=CHUNK
        )
    )
    assert sum(len(chunk.data) for chunk in chunks) == vector.numel() * 2  # really 2 bytes per element
    decoded = decode_vector(chunks, push_expectation(vector.numel()))
    assert decoded.vector.dtype == torch.float32
    assert decoded.wire_dtype == wire_dtype
    relative_error = ((decoded.vector - vector).abs() / vector.abs()).max().item()
    assert 0 < relative_error <= relative_tolerance
    # And it is exactly what torch's own rounding gives: no extra error introduced by the transport.
    assert torch.equal(decoded.vector, vector.to(getattr(torch, wire_dtype)).to(torch.float32))


@pytest.mark.parametrize(
    ("element_count", "expected_chunk_sizes"),
    [
        (10, [40]),  # smaller than one chunk
        (3 * CHUNK // 4, [CHUNK, CHUNK, CHUNK]),  # exact multiple
        (2 * CHUNK // 4 + 3, [CHUNK, CHUNK, 12]),  # odd remainder
        (0, [0]),  # empty vector: a single header-only chunk (documented in codec)
    ],
)
def test_chunking_layout(element_count: int, expected_chunk_sizes: list[int]) -> None:
    vector = torch.arange(element_count, dtype=torch.float32)
    chunks = list(encode_vector(vector, sender_id="a", iteration=0, round=0, epoch=0, chunk_bytes=CHUNK))
    assert [len(chunk.data) for chunk in chunks] == expected_chunk_sizes
    assert [chunk.HasField("header") for chunk in chunks] == [True] + [False] * (len(chunks) - 1)
    assert chunks[0].header.element_count == element_count
    assert chunks[0].header.chunk_bytes == CHUNK
    decoded = decode_vector(chunks, push_expectation(element_count))
    assert torch.equal(decoded.vector, vector)


def test_encode_is_eager_and_refuses_bad_input() -> None:
    good = torch.ones(4)
    cases: list[tuple[Callable[[], object], str]] = [
        (lambda: encode_vector(good.double(), sender_id="a", iteration=0, round=0, epoch=0), "only float32"),
        (lambda: encode_vector(good.view(2, 2), sender_id="a", iteration=0, round=0, epoch=0), "must be 1-D"),
        (
            lambda: encode_vector(
                torch.tensor([1.0, math.nan]), sender_id="a", iteration=0, round=0, epoch=0
            ),
            "NaN or inf",
        ),
        (
            lambda: encode_vector(
                torch.tensor([1e6]), sender_id="a", iteration=0, round=0, epoch=0, wire_dtype="float16"
            ),
            "does not fit float16",
        ),
        (
            lambda: encode_vector(good, sender_id="a", iteration=0, round=0, epoch=0, wire_dtype="int8"),
            "unknown wire_dtype 'int8'",
        ),
        (
            lambda: encode_vector(good, sender_id="a", iteration=0, round=0, epoch=0, chunk_bytes=100),
            "outside the allowed range",
        ),
        (lambda: encode_vector(good, sender_id="a", iteration=-1, round=0, epoch=0), "iteration=-1"),
        (lambda: encode_vector(good, sender_id="a", iteration=0, round=1 << 32, epoch=0), "round="),
    ]
    for make, message in cases:
        with pytest.raises(ValueError, match=message):
            make()


def test_prepared_vector_is_reusable_and_aliases_float32_memory() -> None:
    vector = torch.randn(1000)
    prepared = prepare_vector(vector)
    assert prepared.payload_bytes == 4000
    assert prepared.checksum == zlib.crc32(vector.numpy().tobytes())
    # No copy for float32 on CPU: the payload is the tensor's own memory.
    vector[0] = 123.0
    assert struct.unpack_from("<f", prepared.payload, 0)[0] == 123.0


# ---------------------------------------------------------------------------------------------------
# codec: hand-written framing must be exactly protobuf's VectorChunk encoding
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("element_count", [0, 5, CHUNK // 4, CHUNK // 4 * 3 + 1])
def test_frames_are_byte_identical_to_protobuf_serialization(element_count: int) -> None:
    vector = torch.randn(element_count)
    prepared = prepare_vector(vector)
    frames = list(iter_frames(prepared, sender_id="a", iteration=3, round=1, epoch=2, chunk_bytes=CHUNK))
    header = pb.VectorHeader(
        sender_id="a",
        iteration=3,
        round=1,
        membership_epoch=2,
        dtype=pb.WIRE_DTYPE_FLOAT32,
        element_count=element_count,
        checksum=prepared.checksum,
        chunk_bytes=CHUNK,
    )
    payload = vector.numpy().tobytes()
    pieces = [payload[offset : offset + CHUNK] for offset in range(0, len(payload), CHUNK)] or [b""]
    expected = [pb.VectorChunk(header=header, data=pieces[0]).SerializeToString()]
    expected += [pb.VectorChunk(data=piece).SerializeToString() for piece in pieces[1:]]
    assert frames == expected


def test_parse_chunk_agrees_with_protobuf_and_skips_unknown_fields() -> None:
    header = pb.VectorHeader(sender_id="a", element_count=3, name="x", shape=[3])
    for message in (
        pb.VectorChunk(header=header, data=b"abc"),
        pb.VectorChunk(data=b"\x00" * 1000),
        pb.VectorChunk(header=header),
        pb.VectorChunk(),
    ):
        raw = message.SerializeToString()
        parsed = parse_chunk(raw)
        assert (parsed.header is not None) == message.HasField("header")
        if parsed.header is not None:
            assert parsed.header == message.header
        assert bytes(parsed.data) == message.data
        assert parsed.message_bytes == len(raw)
    # A newer peer's extra fields (varint 3, fixed64 4, fixed32 5, bytes 6) are skipped, not fatal.
    future = b"\x18\x96\x01" + b"\x21" + bytes(8) + b"\x2d" + bytes(4) + b"\x32\x02hi" + b"\x12\x01z"
    assert bytes(parse_chunk(future).data) == b"z"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\x12", "ends inside a varint"),
        (b"\x12\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", "longer than 10 bytes"),
        (b"\x12\x05abc", "claims 5 bytes but only 3 remain"),
        (b"\x08\x01", "field 1 has wire type 0, expected 2"),
        (b"\x12\x01a\x12\x01b", "two data fields"),
        (b"\x0a\x00\x0a\x00", "two headers"),
        (b"\x0a\x02\xff\xff", "undecodable VectorHeader"),
        (b"\x1b", "unsupported wire type 3"),
        (b"\x21\x00", "field 4 is truncated"),
    ],
)
def test_parse_chunk_rejects_malformed_messages(raw: bytes, message: str) -> None:
    with pytest.raises(WireError, match=message):
        parse_chunk(raw)


# ---------------------------------------------------------------------------------------------------
# codec: every rejection path of the decoder
# ---------------------------------------------------------------------------------------------------


def assert_rejected(
    chunks: list[pb.VectorChunk], expected: ExpectedVector, kind: WireErrorKind, message: str
) -> None:
    with pytest.raises(WireError, match=message) as caught:
        decode_vector(chunks, expected)
    assert caught.value.kind == kind
    assert isinstance(caught.value, ValueError)


def good_chunks(element_count: int = 3 * CHUNK // 4 + 5, **header: Any) -> list[pb.VectorChunk]:
    vector = torch.linspace(-1, 1, element_count)
    return list(
        encode_vector(
            vector,
            sender_id=header.get("sender_id", "peer"),
            iteration=header.get("iteration", 0),
            round=header.get("round", 0),
            epoch=header.get("epoch", 0),
            chunk_bytes=CHUNK,
        )
    )


def test_decoder_rejects_truncated_stream() -> None:
    chunks = good_chunks()
    assert_rejected(
        chunks[:-1], push_expectation(3 * CHUNK // 4 + 5), WireErrorKind.LENGTH, "stream ended after"
    )


def test_decoder_rejects_extra_bytes() -> None:
    count = 3 * CHUNK // 4 + 5
    extra_chunk = [*good_chunks(count), pb.VectorChunk(data=b"\0\0\0\0")]
    assert_rejected(extra_chunk, push_expectation(count), WireErrorKind.LENGTH, "extra data")
    longer_last = good_chunks(count)
    longer_last[-1].data += b"\0\0\0\0"
    assert_rejected(longer_last, push_expectation(count), WireErrorKind.LENGTH, "extra data")


def test_decoder_rejects_bad_checksum() -> None:
    chunks = good_chunks()
    corrupted = bytearray(chunks[1].data)
    corrupted[17] ^= 0x01
    chunks[1].data = bytes(corrupted)
    assert_rejected(chunks, push_expectation(3 * CHUNK // 4 + 5), WireErrorKind.CHECKSUM, "checksum mismatch")


@pytest.mark.parametrize("bad_value", [math.nan, math.inf, -math.inf])
def test_decoder_rejects_non_finite_values(bad_value: float) -> None:
    payload = float32_bytes([1.0, bad_value, 2.0])
    chunks = raw_chunks(payload, element_count=3)
    assert_rejected(chunks, push_expectation(3), WireErrorKind.NON_FINITE, r"1 non-finite value\(s\)")


def test_decoder_rejects_wrong_element_count() -> None:
    assert_rejected(
        good_chunks(100), push_expectation(101), WireErrorKind.ELEMENT_COUNT, "element_count 100 differs"
    )
    # A header whose count disagrees with the bytes it actually sends.
    lying = raw_chunks(float32_bytes([1.0, 2.0, 3.0]), element_count=2)
    assert_rejected(lying, push_expectation(2), WireErrorKind.LENGTH, "extra data")


@pytest.mark.parametrize("dtype_value", [pb.WIRE_DTYPE_UNSPECIFIED, 99])
def test_decoder_rejects_unknown_dtype_enum(dtype_value: int) -> None:
    chunks = raw_chunks(float32_bytes([1.0]), element_count=1, dtype=dtype_value)
    assert_rejected(chunks, push_expectation(1), WireErrorKind.BAD_DTYPE, f"enum value {dtype_value}")


def test_decoder_rejects_missing_and_duplicate_header() -> None:
    chunks = good_chunks()
    headless = [pb.VectorChunk(data=chunk.data) for chunk in chunks]
    assert_rejected(
        headless, push_expectation(3 * CHUNK // 4 + 5), WireErrorKind.MISSING_HEADER, "no VectorHeader"
    )
    assert_rejected([], push_expectation(1), WireErrorKind.MISSING_HEADER, "before any VectorHeader")
    chunks[1].header.CopyFrom(chunks[0].header)
    assert_rejected(
        chunks, push_expectation(3 * CHUNK // 4 + 5), WireErrorKind.DUPLICATE_HEADER, "second VectorHeader"
    )


def test_decoder_rejects_positions_outside_the_window() -> None:
    window = {"earliest": Position(5, 1), "latest": Position(6, 1), "rounds_per_iteration": 2}
    assert_rejected(
        good_chunks(10, iteration=5, round=0), push_expectation(10, **window), WireErrorKind.STALE, "stale"
    )
    assert_rejected(
        good_chunks(10, iteration=7, round=0),
        push_expectation(10, **window),
        WireErrorKind.TOO_FAR_AHEAD,
        "too far ahead",
    )
    assert_rejected(
        good_chunks(10, iteration=6, round=2),
        push_expectation(10, **window),
        WireErrorKind.BAD_ROUND,
        "round 2",
    )
    # Both ends of the window are inclusive.
    for iteration, round in ((5, 1), (6, 0), (6, 1)):
        decode_vector(good_chunks(10, iteration=iteration, round=round), push_expectation(10, **window))


def test_decoder_rejects_epoch_and_sender_mismatch() -> None:
    assert_rejected(
        good_chunks(10, epoch=4),
        push_expectation(10, membership_epoch=3),
        WireErrorKind.EPOCH_MISMATCH,
        "membership_epoch 4",
    )
    assert_rejected(
        good_chunks(10, sender_id="mallory"),
        push_expectation(10, sender_id="alice"),
        WireErrorKind.SENDER_MISMATCH,
        "'mallory'",
    )


def test_decoder_rejects_bad_chunk_sizes() -> None:
    payload = float32_bytes(range(CHUNK // 2))  # two chunks' worth
    assert_rejected(
        raw_chunks(payload, element_count=CHUNK // 2, chunk_bytes=1000),
        push_expectation(CHUNK // 2),
        WireErrorKind.BAD_CHUNK_SIZE,
        "chunk_bytes=1000",
    )
    # Announced chunk size honoured by nobody: tiny messages instead of full chunks.
    tiny = raw_chunks(payload, element_count=CHUNK // 2, chunk_bytes=CHUNK)
    header = tiny[0].header
    split = [pb.VectorChunk(header=header, data=payload[:1024])]
    split.extend(
        pb.VectorChunk(data=payload[offset : offset + 1024]) for offset in range(1024, len(payload), 1024)
    )
    assert_rejected(split, push_expectation(CHUNK // 2), WireErrorKind.BAD_CHUNK_SIZE, "carries 1024 bytes")


def test_decoder_rejects_named_or_shaped_push() -> None:
    chunks = good_chunks(10)
    chunks[0].header.name = "params"
    assert_rejected(chunks, push_expectation(10), WireErrorKind.BAD_SHAPE, "flat and unnamed")


def test_payload_crc32_is_zlibs_crc32_and_incremental() -> None:
    # The wire checksum is zlib's CRC-32 whatever library computes it, so older peers interoperate.
    payload = torch.randn(300_001, generator=torch.Generator().manual_seed(5)).numpy().tobytes()
    assert payload_crc32(payload) == zlib.crc32(payload)
    view = memoryview(payload)
    running = 0
    for offset in range(0, len(payload), 65_537):  # odd chunk size: boundaries split elements
        running = payload_crc32(view[offset : offset + 65_537], running)
    assert running == zlib.crc32(payload)
    assert payload_crc32(b"") == 0 and payload_crc32(b"", 7) == 7
    assert prepare_vector(torch.ones(10)).checksum == zlib.crc32(torch.ones(10).numpy().tobytes())


def test_all_finite_handles_sum_overflow_and_every_dtype() -> None:
    huge = torch.full((1000,), 3e38)  # finite values whose sum overflows: decided by the exact check
    assert all_finite(huge) and all_finite(-huge) and all_finite(torch.empty(0))
    for bad in (math.nan, math.inf, -math.inf):
        with_bad = huge.clone()
        with_bad[517] = bad
        assert not all_finite(with_bad)
        assert not all_finite(torch.tensor([1.0, bad, 2.0]).to(torch.bfloat16))
        assert not all_finite(torch.tensor([1.0, bad, 2.0]).to(torch.float16))
    assert all_finite(torch.full((10,), 65504.0).to(torch.float16))
    # A pushed vector of such values arrives intact; one NaN among them is still refused.
    decoded = decode_vector(
        encode_vector(huge, sender_id="p", iteration=0, round=0, epoch=0), push_expectation(1000)
    )
    assert torch.equal(bits(decoded.vector), bits(huge))
    payload = float32_bytes([3e38, 3e38, math.nan])
    assert_rejected(
        raw_chunks(payload, element_count=3), push_expectation(3), WireErrorKind.NON_FINITE, "1 non"
    )


@pytest.mark.parametrize("wire_dtype", ["float32", "bfloat16", "float16"])
def test_non_finite_value_split_across_chunks_is_found(wire_dtype: str) -> None:
    # The finite check runs per chunk on whole elements; with an odd chunk size one element's bytes
    # straddle two chunks and must still be checked exactly once.
    element_bytes = 4 if wire_dtype == "float32" else 2
    chunk_bytes = CHUNK + 1
    straddling = chunk_bytes // element_bytes  # the element split by the first chunk boundary
    count = 3 * chunk_bytes // element_bytes
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[wire_dtype]
    for bad in (math.nan, math.inf):
        values = torch.ones(count, dtype=torch_dtype)
        values[straddling] = bad
        payload = values.view(torch.uint8).numpy().tobytes()
        chunks = raw_chunks(
            payload, element_count=count, dtype=_PROTO_DTYPES[wire_dtype], chunk_bytes=chunk_bytes
        )
        assert_rejected(chunks, push_expectation(count), WireErrorKind.NON_FINITE, r"1 non-finite")
    huge = torch.full((count,), 3e38 if wire_dtype != "float16" else 65504.0).to(torch_dtype)
    chunks = raw_chunks(
        huge.view(torch.uint8).numpy().tobytes(),
        element_count=count,
        dtype=_PROTO_DTYPES[wire_dtype],
        chunk_bytes=chunk_bytes,
    )
    assert torch.equal(decode_vector(chunks, push_expectation(count)).vector, huge.to(torch.float32))


_PROTO_DTYPES = {
    "float32": pb.WIRE_DTYPE_FLOAT32,
    "bfloat16": pb.WIRE_DTYPE_BFLOAT16,
    "float16": pb.WIRE_DTYPE_FLOAT16,
}


def test_receive_buffer_pool_recycles_only_memory_nobody_references() -> None:
    pool = ReceiveBufferPool(min_bytes=1024, max_idle_bytes=3 * 4096)
    small = pool.take(100)  # below min_bytes: plain allocation, never pooled
    del small
    assert pool.idle_bytes == 0
    buffer = pool.take(4096)
    address = buffer.data_ptr()
    view = buffer.view(torch.float32)[10:20]  # a view shares the memory and must keep it out of the pool
    del buffer
    assert pool.idle_bytes == 0
    storage = view.untyped_storage()
    del view
    assert pool.idle_bytes == 0
    del storage
    assert pool.idle_bytes == 4096
    again = pool.take(4096)
    assert again.data_ptr() == address and pool.idle_bytes == 0
    held = [pool.take(4096) for _ in range(4)]
    del again, held
    assert pool.idle_bytes == 3 * 4096  # the cap: the fourth block went back to the allocator
    other = pool.take(8192)
    del other  # another size: older idle sizes are dropped to make room rather than exceeding the cap
    assert pool.idle_bytes <= 3 * 4096


def test_decoded_vectors_never_share_pooled_memory() -> None:
    count = (4 << 20) // 4  # 4 MiB: above the shared pool's threshold
    first_source = torch.randn(count, generator=torch.Generator().manual_seed(6))
    second_source = torch.randn(count, generator=torch.Generator().manual_seed(7))

    def receive(vector: torch.Tensor) -> torch.Tensor:
        chunks = iter_frames(prepare_vector(vector), sender_id="p", chunk_bytes=1 << 20)
        return decode_vector(map(parse_chunk, chunks), push_expectation(count)).vector

    first = receive(first_source)
    second = receive(second_source)
    assert first.data_ptr() != second.data_ptr()
    assert torch.equal(bits(first), bits(first_source)) and torch.equal(bits(second), bits(second_source))
    first_address = first.data_ptr()
    del first
    third = receive(first_source)  # may reuse the first vector's memory now that nobody holds it
    assert third.data_ptr() == first_address  # the most recently released block is reused first
    assert torch.equal(bits(second), bits(second_source)) and torch.equal(bits(third), bits(first_source))
    # A stream that fails validation releases its buffer without delivering anything.
    corrupt = list(iter_chunks(prepare_vector(second_source), sender_id="p", chunk_bytes=1 << 20))
    corrupt[2].data = corrupt[2].data[:-1] + bytes([corrupt[2].data[-1] ^ 0x40])
    assert_rejected(corrupt, push_expectation(count), WireErrorKind.CHECKSUM, "checksum mismatch")
    assert torch.equal(bits(second), bits(second_source))


def test_assembler_refuses_oversized_header_before_allocating() -> None:
    chunks = raw_chunks(b"", element_count=1 << 60)
    chunks[0].header.name = "huge"
    chunks[0].header.shape.append(1 << 60)
    assembler = VectorAssembler(ExpectedVector(element_count=None, max_payload_bytes=1 << 20, named=True))
    with pytest.raises(WireError, match="exceeds the 1048576-byte limit") as caught:
        assembler.add(chunks[0])
    assert caught.value.kind == WireErrorKind.TOO_LARGE


# ---------------------------------------------------------------------------------------------------
# codec: state streams and handshake identity
# ---------------------------------------------------------------------------------------------------


def state_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    return {
        "params": torch.randn(CHUNK // 4 * 2 + 7, generator=generator),
        "optimizer.exp_avg": torch.randn(3, 5, generator=generator),
        "optimizer.step": torch.tensor(42.0),  # 0-d tensor
        "optimizer.empty": torch.empty(0, 4),
    }


def test_state_stream_round_trip_keeps_names_shapes_and_bits() -> None:
    tensors = state_tensors()
    frames = encode_state(tensors, sender_id="b", iteration=9, round=1, epoch=0, chunk_bytes=CHUNK)
    decoder = StateStreamDecoder(requested=(), max_total_bytes=1 << 30, expected_sender="b")
    for frame in frames:
        decoder.add(parse_chunk(frame))
    snapshot = decoder.finish()
    assert snapshot.position == Position(9, 1)
    assert list(snapshot.tensors) == list(tensors)
    for name, tensor in tensors.items():
        assert snapshot.tensors[name].shape == tensor.shape, name
        assert torch.equal(bits(snapshot.tensors[name]), bits(tensor)), name


def test_state_stream_rejects_wrong_names_and_limits() -> None:
    tensors = state_tensors()

    def decode(requested: tuple[str, ...], source: dict[str, torch.Tensor], limit: int = 1 << 30) -> None:
        decoder = StateStreamDecoder(requested=requested, max_total_bytes=limit)
        for frame in encode_state(source, sender_id="b", iteration=0, round=0, epoch=0, chunk_bytes=CHUNK):
            decoder.add(parse_chunk(frame))
        decoder.finish()

    with pytest.raises(WireError, match="lacks requested tensor"):
        decode(("params", "missing"), {"params": tensors["params"]})
    with pytest.raises(WireError, match=r"unrequested tensor 'optimizer\.exp_avg'"):
        decode(("params",), tensors)
    with pytest.raises(WireError, match="exceeds the"):
        decode((), tensors, limit=1000)
    with pytest.raises(WireError, match="carried no tensors"):
        decode((), {})
    with pytest.raises(ValueError, match="only float32 tensors are transferable"):
        encode_state({"step": torch.tensor(3)}, sender_id="b", iteration=0, round=0, epoch=0)


def test_identity_mismatch_names_the_difference() -> None:
    local = identity("a")
    assert identity_mismatch(local, identity("b").handshake_request()) is None
    other_config = identity("b", config={**CONFIG, "lr": 0.001, "model": {"width": 32, "latent_dim": 16}})
    reason = identity_mismatch(local, other_config.handshake_request())
    assert reason is not None
    assert "lr (this node: 0.0002, peer: 0.001)" in reason
    assert "model.width (this node: 64, peer: 32)" in reason
    assert "latent_dim" not in reason
    assert "schema_hash differs" in str(
        identity_mismatch(local, identity("b", schema="x").handshake_request())
    )
    assert "same node_id" in str(identity_mismatch(local, identity("a").handshake_request()))
    old_protocol = identity("b").handshake_request()
    old_protocol.protocol_version = PROTOCOL_VERSION + 1
    assert "protocol_version differs" in str(identity_mismatch(local, old_protocol))
    assert "b (this node: 2, peer: missing)" in describe_config_difference('{"a": 1, "b": 2}', '{"a": 1}')
    assert "b (this node: missing, peer: 2)" in describe_config_difference('{"a": 1}', '{"a": 1, "b": 2}')
    assert "not valid JSON" in describe_config_difference("{}", "{")


# ---------------------------------------------------------------------------------------------------
# inbox
# ---------------------------------------------------------------------------------------------------


def message(sender: str, iteration: int, round: int, value: float = 1.0) -> InboxMessage:
    return InboxMessage(sender_id=sender, iteration=iteration, round=round, vector=torch.full((4,), value))


def test_inbox_classifies_current_ahead_stale_duplicate_and_too_far() -> None:
    inbox = Inbox(rounds_per_iteration=2, ahead_window=2, start=(3, 1))
    assert inbox.latest_accepted == Position(4, 1)  # (3,1) + 2 rounds wraps into iteration 4
    assert inbox.put(message("a", 3, 1)) is PutOutcome.ACCEPTED
    assert inbox.put(message("a", 4, 0)) is PutOutcome.BUFFERED_AHEAD
    assert inbox.put(message("a", 4, 1)) is PutOutcome.BUFFERED_AHEAD
    assert inbox.put(message("a", 5, 0)) is PutOutcome.TOO_FAR_AHEAD
    assert inbox.put(message("a", 3, 0)) is PutOutcome.STALE
    assert inbox.put(message("a", 3, 1, value=9.0)) is PutOutcome.DUPLICATE
    assert inbox.buffered_count == 3
    assert inbox.outcome_counts[PutOutcome.BUFFERED_AHEAD] == 2
    with pytest.raises(ValueError, match="round 2 is out of range"):
        inbox.put(message("a", 3, 2))


def test_inbox_expect_discards_older_and_keeps_buffered_ahead() -> None:
    async def scenario() -> None:
        inbox = Inbox(rounds_per_iteration=3, ahead_window=2)
        inbox.put(message("a", 0, 0))
        inbox.put(message("b", 0, 1, value=2.0))
        inbox.expect(0, 1)
        assert inbox.buffered_count == 1  # (0,0) from "a" was discarded
        assert inbox.put(message("c", 0, 0)) is PutOutcome.STALE
        received = await inbox.wait_for(0, 1, {"b"}, timeout=0.0)
        assert torch.equal(received["b"], torch.full((4,), 2.0))
        assert inbox.buffered_count == 0  # taken, so memory is released
        # A re-send after it was taken is still a duplicate, not a new delivery.
        assert inbox.put(message("b", 0, 1)) is PutOutcome.DUPLICATE
        with pytest.raises(ValueError, match="cannot move backwards"):
            inbox.expect(0, 0)

    run(scenario)


def test_inbox_enter_moves_back_for_a_node_resynchronising_to_a_majority_behind_it() -> None:
    """A node left out by its members trains on alone (inbox at 59) and resynchronises to the majority's
    boundary 40: entering there drops the abandoned positions (it once crashed: "cannot move backwards")."""
    inbox = Inbox(rounds_per_iteration=1, ahead_window=2, start=(59, 0))
    inbox.put(message("a", 59, 0))
    inbox.put(message("b", 60, 0))
    inbox.enter(40, 0)
    assert inbox.position == Position(40, 0) and inbox.buffered_count == 0
    assert inbox.put(message("a", 40, 0)) is PutOutcome.ACCEPTED
    assert inbox.put(message("a", 59, 0)) is PutOutcome.TOO_FAR_AHEAD
    inbox.enter(41, 0)  # forward, like expect
    assert inbox.position == Position(41, 0) and inbox.put(message("a", 40, 0)) is PutOutcome.STALE


def test_inbox_wait_for_returns_early_when_all_arrived() -> None:
    async def scenario() -> None:
        inbox = Inbox(rounds_per_iteration=1)

        async def deliver_later() -> None:
            await asyncio.sleep(0.05)
            inbox.put(message("a", 0, 0))
            await asyncio.sleep(0.05)
            inbox.put(message("b", 0, 0))

        delivery = asyncio.create_task(deliver_later())
        started = time.monotonic()
        received = await inbox.wait_for(0, 0, {"a", "b"}, timeout=10.0)
        elapsed = time.monotonic() - started
        await delivery
        assert set(received) == {"a", "b"}
        assert elapsed < 2.0

    run(scenario)


def test_inbox_wait_for_times_out_with_partial_results() -> None:
    async def scenario() -> None:
        inbox = Inbox(rounds_per_iteration=1)
        inbox.put(message("a", 0, 0))
        inbox.put(message("z", 0, 0))  # not asked for: stays until the inbox moves on
        started = time.monotonic()
        received = await inbox.wait_for(0, 0, {"a", "b"}, timeout=0.2)
        elapsed = time.monotonic() - started
        assert set(received) == {"a"}
        assert 0.19 <= elapsed < 2.0
        assert inbox.buffered_count == 1
        inbox.expect(1, 0)
        assert inbox.buffered_count == 0

    run(scenario)


def test_inbox_wait_for_requires_current_position() -> None:
    async def scenario() -> None:
        inbox = Inbox(rounds_per_iteration=1)
        with pytest.raises(RuntimeError, match="call expect\\(\\) first"):
            await inbox.wait_for(1, 0, {"a"}, timeout=0.1)

        async def move_on() -> None:
            await asyncio.sleep(0.05)
            inbox.expect(1, 0)

        mover = asyncio.create_task(move_on())
        with pytest.raises(RuntimeError, match="do not move it while waiting"):
            await inbox.wait_for(0, 0, {"a"}, timeout=5.0)
        await mover

    run(scenario)


def test_inbox_rejects_bad_configuration() -> None:
    with pytest.raises(ValueError, match="rounds_per_iteration must be >= 1"):
        Inbox(rounds_per_iteration=0)
    with pytest.raises(ValueError, match="ahead_window"):
        Inbox(rounds_per_iteration=1, ahead_window=-1)


# ---------------------------------------------------------------------------------------------------
# real server and client on 127.0.0.1
# ---------------------------------------------------------------------------------------------------


@dataclass
class Node:
    server: GossipServer
    inbox: Inbox
    identity: PeerIdentity


@contextlib.asynccontextmanager
async def gossip_node(
    node_id: str,
    *,
    vector_length: int,
    rounds_per_iteration: int = 2,
    node_identity: PeerIdentity | None = None,
    state: StateSnapshot | None = None,
    **server_kwargs: Any,
) -> AsyncIterator[Node]:
    own_identity = node_identity or identity(node_id)
    inbox = Inbox(rounds_per_iteration=rounds_per_iteration)
    server = GossipServer(
        identity=own_identity,
        inbox=inbox,
        vector_length=vector_length,
        state_provider=(lambda: state) if state is not None else None,
        **server_kwargs,
    )
    await server.start()
    try:
        yield Node(server, inbox, own_identity)
    finally:
        await server.stop(0)


def test_handshake_accepted_and_refused_with_reason() -> None:
    async def scenario() -> None:
        async with gossip_node("b", vector_length=4) as node:
            async with PeerClient(node.server.address) as client:
                response = await client.handshake(identity("a"))
                assert response.accepted and response.node_id == "b"
                assert response.protocol_version == PROTOCOL_VERSION
                assert "a" in node.server.handshaken_peers

            mismatched = identity("c", config={**CONFIG, "lr": 0.5})
            async with PeerClient(node.server.address) as client:
                with pytest.raises(HandshakeRefused, match=r"lr \(this node: 0.0002, peer: 0.5\)"):
                    await client.handshake(mismatched)
                with pytest.raises(RuntimeError, match="before a successful handshake"):
                    await client.push_vector(torch.zeros(4), iteration=0, round=0)
            assert "c" not in node.server.handshaken_peers

    run(scenario)


def test_server_refuses_wrong_protocol_and_survives_a_crashing_policy() -> None:
    def crashing_policy(request: pb.HandshakeRequest) -> tuple[bool, str]:
        raise KeyError("boom")

    async def scenario() -> None:
        async with (
            gossip_node("b", vector_length=4, handshake_policy=crashing_policy) as node,
            grpc.aio.insecure_channel(node.server.address) as channel,
        ):
            stub = pb_grpc.GossipStub(channel)
            request = identity("a").handshake_request()
            request.protocol_version = PROTOCOL_VERSION + 1
            response = await stub.Handshake(request, timeout=5)
            assert not response.accepted
            assert f"this node speaks {PROTOCOL_VERSION}, peer sent {PROTOCOL_VERSION + 1}" in response.reason
            with structlog.testing.capture_logs():  # the policy's traceback is expected here
                response = await stub.Handshake(identity("a").handshake_request(), timeout=5)
            assert (
                not response.accepted and "handshake policy failed on this node: KeyError" in response.reason
            )
            assert node.server.handshaken_peers == {}

    run(scenario)


def test_client_refuses_incompatible_responder_even_if_it_accepts() -> None:
    async def scenario() -> None:
        async with (
            gossip_node(
                "b",
                vector_length=4,
                node_identity=identity("b", schema="other-schema"),
                handshake_policy=lambda request: (True, ""),
            ) as node,
            PeerClient(node.server.address) as client,
        ):
            with pytest.raises(HandshakeRefused, match="this node refuses it: schema_hash differs"):
                await client.handshake(identity("a"))
            assert client.remote is None

    run(scenario)


def test_push_16_mb_vector_arrives_bit_exact_in_inbox() -> None:
    length = 4 * 1024 * 1024  # 16 MiB of float32
    vector = torch.randn(length, generator=torch.Generator().manual_seed(3))

    async def scenario() -> None:
        async with gossip_node("b", vector_length=length) as node, PeerClient(node.server.address) as client:
            await client.handshake(identity("a"))
            ack = await client.push_vector(vector, iteration=0, round=0, timeout=20.0)
            assert ack.accepted and ack.status == pb.PUSH_STATUS_ACCEPTED, ack.reason
            received = await node.inbox.wait_for(0, 0, {"a"}, timeout=1.0)
            assert torch.equal(bits(received["a"]), bits(vector))
            # Counted as serialized chunk bytes: the payload plus a few bytes of framing per chunk.
            assert client.bytes_sent == node.server.bytes_received
            assert length * 4 < client.bytes_sent < length * 4 + 1024
            assert node.server.bytes_received_by_peer == {"a": client.bytes_sent}

    run(scenario)


def test_corrupted_or_truncated_multi_mib_push_is_never_delivered() -> None:
    length = (3 << 20) // 4 + 3  # 3 MiB + 12 bytes: pooled receive buffer, last chunk partial
    vector = torch.randn(length, generator=torch.Generator().manual_seed(8))

    async def scenario() -> None:
        async with (
            gossip_node("b", vector_length=length) as node,
            grpc.aio.insecure_channel(node.server.address, options=channel_options()) as channel,
        ):
            stub = pb_grpc.GossipStub(channel)
            await stub.Handshake(identity("a").handshake_request(), timeout=5)
            chunks = list(iter_chunks(prepare_vector(vector), sender_id="a", chunk_bytes=1 << 20))
            flipped = bytearray(chunks[1].data)
            flipped[123_456] ^= 0x01
            corrupt = [chunks[0], pb.VectorChunk(data=bytes(flipped)), *chunks[2:]]
            ack = await stub.PushVector(iter(corrupt), timeout=10)
            assert ack.status == pb.PUSH_STATUS_MALFORMED and "checksum mismatch" in ack.reason
            ack = await stub.PushVector(iter(chunks[:-1]), timeout=10)
            assert ack.status == pb.PUSH_STATUS_MALFORMED and "stream ended after" in ack.reason
            assert node.inbox.buffered_count == 0
            ack = await stub.PushVector(iter(chunks), timeout=10)
            assert ack.accepted, ack.reason
            received = await node.inbox.wait_for(0, 0, {"a"}, timeout=1.0)
            assert torch.equal(bits(received["a"]), bits(vector))

    run(scenario)


def test_push_half_precision_and_prepared_vector_to_two_peers() -> None:
    vector = torch.randn(100_000, generator=torch.Generator().manual_seed(4))

    async def scenario() -> None:
        async with (
            gossip_node("b", vector_length=vector.numel()) as node_b,
            gossip_node("c", vector_length=vector.numel()) as node_c,
            PeerClient(node_b.server.address) as to_b,
            PeerClient(node_c.server.address) as to_c,
        ):
            await to_b.handshake(identity("a"))
            await to_c.handshake(identity("a"))
            prepared = prepare_vector(vector, "bfloat16")
            acks = await asyncio.gather(
                to_b.push_vector(prepared, iteration=0, round=1, chunk_bytes=CHUNK),
                to_c.push_vector(prepared, iteration=0, round=1, chunk_bytes=CHUNK),
            )
            assert [ack.status for ack in acks] == [pb.PUSH_STATUS_BUFFERED_AHEAD] * 2
            expected = vector.to(torch.bfloat16).to(torch.float32)
            for node in (node_b, node_c):
                node.inbox.expect(0, 1)
                received = await node.inbox.wait_for(0, 1, {"a"}, timeout=1.0)
                assert torch.equal(received["a"], expected)

    run(scenario)


def test_float32_huffman_push_arrives_bit_exact_and_is_decoded_off_the_event_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    vector = torch.randn(1 << 20, generator=torch.Generator().manual_seed(5)) * 0.02
    decoding_threads: list[int] = []
    decode = exponent_coding.decode

    def recording_decode(*args: Any, **kwargs: Any) -> torch.Tensor:
        decoding_threads.append(threading.get_ident())
        return decode(*args, **kwargs)

    monkeypatch.setattr(exponent_coding, "decode", recording_decode)

    async def scenario() -> None:
        async with (
            gossip_node("b", vector_length=vector.numel()) as node,
            PeerClient(node.server.address) as client,
        ):
            await client.handshake(identity("a"))
            ack = await client.push_vector(vector, iteration=0, round=0, wire_dtype="float32-huffman")
            assert ack.accepted, ack.reason
            received = await node.inbox.wait_for(0, 0, {"a"}, timeout=1.0)
            assert torch.equal(bits(received["a"]), bits(vector))
            assert 3 * vector.numel() < client.bytes_sent < 0.9 * 4 * vector.numel()
            # The decode (milliseconds per MB) ran, and not on the loop serving the node's RPCs.
            assert decoding_threads and threading.get_ident() not in decoding_threads

    run(scenario)


def test_a_cancelled_float32_huffman_push_counts_against_the_caps_until_its_decode_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    vector = torch.randn(1 << 18, generator=torch.Generator().manual_seed(6)) * 0.02
    started, ended = threading.Event(), threading.Event()
    decode = exponent_coding.decode

    def slow_decode(*args: Any, **kwargs: Any) -> torch.Tensor:
        started.set()
        time.sleep(3.0)
        try:
            return decode(*args, **kwargs)
        finally:
            ended.set()

    monkeypatch.setattr(exponent_coding, "decode", slow_decode)

    async def scenario() -> None:
        async with (
            gossip_node("b", vector_length=vector.numel()) as node,
            PeerClient(node.server.address) as client,
        ):
            await client.handshake(identity("a"))
            with pytest.raises(PeerUnavailable):  # the sender gives up while the receiver decodes
                await client.push_vector(
                    vector, iteration=0, round=0, wire_dtype="float32-huffman", timeout=1.0
                )
            assert started.is_set() and not ended.is_set()
            await asyncio.sleep(0.2)
            assert node.server.push_streams_in_flight == 1  # still decoding: still under the caps
            assert await asyncio.to_thread(ended.wait, 10.0)
            for _ in range(50):
                if node.server.push_streams_in_flight == 0:
                    break
                await asyncio.sleep(0.05)
            assert node.server.push_streams_in_flight == 0
            # The abandoned push delivered nothing: a vector for (0, 0) from "a" would be a duplicate now.
            assert node.inbox.classify("a", 0, 0) is not PutOutcome.DUPLICATE

    run(scenario)


def test_push_rejections_are_acks_with_reasons() -> None:
    vector = torch.ones(1000)

    async def scenario() -> None:
        async with (
            gossip_node("b", vector_length=vector.numel()) as node,
            PeerClient(node.server.address) as client,
        ):
            await client.handshake(identity("a"))
            node.inbox.expect(3, 0)
            stale = await client.push_vector(vector, iteration=2, round=1)
            assert not stale.accepted and stale.status == pb.PUSH_STATUS_STALE
            assert "stale" in stale.reason
            far = await client.push_vector(vector, iteration=9, round=0)
            assert far.status == pb.PUSH_STATUS_TOO_FAR_AHEAD and "too far ahead" in far.reason
            wrong_length = await client.push_vector(torch.ones(999), iteration=3, round=0)
            assert (
                wrong_length.status == pb.PUSH_STATUS_MALFORMED and "element_count 999" in wrong_length.reason
            )
            first = await client.push_vector(vector, iteration=3, round=0)
            assert first.accepted
            again = await client.push_vector(vector, iteration=3, round=0)
            assert again.status == pb.PUSH_STATUS_DUPLICATE and "already received" in again.reason
            assert node.inbox.buffered_count == 1
            # The epoch travels to the inbox; the agent compares it with its own view when it mixes.
            other_view = await client.push_vector(vector, iteration=3, round=1, epoch=5)
            assert other_view.accepted
            node.inbox.expect(3, 1)
            messages = await node.inbox.wait_for_messages(3, 1, {"a"}, timeout=1.0)
            assert messages["a"].epoch == 5

    run(scenario)


def test_push_before_handshake_and_malformed_stream_are_rejected_and_logged_once() -> None:
    async def scenario() -> None:
        async with (
            gossip_node("b", vector_length=3) as node,
            grpc.aio.insecure_channel(node.server.address, options=channel_options()) as channel,
        ):
            stub = pb_grpc.GossipStub(channel)
            chunks = list(encode_vector(torch.ones(3), sender_id="stranger", iteration=0, round=0, epoch=0))
            with structlog.testing.capture_logs() as logs:
                for _ in range(3):
                    ack = await stub.PushVector(iter(chunks), timeout=5)
                    assert ack.status == pb.PUSH_STATUS_NOT_HANDSHAKEN
                    assert "'stranger' has not completed a handshake" in ack.reason

                await stub.Handshake(identity("a").handshake_request(), timeout=5)
                corrupt = raw_chunks(
                    float32_bytes([1.0, 2.0, 3.0]), element_count=3, checksum=1, sender_id="a"
                )
                for _ in range(3):
                    ack = await stub.PushVector(iter(corrupt), timeout=5)
                    assert ack.status == pb.PUSH_STATUS_MALFORMED and "checksum mismatch" in ack.reason
            assert node.inbox.buffered_count == 0
            rejections = [
                (entry["peer"], entry["kind"]) for entry in logs if entry["event"] == "gossip_rejected"
            ]
            assert rejections == [("stranger", "PUSH_STATUS_NOT_HANDSHAKEN"), ("a", "checksum")]
            assert node.server.rejection_counts == {
                ("stranger", "PUSH_STATUS_NOT_HANDSHAKEN"): 3,
                ("a", "checksum"): 3,
            }

    run(scenario)


def test_server_registers_exactly_the_proto_methods() -> None:
    server = GossipServer(identity=identity("b"), inbox=Inbox(rounds_per_iteration=1), vector_length=1)
    declared = set(pb.DESCRIPTOR.services_by_name["Gossip"].methods_by_name)
    assert set(server._method_handlers()) == declared


def test_port_clash_fails_loudly() -> None:
    async def scenario() -> None:
        async with gossip_node("b", vector_length=1) as node:
            clash = GossipServer(
                identity=identity("c"),
                inbox=Inbox(rounds_per_iteration=1),
                vector_length=1,
                port=node.server.bound_port,
            )
            with pytest.raises(BindError, match=f"127.0.0.1:{node.server.bound_port}"):
                await clash.start()
            await clash.stop(0)  # never started: a no-op, and must not raise

    run(scenario)


def test_health_reports_not_serving_then_serving() -> None:
    async def scenario() -> None:
        async with (
            gossip_node("b", vector_length=1) as node,
            grpc.aio.insecure_channel(node.server.address) as channel,
        ):
            health = health_pb2_grpc.HealthStub(channel)

            async def status(service: str) -> int:
                response = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                return response.status

            for service in ("", GOSSIP_SERVICE_NAME):
                assert await status(service) == health_pb2.HealthCheckResponse.NOT_SERVING
            await node.server.set_serving(True)
            for service in ("", GOSSIP_SERVICE_NAME):
                assert await status(service) == health_pb2.HealthCheckResponse.SERVING
            await node.server.set_serving(False)
            assert await status("") == health_pb2.HealthCheckResponse.NOT_SERVING

    run(scenario)


def test_fetch_state_round_trip_and_errors() -> None:
    tensors = state_tensors()

    async def scenario() -> None:
        snapshot = StateSnapshot(iteration=12, round=1, tensors=tensors)
        async with gossip_node("b", vector_length=1, state=snapshot) as node:
            async with PeerClient(node.server.address) as client:
                with pytest.raises(RuntimeError, match="before a successful handshake"):
                    await client.fetch_state()
                await client.handshake(identity("a"))
                fetched = await client.fetch_state(chunk_bytes=CHUNK)
                assert fetched.position == Position(12, 1)
                assert list(fetched.tensors) == list(tensors)
                for name, tensor in tensors.items():
                    assert torch.equal(bits(fetched.tensors[name]), bits(tensor)), name
                partial = await client.fetch_state(["optimizer.step"])
                assert list(partial.tensors) == ["optimizer.step"]
                assert partial.tensors["optimizer.step"].item() == 42.0
                with pytest.raises(PeerRpcError, match="unknown state tensor\\(s\\): nope") as caught:
                    await client.fetch_state(["nope"])
                assert caught.value.code == grpc.StatusCode.NOT_FOUND

            # Without a handshake the server refuses, even if the client skips its own check.
            async with grpc.aio.insecure_channel(node.server.address) as channel:
                stream = pb_grpc.GossipStub(channel).FetchState(pb.StateRequest(requester_id="x"), timeout=5)
                with pytest.raises(grpc.aio.AioRpcError) as rpc_error:
                    async for _ in stream:
                        pass
                assert rpc_error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert "'x' has not completed a handshake" in str(rpc_error.value.details())

    run(scenario)


def test_unreachable_peer_raises_peer_unavailable_quickly() -> None:
    async def scenario() -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            free_port = probe.getsockname()[1]
        async with PeerClient(f"127.0.0.1:{free_port}") as client:
            started = time.monotonic()
            with pytest.raises(PeerUnavailable, match=r"Handshake to 127\.0\.0\.1"):
                await client.handshake(identity("a"), timeout=3.0)
            assert time.monotonic() - started < 3.5

    run(scenario)


def test_silent_peer_does_not_hang_past_the_timeout() -> None:
    async def scenario() -> None:
        # Accepts TCP connections but never speaks HTTP/2: only the deadline can end the call.
        connections: list[asyncio.StreamWriter] = []
        silent = await asyncio.start_server(lambda reader, writer: connections.append(writer), "127.0.0.1", 0)
        port = silent.sockets[0].getsockname()[1]
        try:
            async with PeerClient(f"127.0.0.1:{port}") as client:
                started = time.monotonic()
                with pytest.raises(PeerUnavailable):
                    await client.handshake(identity("a"), timeout=0.5)
                assert time.monotonic() - started < 2.5
        finally:
            for writer in connections:
                writer.close()
            silent.close()
            await silent.wait_closed()

    run(scenario)
