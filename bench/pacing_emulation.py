"""One-peer exponential exchanges on shaped links with plain TCP: eager pushes vs pushes paced by the partner.

    sudo python bench/pacing_emulation.py [--nodes 8] [--rate 20] [--megabytes 1.06] [--iterations 25]

Why the agent on the one-peer exponential graph uses its link worse than on a ring (docs/benchmarks.md):
no torch, no gRPC, only the exchange pattern. Node i swaps a message with partner i XOR 2^(k mod log2 n) at
iteration k, then sleeps 10–60 ms (the local step with the jitter of a shared CPU). ``eager``: a node
sends as soon as it starts iteration k, like the agent's push, so a node that is ahead pours into a
partner still receiving from its previous partner. ``paced``: a node first tells its partner it has
started k and sends only once the partner has said the same, so no node ever receives two messages at
once. Prints seconds per iteration (median over nodes, after 5 warm-up iterations) and the spread of the
per-iteration intervals.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.netns import NetnsCluster

WARMUP = 5
PORT = 7100

# Runs inside each namespace: argv = index, nodes, message bytes, iterations, mode, comma-separated addresses.
NODE_PROGRAM = r"""
import random, socket, struct, sys, threading, time, json
me, n, size, iterations = (int(value) for value in sys.argv[1:5])
mode = sys.argv[5]
addresses = sys.argv[6].split(",")
period = (n - 1).bit_length()
partners = sorted({me ^ (1 << bit) for bit in range(period)})
server = socket.create_server(("0.0.0.0", PORT), backlog=16)
connections = {}
def accept_lower():
    for _ in [p for p in partners if p < me]:
        connection, _ = server.accept()
        connections[struct.unpack("<I", connection.recv(4))[0]] = connection
acceptor = threading.Thread(target=accept_lower)
acceptor.start()
time.sleep(1.5)  # every node listens before anyone dials
for partner in [p for p in partners if p > me]:
    connection = socket.create_connection((addresses[partner], PORT))
    connection.sendall(struct.pack("<I", me))
    connections[partner] = connection
acceptor.join()
arrived = set()  # (partner, kind, iteration); kind 0 = the message, 1 = "started this iteration"
condition = threading.Condition()
def read(partner, connection):
    buffer = memoryview(bytearray(size))
    while True:
        header = b""
        while len(header) < 9:
            chunk = connection.recv(9 - len(header))
            if not chunk:
                return
            header += chunk
        kind, iteration, length = struct.unpack("<bii", header)
        received = 0
        while received < length:
            received += connection.recv_into(buffer[received:length])
        with condition:
            arrived.add((partner, kind, iteration))
            condition.notify_all()
for partner, connection in connections.items():
    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    threading.Thread(target=read, args=(partner, connection), daemon=True).start()
send_locks = {partner: threading.Lock() for partner in connections}
def send(partner, kind, iteration, data):
    with send_locks[partner]:
        connections[partner].sendall(struct.pack("<bii", kind, iteration, len(data)) + data)
def wait_for(key):
    with condition:
        condition.wait_for(lambda: key in arrived)
payload, jitter, stamps = b"x" * size, random.Random(me), []
for k in range(iterations):
    partner = me ^ (1 << (k % period))
    if mode == "paced":
        threading.Thread(target=send, args=(partner, 1, k, b"")).start()
        wait_for((partner, 1, k))
    sender = threading.Thread(target=send, args=(partner, 0, k, payload))
    sender.start()
    wait_for((partner, 0, k))
    sender.join()
    time.sleep(jitter.uniform(0.01, 0.06))
    stamps.append(time.time())
print(json.dumps(stamps))
""".replace("PORT", str(PORT))


def run(mode: str, args: argparse.Namespace) -> None:
    with NetnsCluster(args.nodes) as cluster:
        for host in cluster.hosts:
            cluster.set_rate(host, args.rate)
        addresses = ",".join(host.address for host in cluster.hosts)
        size = int(args.megabytes * 1e6)
        processes = [
            cluster.popen(
                host,
                [
                    sys.executable,
                    "-c",
                    NODE_PROGRAM,
                    str(i),
                    str(args.nodes),
                    str(size),
                    str(args.iterations),
                    mode,
                    addresses,
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            for i, host in enumerate(cluster.hosts)
        ]
        stamps = [json.loads(process.communicate()[0]) for process in processes]
    per_node = [(s[-1] - s[WARMUP - 1]) / (len(s) - WARMUP) for s in stamps]
    intervals = sorted(b - a for s in stamps for a, b in zip(s[WARMUP - 1 :], s[WARMUP:], strict=False))

    def quantile(fraction: float) -> float:
        return intervals[int(fraction * (len(intervals) - 1))]

    print(
        f"| {mode} | {statistics.median(per_node):.3f} | {quantile(0.1):.2f} | {quantile(0.5):.2f} | "
        f"{quantile(0.9):.2f} |",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=8, help="a power of two")
    parser.add_argument("--rate", type=float, default=20.0, help="Mbit/s per node, each direction")
    parser.add_argument("--megabytes", type=float, default=1.06, help="message size (1.06: width-256 ring8)")
    parser.add_argument("--iterations", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    print(f"# {args.nodes} nodes, {args.rate:g} Mbit/s, {args.megabytes} MB per message")
    print("| pushes | s/iteration | p10 interval | p50 | p90 |")
    print("|---|---:|---:|---:|---:|")
    for _ in range(args.repeats):
        for mode in ("eager", "paced"):
            run(mode, args)


if __name__ == "__main__":
    main()
