"""float32-delta on the wire: bit-exact float32 coded against the last vector sent on the edge
(agent.transport.delta_coding, agent.transport.references), through the real framing and reassembly and
over real gRPC; the malformed payloads and unknown references a peer could send; a receiver that lost its
reference refuses, and nothing wrong is ever delivered."""

from __future__ import annotations

import asyncio
import zlib
from types import SimpleNamespace

import pytest
import structlog
import torch

from agent.checkpoint import load_checkpoint
from agent.core.compression import Compressor
from agent.node.delta_wires import DeltaWires
from agent.node.freezes import FreezeDetector
from agent.node.gossip import RoundSettings, Traffic
from agent.node.pushes import Pushes
from agent.transport import delta_coding
from agent.transport._generated.dpgan.v1 import dpgan_pb2 as pb
from agent.transport.client import PeerClient
from agent.transport.codecs import CodecError, GossipKind
from agent.transport.frames import (
    ExpectedVector,
    WireError,
    WireErrorKind,
    WireVector,
    decode_vector,
    iter_chunks,
    payload_crc32,
    prepare_vector,
)
from agent.transport.references import Reference, References
from tests.agents import EQUIVALENCE_FLAGS, start_agents, wait_all, wait_for_event
from tests.test_telemetry import scrape, value
from tests.test_transport import bits, gossip_node, identity, run

pytestmark = pytest.mark.timeout(60)


def _weights(count: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, generator=torch.Generator().manual_seed(seed)) * 0.02


def _step(x: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """x after a few small optimizer steps: the same signs and exponents, other low bits."""
    return x + torch.randn(x.numel(), generator=torch.Generator().manual_seed(seed)) * 1e-5


def _held(sender: str, reference: Reference) -> References:
    references = References()
    references.keep(sender, reference)
    return references


def _received(wire: WireVector, count: int, references: References | None, chunk_bytes: int = 65536):
    chunks = iter_chunks(wire, sender_id="a", iteration=3, chunk_bytes=chunk_bytes)
    return decode_vector(chunks, ExpectedVector(element_count=count, references=references))


@pytest.mark.parametrize("chunk_bytes", [65536, 65537, 1 << 20])
def test_a_vector_coded_against_its_reference_arrives_bit_for_bit_and_far_smaller(chunk_bytes: int) -> None:
    x0 = _weights(200_000)
    x1 = _step(x0)
    reference = Reference.of(0, 0, x0)
    wire = prepare_vector(x1, "float32-delta", reference, keep_reference=True)
    assert wire.wire_dtype == "float32-delta" and wire.keep_reference
    assert wire.reference == reference.header()
    assert wire.payload_bytes < 0.75 * 4 * x1.numel()  # exponent coding alone: ~0.83
    decoded = _received(wire, x1.numel(), _held("a", reference), chunk_bytes)
    assert torch.equal(bits(decoded.vector), bits(x1))
    assert decoded.wire_dtype == "float32-delta" and decoded.keep_reference


def test_special_values_keep_their_bits_against_any_reference() -> None:
    x = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1e-38, 3.4e38, -3.4e38, 1.0, -2.5, 7.0] * 1000)
    reference = torch.tensor([1.0, 2.0, -3.0, 1e-45, 0.0, -0.0, 3.4e38, 1.0, 2.5, 7.0] * 1000)
    payload, coded = delta_coding.encode(x, reference)
    assert torch.equal(bits(delta_coding.decode(payload, x.numel(), coded, reference)), bits(x))


def test_vectors_too_far_apart_go_exponent_coded_and_without_a_reference_too() -> None:
    x = _weights(50_000, seed=3)
    noise = torch.randint(-(2**31), 2**31 - 1, (50_000,), dtype=torch.int32, generator=torch.Generator())
    unrelated = Reference.of(0, 0, noise.view(torch.float32))
    assert delta_coding.encode(x, unrelated.vector) is None
    # A reference of another model: the delta still codes, but worse than the exponents alone.
    other = Reference.of(0, 0, torch.randn(50_000) * 100)
    assert prepare_vector(x, "float32-delta", other).wire_dtype == "float32-huffman"
    far = prepare_vector(x, "float32-delta", unrelated, keep_reference=True)
    alone = prepare_vector(x, "float32-delta", None, keep_reference=True)
    for wire in (far, alone):
        assert wire.wire_dtype == "float32-huffman" and wire.reference is None and wire.keep_reference
        assert torch.equal(bits(_received(wire, x.numel(), None).vector), bits(x))


def test_a_receiver_without_the_named_reference_refuses_and_says_what_it_holds() -> None:
    x0, x1, x2 = _weights(10_000), _step(_weights(10_000)), _step(_weights(10_000), seed=2)
    wire = prepare_vector(x2, "float32-delta", Reference.of(0, 1, x1), keep_reference=True)
    assert wire.wire_dtype == "float32-delta"
    cases = [
        (None, "no references are kept"),
        (References(), "no reference is held for 'a'"),
        # Held: another position, or the same position with other bits (a sender that rewound and
        # recomputed it): the checksum tells them apart.
        (_held("a", Reference.of(0, 0, x0)), "the reference held for 'a' is (iteration 0, round 0"),
        (_held("a", Reference.of(0, 1, x0)), "the reference held for 'a' is (iteration 0, round 1"),
        (_held("b", Reference.of(0, 1, x1)), "no reference is held for 'a'"),
    ]
    for references, message in cases:
        with pytest.raises(WireError, match=r"coded against|no references") as error:
            _received(wire, x2.numel(), references)
        assert error.value.kind is WireErrorKind.REFERENCE_MISSING
        assert message in str(error.value)
    assert torch.equal(_received(wire, x2.numel(), _held("a", Reference.of(0, 1, x1))).vector, x2)


def test_every_float32_run_takes_a_delta_and_no_other_run_does() -> None:
    x0 = _weights(10_000)
    reference = Reference.of(0, 0, x0)
    wire = prepare_vector(_step(x0), "float32-delta", reference, keep_reference=True)
    assert wire.wire_dtype == "float32-delta"

    def decoded(gossip: GossipKind) -> torch.Tensor:
        chunks = iter_chunks(wire, sender_id="a", chunk_bytes=65536)
        expected = ExpectedVector(element_count=x0.numel(), gossip=gossip, references=_held("a", reference))
        return decode_vector(chunks, expected).vector

    for wire_dtype in ("float32", "float32-huffman", "float32-delta", "float32-auto"):
        assert torch.equal(bits(decoded(GossipKind(wire_dtype=wire_dtype))), bits(_step(x0)))
    with pytest.raises(WireError, match="travel as bfloat16 \\(wire_dtype\\), not float32-delta"):
        decoded(GossipKind(wire_dtype="bfloat16"))
    with pytest.raises(WireError, match="gossips topk-compressed differences, not plain vectors"):
        decoded(GossipKind(Compressor("topk", 0.01)))


def _delta_header(count: int, coded_bytes: int, **fields) -> pb.VectorHeader:
    header = pb.VectorHeader(
        sender_id="a",
        dtype=pb.WIRE_DTYPE_FLOAT32_DELTA,
        element_count=count,
        chunk_bytes=1 << 20,
        coded_bytes=coded_bytes,
    )
    for name, field in fields.items():
        if isinstance(field, pb.DeltaReference):
            getattr(header, name).CopyFrom(field)
        else:
            setattr(header, name, field)
    return header


def _decode_raw(header: pb.VectorHeader, payload: bytes, references: References | None) -> torch.Tensor:
    header.checksum = payload_crc32(payload)
    chunk = pb.VectorChunk(header=header, data=payload)
    expected = ExpectedVector(element_count=header.element_count, references=references)
    return decode_vector([chunk], expected).vector


def _stream(data: bytes) -> bytes:
    coder = zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
    return coder.compress(data) + coder.flush()


@pytest.mark.parametrize(
    ("stream", "message"),
    [
        (b"\x00" * 10, "does not inflate"),
        (_stream(bytes(64)), "inflates to 64 bytes, expected 200"),
        (_stream(bytes(400)), "more than 200 bytes"),
        (_stream(bytes(200))[:-4], "ends before its end marker"),
        (_stream(bytes(200)) + b"\x00", "bytes after its end"),
        (_stream(bytes(100)) + _stream(bytes(100)), "bytes after its end"),  # two streams
    ],
)
def test_a_malformed_high_plane_stream_is_a_wire_error(stream: bytes, message: str) -> None:
    count = 100
    reference = Reference.of(0, 0, _weights(count))
    header = _delta_header(count, len(stream), reference=reference.header())
    with pytest.raises(WireError, match=message) as error:
        _decode_raw(header, bytes(2 * count) + stream, _held("a", reference))
    assert error.value.kind is WireErrorKind.COMPRESSION


def test_a_delta_that_makes_nan_is_refused() -> None:
    count = 100
    reference = Reference.of(0, 0, torch.ones(count))
    # XOR with 1.0's bits (0x3f800000) turning the exponent all ones: 0x7f800001 is a NaN.
    xor = torch.zeros(count, dtype=torch.int32)
    xor[7] = 0x3F800000 ^ 0x7F800001
    planes = xor.view(torch.uint8).view(count, 4).t().contiguous()
    stream = _stream(planes[2:].numpy().tobytes())
    header = _delta_header(count, len(stream), reference=reference.header())
    with pytest.raises(WireError, match="non-finite") as error:
        _decode_raw(header, planes[:2].numpy().tobytes() + stream, _held("a", reference))
    assert error.value.kind is WireErrorKind.NON_FINITE


def test_reference_fields_appear_only_where_they_mean_something() -> None:
    count = 16
    reference = Reference.of(0, 0, torch.ones(count))
    payload = torch.ones(count).numpy().tobytes()
    float32 = pb.VectorHeader(
        sender_id="a", dtype=pb.WIRE_DTYPE_FLOAT32, element_count=count, chunk_bytes=1 << 16
    )
    float32.reference.CopyFrom(reference.header())
    with pytest.raises(WireError, match="only float32-delta carries one"):
        _decode_raw(float32, payload, _held("a", reference))
    half = pb.VectorHeader(
        sender_id="a",
        dtype=pb.WIRE_DTYPE_BFLOAT16,
        element_count=count,
        chunk_bytes=1 << 16,
        keep_reference=True,
    )
    with pytest.raises(WireError, match="keep_reference is set on a bfloat16 payload"):
        _decode_raw(half, torch.ones(count, dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes(), None)
    with pytest.raises(WireError, match="names no reference"):
        _decode_raw(_delta_header(count, 10), bytes(2 * count + 10), _held("a", reference))
    with pytest.raises(WireError, match="coded_bytes 40 is outside"):
        _decode_raw(_delta_header(count, 40, reference=reference.header()), bytes(72), _held("a", reference))
    with pytest.raises(ValueError, match="keep_reference needs a float32 wire dtype"):
        prepare_vector(torch.ones(count), "bfloat16", keep_reference=True)


def test_decode_checks_sizes_itself() -> None:
    reference = torch.ones(10)
    with pytest.raises(CodecError, match="payload has 5 bytes"):
        delta_coding.decode(torch.zeros(5, dtype=torch.uint8), 10, 3, reference)
    with pytest.raises(ValueError, match="must hold 10 float32 elements"):
        delta_coding.decode(torch.zeros(23, dtype=torch.uint8), 10, 3, torch.ones(9))
    with pytest.raises(ValueError, match="the reference has 9 elements"):
        delta_coding.encode(torch.ones(10), torch.ones(9))
    assert delta_coding.encode(torch.ones(0), torch.ones(0)) is None


def test_over_grpc_a_receiver_keeps_the_last_vector_asked_for_and_refuses_deltas_against_any_other() -> None:
    """The receiver's side over real gRPC: a vector sent with keep_reference becomes the sender's
    reference once delivered; a delta against it arrives bit for bit in fewer bytes; one against an older
    vector, after a vector without keep_reference, after the peer was forgotten, or at a restarted receiver
    (no references) is refused with REFERENCE_MISSING and delivers nothing."""
    count = 100_000
    x = [_weights(count)]
    for step in range(1, 5):
        x.append(_step(x[-1], seed=step))

    async def scenario() -> None:
        async with (
            gossip_node("b", vector_length=count, rounds_per_iteration=1) as node,
            PeerClient(node.server.address) as client,
        ):
            await client.handshake(identity("a"))

            async def push(wire: WireVector, iteration: int) -> pb.PushAck:
                return await client.push_vector(wire, iteration=iteration, round=0)

            first = prepare_vector(x[0], "float32", keep_reference=True)
            assert (await push(first, 0)).accepted
            assert node.server.reference_bytes == 4 * count
            node.inbox.expect(1, 0)
            before = client.bytes_sent
            delta = prepare_vector(x[1], "float32-delta", Reference.of(0, 0, x[0]), keep_reference=True)
            ack = await push(delta, 1)
            assert ack.accepted, ack.reason
            assert client.bytes_sent - before < 0.75 * 4 * count
            received = await node.inbox.wait_for(1, 0, {"a"}, timeout=2.0)
            assert torch.equal(bits(received["a"]), bits(x[1]))
            # Against x[0] again: the receiver moved on to x[1].
            node.inbox.expect(2, 0)
            stale = prepare_vector(x[2], "float32-delta", Reference.of(0, 0, x[0]), keep_reference=True)
            ack = await push(stale, 2)
            assert not ack.accepted and ack.status == pb.PUSH_STATUS_REFERENCE_MISSING
            assert "the reference held for 'a' is (iteration 1, round 0" in ack.reason
            assert await node.inbox.wait_for(2, 0, {"a"}, timeout=0.2) == {}
            # A vector without keep_reference: the receiver drops the one it held.
            assert (await push(prepare_vector(x[2], "float32"), 2)).accepted
            assert node.server.reference_bytes == 0
            node.inbox.expect(3, 0)
            ack = await push(prepare_vector(x[3], "float32-delta", Reference.of(2, 0, x[2])), 3)
            assert ack.status == pb.PUSH_STATUS_REFERENCE_MISSING
            # Kept again: still held while "a" is in the view, dropped once it left it.
            assert (await push(prepare_vector(x[3], "float32-huffman", keep_reference=True), 3)).accepted
            node.server.retain_references({"a", "b"})
            assert node.server.reference_bytes == 4 * count
            node.server.retain_references({"b", "c"})
            assert node.server.reference_bytes == 0
        # A restarted receiver holds nothing.
        async with (
            gossip_node("b", vector_length=count, rounds_per_iteration=1) as node,
            PeerClient(node.server.address) as client,
        ):
            await client.handshake(identity("a"))
            wire = prepare_vector(x[4], "float32-delta", Reference.of(3, 0, x[3]), keep_reference=True)
            ack = await client.push_vector(wire, iteration=0, round=0)
            assert ack.status == pb.PUSH_STATUS_REFERENCE_MISSING
            assert "no reference is held for 'a'" in ack.reason
            assert await node.inbox.wait_for(0, 0, {"a"}, timeout=0.2) == {}

    run(scenario)


def test_the_agents_push_to_a_receiver_that_lost_its_reference_sends_the_vector_itself() -> None:
    """The agent's push path (agent.node.pushes) against a real receiver that restarted since it
    acknowledged x0: the delta against x0 is refused for want of it, the vector itself follows at once and
    is delivered, both ends keep it as the reference, and the next push is a delta again."""
    count = 50_000
    x0 = _weights(count)
    x1, x2 = _step(x0, seed=1), _step(_step(x0, seed=1), seed=2)

    async def scenario() -> None:
        async with (
            gossip_node("b", vector_length=count, rounds_per_iteration=1) as node,
            PeerClient(node.server.address) as client,
        ):
            await client.handshake(identity("a"))
            deltas = DeltaWires()
            deltas.references.keep("b", Reference.of(0, 0, x0))  # acknowledged by b's earlier incarnation
            pushes = Pushes(
                RoundSettings(
                    rounds=1, wire_dtype="float32-delta", chunk_bytes=1 << 16, round_timeout=5.0, pace="off"
                ),
                views=SimpleNamespace(view=SimpleNamespace(epoch=0)),
                registry=SimpleNamespace(clients={"b": client}),
                positions=None,
                in_compute=asyncio.to_thread,
                deadline_seconds=lambda: 5.0,
                stop_event=asyncio.Event(),
                freezes=FreezeDetector(),
                log=structlog.get_logger(),
                deltas=deltas,
                wire_choice=None,
            )
            for iteration, x in ((1, x1), (2, x2)):
                node.inbox.expect(iteration, 0)
                prepared = deltas.prepare(x, ["b"], (iteration, 0), "float32-delta")
                assert prepared.wires["b"].wire_dtype == "float32-delta"
                before = client.bytes_sent
                assert await pushes.push("b", prepared.wires["b"], iteration, 0, Traffic(), None, prepared)
                received = await node.inbox.wait_for(iteration, 0, {"a"}, timeout=2.0)
                assert torch.equal(bits(received["a"]), bits(x))
                held = deltas.references.get("b")
                assert held is not None and (held.iteration, held.round) == (iteration, 0)
                assert node.server.reference_bytes == 4 * count
                sent = client.bytes_sent - before
                if iteration == 1:  # the refused delta, then the exponent-coded vector
                    assert sent > 1.2 * 4 * count
                else:  # against x1, which both ends now hold
                    assert sent < 0.75 * 4 * count

    run(scenario)


@pytest.mark.timeout(120)
def test_a_neighbour_that_left_the_view_leaves_no_reference_vectors_behind(tmp_path) -> None:
    """3 agents on a ring with float32-delta: node-0 holds reference vectors for both neighbours (as
    sender and receiver); once node-2 is killed and left out of the view, node-0 holds them for node-1
    only (dpgan_reference_bytes on the metrics endpoint), and trains on."""
    flags = [*EQUIVALENCE_FLAGS, "--rounds", "1", "--iterations", "100000", "--wire-dtype", "float32-delta",
             "--metrics-port", "0", "--insecure", "--checkpoint-every", "10"]  # fmt: skip
    processes, _ = start_agents(tmp_path, 3, flags)
    log = tmp_path / "node-0" / "agent.log"
    try:
        announced = wait_for_event(log, lambda e: e.get("event") == "metrics", 60)
        assert announced is not None
        mixing = wait_for_event(
            log, lambda e: e.get("event") == "iteration" and len(e["neighbours"]) == 2, 60
        )
        assert mixing is not None
        later = mixing["iteration"] + 10
        assert wait_for_event(log, lambda e: e.get("event") == "iteration" and e["iteration"] >= later, 60)
        held = value(scrape(announced["url"]), "dpgan_reference_bytes", node="node-0")
        parameters = load_checkpoint(tmp_path / "node-0" / "checkpoint.safetensors").parameters
        vector_bytes = 4 * sum(tensor.numel() for tensor in parameters.values())
        # Sent: one vector per neighbour, shared when both took this round's; received: one per neighbour.
        assert 3 * vector_bytes <= held <= 4 * vector_bytes, held
        processes[2].kill()
        left = wait_for_event(
            log,
            lambda e: (
                e.get("event") == "membership view"
                and e["iteration"] > later
                and e["members"] == ["node-0", "node-1"]
            ),
            60,
        )
        assert left is not None
        reached = left["iteration"] + 20
        assert wait_for_event(log, lambda e: e.get("event") == "iteration" and e["iteration"] >= reached, 60)
        assert value(scrape(announced["url"]), "dpgan_reference_bytes", node="node-0") == 2 * vector_bytes
    finally:
        for process in processes[:2]:
            process.terminate()
        wait_all(processes, timeout=30)
