"""Lossless float32 on the wire: byte planes with the exponent bytes Huffman-coded (wire dtype
``float32-huffman``).

The high byte of a float32 (its sign and the exponent's top 7 bits) takes few values in a trained network:
weights sit within a few binades of each other, so that byte carries ~2–3 bits of information in 8. The
other three bytes (mantissa, exponent's lowest bit) are close to uniform and are sent as they are. The
vector is split into byte planes (Hershcovitch et al., *ZipNN: Lossless Compression for AI Models*, 2024:
"byte grouping"), and the exponent plane is Huffman-coded with zlib's ``Z_HUFFMAN_ONLY`` strategy
(RFC 1950/1951 framing; no match search, which finds nothing in this plane and costs most of deflate's
time). Measured on trained generators and freshly initialised models: the exponent plane shrinks
2.9–3.4×, the whole vector 1.19–1.21× (``docs/benchmarks.md``).

Payload layout (little-endian hosts only, as the rest of the transport): plane 0, plane 1, plane 2 (each
``d`` bytes: byte b of every element), then the zlib stream of plane 3 (``coded_bytes`` bytes), which must
inflate to exactly ``d`` bytes. Decoding trusts nothing: a stream that is malformed, inflates to more or
fewer than ``d`` bytes, or has bytes after its end is a ``CodecError``; inflating never produces more
than ``d`` bytes, whatever the stream claims. Pure torch/zlib; no I/O.
"""

from __future__ import annotations

import zlib
from typing import Final

import torch

from agent.transport.codecs import CodecError

# zlib level 1, Huffman only: the level does not matter without match search; 15-bit window, memLevel 9.
_LEVEL: Final = 1
_WINDOW_BITS: Final = 15
_MEM_LEVEL: Final = 9


def max_coded_bytes(element_count: int) -> int:
    """The most bytes the zlib stream of an ``element_count``-byte plane may take: one less than the plane,
    so a payload is always smaller than plain float32's 4 bytes per element. A sender never sends more (it
    sends plain float32 when coding saves less than 1/64 of the vector), so a header claiming more is
    malformed."""
    return element_count - 1


def payload_bytes(element_count: int, coded_bytes: int) -> int:
    """Bytes of a ``float32-huffman`` payload: three raw planes and the coded exponent plane."""
    return 3 * element_count + coded_bytes


def encode(flat: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """(payload, coded_bytes) of a flat float32 CPU tensor of d elements: a uint8 tensor of
    ``3d + coded_bytes`` bytes in the layout above. None when coding would save less than 1/64 of the
    plain 4d bytes (an exponent plane with little to code, or an empty vector): send float32 then."""
    if flat.dim() != 1 or flat.dtype != torch.float32 or flat.device.type != "cpu":
        raise ValueError(f"encode takes a flat float32 CPU tensor, got {flat.dtype} {tuple(flat.shape)}")
    d = flat.numel()
    if d == 0:
        return None
    planes = flat.contiguous().view(torch.uint8).view(d, 4)
    exponent = planes[:, 3].contiguous()
    coder = zlib.compressobj(_LEVEL, zlib.DEFLATED, _WINDOW_BITS, _MEM_LEVEL, zlib.Z_HUFFMAN_ONLY)
    stream = coder.compress(memoryview(exponent.numpy())) + coder.flush()
    if len(stream) > d - max(1, d // 16):
        return None
    payload = torch.empty(payload_bytes(d, len(stream)), dtype=torch.uint8)
    payload[: 3 * d].view(3, d).copy_(planes[:, :3].t())
    payload[3 * d :].copy_(torch.frombuffer(bytearray(stream), dtype=torch.uint8))
    return payload, len(stream)


def inflate_exactly(stream: memoryview, length: int, what: str) -> bytes:
    """The ``length`` bytes a zlib stream (RFC 1950) inflates to; CodecError, naming ``what``, when it is
    malformed, inflates to more or fewer bytes, stops before its end marker and checksum, or has bytes
    after its end. Never inflates more than ``length`` + 1 bytes, whatever the stream claims."""
    inflater = zlib.decompressobj(_WINDOW_BITS)
    try:
        data = inflater.decompress(stream, length)
        if inflater.unconsumed_tail and inflater.decompress(inflater.unconsumed_tail, 1):
            # length bytes out and input left that still inflates (a bomb stops here, one byte past it).
            raise CodecError(f"{what} inflates to more than {length} bytes")
    except zlib.error as error:
        raise CodecError(f"{what} does not inflate: {error}") from None
    if inflater.eof and (inflater.unused_data or inflater.unconsumed_tail):
        raise CodecError(f"{what} has bytes after its end")  # e.g. a second stream after the first
    if len(data) != length:
        raise CodecError(f"{what} inflates to {len(data)} bytes, expected {length}")
    if not inflater.eof:
        raise CodecError(f"{what} ends before its end marker and checksum (after {length} bytes)")
    return data


def decode(
    payload: torch.Tensor, element_count: int, coded_bytes: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The float32 (element_count,) vector of a ``float32-huffman`` ``payload`` (uint8, CPU), written into
    ``out`` (4·element_count uint8 bytes, e.g. recycled memory) or a new tensor.

    Raises CodecError when the payload's size does not match, or the stream is not a zlib stream that
    inflates to exactly ``element_count`` bytes and ends where the payload ends."""
    d = element_count
    if not 0 < coded_bytes <= max_coded_bytes(d):
        raise CodecError(f"coded_bytes {coded_bytes} is outside [1, {max_coded_bytes(d)}] for {d} elements")
    if payload.numel() != payload_bytes(d, coded_bytes):
        raise CodecError(
            f"float32-huffman payload has {payload.numel()} bytes, expected {payload_bytes(d, coded_bytes)}"
        )
    exponent = inflate_exactly(memoryview(payload[3 * d :].numpy()), d, "exponent stream")
    vector = torch.empty(d, dtype=torch.float32) if out is None else out.view(torch.float32)
    planes = vector.view(torch.uint8).view(d, 4)
    planes[:, :3].copy_(payload[: 3 * d].view(3, d).t())
    planes[:, 3].copy_(torch.frombuffer(bytearray(exponent), dtype=torch.uint8))
    return vector


__all__ = ["decode", "encode", "inflate_exactly", "max_coded_bytes", "payload_bytes"]
