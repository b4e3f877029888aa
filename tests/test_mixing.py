"""Gossip mixing: average preservation and one canonical order shared by simulator and agent."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agent.core.engine import gossip
from agent.core.mixing import MixingError, mix_all, mix_row, renormalized_row, row_for_round
from agent.core.topology import TOPOLOGY_NAMES, make_schedule


def _random_doubly_stochastic(n: int, seed: int) -> np.ndarray:
    """A random symmetric doubly stochastic matrix: a convex mix of symmetrised permutations."""
    rng = np.random.default_rng(seed)
    matrix = np.zeros((n, n))
    weights = rng.dirichlet(np.ones(5))
    for w in weights:
        permutation = np.eye(n)[rng.permutation(n)]
        matrix += w * 0.5 * (permutation + permutation.T)
    return matrix


@pytest.mark.parametrize("topology", [t for t in TOPOLOGY_NAMES if t != "random_regular"] + ["random"])
@pytest.mark.parametrize("n", [2, 5, 8])
def test_one_round_keeps_the_network_average(topology: str, n: int) -> None:
    if topology == "random":
        schedule = make_schedule(_random_doubly_stochastic(n, seed=n), n)
    else:
        schedule = make_schedule(topology, n)
    states = torch.randn(n, 1000, generator=torch.Generator().manual_seed(n), dtype=torch.float32)
    rows = [schedule.row(i, 0) for i in range(n)]
    mixed = mix_all(states, rows)
    torch.testing.assert_close(mixed.double().mean(0), states.double().mean(0), rtol=0, atol=1e-6)


def test_random_regular_round_keeps_the_average() -> None:
    schedule = make_schedule("random_regular", 10, degree=3, seed=4)
    states = torch.randn(10, 500, dtype=torch.float64)
    mixed = mix_all(states, [schedule.row(i, 0) for i in range(10)])
    torch.testing.assert_close(mixed.mean(0), states.mean(0), rtol=0, atol=1e-12)


@pytest.mark.parametrize("topology", ["ring", "torus", "exponential", "one_peer_exponential", "complete"])
def test_batched_mixing_equals_one_row_at_a_time_bit_for_bit(topology: str) -> None:
    n = 9
    schedule = make_schedule(topology, n)
    states = torch.randn(n, 4097, generator=torch.Generator().manual_seed(1))
    for round_index in range(3):
        rows = [schedule.row(i, round_index) for i in range(n)]
        batched = mix_all(states, rows)
        vectors = dict(enumerate(states))
        for i in range(n):
            # The agent only holds its neighbours' vectors: give mix_row exactly those.
            own = {j: vectors[j] for j, _ in rows[i]}
            assert torch.equal(batched[i], mix_row(rows[i], own)), f"node {i} round {round_index}"
        states = batched


def test_t_rounds_apply_the_effective_matrix() -> None:
    schedule = make_schedule("ring", 6)
    states = torch.randn(6, 10, dtype=torch.float64)
    mixed = gossip(states, lambda r: [schedule.row(i, r) for i in range(6)], 0, 3)
    expected = torch.from_numpy(schedule.effective_matrix(3)) @ states
    torch.testing.assert_close(mixed, expected)


def test_one_peer_exponential_reaches_the_exact_average_in_log2_n_rounds() -> None:
    schedule = make_schedule("one_peer_exponential", 8)
    states = torch.randn(8, 16, dtype=torch.float64)
    mixed = gossip(states, lambda r: [schedule.row(i, r) for i in range(8)], 0, 3)
    torch.testing.assert_close(mixed, states.mean(0).expand(8, -1), rtol=0, atol=1e-12)


def test_missing_vector_and_empty_row_are_errors() -> None:
    with pytest.raises(MixingError, match=r"nodes \[2\]"):
        mix_row(((0, 0.5), (2, 0.5)), {0: torch.zeros(3)})
    with pytest.raises(MixingError, match="empty"):
        mix_row((), {})
    with pytest.raises(MixingError, match="outside"):
        mix_all(torch.zeros(2, 3), [((0, 0.5), (5, 0.5)), ((1, 1.0),)])


def test_renormalized_row_drops_absent_neighbours() -> None:
    row = ((0, 1 / 3), (1, 1 / 3), (5, 1 / 3))
    assert renormalized_row(row, {0, 5}) == ((0, 0.5), (5, 0.5))
    with pytest.raises(MixingError, match="no positive weight"):
        renormalized_row(row, {7})


def test_a_round_mixes_only_neighbours_of_the_same_view() -> None:
    """Nodes whose views differ for a moment leave each other out; every mixed vector stays a convex
    combination of vectors of its own view, so no node's parameters are scaled or corrupted."""
    ring = make_schedule("ring", 4)
    states = torch.randn(4, 100, dtype=torch.float64)
    epochs = {0: 111, 1: 111, 2: 222, 3: 222}  # nodes 0,1 hold one view; 2,3 another
    for i in range(4):
        row = ring.row(i, 0)
        arrived = {j: epochs[j] for j, _ in row if j != i}
        mixed_row, missing, other_view = row_for_round(row, i, arrived, epochs[i])
        assert missing == []
        assert sorted(other_view) == sorted(j for j, _ in row if j != i and epochs[j] != epochs[i])
        assert all(epochs[j] == epochs[i] for j, _ in mixed_row)
        assert sum(w for _, w in mixed_row) == pytest.approx(1.0)
        result = mix_row(mixed_row, dict(enumerate(states)))
        same_view = states[[j for j, _ in mixed_row]]
        assert torch.all(result <= same_view.max(0).values + 1e-12)
        assert torch.all(result >= same_view.min(0).values - 1e-12)


def test_full_row_is_kept_when_everyone_delivered_in_the_same_view() -> None:
    row = make_schedule("ring", 5).row(2, 0)
    mixed_row, missing, other_view = row_for_round(row, 2, {1: 7, 3: 7}, 7)
    assert mixed_row == tuple(sorted(row)) and missing == [] and other_view == []
    mixed_row, missing, _ = row_for_round(row, 2, {1: 7}, 7)
    assert missing == [3] and [j for j, _ in mixed_row] == [1, 2]
