"""Byte layouts of compressed gossip messages (CHOCO, ``agent.core.choco``): EdgeMessage ↔ payload bytes.

The one place where compressed differences become bytes and back (the proto comments on WireDtype give
the same layouts). Decoding trusts nothing: a payload of the wrong size, an index out of range or out of
order, a non-finite scale or value, or a header that does not fit its dtype is a ``WireError`` naming
the problem. Payloads are raw little-endian (the transport refuses big-endian hosts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

import torch

from agent.core.choco import EdgeMessage
from agent.core.compression import Compressed, CompressionError, Compressor, decompress
from agent.core.config import FLOAT32_WIRES
from agent.transport._generated.dpgan.v1 import dpgan_pb2 as pb

# Wire dtype name -> proto enum, for compressed payloads (float32 resets use the plain FLOAT32 dtype).
COMPRESSED_DTYPES: Final = {
    "int8": pb.WIRE_DTYPE_INT8_BLOCKS,
    "topk": pb.WIRE_DTYPE_TOPK,
    "randk": pb.WIRE_DTYPE_RANDK,
}
_KINDS_BY_PROTO: Final = {value: kind for kind, value in COMPRESSED_DTYPES.items()}
MAX_INT8_BLOCK: Final = 1 << 20
# The encodings of float32's bits on the wire (agent.transport.wire_vectors): every float32 run takes all.
FLOAT32_ENCODINGS: Final = ("float32", "float32-huffman", "float32-delta")


@dataclass(frozen=True)
class GossipKind:
    """What a receiver's run gossips, for refusing pushes of another kind (``ExpectedVector.gossip``).

    ``compressor`` None: plain vectors (no edge header) in the run's ``wire_dtype``; a run on one of the
    float32 wires (float32, float32-huffman, float32-delta, float32-auto: the same bits, compared equal at
    the handshake) takes float32, float32-huffman and float32-delta. Otherwise compressed
    differences of exactly this compressor (its kind, and its kept count or int8 block for the receiver's
    vector length), plus float32 resets."""

    compressor: Compressor | None = None
    wire_dtype: str = "float32"

    def plain_refusal(self, wire_dtype: str) -> str | None:
        """Why a plain vector sent as ``wire_dtype`` is not of this run's gossip; None if it is."""
        if self.compressor is not None:
            return None  # refusal() covers compressed runs: plain pushes are refused there
        accepted = set(FLOAT32_ENCODINGS) if self.wire_dtype in FLOAT32_WIRES else {self.wire_dtype}
        if wire_dtype in accepted:
            return None
        return f"this run's vectors travel as {self.wire_dtype} (wire_dtype), not {wire_dtype}"

    def refusal(self, dtype: int, edge: pb.EdgeCopy | None, length: int) -> str | None:
        """Why a push with this dtype and edge header is not of this run's gossip; None if it is."""
        compressor = self.compressor
        if compressor is None:
            if edge is not None or is_compressed(dtype):
                return "this run gossips plain vectors (compression none); a compressed push is not accepted"
            return None
        if edge is None:
            return f"this run gossips {compressor.kind}-compressed differences, not plain vectors"
        if edge.reset or not is_compressed(dtype):
            return None  # a reset: the frames layer insists on float32
        kind = _KINDS_BY_PROTO[dtype]
        if kind != compressor.kind:
            return f"this run gossips {compressor.kind}-compressed differences, not {kind}"
        if kind == "int8" and edge.block != compressor.block:
            return f"int8 block {edge.block} differs from this run's {compressor.block}"
        if kind != "int8" and edge.kept != compressor.kept(length):
            return (
                f"{kind} keeps {edge.kept} entries; this run's compression_ratio {compressor.ratio:g} keeps "
                f"{compressor.kept(length)} of {length}"
            )
        return None


class CodecError(ValueError):
    """A compressed payload or its header is malformed; the transport turns it into a WireError."""


def is_compressed(dtype: int) -> bool:
    return dtype in _KINDS_BY_PROTO


def edge_header(message: EdgeMessage) -> pb.EdgeCopy:
    """The EdgeCopy header of ``message``."""
    header = pb.EdgeCopy(reset=message.reset, base=message.base, seen=message.seen)
    compressed = message.compressed
    if compressed is not None:
        if compressed.kind == "int8":
            header.block = compressed.block
        else:
            header.kept = compressed.values.numel()
            header.seed = compressed.seed
    return header


def pack(compressed: Compressed) -> torch.Tensor:
    """The payload bytes of ``compressed`` as a uint8 tensor (CPU)."""
    if compressed.kind == "int8":
        assert compressed.scales is not None
        # Scales first: 4-byte aligned in the receive buffer whatever d is.
        parts = [compressed.scales.contiguous().view(torch.uint8), compressed.values.view(torch.uint8)]
    elif compressed.kind == "topk":
        assert compressed.indices is not None
        indices = compressed.indices.to(torch.int32).contiguous()
        parts = [indices.view(torch.uint8), compressed.values.contiguous().view(torch.uint8)]
    else:
        parts = [compressed.values.contiguous().view(torch.uint8)]
    return torch.cat(parts)


def payload_bytes(dtype: int, length: int, edge: pb.EdgeCopy) -> int:
    """Bytes the payload of a compressed push must have, from its header; CodecError when the header
    cannot describe a payload of a ``length``-element vector."""
    kind = _KINDS_BY_PROTO[dtype]
    if edge.reset:
        raise CodecError("a reset carries the vector itself: its dtype must be FLOAT32")
    if length < 1:
        raise CodecError("a compressed vector must have at least one element")
    if kind == "int8":
        if not 1 <= edge.block <= MAX_INT8_BLOCK:
            raise CodecError(f"int8 block {edge.block} is outside [1, {MAX_INT8_BLOCK}]")
        return length + 4 * math.ceil(length / edge.block)
    if not 1 <= edge.kept <= length:
        raise CodecError(f"{kind} keeps {edge.kept} entries of a {length}-element vector")
    if kind == "randk" and edge.seed >= 2**63:
        raise CodecError(f"randk seed {edge.seed} is outside [0, 2^63)")
    return (8 if kind == "topk" else 4) * edge.kept


def unpack(dtype: int, length: int, edge: pb.EdgeCopy, payload: torch.Tensor) -> Compressed:
    """The Compressed message of a verified-length uint8 ``payload``; CodecError when its contents are
    invalid (indices out of range or not strictly ascending, non-finite numbers)."""
    kind = _KINDS_BY_PROTO[dtype]
    if payload.numel() != payload_bytes(dtype, length, edge):
        raise CodecError(
            f"{kind} payload has {payload.numel()} bytes, expected {payload_bytes(dtype, length, edge)}"
        )
    if kind == "int8":
        blocks = math.ceil(length / edge.block)
        scales = payload[: 4 * blocks].view(torch.float32)
        _require_finite(scales, "int8 scales")
        if bool((scales < 0).any()):
            raise CodecError("int8 scales must not be negative (a scale is max|v| / 127)")
        values = payload[4 * blocks :].view(torch.int8)
        if bool((values == -128).any()):
            raise CodecError("int8 values must be in [-127, 127]; found -128")
        return Compressed("int8", length, values, scales=scales, block=edge.block)
    kept = edge.kept
    if kind == "topk":
        indices = payload[: 4 * kept].view(torch.int32).to(torch.int64)
        values = payload[4 * kept :].view(torch.float32)
        if int(indices[0]) < 0 or int(indices[-1]) >= length:
            raise CodecError(f"topk index outside [0, {length})")
        if kept > 1 and not bool((indices[1:] > indices[:-1]).all()):
            raise CodecError("topk indices must be strictly ascending")
        _require_finite(values, "topk values")
        return Compressed("topk", length, values, indices=indices)
    values = payload.view(torch.float32)
    _require_finite(values, "randk values")
    return Compressed("randk", length, values, seed=edge.seed)


def decode_dense(dtype: int, length: int, edge: pb.EdgeCopy, payload: torch.Tensor) -> torch.Tensor:
    """The dense float32 (length,) difference a compressed payload stands for."""
    if payload.storage_offset() % 4:
        payload = payload.clone()  # float32 and int32 views need 4-byte alignment
    try:
        return decompress(unpack(dtype, length, edge, payload))
    except (CompressionError, RuntimeError) as error:
        raise CodecError(str(error)) from None


def _require_finite(values: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(values).all()):
        raise CodecError(f"{what} contain NaN or inf")


__all__ = [
    "COMPRESSED_DTYPES",
    "CodecError",
    "GossipKind",
    "decode_dense",
    "edge_header",
    "is_compressed",
    "pack",
    "payload_bytes",
    "unpack",
]
