"""``dpgan-agent simulate``: n virtual nodes of a GAN workload in one process, with the outputs of a real run.

Writes into the output folder:
* ``metrics.jsonl``: one JSON object per evaluation (iteration, seconds, quality of the network-average
  model and of every node, consensus distance, losses);
* ``summary.json``: the final evaluation, reference values and run facts;
* ``samples-<iteration>.png`` and ``samples-final.png``;
* ``node-<i>/final.safetensors``: each node's parameters, optimizer and RNG state (see agent.checkpoint).

Every JSON file is valid JSON (a non-finite number is written as ``null``). A node whose parameters
become non-finite (NaN or inf: training diverged) stops the run with ``NonFiniteStateError`` naming the
iteration and the node; nothing is written for the diverged state.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from agent.checkpoint import Checkpoint, save_checkpoint
from agent.core.algorithms import Hyper, NodeState, check_finite
from agent.core.choco import consensus_step_size
from agent.core.compression import DEFAULT_RATIO, Compressor
from agent.core.config import TrainConfig
from agent.core.engine import CompressedGossip, VectorizedCluster, VirtualCluster
from agent.core.topology import MixingSchedule, make_schedule
from agent.files import dumps_json, write_atomic
from agent.train.batched import BatchedGanOperator
from agent.train.data import load_dataset, partition
from agent.train.evaluate import Evaluator
from agent.train.workload import GanProblem, NodeOperator, node_generator, resolve_device

Progress = Callable[[dict[str, Any]], None]


def hyper_from(config: TrainConfig) -> Hyper:
    assert config.lr is not None
    return Hyper(lr=config.lr, beta1=config.beta1, beta2=config.beta2, eps=config.eps)


def compression_from(config: TrainConfig) -> CompressedGossip | None:
    """The compressed-gossip settings of ``config`` (None for compression none: exact DPOSG)."""
    if config.compression == "none":
        return None
    return CompressedGossip(
        Compressor(config.compression, ratio=config.compression_ratio or DEFAULT_RATIO),
        consensus_step_size(config.compression, config.consensus_step),
        seed=config.seed,
    )


def schedule_from(config: TrainConfig, n: int) -> MixingSchedule:
    return make_schedule(config.topology, n, weights=config.weights, degree=config.degree, seed=config.seed)


def node_checkpoint(
    problem: GanProblem, state: NodeState, stream: torch.Generator, iteration: int, config: TrainConfig
) -> Checkpoint:
    return Checkpoint(
        parameters=problem.state_dicts(state.x),
        optimizer={k: v for k, v in state.tensors().items() if k != "x"},
        rng_state=stream.get_state(),
        iteration=iteration,
        step=state.step,
        config=config.to_dict(),
        schema_hash=problem.layout.schema_hash(),
        algorithm=config.algorithm,
        run_id=config.effective_run_id(),
    )


def mean_losses(operators: list[NodeOperator]) -> dict[str, float]:
    per_node = [op.losses() for op in operators if op.last_losses is not None]
    if not per_node:
        return {}
    return {key: sum(losses[key] for losses in per_node) / len(per_node) for key in per_node[0]}


def run_simulation(
    config: TrainConfig,
    out: Path,
    progress: Progress | None = None,
    on_iteration: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Run the n virtual nodes; ``progress`` gets every evaluation record, ``on_iteration`` every
    iteration number (for a progress bar)."""
    assert config.iterations is not None and config.eval_every is not None
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.device)
    n = config.nodes
    dataset = load_dataset(
        config.dataset, path=config.data_path, image_size=config.image_size, seed=config.seed
    )
    shards = partition(dataset, n, config.split, seed=config.seed, classes_per_node=config.classes_per_node)
    problem = GanProblem.build(config, dataset.spec, device)
    streams = [node_generator(config.seed, i) for i in range(n)]
    operators = [problem.node_operator(shard, stream) for shard, stream in zip(shards, streams, strict=True)]
    schedule = schedule_from(config, n)
    evaluator = Evaluator(dataset, config.eval_samples, config.seed)

    started = time.perf_counter()

    def rows_at(round_index: int) -> list[tuple[tuple[int, float], ...]]:
        return [schedule.row(i, round_index) for i in range(n)]

    cluster: VirtualCluster
    if config.vectorize:
        batched = BatchedGanOperator(problem, operators)
        cluster = VectorizedCluster(
            config.algorithm,
            problem.x0,
            batched,
            n,
            rows_at,
            config.rounds,
            hyper_from(config),
            wire_dtype=config.wire_dtype,
            compression=compression_from(config),
            overlap=config.overlap,
        )
    else:
        cluster = VirtualCluster(
            config.algorithm,
            problem.x0,
            operators,
            rows_at,
            config.rounds,
            hyper_from(config),
            wire_dtype=config.wire_dtype,
            compression=compression_from(config),
            overlap=config.overlap,
        )
    train_seconds = time.perf_counter() - started
    metrics_path = out / "metrics.jsonl"
    metrics_path.write_text("")
    record: dict[str, Any] = {}
    for k in range(1, config.iterations + 1):
        step_started = time.perf_counter()
        cluster.step()
        check_finite(cluster.states, k)
        train_seconds += time.perf_counter() - step_started
        if on_iteration is not None:
            on_iteration(k)
        if k % config.eval_every == 0 or k == config.iterations:
            record = {
                "iteration": k,
                "wall_seconds": round(time.perf_counter() - started, 3),
                "train_seconds": round(train_seconds, 3),
                "quality": evaluator.evaluate(problem, cluster.average()),
                "node_quality": [evaluator.evaluate(problem, s.x) for s in cluster.states],
                "consensus_distance": cluster.consensus_distance(),
                **mean_losses(operators),
            }
            with metrics_path.open("a") as handle:
                handle.write(dumps_json(record) + "\n")
            evaluator.save_samples(problem, cluster.average(), out / f"samples-{k:06d}.png")
            if progress is not None:
                progress(record)
    if config.iterations == 0:
        record = {"iteration": 0, "quality": evaluator.evaluate(problem, cluster.average())}
    evaluator.save_samples(problem, cluster.average(), out / "samples-final.png")
    for i, (state, stream) in enumerate(zip(cluster.states, streams, strict=True)):
        checkpoint = node_checkpoint(problem, state, stream, config.iterations, config)
        save_checkpoint(out / f"node-{i}" / "final.safetensors", checkpoint)
    summary = {
        "mode": "simulate",
        "nodes": n,
        "iterations": config.iterations,
        "wall_seconds": round(time.perf_counter() - started, 3),
        "train_seconds": round(train_seconds, 3),
        "final": record,
        "reference": evaluator.reference(),
        "parameters": problem.layout.numel,
        "schema_hash": problem.layout.schema_hash(),
        "config_hash": config.config_hash(),
        "spectral_rho": schedule.rho(config.rounds),
        "config": config.to_dict(),
    }
    write_atomic(out / "summary.json", (dumps_json(summary, indent=2) + "\n").encode())
    return summary
