"""Reference vectors of ``float32-delta`` (``agent.transport.delta_coding``): per edge, the last vector the
sender pushed with ``keep_reference`` and the receiver delivered.

Both ends keep one: the sender the vector it pushed to each neighbour (once the neighbour acknowledged
it), the receiver the vector it delivered from each sender. A delta push names its reference by position
and CRC-32; the receiver decodes it only against a reference that matches both, and otherwise refuses
the push (``PUSH_STATUS_REFERENCE_MISSING``), after which the sender drops its own and sends the vector
itself. So a restart at either end, a push whose acknowledgement was lost, or a delivered push the sender
counted as failed costs one vector sent twice, never a wrong vector.

Memory: one vector per edge that uses the coding (the sender's references share one copy per round).
Not thread-safe: the event loop's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from agent.transport._generated.dpgan.v1 import dpgan_pb2 as pb
from agent.transport.wire_vectors import payload_crc32


def vector_checksum(vector: torch.Tensor) -> int:
    """CRC-32 (the payload checksum's) of a flat float32 CPU tensor's little-endian bytes."""
    return payload_crc32(memoryview(vector.contiguous().view(torch.uint8).numpy()))


@dataclass(frozen=True, slots=True)
class Reference:
    """A vector kept as a reference: flat float32 on the CPU, never modified after it is kept."""

    iteration: int
    round: int
    vector: torch.Tensor
    checksum: int

    def header(self) -> pb.DeltaReference:
        return pb.DeltaReference(iteration=self.iteration, round=self.round, checksum=self.checksum)

    def describe(self) -> str:
        return f"(iteration {self.iteration}, round {self.round}, crc32 {self.checksum:#010x})"

    @classmethod
    def of(cls, iteration: int, round_: int, vector: torch.Tensor, copy: bool = True) -> Reference:
        """A reference holding ``vector`` (flattened to CPU float32; copied unless ``copy`` is False and the
        caller guarantees the tensor is never modified)."""
        flat = vector.detach().to(device="cpu", dtype=torch.float32).reshape(-1).contiguous()
        if copy:
            flat = flat.clone()
        return cls(iteration, round_, flat, vector_checksum(flat))


class ReferenceMissing(LookupError):
    """A delta push names a reference this end does not hold; the message says what it holds."""


class References:
    """One reference per peer (node id)."""

    def __init__(self) -> None:
        self._by_peer: dict[str, Reference] = {}

    def __len__(self) -> int:
        return len(self._by_peer)

    @property
    def bytes_held(self) -> int:
        """Bytes of the distinct vectors held (shared ones counted once)."""
        # A copy of the values first: the metrics endpoint reads this from its own thread.
        distinct = {id(r.vector): r.vector for r in list(self._by_peer.values())}
        return sum(v.numel() * 4 for v in distinct.values())

    def get(self, peer: str) -> Reference | None:
        return self._by_peer.get(peer)

    def keep(self, peer: str, reference: Reference) -> None:
        self._by_peer[peer] = reference

    def drop(self, peer: str) -> None:
        self._by_peer.pop(peer, None)

    def clear(self) -> None:
        self._by_peer.clear()

    def retain(self, peers: set[str]) -> None:
        """Drop the references of every peer not in ``peers`` (members that left the view)."""
        for peer in [p for p in self._by_peer if p not in peers]:
            del self._by_peer[peer]

    def find(self, peer: str, wanted: pb.DeltaReference, element_count: int) -> Reference:
        """The reference ``wanted`` names for ``peer``'s push; ReferenceMissing (naming what is held) when
        this end holds none, another one, or one of another length."""
        held = self._by_peer.get(peer)
        asked = f"(iteration {wanted.iteration}, round {wanted.round}, crc32 {wanted.checksum:#010x})"
        if held is None:
            raise ReferenceMissing(
                f"the push is coded against {asked}, and no reference is held for {peer!r}"
            )
        if (held.iteration, held.round, held.checksum) != (wanted.iteration, wanted.round, wanted.checksum):
            raise ReferenceMissing(
                f"the push is coded against {asked}, but the reference held for {peer!r} is {held.describe()}"
            )
        if held.vector.numel() != element_count:
            raise ReferenceMissing(
                f"the reference held for {peer!r} has {held.vector.numel()} elements, "
                f"the push {element_count}"
            )
        return held


__all__ = ["Reference", "ReferenceMissing", "References", "vector_checksum"]
