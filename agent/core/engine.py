"""In-process execution of n virtual nodes: the reference every networked run is checked against.

One iteration is exactly what each agent does over the network (see ``agent.core.algorithms``):
t gossip rounds of ``mix`` on x, then the local half-steps around one stochastic gradient per node.
Gradients are evaluated node by node in ascending order, each node drawing from its own data stream,
so the random numbers a node consumes do not depend on how many nodes share the process.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

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
from agent.core.mixing import Row, mix_all

RowsFn = Callable[[int], Sequence[Row]]  # global gossip round index -> one mixing row per node


@dataclass(frozen=True)
class IterationTiming:
    compute_seconds: float
    mixing_seconds: float


def gossip(states: torch.Tensor, rows_at: RowsFn, first_round: int, rounds: int) -> torch.Tensor:
    """``rounds`` successive mixing rounds of all nodes' x, rounds numbered from ``first_round``."""
    mixed = states
    for r in range(rounds):
        mixed = mix_all(mixed, rows_at(first_round + r))
    return mixed


class VirtualCluster:
    """n nodes stepping in lockstep in one process.

    ``gradient_fns[i]`` evaluates node i's stochastic operator T_i at a flat point (both players).
    """

    def __init__(
        self,
        algorithm: str,
        x0: torch.Tensor,
        gradient_fns: Sequence[GradientFn],
        rows_at: RowsFn,
        rounds: int,
        hyper: Hyper,
    ) -> None:
        self.algorithm: AlgorithmName = check_algorithm(algorithm)
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
        mixed = gossip(self.stacked(), self.rows_at, self.iteration * self.rounds, self.rounds)
        return list(mixed.unbind(0))

    def step(self) -> None:
        mixed = self.mixed_points()
        points = [
            extrapolate(self.algorithm, s, xm, self.hyper) for s, xm in zip(self.states, mixed, strict=True)
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


def node_states_tensors(states: Sequence[NodeState]) -> list[dict[str, torch.Tensor]]:
    return [s.tensors() for s in states]
