"""Simulator = agents, including the wire (issue 12): the simulator rounds neighbours' vectors to
``wire_dtype`` as agents do, a diverging run stops naming iteration and node and writes only valid JSON,
and ``simulate_game`` takes the mixing matrix as a torch tensor, a numpy array or nested lists."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from agent.checkpoint import load_checkpoint
from agent.cli import main
from agent.core.algorithms import Hyper, NonFiniteStateError
from agent.core.config import build_config
from agent.core.engine import VectorizedCluster, VirtualCluster
from agent.core.mixing import mix_all, mix_row
from agent.core.topology import MixingMatrixError, make_schedule, metropolis_weights, ring_adjacency
from agent.sim import simulate_game
from agent.train.simulate import run_simulation
from agent.transport.frames import DecodedVector, ExpectedVector, decode_vector, encode_vector

SMALL = {"dataset": "ring8", "iterations": 6, "eval_every": 6, "eval_samples": 50, "nodes": 4, "seed": 3}


def received(vector: torch.Tensor, wire_dtype: str) -> torch.Tensor:
    """What a neighbour decodes of ``vector`` sent in ``wire_dtype`` (the real encoder and decoder)."""
    chunks = encode_vector(vector, sender_id="s", iteration=0, round=0, epoch=0, wire_dtype=wire_dtype)
    decoded: DecodedVector = decode_vector(chunks, ExpectedVector(vector.numel()))
    return decoded.vector


@pytest.mark.timeout(30)
@pytest.mark.parametrize("wire_dtype", ["bfloat16", "float16"])
def test_mix_all_rounds_neighbours_like_the_wire_and_keeps_its_own_vector(wire_dtype: str) -> None:
    n, d = 5, 257
    states = torch.randn(n, d, generator=torch.Generator().manual_seed(1))
    schedule = make_schedule("ring", n)
    rows = [schedule.row(i, 0) for i in range(n)]
    mixed = mix_all(states, rows, getattr(torch, wire_dtype))
    for i, row in enumerate(rows):
        # What agent i computes (agent/node/gossip.py): its own x as held, its neighbours' as received.
        vectors = {j: states[j] if j == i else received(states[j], wire_dtype) for j, _ in row}
        assert torch.equal(mixed[i], mix_row(sorted(row), vectors)), f"node {i}"
    assert not torch.equal(mixed, mix_all(states, rows))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("wire_dtype", ["bfloat16", "float16"])
def test_vectorized_cluster_rounds_the_wire_like_the_exact_one(wire_dtype: str) -> None:
    n, d = 4, 64
    targets = torch.randn(n, d, generator=torch.Generator().manual_seed(2))
    operators = [lambda x, t=t: x - t for t in targets]
    schedule = make_schedule("ring", n)

    def rows_at(r: int) -> list:
        return [schedule.row(i, r) for i in range(n)]

    x0 = torch.randn(d, generator=torch.Generator().manual_seed(3))
    hyper = Hyper(lr=0.1)
    exact = VirtualCluster("dposg", x0, operators, rows_at, 2, hyper, wire_dtype=wire_dtype)
    batched = VectorizedCluster(
        "dposg", x0, lambda xs: xs - targets, n, rows_at, 2, hyper, wire_dtype=wire_dtype
    )
    plain = VirtualCluster("dposg", x0, operators, rows_at, 2, hyper)
    for _ in range(20):
        exact.step(), batched.step(), plain.step()
    torch.testing.assert_close(batched.stacked(), exact.stacked(), rtol=0, atol=1e-5)
    rounding_gap = float((exact.stacked() - plain.stacked()).abs().max())
    assert rounding_gap > 10 * float((batched.stacked() - exact.stacked()).abs().max())


@pytest.mark.timeout(120)
def test_simulate_with_a_low_precision_wire_differs_from_float32(tmp_path: Path) -> None:
    finals = {}
    for wire_dtype in ("float32", "float16", "bfloat16"):
        for vectorize in (False, True):
            config = build_config({**SMALL, "wire_dtype": wire_dtype, "vectorize": vectorize})
            out = tmp_path / f"{wire_dtype}-{vectorize}"
            run_simulation(config, out)
            finals[wire_dtype, vectorize] = load_checkpoint(out / "node-0" / "final.safetensors").parameters
    for vectorize in (False, True):
        for wire_dtype in ("float16", "bfloat16"):
            reference, rounded = finals["float32", vectorize], finals[wire_dtype, vectorize]
            gap = max(float((reference[k] - rounded[k]).abs().max()) for k in reference)
            assert gap > 0, f"{wire_dtype} (vectorize={vectorize}) is bit-identical to float32"


# ---- divergence ----------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_diverging_simulation_stops_naming_iteration_and_node(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sim"
    flags = ["--loss", "wgan_gp", "--lr", "5", "--iterations", "50", "--eval-every", "1",
             "--eval-samples", "50"]  # fmt: skip
    assert main(["simulate", *flags, "--out", str(out)]) == 1
    error = capsys.readouterr().err
    assert "dpgan-agent simulate: error: training diverged at iteration" in error
    assert "the parameters of node 0 are not finite" in error
    # What was written before it stopped is valid JSON (strict: no bare NaN).
    for line in (out / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in metrics.jsonl"))
    assert not (out / "summary.json").exists()


@pytest.mark.timeout(120)
def test_diverging_run_raises_and_vectorized_too(tmp_path: Path) -> None:
    for vectorize in (False, True):
        values = {**SMALL, "loss": "wgan_gp", "lr": 5.0, "iterations": 50, "vectorize": vectorize}
        config = build_config(values)
        with pytest.raises(NonFiniteStateError, match=r"at iteration \d+: the parameters of node \d+"):
            run_simulation(config, tmp_path / str(vectorize))


@pytest.mark.timeout(30)
def test_non_finite_numbers_are_written_as_null() -> None:
    from agent.files import dumps_json, finite_json

    record = {"loss": float("nan"), "q": [1.0, float("inf"), {"x": -float("inf")}], "n": 3, "s": "NaN"}
    assert json.loads(dumps_json(record)) == {"loss": None, "q": [1.0, None, {"x": None}], "n": 3, "s": "NaN"}
    assert finite_json((1.5, float("nan"))) == [1.5, None]


@pytest.mark.timeout(30)
def test_json_logs_stay_valid_with_nan_fields(capsys: pytest.CaptureFixture[str]) -> None:
    from agent.logs import configure_logging, get_logger

    configure_logging(json=True)
    get_logger().info("evaluation", loss_g=float("nan"))
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert json.loads(line, parse_constant=lambda name: pytest.fail(name))["loss_g"] is None


# ---- simulate_game's mixing matrix ---------------------------------------------------------------------


def game(n: int):
    losses = [lambda u, v, a=float(i + 1): ((a * u * v).sum(), -(a * u * v).sum()) for i in range(n)]
    return losses, torch.ones(3), torch.full((3,), 0.5)


@pytest.mark.timeout(60)
def test_simulate_game_takes_the_matrix_as_tensor_array_or_lists() -> None:
    losses, u0, v0 = game(4)
    matrix = metropolis_weights(ring_adjacency(4))
    reference = simulate_game(losses, u0, v0, topology=matrix, iterations=10)
    for topology in (
        torch.tensor(matrix),  # float64
        torch.tensor(matrix.tolist(), dtype=torch.float32),  # torch's default dtype: 1/3 rounded
        matrix.tolist(),
        torch.tensor(ring_adjacency(4)),  # an adjacency, as a numpy bool array is
        ring_adjacency(4).astype(int).tolist(),
        [torch.tensor(matrix), matrix.tolist()],  # time-varying (here: twice the same)
    ):
        result = simulate_game(losses, u0, v0, topology=topology, iterations=10)
        assert torch.equal(result.u, reference.u) and torch.equal(result.v, reference.v)


@pytest.mark.timeout(30)
def test_simulate_game_validates_tensor_matrices_like_arrays() -> None:
    losses, u0, v0 = game(3)
    bad = np.array([[0.5, 0.5, 0.0], [0.25, 0.5, 0.25], [0.25, 0.0, 0.75]])
    for topology in (bad, torch.tensor(bad), bad.tolist()):
        with pytest.raises(MixingMatrixError, match="not symmetric"):
            simulate_game(losses, u0, v0, topology=topology, iterations=1)
    with pytest.raises(MixingMatrixError, match=r"shape \(2, 2\) but n=3"):
        simulate_game(losses, u0, v0, topology=torch.eye(2) * 0.5 + 0.25, iterations=1)
