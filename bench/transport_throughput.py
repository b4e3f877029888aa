"""Loopback throughput of one gossip push: dpgan gRPC push vs raw TCP vs torch.distributed gloo.

Every transport moves the same float32 bytes from a sender process to a separate receiver process
and is timed on the sender from the start of the send until the receiver's acknowledgement arrives
(for gRPC: the PushAck, sent after the vector was validated and delivered to the inbox). gRPC pushes
go as the agent sends them, over the client's long-lived PushStream, and over the data plane
(`--data-port`, agent/transport/data_plane.py: plaintext only); `--unary` also measures one
PushVector call per vector (the transport before PushStream) and adds a PushStream / PushVector table.
Each round runs every transport once (median over --repeats timed runs after one warm-up); rounds are
interleaved so that all transports see the same machine load. Reported per transport and size: the
median over rounds of those medians, the median over rounds of the ratio to gloo *in the same round*,
and the CPU time per exchange of the sending and the receiving process (all threads; steadier than
wall time on a shared machine). Every process tunes malloc as the agent does at startup (agent.allocator).

    python bench/transport_throughput.py                 # 1, 16, 64 MiB, 7 repeats, 3 rounds
    python bench/transport_throughput.py --sizes-mb 16 --repeats 3 --rounds 1 --chunk-bytes 4194304
    python bench/transport_throughput.py --unary --no-tls --pin   # PushStream vs PushVector vs gloo

The gRPC transports run twice, plaintext and over mutual TLS (certificates from a throwaway CA, as
`dpgan-agent --local` makes; `--no-tls` skips them); a second table gives TLS / plaintext throughput
in the same round.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing as mp
import os
import platform
import socket
import statistics
import struct
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import NamedTuple

import structlog
import torch

from agent.allocator import keep_freed_memory
from agent.transport.buffers import RECEIVE_BUFFERS
from agent.transport.client import PeerClient
from agent.transport.frames import prepare_vector
from agent.transport.identity import PeerIdentity
from agent.transport.inbox import Inbox
from agent.transport.options import DEFAULT_CHUNK_BYTES, MIB
from agent.transport.server import GossipServer
from agent.transport.tls import TransportSecurity
from agent.transport.wire_vectors import all_finite, payload_crc32

SENDER_ID = "bench-sender"
RECEIVER_ID = "bench-receiver"
_LENGTH_PREFIX = struct.Struct("<Q")
# The most a raw-TCP data plane in Python could move: raw TCP plus the receiver's per-push checks.
RAW_TCP_CHECKED = "raw TCP + recycled buffer, CRC-32 and finite check per 1 MiB (a data plane's bound)"


def quiet_logs() -> None:
    # Server start/stop and handshake info lines would interleave with the table.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


def bench_identity(node_id: str) -> PeerIdentity:
    return PeerIdentity(
        node_id=node_id,
        advertise_address="127.0.0.1:0",
        schema_hash="bench",
        config_hash="bench",
        config_json='{"bench": true}',
    )


def make_pki(folder: Path) -> None:
    from agent.security.certs import create_ca, issue_node_certificate, write_certificate, write_private_key

    ca_cert, ca_key = create_ca()
    write_certificate(folder / "ca.crt", ca_cert)
    write_private_key(folder / "ca.key", ca_key)
    for node_id in (SENDER_ID, RECEIVER_ID):
        cert, key = issue_node_certificate(ca_cert, ca_key, node_id)
        write_certificate(folder / f"{node_id}.crt", cert)
        write_private_key(folder / f"{node_id}.key", key)


def security(pki: str | None, node_id: str) -> TransportSecurity:
    """Mutual TLS as `node_id` with the certificates in folder `pki`; plaintext when it is None."""
    if pki is None:
        return TransportSecurity.insecure()
    from agent.security.certs import load_node_credentials

    folder = Path(pki)
    return TransportSecurity(
        load_node_credentials(folder / f"{node_id}.crt", folder / f"{node_id}.key", folder / "ca.crt")
    )


def element_count(size_mb: int) -> int:
    return size_mb * MIB // 4


class Measured(NamedTuple):
    """One transport, one vector size, one round."""

    seconds: list[float]  # wall time of each timed exchange, on the sender
    sender_cpu: float  # CPU seconds per exchange, sending process (all threads)
    receiver_cpu: float  # CPU seconds per exchange, receiving process (all threads)


def cpu_per_exchange(marks: list[float]) -> float:
    """CPU seconds per exchange from process_time() taken after the warm-up and after each exchange."""
    return (marks[-1] - marks[0]) / (len(marks) - 1)


# --pin: the sending side on CPU 0, the receiving side on CPU 1 (each end of an exchange on a core of its
# own, as on two machines) instead of both processes sharing every core.
PIN: dict[str, int] = {}


def _pinned(cpu: int | None, target: Callable[..., None], args: tuple) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    target(*args)


def start_process(
    *, target: Callable[..., None], args: tuple, role: str = "receiver"
) -> mp.process.BaseProcess:
    process = mp.get_context("spawn").Process(target=_pinned, args=(PIN.get(role), target, args))
    process.start()
    return process


# ---- gRPC -------------------------------------------------------------------------------------------


def grpc_receiver(
    sizes_mb: list[int], pushes_per_size: int, control: Connection, pki: str | None, data_plane: bool = False
) -> None:
    quiet_logs()
    keep_freed_memory()
    torch.set_num_threads(1)

    async def serve() -> None:
        servers: list[GossipServer] = []
        consumers: list[asyncio.Task[None]] = []
        cpu: dict[int, float] = {}

        async def consume(size_mb: int, inbox: Inbox) -> None:
            # Plays the agent's part: advance the inbox and take each vector, so memory is released.
            marks = []
            for iteration in range(pushes_per_size):
                inbox.expect(iteration, 0)
                received = await inbox.wait_for(iteration, 0, {SENDER_ID}, timeout=600)
                if SENDER_ID not in received:
                    raise RuntimeError(f"receiver timed out waiting for iteration {iteration}")
                del received
                marks.append(time.process_time())
            cpu[size_mb] = cpu_per_exchange(marks)

        for size_mb in sizes_mb:
            inbox = Inbox(rounds_per_iteration=1)
            server = GossipServer(
                identity=bench_identity(RECEIVER_ID),
                inbox=inbox,
                vector_length=element_count(size_mb),
                security=security(pki, RECEIVER_ID),
                data_port=0 if data_plane else None,
            )
            await server.start()
            servers.append(server)
            consumers.append(asyncio.create_task(consume(size_mb, inbox)))
        control.send([server.bound_port for server in servers])
        await asyncio.gather(*consumers)
        control.send(cpu)
        for server in servers:
            await server.stop(1)

    asyncio.run(serve())


def bench_grpc(
    sizes_mb: list[int],
    repeats: int,
    chunk_bytes: int,
    wire_dtype: str,
    prepared: bool,
    pki: str | None = None,
    unary: bool = False,
    data_plane: bool = False,
) -> dict[int, Measured]:
    parent_end, child_end = mp.get_context("spawn").Pipe()
    receiver = start_process(target=grpc_receiver, args=(sizes_mb, repeats + 1, child_end, pki, data_plane))
    ports = parent_end.recv()
    timings: dict[int, list[float]] = {}
    sender_cpu: dict[int, float] = {}

    async def send() -> None:
        for size_mb, port in zip(sizes_mb, ports, strict=True):
            vector = torch.randn(element_count(size_mb))
            source = prepare_vector(vector, wire_dtype) if prepared else vector
            async with PeerClient(
                f"127.0.0.1:{port}",
                default_timeout=600,
                security=security(pki, SENDER_ID),
                push_stream=not unary,
            ) as client:
                await client.handshake(bench_identity(SENDER_ID))
                samples, marks = [], []
                for iteration in range(repeats + 1):
                    started = time.perf_counter()
                    ack = await client.push_vector(
                        source, iteration=iteration, round=0, wire_dtype=wire_dtype, chunk_bytes=chunk_bytes
                    )
                    elapsed = time.perf_counter() - started
                    marks.append(time.process_time())
                    if not ack.accepted:
                        raise RuntimeError(f"push refused: {ack.reason}")
                    if data_plane and client.data_plane_pushes != iteration + 1:
                        raise RuntimeError("the push did not go over the data plane")
                    samples.append(elapsed)
                timings[size_mb] = samples[1:]  # first push warms up the connection and allocator
                sender_cpu[size_mb] = cpu_per_exchange(marks)

    asyncio.run(send())
    receiver_cpu = parent_end.recv()
    receiver.join(timeout=60)
    return {size: Measured(timings[size], sender_cpu[size], receiver_cpu[size]) for size in sizes_mb}


# ---- raw TCP ----------------------------------------------------------------------------------------


def tcp_receiver(messages: int, control: Connection, checks: bool = False) -> None:
    """``checks``: what a raw-TCP data plane beside gRPC (docs/transport.md) would do at the least --
    receive into a recycled buffer (``RECEIVE_BUFFERS``, as the gRPC receiver does) one 1 MiB chunk at a
    time, and after each chunk the CRC-32 and finite check the receiver runs on every push."""
    keep_freed_memory()
    torch.set_num_threads(1)
    marks = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        control.send(listener.getsockname()[1])
        connection, _ = listener.accept()
        with connection:
            for _ in range(messages):
                header = connection.recv(_LENGTH_PREFIX.size, socket.MSG_WAITALL)
                (length,) = _LENGTH_PREFIX.unpack(header)
                if checks:
                    tensor = RECEIVE_BUFFERS.take(length)
                    view = memoryview(tensor.numpy()).cast("B")
                else:
                    buffer = bytearray(length)  # fresh buffer per message
                    view = memoryview(buffer)
                received, checked, crc = 0, 0, 0
                while received < length:
                    count = connection.recv_into(view[received:], length - received)
                    if count == 0:
                        raise ConnectionError("sender closed mid-message")
                    received += count
                    while checks and (received - checked >= MIB or received == length) and checked < length:
                        end = min(length, checked + MIB)
                        crc = payload_crc32(view[checked:end], crc)
                        if not all_finite(torch.frombuffer(view[checked:end], dtype=torch.float32)):
                            raise ValueError("not finite")
                        checked = end
                del view
                marks.append(time.process_time())
                connection.sendall(b"\x01")
    control.send(marks)


def bench_tcp(sizes_mb: list[int], repeats: int, checks: bool = False) -> dict[int, Measured]:
    parent_end, child_end = mp.get_context("spawn").Pipe()
    receiver = start_process(target=tcp_receiver, args=(len(sizes_mb) * (repeats + 1), child_end, checks))
    port = parent_end.recv()
    timings: dict[int, list[float]] = {}
    sender_cpu: dict[int, float] = {}
    with socket.create_connection(("127.0.0.1", port)) as connection:
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for size_mb in sizes_mb:
            payload = memoryview(torch.randn(element_count(size_mb)).numpy()).cast("B")
            samples, marks = [], []
            for _ in range(repeats + 1):
                started = time.perf_counter()
                connection.sendall(_LENGTH_PREFIX.pack(payload.nbytes))
                connection.sendall(payload)
                if connection.recv(1, socket.MSG_WAITALL) != b"\x01":
                    raise ConnectionError("receiver did not acknowledge")
                samples.append(time.perf_counter() - started)
                marks.append(time.process_time())
            timings[size_mb] = samples[1:]
            sender_cpu[size_mb] = cpu_per_exchange(marks)
    receiver_marks = parent_end.recv()
    receiver.join(timeout=60)
    per_size = repeats + 1
    return {
        size: Measured(
            timings[size],
            sender_cpu[size],
            cpu_per_exchange(receiver_marks[index * per_size : (index + 1) * per_size]),
        )
        for index, size in enumerate(sizes_mb)
    }


# ---- gloo -------------------------------------------------------------------------------------------


def gloo_worker(rank: int, port: int, sizes_mb: list[int], repeats: int, control: Connection) -> None:
    import torch.distributed as dist

    keep_freed_memory()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        ack = torch.zeros(1)
        timings: dict[int, list[float]] = {}
        cpu: dict[int, float] = {}
        for size_mb in sizes_mb:
            samples, marks = [], []
            tensor = torch.randn(element_count(size_mb)) if rank == 0 else None
            for _ in range(repeats + 1):
                if rank == 0:
                    assert tensor is not None
                    started = time.perf_counter()
                    dist.send(tensor, dst=1)
                    dist.recv(ack, src=1)
                    samples.append(time.perf_counter() - started)
                else:
                    received = torch.empty(element_count(size_mb))  # fresh buffer, as above
                    dist.recv(received, src=0)
                    del received
                    dist.send(ack, dst=0)
                marks.append(time.process_time())
            timings[size_mb] = samples[1:]
            cpu[size_mb] = cpu_per_exchange(marks)
        control.send((timings, cpu))
    finally:
        dist.destroy_process_group()


def bench_gloo(sizes_mb: list[int], repeats: int) -> dict[int, Measured]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.get_context("spawn")
    sender_end, sender_child = context.Pipe()
    receiver_end, receiver_child = context.Pipe()
    sender = start_process(target=gloo_worker, args=(0, port, sizes_mb, repeats, sender_child), role="sender")
    receiver = start_process(target=gloo_worker, args=(1, port, sizes_mb, repeats, receiver_child))
    timings, sender_cpu = sender_end.recv()
    _, receiver_cpu = receiver_end.recv()
    sender.join(timeout=60)
    receiver.join(timeout=60)
    return {size: Measured(timings[size], sender_cpu[size], receiver_cpu[size]) for size in sizes_mb}


# ---- report -----------------------------------------------------------------------------------------

GLOO = "torch.distributed gloo send/recv"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--repeats", type=int, default=7, help="timed exchanges per transport and round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds over all transports")
    parser.add_argument("--chunk-bytes", type=int, default=DEFAULT_CHUNK_BYTES)
    parser.add_argument(
        "--wire-dtype", default="float32", choices=["float32", "bfloat16", "float16", "float32-huffman"]
    )
    parser.add_argument(
        "--pin", action="store_true", help="sender on CPU 0, receiver on CPU 1 (as on two machines)"
    )
    parser.add_argument(
        "--unary", action="store_true", help="also measure one PushVector call per vector (no PushStream)"
    )
    parser.add_argument("--no-tls", action="store_true", help="skip the mutual-TLS gRPC variants")
    arguments = parser.parse_args()
    if arguments.pin:
        PIN.update(sender=0, receiver=1)
        os.sched_setaffinity(0, {0})  # this process sends for gRPC and raw TCP
    torch.set_num_threads(1)  # every process gets one core; the receivers need theirs
    quiet_logs()
    keep_freed_memory()
    pki = tempfile.mkdtemp(prefix="dpgan-bench-pki-")
    make_pki(Path(pki))

    sizes, repeats, chunk_bytes, wire_dtype = (
        arguments.sizes_mb,
        arguments.repeats,
        arguments.chunk_bytes,
        arguments.wire_dtype,
    )
    transports: list[tuple[str, Callable[[], dict[int, Measured]]]] = []
    for unary in [False, True] if arguments.unary else [False]:
        for tls in [False] if arguments.no_tls else [False, True]:
            for prepared in (False, True):
                rpc = "PushVector" if unary else "PushStream"
                variant = "prepared once" if prepared else "prepare+CRC per push"
                name = f"gRPC {rpc} ({wire_dtype}, {variant}{', mutual TLS' if tls else ''})"
                transports.append(
                    (
                        name,
                        lambda prepared=prepared, tls=tls, unary=unary: bench_grpc(
                            sizes, repeats, chunk_bytes, wire_dtype, prepared, pki if tls else None, unary
                        ),
                    )
                )
    transports.append(
        (
            f"data plane ({wire_dtype}, prepared once; plaintext)",
            lambda: bench_grpc(sizes, repeats, chunk_bytes, wire_dtype, True, data_plane=True),
        )
    )
    transports += [
        ("raw TCP socket", lambda: bench_tcp(sizes, repeats)),
        (RAW_TCP_CHECKED, lambda: bench_tcp(sizes, repeats, checks=True)),
        (GLOO, lambda: bench_gloo(sizes, repeats)),
    ]
    cpu = platform.processor() or platform.machine()
    print(
        f"# loopback, {os.cpu_count()} CPUs ({cpu}), torch {torch.__version__}, chunk_bytes={chunk_bytes}, "
        f"{arguments.rounds} round(s) x median of {repeats} after 1 warm-up, "
        f"load average at start {os.getloadavg()[0]:.2f}"
        + (", sender on CPU 0, receiver on CPU 1" if PIN else ""),
        flush=True,
    )
    rounds: list[dict[str, dict[int, Measured]]] = []
    for _ in range(arguments.rounds):
        rounds.append({name: run_transport() for name, run_transport in transports})
    print(f"# load average at end {os.getloadavg()[0]:.2f}")
    print(
        "| transport | vector | median ms | MiB/s | × gloo (same round) | CPU ms/exchange sender / receiver |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, _ in transports:
        for size_mb in sizes:
            medians = [statistics.median(result[name][size_mb].seconds) for result in rounds]
            ratios = [
                statistics.median(result[GLOO][size_mb].seconds)
                / statistics.median(result[name][size_mb].seconds)
                for result in rounds
            ]
            median = statistics.median(medians)
            sender_cpu = statistics.median(result[name][size_mb].sender_cpu for result in rounds)
            receiver_cpu = statistics.median(result[name][size_mb].receiver_cpu for result in rounds)
            print(
                f"| {name} | {size_mb} MiB | {median * 1e3:.1f} | {size_mb / median:.0f} | "
                f"{statistics.median(ratios):.2f} | {sender_cpu * 1e3:.1f} / {receiver_cpu * 1e3:.1f} |"
            )
    names = [name for name, _ in transports]

    def ratio_table(title: str, pairs: list[tuple[str, str, str]]) -> None:
        """Median over rounds of (time of `base`) / (time of `name`) in the same round."""
        if not pairs:
            return
        print()
        print(f"| {title} | vector | median of same-round ratios |")
        print("|---|---:|---:|")
        for label, name, base in pairs:
            for size_mb in sizes:
                ratios = [
                    statistics.median(result[base][size_mb].seconds)
                    / statistics.median(result[name][size_mb].seconds)
                    for result in rounds
                ]
                print(f"| {label} | {size_mb} MiB | {statistics.median(ratios):.2f} |")

    ratio_table(
        "TLS / plaintext throughput",
        [
            (name.removeprefix("gRPC "), name, name.replace(", mutual TLS)", ")"))
            for name in names
            if name.endswith(", mutual TLS)")
        ],
    )
    ratio_table(
        "PushStream / PushVector throughput",
        [
            (name.removeprefix("gRPC PushStream "), name, name.replace("PushStream", "PushVector"))
            for name in names
            if name.startswith("gRPC PushStream") and name.replace("PushStream", "PushVector") in names
        ],
    )


if __name__ == "__main__":
    main()
