"""Decentralized min-max in one process, for any game (not only GANs).

    from agent.sim import simulate_game
    result = simulate_game(losses, u0, v0, topology="ring", rounds=1, lr=0.05,
                           iterations=200, algorithm="dposg")

``losses[i]`` is node i's callable ``(u, v) -> (loss_u, loss_v)``: the first player minimises
``loss_u`` over u, the second minimises ``loss_v`` over v (``loss_v = -loss_u`` for a zero-sum game).
The global game is the average of the nodes' games; ``result.history`` tracks how far the nodes
disagree and how close their average is to a stationary point of that global game.

``topology`` is a name (``"ring"``, ...) or the mixing matrix itself, as a numpy array, a torch tensor or
nested lists (2-D: one matrix, an adjacency when its entries are all 0/1; 3-D or a sequence of matrices:
one per round), validated alike (``agent.core.topology.make_schedule``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from agent.core.algorithms import GradientFn, Hyper, check_algorithm
from agent.core.engine import VirtualCluster
from agent.core.topology import make_schedule

GameLosses = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
Topology = str | np.ndarray | torch.Tensor | Sequence[Any]


def as_mixing(topology: Topology) -> str | np.ndarray | Sequence[np.ndarray]:
    """A topology for ``make_schedule``: a torch tensor becomes the numpy array of its dtype (from any
    device, detached), nested lists of numbers the 2-D (one matrix) or 3-D (one per round) array they
    spell, and a sequence of matrices (arrays, tensors or nested lists) a list of arrays."""
    if isinstance(topology, torch.Tensor):
        return topology.detach().cpu().numpy()
    if isinstance(topology, str | np.ndarray) or not isinstance(topology, Sequence):
        return topology  # a name, an array, or something make_schedule refuses by name
    if topology and all(isinstance(item, torch.Tensor | np.ndarray) for item in topology):
        return [as_mixing(item) for item in topology]  # type: ignore[misc]
    try:
        array = np.asarray(topology)
    except ValueError:  # ragged nested lists: one matrix per round, each checked by make_schedule
        return [np.asarray(item) for item in topology]
    if array.dtype == object:
        return [np.asarray(as_mixing(item)) for item in topology]
    return array


@dataclass(frozen=True)
class GameRecord:
    iteration: int
    consensus_distance: float
    operator_norm: float


@dataclass
class GameResult:
    u: torch.Tensor  # (n, dim_u) after the last iteration
    v: torch.Tensor  # (n, dim_v)
    history: list[GameRecord] = field(default_factory=list)

    @property
    def u_mean(self) -> torch.Tensor:
        return self.u.mean(0)

    @property
    def v_mean(self) -> torch.Tensor:
        return self.v.mean(0)


def game_operator(loss: GameLosses, dim_u: int) -> GradientFn:
    """T(z) = (∂loss_u/∂u, ∂loss_v/∂v) at the flat point z = (u, v): each player descends its own loss."""

    def operator(z: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            u = z[:dim_u].detach().requires_grad_(True)
            v = z[dim_u:].detach().requires_grad_(True)
            loss_u, loss_v = loss(u, v)
            (grad_u,) = torch.autograd.grad(loss_u, u, allow_unused=True, retain_graph=True)
            (grad_v,) = torch.autograd.grad(loss_v, v, allow_unused=True)
        grad_u = torch.zeros_like(u) if grad_u is None else grad_u
        grad_v = torch.zeros_like(v) if grad_v is None else grad_v
        return torch.cat([grad_u, grad_v]).detach()

    return operator


def simulate_game(
    losses: Sequence[GameLosses],
    u0: torch.Tensor,
    v0: torch.Tensor,
    *,
    topology: Topology = "ring",
    rounds: int = 1,
    lr: float = 0.05,
    iterations: int = 200,
    algorithm: str = "dposg",
    weights: str = "metropolis",
    beta1: float = 0.5,
    beta2: float = 0.9,
    record_history: bool = True,
    wire_dtype: str = "float32",
) -> GameResult:
    """Run ``iterations`` of ``algorithm`` on n = len(losses) virtual nodes; see the module docstring.

    ``wire_dtype`` (``bfloat16``, ``float16``) rounds the neighbours' vectors of every gossip round as
    agents sending in that dtype do. A diverging game is a result here (not an error): its points may
    become inf or NaN."""
    if not losses:
        raise ValueError("losses must hold one callable per node; got none")
    if u0.dim() != 1 or v0.dim() != 1:
        raise ValueError(f"u0 and v0 must be 1-D tensors, got shapes {tuple(u0.shape)} and {tuple(v0.shape)}")
    if u0.dtype != v0.dtype:
        raise ValueError(f"u0 and v0 must share a dtype, got {u0.dtype} and {v0.dtype}")
    if iterations < 0:
        raise ValueError(f"iterations must be non-negative, got {iterations}")
    check_algorithm(algorithm)
    n, dim_u = len(losses), u0.numel()
    schedule = make_schedule(as_mixing(topology), n, weights=weights)
    operators = [game_operator(loss, dim_u) for loss in losses]
    cluster = VirtualCluster(
        algorithm,
        torch.cat([u0, v0]).detach().clone(),
        operators,
        lambda round_index: [schedule.row(i, round_index) for i in range(n)],
        rounds,
        Hyper(lr=lr, beta1=beta1, beta2=beta2),
        wire_dtype=wire_dtype,
    )
    history: list[GameRecord] = []
    for _ in range(iterations):
        cluster.step()
        if record_history:
            average = cluster.average()
            global_operator = torch.stack([op(average) for op in operators]).mean(0)
            history.append(
                GameRecord(cluster.iteration, cluster.consensus_distance(), float(global_operator.norm()))
            )
    stacked = cluster.stacked()
    return GameResult(u=stacked[:, :dim_u].clone(), v=stacked[:, dim_u:].clone(), history=history)
