"""Time from start to full membership, and survivors' pause after a kill, on a namespace cluster.

    sudo python bench/membership_timing.py --agents 4 8 [--repeats 3]

Needs root (network namespaces on a Linux bridge, as in tests/netns.py). Agents discover each other
by mDNS alone (--min-peers n-1, --settle 1). "Full membership" is the first log line at which a node's
view holds all n agents, measured from the moment all n processes were spawned; "pause after kill"
is the longest gap between a survivor's consecutive iterations around a SIGKILL of one agent.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.netns import NetnsCluster

PORT = 5000


def stamp(event: dict) -> float:
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def events(path: Path, name: str) -> list[dict]:
    found = []
    for line in path.read_text().splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if event.get("event") == name:
            found.append(event)
    return found


def run_once(n: int, folder: Path) -> tuple[float, float]:
    with NetnsCluster(n) as cluster:
        processes = []
        spawned = time.time()
        for host in cluster.hosts:
            out = folder / host.name
            out.mkdir(parents=True)
            argv = [
                sys.executable, "-m", "agent.cli", "--listen", f"0.0.0.0:{PORT}",
                "--advertise", f"{host.address}:{PORT}", "--node-id", host.name, "--out", str(out),
                "--log-format", "json", "--dataset", "ring8", "--iterations", "100000", "--log-every", "1",
                "--eval-every", "100000", "--min-peers", str(n - 1), "--settle", "1", "--round-timeout", "3",
                "--insecure",  # timing of membership, not of TLS handshakes
            ]  # fmt: skip
            processes.append(
                cluster.popen(host.name, argv, stdout=(out / "log").open("w"), stderr=subprocess.STDOUT)
            )
        logs = [folder / h.name / "log" for h in cluster.hosts]
        deadline = time.time() + 120
        while time.time() < deadline:
            views = [[e for e in events(log, "membership view") if len(e["members"]) == n] for log in logs]
            if all(views) and all(len(events(log, "iteration")) > 50 for log in logs):
                break
            time.sleep(0.5)
        full = max(stamp(v[0]) for v in views) - spawned
        killed = time.time()
        processes[0].send_signal(signal.SIGKILL)
        time.sleep(5)
        pauses = []
        for log in logs[1:]:
            times = [stamp(e) for e in events(log, "iteration")]
            before = max(t for t in times if t <= killed)
            window = [before, *[t for t in times if t > killed]]
            pauses.append(max(b - a for a, b in itertools.pairwise(window)))
        for process in processes:
            process.send_signal(signal.SIGTERM)
        return full, max(pauses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"# {platform.machine()}, {time.strftime('%Y-%m-%d', time.gmtime())}, repeats {args.repeats}")
    print("| agents | start → full membership, median s (runs) | survivors' longest pause after a kill, s |")
    print("|---:|---|---|")
    for n in args.agents:
        fulls, pauses = [], []
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as folder:
                full, pause = run_once(n, Path(folder))
            fulls.append(full)
            pauses.append(pause)
        print(f"| {n} | {statistics.median(fulls):.2f} ({', '.join(f'{f:.2f}' for f in fulls)}) | "
              f"{statistics.median(pauses):.3f} ({', '.join(f'{p:.3f}' for p in pauses)}) |")  # fmt: skip


if __name__ == "__main__":
    main()
