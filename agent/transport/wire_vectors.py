"""A tensor as wire bytes, ready to push: the wire dtypes, conversion and coding, and the checksum.

Preparing is the sender's expensive part of a push (dtype conversion, coding, CRC over the payload), done
once per vector and shared by every push of it (``WireVector``). The frames that carry it, and the
receiver's validated reassembly, are ``agent.transport.frames``; the byte layouts of the coded dtypes are
``exponent_coding`` (float32-huffman), ``delta_coding`` (float32-delta) and ``codecs`` (compressed gossip).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Literal

import torch

from agent.core.choco import EdgeMessage
from agent.transport import codecs, delta_coding, exponent_coding
from agent.transport._generated.dpgan.v1 import dpgan_pb2 as pb

if TYPE_CHECKING:
    from agent.transport.references import Reference

try:
    # ISA-L's CRC-32 (carry-less multiply folding): bit-identical to zlib.crc32, ~6x faster than the
    # table-driven zlib build that ships with CPython (2 GB/s: 30 ms per 64 MiB, on every push received).
    from isal.isal_zlib import crc32 as _crc32
except ImportError:  # pragma: no cover - isal has wheels for every platform we run on; same values anyway
    _crc32 = zlib.crc32

WireDtypeName = Literal["float32", "bfloat16", "float16", "float32-huffman", "float32-delta"]


@dataclass(frozen=True, slots=True)
class _WireDtypeSpec:
    name: WireDtypeName
    proto_value: int
    torch_dtype: torch.dtype
    element_bytes: int


_WIRE_DTYPES: Final[dict[str, _WireDtypeSpec]] = {
    "float32": _WireDtypeSpec("float32", pb.WIRE_DTYPE_FLOAT32, torch.float32, 4),
    "bfloat16": _WireDtypeSpec("bfloat16", pb.WIRE_DTYPE_BFLOAT16, torch.bfloat16, 2),
    "float16": _WireDtypeSpec("float16", pb.WIRE_DTYPE_FLOAT16, torch.float16, 2),
    # Bit-exact float32 with its exponent bytes Huffman-coded (agent.transport.exponent_coding); the
    # payload is 3 bytes per element plus the coded plane, less than 4 bytes per element.
    "float32-huffman": _WireDtypeSpec("float32-huffman", pb.WIRE_DTYPE_FLOAT32_HUFFMAN, torch.float32, 4),
    # Bit-exact float32 coded against a vector the receiver holds (agent.transport.delta_coding): 2 bytes
    # per element plus the coded high planes, less than 4 bytes per element.
    "float32-delta": _WireDtypeSpec("float32-delta", pb.WIRE_DTYPE_FLOAT32_DELTA, torch.float32, 4),
}
_WIRE_DTYPES_BY_PROTO: Final = {spec.proto_value: spec for spec in _WIRE_DTYPES.values()}
WIRE_DTYPE_NAMES: Final = tuple(_WIRE_DTYPES)


def _wire_dtype_spec(wire_dtype: str) -> _WireDtypeSpec:
    try:
        return _WIRE_DTYPES[wire_dtype]
    except KeyError:
        raise ValueError(
            f"unknown wire_dtype {wire_dtype!r}; expected one of {', '.join(WIRE_DTYPE_NAMES)}"
        ) from None


def payload_crc32(data: memoryview | bytes, value: int = 0) -> int:
    """CRC-32 of `data` continuing from `value`: the VectorHeader.checksum algorithm, in one place.

    zlib's CRC-32 (same polynomial and values as `zlib.crc32`), so peers running an older agent that
    used zlib directly interoperate. Incremental: crc(a + b) == payload_crc32(b, payload_crc32(a)).
    """
    return _crc32(data, value)


def all_finite(values: torch.Tensor) -> bool:
    """True iff no element of the floating-point tensor `values` is NaN or ±inf.

    Fast path: a sum is finite only if every addend is (NaN and inf propagate through addition and
    nothing turns them finite again), and torch.sum runs ~3x faster than aminmax (2.5 vs 7.5 ms per
    64 MiB). A non-finite sum may also be an overflow of finite values (|x| near 3e38), so that case
    is decided exactly by aminmax, a single pass with no n-sized temporary (isfinite has one).
    """
    if values.numel() == 0:
        return True
    if math.isfinite(float(values.sum(dtype=torch.float32))):
        return True
    low, high = torch.aminmax(values)
    return math.isfinite(float(low)) and math.isfinite(float(high))


def _require_little_endian() -> None:
    # The payload is the in-memory representation; on a big-endian host it would be byte-swapped.
    if sys.byteorder != "little":
        raise RuntimeError("dpgan transport requires a little-endian host (payload is raw memory)")


@dataclass(frozen=True, slots=True, eq=False)
class WireVector:
    """A tensor already converted to its wire bytes, with the checksum computed.

    Preparing is the expensive part of a push (dtype conversion and CRC over the whole payload), so
    the agent prepares its vector once per round and pushes the same WireVector to every neighbour.
    `payload` may alias the source tensor's memory (float32 on CPU): the source must not be modified
    until every push of it has finished. If it is, the receiver detects it through the checksum and
    rejects the push; it can never deliver a torn vector.
    """

    payload: memoryview
    wire_dtype: WireDtypeName
    element_count: int
    checksum: int
    shape: tuple[int, ...]
    # Keeps the tensor that owns `payload`'s memory alive for as long as this object exists.
    _owner: torch.Tensor = field(repr=False)
    # Compressed gossip (agent.core.choco): the edge header; wire_dtype is then int8/topk/randk, or
    # float32 for a reset.
    edge: pb.EdgeCopy | None = None
    # float32-huffman, float32-delta: bytes of the zlib stream at the end of the payload (0 otherwise).
    coded_bytes: int = 0
    # float32-huffman, float32-delta: seconds the sender spent coding (also when the coding did not pay
    # and the vector went another way); what wire_dtype float32-auto weighs against the link time it saves.
    coding_seconds: float = 0.0
    # float32-delta: the vector the payload is coded against (agent.transport.references).
    reference: pb.DeltaReference | None = None
    # The receiver keeps this vector as the reference of the sender's next float32-delta push.
    keep_reference: bool = False

    @property
    def payload_bytes(self) -> int:
        return self.payload.nbytes


# A float32-delta payload above this fraction of plain float32 is compared with the exponent coding
# (which gives ~0.83 on GAN parameters); below it, the delta is kept without trying the other.
DELTA_WORSE_THAN: Final = 0.8


def prepare_vector(
    tensor: torch.Tensor,
    wire_dtype: str = "float32",
    reference: Reference | None = None,
    keep_reference: bool = False,
) -> WireVector:
    """Convert a float32 tensor (any shape, any device) to wire bytes and checksum it.

    Raises ValueError for a non-float32 tensor, non-finite values, or values that overflow the wire
    dtype (float16 tops out at 65504), so a sender finds out about its own problem instead of every
    receiver refusing the push. The coded float32 dtypes fall back when coding does not pay (the
    result's ``wire_dtype`` says which was chosen): ``float32-delta`` codes against ``reference`` (the
    vector the receiver holds, ``agent.transport.references``), and without one, or when the vectors are
    too far apart, as ``float32-huffman``; that in turn falls back to plain float32 for a vector whose
    exponent bytes do not compress. ``keep_reference`` asks the receiver to keep this vector as the
    reference of the next float32-delta push (float32 dtypes only).
    """
    _require_little_endian()
    spec = _wire_dtype_spec(wire_dtype)
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype != torch.float32:
        raise ValueError(f"only float32 tensors can be sent, got {tensor.dtype}")
    if keep_reference and spec.torch_dtype != torch.float32:
        raise ValueError(f"keep_reference needs a float32 wire dtype, not {wire_dtype}")
    shape = tuple(tensor.shape)
    # reshape(-1) is a view for contiguous tensors; .contiguous() copies only when it must.
    flat = tensor.detach().to(device="cpu").reshape(-1).contiguous()
    wire = flat if spec.torch_dtype == torch.float32 else flat.to(spec.torch_dtype)
    if not all_finite(wire):
        if wire is not flat and all_finite(flat):
            raise ValueError(
                f"vector does not fit {wire_dtype}: values overflow to inf "
                f"(float32 range {float(flat.min())}..{float(flat.max())})"
            )
        raise ValueError("refusing to send a vector containing NaN or inf")
    # numpy has no bfloat16, so view the raw bytes as uint8 first; no copy either way.
    owner, chosen, coded_bytes, coding_seconds = wire.view(torch.uint8), spec.name, 0, 0.0
    header: pb.DeltaReference | None = None
    if spec.name in ("float32-delta", "float32-huffman"):
        started = time.perf_counter()
        coded = None
        if (
            spec.name == "float32-delta"
            and reference is not None
            and reference.vector.numel() == flat.numel()
        ):
            coded = delta_coding.encode(flat, reference.vector)
            header = None if coded is None else reference.header()
        if coded is None or coded[0].numel() > DELTA_WORSE_THAN * 4 * flat.numel():
            # No reference, or one so far from the vector that the exponent coding may do better.
            exponents = exponent_coding.encode(flat)
            if coded is None or (exponents is not None and exponents[0].numel() < coded[0].numel()):
                chosen, coded, header = "float32-huffman", exponents, None
        coding_seconds = time.perf_counter() - started
        if coded is None:
            chosen = "float32"  # coding would not pay: the plain bytes (already checked finite)
        else:
            owner, coded_bytes = coded
    payload = memoryview(owner.numpy()).cast("B")
    return WireVector(
        payload=payload,
        wire_dtype=chosen,  # type: ignore[arg-type]
        element_count=flat.numel(),
        checksum=payload_crc32(payload),
        shape=shape,
        _owner=owner,
        coded_bytes=coded_bytes,
        coding_seconds=coding_seconds,
        reference=header,
        keep_reference=keep_reference,
    )


def prepare_edge_message(message: EdgeMessage) -> WireVector:
    """A compressed-gossip message (``agent.core.choco``) as wire bytes: a reset as the float32 vector,
    a difference in its compressor's layout (``agent.transport.codecs``); ``edge`` carries the header."""
    if message.reset:
        prepared = prepare_vector(message.dense, "float32")
        return dataclasses.replace(prepared, edge=codecs.edge_header(message))
    compressed = message.compressed
    assert compressed is not None, "a difference message carries its compressed form"
    packed = codecs.pack(compressed)
    payload = memoryview(packed.numpy()).cast("B")
    return WireVector(
        payload=payload,
        wire_dtype=compressed.kind,  # type: ignore[arg-type]
        element_count=compressed.length,
        checksum=payload_crc32(payload),
        shape=(compressed.length,),
        _owner=packed,
        edge=codecs.edge_header(message),
    )
