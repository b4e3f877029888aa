"""GPU check: real agents reproduce the simulator on a device, and how long a training step takes there.

What it checks, on one machine, with the device chosen by ``--device`` (default: cuda if torch sees it,
else cpu):

1. Equivalence: a 2-agent cluster (``dpgan-agent --local 2``: two processes, gRPC over mutual TLS on
   loopback) and the simulator (``dpgan-agent simulate --nodes 2``) train the configuration the tests use
   (tests/agents.py EQUIVALENCE_FLAGS: ring8, ring, 2 gossip rounds, 50 iterations, seed 7) on the device.
   Each node's ``node-<i>/final.safetensors`` must match: same iteration and data-stream RNG state, and
   parameters and optimizer state within a tolerance (default 1e-6 on cpu, where the test suite asks
   for the same; 1e-4 elsewhere, as GPU kernels need not be bit-identical across processes), scaled
   by max(1, the largest |value|). The largest absolute difference is reported either way.
2. Timing: the simulator's steady-state training time per iteration (2 nodes; the ``train_seconds``
   between its two evaluations, so start-up and first-call warm-up are left out) for ring8 (MLP) and
   digits (DCGAN, scikit-learn's bundled images) on the device and on the CPU (``--threads`` torch
   threads, default 1 as agents use), plus the agents' own compute seconds per iteration.

It prints a markdown table and writes ``gpu_check.json`` and ``gpu_check.md`` into ``--out`` (default
runs/gpu-check; the runs' folders are kept there too). Nothing is downloaded.

Exit status: 0 pass; 1 the agents do not match the simulator; 2 bad arguments; 3 the requested device is
not available (one line says why); 4 a run failed or timed out (its log is named).

On a lent GPU machine (a checkout of the repo, no internet): torch with CUDA and this project's
dependencies must already be importable there (the repo's ``pip install -e .`` with a CUDA torch wheel
installed first; ``wheels/`` holds only the CPU wheel). The script runs ``python -m agent.cli`` from the
repo root, so the package need not be installed. Then, for example:

    python scripts/gpu_check.py --device cuda --out "$OUT/gpu-check"

Here, on a CPU-only machine: ``python scripts/gpu_check.py --device cpu`` (about 30 s on 2 cores).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
NODES = 2
# tests/agents.py EQUIVALENCE_FLAGS (tests/test_gpu_check.py keeps the two equal).
EQUIVALENCE_FLAGS = [
    "--dataset", "ring8", "--topology", "ring", "--rounds", "2", "--iterations", "50",
    "--eval-every", "50", "--eval-samples", "200", "--seed", "7",
]  # fmt: skip
# Equivalence is checked for exact gossip, for compressed gossip with overlap (edge copies on the CPU
# while x lives on the device; the gradient on its own thread), and for float32's bits coded against each
# edge's last vector (the delta wire: references kept on the CPU at both ends).
VARIANTS = {
    "exact": [],
    "topk+overlap": ["--compression", "topk", "--overlap"],
    "float32-delta": ["--wire-dtype", "float32-delta"],
}
TIMING_FLAGS = ["--eval-samples", "200", "--seed", "7", "--nodes", str(NODES)]
WORKLOADS = {"ring8": ["--dataset", "ring8", "--rounds", "2"], "digits": ["--dataset", "digits"]}
EXIT_MISMATCH, EXIT_UNAVAILABLE, EXIT_RUN_FAILED = 1, 3, 4


class RunFailed(RuntimeError):
    pass


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu", "mps"), default=None, help="default: cuda if any")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "gpu-check", help="output folder")
    parser.add_argument("--tolerance", type=float, default=None, help="default: 1e-6 on cpu, else 1e-4")
    parser.add_argument("--timing-iterations", type=int, default=100, help="timed iterations per workload")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads of the timing runs")
    parser.add_argument("--run-timeout", type=float, default=300.0, help="seconds allowed per run")
    args = parser.parse_args(argv)
    if args.timing_iterations < 1 or args.threads < 1 or args.run_timeout <= 0:
        parser.error("--timing-iterations, --threads and --run-timeout must be positive")
    return args


def unavailable(device: str) -> str | None:
    """Why ``device`` cannot be used here, or None."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA device (torch.cuda.is_available() is False)"
    if device == "mps" and not torch.backends.mps.is_available():
        return f"torch {torch.__version__} sees no MPS device"
    return None


def device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name(0)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def dpgan(arguments: list[str], out: Path, timeout: float) -> float:
    """Run ``python -m agent.cli ARGUMENTS --out OUT`` from the repo root into a fresh ``out`` (its output
    in ``OUT.log``); the wall seconds it took."""
    shutil.rmtree(out, ignore_errors=True)
    log = out.with_name(out.name + ".log")
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "agent.cli", *arguments, "--out", str(out)]
    started = time.perf_counter()
    with log.open("w") as handle:
        env = os.environ | {"PYTHONPATH": path}
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT)
        timed_out = False
        # Past the timeout: SIGTERM (--local forwards it to its agents, which run in their own sessions
        # and would outlive a SIGKILL of the launcher), a second one (exit at once), then SIGKILL.
        for wait, stop in ((timeout, process.terminate), (20, process.terminate), (10, process.kill)):
            try:
                process.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                timed_out = True
                stop()
        code = None if timed_out else process.wait()
        process.wait()
    if code != 0:
        what = f"ran past {timeout:.0f} s" if code is None else f"exited {code}"
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:])
        raise RunFailed(f"dpgan-agent {' '.join(arguments[:2])} {what}; the end of {log}:\n{tail}")
    return time.perf_counter() - started


def compare(agents: Path, simulated: Path) -> dict[str, Any]:
    """The largest differences between each agent's final checkpoint and the simulator's node."""
    import torch

    from agent.checkpoint import load_checkpoint

    worst, scale, problems = 0.0, 0.0, []
    for i in range(NODES):
        agent = load_checkpoint(agents / f"node-{i}" / "final.safetensors")
        sim = load_checkpoint(simulated / f"node-{i}" / "final.safetensors")
        if agent.iteration != sim.iteration:
            problems.append(f"node {i}: iteration {agent.iteration} vs simulator {sim.iteration}")
        rng = (agent.rng_state, sim.rng_state)
        if None in rng or not torch.equal(*rng):
            problems.append(f"node {i}: the data-stream RNG state differs")
        for kind, ours, theirs in (
            ("parameter", agent.parameters, sim.parameters),
            ("optimizer", agent.optimizer, sim.optimizer),
        ):
            if ours.keys() != theirs.keys():
                problems.append(f"node {i}: the {kind} names differ")
                continue
            for name, tensor in theirs.items():
                worst = max(worst, float((tensor.double() - ours[name].double()).abs().max()))
                scale = max(scale, float(tensor.double().abs().max()))
    return {"max_abs_difference": worst, "max_abs_value": scale, "problems": problems}


def sent_bytes(agents: Path) -> int:
    """Bytes the agents of one ``--local`` run sent, all nodes together (its summary.json)."""
    summaries = json.loads((agents / "summary.json").read_text())["node_summaries"].values()
    return sum(summary["bytes_sent"] for summary in summaries)


def steady_seconds(sim: Path) -> float:
    """Training seconds per iteration between the simulator's two evaluations (warm-up excluded)."""
    records = [json.loads(line) for line in (sim / "metrics.jsonl").read_text().splitlines() if line]
    first, last = records[-2], records[-1]
    return (last["train_seconds"] - first["train_seconds"]) / (last["iteration"] - first["iteration"])


def time_workloads(args: argparse.Namespace) -> list[dict[str, Any]]:
    half = args.timing_iterations
    rows = []
    for workload, flags in WORKLOADS.items():
        seconds = {}
        for device in dict.fromkeys([args.device, "cpu"]):
            iterations = ["--iterations", str(2 * half), "--eval-every", str(half)]
            timing = [*flags, *iterations, "--threads", str(args.threads), "--device", device]
            folder = args.out / f"timing-{workload}-{device}"
            dpgan(["simulate", *timing, *TIMING_FLAGS], folder, args.run_timeout)
            seconds[device] = steady_seconds(folder)
        ratio = seconds["cpu"] / seconds[args.device]
        rows.append({"workload": workload, "iterations_timed": half, "seconds_per_iteration": seconds,
                     "cpu_over_device": ratio})  # fmt: skip
    return rows


def table(device: str, rows: list[dict[str, Any]], agent_ms: float, threads: int) -> str:
    lines = [
        f"| workload ({NODES} nodes, simulator) | ms/iteration on {device} | ms/iteration on cpu "
        f"({threads} thread{'s' if threads > 1 else ''}) | cpu / {device} |",
        "|---|---:|---:|---:|",
    ]
    for row in rows:
        ms = {name: f"{1e3 * s:.2f}" for name, s in row["seconds_per_iteration"].items()}
        lines.append(f"| {row['workload']} | {ms[device]} | {ms['cpu']} | {row['cpu_over_device']:.2f}x |")
    lines.append(f"| ring8, compute of one of {NODES} agents (warm-up included) | {agent_ms:.2f} | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(REPO))  # agent.checkpoint, whether or not the package is installed
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    reason = unavailable(args.device)
    if reason is not None:
        print(f"gpu_check: device {args.device} is not available: {reason}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    tolerance = args.tolerance if args.tolerance is not None else (1e-6 if args.device == "cpu" else 1e-4)
    device_flags = [*EQUIVALENCE_FLAGS, "--device", args.device]
    (args.out / "gpu_check.json").unlink(missing_ok=True)  # no stale verdict if this run fails
    try:
        equivalence: dict[str, Any] = {"max_abs_difference": 0.0, "max_abs_value": 0.0, "problems": []}
        agents_s = sim_s = 0.0
        bytes_sent: dict[str, int] = {}  # by variant: what the agents sent, all nodes together
        for variant, extra in VARIANTS.items():
            suffix = "" if not extra else "-" + variant.replace("+", "-")
            flags = [*device_flags, *extra]
            agents_s += dpgan(["--local", str(NODES), *flags], args.out / f"agents{suffix}", args.run_timeout)
            simulate = ["simulate", *flags, "--nodes", str(NODES)]
            sim_s += dpgan(simulate, args.out / f"sim{suffix}", args.run_timeout)
            found = compare(args.out / f"agents{suffix}", args.out / f"sim{suffix}")
            for key in ("max_abs_difference", "max_abs_value"):
                equivalence[key] = max(equivalence[key], found[key])
            equivalence["problems"] += [f"{variant}: {problem}" for problem in found["problems"]]
            bytes_sent[variant] = sent_bytes(args.out / f"agents{suffix}")
        bound = tolerance * max(1.0, equivalence["max_abs_value"])
        passed = not equivalence["problems"] and equivalence["max_abs_difference"] <= bound
        verdict = (
            f"{'PASS' if passed else 'FAIL'}: {NODES} agents vs simulator ({', '.join(VARIANTS)}) "
            f"on {args.device} "
            f"({device_name(args.device)}): max |difference| {equivalence['max_abs_difference']:.3g} "
            f"(bound {bound:.3g})" + "".join(f"; {p}" for p in equivalence["problems"])
        )
        print(verdict, flush=True)  # before the timing runs
        timing = time_workloads(args)
    except RunFailed as error:
        print(f"gpu_check: a run failed: {error}", file=sys.stderr)
        return EXIT_RUN_FAILED
    summaries = json.loads((args.out / "agents" / "summary.json").read_text())["node_summaries"].values()
    agent_ms = 1e3 * max(s["compute_seconds"] / s["iterations"] for s in summaries)
    result = {
        "passed": passed,
        "device": args.device,
        "device_name": device_name(args.device),
        "cpu_name": device_name("cpu"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "machine": platform.node(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "equivalence": {**equivalence, "tolerance": tolerance, "bound": bound, "flags": EQUIVALENCE_FLAGS,
                        "agents_wall_seconds": round(agents_s, 2), "simulator_wall_seconds": round(sim_s, 2)},
        "agent_compute_ms_per_iteration": agent_ms,
        "agents_bytes_sent": bytes_sent,
        "timing": timing,
        "timing_threads": args.threads,
    }  # fmt: skip
    markdown = table(args.device, timing, agent_ms, args.threads)
    markdown += "\n\nBytes the agents sent (both nodes): " + ", ".join(
        f"{variant} {sent / 1e6:.1f} MB" for variant, sent in bytes_sent.items()
    )
    (args.out / "gpu_check.md").write_text(f"{verdict}\n\n{markdown}\n")
    (args.out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{markdown}\n\nresults: {args.out / 'gpu_check.json'}")
    return 0 if passed else EXIT_MISMATCH


if __name__ == "__main__":
    sys.exit(main())
