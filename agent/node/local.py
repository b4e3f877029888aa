"""``dpgan-agent --local N``: N separate agent processes on loopback, one terminal showing progress.

Each child is a full ``dpgan-agent`` with its own gRPC server, static ``--peers`` of the others, and
its own output folder ``<out>/node-<i>``. The launcher is only a process supervisor (it takes no part
in training): it forwards SIGINT/SIGTERM, shows progress from the children's JSON logs, and when
they are done evaluates the network-average model and writes ``<out>/summary.json``,
``<out>/metrics.jsonl`` (all nodes' evaluations) and ``<out>/samples-final.png``.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import yaml

from agent.checkpoint import load_checkpoint
from agent.core.config import TrainConfig
from agent.files import write_atomic

FORWARDED_FLAGS = (
    "--checkpoint-every",
    "--log-every",
    "--round-timeout",
    "--startup-timeout",
    "--chunk-bytes",
)


def free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _forwarded(argv: Sequence[str]) -> list[str]:
    forwarded: list[str] = []
    items = list(argv)
    for position, item in enumerate(items):
        name = item.split("=", 1)[0]
        if name in FORWARDED_FLAGS:
            forwarded += [item] if "=" in item else [item, items[position + 1]]
    return forwarded


class Progress:
    """Latest iteration per node, printed as one line (rewritten in place on a terminal)."""

    def __init__(self, node_ids: list[str], total: int) -> None:
        self.iterations = dict.fromkeys(node_ids, 0)
        self.total = total
        self.lock = threading.Lock()
        self.tty = sys.stderr.isatty()

    def update(self, node_id: str, event: dict[str, Any]) -> None:
        with self.lock:
            before = min(self.iterations.values())
            self.iterations[node_id] = int(event.get("iteration", 0))
            done = min(self.iterations.values())
            if done == before:
                return
            losses = " ".join(f"{k}={event[k]:.3f}" for k in ("loss_g", "loss_d") if k in event)
            timing = f"compute={event.get('compute_s', 0):.4f}s comm={event.get('communication_s', 0):.4f}s"
            line = f"[dpgan --local] iteration {done}/{self.total}  {losses}  {timing}"
            if self.tty:
                print("\r" + line.ljust(100), end="", file=sys.stderr, flush=True)
            else:
                print(line, file=sys.stderr, flush=True)


def _pump(stream: IO[str], log_path: Path, node_id: str, progress: Progress) -> None:
    with log_path.open("w") as log:
        for line in stream:
            log.write(line)
            log.flush()
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if event.get("event") == "iteration":
                progress.update(node_id, event)
            elif event.get("level") in ("warning", "error"):
                print(f"\n[{node_id}] {event.get('event')}: {event.get('error') or event}", file=sys.stderr)


def _average_model_report(config: TrainConfig, out: Path, node_dirs: list[Path]) -> dict[str, Any]:
    from agent.train.data import load_dataset
    from agent.train.evaluate import Evaluator
    from agent.train.workload import GanProblem, resolve_device

    finals = [d / "final.safetensors" for d in node_dirs]
    if not all(path.exists() for path in finals):
        return {}
    dataset = load_dataset(
        config.dataset, path=config.data_path, image_size=config.image_size, seed=config.seed
    )
    problem = GanProblem.build(config, dataset.spec, resolve_device("cpu"))
    vectors = [problem.layout.flatten(load_checkpoint(path).parameters) for path in finals]
    average = sum(vectors[1:], vectors[0].clone()) / len(vectors)
    evaluator = Evaluator(dataset, config.eval_samples, config.seed)
    evaluator.save_samples(problem, average, out / "samples-final.png")
    consensus = float(sum(((v - average) ** 2).sum() for v in vectors) / len(vectors))
    return {"quality": evaluator.evaluate(problem, average), "consensus_distance": consensus}


def run_local_cluster(count: int, argv: Sequence[str], out: Path, config: TrainConfig) -> int:
    if count < 1:
        raise ValueError(f"--local: need at least 1 node, got {count}")
    if count > 64:
        raise ValueError(f"--local: {count} processes is more than one machine should run; use at most 64")
    out.mkdir(parents=True, exist_ok=True)
    cluster_config = config.to_dict() | {"nodes": count}
    config_path = out / "cluster.yaml"
    config_path.write_text(yaml.safe_dump(cluster_config, sort_keys=True))
    ports = free_ports(count)
    addresses = [f"127.0.0.1:{port}" for port in ports]
    node_ids = [f"node-{i}" for i in range(count)]
    progress = Progress(node_ids, config.iterations or 0)
    children: list[subprocess.Popen[str]] = []
    pumps: list[threading.Thread] = []
    started = time.perf_counter()
    print(
        f"[dpgan --local] starting {count} agents on {', '.join(addresses)}; output in {out}", file=sys.stderr
    )
    for i, (address, node_id) in enumerate(zip(addresses, node_ids, strict=True)):
        node_dir = out / node_id
        node_dir.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable, "-m", "agent.cli",
            "--listen", address, "--advertise", address, "--node-id", node_id,
            "--peers", ",".join(a for j, a in enumerate(addresses) if j != i),
            "--out", str(node_dir), "--config", str(config_path), "--log-format", "json",
            *_forwarded(argv),
        ]  # fmt: skip
        child = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        children.append(child)
        assert child.stderr is not None
        pump = threading.Thread(target=_pump, args=(child.stderr, node_dir / "agent.log", node_id, progress))
        pump.start()
        pumps.append(pump)

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        codes = [child.wait() for child in children]
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for pump in pumps:
            pump.join(timeout=5)
    print("", file=sys.stderr)
    node_dirs = [out / node_id for node_id in node_ids]
    records = []
    for node_dir in node_dirs:
        metrics = node_dir / "metrics.jsonl"
        if metrics.exists():
            records += [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    write_atomic(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records).encode())
    summaries = {}
    for node_id, node_dir in zip(node_ids, node_dirs, strict=True):
        path = node_dir / "summary.json"
        if path.exists():
            summaries[node_id] = json.loads(path.read_text())
    summary = {
        "mode": "local",
        "nodes": count,
        "exit_codes": codes,
        "wall_seconds": round(time.perf_counter() - started, 3),
        "average_model": _average_model_report(config, out, node_dirs),
        "node_quality": {node_id: s.get("final", {}).get("quality") for node_id, s in summaries.items()},
        "node_summaries": summaries,
        "config": cluster_config,
    }
    write_atomic(out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    quality = summary["average_model"].get("quality")
    print(
        f"[dpgan --local] done in {summary['wall_seconds']:.1f} s; exit codes {codes}; "
        f"network-average model: {quality}; summary in {out / 'summary.json'}",
        file=sys.stderr,
    )
    return 0 if all(code == 0 for code in codes) else 1
