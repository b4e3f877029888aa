"""Mutual TLS on the gossip transport with real certificates and real TLS handshakes (issue 10).

Each attack an outsider or a dishonest member could try is refused, with a log line that names the
reason, and leaves the honest node's inbox and state untouched: no client certificate, a certificate
of another CA, an expired one, a member claiming another member's id (handshake, push, announce,
state request), a replayed push, a node missing from the allowlist.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
import structlog
import torch

from agent.transport._generated.dpgan.v1 import dpgan_pb2 as pb
from agent.transport._generated.dpgan.v1 import dpgan_pb2_grpc as pb_grpc
from agent.transport.client import HandshakeRefused, PeerClient, PeerRpcError, PeerUnavailable
from agent.transport.frames import encode_vector
from agent.transport.identity import PeerIdentity
from agent.transport.inbox import Inbox
from agent.transport.options import channel_options
from agent.transport.server import GossipServer
from agent.transport.state import StateSnapshot
from tests.pki import Pki

pytestmark = pytest.mark.timeout(60)

VECTOR = torch.arange(1000, dtype=torch.float32)
REPO = Path(__file__).resolve().parent.parent


def run(scenario: Callable[[], Coroutine[Any, Any, None]], timeout: float = 40.0) -> None:
    asyncio.run(asyncio.wait_for(scenario(), timeout))


def identity(node_id: str, run_id: str = "run-a") -> PeerIdentity:
    return PeerIdentity(
        node_id=node_id,
        advertise_address="127.0.0.1:1",
        schema_hash="schema",
        config_hash="config",
        config_json="{}",
        run_id=run_id,
    )


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki.create(tmp_path / "pki")


@contextlib.asynccontextmanager
async def honest_node(pki: Pki, node_id: str = "node-0", **kwargs: Any) -> AsyncIterator[GossipServer]:
    state = StateSnapshot(iteration=7, round=0, tensors={"params": torch.ones(64)})
    server = GossipServer(
        identity=identity(node_id),
        inbox=Inbox(rounds_per_iteration=1),
        vector_length=VECTOR.numel(),
        state_provider=lambda: state,
        security=pki.security(node_id, **kwargs),
    )
    await server.start()
    try:
        yield server
    finally:
        await server.stop(0)


def untouched(server: GossipServer) -> None:
    assert server.handshaken_peers == {}
    assert server.bytes_received == 0
    assert server._inbox.buffered_count == 0


def test_a_member_handshakes_pushes_and_fetches_over_mutual_tls(pki: Pki) -> None:
    async def scenario() -> None:
        async with (
            honest_node(pki) as server,
            PeerClient(server.address, security=pki.security("node-1")) as client,
        ):
            response = await client.handshake(identity("node-1"))
            assert response.accepted and response.node_id == "node-0"
            ack = await client.push_vector(VECTOR, iteration=0, round=0)
            assert ack.accepted
            state = await client.fetch_state()
            assert torch.equal(state.tensors["params"], torch.ones(64))

    run(scenario)


@pytest.mark.parametrize("attacker", ["plaintext", "no client certificate", "another CA", "expired"])
def test_a_client_without_a_valid_cluster_certificate_gets_nothing_in_and_nothing_out(
    pki: Pki, tmp_path: Path, attacker: str
) -> None:
    if attacker == "another CA":
        security = Pki.create(tmp_path / "other").security("node-1")
    elif attacker == "expired":
        pki.issue("node-1", now=datetime.now(UTC) - timedelta(days=3), days=1)
        security = pki.unchecked_security("node-1")
    else:
        security = None

    async def scenario() -> None:
        async with honest_node(pki) as server:
            if attacker == "no client certificate":
                # Trusts the cluster CA, so it could verify the server, but presents no certificate.
                credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca_cert)
                options = [*channel_options(), *pki.security("node-0").channel_options()]
                channel = grpc.aio.secure_channel(server.address, credentials, options=options)
            elif attacker == "plaintext":
                channel = grpc.aio.insecure_channel(server.address, options=channel_options())
            else:
                client = PeerClient(server.address, security=security)
                with pytest.raises(PeerUnavailable, match="over mutual TLS") as caught:
                    await client.handshake(identity("node-1"), timeout=3)
                await client.close()
                assert "UNAVAILABLE" in str(caught.value)
                channel = grpc.aio.secure_channel(
                    server.address,
                    security.channel_credentials(),  # type: ignore[union-attr]
                    options=[*channel_options(), *security.channel_options()],  # type: ignore[union-attr]
                )
            async with channel:
                stub = pb_grpc.GossipStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as handshake:
                    await stub.Handshake(identity("node-1").handshake_request(), timeout=3)
                assert handshake.value.code() == grpc.StatusCode.UNAVAILABLE
                chunks = list(encode_vector(VECTOR, sender_id="node-1", iteration=0, round=0, epoch=0))
                with pytest.raises(grpc.aio.AioRpcError):
                    await stub.PushVector(iter(chunks), timeout=3)
                received = 0
                with pytest.raises(grpc.aio.AioRpcError):
                    async for chunk in stub.FetchState(pb.StateRequest(requester_id="node-1"), timeout=3):
                        received += chunk.ByteSize()
                assert received == 0
            untouched(server)

    run(scenario)


def test_a_member_cannot_speak_for_another_member(pki: Pki) -> None:
    """node-3 holds a valid certificate; it claims node-1 in a handshake, a push, an announcement and
    a state request, and each is refused with a log line naming both identities."""

    async def scenario() -> None:
        async with honest_node(pki) as server:
            with structlog.testing.capture_logs() as logs:
                async with PeerClient(server.address, security=pki.security("node-3")) as forger:
                    with pytest.raises(HandshakeRefused, match="claims node 'node-1' but the cal"):
                        await forger.handshake(identity("node-1"))
                    assert "node-1" not in server.handshaken_peers
                    # Handshaken honestly as node-3, it then pushes and fetches in node-1's name.
                    await forger.handshake(identity("node-3"))
                options = [*channel_options(), *pki.security("node-3").channel_options()]
                async with grpc.aio.secure_channel(
                    server.address, pki.security("node-3").channel_credentials(), options=options
                ) as channel:
                    stub = pb_grpc.GossipStub(channel)
                    chunks = list(encode_vector(VECTOR, sender_id="node-1", iteration=0, round=0, epoch=0))
                    ack = await stub.PushVector(iter(chunks), timeout=5)
                    assert ack.status == pb.PUSH_STATUS_FORBIDDEN and not ack.accepted
                    announced = await stub.Announce(
                        pb.RoundAnnouncement(sender_id="node-1", iteration=0, round=0), timeout=5
                    )
                    assert not announced.accepted and "certificate is for 'node-3'" in announced.reason
                    with pytest.raises(grpc.aio.AioRpcError) as fetch:
                        async for _ in stub.FetchState(pb.StateRequest(requester_id="node-1"), timeout=5):
                            pass
                    assert fetch.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert server._inbox.buffered_count == 0
            reasons = [entry.get("reason", "") for entry in logs if entry["event"] == "gossip_rejected"]
            assert len(reasons) == 4, reasons
            assert all("claims node 'node-1'" in r and "certificate is for 'node-3'" in r for r in reasons)

    run(scenario)


def test_a_replayed_push_is_refused_with_a_reason(pki: Pki) -> None:
    """The same vector bytes, sent again by their sender (a retransmission or a replay from its
    host), are refused while the position is current (duplicate) and after it (stale); sent by any
    other member they are refused as forgeries."""

    async def scenario() -> None:
        capture = list(encode_vector(VECTOR, sender_id="node-1", iteration=0, round=0, epoch=0))
        async with honest_node(pki) as server:
            inbox = server._inbox
            for node_id in ("node-1", "node-2"):
                async with PeerClient(server.address, security=pki.security(node_id)) as client:
                    await client.handshake(identity(node_id))

            async def replay(node_id: str) -> pb.PushAck:
                security = pki.security(node_id)
                options = [*channel_options(), *security.channel_options()]
                async with grpc.aio.secure_channel(
                    server.address, security.channel_credentials(), options=options
                ) as channel:
                    return await pb_grpc.GossipStub(channel).PushVector(iter(capture), timeout=5)

            with structlog.testing.capture_logs() as logs:
                assert (await replay("node-1")).accepted
                duplicate = await replay("node-1")
                assert duplicate.status == pb.PUSH_STATUS_DUPLICATE and "already received" in duplicate.reason
                messages = await inbox.wait_for_messages(0, 0, {"node-1"}, timeout=1.0)
                assert torch.equal(messages["node-1"].vector, VECTOR)
                inbox.expect(1, 0)
                stale = await replay("node-1")
                assert stale.status == pb.PUSH_STATUS_STALE
                forged = await replay("node-2")
                assert forged.status == pb.PUSH_STATUS_FORBIDDEN
            assert inbox.buffered_count == 0
            kinds = {entry["kind"] for entry in logs if entry["event"] == "gossip_rejected"}
            assert {"PUSH_STATUS_DUPLICATE", "push_forbidden"} <= kinds, kinds

    run(scenario)


def test_the_allowlist_admits_only_listed_certificates(pki: Pki) -> None:
    async def scenario() -> None:
        async with honest_node(pki, allowed_node_ids=frozenset({"node-1"})) as server:
            async with PeerClient(server.address, security=pki.security("node-1")) as member:
                assert (await member.handshake(identity("node-1"))).accepted
            async with PeerClient(server.address, security=pki.security("node-4")) as outsider:
                with pytest.raises(HandshakeRefused, match="'node-4' is not in this node's --allow-node-ids"):
                    await outsider.handshake(identity("node-4"))
            assert set(server.handshaken_peers) == {"node-1"}

    run(scenario)


def test_a_node_of_another_run_is_refused_at_the_handshake(pki: Pki) -> None:
    async def scenario() -> None:
        async with (
            honest_node(pki) as server,
            PeerClient(server.address, security=pki.security("node-1")) as client,
        ):
            with pytest.raises(HandshakeRefused, match="run_id differs: this node trains in run 'run-a'"):
                await client.handshake(identity("node-1", run_id="run-b"))
            untouched(server)

    run(scenario)


def test_health_check_cli_speaks_tls(pki: Pki) -> None:
    async def scenario() -> None:
        async with honest_node(pki) as server:
            await server.set_serving(True)
            cert, key = pki.root / "node-0.crt", pki.root / "node-0.key"
            base = [sys.executable, "-m", "agent.node.healthcheck", "--address", server.address]
            tls = ["--tls-cert", str(cert), "--tls-key", str(key), "--tls-ca", str(pki.ca_path)]
            ok, plain = await asyncio.gather(
                asyncio.to_thread(subprocess.run, [*base, *tls], capture_output=True, text=True, timeout=30),
                asyncio.to_thread(
                    subprocess.run, [*base, "--timeout", "2"], capture_output=True, text=True, timeout=30
                ),
            )
            assert ok.returncode == 0, ok.stdout + ok.stderr
            assert "SERVING" in ok.stdout
            assert plain.returncode == 1

    run(scenario)


def test_refused_state_request_sends_zero_bytes(pki: Pki) -> None:
    """A member that never handshook gets nothing, over TLS too (the handshake gate still applies)."""

    async def scenario() -> None:
        async with (
            honest_node(pki) as server,
            PeerClient(server.address, security=pki.security("node-5")) as client,
        ):
            client._identity = identity("node-5")
            with pytest.raises(PeerRpcError, match="has not completed a handshake"):
                await client.fetch_state()
            assert client.bytes_received == 0

    run(scenario)


def test_a_refused_impersonation_does_not_evict_the_real_member(pki: Pki) -> None:
    """node-3's refused claim to be node-1 leaves node-1's acceptance alone: node-1's pushes keep being
    mixed (found by a breaker: one refused handshake used to evict the real node until its next probe)."""

    async def scenario() -> None:
        async with (
            honest_node(pki) as server,
            PeerClient(server.address, security=pki.security("node-1")) as member,
            PeerClient(server.address, security=pki.security("node-3")) as forger,
        ):
            await member.handshake(identity("node-1"))
            with structlog.testing.capture_logs() as logs:
                for _ in range(5):
                    with pytest.raises(HandshakeRefused):
                        await forger.handshake(identity("node-1"))
            assert "node-1" in server.handshaken_peers
            assert (await member.push_vector(VECTOR, iteration=0, round=0)).accepted
            refused = [e for e in logs if e["event"] == "gossip_rejected"]
            assert [e["peer"] for e in refused] == ["node-3"]  # the caller, not the claimed id

    run(scenario)
