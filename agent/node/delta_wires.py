"""The sender's side of the float32 wires: which bytes each neighbour of a round gets.

``wire_dtype`` float32 and float32-huffman send one wire to every neighbour. float32-delta (and
float32-auto while it codes) codes the vector per edge, against the last vector that neighbour accepted
(``agent.transport.delta_coding``, ``agent.transport.references``); a neighbour without one gets the
exponent-coded vector, and every coded vector asks its receiver to keep it as the next reference. A
neighbour that refuses a delta push (it lost the reference: a restart, a push it did not deliver) gets the
exponent-coded vector at once (``fallback``). All of them are float32's bits: the run is the same.
"""

from __future__ import annotations

import torch

from agent.transport.frames import WireVector, prepare_vector
from agent.transport.references import Reference, References


class RoundWires:
    """One round's wires: ``wires[node_id]`` for each neighbour, and ``fallback`` for a neighbour that
    refused its delta push. Prepare with ``DeltaWires.prepare`` (in the compute thread: coding costs
    milliseconds per MB)."""

    def __init__(self, x: torch.Tensor, position: tuple[int, int], keep: bool) -> None:
        self.x = x
        self.position = position
        self.keep = keep
        self.wires: dict[str, WireVector] = {}
        self._shared: WireVector | None = None
        self._reference: Reference | None = None

    def shared(self, wire_dtype: str) -> WireVector:
        """The wire every neighbour without its own gets (prepared once)."""
        if self._shared is None:
            self._shared = prepare_vector(self.x, wire_dtype, keep_reference=self.keep)
        return self._shared

    def fallback(self) -> WireVector:
        """The vector without a reference: exponent-coded (or plain when that does not pay)."""
        return self.shared("float32-huffman")

    def reference(self) -> Reference:
        """This round's vector as a reference (copied once, shared by the neighbours that accept it)."""
        if self._reference is None:
            self._reference = Reference.of(*self.position, self.x)
        return self._reference

    def coded(self) -> list[WireVector]:
        """The distinct coded wires prepared (for the coding-cost measurements)."""
        distinct = {id(w): w for w in self.wires.values() if w.coding_seconds > 0}
        return list(distinct.values())


class DeltaWires:
    """Per neighbour, the reference of its next float32-delta push: the last vector it accepted."""

    def __init__(self) -> None:
        self.references = References()

    def prepare(
        self, x: torch.Tensor, neighbours: list[str], position: tuple[int, int], wire_dtype: str
    ) -> RoundWires:
        """The round's wires for ``x`` (flat float32) at ``position`` (iteration, round). ``wire_dtype``:
        float32, bfloat16, float16 or float32-huffman send one wire to all (and the references are
        dropped: nothing codes against them); float32-delta codes per neighbour."""
        delta = wire_dtype == "float32-delta"
        prepared = RoundWires(x, position, keep=delta)
        if not delta:
            self.references.clear()
            prepared.wires = dict.fromkeys(neighbours, prepared.shared(wire_dtype))
            return prepared
        for node_id in neighbours:
            reference = self.references.get(node_id)
            if reference is None:
                prepared.wires[node_id] = prepared.fallback()
            else:
                prepared.wires[node_id] = prepare_vector(x, "float32-delta", reference, keep_reference=True)
        return prepared

    def pushed(self, node_id: str, prepared: RoundWires, wire: WireVector, accepted: bool) -> None:
        """After the push of ``wire`` to ``node_id``: an accepted vector that asked to be kept is the
        neighbour's reference now; anything else leaves it none we can be sure of."""
        if accepted and wire.keep_reference:
            self.references.keep(node_id, prepared.reference())
        else:
            self.references.drop(node_id)

    def retain(self, members: set[str]) -> None:
        """Keep references only for these neighbours (the members of the current view)."""
        self.references.retain(members)


__all__ = ["DeltaWires", "RoundWires"]
