"""In-process execution of n virtual nodes: the reference every networked run is checked against.

One iteration is exactly what each agent does over the network (see ``agent.core.algorithms``):
t gossip rounds of ``mix`` on x, then the local half-steps around one stochastic gradient per node.
With ``wire_dtype`` bfloat16 or float16 a round mixes, as an agent does, the node's own x as it is and
its neighbours' x rounded to that dtype (what arrives over the wire).
Gradients are evaluated node by node in ascending order, each node drawing from its own data stream,
so the random numbers a node consumes do not depend on how many nodes share the process.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from agent.core.algorithms import (
    AlgorithmName,
    GradientFn,
    Hyper,
    NodeState,
    advance,
    averages_gradients,
    check_algorithm,
    extrapolate,
    initial_state,
    mean_canonical,
    mixes,
    needs_initial_gradient,
)
from agent.core.choco import EdgeCopies, choco_round
from agent.core.compression import Compressor, randk_seed
from agent.core.config import COMPRESSED_GOSSIP_WIRES
from agent.core.mixing import MixingError, Row, mix_all, wire_rounded

RowsFn = Callable[[int], Sequence[Row]]  # global gossip round index -> one mixing row per node
BatchedGradientFn = Callable[[torch.Tensor], torch.Tensor]  # (n, d) points -> (n, d) gradients, row i = T_i

# ``wire_dtype`` (the configuration key) -> the dtype neighbours' vectors are rounded to; float32: none
# (the agents send float32 state exactly; float32-huffman and float32-delta code the same bits
# losslessly, float32-auto sends any of them).
WIRE_ROUNDING: dict[str, torch.dtype | None] = {
    "float32": None,
    "float32-huffman": None,
    "float32-delta": None,
    "float32-auto": None,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def wire_rounding(wire_dtype: str) -> torch.dtype | None:
    try:
        return WIRE_ROUNDING[wire_dtype]
    except KeyError:
        choices = ", ".join(WIRE_ROUNDING)
        raise ValueError(f"unknown wire_dtype {wire_dtype!r}; expected one of {choices}") from None


@dataclass(frozen=True)
class CompressedGossip:
    """Compressed gossip with error feedback (``agent.core.choco``): the compressor, the consensus step
    size γ and the run's seed (randk indices derive from it)."""

    compressor: Compressor
    gamma: float
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"consensus_step γ must be in (0, 1], got {self.gamma!r}")


class _ChocoState:
    """Every node's edge copies, and the rounds they are mixed with."""

    def __init__(self, settings: CompressedGossip, nodes: int) -> None:
        self.settings = settings
        self.copies = [EdgeCopies(settings.compressor) for _ in range(nodes)]

    def gossip(
        self, states: list[torch.Tensor], rows_at: RowsFn, first_round: int, rounds: int
    ) -> list[torch.Tensor]:
        for r in range(rounds):
            round_index = first_round + r
            seeds = [randk_seed(self.settings.seed, round_index, i) for i in range(len(states))]
            states = choco_round(states, rows_at(round_index), self.copies, self.settings.gamma, seeds)
        return states


def gossip(
    states: torch.Tensor, rows_at: RowsFn, first_round: int, rounds: int, wire: torch.dtype | None = None
) -> torch.Tensor:
    """``rounds`` successive mixing rounds of all nodes' x, rounds numbered from ``first_round``; with
    ``wire``, neighbours' vectors are rounded to it in every round (``mix_all``)."""
    mixed = states
    for r in range(rounds):
        mixed = mix_all(mixed, rows_at(first_round + r), wire)
    return mixed


class VirtualCluster:
    """n nodes stepping in lockstep in one process.

    ``gradient_fns[i]`` evaluates node i's stochastic operator T_i at a flat point (both players).
    ``wire_dtype``: the dtype x travels in between agents (see the module docstring).
    """

    def __init__(
        self,
        algorithm: str,
        x0: torch.Tensor,
        gradient_fns: Sequence[GradientFn],
        rows_at: RowsFn,
        rounds: int,
        hyper: Hyper,
        wire_dtype: str = "float32",
        compression: CompressedGossip | None = None,
        overlap: bool = False,
    ) -> None:
        self.algorithm: AlgorithmName = check_algorithm(algorithm)
        self.overlap = overlap
        self.wire = wire_rounding(wire_dtype)
        self.choco = _compressed(compression, wire_dtype, len(gradient_fns))
        if rounds < 1 and mixes(self.algorithm) and len(gradient_fns) > 1:
            raise ValueError(f"rounds must be at least 1 for {algorithm}, got {rounds}")
        if x0.dim() != 1:
            raise ValueError(f"x0 must be a flat vector, got shape {tuple(x0.shape)}")
        self.gradient_fns = list(gradient_fns)
        self.rows_at = rows_at
        self.rounds = rounds
        self.hyper = hyper
        self.iteration = 0
        initial = self._initial_gradients(x0)
        self.states = [initial_state(self.algorithm, x0, g) for g in initial]

    @property
    def n(self) -> int:
        return len(self.gradient_fns)

    def _initial_gradients(self, x0: torch.Tensor) -> list[torch.Tensor | None]:
        if not needs_initial_gradient(self.algorithm):
            return [None] * self.n
        gradients = [fn(x0) for fn in self.gradient_fns]
        if averages_gradients(self.algorithm):
            averaged = mean_canonical(gradients)
            return [averaged] * self.n
        return list(gradients)

    def stacked(self) -> torch.Tensor:
        return torch.stack([s.x for s in self.states])

    def mixed_points(self) -> list[torch.Tensor]:
        if not mixes(self.algorithm) or self.n == 1:
            return [s.x for s in self.states]
        first_round = self.iteration * self.rounds
        if self.choco is not None:
            return self.choco.gossip([s.x for s in self.states], self.rows_at, first_round, self.rounds)
        mixed = gossip(self.stacked(), self.rows_at, first_round, self.rounds, self.wire)
        return list(mixed.unbind(0))

    def step(self) -> None:
        if self.overlap:
            # The gradient at the node's own x (extrapolated), taken while its gossip rounds run.
            points = [extrapolate(self.algorithm, s, s.x, self.hyper) for s in self.states]
            gradients = [fn(z) for fn, z in zip(self.gradient_fns, points, strict=True)]
            mixed = self.mixed_points()
        else:
            mixed = self.mixed_points()
            points = [
                extrapolate(self.algorithm, s, xm, self.hyper)
                for s, xm in zip(self.states, mixed, strict=True)
            ]
            gradients = [fn(z) for fn, z in zip(self.gradient_fns, points, strict=True)]
        if averages_gradients(self.algorithm):
            averaged = mean_canonical(gradients)
            gradients = [averaged] * self.n
        self.states = [
            advance(self.algorithm, s, xm, g, self.hyper)
            for s, xm, g in zip(self.states, mixed, gradients, strict=True)
        ]
        self.iteration += 1

    def consensus_distance(self) -> float:
        """(1/n) Σ ‖x_i − x̄‖², the disagreement between nodes."""
        stacked = self.stacked().double()
        return float(((stacked - stacked.mean(0)) ** 2).sum(1).mean())

    def average(self) -> torch.Tensor:
        return self.stacked().double().mean(0).to(self.states[0].x.dtype)


def _compressed(compression: CompressedGossip | None, wire_dtype: str, nodes: int) -> _ChocoState | None:
    if compression is None:
        return None
    if wire_dtype not in COMPRESSED_GOSSIP_WIRES:
        raise ValueError(
            f"compressed gossip sends float32 resets and its own codes; wire_dtype {wire_dtype!r} "
            "does not apply"
        )
    return _ChocoState(compression, nodes)


# Time-varying schedules cycle through a few matrices (one-peer exponential: log2 n); more distinct
# keys mean rows_at builds fresh rows every call, and the cache only has to stay bounded.
_MAX_CACHED_MATRICES = 64


class VectorizedCluster(VirtualCluster):
    """``VirtualCluster`` with all nodes' gradients from one batched call and the state kept in (n, d) stacks.

    The update rules are elementwise, so ``extrapolate``/``advance`` applied to a ``NodeState`` whose
    tensors are (n, d) stacks give, row by row, the same bits as the per-node calls. The gradients
    (``batched_gradient_fn``) and the mixing (one W @ X product per round) sum in other orders than
    the per-node path, so results agree with it up to float rounding, not bit for bit.
    """

    def __init__(
        self,
        algorithm: str,
        x0: torch.Tensor,
        batched_gradient_fn: BatchedGradientFn,
        nodes: int,
        rows_at: RowsFn,
        rounds: int,
        hyper: Hyper,
        wire_dtype: str = "float32",
        compression: CompressedGossip | None = None,
        overlap: bool = False,
    ) -> None:
        self.algorithm = check_algorithm(algorithm)
        self.overlap = overlap
        self.wire = wire_rounding(wire_dtype)
        self.choco = _compressed(compression, wire_dtype, nodes)
        if nodes < 1:
            raise ValueError(f"a cluster needs at least one node, got {nodes}")
        if rounds < 1 and mixes(self.algorithm) and nodes > 1:
            raise ValueError(f"rounds must be at least 1 for {algorithm}, got {rounds}")
        if x0.dim() != 1:
            raise ValueError(f"x0 must be a flat vector, got shape {tuple(x0.shape)}")
        self.batched_gradient_fn = batched_gradient_fn
        self.nodes = nodes
        self.rows_at = rows_at
        self.rounds = rounds
        self.hyper = hyper
        self.iteration = 0
        self._matrices: dict[tuple[int, ...], tuple[Sequence[Row], torch.Tensor]] = {}
        x0_stack = x0.expand(nodes, -1).contiguous()
        initial = self._gradients(x0_stack) if needs_initial_gradient(self.algorithm) else None
        self.stacked_state = initial_state(self.algorithm, x0_stack, initial)
        self.states = self._unstacked()

    @property
    def n(self) -> int:
        return self.nodes

    def _gradients(self, points: torch.Tensor) -> torch.Tensor:
        gradients = self.batched_gradient_fn(points)
        if gradients.shape != points.shape:
            raise ValueError(
                f"batched gradients have shape {tuple(gradients.shape)}, expected {tuple(points.shape)}"
            )
        if averages_gradients(self.algorithm):
            # Same node-order sum as the per-node path, so cposg runs see the same average.
            averaged = mean_canonical(list(gradients.unbind(0)))
            return averaged.expand(self.nodes, -1).contiguous()
        return gradients

    def _unstacked(self) -> list[NodeState]:
        """Per-node views of the stacks (no copies), for code that reads ``states`` node by node."""
        stack = self.stacked_state
        rows = {name: tensor.unbind(0) for name, tensor in stack.tensors().items()}
        return [
            NodeState(
                x=rows["x"][i],
                direction=rows["direction"][i] if "direction" in rows else None,
                moment1=rows["moment1"][i] if "moment1" in rows else None,
                moment2=rows["moment2"][i] if "moment2" in rows else None,
                step=stack.step,
            )
            for i in range(self.nodes)
        ]

    def stacked(self) -> torch.Tensor:
        return self.stacked_state.x

    def mixed_points(self) -> list[torch.Tensor]:
        return list(self._mixed_stack().unbind(0))

    def _mixed_stack(self) -> torch.Tensor:
        mixed = self.stacked_state.x
        if not mixes(self.algorithm) or self.nodes == 1:
            return mixed
        first_round = self.iteration * self.rounds
        if self.choco is not None:
            rows = list(mixed.unbind(0))
            return torch.stack(self.choco.gossip(rows, self.rows_at, first_round, self.rounds))
        for r in range(self.rounds):
            matrix = self._mixing_matrix(first_round + r, mixed)
            if self.wire is None:
                mixed = torch.mm(matrix, mixed)
            else:
                # Own vector as held, neighbours' as received: W_offdiag @ rounded(X) + diag(W) * X.
                diagonal = matrix.diagonal()
                off_diagonal = matrix - torch.diag(diagonal)
                mixed = torch.addcmul(
                    torch.mm(off_diagonal, wire_rounded(mixed, self.wire)), diagonal[:, None], mixed
                )
        return mixed

    def _mixing_matrix(self, round_index: int, like: torch.Tensor) -> torch.Tensor:
        """Round ``round_index``'s W as a dense (n, n) tensor, so a round is one matrix product.

        ``mix_all``'s canonical per-slot sums cost O(n · row length · d) in memory-bound passes: at
        n = 256 one round takes ~0.1 s on a ring and ~10 s on a complete graph, where W @ X takes
        ~0.05 s. The product sums in a different order, a last-bit difference this mode already has.
        Schedules hand out the same row objects every period, so matrices are cached by row identity.
        """
        rows = self.rows_at(round_index)
        key = tuple(map(id, rows))
        cached = self._matrices.get(key)
        if cached is not None:
            return cached[1]
        if len(rows) != self.nodes:
            raise MixingError(f"{len(rows)} mixing rows for {self.nodes} node states")
        weights = np.zeros((self.nodes, self.nodes), dtype=np.float64)
        for i, row in enumerate(rows):
            if not row:
                raise MixingError(f"mixing row of node {i} is empty")
            for j, w in row:
                if not 0 <= j < self.nodes:
                    raise MixingError(f"mixing row of node {i} names node {j}, outside 0..{self.nodes - 1}")
                weights[i, j] = w
        matrix = torch.from_numpy(weights).to(dtype=like.dtype, device=like.device)
        if len(self._matrices) >= _MAX_CACHED_MATRICES:
            self._matrices.clear()
        # The rows are kept alive with their matrix so that their ids cannot be reused by other rows.
        self._matrices[key] = (rows, matrix)
        return matrix

    def step(self) -> None:
        if self.overlap:
            gradients = self._gradients(
                extrapolate(self.algorithm, self.stacked_state, self.stacked_state.x, self.hyper)
            )
            mixed = self._mixed_stack()
        else:
            mixed = self._mixed_stack()
            gradients = self._gradients(extrapolate(self.algorithm, self.stacked_state, mixed, self.hyper))
        self.stacked_state = advance(self.algorithm, self.stacked_state, mixed, gradients, self.hyper)
        self.states = self._unstacked()
        self.iteration += 1
