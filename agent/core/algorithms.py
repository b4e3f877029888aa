"""The per-node update rules, on flat parameter vectors that hold both players.

Every rule is split in two pure halves around the one stochastic gradient of an iteration:

* ``extrapolate(state, x_mixed) -> z``: where the gradient is taken;
* ``advance(state, x_mixed, g) -> NodeState``: the new local state once ``g = T(z)`` is known.

How ``x_mixed`` and ``g`` are obtained is the communication pattern, which is the only difference
between the decentralized and the centralized methods:

* ``dposg`` / ``sgda`` / ``dpoadam``: ``x_mixed`` is the gossip average of the neighbours' x over t
  rounds; ``g`` is the node's own stochastic gradient.
* ``cposg``: nobody mixes (all nodes hold the same x); ``g`` is the average of all nodes' gradients
  at the same z (what all-reduce data parallelism does).

The simulator and the networked agent both call these functions, so they cannot drift apart.

Start of training (a documented choice): every node starts from the same x0 built from the shared
seed. For ``dposg`` and ``cposg`` the first extrapolation direction ``g_prev`` is one minibatch
gradient at x0, drawn by each node from its own data stream before iteration 0 (``cposg`` averages
it). ``dpoadam`` starts with zero moments and a zero previous direction, so its first step is a plain
Adam step. ``sgda`` keeps no previous direction.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from agent.core.names import ALGORITHMS, AlgorithmName

GradientFn = Callable[[torch.Tensor], torch.Tensor]


class AlgorithmError(ValueError):
    """Unknown algorithm or invalid hyper-parameters."""


@dataclass(frozen=True)
class Hyper:
    """Step size and (for ``dpoadam``) Adam's constants. ``lr`` is the paper's η."""

    lr: float
    beta1: float = 0.5
    beta2: float = 0.9
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if not self.lr > 0.0:
            raise AlgorithmError(f"lr must be positive, got {self.lr}")
        if not 0.0 <= self.beta1 < 1.0:
            raise AlgorithmError(f"beta1 must be in [0, 1), got {self.beta1}")
        if not 0.0 <= self.beta2 < 1.0:
            raise AlgorithmError(f"beta2 must be in [0, 1), got {self.beta2}")
        if not self.eps > 0.0:
            raise AlgorithmError(f"eps must be positive, got {self.eps}")


@dataclass(frozen=True)
class NodeState:
    """One node's local state. Only ``x`` is ever communicated; the rest stays on the node."""

    x: torch.Tensor
    direction: torch.Tensor | None = None  # g_prev (dposg/cposg) or the previous Adam direction (dpoadam)
    moment1: torch.Tensor | None = None
    moment2: torch.Tensor | None = None
    step: int = 0

    def tensors(self) -> dict[str, torch.Tensor]:
        """Named tensors for checkpoints and for late joiners (only the ones this algorithm uses)."""
        named = {"x": self.x}
        for name in ("direction", "moment1", "moment2"):
            value = getattr(self, name)
            if value is not None:
                named[name] = value
        return named


def check_algorithm(name: str) -> AlgorithmName:
    if name not in ALGORITHMS:
        raise AlgorithmError(f"unknown algorithm {name!r}; choose one of {', '.join(ALGORITHMS)}")
    return name  # type: ignore[return-value]


def mixes(algorithm: AlgorithmName) -> bool:
    """Whether the algorithm gossips x between nodes (all but the centralized baseline)."""
    return algorithm != "cposg"


def averages_gradients(algorithm: AlgorithmName) -> bool:
    """Whether the algorithm averages gradients over all nodes every iteration (the centralized baseline)."""
    return algorithm == "cposg"


def needs_initial_gradient(algorithm: AlgorithmName) -> bool:
    return algorithm in ("dposg", "cposg")


def initial_state(
    algorithm: AlgorithmName, x0: torch.Tensor, initial_gradient: torch.Tensor | None
) -> NodeState:
    """State at iteration 0. ``initial_gradient`` is the (for cposg: averaged) minibatch gradient at x0."""
    check_algorithm(algorithm)
    if needs_initial_gradient(algorithm):
        if initial_gradient is None:
            raise AlgorithmError(f"{algorithm} needs the minibatch gradient at x0 to start")
        return NodeState(x=x0.clone(), direction=initial_gradient.clone())
    if algorithm == "dpoadam":
        zeros = torch.zeros_like(x0)
        return NodeState(x=x0.clone(), direction=zeros, moment1=zeros.clone(), moment2=zeros.clone())
    return NodeState(x=x0.clone())


def extrapolate(
    algorithm: AlgorithmName, state: NodeState, x_mixed: torch.Tensor, hyper: Hyper
) -> torch.Tensor:
    """The point z where this iteration's stochastic gradient is taken."""
    if algorithm == "sgda":
        return x_mixed
    assert state.direction is not None, f"{algorithm} state lacks its previous direction"
    return _step(x_mixed, hyper.lr, state.direction)


def _step(x: torch.Tensor, lr: float, direction: torch.Tensor) -> torch.Tensor:
    """``x − lr·direction`` with the same bits, in one new tensor instead of two: the product is
    overwritten by the difference. Fresh ~1 MB tensors are page-faulted anew by the allocator, and these
    two steps were 15% of a local iteration (see docs/benchmarks.md, agent overhead)."""
    scaled = direction * lr
    return torch.sub(x, scaled, out=scaled)


def advance(
    algorithm: AlgorithmName, state: NodeState, x_mixed: torch.Tensor, gradient: torch.Tensor, hyper: Hyper
) -> NodeState:
    """The node's new state from the mixed point and the gradient taken at ``extrapolate(...)``."""
    if algorithm in ("dposg", "cposg"):
        return NodeState(x=_step(x_mixed, hyper.lr, gradient), direction=gradient, step=state.step + 1)
    if algorithm == "sgda":
        return NodeState(x=_step(x_mixed, hyper.lr, gradient), step=state.step + 1)
    if algorithm == "dpoadam":
        assert state.moment1 is not None and state.moment2 is not None
        step = state.step + 1
        moment1 = hyper.beta1 * state.moment1 + (1.0 - hyper.beta1) * gradient
        moment2 = hyper.beta2 * state.moment2 + (1.0 - hyper.beta2) * gradient * gradient
        corrected1 = moment1 / (1.0 - hyper.beta1**step)
        corrected2 = moment2 / (1.0 - hyper.beta2**step)
        direction = corrected1 / (corrected2.sqrt() + hyper.eps)
        return replace(
            state,
            x=_step(x_mixed, hyper.lr, direction),
            direction=direction,
            moment1=moment1,
            moment2=moment2,
            step=step,
        )
    raise AlgorithmError(f"unknown algorithm {algorithm!r}")


def local_iteration(
    algorithm: AlgorithmName, state: NodeState, x_mixed: torch.Tensor, gradient_at: GradientFn, hyper: Hyper
) -> NodeState:
    """One full iteration for a rule whose gradient is purely local (everything except ``cposg``)."""
    z = extrapolate(algorithm, state, x_mixed, hyper)
    return advance(algorithm, state, x_mixed, gradient_at(z), hyper)


def mean_canonical(vectors: list[torch.Tensor]) -> torch.Tensor:
    """Average in node order, the same sum every implementation of the centralized baseline uses."""
    if not vectors:
        raise AlgorithmError("cannot average zero gradients")
    total = vectors[0].clone()
    for v in vectors[1:]:
        total = total + v
    return total / len(vectors)


class NonFiniteStateError(ValueError):
    """A node's parameters hold NaN or inf: training diverged (too large a step size, an unstable loss).
    The message names the iteration and the node; a run stops here rather than train on garbage."""


def _finite(x: torch.Tensor) -> bool:
    # One reduction: a finite sum means finite entries (a sum that overflows is checked entry by entry).
    return math.isfinite(float(x.sum())) or bool(torch.isfinite(x).all())


def check_finite(states: Sequence[NodeState], iteration: int, nodes: Sequence[str] | None = None) -> None:
    """Raise NonFiniteStateError naming the first node (``nodes[i]``, else its index) whose x is not
    finite after ``iteration``."""
    for i, state in enumerate(states):
        if not _finite(state.x):
            name = nodes[i] if nodes is not None else str(i)
            raise NonFiniteStateError(
                f"training diverged at iteration {iteration}: the parameters of node {name} are not "
                "finite (NaN or inf); try a smaller lr"
            )
