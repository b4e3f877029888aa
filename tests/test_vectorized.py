"""Vectorized simulator (``vectorize: true``): the same iteration as the exact per-node path, all nodes'
gradients from one vmapped call. Same random numbers (stream states equal), results equal up to float
rounding; plus the boolean configuration key that switches it on."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
from torch import nn

from agent.checkpoint import load_checkpoint
from agent.cli import main
from agent.configfile import add_config_flags, config_from_args
from agent.core.algorithms import Hyper
from agent.core.config import ConfigError, TrainConfig, build_config
from agent.core.engine import VectorizedCluster, VirtualCluster
from agent.core.schema import ParameterLayout
from agent.core.topology import make_schedule
from agent.train.batched import BatchedGanOperator
from agent.train.data import load_dataset, partition
from agent.train.simulate import hyper_from, schedule_from
from agent.train.workload import GanProblem, NodeOperator, node_generator

ITERATIONS = 20
NODES = 4
# Observed gap after 20 iterations on ring8 is ~1e-7 (dposg, sgda, cposg) and ~3e-6 (wgan_gp): the
# bound leaves room for other BLAS builds while still catching any wrong sample, sign or term.
PARAMETER_TOLERANCE = 1e-4


@pytest.fixture(autouse=True)
def one_thread():
    """The simulator's default (``threads: 1``); two threads on a busy two-core machine are ~10× slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@dataclass
class Setup:
    config: TrainConfig
    problem: GanProblem
    streams: list[torch.Generator]
    operators: list[NodeOperator]


def _setup(values: dict) -> Setup:
    config = build_config(values)
    dataset = load_dataset(config.dataset, seed=config.seed)
    shards = partition(
        dataset, config.nodes, config.split, seed=config.seed, classes_per_node=config.classes_per_node
    )
    problem = GanProblem.build(config, dataset.spec, torch.device("cpu"))
    streams = [node_generator(config.seed, i) for i in range(config.nodes)]
    operators = [problem.node_operator(shard, stream) for shard, stream in zip(shards, streams, strict=True)]
    return Setup(config, problem, streams, operators)


def _exact_and_vectorized(values: dict) -> tuple[VirtualCluster, VectorizedCluster, Setup, Setup]:
    """Two clusters from the same configuration, each with its own fresh streams."""
    exact_setup, vector_setup = _setup(values), _setup(values)
    n = exact_setup.config.nodes
    schedule = schedule_from(exact_setup.config, n)

    def rows_at(round_index: int) -> list[tuple[tuple[int, float], ...]]:
        return [schedule.row(i, round_index) for i in range(n)]

    config = exact_setup.config
    exact = VirtualCluster(
        config.algorithm,
        exact_setup.problem.x0,
        exact_setup.operators,
        rows_at,
        config.rounds,
        hyper_from(config),
    )
    batched = BatchedGanOperator(vector_setup.problem, vector_setup.operators)
    vectorized = VectorizedCluster(
        config.algorithm, vector_setup.problem.x0, batched, n, rows_at, config.rounds, hyper_from(config)
    )
    return exact, vectorized, exact_setup, vector_setup


def _streams_equal(a: Setup, b: Setup) -> bool:
    return all(torch.equal(x.get_state(), y.get_state()) for x, y in zip(a.streams, b.streams, strict=True))


@pytest.mark.parametrize(
    ("loss", "algorithm", "lr", "topology", "rounds"),
    [
        ("nonsaturating", "dposg", None, "ring", 1),
        ("hinge", "cposg", None, "ring", 1),
        ("nonsaturating", "sgda", None, "one_peer_exponential", 3),
        # The default step size makes WGAN-GP diverge on ring8 in both paths; 1e-3 keeps it finite.
        ("wgan_gp", "dposg", 1e-3, "complete", 2),
    ],
)
def test_vectorized_cluster_tracks_the_exact_path(
    loss: str, algorithm: str, lr: float | None, topology: str, rounds: int
) -> None:
    values = {
        "dataset": "ring8",
        "nodes": NODES,
        "topology": topology,
        "rounds": rounds,
        "loss": loss,
        "algorithm": algorithm,
    }
    if lr is not None:
        values["lr"] = lr
    exact, vectorized, exact_setup, vector_setup = _exact_and_vectorized(values)
    start = exact.stacked().clone()
    for _ in range(ITERATIONS):
        exact.step()
        vectorized.step()
    assert torch.isfinite(exact.stacked()).all()
    # The run moved far more than the tolerance, so agreement is not just "both stayed at x0".
    assert float((exact.stacked() - start).abs().max()) > 100 * PARAMETER_TOLERANCE
    assert float((exact.stacked() - vectorized.stacked()).abs().max()) < PARAMETER_TOLERANCE
    # Every node consumed exactly the same random numbers (minibatches, latents, GP coefficients).
    assert _streams_equal(exact_setup, vector_setup)
    for exact_op, vector_op in zip(exact_setup.operators, vector_setup.operators, strict=True):
        for key, value in exact_op.losses().items():
            # WGAN-GP's critic loss carries 10× the penalty: compare relative to the loss's size.
            assert vector_op.losses()[key] == pytest.approx(value, rel=1e-3, abs=1e-4)
    # The per-node views read the stacks, and the summaries agree.
    assert vectorized.iteration == exact.iteration == ITERATIONS
    for i, state in enumerate(vectorized.states):
        assert torch.equal(state.x, vectorized.stacked()[i]) and state.step == ITERATIONS
    assert float((exact.average() - vectorized.average()).abs().max()) < PARAMETER_TOLERANCE
    assert vectorized.consensus_distance() == pytest.approx(exact.consensus_distance(), rel=1e-3)


def test_matrix_mixing_matches_canonical_gossip_on_a_time_varying_schedule() -> None:
    """Engine only, no GAN: node-dependent linear gradients T_i(z) = c_i·z on distinct starting
    points, so every iteration mixes genuinely different vectors through a schedule whose matrix
    changes every round."""
    n, d = 8, 50
    generator = torch.Generator().manual_seed(3)
    x0 = torch.randn(d, generator=generator)
    coefficients = torch.linspace(0.5, 1.5, n).unsqueeze(1)
    schedule = make_schedule("one_peer_exponential", n)
    assert schedule.period > 1

    def rows_at(round_index: int) -> list[tuple[tuple[int, float], ...]]:
        return [schedule.row(i, round_index) for i in range(n)]

    per_node = [lambda z, c=float(c): c * z for c in coefficients.squeeze(1)]
    hyper = Hyper(lr=0.1)
    exact = VirtualCluster("dposg", x0, per_node, rows_at, 2, hyper)
    vectorized = VectorizedCluster("dposg", x0, lambda points: coefficients * points, n, rows_at, 2, hyper)
    for _ in range(10):
        exact.step()
        vectorized.step()
        assert float((exact.stacked() - vectorized.stacked()).abs().max()) < 1e-6
    assert exact.consensus_distance() > 1e-6  # the nodes still differ: mixing was exercised
    # One cached matrix per distinct round of the period, reused every period after the first.
    assert len(vectorized._matrices) == schedule.period


def test_dpoadam_stays_close_to_the_exact_path() -> None:
    """Adam divides by √v: coordinates with near-zero gradients amplify last-bit differences into
    differences of order lr, so the check is relative to how far the run moved."""
    values = {"dataset": "ring8", "nodes": NODES, "algorithm": "dpoadam"}
    exact, vectorized, exact_setup, vector_setup = _exact_and_vectorized(values)
    start = exact.stacked().clone()
    for _ in range(ITERATIONS):
        exact.step()
        vectorized.step()
    moved = float((exact.stacked() - start).norm())
    assert moved > 0
    assert float((exact.stacked() - vectorized.stacked()).norm()) < 1e-2 * moved
    assert _streams_equal(exact_setup, vector_setup)
    assert vectorized.states[0].moment2 is not None and vectorized.states[0].step == ITERATIONS


@pytest.mark.parametrize("loss", ["nonsaturating", "wgan_gp"])
def test_batched_operator_on_dcgan_with_batch_norm(loss: str) -> None:
    """Conv nets with batch-statistics BatchNorm under vmap, GP by nested torch.func.grad: one call,
    distinct points per node, against the per-node operators."""
    values = {"dataset": "digits", "nodes": 3, "width": 4, "latent_dim": 8, "batch_size": 8, "loss": loss}
    exact_setup, vector_setup = _setup(values), _setup(values)
    assert any(isinstance(m, nn.BatchNorm2d) for m in exact_setup.problem.generator.modules())
    noise = torch.Generator().manual_seed(7)
    x0 = exact_setup.problem.x0
    points = x0 + 0.05 * torch.randn(3, x0.numel(), generator=noise)
    expected = torch.stack([op(z) for op, z in zip(exact_setup.operators, points, strict=True)])
    batched = BatchedGanOperator(vector_setup.problem, vector_setup.operators, nodes_per_call=2)
    got = batched(points)
    scale = float(expected.abs().max())
    assert scale > 0
    assert float((got - expected).abs().max()) < 1e-5 * max(scale, 1.0)
    assert _streams_equal(exact_setup, vector_setup)
    for exact_op, vector_op in zip(exact_setup.operators, vector_setup.operators, strict=True):
        assert vector_op.losses() == pytest.approx(exact_op.losses(), abs=1e-4)
    with pytest.raises(ValueError, match=r"expected a \(3, d\) stack"):
        batched(points[:2])


def test_critic_with_batch_norm_scores_real_and_fake_in_separate_passes() -> None:
    """Batch statistics couple the samples of one pass: a batch-norm critic must see real and fake
    batches separately, as the per-node operator does, or its outputs (and gradients) change."""
    base = _setup({"dataset": "ring8", "nodes": 2, "width": 16, "batch_size": 16}).problem
    torch.manual_seed(0)
    critic = nn.Sequential(
        nn.Linear(2, 16), nn.BatchNorm1d(16, track_running_stats=False), nn.LeakyReLU(0.2), nn.Linear(16, 1)
    )
    critic.append(nn.Flatten(0))  # (B, 1) logits -> (B,)
    layout = ParameterLayout.from_state_dicts(base.generator.state_dict(), critic.state_dict())
    named = {f"generator.{k}": v for k, v in base.generator.state_dict().items()}
    named |= {f"discriminator.{k}": v for k, v in critic.state_dict().items()}
    problem = replace(base, discriminator=critic, layout=layout, x0=layout.flatten(named))
    shards = partition(load_dataset("ring8", seed=0), 2, "iid", seed=0)

    def operators() -> list[NodeOperator]:
        return [NodeOperator(problem, shard, node_generator(0, i)) for i, shard in enumerate(shards)]

    points = problem.x0 + 0.05 * torch.randn(
        2, problem.x0.numel(), generator=torch.Generator().manual_seed(1)
    )
    expected = torch.stack([op(z) for op, z in zip(operators(), points, strict=True)])
    got = BatchedGanOperator(problem, operators())(points)
    assert float((got - expected).abs().max()) < 1e-5 * max(float(expected.abs().max()), 1.0)


def test_vectorize_key_from_yaml_and_flags(tmp_path: Path) -> None:
    assert build_config({"dataset": "ring8"}).vectorize is False
    assert build_config({"dataset": "ring8", "vectorize": True}).vectorize is True
    for bad in ("yes", 1, "true"):
        with pytest.raises(ConfigError, match="vectorize: expected true or false"):
            build_config({"dataset": "ring8", "vectorize": bad})
    # A node-local key: the cluster's identity (handshake hash) does not depend on it.
    on = build_config({"dataset": "ring8", "vectorize": True})
    assert on.config_hash() == build_config({"dataset": "ring8"}).config_hash()

    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    yaml_on = tmp_path / "cfg.yaml"
    yaml_on.write_text("dataset: ring8\nvectorize: true\n")
    assert config_from_args(parser.parse_args(["--config", str(yaml_on)])).vectorize is True
    assert (
        config_from_args(parser.parse_args(["--config", str(yaml_on), "--vectorize", "false"])).vectorize
        is False
    )
    assert config_from_args(parser.parse_args(["--vectorize"])).vectorize is True
    assert config_from_args(parser.parse_args(["--vectorize", "TRUE"])).vectorize is True
    with pytest.raises(SystemExit):
        parser.parse_args(["--vectorize", "maybe"])


def test_simulate_cli_vectorized_run_matches_the_exact_run(tmp_path: Path) -> None:
    flags = ["--dataset", "ring8", "--nodes", "3", "--iterations", "8", "--eval-every", "4"]
    flags += ["--eval-samples", "500"]
    assert main(["simulate", *flags, "--out", str(tmp_path / "exact")]) == 0
    assert main(["simulate", *flags, "--vectorize", "--out", str(tmp_path / "vector")]) == 0
    summaries = {
        mode: json.loads((tmp_path / mode / "summary.json").read_text()) for mode in ("exact", "vector")
    }
    assert summaries["vector"]["config"]["vectorize"] is True
    assert summaries["exact"]["config"]["vectorize"] is False
    exact_final, vector_final = summaries["exact"]["final"], summaries["vector"]["final"]
    assert vector_final["quality"]["modes_covered"] == exact_final["quality"]["modes_covered"]
    assert vector_final["quality"]["high_quality"] == pytest.approx(
        exact_final["quality"]["high_quality"], abs=0.01
    )
    assert vector_final["loss_g"] == pytest.approx(exact_final["loss_g"], abs=1e-4)
    assert vector_final["loss_d"] == pytest.approx(exact_final["loss_d"], abs=1e-4)
    for i in range(3):
        exact = load_checkpoint(tmp_path / "exact" / f"node-{i}" / "final.safetensors")
        vector = load_checkpoint(tmp_path / "vector" / f"node-{i}" / "final.safetensors")
        assert exact.rng_state is not None and vector.rng_state is not None
        assert torch.equal(exact.rng_state, vector.rng_state)
        for name, tensor in exact.parameters.items():
            assert float((tensor - vector.parameters[name]).abs().max()) < PARAMETER_TOLERANCE, name
        # The stored direction is the last gradient: a pre-activation within rounding of a (leaky)
        # ReLU kink can flip sides and move single coordinates by ~1e-3, so compare in norm.
        for name, tensor in exact.optimizer.items():
            assert float((tensor - vector.optimizer[name]).norm()) < 1e-2 * float(tensor.norm()), name
