"""Tests for agent.core.topology: graph builders, mixing weights, validation, schedules, spectra."""

from __future__ import annotations

import math

import numpy as np
import pytest

from agent.core.topology import (
    TOPOLOGY_NAMES,
    MixingMatrixError,
    MixingSchedule,
    TopologyError,
    complete_adjacency,
    exponential_adjacency,
    make_schedule,
    metropolis_weights,
    one_peer_exponential_adjacencies,
    random_regular_adjacency,
    ring_adjacency,
    rounds_for_consensus,
    schedule_from_adjacency,
    schedule_from_matrix,
    spectral_gap,
    spectral_rho,
    torus_adjacency,
    torus_shape,
    uniform_weights,
    validate_mixing_matrix,
)

NODE_COUNTS = (1, 2, 3, 4, 5, 6, 8, 9, 16)


def _components(pattern: np.ndarray) -> int:
    """Connected components of the non-zero off-diagonal pattern (independent of the module's BFS)."""
    n = pattern.shape[0]
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for i, j in np.argwhere(pattern != 0):
        if i != j:
            parent[find(int(i))] = find(int(j))
    return len({find(i) for i in range(n)})


def _assert_valid_mixing(matrix: np.ndarray) -> None:
    assert np.all(np.isfinite(matrix))
    assert np.all(matrix >= 0)
    np.testing.assert_allclose(matrix, matrix.T, atol=1e-12)
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0, atol=1e-12)
    np.testing.assert_allclose(matrix.sum(axis=0), 1.0, atol=1e-12)


def _random_regular_degree_for(n: int) -> int:
    # The largest small degree a connected regular graph on n nodes allows.
    if n == 2:
        return 1
    if n == 3:
        return 2
    return 3 if n % 2 == 0 else 4


def _build(name: str, n: int) -> MixingSchedule:
    if name == "random_regular":
        return make_schedule(name, n, degree=_random_regular_degree_for(n), seed=5)
    return make_schedule(name, n)


# ---------------------------------------------------------------------------------------------
# Every builder, every node count
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TOPOLOGY_NAMES)
@pytest.mark.parametrize("n", NODE_COUNTS)
def test_every_topology_gives_valid_connected_doubly_stochastic_schedule(name: str, n: int) -> None:
    schedule = _build(name, n)
    assert schedule.n == n
    assert schedule.name == name
    union = np.zeros((n, n), dtype=bool)
    for round_index in range(schedule.period):
        matrix = schedule.matrix(round_index)
        assert matrix.shape == (n, n)
        _assert_valid_mixing(matrix)
        union |= matrix != 0
    assert _components(union) == 1
    if n == 1:
        assert schedule.period == 1
        np.testing.assert_array_equal(schedule.matrix(0), [[1.0]])


@pytest.mark.parametrize(
    "builder", [ring_adjacency, torus_adjacency, complete_adjacency, exponential_adjacency]
)
@pytest.mark.parametrize("n", [2, 3, 5, 7, 12])
def test_static_builders_return_symmetric_bool_adjacency_without_self_loops(builder, n: int) -> None:
    adjacency = builder(n)
    assert adjacency.dtype == bool
    assert adjacency.shape == (n, n)
    assert not adjacency.diagonal().any()
    np.testing.assert_array_equal(adjacency, adjacency.T)


@pytest.mark.parametrize("n", [0, -3])
def test_builders_refuse_non_positive_node_counts(n: int) -> None:
    with pytest.raises(TopologyError, match="at least 1"):
        ring_adjacency(n)
    with pytest.raises(TopologyError, match="at least 1"):
        make_schedule("torus", n)


def test_non_integer_node_count_is_refused() -> None:
    with pytest.raises(TopologyError, match="integer"):
        make_schedule("ring", 4.0)  # type: ignore[arg-type]
    with pytest.raises(TopologyError, match="integer"):
        make_schedule("ring", True)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Ring, torus, exponential
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "expected_rho"), [(4, 0.333), (8, 0.805), (16, 0.949), (32, 0.987)])
def test_ring_rho_matches_reference(n: int, expected_rho: float) -> None:
    schedule = make_schedule("ring", n)
    assert schedule.rho() == pytest.approx(expected_rho, abs=5e-4)
    assert spectral_rho(schedule.matrix(0)) == pytest.approx(expected_rho, abs=5e-4)
    assert spectral_gap(schedule.matrix(0)) == pytest.approx(1 - expected_rho, abs=5e-4)


def test_ring_weights_are_one_third() -> None:
    schedule = make_schedule("ring", 8)
    for node in range(8):
        row = schedule.row(node, 0)
        assert [peer for peer, _ in row] == sorted({(node - 1) % 8, node, (node + 1) % 8})
        for _, weight in row:
            assert weight == pytest.approx(1 / 3, abs=1e-15)


def test_two_node_ring_is_a_single_edge_averaging_exactly() -> None:
    np.testing.assert_array_equal(ring_adjacency(2), [[False, True], [True, False]])
    matrix = make_schedule("ring", 2).matrix(0)
    np.testing.assert_allclose(matrix, [[0.5, 0.5], [0.5, 0.5]], atol=1e-15)
    assert spectral_rho(matrix) == pytest.approx(0.0, abs=1e-12)


def test_torus_is_4x4_with_degree_4_for_16_nodes() -> None:
    assert torus_shape(16) == (4, 4)
    adjacency = torus_adjacency(16)
    assert set(adjacency.sum(axis=1).tolist()) == {4}
    # node 5 = (row 1, col 1): neighbours (0,1)=1, (2,1)=9, (1,0)=4, (1,2)=6
    assert np.flatnonzero(adjacency[5]).tolist() == [1, 4, 6, 9]
    # wrap-around: node 0 = (0,0) links to (3,0)=12 and (0,3)=3
    assert np.flatnonzero(adjacency[0]).tolist() == [1, 3, 4, 12]


def test_torus_degenerate_shapes() -> None:
    assert torus_shape(12) == (3, 4)
    assert torus_shape(4) == (2, 2)
    # 2x2 torus degenerates to the 4-cycle 0-1-3-2-0
    assert [np.flatnonzero(row).tolist() for row in torus_adjacency(4)] == [[1, 2], [0, 3], [0, 3], [1, 2]]
    assert set(torus_adjacency(4).sum(axis=1).tolist()) == {2}
    assert _components(torus_adjacency(4)) == 1
    # a prime count is a 1 x n torus, i.e. a ring
    assert torus_shape(7) == (1, 7)
    np.testing.assert_array_equal(torus_adjacency(7), ring_adjacency(7))
    # 2 x 3 prism: each node has its two column neighbours and one row partner
    assert set(torus_adjacency(6).sum(axis=1).tolist()) == {3}


def test_exponential_graph_links_powers_of_two_offsets() -> None:
    adjacency = exponential_adjacency(8)
    # offsets ±1, ±2, ±4 mod 8 from node 0: 1, 7, 2, 6, 4
    assert np.flatnonzero(adjacency[0]).tolist() == [1, 2, 4, 6, 7]
    assert set(adjacency.sum(axis=1).tolist()) == {5}
    np.testing.assert_array_equal(exponential_adjacency(3), complete_adjacency(3))


def test_complete_graph_mixes_to_exact_average_in_one_round() -> None:
    schedule = make_schedule("complete", 5)
    np.testing.assert_allclose(schedule.matrix(0), np.full((5, 5), 0.2), atol=1e-15)
    assert schedule.consensus_rounds(1e-6) == 1


# ---------------------------------------------------------------------------------------------
# One-peer exponential (time-varying)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [8, 16])
def test_one_peer_exponential_reaches_exact_average_in_log2_n_rounds(n: int) -> None:
    schedule = make_schedule("one_peer_exponential", n)
    rounds = int(math.log2(n))
    assert schedule.period == rounds
    np.testing.assert_allclose(schedule.effective_matrix(rounds), np.full((n, n), 1 / n), atol=1e-15)
    # one round short of the period is not yet the average
    assert np.abs(schedule.effective_matrix(rounds - 1) - 1 / n).max() > 0.01
    # any starting round: the L rounds still cover every bit once
    np.testing.assert_allclose(
        schedule.effective_matrix(rounds, start_round=2), np.full((n, n), 1 / n), atol=1e-15
    )
    assert schedule.rho() == pytest.approx(0.0, abs=1e-12)
    assert schedule.consensus_rounds(1e-6) == rounds


def test_one_peer_exponential_round_pairs_each_node_with_one_peer() -> None:
    schedule = make_schedule("one_peer_exponential", 8)
    for round_index in range(6):
        bit = 1 << (round_index % 3)
        for node in range(8):
            assert schedule.neighbours(node, round_index) == (node ^ bit,)
            assert schedule.row(node, round_index) == tuple(sorted([(node, 0.5), (node ^ bit, 0.5)]))


@pytest.mark.parametrize("n", [6, 12])
def test_one_peer_exponential_union_is_connected_for_non_power_of_two(n: int) -> None:
    schedule = make_schedule("one_peer_exponential", n)
    assert schedule.period == math.ceil(math.log2(n))
    union = np.logical_or.reduce([schedule.matrix(r) != 0 for r in range(schedule.period)])
    assert _components(union) == 1
    # nodes whose partner index is >= n sit the round out with weight 1 on themselves
    top_bit_round = schedule.period - 1
    sitting_out = [i for i in range(n) if i ^ (1 << top_bit_round) >= n]
    assert sitting_out
    for node in sitting_out:
        assert schedule.row(node, top_bit_round) == ((node, 1.0),)
    # not an exact average within one period, but contracting
    assert np.abs(schedule.effective_matrix(schedule.period) - 1 / n).max() > 1e-3
    assert 0.0 < schedule.rho() < 1.0


def test_one_peer_exponential_rounds_are_each_a_matching() -> None:
    for matching in one_peer_exponential_adjacencies(12):
        assert matching.sum(axis=1).max() == 1


def test_uniform_weights_on_one_peer_need_power_of_two() -> None:
    schedule = make_schedule("one_peer_exponential", 8, weights="uniform")
    np.testing.assert_allclose(schedule.effective_matrix(3), np.full((8, 8), 1 / 8), atol=1e-15)
    with pytest.raises(MixingMatrixError, match="regular"):
        make_schedule("one_peer_exponential", 6, weights="uniform")


# ---------------------------------------------------------------------------------------------
# Random regular
# ---------------------------------------------------------------------------------------------


def test_random_regular_is_deterministic_per_seed_and_differs_across_seeds() -> None:
    first = random_regular_adjacency(20, 3, seed=11)
    again = random_regular_adjacency(20, 3, seed=11)
    other = random_regular_adjacency(20, 3, seed=12)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_random_regular_output_is_pinned() -> None:
    # Built from PCG64's raw stream, which numpy keeps stable across versions: agents on different
    # machines must agree on this graph, so a change here is a compatibility break.
    edges = np.argwhere(np.triu(random_regular_adjacency(12, 3, seed=7))).tolist()
    assert edges == [
        [0, 1], [0, 3], [0, 9], [1, 4], [1, 7], [2, 5], [2, 7], [2, 8], [3, 10],
        [3, 11], [4, 8], [4, 11], [5, 6], [5, 9], [6, 9], [6, 10], [7, 10], [8, 11],
    ]  # fmt: skip


@pytest.mark.parametrize(("n", "degree"), [(10, 3), (12, 4), (30, 7), (40, 2), (9, 8), (50, 12)])
def test_random_regular_is_regular_simple_and_connected(n: int, degree: int) -> None:
    for seed in range(3):
        adjacency = random_regular_adjacency(n, degree, seed=seed)
        assert set(adjacency.sum(axis=1).tolist()) == {degree}
        assert not adjacency.diagonal().any()
        np.testing.assert_array_equal(adjacency, adjacency.T)
        assert _components(adjacency) == 1


def test_random_regular_schedule_uses_seed_and_degree() -> None:
    schedule = make_schedule("random_regular", 10, degree=4, seed=3)
    np.testing.assert_array_equal(
        schedule.matrix(0) != 0, random_regular_adjacency(10, 4, 3) | np.eye(10, dtype=bool)
    )
    # uniform weights are allowed on a regular graph and give 1/(k+1)
    uniform = make_schedule("random_regular", 10, degree=4, seed=3, weights="uniform")
    assert {weight for _, weight in uniform.row(0, 0)} == {0.2}


@pytest.mark.parametrize(
    ("n", "degree", "message"),
    [
        (5, 3, "odd"),
        (4, 4, "more than 4 nodes"),
        (6, 1, "cannot be connected"),
        (6, 0, "cannot be connected"),
        (6, -1, "non-negative"),
    ],
)
def test_random_regular_refuses_impossible_requests(n: int, degree: int, message: str) -> None:
    with pytest.raises(TopologyError, match=message):
        random_regular_adjacency(n, degree)


def test_random_regular_gives_up_after_bounded_attempts() -> None:
    # 2-regular graphs on 60 nodes are rarely a single cycle, so one attempt almost never suffices.
    with pytest.raises(TopologyError, match="in 1 attempts"):
        for seed in range(50):
            random_regular_adjacency(60, 2, seed=seed, max_attempts=1)


def test_random_regular_requires_degree_and_other_topologies_refuse_it() -> None:
    with pytest.raises(TopologyError, match="needs degree"):
        make_schedule("random_regular", 8)
    with pytest.raises(TopologyError, match="only to random_regular"):
        make_schedule("ring", 8, degree=3)


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------


def test_metropolis_weights_on_irregular_graph() -> None:
    # star: centre 0 with degree 3, leaves with degree 1
    star = np.zeros((4, 4), dtype=bool)
    star[0, 1:] = star[1:, 0] = True
    weights = metropolis_weights(star)
    np.testing.assert_allclose(weights[0], [0.25, 0.25, 0.25, 0.25], atol=1e-15)
    np.testing.assert_allclose(weights[1], [0.25, 0.75, 0.0, 0.0], atol=1e-15)
    _assert_valid_mixing(weights)


def test_uniform_weights_refused_on_irregular_graph() -> None:
    path = np.array([[0, 1, 0], [1, 0, 1], [0, 1, 0]])
    with pytest.raises(
        MixingMatrixError, match=r"regular graph.*node 0 has degree 1 but node 1 has degree 2"
    ):
        uniform_weights(path)
    with pytest.raises(MixingMatrixError, match="regular"):
        make_schedule(path, 3, weights="uniform")


def test_uniform_weights_on_regular_graph() -> None:
    weights = uniform_weights(torus_adjacency(9))
    assert set(np.unique(weights).tolist()) == {0.0, 0.2}


def test_unknown_weights_name_is_refused() -> None:
    with pytest.raises(TopologyError, match=r"unknown weights 'max_degree'.*metropolis, uniform"):
        make_schedule("ring", 4, weights="max_degree")


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def test_asymmetric_matrix_error_names_the_entries() -> None:
    matrix = np.array([[0.5, 0.2, 0.3], [0.2, 0.6, 0.2], [0.2, 0.2, 0.6]])
    with pytest.raises(MixingMatrixError, match=r"not symmetric: W\[0,2\]=0.3 but W\[2,0\]=0.2"):
        validate_mixing_matrix(matrix)


def test_negative_entry_error_names_the_entry() -> None:
    matrix = np.array([[1.2, -0.2], [-0.2, 1.2]])
    with pytest.raises(MixingMatrixError, match=r"negative entry: W\[0,1\]=-0.2"):
        validate_mixing_matrix(matrix)


def test_row_sum_error_names_the_row() -> None:
    matrix = np.array([[0.5, 0.5, 0.0], [0.5, 0.4, 0.0], [0.0, 0.0, 0.9]])
    with pytest.raises(MixingMatrixError, match=r"row 1 sums to 0.9, expected 1"):
        validate_mixing_matrix(matrix)


def test_disconnected_two_component_graph_is_refused() -> None:
    block = np.full((2, 2), 0.5)
    matrix = np.block([[block, np.zeros((2, 2))], [np.zeros((2, 2)), block]])
    with pytest.raises(MixingMatrixError, match="disconnected: node 0 reaches only 2 of 4 nodes; node 2"):
        validate_mixing_matrix(matrix)
    # the same matrix is acceptable when connectivity is not demanded (one round of a period)
    validate_mixing_matrix(matrix, require_connected=False)
    two_edges = np.zeros((4, 4), dtype=bool)
    two_edges[0, 1] = two_edges[1, 0] = two_edges[2, 3] = two_edges[3, 2] = True
    with pytest.raises(MixingMatrixError, match="disconnected"):
        make_schedule(two_edges, 4)


def test_non_square_and_nan_are_refused() -> None:
    with pytest.raises(MixingMatrixError, match=r"square matrix, got shape \(2, 3\)"):
        validate_mixing_matrix(np.full((2, 3), 1 / 3))
    matrix = np.full((2, 2), 0.5)
    matrix[1, 0] = np.nan
    with pytest.raises(MixingMatrixError, match=r"non-finite entry: W\[1,0\]=nan"):
        validate_mixing_matrix(matrix)


def test_error_classes_are_value_errors() -> None:
    assert issubclass(MixingMatrixError, ValueError)
    assert issubclass(TopologyError, ValueError)


def test_time_varying_schedule_needs_connected_union_only() -> None:
    first = np.array([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    second = np.array([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5], [0.0, 0.5, 0.5]])
    schedule = schedule_from_matrix([first, second])
    assert schedule.period == 2
    np.testing.assert_array_equal(schedule.matrix(3), second)
    with pytest.raises(MixingMatrixError, match="union graph over one period is disconnected"):
        schedule_from_matrix([first, first])


def test_time_varying_error_names_the_round() -> None:
    good = np.full((2, 2), 0.5)
    bad = np.array([[0.5, 0.6], [0.6, 0.5]])
    with pytest.raises(MixingMatrixError, match=r"round 1 of the period: .*row 0 sums to 1.1"):
        schedule_from_matrix([good, bad])
    with pytest.raises(MixingMatrixError, match="share one shape"):
        schedule_from_matrix([good, np.eye(3)])


def test_adjacency_validation() -> None:
    with pytest.raises(MixingMatrixError, match=r"0 or 1: A\[0,1\]=2"):
        schedule_from_adjacency(np.array([[0, 2], [2, 0]]))
    with pytest.raises(
        MixingMatrixError, match=r"adjacency is not symmetric: A\[0,2\]=True but A\[2,0\]=False"
    ):
        schedule_from_adjacency(np.array([[0, 1, 1], [1, 0, 1], [0, 1, 0]], dtype=bool))
    # self loops on the diagonal are ignored, not refused
    with_loops = ring_adjacency(5) | np.eye(5, dtype=bool)
    np.testing.assert_array_equal(
        schedule_from_adjacency(with_loops).matrix(0), make_schedule("ring", 5).matrix(0)
    )


# ---------------------------------------------------------------------------------------------
# make_schedule inputs
# ---------------------------------------------------------------------------------------------


def test_unknown_topology_lists_valid_names() -> None:
    with pytest.raises(TopologyError, match="unknown topology 'star'; valid: ring, torus, complete"):
        make_schedule("star", 4)


def test_integer_adjacency_gets_weights_and_float_matrix_is_used_as_is() -> None:
    adjacency = ring_adjacency(6).astype(int)
    np.testing.assert_array_equal(make_schedule(adjacency, 6).matrix(0), make_schedule("ring", 6).matrix(0))
    lazy_ring = 0.5 * np.eye(6) + 0.25 * (ring_adjacency(6).astype(float))
    schedule = make_schedule(lazy_ring, 6, weights="uniform")
    np.testing.assert_array_equal(schedule.matrix(0), lazy_ring)
    assert schedule.name == "explicit"


def test_matrix_size_must_match_n() -> None:
    with pytest.raises(MixingMatrixError, match=r"shape \(4, 4\) but n=5"):
        make_schedule(ring_adjacency(4), 5)
    with pytest.raises(MixingMatrixError, match="2x2 but n=3"):
        make_schedule([np.full((2, 2), 0.5)], 3)


def test_sequence_input_is_time_varying_explicit_schedule() -> None:
    matchings = [metropolis_weights(a) for a in one_peer_exponential_adjacencies(4)]
    schedule = make_schedule(matchings, 4)
    assert schedule.period == 2
    np.testing.assert_allclose(schedule.effective_matrix(2), np.full((4, 4), 0.25), atol=1e-15)
    with pytest.raises(MixingMatrixError, match=r"element 0 has shape \(2,\)"):
        make_schedule([[0.5, 0.5], [0.5, 0.5]], 2)  # type: ignore[list-item]


# ---------------------------------------------------------------------------------------------
# Schedule API
# ---------------------------------------------------------------------------------------------


def test_rows_are_sorted_include_self_and_sum_to_one() -> None:
    for name in TOPOLOGY_NAMES:
        schedule = _build(name, 9)
        for round_index in range(2 * schedule.period):
            for node in range(9):
                row = schedule.row(node, round_index)
                peers = [peer for peer, _ in row]
                assert peers == sorted(peers)
                assert node in peers
                assert all(weight > 0 and isinstance(weight, float) for _, weight in row)
                assert math.fsum(weight for _, weight in row) == pytest.approx(1.0, abs=1e-12)
                assert schedule.neighbours(node, round_index) == tuple(p for p in peers if p != node)


def test_matrices_are_read_only_copies() -> None:
    source = np.full((2, 2), 0.5)
    schedule = schedule_from_matrix(source)
    source[0, 0] = 0.9
    assert schedule.matrix(0)[0, 0] == 0.5
    with pytest.raises(ValueError, match="read-only"):
        schedule.matrix(0)[0, 0] = 0.1


def test_effective_matrix_is_ordered_product() -> None:
    static = make_schedule("ring", 5)
    np.testing.assert_allclose(
        static.effective_matrix(4), np.linalg.matrix_power(static.matrix(0), 4), atol=1e-14
    )
    np.testing.assert_array_equal(static.effective_matrix(0), np.eye(5))
    varying = make_schedule("one_peer_exponential", 6)
    expected = varying.matrix(2) @ varying.matrix(1)
    np.testing.assert_allclose(varying.effective_matrix(2, start_round=1), expected, atol=1e-15)
    with pytest.raises(TopologyError, match="non-negative"):
        varying.effective_matrix(-1)


def test_rho_per_iteration_and_time_varying_definition() -> None:
    ring = make_schedule("ring", 8)
    assert ring.rho(rounds_per_iteration=3) == pytest.approx(spectral_rho(ring.matrix(0)) ** 3, rel=1e-12)
    varying = make_schedule("one_peer_exponential", 6)
    product = varying.effective_matrix(varying.period)
    period_contraction = np.linalg.norm(product - 1 / 6, 2)
    assert varying.rho(varying.period) == pytest.approx(period_contraction, rel=1e-12)
    assert varying.consensus_rounds(1e-3) % varying.period == 0
    with pytest.raises(TopologyError, match="at least 1"):
        ring.rho(0)


def test_round_and_node_indices_are_checked() -> None:
    schedule = make_schedule("ring", 4)
    with pytest.raises(TopologyError, match="node 4 out of range for 4 nodes"):
        schedule.row(4, 0)
    with pytest.raises(TopologyError, match="round_index must be non-negative"):
        schedule.matrix(-1)
    assert schedule.row(np.int64(1), np.int64(7)) == schedule.row(1, 0)


# ---------------------------------------------------------------------------------------------
# Spectral helpers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("rho", "delta"), [(0.805, 1e-3), (0.333, 0.5), (0.987, 1e-6), (0.5, 0.25)])
def test_rounds_for_consensus_matches_formula(rho: float, delta: float) -> None:
    rounds = rounds_for_consensus(rho, delta)
    assert rounds == math.ceil(math.log(delta) / math.log(rho))
    assert rho**rounds <= delta * (1 + 1e-12)
    assert rho ** (rounds - 1) > delta or rounds == 1


def test_rounds_for_consensus_edge_cases() -> None:
    assert rounds_for_consensus(0.0, 0.01) == 1
    assert rounds_for_consensus(0.9, 0.95) == 1
    with pytest.raises(TopologyError, match=">= 1"):
        rounds_for_consensus(1.0, 0.1)
    for bad_delta in (0.0, 1.0, -0.5, 2.0):
        with pytest.raises(TopologyError, match="delta must lie in"):
            rounds_for_consensus(0.5, bad_delta)


def test_spectral_rho_of_lone_node_and_of_bipartite_without_self_weight() -> None:
    assert spectral_rho(np.ones((1, 1))) == 0.0
    # a 4-cycle with weight 1/2 per neighbour and none on itself oscillates: eigenvalue -1
    oscillating = 0.5 * ring_adjacency(4).astype(float)
    assert spectral_rho(oscillating) == pytest.approx(1.0, abs=1e-12)
