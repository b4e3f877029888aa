"""Wire frames of one tensor: dtypes, encoding, zero-copy chunk parsing, and validated reassembly.

Wire format of one tensor: a stream of VectorChunk messages. The first chunk carries a VectorHeader
(position, dtype, element count, CRC-32 of the whole payload, chunk size) plus the first slice of the
payload; every following chunk carries the next slice. Every chunk except the last carries exactly
`chunk_bytes` payload bytes, the last one the remainder. Payload is raw little-endian elements.

A zero-element tensor is legal: it is sent as a single header chunk with empty data. The gossip
vector is never empty in practice, but FetchState may legitimately carry empty optimizer tensors,
and one rule for both keeps the decoder simple.

Nothing from a peer is trusted: `VectorAssembler` checks every field and raises `WireError` (a
ValueError with a machine-readable `kind`) naming the problem. A vector is only ever returned whole
and verified; partial or invalid data never escapes this module. Named multi-tensor streams
(FetchState) are built on these frames in `state.py`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Final, NamedTuple

import torch
from google.protobuf.message import DecodeError

from agent.transport import codecs, delta_coding, exponent_coding
from agent.transport._generated.dpgan.v1 import dpgan_pb2 as pb
from agent.transport.buffers import RECEIVE_BUFFERS
from agent.transport.options import DEFAULT_CHUNK_BYTES, validate_chunk_bytes
from agent.transport.references import ReferenceMissing, References

# The sender's side, re-exported: callers import the wire format from here.
from agent.transport.wire_vectors import (
    _WIRE_DTYPES,
    _WIRE_DTYPES_BY_PROTO,
    WIRE_DTYPE_NAMES,
    WireDtypeName,
    WireVector,
    _require_little_endian,
    _WireDtypeSpec,
    all_finite,
    payload_crc32,
    prepare_edge_message,
    prepare_vector,
)

_UINT32_MAX: Final = (1 << 32) - 1
_UINT64_MAX: Final = (1 << 64) - 1


def _check_unsigned(name: str, value: int, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {type(value).__name__}")
    if not 0 <= value <= maximum:
        raise ValueError(f"{name}={value} is outside [0, {maximum}]")
    return value


class Position(NamedTuple):
    """A gossip position. Tuples compare lexicographically, which is exactly DPOSG's order."""

    iteration: int
    round: int


# ---------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------


class WireErrorKind(StrEnum):
    """Category of a WireError; stable strings, used for PushAck status and log de-duplication."""

    FRAMING = "framing"
    MISSING_HEADER = "missing_header"
    DUPLICATE_HEADER = "duplicate_header"
    BAD_DTYPE = "bad_dtype"
    BAD_CHUNK_SIZE = "bad_chunk_size"
    ELEMENT_COUNT = "element_count"
    LENGTH = "length"
    CHECKSUM = "checksum"
    NON_FINITE = "non_finite"
    BAD_ROUND = "bad_round"
    STALE = "stale"
    TOO_FAR_AHEAD = "too_far_ahead"
    EPOCH_MISMATCH = "epoch_mismatch"
    SENDER_MISMATCH = "sender_mismatch"
    BAD_NAME = "bad_name"
    BAD_SHAPE = "bad_shape"
    TOO_LARGE = "too_large"
    COMPRESSION = "compression"  # a compressed-gossip header or payload that does not fit its vector
    REFERENCE_MISSING = "reference_missing"  # a float32-delta push against a vector the receiver lacks


class WireError(ValueError):
    """Data from a peer violates the wire format; `str(error)` names the problem."""

    def __init__(self, kind: WireErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind


# Wire framing. A serialized VectorChunk is just its fields in field-number order:
#   0x0A varint(len) <VectorHeader>   field 1, first chunk of a tensor only
#   0x12 varint(len) <payload>        field 2, omitted when empty (as protobuf does)
# The hot path writes and reads these bytes directly. Going through protobuf messages costs two
# extra copies of every payload byte on each side (bytes() for the field plus serialization; parsing
# plus the .data accessor), which measurably slowed pushes. The bytes are identical to
# VectorChunk.SerializeToString() (tests verify), so any standard protobuf/gRPC peer interoperates.
_HEADER_FIELD_TAG: Final = 0x0A  # field 1, wire type 2 (length-delimited)
_DATA_FIELD_TAG: Final = 0x12  # field 2, wire type 2
_WIRE_TYPE_VARINT: Final = 0
_WIRE_TYPE_FIXED64: Final = 1
_WIRE_TYPE_LENGTH_DELIMITED: Final = 2
_WIRE_TYPE_FIXED32: Final = 5


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(raw: memoryview, position: int) -> tuple[int, int]:
    value = 0
    for shift in range(0, 64, 7):
        if position >= len(raw):
            raise WireError(WireErrorKind.FRAMING, "chunk message ends inside a varint")
        byte = raw[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
    raise WireError(WireErrorKind.FRAMING, "chunk message has a varint longer than 10 bytes")


@dataclass(frozen=True, slots=True)
class RawChunk:
    """A VectorChunk parsed without copying its payload: `data` is a view into the received message.

    `header_only`: the header of a vector whose payload follows as bytes the reader writes straight
    into the assembler's `slot()` (the data plane, agent/transport/data_plane.py); never set for a
    PushVector message, whose first chunk must carry payload.
    """

    header: pb.VectorHeader | None
    data: memoryview | bytes
    message_bytes: int
    header_only: bool = False


@dataclass(frozen=True, slots=True)
class PayloadInPlace:
    """`nbytes` payload bytes a reader has already written into `VectorAssembler.slot()`."""

    nbytes: int

    @property
    def header(self) -> None:
        return None

    @property
    def message_bytes(self) -> int:
        return self.nbytes


def parse_chunk(raw: bytes) -> RawChunk:
    """Parse one serialized VectorChunk; raise WireError if it is not a well-formed one.

    Unknown fields are skipped (forward compatibility); a repeated header or data field is refused,
    since no conforming encoder emits one.
    """
    view = memoryview(raw).cast("B")
    header: pb.VectorHeader | None = None
    data: memoryview | None = None
    position = 0
    while position < len(view):
        key, position = _read_varint(view, position)
        field_number, wire_type = key >> 3, key & 0x7
        if field_number in (1, 2) and wire_type != _WIRE_TYPE_LENGTH_DELIMITED:
            raise WireError(
                WireErrorKind.FRAMING, f"chunk field {field_number} has wire type {wire_type}, expected 2"
            )
        if wire_type == _WIRE_TYPE_LENGTH_DELIMITED:
            length, position = _read_varint(view, position)
            end = position + length
            if end > len(view):
                raise WireError(
                    WireErrorKind.FRAMING,
                    f"chunk field {field_number} claims {length} bytes "
                    f"but only {len(view) - position} remain",
                )
            if field_number == 1:
                if header is not None:
                    raise WireError(WireErrorKind.DUPLICATE_HEADER, "chunk message carries two headers")
                try:
                    header = pb.VectorHeader.FromString(view[position:end])
                except DecodeError as error:
                    raise WireError(WireErrorKind.FRAMING, f"undecodable VectorHeader: {error}") from None
            elif field_number == 2:
                if data is not None:
                    raise WireError(WireErrorKind.FRAMING, "chunk message carries two data fields")
                data = view[position:end]
            position = end
        elif wire_type == _WIRE_TYPE_VARINT:
            _, position = _read_varint(view, position)
        elif wire_type in (_WIRE_TYPE_FIXED64, _WIRE_TYPE_FIXED32):
            position += 8 if wire_type == _WIRE_TYPE_FIXED64 else 4
            if position > len(view):
                raise WireError(WireErrorKind.FRAMING, f"chunk field {field_number} is truncated")
        else:
            raise WireError(
                WireErrorKind.FRAMING, f"chunk field {field_number} has unsupported wire type {wire_type}"
            )
    return RawChunk(header=header, data=data if data is not None else b"", message_bytes=len(view))


def split_chunk(chunk: pb.VectorChunk | RawChunk) -> tuple[pb.VectorHeader | None, memoryview | bytes]:
    """(header or None, payload slice) of a parsed chunk or a protobuf VectorChunk."""
    if isinstance(chunk, RawChunk):
        return chunk.header, chunk.data
    return (chunk.header if chunk.HasField("header") else None), chunk.data


def iter_frames(
    wire_vector: WireVector,
    *,
    sender_id: str,
    iteration: int = 0,
    round: int = 0,
    epoch: int = 0,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    name: str = "",
    include_shape: bool = False,
) -> Iterator[bytes]:
    """Yield the serialized VectorChunk messages of one prepared tensor (header in the first one).

    Arguments are validated eagerly, before the first frame is produced.
    """
    header_field = _header_field(
        wire_vector,
        sender_id=sender_id,
        iteration=iteration,
        round=round,
        epoch=epoch,
        chunk_bytes=chunk_bytes,
        name=name,
        include_shape=include_shape,
    )
    return _frame_generator(wire_vector.payload, header_field, chunk_bytes)


def header_message(
    wire_vector: WireVector,
    *,
    sender_id: str,
    iteration: int,
    round: int,
    epoch: int,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> bytes:
    """The serialized VectorChunk that carries only the header of ``wire_vector``: what the data plane
    sends before the raw payload bytes (``wire_vector.payload``, in ``chunk_bytes`` pieces at the
    receiver). Validates the arguments as ``iter_frames`` does."""
    return _header_field(
        wire_vector,
        sender_id=sender_id,
        iteration=iteration,
        round=round,
        epoch=epoch,
        chunk_bytes=chunk_bytes,
    )


def _header_field(
    wire_vector: WireVector,
    *,
    sender_id: str,
    iteration: int,
    round: int,
    epoch: int,
    chunk_bytes: int,
    name: str = "",
    include_shape: bool = False,
) -> bytes:
    header = pb.VectorHeader(
        sender_id=sender_id,
        iteration=_check_unsigned("iteration", iteration, _UINT64_MAX),
        round=_check_unsigned("round", round, _UINT32_MAX),
        membership_epoch=_check_unsigned("epoch", epoch, _UINT64_MAX),
        dtype=codecs.COMPRESSED_DTYPES.get(wire_vector.wire_dtype)
        or _WIRE_DTYPES[wire_vector.wire_dtype].proto_value,
        element_count=wire_vector.element_count,
        checksum=wire_vector.checksum,
        chunk_bytes=validate_chunk_bytes(chunk_bytes),
        name=name,
        shape=wire_vector.shape if include_shape else (),
        edge=wire_vector.edge,
        coded_bytes=wire_vector.coded_bytes,
        reference=wire_vector.reference,
        keep_reference=wire_vector.keep_reference,
    )
    header_bytes = header.SerializeToString()
    return bytes([_HEADER_FIELD_TAG]) + _encode_varint(len(header_bytes)) + header_bytes


def _frame_generator(payload: memoryview, header_field: bytes, chunk_bytes: int) -> Iterator[bytes]:
    full_chunk_prefix = bytes([_DATA_FIELD_TAG]) + _encode_varint(chunk_bytes)
    for offset in range(0, max(payload.nbytes, 1), chunk_bytes):
        piece = payload[offset : offset + chunk_bytes]
        if len(piece) == chunk_bytes:
            data_prefix = full_chunk_prefix
        elif len(piece) > 0:
            data_prefix = bytes([_DATA_FIELD_TAG]) + _encode_varint(len(piece))
        else:
            data_prefix = b""  # empty tensor: header only, like protobuf omits an empty bytes field
        # join() copies the payload slice exactly once, straight from the tensor's memory.
        yield b"".join((header_field if offset == 0 else b"", data_prefix, piece))


def iter_chunks(
    wire_vector: WireVector,
    *,
    sender_id: str,
    iteration: int = 0,
    round: int = 0,
    epoch: int = 0,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    name: str = "",
    include_shape: bool = False,
) -> Iterator[pb.VectorChunk]:
    """Like iter_frames, but as protobuf messages (for standard generated stubs and tests)."""
    frames = iter_frames(
        wire_vector,
        sender_id=sender_id,
        iteration=iteration,
        round=round,
        epoch=epoch,
        chunk_bytes=chunk_bytes,
        name=name,
        include_shape=include_shape,
    )
    return map(pb.VectorChunk.FromString, frames)


def encode_vector(
    vector: torch.Tensor,
    *,
    sender_id: str,
    iteration: int,
    round: int,
    epoch: int,
    wire_dtype: str = "float32",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Iterator[pb.VectorChunk]:
    """Encode a flat float32 gossip vector as a PushVector chunk stream.

    Conversion and checksum happen eagerly (errors surface here, not on first iteration).
    """
    if isinstance(vector, torch.Tensor) and vector.dim() != 1:
        raise ValueError(f"the gossip vector must be 1-D, got shape {tuple(vector.shape)}")
    return iter_chunks(
        prepare_vector(vector, wire_dtype),
        sender_id=sender_id,
        iteration=iteration,
        round=round,
        epoch=epoch,
        chunk_bytes=chunk_bytes,
    )


# ---------------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ExpectedVector:
    """What the receiver is willing to accept; anything else is a WireError.

    element_count: the receiver's own vector length; None only for state transfer, where the
        header's count is trusted up to `max_payload_bytes`.
    earliest/latest: inclusive window of acceptable (iteration, round) positions; None = unbounded.
    rounds_per_iteration: rounds are numbered 0..rounds_per_iteration-1; None = unchecked.
    membership_epoch / sender_id: required values when not None.
    named: True for FetchState tensors (header must carry a name and a shape matching the count);
        False for pushes (a pushed vector is flat and unnamed).
    allowed_dtypes: wire dtypes accepted (state transfer insists on exact float32).
    device: where the decoded float32 tensor is placed.
    """

    element_count: int | None
    max_payload_bytes: int | None = None
    earliest: Position | None = None
    latest: Position | None = None
    rounds_per_iteration: int | None = None
    membership_epoch: int | None = None
    sender_id: str | None = None
    named: bool = False
    allowed_dtypes: frozenset[str] = frozenset(WIRE_DTYPE_NAMES) | frozenset(codecs.COMPRESSED_DTYPES)
    # Pushes: the receiving run's kind of gossip (plain vectors, or one compressor's differences and
    # float32 resets); a push of another kind is refused. None: any kind (decoding tools, tests).
    gossip: codecs.GossipKind | None = None
    device: torch.device | str = "cpu"
    # float32-delta: the receiver's references (agent.transport.references), read once the header names
    # one; a delta push is refused (REFERENCE_MISSING) without them or without the one it names.
    references: References | None = None

    def __post_init__(self) -> None:
        # Accept plain (iteration, round) tuples from callers; error messages use the field names.
        for bound in ("earliest", "latest"):
            value = getattr(self, bound)
            if value is not None and not isinstance(value, Position):
                object.__setattr__(self, bound, Position(*value))
        if self.element_count is None and self.max_payload_bytes is None:
            raise ValueError("an unknown element_count needs max_payload_bytes to bound memory")
        if self.element_count is not None and self.element_count < 0:
            raise ValueError(f"element_count must be >= 0, got {self.element_count}")
        if self.rounds_per_iteration is not None and self.rounds_per_iteration < 1:
            raise ValueError(f"rounds_per_iteration must be >= 1, got {self.rounds_per_iteration}")


@dataclass(frozen=True, slots=True)
class DecodedVector:
    """A complete, verified tensor received from a peer (always float32)."""

    sender_id: str
    iteration: int
    round: int
    membership_epoch: int
    wire_dtype: WireDtypeName
    vector: torch.Tensor
    name: str = ""
    # Compressed gossip: the edge header; ``vector`` is then the dense difference (or, for a reset, the
    # sender's vector). Its wire_dtype is int8/topk/randk (float32 for a reset).
    edge: pb.EdgeCopy | None = None
    # The sender asks the receiver to keep this vector as the reference of its next float32-delta push.
    keep_reference: bool = False

    @property
    def position(self) -> Position:
        return Position(self.iteration, self.round)


class VectorAssembler:
    """Validates and reassembles one tensor's chunk stream into a single preallocated buffer.

    Usage: `add()` every chunk as it arrives, then `finish()`. Header checks run on the first chunk,
    so a stale or oversized push is refused before its payload is buffered.
    """

    def __init__(self, expected: ExpectedVector) -> None:
        _require_little_endian()
        self._expected = expected
        self._header: pb.VectorHeader | None = None
        self._spec: _WireDtypeSpec | None = None
        self._buffer: torch.Tensor | None = None
        self._buffer_view: memoryview | None = None
        self._total_bytes = 0
        self._received_bytes = 0
        self._chunks_seen = 0
        self._crc = 0
        # Finiteness is checked chunk by chunk as the payload arrives (while the chunk is still in
        # cache, and off the critical path after the last byte): elements before _checked_elements
        # summed to finite values so far. A non-finite partial sum is settled exactly in finish().
        self._values: torch.Tensor | None = None
        self._checked_elements = 0
        self._sums_finite = True
        self._finished = False
        self._compressed = False  # a compressed-gossip difference (codecs), decoded in finish()
        self._coded = False  # float32-huffman (exponent_coding) or float32-delta, decoded in finish()
        self._reference: torch.Tensor | None = None  # float32-delta: the vector the payload is coded against

    @property
    def header(self) -> pb.VectorHeader | None:
        """The validated header, once the first chunk has been added."""
        return self._header

    @property
    def received_bytes(self) -> int:
        return self._received_bytes

    @property
    def expected_bytes(self) -> int:
        """Payload bytes the accepted header announces (0 before the header); kept after release()."""
        return self._total_bytes

    @property
    def inflates(self) -> bool:
        """Whether finish() decodes a float32-huffman or float32-delta payload (milliseconds of CPU per MB):
        a caller on an event loop runs finish() in a thread then. Known once the header has been added."""
        return self._coded

    def add(self, chunk: pb.VectorChunk | RawChunk | PayloadInPlace) -> None:
        if self._finished:
            raise RuntimeError("VectorAssembler.add() called after finish()")
        self._chunks_seen += 1
        if isinstance(chunk, PayloadInPlace):
            self._accept_in_place(chunk.nbytes)
            return
        header, data = split_chunk(chunk)
        if self._header is None:
            if header is None:
                raise WireError(
                    WireErrorKind.MISSING_HEADER, "first chunk of the stream carries no VectorHeader"
                )
            self._accept_header(header)
            if isinstance(chunk, RawChunk) and chunk.header_only:
                if len(data):
                    raise WireError(WireErrorKind.FRAMING, "a header-only chunk carries payload bytes")
                return
        elif header is not None:
            raise WireError(
                WireErrorKind.DUPLICATE_HEADER,
                f"chunk {self._chunks_seen} carries a second VectorHeader; only the first chunk may",
            )
        self._append(data)

    def finish(self) -> DecodedVector:
        """Verify completeness, checksum and finiteness; return the float32 tensor."""
        self._finished = True
        header, spec, buffer = self._header, self._spec, self._buffer
        if header is None or spec is None or buffer is None:
            raise WireError(WireErrorKind.MISSING_HEADER, "stream ended before any VectorHeader arrived")
        if self._received_bytes != self._total_bytes:
            raise WireError(
                WireErrorKind.LENGTH,
                f"stream ended after {self._received_bytes} of {self._total_bytes} payload bytes "
                f"({header.element_count} x {spec.name})",
            )
        if self._crc != header.checksum:
            raise WireError(
                WireErrorKind.CHECKSUM,
                f"checksum mismatch: header says crc32={header.checksum:#010x}, "
                f"payload has crc32={self._crc:#010x}",
            )
        if self._compressed:
            try:
                vector = codecs.decode_dense(header.dtype, header.element_count, header.edge, buffer)
            except codecs.CodecError as error:
                raise WireError(
                    WireErrorKind.COMPRESSION, f"compressed {spec.name} payload: {error}"
                ) from None
        elif self._coded:
            vector = self._inflated(header, buffer)
        else:
            vector = self._widened(buffer.view(spec.torch_dtype))
            if self._expected.named:
                vector = vector.reshape(tuple(header.shape))
        vector = vector.to(self._expected.device)
        # Release our references so the decoded tensor is the only owner of the memory.
        self._buffer = None
        self._buffer_view = None
        self._values = None
        return DecodedVector(
            sender_id=header.sender_id,
            iteration=header.iteration,
            round=header.round,
            membership_epoch=header.membership_epoch,
            wire_dtype=spec.name,
            vector=vector,
            name=header.name,
            edge=header.edge if header.HasField("edge") else None,
            keep_reference=header.keep_reference,
        )

    def _widened(self, wire_tensor: torch.Tensor) -> torch.Tensor:
        """The float32 vector of a plain payload, checked finite (the chunk sums settle most of it)."""
        # The buffer is private to this stream, so the wire tensor can alias it without a copy.
        if wire_tensor.dtype == torch.float32:
            vector = wire_tensor
        else:
            # Widened into recycled memory too: a fresh float32 tensor would page-fault like the buffer.
            vector = RECEIVE_BUFFERS.take(wire_tensor.numel() * 4).view(torch.float32)
            vector.copy_(wire_tensor)
        if not self._sums_finite:
            _require_finite(vector)
        return vector

    def _inflated(self, header: pb.VectorHeader, buffer: torch.Tensor) -> torch.Tensor:
        """The float32 vector of a float32-huffman or float32-delta payload, checked finite."""
        count, coded = header.element_count, header.coded_bytes
        try:
            # Into recycled memory, as _widened does: a fresh tensor would page-fault on every push.
            out = RECEIVE_BUFFERS.take(4 * count)
            if self._reference is not None:
                vector = delta_coding.decode(buffer, count, coded, self._reference, out)
            else:
                vector = exponent_coding.decode(buffer, count, coded, out)
        except codecs.CodecError as error:
            raise WireError(
                WireErrorKind.COMPRESSION, f"{header_dtype_name(header)} payload: {error}"
            ) from None
        _require_finite(vector)
        return vector

    def release(self) -> None:
        """Drop the receive buffer of an unfinished stream now (an aborted push or state download).

        The memory goes back to the pool at once instead of whenever the assembler itself is garbage
        collected (an exception traceback can keep it reachable for a while). The assembler cannot be
        used afterwards. Harmless after finish(), which already handed the buffer to the decoded tensor.
        """
        self._finished = True
        self._buffer = None
        self._buffer_view = None
        self._values = None

    def _accept_header(self, header: pb.VectorHeader) -> None:
        expected = self._expected
        spec = _WIRE_DTYPES_BY_PROTO.get(header.dtype)
        if codecs.is_compressed(header.dtype) or header.HasField("edge"):
            spec = self._edge_spec(header, spec)
        if spec is None:
            raise WireError(
                WireErrorKind.BAD_DTYPE,
                f"unknown or unset wire dtype enum value {header.dtype}; "
                f"expected one of {', '.join(WIRE_DTYPE_NAMES)}",
            )
        if spec.name not in expected.allowed_dtypes:
            raise WireError(
                WireErrorKind.BAD_DTYPE,
                f"wire dtype {spec.name} not accepted here; "
                f"allowed: {', '.join(sorted(expected.allowed_dtypes))}",
            )
        try:
            validate_chunk_bytes(header.chunk_bytes)
        except ValueError as error:
            raise WireError(WireErrorKind.BAD_CHUNK_SIZE, f"header {error}") from None
        if expected.sender_id is not None and header.sender_id != expected.sender_id:
            raise WireError(
                WireErrorKind.SENDER_MISMATCH,
                f"header sender_id {header.sender_id!r} differs from expected {expected.sender_id!r}",
            )
        if expected.membership_epoch is not None and header.membership_epoch != expected.membership_epoch:
            raise WireError(
                WireErrorKind.EPOCH_MISMATCH,
                f"membership_epoch {header.membership_epoch} differs from the handshaken "
                f"epoch {expected.membership_epoch}",
            )
        self._check_position(Position(header.iteration, header.round))
        self._check_count_and_shape(header, spec)
        if expected.gossip is not None:
            edge = header.edge if header.HasField("edge") else None
            refusal = expected.gossip.refusal(header.dtype, edge, header.element_count)
            if refusal is not None:
                raise WireError(WireErrorKind.COMPRESSION, refusal)
            if edge is None and (refusal := expected.gossip.plain_refusal(spec.name)) is not None:
                raise WireError(WireErrorKind.BAD_DTYPE, refusal)

        self._header = header
        self._spec = spec
        self._total_bytes = header.element_count * spec.element_bytes
        self._coded = spec.name in _CODED
        if self._coded:
            coding = _CODED[spec.name]
            count, coded = header.element_count, header.coded_bytes
            if not 0 < coded <= coding.max_coded_bytes(count):
                raise WireError(
                    WireErrorKind.COMPRESSION,
                    f"{spec.name} header: coded_bytes {coded} is outside "
                    f"[1, {coding.max_coded_bytes(count)}] for {count} elements",
                )
            self._total_bytes = coding.payload_bytes(count, coded)
        elif header.coded_bytes:
            raise WireError(
                WireErrorKind.BAD_DTYPE,
                f"coded_bytes {header.coded_bytes} is set on a {spec.name} payload; only "
                f"{' and '.join(_CODED)} carry it",
            )
        self._check_reference(header, spec)
        if self._compressed:
            try:
                self._total_bytes = codecs.payload_bytes(header.dtype, header.element_count, header.edge)
            except codecs.CodecError as error:
                raise WireError(
                    WireErrorKind.COMPRESSION, f"compressed {spec.name} header: {error}"
                ) from None
        # One buffer for the whole payload (recycled memory when available): chunks are copied
        # straight into place.
        self._buffer = RECEIVE_BUFFERS.take(self._total_bytes)
        self._buffer_view = memoryview(self._buffer.numpy()).cast("B")
        plain = not (self._compressed or self._coded)
        self._values = self._buffer.view(spec.torch_dtype) if plain else None

    def _check_reference(self, header: pb.VectorHeader, spec: _WireDtypeSpec) -> None:
        """A float32-delta push names a reference the receiver holds; the reference fields appear on
        nothing else, and keep_reference on float32 vectors only."""
        if header.keep_reference and header.HasField("edge"):
            raise WireError(
                WireErrorKind.BAD_DTYPE,
                "keep_reference is set on a compressed-gossip message; only plain float32 vectors carry it",
            )
        if header.keep_reference and spec.torch_dtype != torch.float32:
            raise WireError(
                WireErrorKind.BAD_DTYPE,
                f"keep_reference is set on a {spec.name} payload; only float32 carries it",
            )
        if spec.name != "float32-delta":
            if header.HasField("reference"):
                raise WireError(
                    WireErrorKind.BAD_DTYPE,
                    f"a reference is named on a {spec.name} payload; only float32-delta carries one",
                )
            return
        if not header.HasField("reference"):
            raise WireError(WireErrorKind.BAD_DTYPE, "a float32-delta header names no reference")
        references = self._expected.references
        if references is None:
            raise WireError(
                WireErrorKind.REFERENCE_MISSING, "float32-delta is not accepted here: no references are kept"
            )
        try:
            held = references.find(header.sender_id, header.reference, header.element_count)
        except ReferenceMissing as missing:
            raise WireError(WireErrorKind.REFERENCE_MISSING, str(missing)) from None
        self._reference = held.vector

    def _edge_spec(self, header: pb.VectorHeader, spec: _WireDtypeSpec | None) -> _WireDtypeSpec:
        """The dtype spec of a compressed-gossip push (``header.edge`` set): a compressed dtype, or
        float32 for a reset; anything else is refused."""
        if not header.HasField("edge"):
            raise WireError(
                WireErrorKind.COMPRESSION, f"compressed dtype {header.dtype} without an edge header"
            )
        if spec is not None:
            if spec.name != "float32" or not header.edge.reset:
                raise WireError(
                    WireErrorKind.COMPRESSION,
                    f"an edge header on a {spec.name} payload must be a reset of a float32 vector",
                )
            return spec
        kind = next(k for k, v in codecs.COMPRESSED_DTYPES.items() if v == header.dtype)
        self._compressed = True
        return _WireDtypeSpec(kind, header.dtype, torch.uint8, 1)  # type: ignore[arg-type]

    def _check_position(self, position: Position) -> None:
        expected = self._expected
        if expected.rounds_per_iteration is not None and position.round >= expected.rounds_per_iteration:
            raise WireError(
                WireErrorKind.BAD_ROUND,
                f"round {position.round} is out of range: "
                f"rounds_per_iteration={expected.rounds_per_iteration}",
            )
        if expected.earliest is not None and position < expected.earliest:
            raise WireError(
                WireErrorKind.STALE,
                f"position (iteration {position.iteration}, round {position.round}) is stale; "
                f"receiver is at (iteration {expected.earliest.iteration}, round {expected.earliest.round})",
            )
        if expected.latest is not None and position > expected.latest:
            raise WireError(
                WireErrorKind.TOO_FAR_AHEAD,
                f"position (iteration {position.iteration}, round {position.round}) is too far ahead; "
                f"receiver accepts up to "
                f"(iteration {expected.latest.iteration}, round {expected.latest.round})",
            )

    def _check_count_and_shape(self, header: pb.VectorHeader, spec: _WireDtypeSpec) -> None:
        expected = self._expected
        count = header.element_count
        if expected.element_count is not None and count != expected.element_count:
            raise WireError(
                WireErrorKind.ELEMENT_COUNT,
                f"element_count {count} differs from the receiver's vector length {expected.element_count}",
            )
        if expected.max_payload_bytes is not None and count * spec.element_bytes > expected.max_payload_bytes:
            raise WireError(
                WireErrorKind.TOO_LARGE,
                f"tensor of {count} x {spec.name} ({count * spec.element_bytes} bytes) exceeds the "
                f"{expected.max_payload_bytes}-byte limit",
            )
        if expected.named:
            if not header.name:
                raise WireError(WireErrorKind.BAD_NAME, "state tensor header carries no name")
            if math.prod(header.shape) != count:
                raise WireError(
                    WireErrorKind.BAD_SHAPE,
                    f"tensor {header.name!r}: shape {list(header.shape)} holds {math.prod(header.shape)} "
                    f"elements but element_count is {count}",
                )
        elif header.name or len(header.shape) > 0:
            raise WireError(
                WireErrorKind.BAD_SHAPE,
                "a pushed vector must be flat and unnamed, but the header carries "
                f"name={header.name!r} shape={list(header.shape)}",
            )

    def slot(self) -> memoryview:
        """Where the next chunk's payload bytes go: a view of the receive buffer, ``chunk_bytes`` long
        (less for the last chunk; empty once the payload is complete). A reader fills it and then
        ``add(PayloadInPlace(len(slot)))``: the payload is checked there without another copy."""
        header, view = self._header, self._buffer_view
        if self._finished or header is None or view is None:
            raise RuntimeError("VectorAssembler.slot() needs an accepted header and an unfinished stream")
        start = self._received_bytes
        return view[start : start + min(header.chunk_bytes, self._total_bytes - start)]

    def _accept_in_place(self, nbytes: int) -> None:
        if self._header is None:
            raise WireError(WireErrorKind.MISSING_HEADER, "payload bytes arrived before any VectorHeader")
        expected = len(self.slot())
        if nbytes != expected or nbytes == 0:
            raise WireError(
                WireErrorKind.BAD_CHUNK_SIZE,
                f"chunk {self._chunks_seen} carries {nbytes} bytes; expected {expected}",
            )
        self._account(nbytes)

    def _append(self, data: memoryview | bytes) -> None:
        header = self._header
        view = self._buffer_view
        assert header is not None and view is not None  # set by _accept_header before any append
        remaining = self._total_bytes - self._received_bytes
        if len(data) > remaining:
            raise WireError(
                WireErrorKind.LENGTH,
                f"chunk {self._chunks_seen} carries {len(data)} bytes but only {remaining} of the "
                f"announced {self._total_bytes} payload bytes remain (extra data)",
            )
        # Every chunk but the last is exactly chunk_bytes: a peer cannot flood us with tiny messages.
        expected_size = min(header.chunk_bytes, remaining)
        if len(data) != expected_size:
            raise WireError(
                WireErrorKind.BAD_CHUNK_SIZE,
                f"chunk {self._chunks_seen} carries {len(data)} bytes; expected {expected_size} "
                f"(chunk_bytes={header.chunk_bytes}, {remaining} bytes remaining)",
            )
        start = self._received_bytes
        view[start : start + len(data)] = data
        self._account(len(data))

    def _account(self, nbytes: int) -> None:
        """The CRC and the finite check of the ``nbytes`` just written at the receive position."""
        view = self._buffer_view
        assert view is not None
        start = self._received_bytes
        self._crc = payload_crc32(view[start : start + nbytes], self._crc)
        self._received_bytes += nbytes
        if self._sums_finite and self._values is not None:
            # Only whole elements: chunk_bytes need not be a multiple of the element size.
            end = self._received_bytes // self._values.element_size()
            if end > self._checked_elements:
                partial = self._values[self._checked_elements : end].sum(dtype=torch.float32)
                self._sums_finite = math.isfinite(float(partial))
                self._checked_elements = end


# The coded float32 dtypes: their payload layouts (both end in a zlib stream of coded_bytes bytes).
_CODED: Final = {"float32-huffman": exponent_coding, "float32-delta": delta_coding}


def header_dtype_name(header: pb.VectorHeader) -> str:
    spec = _WIRE_DTYPES_BY_PROTO.get(header.dtype)
    return spec.name if spec is not None else f"dtype {header.dtype}"


def _require_finite(vector: torch.Tensor) -> None:
    if not all_finite(vector):
        non_finite = int((~torch.isfinite(vector)).sum())
        raise WireError(
            WireErrorKind.NON_FINITE,
            f"vector contains {non_finite} non-finite value(s) (NaN or inf)",
        )


def decode_vector(chunks: Iterable[pb.VectorChunk | RawChunk], expected: ExpectedVector) -> DecodedVector:
    """Validate and reassemble a complete chunk stream (convenience around VectorAssembler)."""
    assembler = VectorAssembler(expected)
    for chunk in chunks:
        assembler.add(chunk)
    return assembler.finish()


__all__ = [
    "WIRE_DTYPE_NAMES",
    "DecodedVector",
    "ExpectedVector",
    "PayloadInPlace",
    "Position",
    "RawChunk",
    "VectorAssembler",
    "WireDtypeName",
    "WireError",
    "WireErrorKind",
    "WireVector",
    "all_finite",
    "decode_vector",
    "encode_vector",
    "header_dtype_name",
    "header_message",
    "iter_chunks",
    "iter_frames",
    "parse_chunk",
    "payload_crc32",
    "prepare_edge_message",
    "prepare_vector",
    "split_chunk",
]
