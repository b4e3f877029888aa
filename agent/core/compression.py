"""Compression operators for compressed gossip (CHOCO-Gossip, Koloskova, Stich, Jaggi, ICML 2019).

A compressor Q maps a float32 vector v of length d to a few bytes; ``decompress(compress(v))`` is the
vector the receiver reconstructs. CHOCO's analysis needs Q to be *contractive*:
E‖Q(v) − v‖² ≤ (1 − δ)‖v‖² for some δ ∈ (0, 1] (Koloskova et al. 2019, Assumption 1):

* ``int8``: blocks of ``block`` elements share one float32 scale s = max|v_b| / 127; every element is
  sent as round(v/s) ∈ [−127, 127] (round half to even). Error ≤ s/2 per element; ~1.02 bytes per element.
* ``topk``: the k = ⌈ratio·d⌉ entries of largest magnitude, as (int32 index, float32 value) pairs
  (δ ≥ k/d). Ties are broken by ``torch.topk``; indices travel sorted ascending.
* ``randk``: k entries at indices drawn from a seed that travels with the message
  (``randk_indices``); values only (δ = k/d in expectation). Not rescaled by d/k: CHOCO uses the
  biased, contractive form.

Every function is deterministic: the same input gives the same bits in the simulator and in every agent
(``agent.core.choco``). Pure torch; no I/O. The byte layout on the wire lives in
``agent.transport.codecs``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

import torch

COMPRESSORS: Final = ("int8", "topk", "randk")
INT8_BLOCK: Final = 256  # elements per int8 scale: 4 bytes of scale per 256 bytes of values (1.6 %)
INT8_LEVELS: Final = 127
DEFAULT_RATIO: Final = 0.01  # topk/randk: the configuration key compression_ratio's default


class CompressionError(ValueError):
    """A compressor setting is invalid, or a compressed message does not fit its vector."""


@dataclass(frozen=True)
class Compressor:
    """Which compression operator, and its parameter.

    ``ratio``: fraction of the d entries kept by ``topk``/``randk``, in (0, 1]; ignored by ``int8``.
    ``block``: elements per float32 scale of ``int8``.
    """

    kind: str
    ratio: float = DEFAULT_RATIO
    block: int = INT8_BLOCK

    def __post_init__(self) -> None:
        if self.kind not in COMPRESSORS:
            raise CompressionError(
                f"unknown compression {self.kind!r}; choose one of {', '.join(COMPRESSORS)}"
            )
        if not 0.0 < self.ratio <= 1.0:
            raise CompressionError(f"compression_ratio must be in (0, 1], got {self.ratio!r}")
        if self.block < 1:
            raise CompressionError(f"int8 block must be positive, got {self.block}")

    def kept(self, length: int) -> int:
        """Entries ``topk``/``randk`` keep of a vector of ``length``: ⌈ratio·d⌉, at least 1, at most d."""
        return max(1, min(length, math.ceil(self.ratio * length)))

    def payload_bytes(self, length: int) -> int:
        """Bytes one compressed difference of a ``length``-element vector takes on the wire."""
        if self.kind == "int8":
            return length + 4 * math.ceil(length / self.block)
        if self.kind == "topk":
            return 8 * self.kept(length)
        return 4 * self.kept(length)


@dataclass(frozen=True, eq=False)
class Compressed:
    """One compressed vector.

    int8: ``values`` int8 (d,), ``scales`` float32 (⌈d/block⌉,). topk: ``indices`` int64 (k,) sorted
    ascending, ``values`` float32 (k,). randk: ``values`` float32 (k,), ``seed`` (indices from
    ``randk_indices(length, k, seed)``).
    """

    kind: str
    length: int
    values: torch.Tensor
    scales: torch.Tensor | None = None
    indices: torch.Tensor | None = None
    seed: int = 0
    block: int = INT8_BLOCK


def randk_indices(length: int, kept: int, seed: int) -> torch.Tensor:
    """``kept`` distinct indices of ``range(length)``, sorted ascending, drawn from ``seed`` (CPU, int64).

    Raises CompressionError for a ``kept`` outside [1, length] or a seed outside [0, 2^63)."""
    if not 1 <= kept <= length:
        raise CompressionError(f"randk keeps {kept} of {length} entries; must be in [1, {length}]")
    if not 0 <= seed < 2**63:
        raise CompressionError(f"randk seed {seed} is outside [0, 2^63)")
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(length, generator=generator)[:kept]
    return chosen.sort().values


def compress(vector: torch.Tensor, compressor: Compressor, seed: int = 0) -> Compressed:
    """Q(vector) for a flat float32 ``vector`` (any device; the result lives on the CPU).

    ``seed`` picks ``randk``'s indices (both ends derive them from it); other kinds ignore it."""
    return compress_with_dense(vector, compressor, seed)[0]


def compress_with_dense(
    vector: torch.Tensor, compressor: Compressor, seed: int = 0
) -> tuple[Compressed, torch.Tensor]:
    """(Q(vector), decompress(Q(vector))) in one pass: the sender of a compressed difference needs both
    (its copy of what the receiver holds advances by the dense form). Bit-identical to calling
    ``compress`` then ``decompress``; the dense vector is float32 (d,) on the CPU."""
    if vector.dim() != 1 or vector.dtype != torch.float32:
        raise CompressionError(
            f"compress takes a flat float32 vector, got {vector.dtype} {tuple(vector.shape)}"
        )
    flat = vector.detach().to("cpu")
    length = flat.numel()
    if compressor.kind == "int8":
        return _int8(flat, compressor.block)
    kept = compressor.kept(length)
    if compressor.kind == "topk":
        indices = torch.topk(flat.abs(), kept, sorted=False).indices.sort().values
        message = Compressed("topk", length, flat[indices].clone(), indices=indices)
    else:
        indices = randk_indices(length, kept, seed)
        message = Compressed("randk", length, flat[indices].clone(), seed=seed)
    return message, _scattered(length, indices, message.values)


def _scattered(length: int, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Dense float32 (length,): ``values`` at ``indices``, zero elsewhere (top-k and random-k)."""
    dense = torch.zeros(length, dtype=torch.float32)
    dense[indices] = values
    return dense


def _int8(flat: torch.Tensor, block: int) -> tuple[Compressed, torch.Tensor]:
    """int8 blocks of ``flat``: the whole blocks as one (blocks, block) view, the short last block apart
    (no padded copy of the vector). Levels are round(v / s), s = max|v_b| / 127 (s = 0: levels 0)."""
    length = flat.numel()
    whole = length // block
    parts = [flat[: whole * block].view(whole, block)] if whole else []
    if length > whole * block:
        parts.append(flat[whole * block :].view(1, -1))
    values = torch.empty(length, dtype=torch.int8)
    dense = torch.empty(length, dtype=torch.float32)
    scales = []
    start = 0
    for shaped in parts:
        size = shaped.numel()
        scale = shaped.abs().amax(dim=1).div_(INT8_LEVELS)
        divisor = torch.where(scale > 0, scale, torch.ones_like(scale))
        levels = torch.div(shaped, divisor[:, None]).round_().clamp_(-INT8_LEVELS, INT8_LEVELS)
        values[start : start + size].copy_(levels.view(-1))
        torch.mul(levels, scale[:, None], out=dense[start : start + size].view_as(levels))
        scales.append(scale)
        start += size
    joined = scales[0] if len(scales) == 1 else torch.cat(scales)
    return Compressed("int8", length, values, scales=joined, block=block), dense


def decompress(message: Compressed) -> torch.Tensor:
    """The dense float32 (d,) vector a compressed message stands for (CPU)."""
    length = message.length
    if message.kind == "int8":
        assert message.scales is not None
        block = message.block
        whole = length // block
        dense = torch.empty(length, dtype=torch.float32)
        if whole:
            torch.mul(
                message.values[: whole * block].view(whole, block).to(torch.float32),
                message.scales[:whole, None],
                out=dense[: whole * block].view(whole, block),
            )
        if length > whole * block:
            dense[whole * block :] = message.values[whole * block :].to(torch.float32) * message.scales[whole]
        return dense
    if message.kind == "topk":
        assert message.indices is not None
        return _scattered(length, message.indices, message.values)
    return _scattered(length, randk_indices(length, message.values.numel(), message.seed), message.values)


def randk_seed(seed: int, round_index: int, sender: int) -> int:
    """The randk seed of ``sender``'s message in global gossip round ``round_index`` of a run seeded
    ``seed`` (any value works for correctness: it travels with the message)."""
    return (seed * 1_000_003 + round_index * 65_537 + sender) % (2**63)
