"""Per-iteration compute vs communication time of a `dpgan-agent --local N` cluster on one machine.

    python bench/local_cluster_split.py --nodes 4 --iterations 300 [--dataset ring8] [--width 512]

Runs the real agents (separate processes, gRPC on loopback) and prints, per node, the mean seconds per
iteration spent in gossip rounds (push, wait, mix) and in the local step (extrapolate, gradient,
update), plus bytes sent per iteration, from each node's summary.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--dataset", default="ring8")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder)
        command = [
            sys.executable, "-m", "agent.cli", "--local", str(args.nodes), "--out", str(out),
            "--dataset", args.dataset, "--iterations", str(args.iterations), "--rounds", str(args.rounds),
            "--eval-every", str(args.iterations), "--eval-samples", "500",
            "--log-every", str(args.iterations),
        ] + (["--width", str(args.width)] if args.width else [])  # fmt: skip
        started = time.perf_counter()
        subprocess.run(command, check=True, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - started
        summary = json.loads((out / "summary.json").read_text())
    rows = []
    for node, node_summary in sorted(summary["node_summaries"].items()):
        iterations = node_summary["iterations"]
        rows.append(
            (
                node,
                1000 * node_summary["compute_seconds"] / iterations,
                1000 * node_summary["communication_seconds"] / iterations,
                node_summary["bytes_sent"] / iterations / 1e6,
            )
        )
    parameters = next(iter(summary["node_summaries"].values()))["parameters"]
    print(f"# {args.nodes} agents, {args.dataset}, {parameters} parameters ({4 * parameters / 1e6:.2f} MB), "
          f"rounds {args.rounds}, {args.iterations} iterations, wall {wall:.1f} s")  # fmt: skip
    print(f"# {platform.processor() or platform.machine()}, {time.strftime('%Y-%m-%d', time.gmtime())}")
    print("| node | compute ms/iter | communication ms/iter | MB sent/iter |")
    print("|---|---:|---:|---:|")
    for node, compute, communication, sent in rows:
        print(f"| {node} | {compute:.2f} | {communication:.2f} | {sent:.3f} |")


if __name__ == "__main__":
    main()
