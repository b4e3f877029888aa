"""The data plane (agent/transport/data_plane.py): pushes as a header and raw payload bytes over one TCP or
mutual-TLS connection per neighbour, with the checks and the PushAck of PushVector; real servers on port 0.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
import zlib
from pathlib import Path

import grpc
import pytest
import torch

from agent.node.main import agent_main
from agent.transport import data_plane
from agent.transport._generated.dpgan.v1 import dpgan_pb2 as pb
from agent.transport.client import PeerClient
from agent.transport.frames import header_message, prepare_vector
from agent.transport.inbox import Inbox
from agent.transport.options import MIN_CHUNK_BYTES
from agent.transport.server import GossipServer
from tests.agents import EQUIVALENCE_FLAGS, assert_bit_for_bit, start_agents, wait_all
from tests.pki import Pki
from tests.test_transport import gossip_node, identity, run

pytestmark = pytest.mark.timeout(60)

N = 3 * MIN_CHUNK_BYTES // 4 + 5  # several chunks, the last one short


def _prefix(header: bytes, payload_bytes: int) -> bytes:
    return struct.pack("<IQ", len(header), payload_bytes) + header


async def _until_ready(client: PeerClient) -> None:
    """The client connects to the data plane in the background after the handshake."""
    for _ in range(200):
        if client.data_plane_ready:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the data plane did not connect within 2 s")


async def _closed(reader: asyncio.StreamReader) -> bool:
    """The server closed the connection (an end of stream, or a reset when our bytes were left unread)."""
    try:
        return await asyncio.wait_for(reader.read(), 5) == b""
    except ConnectionResetError:
        return True


async def _response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    kind, length = struct.unpack("<BI", await reader.readexactly(5))
    return kind, await reader.readexactly(length)


def _header(
    sender: str, iteration: int, payload: bytes, elements: int, *, chunk_bytes: int = MIN_CHUNK_BYTES
) -> bytes:
    header = pb.VectorHeader(
        sender_id=sender,
        iteration=iteration,
        round=0,
        dtype=pb.WIRE_DTYPE_FLOAT32,
        element_count=elements,
        checksum=zlib.crc32(payload),
        chunk_bytes=chunk_bytes,
    )
    return pb.VectorChunk(header=header).SerializeToString()


def test_pushes_go_over_the_data_plane_bit_for_bit_and_refusals_keep_the_connection() -> None:
    async def scenario() -> None:
        async with gossip_node("b", vector_length=N, rounds_per_iteration=1, data_port=0) as node:
            assert node.server.data_port > 0
            async with PeerClient(node.server.address) as client:
                response = await client.handshake(identity("a"))
                assert response.data_port == node.server.data_port
                await _until_ready(client)
                vectors = [torch.randn(N) for _ in range(3)]
                for iteration, vector in enumerate(vectors):
                    node.inbox.expect(iteration, 0)
                    ack = await client.push_vector(
                        prepare_vector(vector, "float32"),
                        iteration=iteration,
                        round=0,
                        chunk_bytes=MIN_CHUNK_BYTES,
                    )
                    assert ack.accepted, ack.reason
                    received = await node.inbox.wait_for(iteration, 0, {"a"}, timeout=5)
                    assert torch.equal(received["a"], vector)
                # A duplicate is refused from its header, its payload skipped: the next push goes on the
                # same connection.
                ack = await client.push_vector(vectors[2], iteration=2, round=0, chunk_bytes=MIN_CHUNK_BYTES)
                assert not ack.accepted and ack.status == pb.PUSH_STATUS_DUPLICATE
                node.inbox.expect(3, 0)
                ack = await client.push_vector(vectors[0], iteration=3, round=0, chunk_bytes=MIN_CHUNK_BYTES)
                assert ack.accepted
                assert client.data_plane_pushes == 5
                assert node.server.data_plane_connections == (1, 0)

    run(scenario)


def test_without_a_data_port_pushes_use_grpc() -> None:
    async def scenario() -> None:
        async with (
            gossip_node("b", vector_length=4, rounds_per_iteration=1) as node,
            PeerClient(node.server.address) as client,
        ):
            assert (await client.handshake(identity("a"))).data_port == 0
            assert (await client.push_vector(torch.ones(4), iteration=0, round=0)).accepted
            assert client.data_plane_pushes == 0

    run(scenario)


def test_an_unreachable_data_plane_falls_back_to_grpc_and_backs_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """A refused port (nothing listens) and a port that drops packets (a firewall: the connect hangs)
    never hold a push up: pushes go over gRPC while the data plane is dialled in the background, and a
    failed dial is retried after RETRY_AFTER_S, doubling while it keeps failing."""
    monkeypatch.setattr(data_plane, "CONNECT_TIMEOUT_S", 0.3)

    async def scenario() -> None:
        async with (
            gossip_node("b", vector_length=4, rounds_per_iteration=1, data_port=0) as node,
            PeerClient(node.server.address) as client,
        ):
            with socket.socket() as free:
                free.bind(("127.0.0.1", 0))
                closed_port = free.getsockname()[1]
            real_port = node.server.data_port
            # The server announces a port nothing listens on (a NAT without the mapping).
            monkeypatch.setattr(type(node.server), "data_port", property(lambda _: closed_port))
            await client.handshake(identity("a"))
            for iteration in range(3):
                node.inbox.expect(iteration, 0)
                started = time.monotonic()
                assert (await client.push_vector(torch.ones(4), iteration=iteration, round=0)).accepted
                assert time.monotonic() - started < 1
                await asyncio.sleep(0.1)
            assert client.data_plane_pushes == 0 and not client.data_plane_ready

            # A dial that hangs (packets dropped) is given up after CONNECT_TIMEOUT_S; pushes meanwhile go
            # over gRPC at once.
            hanging = asyncio.Event()

            async def hang(host: str, port: int) -> None:
                hanging.set()
                await asyncio.sleep(3600)

            monkeypatch.setattr(data_plane._PlainConnection, "open", staticmethod(hang))
            monkeypatch.setattr(data_plane, "RETRY_AFTER_S", 0.0)
            other = data_plane.DataPlaneClient("127.0.0.1", real_port)
            other.connect_soon()
            await asyncio.wait_for(hanging.wait(), 2)
            assert not other.ready
            await asyncio.sleep(0.5)
            assert not other.ready and "no connection within 0.3 s" in other.last_error
            await other.close()

            # Back-off: the waits double while dials keep failing, and a success resets them.
            monkeypatch.setattr(data_plane, "RETRY_AFTER_S", 10.0)
            backoff = data_plane.DataPlaneClient("127.0.0.1", closed_port)
            for failures in range(1, 4):
                backoff._failed(ConnectionRefusedError("refused"))
                wait = backoff._retry_at - time.monotonic()
                assert 10.0 * 2 ** (failures - 1) - 1 < wait <= 10.0 * 2 ** (failures - 1)
            backoff.connect_soon()
            assert backoff._connecting is None  # still waiting to retry: not dialled

    run(scenario)


def test_closing_the_client_ends_a_push_in_flight_at_once() -> None:
    """A receiver frozen mid-push (its socket takes no more bytes, no answer comes): when the registry
    closes the peer's client (the peer stopped answering probes), the push ends at once, as a gRPC call on
    a closed channel does, instead of at its deadline."""

    async def scenario() -> None:
        silent = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)  # accepts, never reads
        port = silent.sockets[0].getsockname()[1]
        client = data_plane.DataPlaneClient("127.0.0.1", port)
        client.connect_soon()
        for _ in range(200):
            if client.ready:
                break
            await asyncio.sleep(0.01)
        assert client.ready
        wire = prepare_vector(torch.ones(16 * MIN_CHUNK_BYTES), "float32")
        header = header_message(wire, sender_id="a", iteration=0, round=0, epoch=0)
        push = asyncio.ensure_future(client.push(header, wire.payload, timeout=60))
        await asyncio.sleep(0.3)
        assert not push.done()
        started = time.monotonic()
        await client.close()
        with pytest.raises(asyncio.CancelledError):
            await push
        assert time.monotonic() - started < 1
        silent.close()

    run(scenario)


def test_a_push_made_stale_mid_chunk_keeps_the_connection_in_step() -> None:
    """The inbox moves on while a chunk is half received: the push is aborted (STALE), the rest of its
    bytes are skipped, the answer comes at once, and the next push on the connection is accepted. (A
    fresh tester's case: the half chunk was not counted, and the server waited for bytes that never
    came.)"""

    async def scenario() -> None:
        async with gossip_node(
            "b", vector_length=N, rounds_per_iteration=1, data_port=0, stall_timeout=3
        ) as node:
            async with PeerClient(node.server.address) as client:
                await client.handshake(identity("a"))
            reader, writer = await asyncio.open_connection("127.0.0.1", node.server.data_port)
            good = struct.pack(f"<{N}f", *([1.0] * N))
            node.inbox.expect(0, 0)
            half = MIN_CHUNK_BYTES // 2
            writer.write(data_plane.PREAMBLE + _prefix(_header("a", 0, good, N), len(good)) + good[:half])
            await asyncio.sleep(0.3)
            node.inbox.expect(1, 0)  # the push becomes stale while it arrives
            await asyncio.sleep(0.3)
            writer.write(good[half:])
            started = time.monotonic()
            kind, body = await asyncio.wait_for(_response(reader), 10)
            assert kind == data_plane.ACK and pb.PushAck.FromString(body).status == pb.PUSH_STATUS_STALE
            assert time.monotonic() - started < 1
            writer.write(_prefix(_header("a", 1, good, N), len(good)) + good)
            kind, body = await asyncio.wait_for(_response(reader), 10)
            assert kind == data_plane.ACK and pb.PushAck.FromString(body).accepted, body
            writer.close()

    run(scenario)


def test_malformed_bytes_are_refused_with_a_reason_and_nothing_is_delivered() -> None:
    async def scenario() -> None:
        async with gossip_node("b", vector_length=N, rounds_per_iteration=1, data_port=0) as node:
            async with PeerClient(node.server.address) as client:
                await client.handshake(identity("a"))
            port = node.server.data_port

            async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(data_plane.PREAMBLE)
                return reader, writer

            # A wrong preamble: closed without an answer.
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\n\r\n")
            assert await _closed(reader)
            writer.close()
            # An oversized header length: an error naming it, then closed.
            reader, writer = await connect()
            writer.write(struct.pack("<IQ", 1 << 20, 0))
            kind, body = await _response(reader)
            assert kind == data_plane.ERROR and b"header message of 1048576 bytes" in body
            assert await _closed(reader)
            writer.close()
            # Garbage where the header should be: an error, then closed.
            reader, writer = await connect()
            writer.write(_prefix(b"\xff\xff\xff", 0))
            kind, body = await _response(reader)
            assert (
                kind == data_plane.ERROR
                and struct.unpack("<I", body[:4])[0] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
            )
            writer.close()

            # On one connection: a wrong payload length, a bad checksum, NaN, an unknown sender: each is
            # refused (skipping its payload), and a good push after them is accepted.
            reader, writer = await connect()
            good = struct.pack(f"<{N}f", *([0.5] * N))
            node.inbox.expect(0, 0)
            cases = [
                (_header("a", 0, good, N), good + b"\0\0\0\0", pb.PUSH_STATUS_MALFORMED, b"announces"),
                (_header("a", 0, good[:-4] + b"\0\0\0\0", N), good, pb.PUSH_STATUS_MALFORMED, b"checksum"),
                (
                    _header("a", 0, nan := good[:-4] + struct.pack("<f", float("nan")), N),
                    nan,
                    None,
                    b"non-finite",
                ),
                (_header("stranger", 0, good, N), good, pb.PUSH_STATUS_NOT_HANDSHAKEN, b"handshake"),
            ]
            for header, payload, status, words in cases:
                writer.write(_prefix(header, len(payload)) + payload)
                kind, body = await _response(reader)
                ack = pb.PushAck.FromString(body)
                assert kind == data_plane.ACK and not ack.accepted, ack
                assert status is None or ack.status == status, ack
                assert words.decode() in ack.reason, ack.reason
            writer.write(_prefix(_header("a", 0, good, N), len(good)) + good)
            kind, body = await _response(reader)
            assert pb.PushAck.FromString(body).accepted
            received = await node.inbox.wait_for(0, 0, {"a"}, timeout=5)
            assert torch.equal(received["a"], torch.full((N,), 0.5))
            writer.close()

    run(scenario)


def test_a_stalled_push_is_aborted_and_its_connection_closed() -> None:
    async def scenario() -> None:
        async with gossip_node(
            "b", vector_length=N, rounds_per_iteration=1, data_port=0, stall_timeout=0.5
        ) as node:
            async with PeerClient(node.server.address) as client:
                await client.handshake(identity("a"))
            reader, writer = await asyncio.open_connection("127.0.0.1", node.server.data_port)
            good = struct.pack(f"<{N}f", *([1.0] * N))
            node.inbox.expect(0, 0)
            writer.write(data_plane.PREAMBLE + _prefix(_header("a", 0, good, N), len(good)) + good[:100])
            started = time.monotonic()
            kind, body = await _response(reader)
            assert kind == data_plane.ERROR and b"stalled" in body
            assert 0.4 < time.monotonic() - started < 5
            assert await _closed(reader)
            writer.close()

    run(scenario)


def test_the_data_plane_is_plaintext_only_so_tls_nodes_refuse_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A TLS node never serves a data plane, and a TLS client never sends a vector outside TLS, whatever
    a peer announces (TLS through asyncio's SSL layer was slower than gRPC's own: docs/transport.md)."""
    pki = Pki.create(tmp_path / "pki")
    with pytest.raises(ValueError, match="data plane is plaintext"):
        GossipServer(
            identity=identity("b"), inbox=Inbox(rounds_per_iteration=1), vector_length=4, data_port=0,
            security=pki.security("b"),
        )  # fmt: skip
    cert, key = pki.issue("node-a")
    argv = ["--data-port", "0", "--listen", "127.0.0.1:5999", "--dataset", "ring8", "--discovery", "none"]
    argv += ["--tls-cert", str(cert), "--tls-key", str(key), "--tls-ca", str(pki.ca_path)]
    assert agent_main([*argv, "--out", str(tmp_path / "out")]) == 2
    assert (
        "--data-port: the data plane is plaintext and this agent runs mutual TLS" in capsys.readouterr().err
    )

    async def scenario() -> None:
        async with (
            gossip_node("b", vector_length=4, rounds_per_iteration=1, security=pki.security("b")) as node,
            PeerClient(node.server.address, security=pki.security("a")) as client,
        ):
            response = await client.handshake(identity("a"))
            response.data_port = 9  # a peer that announces one anyway
            node.inbox.expect(0, 0)
            assert (await client.push_vector(torch.ones(4), iteration=0, round=0)).accepted
            assert client.data_plane_pushes == 0

    run(scenario)


def test_connections_past_the_cap_are_closed() -> None:
    async def scenario() -> None:
        async with gossip_node(
            "b", vector_length=4, rounds_per_iteration=1, data_port=0, max_push_streams=2
        ) as node:
            writers = []
            for _ in range(2):
                _, writer = await asyncio.open_connection("127.0.0.1", node.server.data_port)
                writer.write(data_plane.PREAMBLE)
                writers.append(writer)
            await asyncio.sleep(0.2)
            reader, writer = await asyncio.open_connection("127.0.0.1", node.server.data_port)
            assert await _closed(reader)
            assert node.server.data_plane_connections == (2, 1)
            for each in [*writers, writer]:
                each.close()

    run(scenario)


@pytest.mark.timeout(150)
def test_agents_on_the_data_plane_reproduce_the_simulator_bit_for_bit(tmp_path: Path) -> None:
    """4 agents, two with a data plane (their neighbours push to it) and two without: the same bits."""
    from agent.cli import main

    extra = {0: ["--data-port", "0"], 2: ["--data-port", "0"]}
    processes, _ = start_agents(tmp_path / "agents", 4, EQUIVALENCE_FLAGS, extra=extra)
    assert main(["simulate", *EQUIVALENCE_FLAGS, "--nodes", "4", "--out", str(tmp_path / "sim")]) == 0
    assert wait_all(processes, timeout=120) == [0, 0, 0, 0]
    for i in range(4):
        assert_bit_for_bit(tmp_path / "agents", tmp_path / "sim", i, 50)
    started = [line for line in (tmp_path / "agents" / "node-0" / "agent.log").read_text().splitlines()
               if "gossip_server_started" in line]  # fmt: skip
    assert started and '"data_port"' in started[0]


def test_the_data_port_flag_is_checked_and_forwarded_by_local(capsys: pytest.CaptureFixture[str]) -> None:
    from agent.node.local import agent_flags

    assert agent_flags(["--local", "3", "--insecure", "--data-port", "0"], 3) == [
        "--data-port=0",
        "--insecure",
    ]
    assert "--data-port=7000" in agent_flags(["--local", "3", "--insecure", "--data-port", "7000"], 3)
    with pytest.raises(ValueError, match="--data-port P gives agent i port P"):
        agent_flags(["--local", "3", "--insecure", "--data-port", "65535"], 3)
    with pytest.raises(ValueError, match="--data-port needs --insecure"):
        agent_flags(["--local", "3", "--data-port", "0"], 3)
    argv = ["--data-port", "70000", "--listen", "127.0.0.1:5999", "--dataset", "ring8", "--discovery", "none"]
    assert agent_main(argv) == 2
    assert "--data-port: must be 0 to 65535, got 70000" in capsys.readouterr().err
