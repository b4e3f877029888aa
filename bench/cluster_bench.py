"""DPOSG agents vs centralized baselines on a namespace cluster: time per iteration against link rate.

    sudo python bench/cluster_bench.py        # the default matrix: n 4 and 8, 3 rates, 12 systems (~35 min)
    sudo python bench/cluster_bench.py --all  # + quality table, agent overhead, docs/ PNG (hours on 2 cores)
    sudo python bench/cluster_bench.py --nodes 8 --rates 20 --systems ring ps --iterations 10
    sudo python bench/cluster_bench.py --nodes 8 --rates 20 --systems one-peer-exp allreduce --repeats 3
    python bench/cluster_bench.py --replay A/results.json B/results.json --rates 20 100  # tables, merged

Needs root: every node is a network namespace on one Linux bridge (tests/netns.py), its link shaped with
a token bucket (tbf, both directions) to each rate in ``--rates`` ("none" = the unshaped veth).

Systems, all on the same model, per-node batch, data split and per-node random streams:
  ring           dpgan-agent, DPOSG on a ring, t = 1 gossip round per iteration
  ring-t2        dpgan-agent, ring, t = 2
  one-peer-exp   dpgan-agent, one-peer exponential graph (one partner per iteration, log2 n period),
                 paced pushes (a vector goes out once the partner has entered that round)
  one-peer-exp-eager   the same with --pace off (every vector pushed as soon as it exists)
  ring-bf16      dpgan-agent, ring, t = 1, bfloat16 on the wire
  one-peer-exp-huffman one-peer exponential, float32-huffman on the wire (float32's bits, exponents coded)
  one-peer-exp-delta   one-peer exponential, float32-delta on the wire (float32's bits, coded against the
                 last vector sent on the edge)
  one-peer-exp-auto    one-peer exponential, float32-auto on the wire (the agent's default: float32's bits,
                 coded like float32-delta when the measured link is slow enough for it to pay)
  one-peer-exp-bf16    one-peer exponential, bfloat16 on the wire
  one-peer-exp-int8    one-peer exponential, compressed gossip (CHOCO, error feedback): int8, γ = 1
  one-peer-exp-topk    the same with top-k, 1 % of the entries per message, γ = 0.04
  one-peer-exp-randk   the same with random-k, 1 %, γ = 0.01
                 (compressed systems pass --compression to the agents; ratio and γ are the agent's defaults)
  allreduce      CPOSG, gradients averaged by torch.distributed gloo all_reduce (bench/baselines.py)
  allreduce-fp16 the same with the gradients compressed as DDP's fp16_compress_hook does (float16 on the wire)
  ps             CPOSG through a parameter server on host 0 (bench/baselines.py)

How one (n, system) is measured. The n processes are started once and left running; once every node has
logged its first iteration (start-up excluded), the harness cycles through the rates ``--repeats`` times
(none, 100, 20, none, 100, 20, ...), re-shaping every link on the fly. A *window* lasts until every node
has logged ``--warmup`` iterations (discarded: queues drain, TCP adapts) plus ``--iterations`` measured
ones, or, once it has run ``--window-seconds``, ``--min-iterations`` measured ones. Cycling the rates in
one launch keeps start-up (about 20 s for 8 torch processes on 2 cores) out of the budget and spreads slow
drifts of the machine's background load over every rate alike. Per window:

* seconds per iteration: per node, (last − first timestamp) / iterations over the measured iterations
  (the processes' own per-iteration log lines), then the median over nodes;
* compute and communication seconds: means of the nodes' logged per-iteration split;
* the 1-minute load average, and the CPU cores used by processes outside this benchmark (/proc/stat
  minus the benchmark's own processes), because the machine is shared.
Tables show medians over the repeat windows (with their min–max). Bytes per node per iteration come from
the bridge ports' receive counters (everything a host put on the wire: payload, gRPC/TCP/IP headers,
acknowledgements, liveness probes) over the whole measurement, divided by the node's iterations over the
same span; the payload the processes report (``bytes_sent``) is shown beside it.

``--quality`` adds the quality table, on a smaller model (``--quality-width``, the agent's tuned ring8
default) because the larger timing model needs far more iterations than this machine can afford: the same
update rules run in one process (the simulator's math, which ``tests/test_agent_cluster.py`` checks real
agents reproduce bit for bit; bf16 rounding applied to what neighbours receive, as the agent's codec
does), the network-average model evaluated with the agents' evaluator. The iterations each system needs
to reach the target, times its seconds per iteration measured on the same small model, give the wall time
to the target at each rate.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tests.netns import NetnsCluster, netns_unavailable_reason, remove_stale_namespaces  # noqa: E402

AGENT_PORT = 5000
PS_PORT = 6000
RENDEZVOUS_PORT = 29500
# Timing runs never reach their iteration goal: the harness stops them once the last window is done.
ENDLESS = 1_000_000
POLL_SECONDS = 0.2
# Consecutive iterations every node must log with all n members, and no round near the round timeout,
# before the first window.
SETTLE_ITERATIONS = 3
STOP_GRACE_SECONDS = 10.0
MEGABYTE = 1e6

Kind = Literal["agent", "allreduce", "ps"]


@dataclass(frozen=True)
class System:
    name: str
    label: str
    kind: Kind
    topology: str = "ring"
    rounds: int = 1
    wire_dtype: str = "float32"
    pace: str = "auto"  # the agents' --pace (auto: paced on time-varying graphs)
    # Agents: the --compression of compressed gossip (none, int8, topk, randk; the agent's default ratio
    # and γ). allreduce: "fp16" runs the gradients through DDP's fp16_compress_hook arithmetic.
    compression: str = "none"

    def agent_flags(self) -> list[str]:
        """The agent flags that select this system's communication (beside the workload's)."""
        flags = ["--topology", self.topology, "--rounds", str(self.rounds), "--wire-dtype", self.wire_dtype]
        flags += ["--pace", self.pace]
        if self.compression != "none":
            flags += ["--compression", self.compression]
        return flags

    def config_keys(self) -> dict[str, Any]:
        """The cluster configuration keys of this system's update rule (simulator and quality runs)."""
        keys: dict[str, Any] = {
            "topology": self.topology, "rounds": self.rounds, "wire_dtype": self.wire_dtype,
            "algorithm": "dposg" if self.kind == "agent" else "cposg",
        }  # fmt: skip
        if self.kind == "agent" and self.compression != "none":
            keys["compression"] = self.compression
        return keys

    @property
    def update_rule(self) -> tuple[str, ...]:
        """Systems with equal update rules compute the same iterates (one quality run stands for all):
        pacing changes when vectors travel, not what is computed; all-reduce and PS both run CPOSG;
        float32-huffman and float32-auto carry float32's bits exactly."""
        if self.kind != "agent":
            return ("cposg", self.compression)
        wire = "float32" if self.wire_dtype in ("float32-huffman", "float32-auto") else self.wire_dtype
        return ("dposg", self.topology, str(self.rounds), wire, self.compression)


SYSTEMS: dict[str, System] = {
    system.name: system
    for system in (
        System("ring", "DPOSG ring, t=1", "agent"),
        System("ring-t2", "DPOSG ring, t=2", "agent", rounds=2),
        System("one-peer-exp", "DPOSG one-peer exponential", "agent", topology="one_peer_exponential"),
        System(
            "one-peer-exp-eager",
            "DPOSG one-peer exponential, unpaced",
            "agent",
            topology="one_peer_exponential",
            pace="off",
        ),
        System(
            "one-peer-exp-huffman",
            "DPOSG one-peer exponential, float32-huffman wire",
            "agent",
            topology="one_peer_exponential",
            wire_dtype="float32-huffman",
        ),
        System(
            "one-peer-exp-delta",
            "DPOSG one-peer exponential, float32-delta wire",
            "agent",
            topology="one_peer_exponential",
            wire_dtype="float32-delta",
        ),
        System(
            "one-peer-exp-auto",
            "DPOSG one-peer exponential, float32-auto wire (default)",
            "agent",
            topology="one_peer_exponential",
            wire_dtype="float32-auto",
        ),
        System("ring-bf16", "DPOSG ring, t=1, bf16 wire", "agent", wire_dtype="bfloat16"),
        System(
            "one-peer-exp-bf16",
            "DPOSG one-peer exponential, bf16 wire",
            "agent",
            topology="one_peer_exponential",
            wire_dtype="bfloat16",
        ),
        System(
            "one-peer-exp-int8",
            "DPOSG one-peer exponential, CHOCO int8",
            "agent",
            topology="one_peer_exponential",
            compression="int8",
        ),
        System(
            "one-peer-exp-topk",
            "DPOSG one-peer exponential, CHOCO top-k 1 %",
            "agent",
            topology="one_peer_exponential",
            compression="topk",
        ),
        System(
            "one-peer-exp-randk",
            "DPOSG one-peer exponential, CHOCO random-k 1 %",
            "agent",
            topology="one_peer_exponential",
            compression="randk",
        ),
        System("allreduce", "CPOSG gloo all-reduce", "allreduce"),
        System("allreduce-fp16", "CPOSG gloo all-reduce, fp16 hook", "allreduce", compression="fp16"),
        System("ps", "CPOSG parameter server", "ps"),
    )
}


@dataclass(frozen=True)
class Workload:
    """The training problem every system runs (cluster-wide configuration keys of the agent)."""

    dataset: str
    width: int | None  # None: the dataset's default model size
    batch_size: int | None  # None: the dataset's default batch
    seed: int

    def flags(self) -> list[str]:
        flags = ["--dataset", self.dataset, "--seed", str(self.seed)]
        if self.width is not None:
            flags += ["--width", str(self.width)]
        if self.batch_size is not None:
            flags += ["--batch-size", str(self.batch_size)]
        return flags

    def config_keys(self) -> dict[str, Any]:
        keys: dict[str, Any] = {"dataset": self.dataset, "seed": self.seed}
        if self.width is not None:
            keys["width"] = self.width
        if self.batch_size is not None:
            keys["batch_size"] = self.batch_size
        return keys

    @property
    def tag(self) -> str:
        """Short name for folders: the dataset unless ring8, and the width."""
        prefix = "" if self.dataset == "ring8" else f"{self.dataset}-"
        return f"{prefix}w{self.width if self.width is not None else 'default'}"

    def describe(self) -> str:
        from agent.core.config import build_config

        config = build_config(self.config_keys())
        width = config.width if config.width is not None else "default"
        return f"{self.dataset}, {config.model} width {width}, batch {config.batch_size} per node"


def rate_label(rate: float | None) -> str:
    return "unshaped" if rate is None else f"{rate:g} Mbit/s"


def parse_rate(text: str) -> float | None:
    if text.lower() in ("none", "unshaped", "inf"):
        return None
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"a rate must be positive (Mbit/s) or 'none', got {text}")
    return value


# ---- following the processes' logs ----------------------------------------------------------------


@dataclass(frozen=True)
class IterationRecord:
    iteration: int
    time: float  # seconds since the epoch, from the line's ISO timestamp
    compute_s: float
    communication_s: float
    bytes_sent: int | None
    members: int | None = None  # agents: members of the node's view (n once the cluster has formed)


def parse_timestamp(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


ANOMALY_EVENTS = ("gossip_rejected", "round mixed without neighbours", "leaving peer out until it re-enters")


class LogFollower:
    """Reads a JSON-lines log as it grows and keeps its ``iteration`` records."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.partial = b""
        self.records: list[IterationRecord] = []
        self.anomalies: dict[str, int] = {}

    def poll(self) -> None:
        if not self.path.exists():
            return
        with self.path.open("rb") as handle:
            handle.seek(self.offset)
            chunk = handle.read()
        self.offset += len(chunk)
        lines = (self.partial + chunk).split(b"\n")
        self.partial = lines.pop()
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                continue  # tracebacks and other non-JSON output
            if isinstance(event, dict) and event.get("event") in ANOMALY_EVENTS:
                # "round mixed without neighbours" lines stand for `rounds` rounds (agent/node/gossip.py).
                count = int(event.get("rounds", 1))
                self.anomalies[event["event"]] = self.anomalies.get(event["event"], 0) + count
            if isinstance(event, dict) and event.get("event") == "iteration":
                self.records.append(
                    IterationRecord(
                        iteration=int(event["iteration"]),
                        time=parse_timestamp(event["timestamp"]),
                        compute_s=float(event["compute_s"]),
                        communication_s=float(event["communication_s"]),
                        bytes_sent=event.get("bytes_sent"),
                        members=event.get("members"),
                    )
                )

    def count_after(self, moment: float) -> int:
        return sum(1 for record in self.records if record.time > moment)

    def last_iteration_at(self, moment: float) -> int:
        """The highest iteration logged at or before ``moment`` (0 before the first)."""
        return max((r.iteration for r in self.records if r.time <= moment), default=0)


# ---- one launch: n processes of one system, every rate window -------------------------------------


@dataclass
class Window:
    rate: float | None
    repeat: int
    started: float
    ended: float
    load_average: float  # 1-minute load average at the window's end (includes this cluster's processes)
    other_cores: float  # CPU cores busy with processes outside this benchmark during the window
    seconds_per_iteration: float | None = None
    compute_s: float | None = None
    communication_s: float | None = None


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot, over all cores (from /proc/stat)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def process_cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU seconds of the given processes (those already gone count as 0)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            # Fields after the parenthesised command name; utime and stime are the 12th and 13th of them.
            after_name = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(after_name[11]) + int(after_name[12])
    return total / CLOCK_TICKS


@dataclass
class CpuMark:
    """A point in time with the machine's busy CPU seconds and those of this benchmark's processes."""

    moment: float
    busy: float
    ours: float

    @classmethod
    def now(cls, pids: Iterable[int]) -> CpuMark:
        return cls(time.time(), machine_busy_seconds(), process_cpu_seconds(pids))

    def other_cores_since(self, earlier: CpuMark) -> float:
        elapsed = max(self.moment - earlier.moment, 1e-9)
        return max(0.0, (self.busy - earlier.busy) - (self.ours - earlier.ours)) / elapsed


@dataclass
class LaunchResult:
    nodes: int
    system: str
    windows: list[Window] = field(default_factory=list)
    wire_bytes_per_iteration: list[float] = field(default_factory=list)  # per node
    payload_bytes_per_iteration: float | None = None  # mean over nodes, as the processes report it
    parameters: int | None = None
    error: str | None = None
    failed_attempts: list[str] = field(default_factory=list)  # launches that failed before this one
    # Agent log events that mean a round did not go as DPOSG prescribes (counted over all nodes):
    # a neighbour's vector refused or missing at the deadline, so the node mixed without it.
    anomalies: dict[str, int] = field(default_factory=dict)


class LaunchFailed(RuntimeError):
    """A process of the launch exited, or the cluster stopped making progress within a timeout."""


def switch_port_bytes(cluster: NetnsCluster) -> dict[str, int]:
    """Bytes each host has sent: the receive counter of its port on the bridge."""
    listing = subprocess.run(
        ["ip", "-n", cluster.switch_namespace, "-s", "-j", "link", "show"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    by_port = {entry["ifname"]: entry["stats64"]["rx"]["bytes"] for entry in json.loads(listing)}
    return {host.name: int(by_port[host.switch_port]) for host in cluster.hosts}


def shape(cluster: NetnsCluster, rate: float | None) -> None:
    for host in cluster.hosts:
        cluster.set_rate(host, rate)


def process_environment() -> dict[str, str]:
    return os.environ | {
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": str(REPO),
        # gloo must pick the namespace's eth0, not lo, for the peers to reach each other.
        "GLOO_SOCKET_IFNAME": "eth0",
    }


class Launch:
    """The processes of one system on one cluster, their logs, and the rate windows measured on them."""

    def __init__(
        self,
        cluster: NetnsCluster,
        system: System,
        workload: Workload,
        folder: Path,
        round_timeout: float,
        tls: bool = False,
    ) -> None:
        self.round_timeout = round_timeout
        self.tls = tls  # agents over mutual TLS (the product default) instead of --insecure plaintext
        self.cluster = cluster
        self.system = system
        self.workload = workload
        self.folder = folder
        self.processes: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.followers: list[LogFollower] = []  # one per node: the logs that carry iteration lines

    def _spawn(self, host_name: str, role: str, argv: list[str]) -> LogFollower:
        log_path = self.folder / f"{role}.log"
        with log_path.open("wb") as log:
            process = self.cluster.popen(
                host_name, argv, cwd=REPO, env=process_environment(), stdout=log, stderr=subprocess.STDOUT
            )
        self.processes.append((role, process))
        return LogFollower(log_path)

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        hosts = self.cluster.hosts
        n = len(hosts)
        config = [
            *self.workload.flags(),
            "--iterations", str(ENDLESS), "--eval-every", str(ENDLESS), "--eval-samples", "500",
        ]  # fmt: skip
        python = sys.executable
        if self.system.kind == "agent":
            addresses = [f"{host.address}:{AGENT_PORT}" for host in hosts]
            node_ids = [f"node{i:02d}" for i in range(n)]
            if self.tls:
                from agent.security.throwaway import throwaway_pki

                security = throwaway_pki(self.folder / "pki", node_ids)
            else:
                security = {node_id: ["--insecure"] for node_id in node_ids}
            for i, host in enumerate(hosts):
                argv = [
                    python, "-m", "agent.cli", "--listen", f"0.0.0.0:{AGENT_PORT}",
                    "--advertise", addresses[i],
                    "--peers", ",".join(a for j, a in enumerate(addresses) if j != i),
                    # Zero-padded ids sort like their indices, so node i of the table is host i.
                    "--node-id", f"node{i:02d}", "--out", str(self.folder / f"node{i:02d}"),
                    "--log-format", "json", "--log-every", "1", "--checkpoint-every", str(ENDLESS),
                    "--round-timeout", str(self.round_timeout), "--startup-timeout", "300",
                    *self.system.agent_flags(), *config, *security[node_ids[i]],
                ]  # fmt: skip
                self.followers.append(self._spawn(host.name, f"node{i:02d}", argv))
            return
        baseline = [python, str(REPO / "bench" / "baselines.py")]
        common = ["--world", str(n), "--timeout", "300", *config]
        if self.system.kind == "allreduce":
            master = f"{hosts[0].address}:{RENDEZVOUS_PORT}"
            hook = ["--fp16-hook"] if self.system.compression == "fp16" else []
            for i, host in enumerate(hosts):
                argv = [*baseline, "allreduce", "--rank", str(i), "--master", master, *common, *hook]
                self.followers.append(self._spawn(host.name, f"node{i:02d}", argv))
            return
        server = f"{hosts[0].address}:{PS_PORT}"
        self._spawn(hosts[0].name, "server", [*baseline, "ps-server", "--listen", server, *common])
        for i, host in enumerate(hosts):
            argv = [*baseline, "ps-worker", "--rank", str(i), "--server", server, *common]
            self.followers.append(self._spawn(host.name, f"node{i:02d}", argv))

    def _pids(self) -> list[int]:
        # `ip netns exec` execs the command, so each Popen pid is the Python process itself.
        return [os.getpid()] + [process.pid for _, process in self.processes]

    def _check_alive(self) -> None:
        for role, process in self.processes:
            if process.poll() is not None:
                lines = (self.folder / f"{role}.log").read_text(errors="replace").splitlines()
                last = next((line for line in reversed(lines) if line.strip()), "(empty log)")
                raise LaunchFailed(
                    f"{role} exited with {process.returncode}: {last[:200]}\n" + "\n".join(lines[-15:])
                )

    def _wait_until(self, done: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            for follower in self.followers:
                follower.poll()
            if done():
                return
            self._check_alive()
            if time.monotonic() > deadline:
                progress = [f.records[-1].iteration if f.records else 0 for f in self.followers]
                raise LaunchFailed(
                    f"timed out after {timeout:.0f} s waiting for {what}; iterations {progress}"
                )
            time.sleep(POLL_SECONDS)

    def measure(
        self, rates: Sequence[float | None], args: argparse.Namespace
    ) -> tuple[list[Window], dict[str, int], dict[str, int], float, float]:
        """Run every window; returns them with the byte counters and times at the start and the end."""
        self._wait_until(
            lambda: all(follower.records for follower in self.followers),
            args.startup_timeout,
            "the first iteration",
        )
        # Under heavy CPU load agents can start in partial views (a liveness probe that timed out drops a
        # member, rounds then wait a --round-timeout for it). Windows start once the cluster has formed.
        n = len(self.followers)

        def settled() -> bool:
            return all(
                len(follower.records) >= SETTLE_ITERATIONS
                and all(
                    record.members in (None, n) and record.communication_s < self.round_timeout / 2
                    for record in follower.records[-SETTLE_ITERATIONS:]
                )
                for follower in self.followers
            )

        self._wait_until(settled, args.startup_timeout, "every node training with all members")
        windows = []
        counters_start: dict[str, int] = {}
        measurement_started = 0.0
        for repeat in range(args.repeats):
            for rate in rates:
                shape(self.cluster, rate)
                started = time.time()
                if not windows:
                    counters_start, measurement_started = switch_port_bytes(self.cluster), started
                cpu_started = CpuMark.now(self._pids())
                # +1: the first line after the switch belongs to an iteration begun at the old rate.
                wanted = args.warmup + 1 + args.iterations
                enough = args.warmup + 1 + args.min_iterations

                def complete(started: float = started, wanted: int = wanted, enough: int = enough) -> bool:
                    # Slow links stop at --window-seconds, once --min-iterations are in.
                    fewest = min(follower.count_after(started) for follower in self.followers)
                    overtime = time.time() - started > args.window_seconds
                    return fewest >= wanted or (overtime and fewest >= enough)

                self._wait_until(complete, args.window_timeout, f"{wanted} iterations at {rate_label(rate)}")
                cpu_ended = CpuMark.now(self._pids())
                window = Window(
                    rate,
                    repeat,
                    started,
                    cpu_ended.moment,
                    load_average=os.getloadavg()[0],
                    other_cores=cpu_ended.other_cores_since(cpu_started),
                )
                windows.append(window)
                print(
                    f"    {rate_label(rate):>13} repeat {repeat + 1}: {window.ended - started:5.1f} s"
                    f" (load {window.load_average:.1f}, other processes {window.other_cores:.2f} cores)",
                    flush=True,
                )
        counters_end = switch_port_bytes(self.cluster)
        return windows, counters_start, counters_end, measurement_started, time.time()

    def stop(self) -> None:
        # The parameter server first: it tells its workers to stop, which ends their runs cleanly.
        for _, process in sorted(self.processes, key=lambda item: item[0] != "server"):
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for _, process in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            if process.poll() is None:
                process.kill()
                process.wait()


def summarize_window(window: Window, followers: Sequence[LogFollower], warmup: int) -> None:
    per_node_seconds, compute, communication = [], [], []
    for follower in followers:
        inside = [r for r in follower.records if window.started < r.time <= window.ended]
        # The first line after the switch belongs to an iteration begun at the old rate.
        kept = inside[1 + warmup :]
        if len(kept) < 2:
            continue
        per_node_seconds.append((kept[-1].time - kept[0].time) / (kept[-1].iteration - kept[0].iteration))
        compute += [r.compute_s for r in kept[1:]]
        communication += [r.communication_s for r in kept[1:]]
    if per_node_seconds:
        window.seconds_per_iteration = statistics.median(per_node_seconds)
        window.compute_s = statistics.fmean(compute)
        window.communication_s = statistics.fmean(communication)


def run_launch(
    n: int, system: System, workload: Workload, args: argparse.Namespace, folder: Path
) -> LaunchResult:
    result = LaunchResult(nodes=n, system=system.name)
    with NetnsCluster(n) as cluster:
        for host in cluster.hosts:
            for setting in args.sysctl:
                cluster.exec(host, ["sysctl", "-q", "-w", setting])
            if args.no_gso:
                cluster.segmentation_offload(host, False)
        launch = Launch(cluster, system, workload, folder, args.round_timeout, tls=args.tls)
        try:
            launch.start()
            windows, before, after, first, last = launch.measure(args.rates, args)
        except LaunchFailed as error:
            result.error = str(error)
            return result
        finally:
            launch.stop()
        for follower in launch.followers:
            follower.poll()
            for name, count in follower.anomalies.items():
                result.anomalies[name] = result.anomalies.get(name, 0) + count
        if result.anomalies:
            print(f"   WARNING: rounds that did not mix every neighbour: {result.anomalies}", flush=True)
        for window in windows:
            summarize_window(window, launch.followers, args.warmup)
        result.windows = windows
        for host, follower in zip(cluster.hosts, launch.followers, strict=True):
            iterations = follower.last_iteration_at(last) - follower.last_iteration_at(first)
            result.wire_bytes_per_iteration.append(
                (after[host.name] - before[host.name]) / max(iterations, 1)
            )
        payloads = [r.bytes_sent for f in launch.followers for r in f.records if r.bytes_sent is not None]
        result.payload_bytes_per_iteration = statistics.fmean(payloads) if payloads else None
        result.parameters = read_parameter_count(folder)
    return result


def read_parameter_count(folder: Path) -> int | None:
    """The model size, from an agent's summary.json or a baseline's start-up line."""
    for summary in sorted(folder.glob("node*/summary.json")):
        with contextlib.suppress(ValueError, KeyError):
            return int(json.loads(summary.read_text())["parameters"])
    for log in sorted(folder.glob("*.log")):
        for line in log.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict) and "parameters" in event:
                    return int(event["parameters"])
    return None


# ---- tables ----------------------------------------------------------------------------------------


def median_or_none(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def window_stats(result: LaunchResult, rate: float | None) -> dict[str, Any]:
    windows = [w for w in result.windows if w.rate == rate and w.seconds_per_iteration is not None]
    seconds = [w.seconds_per_iteration for w in windows]
    return {
        "seconds_per_iteration": median_or_none(seconds),
        "min": min(seconds) if seconds else None,  # type: ignore[type-var]
        "max": max(seconds) if seconds else None,  # type: ignore[type-var]
        "compute_s": median_or_none(w.compute_s for w in windows),
        "communication_s": median_or_none(w.communication_s for w in windows),
        "load_average": median_or_none(w.load_average for w in windows),
        "other_cores": median_or_none(w.other_cores for w in windows),
        "windows": len(windows),
    }


def link_use(result: LaunchResult, rate: float | None) -> float | None:
    """Bytes the busiest node put on the wire per second while training, as a fraction of its link rate:
    its bridge-port bytes per iteration (everything it sent: payload, headers, ACKs) / seconds per
    iteration at ``rate`` / (rate / 8). None unshaped or unmeasured."""
    seconds = window_stats(result, rate)["seconds_per_iteration"]
    if rate is None or seconds is None or not result.wire_bytes_per_iteration:
        return None
    return max(result.wire_bytes_per_iteration) / seconds / (rate * MEGABYTE / 8)


def format_link_use(value: float | None) -> str:
    return "—" if value is None else f"{value:.0%}"


def format_ms(value: float | None) -> str:
    return "—" if value is None else f"{1000 * value:.0f}"


def print_tables(results: list[LaunchResult], rates: Sequence[float | None]) -> list[str]:
    lines: list[str] = []
    for n in sorted({r.nodes for r in results}):
        for rate in rates:
            lines += [
                "",
                f"### {n} nodes, {rate_label(rate)}",
                "",
                "| system | s/iteration (median) | min–max | vs PS | vs all-reduce | compute ms | "
                "communication ms | MB sent/node/iter (mean, max node) | payload MB/node/iter | "
                "link use | load | other cores |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            ]
            by_system = {r.system: r for r in results if r.nodes == n}
            reference = {
                name: window_stats(by_system[name], rate)["seconds_per_iteration"]
                for name in ("ps", "allreduce")
                if name in by_system and not by_system[name].error
            }
            for name, result in by_system.items():
                label = SYSTEMS[name].label
                stalls = sum(result.anomalies.values())
                if stalls:
                    label += f" ⚠ {stalls} gossip anomalies (results.json)"
                if result.error:
                    lines.append(f"| {label} | failed: {result.error.splitlines()[0]} ||||||||||")
                    continue
                stats = window_stats(result, rate)
                seconds = stats["seconds_per_iteration"]

                def ratio(base: float | None, seconds: float | None = seconds) -> str:
                    return "—" if base is None or seconds is None else f"{seconds / base:.2f}×"

                wire = result.wire_bytes_per_iteration
                payload = result.payload_bytes_per_iteration
                lines.append(
                    f"| {label} | {seconds:.3f} | {stats['min']:.3f}–{stats['max']:.3f} | "
                    f"{ratio(reference.get('ps'))} | {ratio(reference.get('allreduce'))} | "
                    f"{format_ms(stats['compute_s'])} | {format_ms(stats['communication_s'])} | "
                    f"{statistics.fmean(wire) / MEGABYTE:.2f}, {max(wire) / MEGABYTE:.2f} | "
                    + ("—" if payload is None else f"{payload / MEGABYTE:.2f}")
                    + f" | {format_link_use(link_use(result, rate))}"
                    + f" | {stats['load_average']:.1f} | {stats['other_cores']:.2f} |"
                    if seconds is not None
                    else f"| {label} | no complete window ||||||||||"
                )
    print("\n".join(lines), flush=True)
    return lines


def goal_lines(results: list[LaunchResult]) -> list[str]:
    """The issue's goals at 20 Mbit/s with 8 nodes, as measured."""

    def seconds(system: str) -> float | None:
        for result in results:
            if result.nodes == 8 and result.system == system and not result.error:
                return window_stats(result, 20.0)["seconds_per_iteration"]
        return None

    lines = ["", "### Goals (8 nodes, 20 Mbit/s)", ""]
    optional = [
        (name, base, bound)
        for name in ("one-peer-exp-int8", "one-peer-exp-topk", "one-peer-exp-randk")
        for base, bound in (("allreduce", 0.3), ("allreduce-fp16", 0.6))
    ] + [
        ("one-peer-exp-huffman", "allreduce", 0.6),
        ("one-peer-exp-delta", "allreduce", 0.6),
        ("one-peer-exp-auto", "allreduce", 0.6),
    ]
    for name, base, bound in [
        ("ring", "ps", 0.25),
        ("one-peer-exp", "ps", 0.25),
        ("one-peer-exp", "allreduce", 0.6),
        *optional,
    ]:
        a, b = seconds(name), seconds(base)
        if a is None or b is None:
            if (name, base, bound) not in optional:
                lines.append(f"- {name} ≤ {bound}× {base}: not measured in this run")
            continue
        verdict = "met" if a / b <= bound else "missed"
        lines.append(f"- {SYSTEMS[name].label} ≤ {bound}× {SYSTEMS[base].label}: {a / b:.2f}× — {verdict}")
    print("\n".join(lines), flush=True)
    return lines


# ---- quality: iterations to the target, in one process -------------------------------------------


@dataclass(frozen=True)
class QualityJob:
    system: str
    seed: int
    nodes: int
    workload: Workload
    iterations: int
    eval_every: int


def quality_run(job: QualityJob) -> dict[str, Any]:
    """One system's update rule in one process, the average model evaluated every ``eval_every``.

    Agent systems run ``agent.core.engine.VirtualCluster`` itself (the simulator; real agents reproduce
    it bit for bit, wire rounding and compressed gossip included). CPOSG runs the same cluster with the
    gradients averaged; the fp16-hook twin averages them as ``baselines.fp16_average`` does."""
    import torch
    from baselines import fp16_average  # bench/ is on sys.path (the script's folder)

    from agent.core.algorithms import advance, extrapolate
    from agent.core.config import build_config
    from agent.core.engine import VirtualCluster
    from agent.train.data import load_dataset, partition
    from agent.train.evaluate import Evaluator
    from agent.train.simulate import compression_from, hyper_from, schedule_from
    from agent.train.workload import GanProblem, node_generator

    class Fp16HookCluster(VirtualCluster):
        """CPOSG whose averaged gradient is what DDP's fp16_compress_hook all-reduce returns."""

        def _initial_gradients(self, x0: torch.Tensor) -> list[torch.Tensor | None]:
            return [fp16_average([fn(x0) for fn in self.gradient_fns])] * self.n

        def step(self) -> None:
            states, hyper = self.states, self.hyper
            points = [extrapolate(self.algorithm, state, state.x, hyper) for state in states]
            gradients = [fn(z) for fn, z in zip(self.gradient_fns, points, strict=True)]
            average = fp16_average(gradients)
            self.states = [advance(self.algorithm, state, state.x, average, hyper) for state in states]
            self.iteration += 1

    torch.set_num_threads(1)
    system, n, workload = SYSTEMS[job.system], job.nodes, job.workload
    config = build_config(
        {**workload.config_keys(), "seed": job.seed, "nodes": n, "iterations": job.iterations,
         **system.config_keys()}
    )  # fmt: skip
    dataset = load_dataset(config.dataset, seed=config.seed)
    problem = GanProblem.build(config, dataset.spec, torch.device("cpu"))
    shards = partition(dataset, n, config.split, seed=config.seed)
    operators = [problem.node_operator(shards[i], node_generator(config.seed, i)) for i in range(n)]
    schedule = schedule_from(config, n)
    evaluator = Evaluator(dataset, config.eval_samples, config.seed)
    kind = Fp16HookCluster if system.kind != "agent" and system.compression == "fp16" else VirtualCluster
    cluster = kind(
        config.algorithm,
        problem.x0,
        operators,
        lambda round_index: [schedule.row(i, round_index) for i in range(n)],
        config.rounds,
        hyper_from(config),
        wire_dtype=config.wire_dtype,
        compression=compression_from(config),
    )
    history = []
    started = time.perf_counter()
    for k in range(job.iterations):
        cluster.step()
        if (k + 1) % job.eval_every == 0:
            record = {"iteration": k + 1, **evaluator.evaluate(problem, cluster.average())}
            record["consensus_distance"] = cluster.consensus_distance()
            history.append(record)
    return {
        "system": job.system,
        "label": quality_label(job.system),
        "seed": job.seed,
        "nodes": n,
        "width": workload.width,
        "history": history,
        "seconds": round(time.perf_counter() - started, 1),
    }


def quality_label(name: str) -> str:
    system = SYSTEMS[name]
    if system.kind == "agent":
        return system.label
    return (
        "CPOSG, fp16-hook gradients (all-reduce fp16)"
        if system.compression == "fp16"
        else ("CPOSG (all-reduce and PS)")
    )


def timed_systems(name: str) -> list[str]:
    """The systems whose wall time a quality run of ``name`` gives: every timing system of its rule."""
    return [other for other, system in SYSTEMS.items() if system.update_rule == SYSTEMS[name].update_rule]


def quality_runs(args: argparse.Namespace, workload: Workload, n: int) -> list[dict[str, Any]]:
    """Every quality system for every seed, ``--quality-jobs`` processes at a time."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    # Systems with the same update rule (all-reduce and PS; paced and unpaced) share one run.
    by_rule: dict[tuple[str, ...], str] = {}
    for name in args.quality_systems:
        by_rule.setdefault(SYSTEMS[name].update_rule, name)
    systems = list(by_rule.values())
    jobs = [
        QualityJob(name, seed, n, workload, args.quality_iterations, args.quality_eval_every)
        for name in systems
        for seed in args.quality_seeds
    ]
    records = []
    # spawn, not fork: a forked child would inherit whatever threads torch had started in this process.
    with ProcessPoolExecutor(max_workers=args.quality_jobs, mp_context=get_context("spawn")) as pool:
        for record in pool.map(quality_run, jobs):
            last = record["history"][-1] if record["history"] else {}
            print(
                f"    {record['label']}, seed {record['seed']}: {describe_quality(last, args)} at "
                f"{last.get('iteration')}; target first met at {first_reaching(record['history'], args)} "
                f"({record['seconds']:.0f} s)",
                flush=True,
            )
            records.append(record)
    return records


def first_reaching(
    history: list[dict[str, Any]], args: argparse.Namespace, looser: bool = False
) -> int | None:
    """The first evaluated iteration that meets the quality target (or the looser one); None if never.

    ring8: every mode covered and ≥ ``--target-high-quality`` high-quality samples (looser: 10 points
    fewer). digits: classifier FID ≤ ``--target-fid`` (looser: twice that)."""
    if args.quality_dataset == "digits":
        bound = args.target_fid * (2.0 if looser else 1.0)
        return next((h["iteration"] for h in history if h.get("classifier_fid", math.inf) <= bound), None)
    threshold = args.target_high_quality - (0.1 if looser else 0.0)
    return next(
        (
            h["iteration"]
            for h in history
            if h.get("modes_covered", 0) >= args.target_modes and h.get("high_quality", 0.0) >= threshold
        ),
        None,
    )


def describe_quality(record: dict[str, Any], args: argparse.Namespace) -> str:
    if args.quality_dataset == "digits":
        return f"FID {record.get('classifier_fid', math.nan):.2f}, {record.get('classes_covered')} classes"
    return f"{record.get('modes_covered')} modes, HQ {record.get('high_quality', 0.0):.3f}"


def target_description(args: argparse.Namespace) -> tuple[str, str]:
    """The target and the looser one, in words."""
    if args.quality_dataset == "digits":
        return f"classifier FID ≤ {args.target_fid:g}", f"FID ≤ {2 * args.target_fid:g}"
    return (
        f"{args.target_modes} modes with ≥ {args.target_high_quality:.0%} high-quality samples",
        f"≥ {args.target_high_quality - 0.1:.0%}",
    )


def per_seed(values: Sequence[int | None]) -> str:
    return ", ".join("—" if v is None else str(v) for v in values)


def final_score(record: dict[str, Any], args: argparse.Namespace) -> float | None:
    """The headline number of the last evaluation: digits FID, ring8 high-quality fraction."""
    last = record["history"][-1] if record["history"] else {}
    key = "classifier_fid" if args.quality_dataset == "digits" else "high_quality"
    value = last.get(key)
    return None if value is None else float(value)


def timing_of(results: list[LaunchResult], name: str, n: int) -> LaunchResult | None:
    return next((r for r in results if r.system == name and r.nodes == n and not r.error), None)


def target_times(
    records: list[dict[str, Any]], results: list[LaunchResult], args: argparse.Namespace
) -> dict[tuple[str, int], dict[str, Any]]:
    """Per timed system and n: the quality run's iterations to the target (median over the seeds that
    reached it), its final scores, and per rate the seconds per iteration and the wall time to target."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault((record["system"], record["nodes"]), []).append(record)
    table: dict[tuple[str, int], dict[str, Any]] = {}
    for (name, n), group in groups.items():
        reached = [first_reaching(r["history"], args) for r in group]
        hits = [k for k in reached if k is not None]
        # Seeds that never reach the target have no wall time: the median is over those that did.
        iterations = statistics.median(hits) if hits else None
        # A quality run stands for every system of its update rule; each pays its own s/iteration.
        names = [t for t in timed_systems(name) if timing_of(results, t, n)] or [name]
        for system_name in names:
            timing = timing_of(results, system_name, n)
            per_rate = {}
            for rate in args.rates:
                seconds = None if timing is None else window_stats(timing, rate)["seconds_per_iteration"]
                per_rate[rate] = {
                    "seconds_per_iteration": seconds,
                    "to_target_s": None if iterations is None or seconds is None else iterations * seconds,
                    "link_use": None if timing is None else link_use(timing, rate),
                }
            table[(system_name, n)] = {
                "quality_system": name,
                "group": group,
                "reached": reached,
                "reached_looser": [first_reaching(r["history"], args, looser=True) for r in group],
                "iterations": iterations,
                "finals": [final_score(r, args) for r in group],
                "rates": per_rate,
            }
    return table


def quality_table(
    records: list[dict[str, Any]], results: list[LaunchResult], args: argparse.Namespace
) -> list[str]:
    """Per system: iterations to the target (and to a looser one) per seed, quality at the last iteration,
    and the wall time to the target at each measured rate (median iterations × median s/iteration), with
    the link use of that system's timing run; then the issue's time-to-target goals."""
    rate_columns = " | ".join(
        f"to target at {rate_label(rate)} (s) | link use at {rate_label(rate)}" for rate in args.rates
    )
    target, looser = target_description(args)
    final = "FID, classes" if args.quality_dataset == "digits" else "modes, HQ"
    mean_name = "mean FID" if args.quality_dataset == "digits" else "mean HQ"
    lines = [
        "",
        f"### Quality: {args.quality_dataset}, {target} (network-average model, evaluated every "
        f"{args.quality_eval_every} iterations, {args.quality_iterations} iterations, seeds "
        f"{', '.join(map(str, args.quality_seeds))})",
        "",
        f"| system | nodes | iterations to target, per seed | to {looser}, per seed | "
        f"{final} at {args.quality_iterations}, per seed | {mean_name} | {rate_columns} |",
        "|---|---:|---:|---:|---|---:|" + "---:|---:|" * len(args.rates),
    ]
    table = target_times(records, results, args)
    for (system_name, n), row in table.items():
        finals = "; ".join(
            describe_quality(r["history"][-1] if r["history"] else {}, args) for r in row["group"]
        )
        scores = [v for v in row["finals"] if v is not None]
        mean = (
            "—"
            if not scores
            else (
                f"{statistics.fmean(scores):.2f}"
                if args.quality_dataset == "digits"
                else f"{statistics.fmean(scores):.1%}"
            )
        )
        cells = []
        for rate in args.rates:
            cell = row["rates"][rate]
            cells.append("—" if cell["to_target_s"] is None else f"{cell['to_target_s']:.0f}")
            cells.append(format_link_use(cell["link_use"]))
        lines.append(
            f"| {SYSTEMS[system_name].label} | {n} | {per_seed(row['reached'])} | "
            f"{per_seed(row['reached_looser'])} | {finals} | {mean} | " + " | ".join(cells) + " |"
        )
    lines += quality_goal_lines(table, args)
    print("\n".join(lines), flush=True)
    return lines


def quality_goal_lines(table: dict[tuple[str, int], dict[str, Any]], args: argparse.Namespace) -> list[str]:
    """The issue's time-to-target goals (8 nodes, 20 Mbit/s): same-run ratios of wall time to target."""
    rate = 20.0
    if rate not in args.rates:
        return []

    def wall(name: str) -> float | None:
        row = table.get((name, 8))
        return None if row is None else row["rates"][rate]["to_target_s"]

    lines = ["", f"### Time-to-target goals (8 nodes, 20 Mbit/s, {args.quality_dataset})", ""]
    for name, base, bound in (
        ("one-peer-exp", "allreduce", 0.6),
        ("one-peer-exp-huffman", "allreduce", 0.6),
        ("one-peer-exp-delta", "allreduce", 0.6),
        ("one-peer-exp-auto", "allreduce", 0.6),
        ("one-peer-exp-int8", "allreduce", 0.3),
        ("one-peer-exp-int8", "allreduce-fp16", 0.6),
        ("one-peer-exp-topk", "allreduce", 0.3),
        ("one-peer-exp-topk", "allreduce-fp16", 0.6),
        ("one-peer-exp-randk", "allreduce", 0.3),
        ("one-peer-exp-randk", "allreduce-fp16", 0.6),
    ):
        if (name, 8) not in table or (base, 8) not in table:
            continue
        a, b = wall(name), wall(base)
        if a is None or b is None:
            lines.append(
                f"- {SYSTEMS[name].label} ≤ {bound}× {SYSTEMS[base].label}: no wall time (target "
                "not reached, or not timed)"
            )
            continue
        verdict = "met" if a / b <= bound else "missed"
        lines.append(
            f"- {SYSTEMS[name].label} ≤ {bound}× {SYSTEMS[base].label}: {a:.0f} s / {b:.0f} s = "
            f"{a / b:.2f}× — {verdict}"
        )
    return lines


# ---- command line ----------------------------------------------------------------------------------


def machine_description() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} logical CPUs"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs"


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", type=int, nargs="+", default=[4, 8], help="cluster sizes")
    parser.add_argument(
        "--rates", type=parse_rate, nargs="+", default=[None, 100.0, 20.0],
        help="per-node link rates in Mbit/s; 'none' = unshaped",
    )  # fmt: skip
    parser.add_argument("--systems", nargs="+", choices=list(SYSTEMS), default=list(SYSTEMS))
    parser.add_argument("--iterations", type=int, default=8, help="measured iterations per window")
    parser.add_argument(
        "--window-seconds", type=float, default=20.0,
        help="a window longer than this ends as soon as every node has --min-iterations measured ones",
    )  # fmt: skip
    parser.add_argument("--min-iterations", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2, help="iterations discarded after each rate switch")
    parser.add_argument("--repeats", type=int, default=3, help="windows per rate (medians are over these)")
    parser.add_argument(
        "--dataset", choices=("ring8", "digits"), default="ring8",
        help="workload of the timing matrix (digits: the DCGAN on scikit-learn's digits)",
    )  # fmt: skip
    parser.add_argument(
        "--width", type=int, help="model width (default: 256 for ring8's MLP, the dataset default otherwise)"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        help="per-node minibatch (default: 128 for ring8, the dataset default otherwise)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tls",
        action="store_true",
        help="agents talk mutual TLS (a throwaway CA), as deployments do; default plaintext (--insecure), "
        "as the tables in docs/benchmarks.md were measured",
    )
    parser.add_argument(
        "--sysctl",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a network-namespace sysctl set on every node before it starts, e.g. "
        "net.ipv4.tcp_slow_start_after_idle=0 (repeatable)",
    )
    parser.add_argument(
        "--no-gso",
        action="store_true",
        help="shaped links carry wire-size packets (gso_max_segs 1 on both veth ends), as a router's "
        "queue does, instead of the kernel's 64 KB offload segments (docs/benchmarks.md: BBR and one-peer)",
    )
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    parser.add_argument(
        "--round-timeout", type=float, default=10.0,
        help="the agents' --round-timeout (10 s: the agent's default)",
    )  # fmt: skip
    parser.add_argument(
        "--no-timing",
        action="store_true",
        help="skip the timing matrix (with --quality: only the quality part)",
    )
    parser.add_argument("--window-timeout", type=float, default=600.0)
    parser.add_argument(
        "--retries", type=int, default=1, help="relaunches of a system whose launch failed (reported)"
    )
    parser.add_argument(
        "--out", type=Path, help="folder for logs and results.json (default runs/cluster_bench/…)"
    )
    parser.add_argument("--quality", action="store_true", help="also run the quality table (slow)")
    parser.add_argument(
        "--no-quality-timing", action="store_true",
        help="with --quality: skip timing the quality model (wall times then come from a timing run of that "
        "model, e.g. --dataset digits, merged with --replay)",
    )  # fmt: skip
    parser.add_argument("--quality-nodes", type=int, nargs="+", default=[8])
    parser.add_argument(
        "--quality-systems", nargs="+", choices=list(SYSTEMS),
        default=[
            "ring", "one-peer-exp", "one-peer-exp-int8", "one-peer-exp-topk", "one-peer-exp-bf16",
            "allreduce", "allreduce-fp16",
        ],
        help="allreduce and ps run the same update (CPOSG): either stands for both",
    )  # fmt: skip
    parser.add_argument(
        "--quality-dataset", choices=("ring8", "digits"), default="ring8",
        help="ring8: modes and high-quality target; digits: classifier-FID target",
    )  # fmt: skip
    parser.add_argument(
        "--quality-width", type=int,
        help="model width of the quality runs (default: 128 for ring8, the agent's tuned default; the "
        "dataset default otherwise)",
    )  # fmt: skip
    parser.add_argument("--quality-iterations", type=int, default=8000)
    parser.add_argument("--quality-eval-every", type=int, default=250)
    parser.add_argument("--quality-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--quality-jobs", type=int, default=2, help="quality runs in parallel processes")
    parser.add_argument("--target-modes", type=int, default=8)
    parser.add_argument("--target-high-quality", type=float, default=0.9)
    parser.add_argument(
        "--target-fid", type=float, default=5.0,
        help="digits target: classifier FID of the average model (held-out real digits score ~0.6)",
    )  # fmt: skip
    parser.add_argument("--plot", type=Path, help="write the time-per-iteration PNG here")
    parser.add_argument(
        "--all", action="store_true",
        help="everything for docs/benchmarks.md: the default matrix, --quality, and the plot in docs/",
    )  # fmt: skip
    parser.add_argument("--overhead", action="store_true", help="also run bench/agent_overhead.py")
    parser.add_argument(
        "--replay", type=Path, nargs="+", metavar="RESULTS",
        help="measure nothing: print the tables again from results.json files; quality records and settings "
        "come from the first, launches of a later file replace those of an earlier one (same system and "
        "n), e.g. a relaunch of one system's timing; --rates picks the rate columns",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.dataset == "ring8":
        args.width = 256 if args.width is None else args.width
        args.batch_size = 128 if args.batch_size is None else args.batch_size
    if args.quality_dataset == "ring8" and args.quality_width is None:
        args.quality_width = 128
    if args.all:
        args.quality = True
        args.overhead = True
        args.plot = args.plot or REPO / "docs" / "benchmarks-time-per-iteration.png"
    return args


def run_matrix(
    nodes: Sequence[int],
    systems: Sequence[str],
    workload: Workload,
    args: argparse.Namespace,
    out: Path,
    on_result: Any,
) -> list[LaunchResult]:
    """One launch per (n, system), relaunched up to ``--retries`` times if it fails."""
    results: list[LaunchResult] = []
    for n in nodes:
        for name in systems:
            system = SYSTEMS[name]
            print(f"== {n} nodes, {system.label}, {workload.describe()}", flush=True)
            launch_started = time.time()
            failures: list[str] = []
            for attempt in range(1 + args.retries):
                folder = out / f"{workload.tag}-n{n}-{name}-{attempt}"
                result = run_launch(n, system, workload, args, folder)
                if not result.error:
                    break
                print(f"   FAILED (attempt {attempt + 1}): {result.error}", flush=True)
                failures.append(result.error)
            result.failed_attempts = failures
            print(f"   {time.time() - launch_started:.0f} s", flush=True)
            results.append(result)
            on_result()
    return results


def model_line(results: list[LaunchResult], workload: Workload) -> str:
    parameters = next((r.parameters for r in results if r.parameters), None)
    size = f"{parameters} parameters = {4 * parameters / MEGABYTE:.2f} MB as float32" if parameters else "?"
    return f"# model: {workload.describe()}: {size}"


def launch_from_dict(data: dict[str, Any]) -> LaunchResult:
    result = LaunchResult(**{k: v for k, v in data.items() if k != "windows"})
    result.windows = [Window(**window) for window in data["windows"]]
    return result


QUALITY_SETTINGS = (
    "quality_dataset", "quality_iterations", "quality_eval_every", "quality_seeds", "target_fid",
    "target_modes", "target_high_quality",
)  # fmt: skip


# Plot colours and (short) legend labels of the systems bench/plot.py does not know.
EXTRA_STYLES = {
    "one-peer-exp-bf16": ((120, 120, 120), "one-peer exp., bf16 wire"),
    "one-peer-exp-huffman": ((200, 80, 80), "one-peer exp., float32-huffman wire"),
    "one-peer-exp-delta": ((150, 60, 200), "one-peer exp., float32-delta wire"),
    "one-peer-exp-auto": ((230, 120, 60), "one-peer exp., float32-auto wire (default)"),
    "one-peer-exp-int8": ((120, 40, 160), "one-peer exp., CHOCO int8"),
    "one-peer-exp-topk": ((0, 90, 60), "one-peer exp., CHOCO top-k 1 %"),
    "one-peer-exp-randk": ((150, 110, 0), "one-peer exp., CHOCO rand-k 1 %"),
    "allreduce-fp16": ((240, 200, 40), "CPOSG all-reduce, fp16 hook"),
}


def draw_plot(results: Path, png: Path) -> None:
    """bench/plot.py's seconds-per-iteration PNG, with colours and labels for every system here."""
    import plot  # bench/ is on sys.path when run as a script

    for name, (colour, label) in EXTRA_STYLES.items():
        plot.COLOURS.setdefault(name, colour)
        plot.LABELS.setdefault(name, label)
    # Room for up to six legend rows (twelve systems on one panel).
    plot.LEGEND_HEIGHT = max(plot.LEGEND_HEIGHT, 200)
    plot.plot_time_per_iteration(results, png)
    print(f"plot: {png}")


def replay(args: argparse.Namespace) -> int:
    """The tables of earlier runs, merged (``--replay``)."""
    documents = [json.loads(path.read_text()) for path in args.replay]
    for key in QUALITY_SETTINGS:
        setattr(args, key, documents[0]["arguments"].get(key, getattr(args, key)))
    merged: dict[str, dict[tuple[str, int], LaunchResult]] = {"results": {}, "quality_timing": {}}
    quality_model = (args.quality_dataset, documents[0]["arguments"].get("quality_width"))
    for document in documents:
        arguments = document["arguments"]
        # A timing matrix of the quality model (same dataset and width) times the quality runs too.
        timing_model = (arguments.get("dataset"), arguments.get("width"))
        parts = [("results", "results"), ("quality_timing", "quality_timing")]
        if timing_model == quality_model:
            parts.append(("results", "quality_timing"))
        for source, part in parts:
            table = merged[part]
            for data in document.get(source, []):
                result = launch_from_dict(data)
                if not result.error or (result.system, result.nodes) not in table:
                    table[(result.system, result.nodes)] = result
    print(f"# replay of {', '.join(map(str, args.replay))}")
    results, timing = list(merged["results"].values()), list(merged["quality_timing"].values())
    if results:
        print_tables(results, args.rates)
        goal_lines(results)
    if timing:
        print("\n## Quality model timing")
        print_tables(timing, args.rates)
    records = documents[0].get("quality")
    if records:
        quality_table(records, timing, args)
    if args.plot:
        draw_plot(args.replay[0], args.plot)
    return 0


def interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    # Unwind on SIGTERM too (and on SIGINT even when started in the background, where it is ignored), so
    # every NetnsCluster's `with` kills its processes and deletes its namespaces.
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)
    args = parse_arguments(argv)
    if args.replay:
        return replay(args)
    reason = netns_unavailable_reason()
    if reason is not None:
        print(f"cluster_bench: {reason} (run with sudo)", file=sys.stderr)
        return 2
    remove_stale_namespaces()
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    out = args.out or REPO / "runs" / "cluster_bench" / stamp
    out.mkdir(parents=True, exist_ok=True)
    workload = Workload(args.dataset, args.width, args.batch_size, args.seed)
    header = [
        f"# machine: {machine_description()}",
        f"# date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; load average at start "
        + ", ".join(f"{v:.2f}" for v in os.getloadavg()),
        f"# command: {' '.join([sys.executable, *sys.argv])}",
        f"# workload: {workload.describe()}, seed {args.seed}"
        + (" (timing matrix skipped)" if args.no_timing else ""),
    ]
    print("\n".join(header), flush=True)
    started = time.time()
    document: dict[str, Any] = {"header": header, "arguments": vars(args) | {"out": str(out)}}
    results: list[LaunchResult] = []
    quality_timing: list[LaunchResult] = []

    def save() -> None:
        document["results"] = [asdict(r) for r in results]
        document["quality_timing"] = [asdict(r) for r in quality_timing]
        (out / "results.json").write_text(json.dumps(document, indent=1, default=str) + "\n")

    document["tables"] = []
    if not args.no_timing:
        results += run_matrix(args.nodes, args.systems, workload, args, out, save)
        header.append(model_line(results, workload))
        print(header[-1])
        document["tables"] += print_tables(results, args.rates) + goal_lines(results)
        save()
    if args.quality:
        quality_batch = args.batch_size if args.quality_dataset == args.dataset else None
        quality_workload = Workload(args.quality_dataset, args.quality_width, quality_batch, args.seed)
        # Seconds per iteration of the quality model, to turn iterations to the target into wall time.
        timed = list(
            dict.fromkeys(args.quality_systems + (["ps"] if "allreduce" in args.quality_systems else []))
        )
        if not args.no_quality_timing:
            quality_timing += run_matrix(args.quality_nodes, timed, quality_workload, args, out, save)
        document["tables"] += [
            "",
            f"## Quality model timing ({model_line(quality_timing, quality_workload)[2:]})",
        ]
        document["tables"] += print_tables(quality_timing, args.rates)
        records = []
        for n in args.quality_nodes:
            print(f"== quality, {n} nodes, {quality_workload.describe()}", flush=True)
            records += quality_runs(args, quality_workload, n)
        document["quality"] = records
        document["tables"] += quality_table(records, quality_timing, args)
    if args.overhead:
        print("== agent overhead (bench/agent_overhead.py)", flush=True)
        command = [sys.executable, str(REPO / "bench" / "agent_overhead.py"), "--width", str(args.width),
                   "--batch-size", str(args.batch_size)]  # fmt: skip
        overhead = subprocess.run(command, capture_output=True, text=True, check=False)
        print(overhead.stdout + overhead.stderr[-2000:], flush=True)
        document["tables"] += ["", "### Agent overhead, one node", "", f"`{' '.join(command)}`", ""]
        document["tables"] += overhead.stdout.splitlines()
    document["seconds"] = time.time() - started
    save()
    (out / "tables.md").write_text("\n".join(header + document["tables"]) + "\n")
    if args.plot:
        draw_plot(out / "results.json", args.plot)
    print(f"results: {out / 'results.json'}; total {time.time() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt as stopped:
        # The clusters were torn down while unwinding; results.json holds the launches finished so far.
        print(f"cluster_bench: interrupted ({stopped})", file=sys.stderr)
        sys.exit(130)
