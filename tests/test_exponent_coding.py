"""float32-huffman on the wire: bit-exact float32 with the exponent bytes Huffman-coded
(agent.transport.exponent_coding), through the real framing and reassembly, and the malformed payloads a
peer could send."""

from __future__ import annotations

import zlib

import pytest
import torch

from agent.transport import exponent_coding
from agent.transport.codecs import CodecError, GossipKind
from agent.transport.frames import (
    ExpectedVector,
    WireError,
    WireErrorKind,
    WireVector,
    decode_vector,
    iter_chunks,
    payload_crc32,
    prepare_vector,
)

pytestmark = pytest.mark.timeout(60)


def _bits(vector: torch.Tensor) -> torch.Tensor:
    return vector.contiguous().view(torch.int32)


def _received(wire: WireVector, count: int, chunk_bytes: int = 65536) -> torch.Tensor:
    chunks = iter_chunks(wire, sender_id="a", chunk_bytes=chunk_bytes)
    return decode_vector(chunks, ExpectedVector(element_count=count)).vector


def _weights(count: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, generator=generator) * 0.02


@pytest.mark.parametrize("chunk_bytes", [65536, 65537, 1 << 20])
def test_a_vector_arrives_bit_for_bit_and_smaller(chunk_bytes: int) -> None:
    vector = _weights(191_010)
    wire = prepare_vector(vector, "float32-huffman")
    assert wire.wire_dtype == "float32-huffman"
    # Weights of one scale: the exponent plane codes to well under half of its bytes.
    assert wire.payload_bytes < 0.87 * 4 * vector.numel()
    assert wire.payload_bytes == 3 * vector.numel() + wire.coded_bytes
    assert torch.equal(_bits(_received(wire, vector.numel(), chunk_bytes)), _bits(vector))


def test_special_values_keep_their_bits() -> None:
    tiny = torch.tensor([1e-45, -1e-45, 1.1754942e-38], dtype=torch.float32)  # subnormals
    extremes = torch.tensor([0.0, -0.0, 3.4028235e38, -3.4028235e38, 1.0, -1.0])
    vector = torch.cat([tiny, extremes, _weights(5000)]).repeat(3)
    wire = prepare_vector(vector, "float32-huffman")
    assert wire.wire_dtype == "float32-huffman"
    assert torch.equal(_bits(_received(wire, vector.numel())), _bits(vector))


def test_an_incompressible_vector_goes_as_plain_float32() -> None:
    generator = torch.Generator().manual_seed(1)
    # Exponents spread evenly over the whole range: nothing to code.
    exponents = torch.randint(-120, 120, (50_000,), generator=generator).to(torch.float32)
    signs = torch.randint(0, 2, (50_000,), generator=generator).to(torch.float32) * 2 - 1
    vector = signs * torch.exp2(exponents) * (1 + torch.rand(50_000, generator=generator))
    wire = prepare_vector(vector, "float32-huffman")
    assert wire.wire_dtype == "float32"
    assert wire.coded_bytes == 0 and wire.payload_bytes == 4 * vector.numel()
    assert torch.equal(_bits(_received(wire, vector.numel())), _bits(vector))
    assert prepare_vector(torch.zeros(1), "float32-huffman").wire_dtype == "float32"  # too short to win


def test_non_finite_values_are_refused_before_sending() -> None:
    vector = _weights(1000)
    vector[3] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        prepare_vector(vector, "float32-huffman")


def _forged(count: int, stream: bytes, planes: torch.Tensor | None = None) -> WireVector:
    """A float32-huffman push whose coded exponent plane is ``stream``, with a correct checksum."""
    raw = planes if planes is not None else _weights(count).view(torch.uint8).view(count, 4)[:, :3]
    payload = torch.cat([raw.t().reshape(-1), torch.frombuffer(bytearray(stream), dtype=torch.uint8)])
    view = memoryview(payload.numpy()).cast("B")
    return WireVector(
        payload=view,
        wire_dtype="float32-huffman",
        element_count=count,
        checksum=payload_crc32(view),
        shape=(count,),
        _owner=payload,
        coded_bytes=len(stream),
    )


def _refusal(wire: WireVector, count: int) -> WireError:
    with pytest.raises(WireError) as caught:
        _received(wire, count)
    return caught.value


COUNT = 4096
EXPONENTS = bytes([0x3C]) * COUNT


@pytest.mark.parametrize(
    ("stream", "message"),
    [
        (b"not a zlib stream at all", "does not inflate"),
        (zlib.compress(EXPONENTS[:-1]), "inflates to 4095 bytes, expected 4096"),
        (zlib.compress(EXPONENTS + b"\x3c"), "inflates to more than 4096 bytes"),
        # A bomb: 4 MB of exponent bytes in a few KB; inflating stops one byte past the vector's length.
        (zlib.compress(EXPONENTS * 1000, 9), "inflates to more than 4096 bytes"),
        (zlib.compress(EXPONENTS) + b"tail", "bytes after its end"),
        (zlib.compress(EXPONENTS) + zlib.compress(b"\x3c"), "bytes after its end"),
        (zlib.compress(EXPONENTS)[:-4], "ends before its end marker and checksum"),  # no checksum
        (zlib.compress(EXPONENTS)[:-6], "inflates to"),
    ],
)
def test_a_malformed_exponent_stream_is_a_wire_error(stream: bytes, message: str) -> None:
    error = _refusal(_forged(COUNT, stream), COUNT)
    assert error.kind is WireErrorKind.COMPRESSION
    assert message in str(error)


def test_coded_exponents_that_make_nan_are_refused() -> None:
    planes = torch.zeros(COUNT, 3, dtype=torch.uint8)
    planes[:, 2] = 0x80  # exponent's low bit set; with a high byte of 0x7F: 0x7F80_0000 = +inf
    error = _refusal(_forged(COUNT, zlib.compress(bytes([0x7F]) * COUNT), planes), COUNT)
    assert error.kind is WireErrorKind.NON_FINITE


def test_a_payload_is_never_larger_than_plain_float32() -> None:
    # Stored (level 0) blocks are a valid zlib stream longer than the plane: refused from the header.
    error = _refusal(_forged(COUNT, zlib.compress(EXPONENTS, 0)), COUNT)
    assert error.kind is WireErrorKind.COMPRESSION and "coded_bytes" in str(error)
    for count in range(1, 80):  # the sender falls back to float32 rather than send 4 bytes or more
        wire = prepare_vector(_weights(count, seed=count), "float32-huffman")
        assert wire.payload_bytes <= 4 * count
        assert wire.wire_dtype == "float32" or wire.payload_bytes < 4 * count


@pytest.mark.parametrize("coded_bytes", [0, exponent_coding.max_coded_bytes(COUNT) + 1])
def test_a_header_with_impossible_coded_bytes_is_refused_before_any_payload(coded_bytes: int) -> None:
    wire = _forged(COUNT, zlib.compress(EXPONENTS))
    forged = WireVector(
        payload=wire.payload,
        wire_dtype=wire.wire_dtype,
        element_count=COUNT,
        checksum=wire.checksum,
        shape=wire.shape,
        _owner=wire._owner,
        coded_bytes=coded_bytes,
    )
    first = next(iter_chunks(forged, sender_id="a", chunk_bytes=65536))
    with pytest.raises(WireError) as caught:
        decode_vector([first], ExpectedVector(element_count=COUNT))
    assert caught.value.kind is WireErrorKind.COMPRESSION
    assert "coded_bytes" in str(caught.value)


def test_coded_bytes_on_another_dtype_is_refused() -> None:
    plain = prepare_vector(_weights(COUNT), "float32")
    forged = WireVector(
        payload=plain.payload,
        wire_dtype="float32",
        element_count=COUNT,
        checksum=plain.checksum,
        shape=plain.shape,
        _owner=plain._owner,
        coded_bytes=12,
    )
    error = _refusal(forged, COUNT)
    assert error.kind is WireErrorKind.BAD_DTYPE and "coded_bytes" in str(error)


def test_decode_checks_sizes_itself() -> None:
    payload, coded = exponent_coding.encode(_weights(COUNT))  # type: ignore[misc]
    with pytest.raises(CodecError, match="payload has"):
        exponent_coding.decode(payload[:-1], COUNT, coded)
    with pytest.raises(CodecError, match="outside"):
        exponent_coding.decode(payload, COUNT, 0)


def test_a_run_takes_plain_vectors_only_in_its_own_wire_dtype() -> None:
    """A handshaken peer's push in another dtype than the run's (a bfloat16 vector into a float32 run)
    is refused, naming both; runs on any float32 wire (float32, float32-huffman, float32-auto: the same
    bits) take both float32 and float32-huffman."""
    vector = _weights(COUNT)

    def decoded(wire_dtype: str, run: str) -> torch.Tensor:
        chunks = iter_chunks(prepare_vector(vector, wire_dtype), sender_id="a", chunk_bytes=65536)
        expected = ExpectedVector(element_count=COUNT, gossip=GossipKind(wire_dtype=run))
        return decode_vector(chunks, expected).vector

    for wire_dtype, run in [("bfloat16", "float32"), ("float32-huffman", "bfloat16"), ("float32", "bfloat16"),
                            ("float16", "float32-huffman"), ("bfloat16", "float16"),
                            ("bfloat16", "float32-auto"), ("float16", "float32-auto")]:  # fmt: skip
        with pytest.raises(WireError) as caught:
            decoded(wire_dtype, run)
        assert caught.value.kind is WireErrorKind.BAD_DTYPE
        assert f"travel as {run} (wire_dtype), not {wire_dtype}" in str(caught.value)
    for wire_dtype, run in [("float32", "float32"), ("float32", "float32-huffman"),
                            ("float32-huffman", "float32-huffman"), ("bfloat16", "bfloat16"),
                            ("float32", "float32-auto"), ("float32-huffman", "float32-auto"),
                            ("float32-huffman", "float32")]:  # fmt: skip
        assert decoded(wire_dtype, run).dtype == torch.float32
