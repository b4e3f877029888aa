"""Iterations per second of one dpgan-agent alone vs a plain PyTorch loop of the same model and batch.

    python bench/agent_overhead.py [--width 256] [--batch-size 128] [--iterations 1000] [--repeats 3]

The agent runs as a real single node (``--peers`` empty, ``--discovery none``, ``--min-peers 0``: no
gossip, the view is the node alone), so what is measured is everything the agent adds around the local
step: the flat-vector operator (models run functionally on views of one vector), the optimistic update on
flat vectors, the asyncio loop and the worker-thread hop per step, the gRPC server idling beside it.

The plain loop is what one would write by hand: ``nn.Module`` generator and discriminator, optimistic SGD
on their ``.parameters()`` with ``.backward()``, the same minibatch sampler, batch, step size, torch
threads (1) and float32. Both run in fresh processes, alternately (agent, plain, agent, plain, ...), and the
rate is taken between two progress lines after ``--warmup`` iterations, so start-up, the final checkpoint
and the evaluation are excluded. The table shows medians over ``--repeats`` runs. Goal: agent ≥ 0.95×.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def iterations_per_second(lines: list[dict], warmup: int, iterations: int) -> float:
    """Rate between the progress line at ``warmup`` and the one at ``warmup + iterations``."""
    stamps = {
        line["iteration"]: datetime.fromisoformat(line["timestamp"].replace("Z", "+00:00")).timestamp()
        for line in lines
        if line.get("event") == "iteration"
    }
    return iterations / (stamps[warmup + iterations] - stamps[warmup])


def json_lines(text: str) -> list[dict]:
    lines = []
    for line in text.splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            continue
    return lines


def run_agent(args: argparse.Namespace) -> float:
    total = args.warmup + args.iterations
    with tempfile.TemporaryDirectory() as folder:
        port = free_port()
        command = [
            sys.executable, "-m", "agent.cli", "--listen", f"127.0.0.1:{port}", "--node-id", "solo",
            "--discovery", "none", "--min-peers", "0", "--out", folder, "--log-format", "json",
            # Progress lines only at the two measurement points (log_every divides both).
            "--log-every", str(args.warmup), "--checkpoint-every", str(10 * total),
            "--dataset", "ring8", "--width", str(args.width), "--batch-size", str(args.batch_size),
            "--iterations", str(total), "--eval-every", str(total), "--eval-samples", "500",
            "--threads", "1", "--device", "cpu",
        ]  # fmt: skip
        finished = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
        if finished.returncode != 0:
            raise SystemExit(f"agent failed ({finished.returncode}):\n{finished.stderr[-3000:]}")
        return iterations_per_second(json_lines(finished.stderr), args.warmup, args.iterations)


def run_plain(args: argparse.Namespace) -> float:
    command = [
        sys.executable, str(Path(__file__).resolve()), "--plain-loop", "--width", str(args.width),
        "--batch-size", str(args.batch_size), "--iterations", str(args.iterations),
        "--warmup", str(args.warmup),
    ]  # fmt: skip
    finished = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True)
    return iterations_per_second(json_lines(finished.stdout), args.warmup, args.iterations)


def plain_loop(args: argparse.Namespace) -> None:
    """Optimistic SGD written directly: nn.Modules, .backward(), the parameters updated in place."""
    import torch
    import torch.nn.functional as F

    from agent.core.config import build_config
    from agent.models import build_models
    from agent.train.data import load_dataset, partition
    from agent.train.workload import node_generator

    torch.set_num_threads(1)
    config = build_config({"dataset": "ring8", "width": args.width, "batch_size": args.batch_size})
    assert config.latent_dim is not None and config.lr is not None
    dataset = load_dataset("ring8", seed=config.seed)
    data = partition(dataset, 1, "iid", seed=config.seed)[0]
    stream = node_generator(config.seed, 0)
    torch.manual_seed(config.seed)
    generator, discriminator = build_models("mlp", dataset.spec.sample_shape, latent_dim=config.latent_dim,
                                            width=args.width)  # fmt: skip
    generator_parameters = list(generator.parameters())
    discriminator_parameters = list(discriminator.parameters())
    parameters = generator_parameters + discriminator_parameters
    lr = config.lr

    def gradients() -> list[torch.Tensor]:
        """Each player's gradient of its own loss at the modules' current parameters, fresh minibatch."""
        real = data.sample(args.batch_size, stream)
        noise = torch.randn(args.batch_size, config.latent_dim, generator=stream)
        fake = generator(noise)
        d_fake = discriminator(fake)
        loss_d = F.softplus(-discriminator(real)).mean() + F.softplus(d_fake).mean()
        loss_g = F.softplus(-d_fake).mean()
        for parameter in parameters:
            parameter.grad = None
        loss_d.backward(inputs=discriminator_parameters, retain_graph=True)
        loss_g.backward(inputs=generator_parameters)
        return [parameter.grad for parameter in parameters]  # type: ignore[misc]

    anchors = [parameter.detach().clone() for parameter in parameters]  # x: the iterate itself
    previous = gradients()  # g_prev at x0, as the agent starts
    for iteration in range(1, args.warmup + args.iterations + 1):
        with torch.no_grad():
            for parameter, anchor, direction in zip(parameters, anchors, previous, strict=True):
                parameter.copy_(anchor - lr * direction)  # z = x − η g_prev
        current = gradients()
        with torch.no_grad():
            for anchor, gradient in zip(anchors, current, strict=True):
                anchor.sub_(lr * gradient)  # x = x − η g
        previous = current
        if iteration % args.warmup == 0:
            stamp = datetime.now(UTC).isoformat().replace("+00:00", "Z")
            print(json.dumps({"event": "iteration", "iteration": iteration, "timestamp": stamp}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=256, help="MLP hidden width (as in cluster_bench)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--iterations", type=int, default=1000, help="measured iterations per run")
    parser.add_argument("--warmup", type=int, default=100, help="iterations before the measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--plain-loop", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.iterations % args.warmup:
        parser.error("--iterations must be a multiple of --warmup (progress lines come every --warmup)")
    if args.plain_loop:
        plain_loop(args)
        return
    print(f"# {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, load average {os.getloadavg()[0]:.2f}; "
          f"ring8 MLP width {args.width}, batch {args.batch_size}, {args.iterations} iterations after "
          f"{args.warmup} warm-up, {args.repeats} repeats")  # fmt: skip
    agent_rates, plain_rates = [], []
    for repeat in range(args.repeats):
        started = time.time()
        agent_rates.append(run_agent(args))
        plain_rates.append(run_plain(args))
        print(f"  repeat {repeat + 1}: agent {agent_rates[-1]:.1f} it/s, plain {plain_rates[-1]:.1f} it/s, "
              f"ratio {agent_rates[-1] / plain_rates[-1]:.3f} "
              f"({time.time() - started:.0f} s, load {os.getloadavg()[0]:.2f})", flush=True)  # fmt: skip
    agent, plain = statistics.median(agent_rates), statistics.median(plain_rates)
    # Each agent run is paired with the plain run right after it, so a ratio per pair cancels most of
    # the machine's load drift; their median is the steadier figure on a shared machine.
    paired = statistics.median(a / p for a, p in zip(agent_rates, plain_rates, strict=True))
    print("| loop | iterations/s (median) | min–max |")
    print("|---|---:|---:|")
    print(f"| dpgan-agent, one node | {agent:.1f} | {min(agent_rates):.1f}–{max(agent_rates):.1f} |")
    print(f"| plain PyTorch | {plain:.1f} | {min(plain_rates):.1f}–{max(plain_rates):.1f} |")
    verdict = "met" if min(agent / plain, paired) >= 0.95 else "missed"
    print(f"\nagent / plain = {agent / plain:.3f} (ratio of medians), {paired:.3f} (median of paired "
          f"ratios); goal ≥ 0.95: {verdict}")  # fmt: skip


if __name__ == "__main__":
    main()
