"""State transfer (FetchState): named float32 tensors and the position they are from, as frames."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from agent.transport._generated.dpgan.v1 import dpgan_pb2 as pb
from agent.transport.frames import (
    ExpectedVector,
    Position,
    RawChunk,
    VectorAssembler,
    WireError,
    WireErrorKind,
    iter_frames,
    prepare_vector,
    split_chunk,
)
from agent.transport.options import DEFAULT_CHUNK_BYTES, validate_chunk_bytes


@dataclass(frozen=True, slots=True)
class StateSnapshot:
    """Named float32 tensors (parameters, optimizer state) and the gossip position they are from.

    The position travels with the tensors because a late joiner must know where to resume.
    """

    iteration: int
    round: int
    tensors: Mapping[str, torch.Tensor]

    @property
    def position(self) -> Position:
        return Position(self.iteration, self.round)


class StateStreamDecoder:
    """Splits a FetchState response stream into named tensors and validates each one.

    A chunk with a header starts the next tensor. `requested` (if non-empty) must be matched exactly:
    a missing, unrequested or repeated name is a WireError. `max_total_bytes` bounds memory across
    all tensors, so a peer cannot make us allocate without limit.
    """

    def __init__(
        self,
        *,
        requested: Sequence[str],
        max_total_bytes: int,
        expected_sender: str | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self._requested = frozenset(requested)
        self._remaining_bytes = max_total_bytes
        self._expected_sender = expected_sender
        self._device = device
        self._tensors: dict[str, torch.Tensor] = {}
        self._position: Position | None = None
        self._current: VectorAssembler | None = None

    def add(self, chunk: pb.VectorChunk | RawChunk) -> None:
        header, _ = split_chunk(chunk)
        if header is not None:
            self._finish_current()
            # Name checks run on the header, before any of the tensor's payload is buffered.
            name = header.name
            if name in self._tensors:
                raise WireError(WireErrorKind.BAD_NAME, f"state stream repeats tensor {name!r}")
            if self._requested and name not in self._requested:
                raise WireError(WireErrorKind.BAD_NAME, f"state stream carries unrequested tensor {name!r}")
            self._current = VectorAssembler(
                ExpectedVector(
                    element_count=None,
                    max_payload_bytes=self._remaining_bytes,
                    sender_id=self._expected_sender,
                    named=True,
                    allowed_dtypes=frozenset({"float32"}),
                    device=self._device,
                )
            )
        elif self._current is None:
            raise WireError(WireErrorKind.MISSING_HEADER, "state stream starts with a chunk without header")
        self._current.add(chunk)

    def finish(self) -> StateSnapshot:
        """Return the received tensors by name, with the position they are from."""
        self._finish_current()
        missing = self._requested - self._tensors.keys()
        if missing:
            raise WireError(
                WireErrorKind.BAD_NAME,
                f"state stream lacks requested tensor(s): {', '.join(sorted(missing))}",
            )
        if self._position is None:
            # Servers refuse to send an empty snapshot, so an empty stream means a broken peer.
            raise WireError(WireErrorKind.MISSING_HEADER, "state stream carried no tensors")
        return StateSnapshot(
            iteration=self._position.iteration, round=self._position.round, tensors=self._tensors
        )

    def release(self) -> None:
        """Drop the partial tensor and everything received so far (an aborted download)."""
        if self._current is not None:
            self._current.release()
            self._current = None
        self._tensors = {}

    def _finish_current(self) -> None:
        if self._current is None:
            return
        decoded = self._current.finish()
        self._current = None
        if self._position is None:
            self._position = decoded.position
        elif decoded.position != self._position:
            raise WireError(
                WireErrorKind.BAD_SHAPE,
                f"tensor {decoded.name!r} is from position {tuple(decoded.position)}, "
                f"the rest of the snapshot from {tuple(self._position)}",
            )
        self._remaining_bytes -= decoded.vector.numel() * 4
        self._tensors[decoded.name] = decoded.vector


def encode_state(
    tensors: Mapping[str, torch.Tensor],
    *,
    sender_id: str,
    iteration: int,
    round: int,
    epoch: int,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Iterator[bytes]:
    """Encode named float32 tensors (exact, shapes kept) as serialized FetchState response chunks.

    Names and dtypes are checked eagerly. Each tensor is converted and checksummed lazily, just
    before it is streamed; a non-finite tensor raises ValueError (naming it) at that point.
    """
    validate_chunk_bytes(chunk_bytes)
    for name, tensor in tensors.items():
        if not name:
            raise ValueError("state tensor names must be non-empty")
        if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.float32:
            described = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"state tensor {name!r} is {described}; only float32 tensors are transferable")
    return _state_chunks(tensors, sender_id, iteration, round, epoch, chunk_bytes)


def _state_chunks(
    tensors: Mapping[str, torch.Tensor],
    sender_id: str,
    iteration: int,
    round: int,
    epoch: int,
    chunk_bytes: int,
) -> Iterator[bytes]:
    for name, tensor in tensors.items():
        try:
            prepared = prepare_vector(tensor, "float32")
        except ValueError as error:
            raise ValueError(f"state tensor {name!r}: {error}") from None
        yield from iter_frames(
            prepared,
            sender_id=sender_id,
            iteration=iteration,
            round=round,
            epoch=epoch,
            chunk_bytes=chunk_bytes,
            name=name,
            include_shape=True,
        )
