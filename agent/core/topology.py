"""Communication topologies and gossip mixing matrices: who mixes with whom, with which weight.

This module is the single source of truth for the mixing weights used by both the in-process simulator
and the networked agents, so every function here is deterministic: the same inputs give bit-identical
matrices on every machine and every numpy version (see ``_DeterministicStream`` for the random graph).

Conventions
-----------
* An *adjacency* is an ``n x n`` symmetric numpy bool matrix with a False diagonal (no self loops).
* A *mixing matrix* ``W`` is square, finite, symmetric, non-negative and doubly stochastic; one gossip
  round maps the stacked node states ``X`` to ``W @ X``. Its graph (non-zero off-diagonal entries) must
  be connected, or for a time-varying schedule the union of the graphs over one period must be.
* A ``MixingSchedule`` holds one matrix per round of its period; round ``r`` (the global gossip round
  counter, ``iteration * rounds_per_iteration + r``) uses ``matrices[r % period]``.
* ``MixingSchedule.row`` gives the canonical summation order (ascending node index, self included) that
  the simulator and the networked agents both follow.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from agent.core.names import TOPOLOGY_NAMES, WEIGHT_NAMES

# Tolerance for symmetry and stochasticity checks: loose enough for matrices typed in by hand with
# 1/3 rounded in the last bits, tight enough that a genuinely wrong weight is never accepted.
MATRIX_ATOL = 1e-9


def _matrix_atol(dtype: np.dtype, n: int) -> float:
    """MATRIX_ATOL, or for a matrix held in a float type narrower than float64 (a float32 torch tensor:
    1/3 is 0.3333333433 there, so a row of three sums to 1 + 3e-8) the rounding of n entries of it."""
    if np.issubdtype(dtype, np.floating) and np.finfo(dtype).eps > np.finfo(np.float64).eps:
        return max(MATRIX_ATOL, 2 * n * float(np.finfo(dtype).eps))
    return MATRIX_ATOL


DEFAULT_MAX_ATTEMPTS = 100


class TopologyError(ValueError):
    """A topology request is malformed: unknown name, bad node count, impossible degree, bad index."""


class MixingMatrixError(TopologyError):
    """A mixing matrix (or adjacency) violates a requirement; the message names the offending entry."""


# --------------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------------


def _as_int(value: object, what: str) -> int:
    # bool is an int subclass, but `ring(True)` is always a mistake worth reporting.
    if isinstance(value, bool):
        raise TopologyError(f"{what} must be an integer, got bool {value!r}")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TopologyError(f"{what} must be an integer, got {type(value).__name__} {value!r}") from None


def _check_node_count(n: object) -> int:
    count = _as_int(n, "node count n")
    if count < 1:
        raise TopologyError(f"node count n must be at least 1, got {count}")
    return count


def _fmt(value: float) -> str:
    return f"{float(value):.12g}"


# --------------------------------------------------------------------------------------------------
# Graph builders (adjacency matrices)
# --------------------------------------------------------------------------------------------------


def _adjacency_from_edges(n: int, edges: list[tuple[int, int]]) -> np.ndarray:
    adjacency = np.zeros((n, n), dtype=bool)
    for i, j in edges:
        if i != j:
            adjacency[i, j] = True
            adjacency[j, i] = True
    return adjacency


def ring_adjacency(n: int) -> np.ndarray:
    """Cycle i -- i+1 (mod n). n=2 is a single edge; n=1 is a lone node with no edges."""
    n = _check_node_count(n)
    return _adjacency_from_edges(n, [(i, (i + 1) % n) for i in range(n)])


def torus_shape(n: int) -> tuple[int, int]:
    """The most square factorisation ``rows * cols = n`` with ``rows <= cols``.

    Maximising the smaller side means both sides are >= 3 whenever any factorisation allows it.
    """
    n = _check_node_count(n)
    rows = math.isqrt(n)
    while n % rows:
        rows -= 1
    return rows, n // rows


def torus_adjacency(n: int) -> np.ndarray:
    """2-D torus on the ``torus_shape(n)`` grid; node ``i * cols + j`` sits at row i, column j.

    Each node links to its row and column neighbours with wrap-around, so degree 4 when both sides are
    >= 3. Small or awkward n degenerate, deliberately rather than with an error:
    * a side of 2 wraps onto the same neighbour, so that dimension contributes one edge, not two
      (n=4 is a 2x2 torus, i.e. a 4-cycle; n=6 and n=8 are prisms of degree 3);
    * a side of 1 contributes nothing, so a prime n is a 1 x n torus, i.e. a ring.
    """
    rows, cols = torus_shape(n)
    edges: list[tuple[int, int]] = []
    for i in range(rows):
        for j in range(cols):
            node = i * cols + j
            edges.append((node, ((i + 1) % rows) * cols + j))
            edges.append((node, i * cols + (j + 1) % cols))
    return _adjacency_from_edges(rows * cols, edges)


def complete_adjacency(n: int) -> np.ndarray:
    """Every pair of distinct nodes linked."""
    n = _check_node_count(n)
    return ~np.eye(n, dtype=bool)


def exponential_adjacency(n: int) -> np.ndarray:
    """Static exponential graph: i -- i ± 2^k (mod n) for k = 0 .. floor(log2(n - 1)), symmetrised."""
    n = _check_node_count(n)
    if n == 1:
        return np.zeros((1, 1), dtype=bool)
    # bit_length avoids float log2 rounding: floor(log2(m)) == m.bit_length() - 1 exactly.
    max_exponent = (n - 1).bit_length() - 1
    edges = [(i, (i + (1 << k)) % n) for i in range(n) for k in range(max_exponent + 1)]
    return _adjacency_from_edges(n, edges)


def one_peer_exponential_period(n: int) -> int:
    """Rounds in one period of the one-peer exponential graph: ceil(log2 n), at least 1."""
    n = _check_node_count(n)
    return max((n - 1).bit_length(), 1)


def one_peer_exponential_adjacencies(n: int) -> tuple[np.ndarray, ...]:
    """Per-round matchings of the time-varying one-peer exponential graph.

    In round r node i pairs with exactly one peer ``i XOR 2^(r mod L)``, L = ceil(log2 n). Pairing is
    an involution, so the matching is symmetric. When the partner index is >= n (only possible if n is
    not a power of two) node i sits the round out. Metropolis weights on a matching give exactly 1/2
    to each partner and 1 to a node sitting out.

    For n a power of two, the L rounds average over each bit of the index in turn (a hypercube sweep),
    so their product is exactly 11ᵀ/n. Otherwise the exact average is not reached in L rounds, but the
    union of the L matchings is still connected: for a node i > 0 with highest set bit b, 2^b <= i < n
    <= 2^L gives b < L, and i XOR 2^b clears that bit, so it is a smaller index (hence < n, a real
    partner) met in round b. Following such edges strictly decreases the index and ends at node 0, so
    every node is linked to node 0.
    """
    n = _check_node_count(n)
    period = one_peer_exponential_period(n)
    rounds: list[np.ndarray] = []
    for bit in range(period):
        edges = [(i, i ^ (1 << bit)) for i in range(n) if (i ^ (1 << bit)) < n]
        rounds.append(_adjacency_from_edges(n, edges))
    return tuple(rounds)


class _DeterministicStream:
    """Uniform integers from the raw 64-bit output of a PCG64 bit generator.

    numpy guarantees that bit generators and SeedSequence produce the same stream in every version,
    but not that ``Generator`` methods (shuffle, integers) keep their algorithms. Agents on different
    machines must build the same random graph, so the shuffle is done here on top of the raw stream.
    """

    def __init__(self, seed: int) -> None:
        self._bits = np.random.PCG64(seed)

    def below(self, bound: int) -> int:
        # Rejection sampling removes the modulo bias that `raw % bound` alone would have.
        limit = (1 << 64) - ((1 << 64) % bound)
        while True:
            raw = int(self._bits.random_raw())
            if raw < limit:
                return raw % bound

    def shuffle(self, items: list[int]) -> None:
        for i in range(len(items) - 1, 0, -1):
            j = self.below(i + 1)
            items[i], items[j] = items[j], items[i]


def _try_random_regular(n: int, degree: int, stream: _DeterministicStream) -> np.ndarray | None:
    """One attempt of the pairing model with incremental repair (Steger & Wormald, as in networkx).

    Plain rejection of the configuration model succeeds with probability ~exp(-(k²-1)/4), hopeless
    beyond k of about 6; re-pairing only the stubs that formed loops or duplicate edges keeps it cheap.
    Returns None when the leftover stubs cannot be paired (the caller retries).
    """
    adjacency = np.zeros((n, n), dtype=bool)
    stubs = [node for node in range(n) for _ in range(degree)]
    while stubs:
        leftover = np.zeros(n, dtype=np.int64)
        stream.shuffle(stubs)
        for a, b in zip(stubs[0::2], stubs[1::2], strict=True):
            if a != b and not adjacency[a, b]:
                adjacency[a, b] = adjacency[b, a] = True
            else:
                leftover[a] += 1
                leftover[b] += 1
        open_nodes = np.flatnonzero(leftover)
        if open_nodes.size == 0:
            return adjacency
        # Some pair of distinct open nodes must still be unlinked, or no valid pairing exists.
        among_open = adjacency[np.ix_(open_nodes, open_nodes)] | np.eye(open_nodes.size, dtype=bool)
        if among_open.all():
            return None
        stubs = [int(node) for node in open_nodes for _ in range(int(leftover[node]))]
    return adjacency


def random_regular_adjacency(
    n: int, degree: int, seed: int = 0, *, max_attempts: int = DEFAULT_MAX_ATTEMPTS
) -> np.ndarray:
    """A connected simple ``degree``-regular graph, a deterministic function of (n, degree, seed).

    Attempts draw from one seeded stream in sequence; an attempt whose pairing gets stuck or whose
    graph is disconnected is discarded. Raises TopologyError after ``max_attempts`` failures.
    """
    n = _check_node_count(n)
    degree = _as_int(degree, "degree")
    seed = _as_int(seed, "seed")
    max_attempts = _as_int(max_attempts, "max_attempts")
    if seed < 0:
        raise TopologyError(f"seed must be non-negative, got {seed}")
    if max_attempts < 1:
        raise TopologyError(f"max_attempts must be at least 1, got {max_attempts}")
    if degree < 0:
        raise TopologyError(f"degree must be non-negative, got {degree}")
    if degree >= n and not (n == 1 and degree == 0):
        raise TopologyError(f"degree {degree} needs more than {degree} nodes, got n={n}")
    if (n * degree) % 2:
        raise TopologyError(f"no {degree}-regular graph on {n} nodes exists: n*degree={n * degree} is odd")
    if n == 1:
        return np.zeros((1, 1), dtype=bool)
    if degree == 0 or (degree == 1 and n > 2):
        raise TopologyError(f"a {degree}-regular graph on {n} nodes cannot be connected; use degree >= 2")
    stream = _DeterministicStream(seed)
    for _ in range(max_attempts):
        adjacency = _try_random_regular(n, degree, stream)
        if adjacency is not None and _unreachable_from_node_zero(adjacency).size == 0:
            return adjacency
    raise TopologyError(
        f"no connected {degree}-regular graph on {n} nodes found in {max_attempts} attempts (seed={seed})"
    )


def validate_adjacency(adjacency: np.ndarray) -> np.ndarray:
    """Check a user-given adjacency; returns a bool copy with the diagonal cleared.

    Accepts bool or numeric 0/1 entries. Self loops on the diagonal are ignored: the mixing weights
    put each node's own weight there anyway.
    """
    matrix = np.asarray(adjacency)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
        raise MixingMatrixError(f"adjacency must be a non-empty square matrix, got shape {matrix.shape}")
    if matrix.dtype != bool:
        if not np.issubdtype(matrix.dtype, np.number):
            raise MixingMatrixError(f"adjacency must be boolean or 0/1, got dtype {matrix.dtype}")
        bad = np.argwhere((matrix != 0) & (matrix != 1))
        if bad.size:
            i, j = (int(x) for x in bad[0])
            raise MixingMatrixError(f"adjacency entries must be 0 or 1: A[{i},{j}]={matrix[i, j].item()!r}")
        matrix = matrix == 1
    result = matrix.copy()
    np.fill_diagonal(result, False)
    asymmetric = np.argwhere(result != result.T)
    if asymmetric.size:
        i, j = (int(x) for x in asymmetric[0])
        raise MixingMatrixError(
            f"adjacency is not symmetric: A[{i},{j}]={bool(result[i, j])} but A[{j},{i}]={bool(result[j, i])}"
        )
    return result


# --------------------------------------------------------------------------------------------------
# Mixing weights
# --------------------------------------------------------------------------------------------------


def _fill_self_weights(weights: np.ndarray) -> np.ndarray:
    # fsum is correctly rounded, so the self weight does not depend on summation order or SIMD width.
    for i in range(weights.shape[0]):
        weights[i, i] = 0.0
        weights[i, i] = 1.0 - math.fsum(weights[i].tolist())
    return weights


def metropolis_weights(adjacency: np.ndarray) -> np.ndarray:
    """Metropolis–Hastings: w_ij = 1 / (1 + max(deg_i, deg_j)) on edges, w_ii = 1 - Σ_j w_ij.

    Symmetric and doubly stochastic for any graph, with w_ii >= 1/(1 + deg_i) > 0.
    """
    graph = validate_adjacency(adjacency)
    degrees = graph.sum(axis=1)
    larger_degree = np.maximum(degrees[:, None], degrees[None, :])
    weights = np.where(graph, 1.0 / (1.0 + larger_degree), 0.0)
    return _fill_self_weights(weights)


def uniform_weights(adjacency: np.ndarray) -> np.ndarray:
    """Every node gives 1/(deg + 1) to itself and to each neighbour; only doubly stochastic if regular."""
    graph = validate_adjacency(adjacency)
    degrees = graph.sum(axis=1)
    if np.any(degrees != degrees[0]):
        differing = int(np.flatnonzero(degrees != degrees[0])[0])
        raise MixingMatrixError(
            "uniform weights need a regular graph (else W is not doubly stochastic): "
            f"node 0 has degree {int(degrees[0])} but node {differing} has degree {int(degrees[differing])}; "
            "use weights='metropolis'"
        )
    weights = np.where(graph, 1.0 / (1.0 + float(degrees[0])), 0.0)
    np.fill_diagonal(weights, 1.0 / (1.0 + float(degrees[0])))
    return weights


def _apply_weights(adjacency: np.ndarray, weights: str) -> np.ndarray:
    if weights == "metropolis":
        return metropolis_weights(adjacency)
    if weights == "uniform":
        return uniform_weights(adjacency)
    raise TopologyError(f"unknown weights {weights!r}; valid: {', '.join(WEIGHT_NAMES)}")


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


def _unreachable_from_node_zero(pattern: np.ndarray) -> np.ndarray:
    """Indices of nodes with no path from node 0 in the graph of non-zero off-diagonal entries."""
    links = pattern != 0
    reached = np.zeros(links.shape[0], dtype=bool)
    reached[0] = True
    frontier = np.array([0])
    while frontier.size:
        newly = links[frontier].any(axis=0) & ~reached
        reached |= newly
        frontier = np.flatnonzero(newly)
    return np.flatnonzero(~reached)


def _disconnected_message(what: str, pattern: np.ndarray) -> str | None:
    unreachable = _unreachable_from_node_zero(pattern)
    if unreachable.size == 0:
        return None
    reached = pattern.shape[0] - unreachable.size
    return (
        f"{what} is disconnected: node 0 reaches only {reached} of {pattern.shape[0]} nodes; "
        f"node {int(unreachable[0])} is unreachable"
    )


def validate_mixing_matrix(matrix: np.ndarray, *, require_connected: bool = True) -> np.ndarray:
    """Check that ``matrix`` is a valid mixing matrix; returns it as a float64 copy.

    Requirements, checked in this order so the first message names the root problem: square, finite,
    symmetric and rows/columns summing to 1 (within MATRIX_ATOL; for float32 or float16 entries within
    the rounding of the row in that type), non-negative, connected.
    """
    raw = np.asarray(matrix)
    if raw.ndim != 2 or raw.shape[0] != raw.shape[1] or raw.shape[0] == 0:
        raise MixingMatrixError(f"mixing matrix must be a non-empty square matrix, got shape {raw.shape}")
    if not (np.issubdtype(raw.dtype, np.number) or raw.dtype == bool) or np.iscomplexobj(raw):
        raise MixingMatrixError(f"mixing matrix must hold real numbers, got dtype {raw.dtype}")
    weights = raw.astype(np.float64)
    atol = _matrix_atol(raw.dtype, raw.shape[0])
    not_finite = np.argwhere(~np.isfinite(weights))
    if not_finite.size:
        i, j = (int(x) for x in not_finite[0])
        raise MixingMatrixError(f"mixing matrix has a non-finite entry: W[{i},{j}]={weights[i, j]}")
    asymmetric = np.argwhere(np.abs(weights - weights.T) > atol)
    if asymmetric.size:
        i, j = (int(x) for x in asymmetric[0])
        raise MixingMatrixError(
            f"mixing matrix is not symmetric: W[{i},{j}]={_fmt(weights[i, j])} "
            f"but W[{j},{i}]={_fmt(weights[j, i])}"
        )
    negative = np.argwhere(weights < 0)
    if negative.size:
        i, j = (int(x) for x in negative[0])
        raise MixingMatrixError(f"mixing matrix has a negative entry: W[{i},{j}]={_fmt(weights[i, j])}")
    for axis, kind in ((1, "row"), (0, "column")):
        sums = weights.sum(axis=axis)
        off = np.flatnonzero(np.abs(sums - 1.0) > atol)
        if off.size:
            index = int(off[0])
            raise MixingMatrixError(
                f"mixing matrix {kind} {index} sums to {_fmt(sums[index])}, expected 1 (atol {atol:g})"
            )
    if require_connected:
        problem = _disconnected_message("mixing matrix graph", weights)
        if problem:
            raise MixingMatrixError(problem)
    return weights


# --------------------------------------------------------------------------------------------------
# Spectral helpers
# --------------------------------------------------------------------------------------------------


def spectral_rho(matrix: np.ndarray) -> float:
    """ρ = max(|λ2|, |λn|) of a symmetric doubly stochastic W: the per-round consensus contraction.

    Equals the spectral norm of W - 11ᵀ/n. A lone node (1 x 1) has no disagreement to contract: ρ = 0.
    """
    weights = validate_mixing_matrix(matrix, require_connected=False)
    if weights.shape[0] == 1:
        return 0.0
    eigenvalues = np.linalg.eigvalsh(weights)  # ascending
    return float(max(abs(eigenvalues[-2]), abs(eigenvalues[0])))


def spectral_gap(matrix: np.ndarray) -> float:
    """1 - ρ; positive exactly when gossip with W converges to the average."""
    return 1.0 - spectral_rho(matrix)


def rounds_for_consensus(rho: float, delta: float) -> int:
    """Smallest t with ρ^t <= δ: t = ceil(log δ / log ρ); 1 when ρ == 0 (one round averages exactly)."""
    rho = float(rho)
    delta = float(delta)
    if not 0.0 < delta < 1.0:
        raise TopologyError(f"consensus accuracy delta must lie in (0, 1), got {delta}")
    if not math.isfinite(rho) or rho < 0.0:
        raise TopologyError(f"contraction factor rho must be a finite number >= 0, got {rho}")
    if rho >= 1.0:
        raise TopologyError(
            f"contraction factor rho={rho} >= 1: gossip never reaches consensus "
            "(disconnected graph, or a bipartite one without self weights)"
        )
    if rho == 0.0:
        return 1
    # max(.., 1): t = 0 would mean no mixing at all, which reaches no consensus.
    return max(math.ceil(math.log(delta) / math.log(rho)), 1)


# --------------------------------------------------------------------------------------------------
# Schedule
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class MixingSchedule:
    """Mixing matrices for one period of gossip rounds (length 1 for a static graph).

    Construction validates every matrix (union graph over the period must be connected) and stores
    read-only float64 copies, so a schedule shared between simulator and agents cannot drift.
    Compared by identity (eq=False): element-wise array equality has no single truth value.
    """

    matrices: tuple[np.ndarray, ...]
    name: str
    _rows: tuple[tuple[tuple[tuple[int, float], ...], ...], ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise TopologyError(f"schedule name must be a non-empty string, got {self.name!r}")
        if isinstance(self.matrices, np.ndarray) or not isinstance(self.matrices, Sequence):
            raise TopologyError("matrices must be a sequence of 2-D matrices, one per round of the period")
        if len(self.matrices) == 0:
            raise MixingMatrixError("a mixing schedule needs at least one matrix")
        checked: list[np.ndarray] = []
        for round_in_period, matrix in enumerate(self.matrices):
            try:
                weights = validate_mixing_matrix(matrix, require_connected=False)
            except MixingMatrixError as error:
                if len(self.matrices) == 1:
                    raise
                raise MixingMatrixError(f"round {round_in_period} of the period: {error}") from None
            if checked and weights.shape != checked[0].shape:
                raise MixingMatrixError(
                    f"all matrices of a schedule must share one shape: round 0 has {checked[0].shape}, "
                    f"round {round_in_period} has {weights.shape}"
                )
            weights.flags.writeable = False
            checked.append(weights)
        union = np.logical_or.reduce([weights != 0 for weights in checked])
        what = "mixing matrix graph" if len(checked) == 1 else "union graph over one period"
        problem = _disconnected_message(what, union)
        if problem:
            raise MixingMatrixError(problem)
        object.__setattr__(self, "matrices", tuple(checked))
        rows = tuple(
            tuple(
                tuple((int(j), float(weights[i, j])) for j in np.flatnonzero(weights[i]))
                for i in range(weights.shape[0])
            )
            for weights in checked
        )
        object.__setattr__(self, "_rows", rows)

    @property
    def n(self) -> int:
        """Number of nodes."""
        return self.matrices[0].shape[0]

    @property
    def period(self) -> int:
        """Number of distinct rounds before the schedule repeats."""
        return len(self.matrices)

    def _round_slot(self, round_index: int) -> int:
        index = _as_int(round_index, "round_index")
        if index < 0:
            raise TopologyError(f"round_index must be non-negative, got {index}")
        return index % self.period

    def _node(self, node: int) -> int:
        index = _as_int(node, "node")
        if not 0 <= index < self.n:
            raise TopologyError(f"node {index} out of range for {self.n} nodes")
        return index

    def matrix(self, round_index: int) -> np.ndarray:
        """The (read-only) matrix of global gossip round ``round_index``, taken mod the period."""
        return self.matrices[self._round_slot(round_index)]

    def row(self, node: int, round_index: int) -> tuple[tuple[int, float], ...]:
        """Non-zero (peer, weight) pairs of ``node``'s row, itself included, by ascending peer index.

        This order is the canonical summation order for mixing.
        """
        return self._rows[self._round_slot(round_index)][self._node(node)]

    def neighbours(self, node: int, round_index: int) -> tuple[int, ...]:
        """Peers ``node`` exchanges with in that round (non-zero off-diagonal), ascending."""
        own = self._node(node)
        return tuple(peer for peer, _ in self.row(own, round_index) if peer != own)

    def effective_matrix(self, rounds: int, start_round: int = 0) -> np.ndarray:
        """Product W_{s+R-1} ··· W_{s+1} W_s of ``rounds`` rounds from ``start_round`` s (W^R if static).

        ``rounds == 0`` gives the identity.
        """
        count = _as_int(rounds, "rounds")
        if count < 0:
            raise TopologyError(f"rounds must be non-negative, got {count}")
        start = self._round_slot(start_round)
        product = np.eye(self.n)
        for offset in range(count):
            product = self.matrices[(start + offset) % self.period] @ product
        return product

    def per_round_rho(self) -> float:
        """Contraction per gossip round.

        Static: spectral_rho(W). Time-varying: the period product P need not be symmetric, so its
        contraction is the spectral norm ||P - 11ᵀ/n||₂, spread evenly over the rounds as a geometric
        mean: ||P - 11ᵀ/n||₂^(1/period). That is exact per whole period, an average within one.
        """
        if self.period == 1:
            return spectral_rho(self.matrices[0])
        product = self.effective_matrix(self.period)
        disagreement = product - np.full((self.n, self.n), 1.0 / self.n)
        return float(np.linalg.norm(disagreement, 2)) ** (1.0 / self.period)

    def rho(self, rounds_per_iteration: int = 1) -> float:
        """Contraction per iteration of ``rounds_per_iteration`` gossip rounds: per_round_rho() ** t."""
        rounds = _as_int(rounds_per_iteration, "rounds_per_iteration")
        if rounds < 1:
            raise TopologyError(f"rounds_per_iteration must be at least 1, got {rounds}")
        return self.per_round_rho() ** rounds

    def consensus_rounds(self, delta: float) -> int:
        """Gossip rounds that shrink disagreement by a factor of at least δ.

        For a time-varying schedule this is whole periods (the geometric-mean ρ of one-peer
        exponential is 0 for n a power of two, yet averaging takes L rounds, not 1).
        """
        if self.period == 1:
            return rounds_for_consensus(spectral_rho(self.matrices[0]), delta)
        per_period = self.per_round_rho() ** self.period
        return rounds_for_consensus(per_period, delta) * self.period


# --------------------------------------------------------------------------------------------------
# Factories
# --------------------------------------------------------------------------------------------------


def schedule_from_adjacency(
    adjacency: np.ndarray, weights: str = "metropolis", name: str = "adjacency"
) -> MixingSchedule:
    """Static schedule from a user-given adjacency (diagonal ignored) with the chosen weights."""
    return MixingSchedule(matrices=(_apply_weights(adjacency, weights),), name=name)


def schedule_from_matrix(
    matrices: np.ndarray | Sequence[np.ndarray], name: str = "explicit"
) -> MixingSchedule:
    """Schedule from explicit mixing matrices, used as given after validation.

    One 2-D matrix gives a static schedule; a sequence of 2-D matrices (or a 3-D array) gives a
    time-varying one with that period.
    """
    if isinstance(matrices, np.ndarray):
        if matrices.ndim == 2:
            return MixingSchedule(matrices=(matrices,), name=name)
        if matrices.ndim == 3:
            return MixingSchedule(matrices=tuple(matrices), name=name)
        raise MixingMatrixError(f"explicit mixing matrices must be 2-D or a 3-D stack, got {matrices.shape}")
    if isinstance(matrices, str) or not isinstance(matrices, Sequence):
        raise TopologyError(f"expected a matrix or a sequence of matrices, got {type(matrices).__name__}")
    converted = [np.asarray(matrix) for matrix in matrices]
    for round_in_period, matrix in enumerate(converted):
        if matrix.ndim != 2:
            raise MixingMatrixError(
                f"each matrix of a time-varying schedule must be 2-D; element {round_in_period} "
                f"has shape {matrix.shape}"
            )
    return MixingSchedule(matrices=tuple(converted), name=name)


def _looks_like_adjacency(matrix: np.ndarray) -> bool:
    if matrix.dtype == bool:
        return True
    if not np.issubdtype(matrix.dtype, np.number) or np.iscomplexobj(matrix):
        return False
    return bool(np.all((matrix == 0) | (matrix == 1)))


def _named_adjacencies(topology: str, n: int, degree: int | None, seed: int) -> tuple[np.ndarray, ...]:
    if topology == "ring":
        return (ring_adjacency(n),)
    if topology == "torus":
        return (torus_adjacency(n),)
    if topology == "complete":
        return (complete_adjacency(n),)
    if topology == "exponential":
        return (exponential_adjacency(n),)
    if topology == "one_peer_exponential":
        return one_peer_exponential_adjacencies(n)
    if degree is None:
        raise TopologyError("random_regular needs degree=k (n*k even, 2 <= k < n), e.g. degree=3 for even n")
    return (random_regular_adjacency(n, degree, seed),)


def make_schedule(
    topology: str | np.ndarray | Sequence[np.ndarray],
    n: int,
    *,
    weights: str = "metropolis",
    degree: int | None = None,
    seed: int = 0,
) -> MixingSchedule:
    """Build the mixing schedule for ``n`` nodes.

    ``topology`` is one of:
    * a name in TOPOLOGY_NAMES. ``weights`` ("metropolis" default, or "uniform" for regular graphs)
      turns each round's graph into weights; one_peer_exponential's rounds are matchings, where
      Metropolis gives 1/2 per partner and 1 to a node sitting out. ``degree`` is required for
      random_regular and refused for the others (no default: k=3, the obvious one, fails for every odd
      n, so a silent default would only move the error); ``seed`` picks the random_regular graph and is
      unused otherwise.
    * a 2-D array. A bool array, or a numeric one whose entries are all 0 or 1, is an adjacency
      (diagonal ignored) and gets ``weights``. Anything else is an explicit mixing matrix, validated and
      used as is (``weights`` unused). The only overlap, a 0/1 matrix that is also doubly stochastic,
      is a permutation; read as a mixing matrix it would just swap values and never average, so the
      adjacency reading is the useful one.
    * a sequence of 2-D arrays: an explicit time-varying schedule, one mixing matrix per round.

    n=1 (a single machine) gives the 1x1 matrix [[1.0]] for every named topology.
    """
    n = _check_node_count(n)
    if weights not in WEIGHT_NAMES:
        raise TopologyError(f"unknown weights {weights!r}; valid: {', '.join(WEIGHT_NAMES)}")
    if degree is not None:
        degree = _as_int(degree, "degree")
        if not (isinstance(topology, str) and topology == "random_regular"):
            raise TopologyError(f"degree applies only to random_regular, not to {topology!r}")
    seed = _as_int(seed, "seed")

    if isinstance(topology, str):
        if topology not in TOPOLOGY_NAMES:
            raise TopologyError(f"unknown topology {topology!r}; valid: {', '.join(TOPOLOGY_NAMES)}")
        if n == 1:
            return MixingSchedule(matrices=(np.ones((1, 1)),), name=topology)
        adjacencies = _named_adjacencies(topology, n, degree, seed)
        return MixingSchedule(
            matrices=tuple(_apply_weights(adjacency, weights) for adjacency in adjacencies), name=topology
        )

    if isinstance(topology, np.ndarray) and topology.ndim == 2:
        if topology.shape != (n, n):
            raise MixingMatrixError(f"matrix has shape {topology.shape} but n={n} needs ({n}, {n})")
        if _looks_like_adjacency(topology):
            return schedule_from_adjacency(topology, weights)
        return schedule_from_matrix(topology)

    schedule = schedule_from_matrix(topology)
    if schedule.n != n:
        raise MixingMatrixError(f"matrices are {schedule.n}x{schedule.n} but n={n}")
    return schedule
