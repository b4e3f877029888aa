"""``dpgan-agent --local N``: N separate agent processes on loopback, one terminal showing progress.

Each child is a full ``dpgan-agent`` with its own gRPC server, static ``--peers`` of the others, and
its own output folder ``<out>/node-<i>``. They talk mutual TLS: the launcher creates a throwaway cluster
CA and one certificate per node in ``<out>/tls`` (kept for --resume), unless ``--insecure`` is given.
The launcher is only a process supervisor (it takes no part
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

from agent.checkpoint import CheckpointError, load_checkpoint
from agent.core.config import TrainConfig, check_topology
from agent.files import (
    check_run_folder,
    clear_run_files,
    finite_json,
    previous_run_files,
    remove_stale_temporaries,
    write_atomic,
)
from agent.progress import ProgressBar
from agent.security.throwaway import throwaway_pki

# Per-node agent flags the launcher honours: it passes them to every agent it starts.
FORWARDED_FLAGS = (
    "--resume",
    "--overwrite",
    "--keep-checkpoints",
    "--checkpoint-every",
    "--log-every",
    "--round-timeout",
    "--startup-timeout",
    "--chunk-bytes",
    "--min-peers",
    "--settle",
    "--view-period",
    "--probe-interval",
    "--isolation",
    "--isolation-min-peers",
    "--isolation-timeout",
    "--stop-grace",
    "--pace",
    "--insecure",
)
_LOOPBACK = "the launcher gives each agent a free loopback port and lists the others as its --peers"
# Flags that place one agent on a network: the launcher decides them for its agents, so they are refused.
REFUSED_FLAGS = {
    "--listen": _LOOPBACK,
    "--advertise": _LOOPBACK,
    "--peers": _LOOPBACK,
    "--interface": _LOOPBACK,
    "--discovery": "the agents know each other from static --peers (no mDNS)",
    "--dns-name": "the agents know each other from static --peers (no DNS)",
    "--dns-interval": "the agents know each other from static --peers (no DNS)",
    "--node-id": "the agents are named node-0 ... node-<N-1>",
    "--node-id-file": "the agents are named node-0 ... node-<N-1>",
    "--tls-issue-from": "the launcher issues each agent a certificate from a throwaway CA in <out>/tls",
    "--log-format": "the launcher reads its agents' JSON logs (kept in <out>/node-<i>/agent.log)",
    "--when-finished": "the launcher waits for its agents to exit, then writes the cluster's results",
    "--on-config-change": "the cluster's own results in <out> would not move with the agents' runs; "
    "choose a new --out",
}
# Configuration keys a --local cluster decides itself, as flags or in a --config file.
_OWN_CA = "the launcher issues each agent a certificate from a throwaway CA in <out>/tls"
REFUSED_KEYS = {"tls_cert": _OWN_CA, "tls_key": _OWN_CA, "tls_ca": _OWN_CA}


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


def _dest(flag: str) -> str:
    return flag.removeprefix("--").replace("-", "_")


def agent_flags(argv: Sequence[str], count: int) -> list[str]:
    """The flags of ``dpgan-agent --local N ...`` every agent gets; ValueError for one it cannot honour.

    Read from the parsed command line (so abbreviations and ``--flag=value`` count), compared with the
    parser's defaults: a flag left at its default is not passed on."""
    from agent.configfile import read_yaml
    from agent.node.main import agent_parser

    parser = agent_parser()
    args = parser.parse_args(list(argv))
    for flag, reason in REFUSED_FLAGS.items():
        if getattr(args, _dest(flag)) != parser.get_default(_dest(flag)):
            raise ValueError(f"--local: {flag} cannot be used ({reason}); drop it or run the agents yourself")
    from_file = read_yaml(args.config) if args.config is not None else {}
    for key, reason in REFUSED_KEYS.items():
        flag = "--" + key.replace("_", "-")
        if hasattr(args, key):
            raise ValueError(f"--local: {flag} cannot be used ({reason}); drop it or run the agents yourself")
        if from_file.get(key) is not None:
            raise ValueError(f"--local: {args.config} sets {key} ({reason}); drop it")
    nodes = getattr(args, "nodes", None)
    if nodes is None and args.config is not None:
        nodes = read_yaml(args.config).get("nodes")
    if nodes is not None and nodes != count:
        raise ValueError(f"--local {count} sets the number of nodes, but nodes is {nodes}; give one of them")
    forwarded: list[str] = []
    if args.metrics_port is not None:
        if not 1 <= args.metrics_port <= 65536 - count:
            raise ValueError(
                f"--local: --metrics-port P gives agent i port P + i: P must be 1 to {65536 - count} "
                f"(0, any free port, cannot be told apart across {count} agents)"
            )
        forwarded.append(f"--metrics-port={args.metrics_port}")  # agent i listens on P + i
    if args.data_port is not None:
        if not args.insecure:
            raise ValueError(
                "--local: --data-port needs --insecure (the data plane is plaintext; without --insecure "
                "the agents run mutual TLS)"
            )
        if args.data_port and not 1 <= args.data_port <= 65536 - count:
            raise ValueError(
                f"--local: --data-port P gives agent i port P + i: P must be 0 or 1 to {65536 - count}"
            )
        forwarded.append(f"--data-port={args.data_port}")  # agent i: P + i, or any free port for 0
    for flag in FORWARDED_FLAGS:
        value = getattr(args, _dest(flag))
        if value == parser.get_default(_dest(flag)):
            continue
        forwarded += [flag] if value is True else [f"{flag}={value}"]
    return forwarded


def agent_command(
    i: int, addresses: list[str], node_dir: Path, config_path: Path, flags: Sequence[str]
) -> list[str]:
    """The command line of agent ``i`` of a --local cluster."""
    address = addresses[i]
    return [
        sys.executable, "-m", "agent.cli",
        "--listen", address, "--advertise", address, "--node-id", f"node-{i}",
        "--peers", ",".join(a for j, a in enumerate(addresses) if j != i),
        "--out", str(node_dir), "--config", str(config_path), "--log-format", "json",
        *flags,
    ]  # fmt: skip


def check_cluster_folder(out: Path, argv: Sequence[str]) -> None:
    """Refuse (ValueError) a fresh cluster over a previous run's results in ``out`` or its node folders
    unless --resume or --overwrite says what to do with them."""
    from agent.node.main import agent_parser

    args = agent_parser().parse_args(list(argv))
    holds = previous_run_files(out)
    if out.is_dir():
        for node_dir in sorted(d for d in out.glob("node-*") if d.is_dir()):
            holds += previous_run_files(node_dir)
    check_run_folder(out, resume=args.resume, overwrite=args.overwrite, holds=holds)


def _finished(out: Path, count: int, iterations: int | None) -> int | None:
    """The iteration a finished cluster run in ``out`` reached (every node's final model at the goal and
    the cluster summary written), else None."""
    from agent.node.recorder import finished_iteration

    if iterations is None or not (out / "summary.json").is_file():
        return None
    reached = [finished_iteration(out / f"node-{i}", iterations) for i in range(count)]
    return None if None in reached else min(r for r in reached if r is not None)


def check_same_run(out: Path, count: int, config: TrainConfig) -> None:
    """--resume: refuse (ValueError) to continue a cluster run in ``out`` written with another cluster
    configuration or run id, naming the keys (the agents' own --on-config-change new-run would move
    each node's run but not the launcher's summary and metrics, so the launcher asks for a new --out)."""
    from agent.checkpoint import CheckpointError, load_latest
    from agent.node.runs import run_differences

    for i in range(count):
        folder = out / f"node-{i}"
        try:
            latest = load_latest(folder)
            final = folder / "final.safetensors"
            stored = (
                latest.checkpoint.config
                if latest is not None
                else load_checkpoint(final).config
                if final.is_file()
                else None
            )
        except CheckpointError:
            continue  # the agent itself names a damaged folder
        if stored is None:
            continue
        differing = run_differences(stored, config)
        if differing:
            raise ValueError(
                f"--local --resume: the run in {out} was trained with a different configuration "
                f"({', '.join(differing)} differ); give a new --out, or --overwrite to replace that run"
            )


class Progress:
    """The cluster's progress: the iteration every node has reached (the slowest node's), with rate and
    ETA. A tqdm bar on a terminal (the agents' warnings print above it), a line per change otherwise."""

    def __init__(self, node_ids: list[str], total: int, initial: int = 0) -> None:
        self.iterations = dict.fromkeys(node_ids, initial)
        self.lock = threading.Lock()
        self.bar = ProgressBar(total, desc="dpgan --local", initial=initial)

    def update(self, node_id: str, event: dict[str, Any]) -> None:
        with self.lock:
            before = min(self.iterations.values())
            self.iterations[node_id] = int(event.get("iteration", 0))
            done = min(self.iterations.values())
            if done == before:
                return
            losses = {k: float(event[k]) for k in ("loss_g", "loss_d") if k in event}
            if self.bar.enabled:
                self.bar.update_to(done, **losses)
                return
            eta = self.bar.eta_fields(done)
            line = f"[dpgan --local] iteration {done}/{eta['total']} ({eta['percent']}%)"
            if "eta_s" in eta:
                line += f", ETA {eta['eta_s']:.0f} s"
            line += "  " + "  ".join(f"{k}={v:.4g}" for k, v in losses.items())
            print(line, file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        self.bar.write(text + "\n")

    def close(self) -> None:
        self.bar.close()


def _pump(stream: IO[str], log_path: Path, node_id: str, progress: Progress, append: bool) -> None:
    with log_path.open("a" if append else "w") as log:  # a resumed run keeps the earlier log
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
                progress.note(f"[{node_id}] {event.get('event')}: {event.get('error') or event}")


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
    try:
        vectors = [problem.layout.flatten(load_checkpoint(path).parameters) for path in finals]
    except CheckpointError as error:
        return {"error": str(error)}
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
    flags = agent_flags(argv, count)
    check_topology(config, count)  # before any agent starts: every node would fail alike
    check_cluster_folder(out, argv)
    if "--resume" in flags:
        check_same_run(out, count, config)
    done = _finished(out, count, config.iterations) if "--resume" in flags else None
    if done is not None:
        print(
            f"[dpgan --local] the run in {out} is finished ({done} iterations); its results are kept "
            f"({out / 'summary.json'}); give a larger --iterations to train on",
            file=sys.stderr,
        )
        return 0
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    if "--overwrite" in flags:
        clear_run_files(out)  # the agents clear their own folders
    cluster_config = config.to_dict() | {"nodes": count}
    config_path = out / "cluster.yaml"
    config_path.write_text(yaml.safe_dump(cluster_config, sort_keys=True))
    ports = free_ports(count)
    addresses = [f"127.0.0.1:{port}" for port in ports]
    node_ids = [f"node-{i}" for i in range(count)]
    metrics_base = next((int(f.split("=")[1]) for f in flags if f.startswith("--metrics-port=")), None)
    data_base = next((int(f.split("=")[1]) for f in flags if f.startswith("--data-port=")), None)
    flags = [f for f in flags if not f.startswith(("--metrics-port=", "--data-port="))]
    insecure = "--insecure" in flags
    tls = {node_id: [] for node_id in node_ids} if insecure else throwaway_pki(out / "tls", node_ids)
    progress = Progress(node_ids, config.iterations or 0)
    children: list[subprocess.Popen[str]] = []
    pumps: list[threading.Thread] = []
    started = time.perf_counter()
    print(
        f"[dpgan --local] starting {count} agents on {', '.join(addresses)} "
        f"({'plaintext' if '--insecure' in flags else 'mutual TLS, CA in ' + str(out / 'tls')}); "
        f"output in {out}",
        file=sys.stderr,
    )

    def forward(signum: int, _frame: object) -> None:
        # SIGHUP (the terminal went away) stops the agents like SIGTERM; a second signal is forwarded
        # too, so a second Ctrl-C still means "exit at once".
        forwarded = signal.SIGTERM if signum == signal.SIGHUP else signum
        for child in children:
            if child.poll() is None:
                child.send_signal(forwarded)

    # Installed before the first agent starts: the agents run in their own sessions, so a Ctrl-C reaches
    # them only through this handler.
    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        for i, node_id in enumerate(node_ids):
            node_dir = out / node_id
            node_dir.mkdir(parents=True, exist_ok=True)
            own = [f"--metrics-port={metrics_base + i}"] if metrics_base is not None else []
            if data_base is not None:
                own.append(f"--data-port={data_base + i if data_base else 0}")
            command = agent_command(i, addresses, node_dir, config_path, [*flags, *tls[node_id], *own])
            # Each agent in its own session: a Ctrl-C in the terminal reaches only the launcher, which
            # forwards it once (an agent takes a second signal as "exit at once, without a checkpoint").
            child = subprocess.Popen(
                command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, start_new_session=True
            )
            children.append(child)
            assert child.stderr is not None
            pump = threading.Thread(
                target=_pump,
                args=(child.stderr, node_dir / "agent.log", node_id, progress, "--resume" in flags),
            )
            pump.start()
            pumps.append(pump)
        codes = [child.wait() for child in children]
    except BaseException:
        for child in children:  # they are in their own sessions: nothing else would stop them
            if child.poll() is None:
                child.kill()
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for pump in pumps:
            pump.join(timeout=5)
        progress.close()
    node_dirs = [out / node_id for node_id in node_ids]
    records = []
    for node_dir in node_dirs:
        metrics = node_dir / "metrics.jsonl"
        if metrics.exists():
            records += [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    write_atomic(
        out / "metrics.jsonl",
        "".join(json.dumps(finite_json(r), allow_nan=False) + "\n" for r in records).encode(),
    )
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
    text = json.dumps(finite_json(summary), indent=2, allow_nan=False)
    write_atomic(out / "summary.json", (text + "\n").encode())
    quality = summary["average_model"].get("quality")
    print(
        f"[dpgan --local] done in {summary['wall_seconds']:.1f} s; exit codes {codes}; "
        f"network-average model: {quality}; summary in {out / 'summary.json'}",
        file=sys.stderr,
    )
    return 0 if all(code == 0 for code in codes) else 1
