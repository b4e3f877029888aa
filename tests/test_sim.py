"""simulate_game on bilinear games: optimism converges where plain gradient descent-ascent diverges."""

from __future__ import annotations

import pytest
import torch

from agent.core.algorithms import Hyper, NodeState, advance, extrapolate
from agent.sim import simulate_game

DIM = 4


def _well_conditioned(generator: torch.Generator) -> torch.Tensor:
    # Singular values in [0.9, 1.1]: optimistic GDA then contracts quickly at lr 0.3.
    q1, _ = torch.linalg.qr(torch.randn(DIM, DIM, generator=generator, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(DIM, DIM, generator=generator, dtype=torch.float64))
    return q1 @ torch.diag(torch.linspace(0.9, 1.1, DIM, dtype=torch.float64)) @ q2


def _bilinear(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor):
    def losses(u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        value = u @ a @ v + b @ u + c @ v
        return value, -value

    return losses


def _game(n: int, heterogeneity: float, seed: int = 0):
    """Per-node games u^T A_i v + b_i^T u + c_i^T v and the saddle point of their average."""
    generator = torch.Generator().manual_seed(seed)
    base = _well_conditioned(generator)
    a = [
        base + heterogeneity * torch.randn(DIM, DIM, generator=generator, dtype=torch.float64)
        for _ in range(n)
    ]
    b = [0.5 * torch.randn(DIM, generator=generator, dtype=torch.float64) for _ in range(n)]
    c = [0.5 * torch.randn(DIM, generator=generator, dtype=torch.float64) for _ in range(n)]
    if heterogeneity == 0.0:
        b, c = [b[0]] * n, [c[0]] * n
    a_bar, b_bar, c_bar = sum(a) / n, sum(b) / n, sum(c) / n
    # Stationary point of the average game: A v + b = 0 and A^T u + c = 0.
    v_star = torch.linalg.solve(a_bar, -b_bar)
    u_star = torch.linalg.solve(a_bar.T, -c_bar)
    u0 = torch.randn(DIM, generator=generator, dtype=torch.float64)
    v0 = torch.randn(DIM, generator=generator, dtype=torch.float64)
    losses = [_bilinear(ai, bi, ci) for ai, bi, ci in zip(a, b, c, strict=True)]
    return losses, u0, v0, u_star, v_star


def _distance(result, u_star: torch.Tensor, v_star: torch.Tensor) -> float:
    return float(torch.cat([result.u_mean - u_star, result.v_mean - v_star]).norm())


CASES = [(1, "ring"), (4, "ring"), (4, "torus"), (4, "complete"), (8, "ring"), (8, "torus"), (8, "complete")]


@pytest.mark.parametrize(("n", "topology"), CASES)
def test_sgda_diverges_where_dposg_converges_on_a_shared_game(n: int, topology: str) -> None:
    losses, u0, v0, u_star, v_star = _game(n, heterogeneity=0.0)
    start = float(torch.cat([u0 - u_star, v0 - v_star]).norm())
    kwargs = {"topology": topology, "rounds": 1, "lr": 0.3}
    sgda = simulate_game(losses, u0, v0, algorithm="sgda", iterations=200, **kwargs)
    dposg = simulate_game(losses, u0, v0, algorithm="dposg", iterations=700, **kwargs)
    assert _distance(sgda, u_star, v_star) > 100 * start
    assert _distance(dposg, u_star, v_star) < 1e-6
    assert dposg.history[-1].operator_norm < 1e-6
    assert dposg.u.shape == (n, DIM) and dposg.v.shape == (n, DIM)


@pytest.mark.parametrize(("n", "topology"), [case for case in CASES if case[0] > 1])
def test_dposg_converges_when_nodes_disagree(n: int, topology: str) -> None:
    """Different A_i, b_i, c_i per node: with a constant step DPOSG settles in an O(lr) ball."""
    losses, u0, v0, u_star, v_star = _game(n, heterogeneity=0.2)
    start = float(torch.cat([u0 - u_star, v0 - v_star]).norm())
    errors = {}
    for lr, iterations in ((0.3, 400), (0.15, 800)):
        result = simulate_game(losses, u0, v0, topology=topology, rounds=1, lr=lr, iterations=iterations)
        errors[lr] = _distance(result, u_star, v_star)
        assert result.history[-1].operator_norm < 0.1 * result.history[0].operator_norm
    sgda = simulate_game(
        losses, u0, v0, topology=topology, rounds=1, lr=0.3, iterations=200, algorithm="sgda"
    )
    assert _distance(sgda, u_star, v_star) > 100 * start
    assert errors[0.3] < 0.1 * start
    assert errors[0.15] < 0.75 * errors[0.3]  # the residual shrinks with the step: a bias, not a failure


def test_more_gossip_rounds_reduce_disagreement() -> None:
    losses, u0, v0, _, _ = _game(8, heterogeneity=0.2)
    one = simulate_game(losses, u0, v0, topology="ring", rounds=1, lr=0.1, iterations=400)
    four = simulate_game(losses, u0, v0, topology="ring", rounds=4, lr=0.1, iterations=400)
    assert four.history[-1].consensus_distance < 0.5 * one.history[-1].consensus_distance


def test_single_node_dposg_is_optimistic_sgd_step_for_step() -> None:
    losses, u0, v0, _, _ = _game(1, heterogeneity=0.0)
    lr, steps = 0.1, 25

    def operator(u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u = u.detach().requires_grad_(True)
        v = v.detach().requires_grad_(True)
        loss_u, loss_v = losses[0](u, v)
        return torch.autograd.grad(loss_u, u, retain_graph=True)[0], torch.autograd.grad(loss_v, v)[0]

    # Textbook optimistic SGD: z = x - lr*g_prev; g = T(z); x = x - lr*g; g_prev starts as T(x0).
    u, v = u0.clone(), v0.clone()
    gu_prev, gv_prev = operator(u, v)
    reference = []
    for _ in range(steps):
        gu, gv = operator(u - lr * gu_prev, v - lr * gv_prev)
        u, v = u - lr * gu, v - lr * gv
        gu_prev, gv_prev = gu, gv
        reference.append(torch.cat([u, v]))
    for k in range(1, steps + 1):
        result = simulate_game(losses, u0, v0, topology="ring", lr=lr, iterations=k, record_history=False)
        assert torch.equal(torch.cat([result.u[0], result.v[0]]), reference[k - 1]), f"differs at step {k}"


def test_cposg_keeps_nodes_identical_and_matches_the_average_game() -> None:
    losses, u0, v0, u_star, v_star = _game(4, heterogeneity=0.2)
    result = simulate_game(losses, u0, v0, algorithm="cposg", lr=0.3, iterations=700)
    assert torch.equal(result.u[0], result.u[3]) and torch.equal(result.v[1], result.v[2])
    # Averaging gradients solves the average game exactly: no consensus bias.
    assert _distance(result, u_star, v_star) < 1e-6


def test_dpoadam_converges_on_a_strongly_monotone_game() -> None:
    """Adam-preconditioned steps keep an O(lr) oscillation on pure bilinear games; with a quadratic
    term (a strongly monotone game) the adaptive variant settles at the saddle point (0, 0)."""
    generator = torch.Generator().manual_seed(3)
    a = _well_conditioned(generator)

    def regularized(u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        value = u @ a @ v
        return value + 0.5 * u @ u, -value + 0.5 * v @ v

    u0 = torch.randn(DIM, generator=generator, dtype=torch.float64)
    v0 = torch.randn(DIM, generator=generator, dtype=torch.float64)
    result = simulate_game([regularized] * 4, u0, v0, algorithm="dpoadam", lr=0.01, iterations=1500)
    start = float(torch.cat([u0, v0]).norm())
    assert float(torch.cat([result.u_mean, result.v_mean]).norm()) < 0.05 * start


def test_extrapolate_and_advance_are_the_dposg_formulas() -> None:
    x_mixed = torch.tensor([1.0, 2.0])
    state = NodeState(x=torch.zeros(2), direction=torch.tensor([0.5, -1.0]))
    hyper = Hyper(lr=0.1)
    assert torch.allclose(extrapolate("dposg", state, x_mixed, hyper), torch.tensor([0.95, 2.1]))
    after = advance("dposg", state, x_mixed, torch.tensor([2.0, 3.0]), hyper)
    assert torch.allclose(after.x, torch.tensor([0.8, 1.7]))
    assert torch.equal(after.direction, torch.tensor([2.0, 3.0]))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"algorithm": "adam"}, "unknown algorithm"),
        ({"lr": -1.0}, "lr must be positive"),
        ({"topology": "star"}, "star"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, message: str) -> None:
    losses, u0, v0, _, _ = _game(4, heterogeneity=0.0)
    with pytest.raises(ValueError, match=message):
        simulate_game(losses, u0, v0, iterations=1, **kwargs)
