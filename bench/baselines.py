"""Centralized CPOSG baselines for bench/cluster_bench.py: one shared x, every node's gradient averaged.

    python bench/baselines.py allreduce --rank R --world N --master HOST:PORT [config flags]
    python bench/baselines.py ps-server --listen HOST:PORT --world N [config flags]
    python bench/baselines.py ps-worker --server HOST:PORT --rank R --world N [config flags]

Both run exactly the update the agents and the simulator use for ``algorithm=cposg``
(``agent.core.algorithms.extrapolate``/``advance``), on the same model (``GanProblem``), the same
per-node data split and the same per-node random streams, so only the communication pattern differs:

* ``allreduce``: one process per node; the gradients are summed with ``torch.distributed`` gloo
  ``all_reduce`` (rendezvous ``tcp://`` at the first host), then divided by n. Every process keeps x.
  ``--fp16-hook`` compresses the gradients the way PyTorch DDP's ``fp16_compress_hook`` does (the
  strongest stock option a DDP user reaches for): cast to float16 and divide by n in float16, all-reduce
  the float16 vector (gloo sums in float16), cast the sum back to float32 (``fp16_average``). Half the
  bytes; the quality twin in ``cluster_bench.py`` rounds the averaged gradient the same way.
* ``ps-server`` / ``ps-worker``: a parameter server keeps x and the previous averaged gradient; each
  iteration it sends the extrapolation point z to every worker, receives every worker's gradient,
  averages them in rank order and applies the update. Messages are raw float32 bytes behind a fixed
  header on plain TCP (no pickle, nothing executable crosses the wire).

Every process logs one JSON line per iteration to stderr, in the same shape as the agents' ``iteration``
lines (``iteration``, ``timestamp``, ``compute_s``, ``communication_s``, ``bytes_sent``), so the harness
reads every system the same way. They run ``--iterations`` iterations. SIGTERM to the parameter server
ends the run after the current iteration (it tells its workers to stop); all-reduce ranks and workers
just exit on a signal, since agreeing on a common last iteration would cost gloo one more collective per
iteration.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from agent.configfile import add_config_flags, config_from_args
from agent.core.algorithms import advance, extrapolate, initial_state, mean_canonical
from agent.core.config import TrainConfig
from agent.train.data import load_dataset, partition
from agent.train.evaluate import Evaluator
from agent.train.simulate import hyper_from
from agent.train.workload import GanProblem, NodeOperator, node_generator

ALGORITHM = "cposg"
# Hello from a worker: magic, protocol version, rank, world size, vector length (float32 values).
HELLO = struct.Struct("<4sHHHQ")
HELLO_MAGIC = b"CPS1"
PROTOCOL_VERSION = 1
# Every vector message: iteration (or STOP), then the number of float32 values that follow.
FRAME = struct.Struct("<qQ")
STOP = -1
CONNECT_RETRY_SECONDS = 0.2


class BaselineError(RuntimeError):
    """A peer broke the protocol, or could not be reached in time."""


# ---- shared pieces -------------------------------------------------------------------------------


def log_event(event: str, **fields: Any) -> None:
    """One JSON line on stderr, stamped like the agents' structlog lines (ISO 8601, UTC)."""
    stamp = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    sys.stderr.write(json.dumps({"event": event, **fields, "timestamp": stamp}) + "\n")
    sys.stderr.flush()


class StopFlag:
    """Set by SIGTERM/SIGINT; the server checks it between iterations, so the last one completes."""

    def __init__(self) -> None:
        self.requested = False
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        if self.requested:  # a second signal: leave at once
            os._exit(128 + signum)
        self.requested = True


def build_problem(config: TrainConfig) -> tuple[GanProblem, Any]:
    torch.set_num_threads(config.threads)
    dataset = load_dataset(
        config.dataset, path=config.data_path, image_size=config.image_size, seed=config.seed
    )
    return GanProblem.build(config, dataset.spec, torch.device("cpu")), dataset


def node_operator(
    config: TrainConfig, problem: GanProblem, dataset: Any, rank: int, world: int
) -> NodeOperator:
    """Node ``rank``'s operator with the same data share and random stream an agent at index ``rank`` has."""
    shards = partition(
        dataset, world, config.split, seed=config.seed, classes_per_node=config.classes_per_node
    )
    return problem.node_operator(shards[rank], node_generator(config.seed, rank))


def split_host_port(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"expected host:port, got {value!r}")
    return host, int(port)


def float_bytes(vector: torch.Tensor) -> memoryview:
    """The raw little-endian float32 bytes of a contiguous CPU vector, without a copy."""
    return memoryview(vector.detach().contiguous().numpy()).cast("B")


def receive_exactly(sock: socket.socket, into: memoryview) -> None:
    received = 0
    while received < len(into):
        count = sock.recv_into(into[received:])
        if count == 0:
            raise BaselineError("peer closed the connection mid-message")
        received += count


def receive_frame(sock: socket.socket, numel: int, into: torch.Tensor) -> int:
    """Read one frame into ``into`` (float32, ``numel`` values); returns its iteration (or STOP)."""
    header = bytearray(FRAME.size)
    receive_exactly(sock, memoryview(header))
    iteration, count = FRAME.unpack(header)
    if iteration == STOP:
        return STOP
    if count != numel:
        raise BaselineError(f"frame holds {count} values, expected {numel}")
    receive_exactly(sock, float_bytes(into))
    return iteration


def send_frame(sock: socket.socket, iteration: int, vector: torch.Tensor) -> int:
    header = FRAME.pack(iteration, vector.numel())
    payload = float_bytes(vector)
    sock.sendall(header)
    sock.sendall(payload)
    return len(header) + len(payload)


def evaluate_and_log(evaluator: Evaluator, problem: GanProblem, x: torch.Tensor, iteration: int) -> None:
    log_event("evaluation", iteration=iteration, quality=evaluator.evaluate(problem, x))


def should_evaluate(config: TrainConfig, iteration: int) -> bool:
    assert config.eval_every is not None
    return iteration % config.eval_every == 0 or iteration == config.iterations


# ---- gloo all-reduce -----------------------------------------------------------------------------


def fp16_compress(gradient: torch.Tensor, world: int) -> torch.Tensor:
    """What DDP's ``fp16_compress_hook`` all-reduces: the gradient cast to float16, divided by the world
    size in float16 (``buffer.to(torch.float16).div_(world_size)``, torch/distributed/algorithms/
    ddp_comm_hooks/default_hooks.py)."""
    return gradient.to(torch.float16).div_(world)


def fp16_average(gradients: Sequence[torch.Tensor]) -> torch.Tensor:
    """The fp16 hook's result for the given per-node gradients, in one process: each compressed as
    ``fp16_compress``, summed in float16 in rank order (every addition rounded to float16, as gloo's
    float16 sum rounds each partial sum; gloo's ring visits the ranks in another order per chunk, so
    this matches it in kind, not bit for bit), cast back to float32."""
    world = len(gradients)
    total = fp16_compress(gradients[0], world)
    for gradient in gradients[1:]:
        total = total + fp16_compress(gradient, world)
    return total.to(torch.float32)


def run_allreduce(
    config: TrainConfig, rank: int, world: int, master: str, timeout_s: float, fp16_hook: bool = False
) -> int:
    import torch.distributed as dist  # only this baseline needs it

    def averaged(gradient: torch.Tensor) -> torch.Tensor:
        if fp16_hook:
            compressed = fp16_compress(gradient, world)
            dist.all_reduce(compressed)
            return compressed.to(torch.float32)
        # A sum then a division: gloo has no average op for CPU tensors.
        dist.all_reduce(gradient)
        return gradient / world

    problem, dataset = build_problem(config)
    operator = node_operator(config, problem, dataset, rank, world)
    hyper = hyper_from(config)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://{master}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=timeout_s),
    )
    log_event("ready", rank=rank, world=world, parameters=problem.layout.numel, fp16_hook=fp16_hook)
    evaluator = Evaluator(dataset, config.eval_samples, config.seed) if rank == 0 else None
    assert config.iterations is not None
    try:
        state = initial_state(ALGORITHM, problem.x0, averaged(operator(problem.x0)))
        iteration = 0
        while iteration < config.iterations:
            compute_started = time.perf_counter()
            z = extrapolate(ALGORITHM, state, state.x, hyper)
            gradient = operator(z)
            communication_started = time.perf_counter()
            average = averaged(gradient)
            communication_s = time.perf_counter() - communication_started
            update_started = time.perf_counter()
            state = advance(ALGORITHM, state, state.x, average, hyper)
            compute_s = communication_started - compute_started + time.perf_counter() - update_started
            iteration += 1
            log_event(
                "iteration",
                iteration=iteration,
                compute_s=round(compute_s, 5),
                communication_s=round(communication_s, 5),
                bytes_sent=None,  # gloo does not say; the harness reads the interface counters
                **operator.losses(),
            )
            if evaluator is not None and should_evaluate(config, iteration):
                evaluate_and_log(evaluator, problem, state.x, iteration)
    finally:
        dist.destroy_process_group()
    log_event("finished", iterations=iteration)
    return 0


# ---- parameter server ----------------------------------------------------------------------------


class WorkerLink:
    """The server's connection to one worker, with that worker's receive buffer."""

    def __init__(self, sock: socket.socket, rank: int, numel: int) -> None:
        self.sock = sock
        self.rank = rank
        self.gradient = torch.empty(numel, dtype=torch.float32)
        self.bytes_sent = 0

    def exchange(self, iteration: int, point: torch.Tensor) -> torch.Tensor:
        """Send the point, receive the worker's gradient at it."""
        self.bytes_sent += send_frame(self.sock, iteration, point)
        answered = receive_frame(self.sock, point.numel(), self.gradient)
        if answered != iteration:
            raise BaselineError(f"worker {self.rank} answered iteration {answered}, expected {iteration}")
        return self.gradient


def accept_workers(server: socket.socket, world: int, numel: int, timeout_s: float) -> list[WorkerLink]:
    links: dict[int, WorkerLink] = {}
    server.settimeout(timeout_s)
    while len(links) < world:
        try:
            sock, _ = server.accept()
        except TimeoutError as error:
            raise BaselineError(
                f"only {len(links)} of {world} workers connected in {timeout_s:.0f} s"
            ) from error
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        hello = bytearray(HELLO.size)
        receive_exactly(sock, memoryview(hello))
        magic, version, rank, their_world, their_numel = HELLO.unpack(hello)
        problems = []
        if magic != HELLO_MAGIC or version != PROTOCOL_VERSION:
            problems.append(f"protocol {magic!r} v{version}")
        if their_world != world or not 0 <= rank < world or rank in links:
            problems.append(f"rank {rank} of {their_world}")
        if their_numel != numel:
            problems.append(f"{their_numel} parameters, server has {numel}")
        if problems:
            sock.close()
            log_event("worker refused", reason="; ".join(problems))
            continue
        links[rank] = WorkerLink(sock, rank, numel)
    return [links[rank] for rank in range(world)]


def run_ps_server(config: TrainConfig, listen: str, world: int, timeout_s: float) -> int:
    problem, dataset = build_problem(config)
    hyper = hyper_from(config)
    stop = StopFlag()
    numel = problem.layout.numel
    host, port = split_host_port(listen)
    server = socket.create_server((host, port), reuse_port=False, backlog=world)
    log_event("listening", address=listen, parameters=numel)
    links = accept_workers(server, world, numel, timeout_s)
    evaluator = Evaluator(dataset, config.eval_samples, config.seed)
    assert config.iterations is not None
    # One thread per worker so a slow link delays only its own transfer, not the others'.
    with ThreadPoolExecutor(max_workers=world) as pool:

        def gradients_at(iteration: int, point: torch.Tensor) -> list[torch.Tensor]:
            return list(pool.map(lambda link: link.exchange(iteration, point), links))

        state = initial_state(ALGORITHM, problem.x0, mean_canonical(gradients_at(0, problem.x0)))
        iteration = 0
        while iteration < config.iterations and not stop.requested:
            z = extrapolate(ALGORITHM, state, state.x, hyper)
            averaged = mean_canonical(gradients_at(iteration + 1, z))
            state = advance(ALGORITHM, state, state.x, averaged, hyper)
            iteration += 1
            if should_evaluate(config, iteration):
                evaluate_and_log(evaluator, problem, state.x, iteration)
    for link in links:
        with contextlib.suppress(OSError):  # a worker already gone needs no goodbye
            link.sock.sendall(FRAME.pack(STOP, 0))
        link.sock.close()
    server.close()
    log_event("finished", iterations=iteration, bytes_sent=sum(link.bytes_sent for link in links))
    return 0


def connect(address: str, timeout_s: float) -> socket.socket:
    """Dial the server, retrying while it starts (it may import torch after the workers do)."""
    host, port = split_host_port(address)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=5.0)
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        except OSError as error:
            if time.monotonic() > deadline:
                raise BaselineError(f"cannot reach the parameter server at {address}: {error}") from error
            time.sleep(CONNECT_RETRY_SECONDS)


def run_ps_worker(config: TrainConfig, server_address: str, rank: int, world: int, timeout_s: float) -> int:
    problem, dataset = build_problem(config)
    operator = node_operator(config, problem, dataset, rank, world)
    numel = problem.layout.numel
    sock = connect(server_address, timeout_s)
    sock.sendall(HELLO.pack(HELLO_MAGIC, PROTOCOL_VERSION, rank, world, numel))
    log_event("ready", rank=rank, world=world, parameters=numel)
    point = torch.empty(numel, dtype=torch.float32)
    iterations = 0
    waiting_since = time.perf_counter()
    communication_s = 0.0
    while True:
        iteration = receive_frame(sock, numel, point)
        if iteration == STOP:
            break
        compute_started = time.perf_counter()
        gradient = operator(point)
        compute_s = time.perf_counter() - compute_started
        communication_s += compute_started - waiting_since
        send_started = time.perf_counter()
        sent = send_frame(sock, iteration, gradient)
        waiting_since = time.perf_counter()
        communication_s += waiting_since - send_started
        if iteration > 0:  # iteration 0 is the gradient at x0 that starts the optimistic direction
            iterations = iteration
            log_event(
                "iteration",
                iteration=iteration,
                compute_s=round(compute_s, 5),
                communication_s=round(communication_s, 5),
                bytes_sent=sent,
                **operator.losses(),
            )
        communication_s = 0.0
    sock.close()
    log_event("finished", iterations=iterations)
    return 0


# ---- command line --------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = top.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help)
        sub.add_argument("--world", type=int, required=True, help="number of nodes (workers)")
        sub.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the others")
        add_config_flags(sub)
        return sub

    allreduce = command("allreduce", "one node of the gloo all-reduce baseline")
    allreduce.add_argument("--rank", type=int, required=True)
    allreduce.add_argument("--master", required=True, help="host:port of the rendezvous (rank 0's host)")
    allreduce.add_argument(
        "--fp16-hook",
        action="store_true",
        help="all-reduce the gradients as DDP's fp16_compress_hook does (float16 on the wire)",
    )
    server = command("ps-server", "the parameter server")
    server.add_argument("--listen", required=True, help="host:port to accept workers on")
    worker = command("ps-worker", "one worker of the parameter-server baseline")
    worker.add_argument("--rank", type=int, required=True)
    worker.add_argument("--server", required=True, help="host:port of the parameter server")
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if sys.byteorder != "little":
        # The frames carry the machine's own float32 bytes; like the agent's codec, assume little-endian.
        raise SystemExit("baselines.py: the wire format is little-endian float32; this machine is big-endian")
    config = config_from_args(args, {"algorithm": ALGORITHM, "nodes": args.world})
    runners: dict[str, Callable[[], int]] = {
        "allreduce": lambda: run_allreduce(
            config, args.rank, args.world, args.master, args.timeout, args.fp16_hook
        ),
        "ps-server": lambda: run_ps_server(config, args.listen, args.world, args.timeout),
        "ps-worker": lambda: run_ps_worker(config, args.server, args.rank, args.world, args.timeout),
    }
    try:
        return runners[args.command]()
    except (BaselineError, OSError) as error:
        log_event("failed", error=str(error))
        return 1


if __name__ == "__main__":
    sys.exit(main())
