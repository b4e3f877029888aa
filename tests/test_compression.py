"""Compressed gossip (CHOCO per edge): compressors, wire layouts, copies under lost messages, simulator."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from agent.core.algorithms import Hyper
from agent.core.choco import EdgeCopies, choco_round, consensus_step
from agent.core.compression import (
    CompressionError,
    Compressor,
    compress,
    compress_with_dense,
    decompress,
    randk_indices,
)
from agent.core.config import ConfigError, build_config
from agent.core.engine import CompressedGossip, VirtualCluster, gossip
from agent.core.topology import make_schedule
from agent.transport import codecs
from agent.transport._generated.dpgan.v1 import dpgan_pb2 as pb
from agent.transport.frames import (
    ExpectedVector,
    WireError,
    WireErrorKind,
    decode_vector,
    iter_chunks,
    payload_crc32,
    prepare_edge_message,
    prepare_vector,
)

pytestmark = pytest.mark.timeout(60)

KINDS = ("int8", "topk", "randk")


def relative_error(kind: str, vector: torch.Tensor, ratio: float = 0.01) -> float:
    restored = decompress(compress(vector, Compressor(kind, ratio), seed=3))
    return float(((restored - vector) ** 2).sum() / (vector**2).sum())


@pytest.mark.parametrize("kind", KINDS)
def test_compressors_are_contractive_and_deterministic(kind: str) -> None:
    vector = torch.randn(50_001, generator=torch.Generator().manual_seed(0))
    error = relative_error(kind, vector)
    assert error < 1.0  # ‖Q(v) − v‖² ≤ (1 − δ)‖v‖² with δ > 0 (Koloskova et al. 2019, Assumption 1)
    again = decompress(compress(vector, Compressor(kind), seed=3))
    assert torch.equal(decompress(compress(vector, Compressor(kind), seed=3)), again)


def test_int8_error_is_half_a_step_of_its_block_scale() -> None:
    vector = torch.randn(1000, generator=torch.Generator().manual_seed(1)) * 5
    message = compress(vector, Compressor("int8", block=100))
    restored = decompress(message)
    assert message.values.dtype == torch.int8 and message.scales is not None and message.scales.numel() == 10
    step = message.scales.repeat_interleave(100)
    assert bool(((restored - vector).abs() <= step / 2 + 1e-6).all())
    assert relative_error("int8", vector) < 1e-4


def test_topk_keeps_the_largest_entries_and_randk_follows_its_seed() -> None:
    vector = torch.arange(1000, dtype=torch.float32) * torch.tensor([1.0, -1.0]).repeat(500)
    top = decompress(compress(vector, Compressor("topk", 0.01)))
    assert torch.equal(top.nonzero().flatten(), torch.arange(990, 1000))
    assert torch.equal(top[990:], vector[990:])
    first = compress(vector, Compressor("randk", 0.05), seed=11)
    assert torch.equal(randk_indices(1000, 50, 11), randk_indices(1000, 50, 11))
    assert not torch.equal(randk_indices(1000, 50, 11), randk_indices(1000, 50, 12))
    dense = decompress(first)
    assert torch.equal(dense.nonzero().flatten(), randk_indices(1000, 50, 11))


def test_compressor_settings_are_checked() -> None:
    with pytest.raises(CompressionError, match="unknown compression 'gzip'"):
        Compressor("gzip")
    with pytest.raises(CompressionError, match="compression_ratio must be in"):
        Compressor("topk", ratio=0.0)
    assert Compressor("topk", 0.01).kept(10) == 1 and Compressor("topk", 1.0).kept(10) == 10
    assert Compressor("int8").payload_bytes(1000) == 1000 + 4 * 4


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"compression": "zip"}, "compression: 'zip' is not one of none, int8, topk, randk"),
        ({"compression": "topk", "compression_ratio": 1.5}, "compression_ratio: must be in (0, 1]"),
        ({"compression": "int8", "consensus_step": 0}, "consensus_step: must be in (0, 1]"),
        ({"compression": "int8", "wire_dtype": "bfloat16"}, "wire_dtype: compression 'int8'"),
        ({"compression": "int8", "algorithm": "cposg"}, "cposg averages gradients"),
        (
            {"compression": "int8", "compression_ratio": 0.1},
            "compression_ratio: applies only to compression topk",
        ),
        (
            {"consensus_step": 0.5},
            "consensus_step: applies only with compression int8, topk or randk, not none",
        ),
    ],
)
def test_configuration_errors_name_the_key(values: dict, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        build_config(values)
    assert message in str(error.value)


def test_compression_none_keeps_the_configuration_hash_of_earlier_versions() -> None:
    plain = build_config({})
    assert "compression" not in plain.cluster_dict()
    compressed = build_config({"compression": "topk"})
    assert compressed.cluster_dict()["compression"] == "topk"
    assert compressed.config_hash() != plain.config_hash()
    assert compressed.effective_run_id() != plain.effective_run_id()


# ---- the wire ---------------------------------------------------------------------------------------


def roundtrip(wire, length: int):
    chunks = iter_chunks(wire, sender_id="a", iteration=1, round=0, chunk_bytes=65536)
    return decode_vector(chunks, ExpectedVector(element_count=length))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("length", [1, 255, 100_003])
def test_messages_cross_the_wire_bit_for_bit(kind: str, length: int) -> None:
    copies = EdgeCopies(Compressor(kind, 0.01))
    x = torch.randn(length, generator=torch.Generator().manual_seed(length))
    reset = copies.outgoing("b", x, seed=5)
    difference = copies.outgoing("b", x * 1.5 + 0.1, seed=5)
    for message in (reset, difference):
        wire = prepare_edge_message(message)
        decoded = roundtrip(wire, length)
        assert torch.equal(decoded.vector, message.dense)
        assert decoded.edge is not None and decoded.edge.reset == message.reset
        assert decoded.edge.base == message.base and decoded.edge.seen == message.seen
    assert prepare_edge_message(difference).payload_bytes == Compressor(kind, 0.01).payload_bytes(length)


def edge_wire(kind: str, length: int = 1000, **edge: object):
    copies = EdgeCopies(Compressor(kind, 0.01))
    copies.outgoing("b", torch.zeros(length))
    wire = prepare_edge_message(
        copies.outgoing("b", torch.randn(length, generator=torch.Generator().manual_seed(2)))
    )
    header = pb.EdgeCopy()
    header.CopyFrom(wire.edge)
    for key, value in edge.items():
        setattr(header, key, value)
    return wire, header


def tampered(wire, header=None, payload: bytes | None = None):
    data = memoryview(payload) if payload is not None else wire.payload
    return dataclasses.replace(
        wire, payload=data, checksum=payload_crc32(data), edge=header if header is not None else wire.edge
    )


def refused(wire, length: int = 1000) -> WireError:
    with pytest.raises(WireError) as error:
        roundtrip(wire, length)
    return error.value


def test_malformed_compressed_pushes_are_refused_naming_the_problem() -> None:
    wire, header = edge_wire("topk", kept=5)
    assert "extra data" in str(refused(tampered(wire, header)))  # the payload no longer fits the header
    wire, header = edge_wire("topk", kept=5000)
    assert "compressed topk header: topk keeps 5000 entries of a 1000-element vector" in str(
        refused(tampered(wire, header))
    )
    wire, _ = edge_wire("topk")
    raw = bytearray(wire.payload)
    raw[36:40] = (5000).to_bytes(4, "little")  # last of 10 indices: 5000 of a 1000-element vector
    assert "index outside" in str(refused(tampered(wire, payload=bytes(raw))))
    raw = bytearray(wire.payload)
    raw[4:8] = raw[0:4]  # two equal indices
    assert "strictly ascending" in str(refused(tampered(wire, payload=bytes(raw))))
    wire, _ = edge_wire("int8")
    raw = bytearray(wire.payload)
    raw[0:4] = bytes.fromhex("0000c07f")  # a NaN scale
    error = refused(tampered(wire, payload=bytes(raw)))
    assert error.kind is WireErrorKind.COMPRESSION and "NaN or inf" in str(error)
    raw = bytearray(wire.payload)
    raw[0:4] = bytes.fromhex("000080bf")  # scale -1.0: a scale is max|v| / 127
    assert "must not be negative" in str(refused(tampered(wire, payload=bytes(raw))))
    raw = bytearray(wire.payload)
    raw[-1] = 0x80  # int8 -128 is never produced
    assert "[-127, 127]" in str(refused(tampered(wire, payload=bytes(raw))))
    wire, header = edge_wire("randk", reset=True)
    assert "reset carries the vector itself" in str(refused(tampered(wire, header)))
    assert "must be a reset" in str(refused(tampered(prepare_vector(torch.ones(1000), "bfloat16"), header)))
    wire, _ = edge_wire("int8")
    assert "without an edge header" in str(refused(dataclasses.replace(wire, edge=None)))


# ---- CHOCO ------------------------------------------------------------------------------------------


def consensus_distance(states: list[torch.Tensor]) -> float:
    stacked = torch.stack(states).double()
    return float(((stacked - stacked.mean(0)) ** 2).sum(1).mean())


@pytest.mark.parametrize("topology", ["ring", "one_peer_exponential"])
@pytest.mark.parametrize(
    ("kind", "gamma", "rounds"), [("int8", 1.0, 60), ("topk", 0.04, 600), ("randk", 0.01, 600)]
)
def test_compressed_gossip_keeps_the_average_and_reaches_consensus(
    topology: str, kind: str, gamma: float, rounds: int
) -> None:
    n, d = 8, 2000
    schedule = make_schedule(topology, n)
    generator = torch.Generator().manual_seed(0)
    states = [torch.randn(d, generator=generator) for _ in range(n)]
    average = torch.stack(states).double().mean(0)
    # random-k at 1 % barely moves pure consensus in 600 rounds (each edge every 3rd round on one-peer)
    copies = [EdgeCopies(Compressor(kind, 0.1 if kind == "randk" else 0.01)) for _ in range(n)]
    start = consensus_distance(states)
    for r in range(rounds):
        states = choco_round(
            states, [schedule.row(i, r) for i in range(n)], copies, gamma, [r * n + i for i in range(n)]
        )
    assert float((torch.stack(states).double().mean(0) - average).abs().max()) < 1e-4
    # int8 is nearly exact; a few % of the entries per round, with CHOCO's small steps, converge slowly
    assert consensus_distance(states) < start * {"int8": 1e-6, "topk": 0.05, "randk": 0.1}[kind]


def test_exact_compression_with_unit_step_is_plain_gossip() -> None:
    n, d = 6, 500
    schedule = make_schedule("ring", n)
    states = list(torch.randn(n, d, generator=torch.Generator().manual_seed(4)).unbind(0))
    copies = [EdgeCopies(Compressor("topk", 1.0)) for _ in range(n)]
    plain = torch.stack(states)
    for r in range(5):
        states = choco_round(states, [schedule.row(i, r) for i in range(n)], copies, 1.0, [0] * n)
        plain = gossip(plain, lambda k: [schedule.row(i, k) for i in range(n)], r, 1)
    assert torch.allclose(torch.stack(states), plain, atol=1e-5)


def test_a_lost_message_resets_the_edge_and_copies_agree_again() -> None:
    """Two nodes exchanging every round; one message is lost. Neither end ever mixes with a wrong copy,
    and within two rounds the edge is consistent (copies equal at both ends) and mixed again."""
    a, b = EdgeCopies(Compressor("topk", 0.05)), EdgeCopies(Compressor("topk", 0.05))
    generator = torch.Generator().manual_seed(5)
    xa, xb = torch.randn(400, generator=generator), torch.randn(400, generator=generator)
    used = []
    for r in range(8):
        to_b, to_a = a.outgoing("b", xa), b.outgoing("a", xb)
        lost = r == 3  # b never receives a's message of round 3 (a's push was accepted, then lost)
        use_a = a.incoming("b", to_b, to_a)
        use_b = False if lost else b.incoming("a", to_a, to_b)
        used.append((use_a, use_b))
        if use_a and use_b:
            assert torch.equal(a.sent["b"].vector, b.received["a"].vector)
            assert torch.equal(b.sent["a"].vector, a.received["b"].vector)
        xa, xb = (
            xa + 0.01 * torch.randn(400, generator=generator),
            xb + 0.01 * torch.randn(400, generator=generator),
        )
    assert used[:3] == [(True, True)] * 3
    assert used[3] == (True, False)  # a mixed (its copies were consistent), b had nothing
    assert (True, True) not in used[4:5]  # the next round detects the gap: both skip, a will reset
    assert used[-1] == (True, True)
    assert all(u in [(True, True), (False, False), (True, False)] for u in used)


def test_refused_push_resets_at_once() -> None:
    a, b = EdgeCopies(Compressor("int8")), EdgeCopies(Compressor("int8"))
    x = torch.randn(100)
    b.incoming("a", b.outgoing("a", x), a.outgoing("b", x))
    message = a.outgoing("b", x + 1)
    assert not message.reset
    a.drop_sent("b")  # the push was refused
    assert a.outgoing("b", x + 2).reset


def test_consensus_step_sums_in_node_order_with_rounded_weights() -> None:
    x = torch.tensor([1.0, 2.0])
    terms = [(3, 0.25, torch.tensor([1.0, 1.0])), (1, 0.5, torch.tensor([2.0, -2.0]))]
    expected = x + torch.tensor([2.0, -2.0]) * 0.25 + torch.tensor([1.0, 1.0]) * 0.125
    assert torch.equal(consensus_step(x, 0.5, terms), expected)
    assert consensus_step(x, 0.5, []) is not x and torch.equal(consensus_step(x, 0.5, []), x)


def test_the_simulator_trains_with_each_compressor() -> None:
    """A 4-node quadratic game: compressed DPOSG reaches the same solution as exact DPOSG."""
    n, d = 4, 64
    targets = torch.randn(n, d, generator=torch.Generator().manual_seed(6))
    operators = [lambda z, t=t: z - t for t in targets]  # gradient of ‖z − t‖²/2: the average is the optimum
    schedule = make_schedule("ring", n)

    def run(compression: CompressedGossip | None) -> torch.Tensor:
        cluster = VirtualCluster(
            "dposg", torch.zeros(d), operators, lambda k: [schedule.row(i, k) for i in range(n)], 1,
            Hyper(lr=0.05), compression=compression,
        )  # fmt: skip
        for _ in range(400):
            cluster.step()
        return cluster.average()

    exact = run(None)
    assert torch.allclose(exact, targets.mean(0), atol=1e-3)
    for kind, gamma in [("int8", 1.0), ("topk", 0.04), ("randk", 0.01)]:
        compressed = run(CompressedGossip(Compressor(kind, 0.1), gamma))
        assert torch.allclose(compressed, targets.mean(0), atol=2e-2), kind
    with pytest.raises(ValueError, match="consensus_step"):
        CompressedGossip(Compressor("int8"), 0.0)
    assert math.isfinite(float(exact.sum()))


def test_a_receiver_refuses_gossip_of_another_kind() -> None:
    """An agent passes its run's kind of gossip to the server (ExpectedVector.gossip): another compressor,
    another ratio or block, a plain vector in a compressed run and a compressed one in a plain run are
    refused as malformed, naming the difference; a float32 reset is of every compressed kind."""
    length = 1000
    int8_run = codecs.GossipKind(Compressor("int8"))
    topk_run = codecs.GossipKind(Compressor("topk", 0.01))
    plain_run = codecs.GossipKind(None)

    def decode(wire, gossip):
        chunks = iter_chunks(wire, sender_id="a", iteration=1, round=0, chunk_bytes=65536)
        return decode_vector(chunks, ExpectedVector(element_count=length, gossip=gossip))

    def refusal(wire, gossip) -> str:
        with pytest.raises(WireError) as error:
            decode(wire, gossip)
        assert error.value.kind is WireErrorKind.COMPRESSION
        return str(error.value)

    randk, _ = edge_wire("randk", length)
    int8, _ = edge_wire("int8", length)
    topk, _ = edge_wire("topk", length)
    reset = prepare_edge_message(EdgeCopies(Compressor("int8")).outgoing("b", torch.ones(length)))
    plain = prepare_vector(torch.ones(length))
    assert "gossips int8-compressed differences, not randk" in refusal(randk, int8_run)
    assert "gossips int8-compressed differences, not plain vectors" in refusal(plain, int8_run)
    assert "gossips plain vectors" in refusal(int8, plain_run)
    assert "gossips plain vectors" in refusal(reset, plain_run)
    assert "compression_ratio 0.05 keeps 50 of 1000" in refusal(
        topk, codecs.GossipKind(Compressor("topk", 0.05))
    )
    assert "int8 block 256 differs from this run's 128" in refusal(
        int8, codecs.GossipKind(Compressor("int8", block=128))
    )
    assert decode(int8, int8_run).edge is not None and decode(topk, topk_run).edge is not None
    assert decode(reset, topk_run).edge.reset and decode(plain, plain_run).edge is None


@pytest.mark.parametrize("kind", ["int8", "topk", "randk"])
@pytest.mark.parametrize("length", [1, 255, 256, 257, 1000, 100_003])
def test_compress_with_dense_is_compress_then_decompress_bit_for_bit(kind: str, length: int) -> None:
    """The sender's one-pass form (no padded copy, the dense difference from the float levels) equals
    the two calls exactly, for whole and partial int8 blocks, an all-zero block and tiny magnitudes."""
    generator = torch.Generator().manual_seed(length)
    vector = torch.randn(length, generator=generator) * 1e-3
    vector[: min(length, 256)] = 0.0  # an all-zero block: scale 0, levels 0
    if length > 300:
        vector[300] = 5.0  # one large entry in a block
    compressor = Compressor(kind, ratio=0.05)
    message, dense = compress_with_dense(vector, compressor, seed=3)
    again = compress(vector, compressor, seed=3)
    assert torch.equal(message.values, again.values)
    for field in ("scales", "indices"):
        ours, theirs = getattr(message, field), getattr(again, field)
        assert (ours is None) == (theirs is None)
        if ours is not None:
            assert torch.equal(ours, theirs)
    assert dense.dtype == torch.float32 and dense.shape == (length,)
    assert torch.equal(dense, decompress(message))
    if kind == "int8":
        scale = message.scales.repeat_interleave(message.block)[:length]
        assert torch.all((dense - vector).abs() <= scale * 0.5001)  # half a level, to float rounding
