"""Gossip mixing: the weighted sum every node computes each round, in one canonical order.

The in-process simulator mixes all nodes at once and a networked agent mixes one row from the vectors
its neighbours sent. Both must produce the same bits, so both reduce to the same sequence of float32
operations: ``acc = x_{j0} * w_{j0}``, then ``acc = acc + x_j * w_j`` for the remaining members of the
row in ascending node order. Elementwise multiply and add round identically whether one row or a
batch of rows is computed, which is what makes the vectorized simulator and the agent agree bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

Row = Sequence[tuple[int, float]]


class MixingError(ValueError):
    """A mixing row cannot be applied (missing vectors, bad weights)."""


def _weight(value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # Weights are rounded to the state dtype once, here, so every caller multiplies by the same number.
    return torch.tensor(
        float(np.float32(value)) if dtype == torch.float32 else value, dtype=dtype, device=device
    )


def mix_row(row: Row, vectors: Mapping[int, torch.Tensor]) -> torch.Tensor:
    """Weighted sum of ``vectors`` over ``row`` (pairs of node index and weight) in ascending node order."""
    if not row:
        raise MixingError("mixing row is empty")
    ordered = sorted(row)
    missing = [j for j, _ in ordered if j not in vectors]
    if missing:
        raise MixingError(f"mixing row needs vectors of nodes {missing}, which are absent")
    first_index, first_weight = ordered[0]
    first = vectors[first_index]
    acc = first * _weight(first_weight, first.dtype, first.device)
    for j, w in ordered[1:]:
        x = vectors[j]
        acc = acc + x * _weight(w, x.dtype, x.device)
    return acc


def mix_all(states: torch.Tensor, rows: Sequence[Row], wire: torch.dtype | None = None) -> torch.Tensor:
    """Mix every node at once: ``states`` is (n, d); ``rows[i]`` is node i's row. Same bits as ``mix_row``.

    ``wire``: the dtype vectors travel in (``wire_dtype`` bfloat16 or float16). An agent mixes its own
    vector as it holds it and its neighbours' as they arrived, rounded to ``wire`` and widened back
    (``agent.transport.frames``); with ``wire`` given, node i's row does the same: its own entry takes
    ``states[i]``, every other entry ``states[j]`` rounded. None (float32 on the wire): no rounding.

    Rows are padded to a common length with zero weights at their end; adding ``0 * x`` leaves a
    finite accumulator unchanged, so padding does not alter the result.
    """
    n = states.shape[0]
    if len(rows) != n:
        raise MixingError(f"{len(rows)} mixing rows for {n} node states")
    ordered_rows = [sorted(row) for row in rows]
    width = max(len(row) for row in ordered_rows)
    index = np.zeros((n, width), dtype=np.int64)
    weight = np.zeros((n, width), dtype=np.float64)
    for i, row in enumerate(ordered_rows):
        if not row:
            raise MixingError(f"mixing row of node {i} is empty")
        for slot, (j, w) in enumerate(row):
            if not 0 <= j < n:
                raise MixingError(f"mixing row of node {i} names node {j}, outside 0..{n - 1}")
            # With a wire dtype, rows n..2n-1 of the source hold the rounded vectors.
            index[i, slot] = j if wire is None or j == i else n + j
            weight[i, slot] = w
    dtype, device = states.dtype, states.device
    source = states if wire is None else torch.cat([states, wire_rounded(states, wire)])
    weight_np = weight.astype(np.float32) if dtype == torch.float32 else weight
    index_t = torch.from_numpy(index).to(device)
    weight_t = torch.from_numpy(weight_np).to(device=device, dtype=dtype)
    acc = source[index_t[:, 0]] * weight_t[:, 0:1]
    for slot in range(1, width):
        acc = acc + source[index_t[:, slot]] * weight_t[:, slot : slot + 1]
    return acc


def wire_rounded(vectors: torch.Tensor, wire: torch.dtype) -> torch.Tensor:
    """``vectors`` as a neighbour receives them: rounded to the wire dtype (round to nearest even, as the
    sender's conversion does) and widened back to their own dtype, exactly (the receiver's widening)."""
    return vectors.to(wire).to(vectors.dtype)


def renormalized_row(row: Row, present: set[int]) -> tuple[tuple[int, float], ...]:
    """Drop the members of ``row`` that did not deliver and rescale the rest so the row sums to 1.

    Used when a neighbour misses a round deadline. The node's own entry is always present.
    """
    kept = [(j, w) for j, w in sorted(row) if j in present]
    total = sum(w for _, w in kept)
    if not kept or total <= 0.0:
        raise MixingError(
            f"no positive weight left in mixing row after dropping absent nodes (present={present})"
        )
    return tuple((j, w / total) for j, w in kept)


def row_for_round(
    row: Row, own_index: int, arrived_epochs: dict[int, int], epoch: int
) -> tuple[tuple[tuple[int, float], ...], list[int], list[int]]:
    """The row a node actually mixes with in one round, under the view-epoch rule.

    ``arrived_epochs`` maps each neighbour whose vector arrived to the epoch it was mixed under. Only
    neighbours of the node's own ``epoch`` are mixed; the row is renormalised over them and the node
    itself, so it still sums to 1 and every mixed vector stays a convex combination of vectors of one
    view. Returns the row, the neighbours that did not deliver, and those holding another view.
    """
    members = [j for j, _ in row if j != own_index]
    missing = [j for j in members if j not in arrived_epochs]
    other_view = [j for j in members if j in arrived_epochs and arrived_epochs[j] != epoch]
    present = {own_index} | {j for j in members if arrived_epochs.get(j) == epoch}
    if len(present) == len(row):
        return tuple(sorted(row)), missing, other_view
    return renormalized_row(row, present), missing, other_view
