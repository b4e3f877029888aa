"""Paced pushes: neighbours announce the round they enter, and a vector goes out only once the receiver
is in that round (agent/transport/positions.py, the Announce RPC, PeerAgent._push)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch

from agent.checkpoint import load_checkpoint
from agent.cli import main
from agent.transport.client import PeerClient
from agent.transport.identity import PeerIdentity
from agent.transport.inbox import Inbox
from agent.transport.positions import PeerPositions
from agent.transport.server import GossipServer
from tests.agents import EQUIVALENCE_FLAGS, start_agents, wait_all

pytestmark = pytest.mark.timeout(180)


def test_positions_move_forward_and_wake_waiters() -> None:
    async def scenario() -> None:
        positions = PeerPositions()
        assert positions.position("b") is None
        assert not await positions.wait_reached("b", (0, 0), timeout=0.01)
        waiter = asyncio.ensure_future(positions.wait_reached("b", (3, 1), timeout=5.0))
        await positions.announce("b", 3, 0)
        await asyncio.sleep(0.01)
        assert not waiter.done()  # (3, 0) is before (3, 1)
        await positions.announce("b", 4, 0)
        assert await asyncio.wait_for(waiter, 1.0)
        await positions.announce("b", 2, 1)  # overtaken on the wire: positions never move back
        assert positions.position("b") == (4, 0)
        assert positions.reached("b", (4, 0)) and not positions.reached("b", (4, 1))
        assert not positions.reached("c", (0, 0))

    asyncio.run(scenario())


def _identity(node_id: str) -> PeerIdentity:
    return PeerIdentity(
        node_id=node_id,
        advertise_address=f"{node_id}:1",
        schema_hash="s",
        config_hash="c",
        config_json="{}",
    )


def test_announce_needs_a_handshake_and_updates_positions() -> None:
    async def scenario() -> None:
        positions = PeerPositions()
        server = GossipServer(
            identity=_identity("b"), inbox=Inbox(rounds_per_iteration=1), vector_length=4, positions=positions
        )
        await server.start()
        try:
            async with PeerClient(server.address) as client:
                with pytest.raises(RuntimeError, match="before a successful handshake"):
                    await client.announce(iteration=0, round=0)
                await client.handshake(_identity("a"))
                server.forget_peer("a")
                refused = await client.announce(iteration=1, round=0)
                assert not refused.accepted and "handshake before announcing" in refused.reason
                assert positions.position("a") is None
                await client.handshake(_identity("a"))
                ack = await client.announce(iteration=5, round=0, timeout=5.0)
                assert ack.accepted
                assert positions.position("a") == (5, 0)
        finally:
            await server.stop(0)

    asyncio.run(scenario())


@pytest.mark.slow
def test_paced_agents_on_the_one_peer_graph_reproduce_the_simulator(tmp_path: Path) -> None:
    """Four agents, one-peer exponential graph, paced: the same bits as the simulator, and no vector
    ever reached a receiver before the receiver was in that round."""
    flags = [*EQUIVALENCE_FLAGS, "--topology", "one_peer_exponential", "--rounds", "1"]
    processes, _ = start_agents(tmp_path / "agents", 4, [*flags, "--pace", "on"])
    assert main(["simulate", *flags, "--nodes", "4", "--out", str(tmp_path / "sim")]) == 0
    assert wait_all(processes, timeout=150) == [0, 0, 0, 0]
    for i in range(4):
        folder = tmp_path / "agents" / f"node-{i}"
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["paced_pushes"] is True
        received = summary["pushes_received"]
        assert received.get("accepted", 0) == 50  # one partner per iteration, 50 iterations
        assert received.get("buffered_ahead", 0) == 0, received
        agent = load_checkpoint(folder / "final.safetensors")
        simulated = load_checkpoint(tmp_path / "sim" / f"node-{i}" / "final.safetensors")
        for name, tensor in simulated.parameters.items():
            assert torch.equal(tensor, agent.parameters[name]), name
        assert torch.equal(agent.rng_state, simulated.rng_state)
