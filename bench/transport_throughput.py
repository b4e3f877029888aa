"""Loopback throughput of one gossip push: dpgan gRPC PushVector vs raw TCP vs torch.distributed gloo.

Every transport moves the same float32 bytes from a sender process to a separate receiver process
and is timed on the sender from the start of the send until the receiver's acknowledgement arrives
(for gRPC: the PushAck, sent after the vector was validated and delivered to the inbox). Reported:
median over --repeats timed runs after one warm-up.

    python bench/transport_throughput.py                 # 1, 16, 64 MiB, 7 repeats
    python bench/transport_throughput.py --sizes-mb 16 --repeats 3 --chunk-bytes 4194304
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
import time
from collections.abc import Callable
from multiprocessing.connection import Connection

import structlog
import torch

from agent.transport.client import PeerClient
from agent.transport.codec import PeerIdentity, prepare_vector
from agent.transport.inbox import Inbox
from agent.transport.options import DEFAULT_CHUNK_BYTES, MIB
from agent.transport.server import GossipServer

SENDER_ID = "bench-sender"
RECEIVER_ID = "bench-receiver"
_LENGTH_PREFIX = struct.Struct("<Q")


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


def element_count(size_mb: int) -> int:
    return size_mb * MIB // 4


# ---- gRPC -------------------------------------------------------------------------------------------


def grpc_receiver(sizes_mb: list[int], pushes_per_size: int, control: Connection) -> None:
    quiet_logs()
    torch.set_num_threads(1)

    async def serve() -> None:
        servers: list[GossipServer] = []
        consumers: list[asyncio.Task[None]] = []

        async def consume(inbox: Inbox) -> None:
            # Plays the agent's part: advance the inbox and take each vector, so memory is released.
            for iteration in range(pushes_per_size):
                inbox.expect(iteration, 0)
                received = await inbox.wait_for(iteration, 0, {SENDER_ID}, timeout=600)
                if SENDER_ID not in received:
                    raise RuntimeError(f"receiver timed out waiting for iteration {iteration}")

        for size_mb in sizes_mb:
            inbox = Inbox(rounds_per_iteration=1)
            server = GossipServer(
                identity=bench_identity(RECEIVER_ID), inbox=inbox, vector_length=element_count(size_mb)
            )
            await server.start()
            servers.append(server)
            consumers.append(asyncio.create_task(consume(inbox)))
        control.send([server.bound_port for server in servers])
        await asyncio.gather(*consumers)
        for server in servers:
            await server.stop(1)

    asyncio.run(serve())


def bench_grpc(
    sizes_mb: list[int], repeats: int, chunk_bytes: int, wire_dtype: str, prepared: bool
) -> dict[int, list[float]]:
    context = mp.get_context("spawn")
    parent_end, child_end = context.Pipe()
    receiver = context.Process(target=grpc_receiver, args=(sizes_mb, repeats + 1, child_end))
    receiver.start()
    ports = parent_end.recv()
    timings: dict[int, list[float]] = {}

    async def send() -> None:
        for size_mb, port in zip(sizes_mb, ports, strict=True):
            vector = torch.randn(element_count(size_mb))
            source = prepare_vector(vector, wire_dtype) if prepared else vector
            async with PeerClient(f"127.0.0.1:{port}", default_timeout=600) as client:
                await client.handshake(bench_identity(SENDER_ID))
                samples = []
                for iteration in range(repeats + 1):
                    started = time.perf_counter()
                    ack = await client.push_vector(
                        source, iteration=iteration, round=0, wire_dtype=wire_dtype, chunk_bytes=chunk_bytes
                    )
                    elapsed = time.perf_counter() - started
                    if not ack.accepted:
                        raise RuntimeError(f"push refused: {ack.reason}")
                    samples.append(elapsed)
                timings[size_mb] = samples[1:]  # first push warms up the connection and allocator

    asyncio.run(send())
    receiver.join(timeout=60)
    return timings


# ---- raw TCP ----------------------------------------------------------------------------------------


def tcp_receiver(messages: int, control: Connection) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        control.send(listener.getsockname()[1])
        connection, _ = listener.accept()
        with connection:
            for _ in range(messages):
                header = connection.recv(_LENGTH_PREFIX.size, socket.MSG_WAITALL)
                (length,) = _LENGTH_PREFIX.unpack(header)
                buffer = bytearray(length)  # fresh buffer per message, as the gRPC receiver allocates
                view = memoryview(buffer)
                received = 0
                while received < length:
                    count = connection.recv_into(view[received:], length - received)
                    if count == 0:
                        raise ConnectionError("sender closed mid-message")
                    received += count
                connection.sendall(b"\x01")


def bench_tcp(sizes_mb: list[int], repeats: int) -> dict[int, list[float]]:
    context = mp.get_context("spawn")
    parent_end, child_end = context.Pipe()
    receiver = context.Process(target=tcp_receiver, args=(len(sizes_mb) * (repeats + 1), child_end))
    receiver.start()
    port = parent_end.recv()
    timings: dict[int, list[float]] = {}
    with socket.create_connection(("127.0.0.1", port)) as connection:
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for size_mb in sizes_mb:
            payload = memoryview(torch.randn(element_count(size_mb)).numpy()).cast("B")
            samples = []
            for _ in range(repeats + 1):
                started = time.perf_counter()
                connection.sendall(_LENGTH_PREFIX.pack(payload.nbytes))
                connection.sendall(payload)
                if connection.recv(1, socket.MSG_WAITALL) != b"\x01":
                    raise ConnectionError("receiver did not acknowledge")
                samples.append(time.perf_counter() - started)
            timings[size_mb] = samples[1:]
    receiver.join(timeout=60)
    return timings


# ---- gloo -------------------------------------------------------------------------------------------


def gloo_worker(rank: int, port: int, sizes_mb: list[int], repeats: int, control: Connection | None) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        ack = torch.zeros(1)
        timings: dict[int, list[float]] = {}
        for size_mb in sizes_mb:
            samples = []
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
                    dist.send(ack, dst=0)
            timings[size_mb] = samples[1:]
        if control is not None:
            control.send(timings)
    finally:
        dist.destroy_process_group()


def bench_gloo(sizes_mb: list[int], repeats: int) -> dict[int, list[float]]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.get_context("spawn")
    parent_end, child_end = context.Pipe()
    sender = context.Process(target=gloo_worker, args=(0, port, sizes_mb, repeats, child_end))
    receiver = context.Process(target=gloo_worker, args=(1, port, sizes_mb, repeats, None))
    sender.start()
    receiver.start()
    timings = parent_end.recv()
    sender.join(timeout=60)
    receiver.join(timeout=60)
    return timings


# ---- report -----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--chunk-bytes", type=int, default=DEFAULT_CHUNK_BYTES)
    parser.add_argument("--wire-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    arguments = parser.parse_args()
    torch.set_num_threads(1)  # every process gets one core; the receivers need theirs
    quiet_logs()

    sizes, repeats, chunk_bytes, wire_dtype = (
        arguments.sizes_mb,
        arguments.repeats,
        arguments.chunk_bytes,
        arguments.wire_dtype,
    )
    transports: list[tuple[str, Callable[[], dict[int, list[float]]]]] = [
        (
            f"gRPC PushVector ({wire_dtype}, prepare+CRC per push)",
            lambda: bench_grpc(sizes, repeats, chunk_bytes, wire_dtype, prepared=False),
        ),
        (
            f"gRPC PushVector ({wire_dtype}, prepared once)",
            lambda: bench_grpc(sizes, repeats, chunk_bytes, wire_dtype, prepared=True),
        ),
        ("raw TCP socket", lambda: bench_tcp(sizes, repeats)),
        ("torch.distributed gloo send/recv", lambda: bench_gloo(sizes, repeats)),
    ]
    cpu = platform.processor() or platform.machine()
    print(
        f"# loopback, {os.cpu_count()} CPUs ({cpu}), torch {torch.__version__}, "
        f"chunk_bytes={chunk_bytes}, median of {repeats} after 1 warm-up"
    )
    print("| transport | vector | median ms | MiB/s |")
    print("|---|---:|---:|---:|")
    for name, run_transport in transports:
        timings = run_transport()
        for size_mb in arguments.sizes_mb:
            median = statistics.median(timings[size_mb])
            print(f"| {name} | {size_mb} MiB | {median * 1e3:.1f} | {size_mb / median:.0f} |")


if __name__ == "__main__":
    main()
