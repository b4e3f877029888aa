"""Simulator speed at scale: iterations per second of ``dpgan-agent simulate`` (exact vs vectorized).

Builds the cluster exactly as ``agent.train.simulate.run_simulation`` does (same data, models, streams,
schedule) and times ``cluster.step()``, the part of a run ``train_seconds`` counts; evaluation and
checkpoints are left out (they are the same in both modes, see --study). Every cell: --warmup steps
(torch.func's one-time set-up is ~1.5 s), then --repeats timed runs of as many steps as fit in
--seconds (at least 2); reported: the median over repeats of iterations per second, by wall clock and
by this process's CPU time (on a shared machine the CPU figure is the steadier one), with the load
average next to it.

    python bench/sim_scale.py                               # ring8, n = 8, 64, 256, both modes
    python bench/sim_scale.py --nodes 64 --modes vectorized --nodes-per-call 16 32 0
    python bench/sim_scale.py --nodes 64 --study 64         # + 6 topologies x 3 round counts estimate
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from agent.core.config import TrainConfig, build_config
from agent.core.engine import VectorizedCluster, VirtualCluster, gossip
from agent.train.batched import NODES_PER_CALL, BatchedGanOperator
from agent.train.data import load_dataset, partition
from agent.train.evaluate import Evaluator
from agent.train.simulate import hyper_from, schedule_from
from agent.train.workload import GanProblem, node_generator

STUDY_TOPOLOGIES = ("ring", "torus", "exponential", "one_peer_exponential", "random_regular", "complete")
STUDY_ROUNDS = (1, 2, 4)
STUDY_ITERATIONS = 3000


@dataclass(frozen=True)
class Cell:
    nodes: int
    mode: str
    nodes_per_call: int | None
    steps: int
    wall_per_step: float
    cpu_per_step: float
    load: float


def load_average() -> float:
    return os.getloadavg()[0]


def make_config(args: argparse.Namespace, nodes: int, **overrides: object) -> TrainConfig:
    values: dict[str, object] = {"dataset": args.dataset, "nodes": nodes, "topology": "ring", "rounds": 1}
    if getattr(args, "loss", None):
        values["loss"] = args.loss
    values.update(overrides)
    return build_config(values)


def make_cluster(config: TrainConfig, mode: str, nodes_per_call: int | None) -> VirtualCluster:
    """The cluster ``run_simulation`` builds for this configuration, in the given mode."""
    n = config.nodes
    dataset = load_dataset(
        config.dataset, path=config.data_path, image_size=config.image_size, seed=config.seed
    )
    shards = partition(dataset, n, config.split, seed=config.seed, classes_per_node=config.classes_per_node)
    problem = GanProblem.build(config, dataset.spec, torch.device("cpu"))
    streams = [node_generator(config.seed, i) for i in range(n)]
    operators = [problem.node_operator(shard, stream) for shard, stream in zip(shards, streams, strict=True)]
    schedule = schedule_from(config, n)

    def rows_at(round_index: int) -> list[tuple[tuple[int, float], ...]]:
        return [schedule.row(i, round_index) for i in range(n)]

    if mode == "vectorized":
        batched = BatchedGanOperator(problem, operators, nodes_per_call=nodes_per_call)
        return VectorizedCluster(
            config.algorithm, problem.x0, batched, n, rows_at, config.rounds, hyper_from(config)
        )
    return VirtualCluster(config.algorithm, problem.x0, operators, rows_at, config.rounds, hyper_from(config))


def time_steps(step: Callable[[], None], steps: int) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    return (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps


def measure(args: argparse.Namespace, nodes: int, variants: list[tuple[str, int | None]]) -> list[Cell]:
    """All variants at one n, their timed repeats interleaved so that load changes hit them alike."""
    clusters = [make_cluster(make_config(args, nodes), mode, chunk) for mode, chunk in variants]
    steps = []
    for cluster in clusters:
        time_steps(cluster.step, max(args.warmup - 1, 0) + 1)
        first_wall, _ = time_steps(cluster.step, 1)
        steps.append(max(2, int(args.seconds / max(first_wall, 1e-6))))
    walls: list[list[float]] = [[] for _ in variants]
    cpus: list[list[float]] = [[] for _ in variants]
    loads: list[float] = []
    for _ in range(args.repeats):
        loads.append(load_average())
        for index, cluster in enumerate(clusters):
            wall, cpu = time_steps(cluster.step, steps[index])
            walls[index].append(wall)
            cpus[index].append(cpu)
    return [
        Cell(
            nodes,
            mode,
            chunk,
            steps[index],
            statistics.median(walls[index]),
            statistics.median(cpus[index]),
            max(loads),
        )
        for index, (mode, chunk) in enumerate(variants)
    ]


def mixing_seconds_per_round(
    args: argparse.Namespace, nodes: int, topology: str, mode: str, dimension: int
) -> float:
    """One gossip round of all nodes' vectors as each mode does it: the canonical ``mix_all`` (exact)
    or one W @ X product (vectorized, what ``VectorizedCluster`` does once W is cached)."""
    config = make_config(args, nodes, topology=topology, degree=4 if topology == "random_regular" else None)
    schedule = schedule_from(config, nodes)
    states = torch.randn(nodes, dimension, generator=torch.Generator().manual_seed(0))
    weights = torch.tensor(schedule.matrix(0), dtype=torch.float32)

    def rows_at(round_index: int) -> list[tuple[tuple[int, float], ...]]:
        return [schedule.row(i, round_index) for i in range(nodes)]

    def one_round() -> None:
        if mode == "exact":
            gossip(states, rows_at, 0, 1)
        else:
            torch.mm(weights, states)

    one_round()
    samples = []
    for _ in range(args.repeats):
        started = time.process_time()
        for _ in range(4):
            one_round()
        samples.append((time.process_time() - started) / 4)
    return statistics.median(samples)


def evaluation_seconds(args: argparse.Namespace, nodes: int) -> float:
    """One evaluation record of ``run_simulation``: network average + every node + a sample image."""
    config = make_config(args, nodes)
    dataset = load_dataset(config.dataset, seed=config.seed)
    problem = GanProblem.build(config, dataset.spec, torch.device("cpu"))
    evaluator = Evaluator(dataset, config.eval_samples, config.seed)
    evaluator.evaluate(problem, problem.x0)
    started = time.process_time()
    for _ in range(3):
        evaluator.evaluate(problem, problem.x0)
    return (time.process_time() - started) / 3 * (nodes + 1)


def study(args: argparse.Namespace, cells: list[Cell], nodes: int) -> None:
    """Estimated CPU time of a topology x rounds study: per run, iterations x (measured step on a ring
    with one round, minus that round, plus the topology's rounds) + the run's evaluations."""
    config = make_config(args, nodes)
    spec = load_dataset(config.dataset, seed=config.seed).spec
    dimension = GanProblem.build(config, spec, torch.device("cpu")).layout.numel
    assert config.eval_every is not None
    evaluations = STUDY_ITERATIONS // config.eval_every
    per_evaluation = evaluation_seconds(args, nodes)
    modes = sorted({cell.mode for cell in cells if cell.nodes == nodes})
    mixing = {
        (topology, mode): mixing_seconds_per_round(args, nodes, topology, mode, dimension)
        for topology in STUDY_TOPOLOGIES
        for mode in modes
    }
    print(f"\n# study at n = {nodes}: {len(STUDY_TOPOLOGIES)} topologies x rounds {STUDY_ROUNDS} x "
          f"{STUDY_ITERATIONS} iterations, CPU time, 1 thread")  # fmt: skip
    print(f"| topology | {' | '.join(f'{mode} mixing ms/round' for mode in modes)} |")
    print(f"|---|{'---:|' * len(modes)}")
    for topology in STUDY_TOPOLOGIES:
        print(f"| {topology} | {' | '.join(f'{mixing[topology, mode] * 1e3:.1f}' for mode in modes)} |")
    print(f"# evaluation: {per_evaluation:.2f} s per record x {evaluations} records per run (both modes)")
    print("| mode | gradient+update s/iter | study total (hours) |")
    print("|---|---:|---:|")
    for cell in cells:
        if cell.nodes != nodes:
            continue
        local = cell.cpu_per_step - mixing["ring", cell.mode]
        total = sum(
            STUDY_ITERATIONS * (local + rounds * mixing[topology, cell.mode]) + evaluations * per_evaluation
            for topology in STUDY_TOPOLOGIES
            for rounds in STUDY_ROUNDS
        )
        print(f"| {label(cell)} | {local:.3f} | {total / 3600:.2f} |")


def label(cell: Cell) -> str:
    if cell.mode == "exact":
        return "exact"
    return f"vectorized ({cell.nodes_per_call or 'all'} nodes/call)"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", default="ring8")
    parser.add_argument("--loss", help="GAN loss (default: the configuration default, nonsaturating)")
    parser.add_argument("--nodes", type=int, nargs="+", default=[8, 64, 256])
    parser.add_argument(
        "--modes", nargs="+", choices=("exact", "vectorized"), default=["exact", "vectorized"]
    )
    parser.add_argument(
        "--nodes-per-call", type=int, nargs="+", default=[NODES_PER_CALL], help="vectorized chunking; 0 = all"
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0, help="target wall time of one timed repeat")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the simulator's default is 1)")
    parser.add_argument(
        "--study", type=int, metavar="N", help="estimate a topology x rounds study at N nodes"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    cells: list[Cell] = []
    variants = [
        (mode, chunk or None)
        for mode in args.modes
        for chunk in (args.nodes_per_call if mode == "vectorized" else [0])
    ]
    for nodes in args.nodes:
        for cell in measure(args, nodes, variants):
            cells.append(cell)
            progress = f"{cell.steps} steps x {args.repeats}, {cell.cpu_per_step * 1e3:.1f} CPU ms/iter"
            print(f"# n={nodes} {label(cell)}: {progress}, load {cell.load:.1f}", flush=True)

    malloc = {key: value for key, value in os.environ.items() if key.startswith("MALLOC_")}
    when = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    print(f"\n# {args.dataset} ({args.loss or 'default loss'}), torch {torch.__version__}, "
          f"{args.threads} thread(s), {os.uname().machine}, "
          f"{when} UTC, malloc settings {malloc or 'default'}")  # fmt: skip
    print("| n | mode | it/s (CPU time) | it/s (wall) | CPU ms/iter | speed-up (CPU) | load avg |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    exact_cpu = {cell.nodes: cell.cpu_per_step for cell in cells if cell.mode == "exact"}
    for cell in cells:
        speedup = f"{exact_cpu[cell.nodes] / cell.cpu_per_step:.2f}x" if cell.nodes in exact_cpu else "-"
        print(
            f"| {cell.nodes} | {label(cell)} | {1 / cell.cpu_per_step:.2f} | {1 / cell.wall_per_step:.2f} "
            f"| {cell.cpu_per_step * 1e3:.1f} | {speedup} | {cell.load:.1f} |"
        )
    if args.study is not None:
        if args.study not in args.nodes:
            parser.error(f"--study {args.study} needs {args.study} among --nodes")
        study(args, cells, args.study)


if __name__ == "__main__":
    main()
