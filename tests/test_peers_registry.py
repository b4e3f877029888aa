"""PeerRegistry: one peer per node id and incarnation, restarts, and backoff for candidates that never
answer. Real gRPC servers on loopback (port 0) answer handshakes as whatever node the test says; the
discovery side is a fake CandidateSource."""

from __future__ import annotations

import asyncio
import http.server
import random
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import grpc
import pytest

from agent.discovery import SOURCE_DNS, SOURCE_MDNS, SOURCE_STATIC, Candidate
from agent.node.peers import PeerRegistry, failure_reason
from agent.transport._generated.dpgan.v1 import dpgan_pb2 as pb
from agent.transport.identity import PeerIdentity
from tests.agents import CountingListener

pytestmark = pytest.mark.timeout(60)

GOSSIP = pb.DESCRIPTOR.services_by_name["Gossip"].full_name


def identity(node_id: str, instance: str = "i-self", advertise: str = "127.0.0.1:1") -> PeerIdentity:
    return PeerIdentity(
        node_id=node_id,
        advertise_address=advertise,
        schema_hash="schema",
        config_hash="config",
        config_json="{}",
        instance_id=instance,
    )


def ready(iteration: int) -> pb.PeerStatus:
    return pb.PeerStatus(ready=True, ready_from_iteration=iteration, view_period=10)


NOT_READY = pb.PeerStatus(ready=False, view_period=10)


class Log:
    """A structlog-like logger that keeps (level, event, fields)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def bind(self, **_: Any) -> Log:
        return self

    def __getattr__(self, level: str) -> Callable[..., None]:
        if level not in ("debug", "info", "warning", "error"):
            raise AttributeError(level)
        return lambda event, **fields: self.lines.append((level, event, fields))

    def events(self, event: str) -> list[dict[str, Any]]:
        return [fields for _, name, fields in self.lines if name == event]

    def naming(self, text: str) -> list[tuple[str, str, dict[str, Any]]]:
        return [line for line in self.lines if any(text in str(value) for value in line[2].values())]


class Source:
    """A fake CandidateSource: whatever the test lists; records what the registry tells it."""

    def __init__(self, *candidates: Candidate) -> None:
        self.listed = list(candidates)
        self.confirmed: dict[str, str] = {}
        self.aliased: dict[str, str] = {}
        self.forgotten: list[str] = []

    def candidates(self) -> list[Candidate]:
        return list(self.listed)

    def confirm(self, address: str, node_id: str) -> None:
        self.confirmed[address] = node_id

    def alias(self, address: str, node_id: str) -> None:
        self.aliased[address] = node_id

    def forget(self, node_id: str) -> None:
        self.forgotten.append(node_id)


class Peer:
    """A gRPC server that answers Handshake as ``node_id``/``instance`` (both changeable at run time)
    and counts handshakes per client address family."""

    def __init__(self, node_id: str, instance: str, status: pb.PeerStatus | None = None) -> None:
        self.node_id = node_id
        self.instance = instance
        self.status = status or ready(0)
        self.refuse: str | None = None
        self.calls: list[str] = []  # context.peer() of each handshake
        self.server: grpc.aio.Server | None = None
        self.port = 0

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> Peer:
        server = grpc.aio.server()
        handler = grpc.unary_unary_rpc_method_handler(
            self._handshake,
            request_deserializer=pb.HandshakeRequest.FromString,
            response_serializer=pb.HandshakeResponse.SerializeToString,
        )
        methods = grpc.method_handlers_generic_handler(GOSSIP, {"Handshake": handler})
        server.add_generic_rpc_handlers((methods,))
        self.port = server.add_insecure_port(f"{host}:{port}")
        await server.start()
        self.server = server
        return self

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(0)
            self.server = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _handshake(self, request: pb.HandshakeRequest, context: Any) -> pb.HandshakeResponse:
        self.calls.append(context.peer())
        me = identity(self.node_id, self.instance, self.address)
        return me.handshake_response(
            accepted=self.refuse is None, reason=self.refuse or "", status=self.status
        )


def run(coroutine: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coroutine)


def registry(source: Source, log: Log, **options: Any) -> PeerRegistry:
    options.setdefault("rng", random.Random(7))
    return PeerRegistry(identity("a"), source, lambda: NOT_READY, log, **options)


def inbound(node_id: str, instance: str, advertise: str, status: pb.PeerStatus) -> pb.HandshakeRequest:
    return identity(node_id, instance, advertise).handshake_request(status)


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


# ---- one peer per node id and incarnation ----------------------------------------------------------


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback here")
def test_two_addresses_of_one_live_peer_are_one_peer_with_an_alias() -> None:
    """A name resolving to 127.0.0.1 and ::1: the second address is the same peer, never refused."""

    async def scenario() -> None:
        peer = await Peer("b", "i-b1").start(host="[::]")  # dual-stack: both loopbacks reach it
        v4, v6 = f"127.0.0.1:{peer.port}", f"[::1]:{peer.port}"
        log, source = Log(), Source(Candidate(v4, SOURCE_DNS), Candidate(v6, SOURCE_DNS))
        peers = registry(source, log)
        try:
            await peers.refresh()
            assert peers.alive() == ["b"]
            # Both were dialled at once: whichever answered first is used, the other is the alias.
            used = peers.clients["b"].address
            alias, family = (v6, "ipv6") if used == v4 else (v4, "ipv4")
            assert used in (v4, v6) and peers.records["b"].address == used
            assert peers.aliases == {alias: "b"} and source.aliased == {alias: "b"}
            assert peers.refusals == {}
            for _ in range(6):  # ~1.5 s of refreshes: the alias is not dialled again
                await asyncio.sleep(0.25)
                await peers.refresh()
            assert sum(1 for call in peer.calls if call.startswith(family)) == 1
            assert len(peer.calls) >= 3  # the used address is probed
            # The peer dials us advertising yet another address of itself: accepted, not refused.
            assert peers.on_inbound_handshake(inbound("b", "i-b1", "hostb:7000", ready(0))) == (True, "")
            assert peers.records["b"].address == used and peers.aliases["hostb:7000"] == "b"
            assert peers.alive() == ["b"] and not log.events("peer refused")
        finally:
            await peers.stop()
            await peer.stop()

    run(scenario())


def test_an_inbound_peer_advertising_another_address_than_the_one_dialled_is_accepted() -> None:
    """The bug behind 'node id already in use by a live peer': dialled IP vs advertised name."""

    async def scenario() -> None:
        peer = await Peer("b", "i-b1").start()
        log, source = Log(), Source(Candidate(peer.address, SOURCE_STATIC))
        peers = registry(source, log)
        try:
            await peers.refresh()
            verdict = peers.on_inbound_handshake(inbound("b", "i-b1", f"localhost:{peer.port}", ready(0)))
            assert verdict == (True, "")
            assert peers.alive() == ["b"] and peers.clients["b"].address == peer.address
        finally:
            await peers.stop()
            await peer.stop()

    run(scenario())


def test_a_restart_replaces_the_old_incarnation_at_once_inbound() -> None:
    async def scenario() -> None:
        peer = await Peer("b", "i-b1", ready(10)).start()
        log, source = Log(), Source(Candidate(peer.address, SOURCE_STATIC))
        peers = registry(source, log)
        try:
            await peers.refresh()
            old = peers.clients["b"]
            assert peers.records["b"].ready_from == 10 and peers.instances["b"] == "i-b1"
            # The process restarts (new instance id) and dials us before it is ready: not sticky-ready.
            peer.instance, peer.status = "i-b2", NOT_READY
            assert peers.on_inbound_handshake(inbound("b", "i-b2", peer.address, NOT_READY)) == (True, "")
            assert peers.instances["b"] == "i-b2"
            assert peers.records["b"].ready_from is None and peers.records["b"].alive
            assert peers.clients.get("b") is not old
            await asyncio.sleep(0.2)  # the dial-back
            assert peers.alive() == ["b"] and peers.clients["b"] is not old
            assert len(log.events("peer restarted")) == 1
            # More handshakes of the new incarnation change nothing.
            peers.on_inbound_handshake(inbound("b", "i-b2", peer.address, NOT_READY))
            await peers.refresh()
            assert len(log.events("peer restarted")) == 1
        finally:
            await peers.stop()
            await peer.stop()

    run(scenario())


def test_a_restart_seen_by_a_probe_replaces_the_record() -> None:
    async def scenario() -> None:
        peer = await Peer("b", "i-b1", ready(10)).start()
        log, source = Log(), Source(Candidate(peer.address, SOURCE_MDNS, node_id="b"))
        peers = registry(source, log, probe_interval=0.05)
        try:
            await peers.refresh()
            assert peers.records["b"].ready_from == 10
            peer.instance, peer.status = "i-b2", NOT_READY
            await asyncio.sleep(0.06)
            await peers.refresh()
            assert peers.instances["b"] == "i-b2" and peers.records["b"].ready_from is None
            assert peers.alive() == ["b"]
            assert [e["previous"] for e in log.events("peer restarted")] == ["i-b1"]
        finally:
            await peers.stop()
            await peer.stop()

    run(scenario())


def test_two_live_processes_with_one_node_id_do_not_flap() -> None:
    async def scenario() -> None:
        first, second = await Peer("b", "i-1").start(), await Peer("b", "i-2").start()
        log = Log()
        source = Source(Candidate(first.address, SOURCE_STATIC), Candidate(second.address, SOURCE_STATIC))
        peers = registry(source, log, probe_interval=0.05)
        try:
            for _ in range(20):
                await peers.refresh()
                await asyncio.sleep(0.05)
            assert len(log.events("peer restarted")) <= 1
            refused = [r for r in peers.refusals.values() if "two live processes" in r]
            assert refused, peers.refusals
            assert len(log.naming("two live processes")) == 1
            assert peers.alive() == ["b"]
        finally:
            await peers.stop()
            await first.stop()
            await second.stop()

    run(scenario())


def test_ready_from_within_one_incarnation() -> None:
    """A later boundary is taken; a not-ready status from a live, ready peer is ignored."""

    async def scenario() -> None:
        peers = registry(Source(), Log(), backoff_initial=60.0)  # the dial-backs go nowhere
        address = f"127.0.0.1:{closed_port()}"
        try:
            assert peers.on_inbound_handshake(inbound("b", "i-1", address, ready(10)))[0]
            assert peers.records["b"].ready_from == 10
            peers.on_inbound_handshake(inbound("b", "i-1", address, NOT_READY))
            assert peers.records["b"].ready_from == 10  # a status sent before it started: still ready
            peers.on_inbound_handshake(inbound("b", "i-1", address, ready(40)))
            assert peers.records["b"].ready_from == 40  # out of step, re-joins at a later boundary
            peers.mark_dead("b", "test")
            peers.on_inbound_handshake(inbound("b", "i-1", address, NOT_READY))
            assert peers.records["b"].ready_from is None  # came back after being dead: starts over
        finally:
            await peers.stop()

    run(scenario())


def test_a_refused_probe_never_leaves_a_client_without_a_handshake() -> None:
    async def scenario() -> None:
        peer = await Peer("b", "i-b1").start()
        log, source = Log(), Source(Candidate(peer.address, SOURCE_STATIC))
        peers = registry(source, log, probe_interval=0.05)
        try:
            await peers.refresh()
            client = peers.clients["b"]
            peer.refuse = "view_period differs: this node: 10, peer: 20"
            await asyncio.sleep(0.06)
            await peers.refresh()
            assert "b" not in peers.clients and peers.alive() == []
            assert not peers.records["b"].alive and client.remote is None
            assert all(c.remote is not None for c in peers.clients.values())
            assert len(log.naming("view_period differs")) == 1
            peer.refuse = None
            await asyncio.sleep(0.15)
            await peers.refresh()
            assert peers.alive() == ["b"] and peers.clients["b"].remote is not None
        finally:
            await peers.stop()
            await peer.stop()

    run(scenario())


# ---- candidates that never answer --------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class CountingHttp(http.server.ThreadingHTTPServer):
    connections = 0

    def get_request(self) -> tuple[socket.socket, Any]:
        CountingHttp.connections += 1
        return super().get_request()


class QuietHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def never_answering() -> Iterator[dict[str, Any]]:
    tcp = CountingListener()
    web = CountingHttp(("127.0.0.1", 0), QuietHandler)
    CountingHttp.connections = 0
    thread = threading.Thread(target=web.serve_forever, daemon=True)
    thread.start()
    yield {"closed": closed_port(), "tcp": tcp, "http": web}
    web.shutdown()
    web.server_close()
    tcp.close()


def test_candidates_that_never_answer_back_off_and_are_named_once(never_answering: dict[str, Any]) -> None:
    """_dpgan._tcp-like candidates with no dpgan behind them: a closed port, a TCP server that accepts
    and closes, an HTTP/1 server and a gRPC server without the dpgan service."""
    tcp, web = never_answering["tcp"], never_answering["http"]

    async def scenario() -> dict[str, Any]:
        other = grpc.aio.server()
        other_port = other.add_insecure_port("127.0.0.1:0")
        await other.start()
        addresses = {
            "closed": f"127.0.0.1:{never_answering['closed']}",
            "tcp": f"127.0.0.1:{tcp.port}",
            "http": f"127.0.0.1:{web.server_address[1]}",
            "grpc": f"127.0.0.1:{other_port}",
        }
        log = Log()
        source = Source(*(Candidate(a, SOURCE_MDNS, node_id=f"ghost-{k}") for k, a in addresses.items()))
        peers = registry(source, log)
        peers.start()
        await asyncio.sleep(8.0)
        await peers.stop()
        await other.stop(0)
        return {"log": log, "peers": peers, "addresses": addresses}

    outcome = run(scenario())
    log, peers, addresses = outcome["log"], outcome["peers"], outcome["addresses"]
    tries = {kind: peers._attempts[address].failures for kind, address in addresses.items()}
    # 0.25 s doubling with jitter: about 6 tries in 8 s (the loop used to try 4 times a second: ~32).
    accepts = len(tcp.accepted)
    assert accepts <= 10 and CountingHttp.connections <= 10, (accepts, CountingHttp.connections)
    assert all(4 <= count <= 9 for count in tries.values()), tries
    expected = {
        "closed": "connection refused",
        "tcp": "not a dpgan server",
        "http": "not a dpgan server",
        "grpc": "not a dpgan server (a gRPC server without the dpgan Gossip service)",
    }
    for kind, address in addresses.items():
        lines = [line for line in log.lines if line[2].get("address") == address and "reason" in line[2]]
        assert len(lines) == 1, (kind, lines)
        assert expected[kind] in lines[0][2]["reason"], (kind, lines[0])
        assert peers.failures[address] == lines[0][2]["reason"]


def test_a_candidate_is_dropped_after_the_bound_until_discovery_lists_it_again() -> None:
    async def scenario() -> None:
        address = f"127.0.0.1:{closed_port()}"
        log, source = Log(), Source(Candidate(address, SOURCE_DNS))
        fast = {"backoff_initial": 0.01, "backoff_cap": 0.02, "give_up_tries": 3}
        peers = registry(source, log, **fast)

        async def spin(seconds: float) -> None:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                await peers.refresh()
                await asyncio.sleep(0.01)

        await spin(0.5)
        assert peers._attempts[address].failures == 3 and peers._attempts[address].dropped
        assert len(log.events("candidate dropped until discovery lists it again")) == 1
        await spin(0.2)
        assert peers._attempts[address].failures == 3  # not dialled while dropped
        source.listed = []  # the DNS answer no longer has it ...
        await spin(0.05)
        source.listed = [Candidate(address, SOURCE_DNS)]  # ... and then has it again
        await spin(0.3)
        # Tried afresh (and, still refused, dropped again after the same bound).
        assert len(log.events("dropped candidate listed again; retrying")) == 1
        assert len(log.events("candidate dropped until discovery lists it again")) == 2
        assert peers._attempts[address].failures == 3
        assert len(log.naming("connection refused")) == 1  # the same reason is not logged again
        await peers.stop()

    run(scenario())


def test_static_peers_are_backed_off_but_never_dropped() -> None:
    async def scenario() -> None:
        address = f"127.0.0.1:{closed_port()}"
        peers = registry(
            Source(Candidate(address, SOURCE_STATIC)),
            Log(),
            backoff_initial=0.01,
            backoff_cap=0.02,
            give_up_tries=2,
        )
        for _ in range(30):
            await peers.refresh()
            await asyncio.sleep(0.01)
        assert peers._attempts[address].failures > 2 and not peers._attempts[address].dropped
        await peers.stop()

    run(scenario())


def test_a_known_peer_that_heals_is_found_within_two_probe_intervals() -> None:
    async def scenario() -> None:
        peer = await Peer("b", "i-b1").start()
        port = peer.port
        log, source = Log(), Source(Candidate(peer.address, SOURCE_MDNS, node_id="b"))
        peers = registry(source, log, probe_interval=0.2)
        peers.start()
        try:
            await asyncio.sleep(0.3)
            assert peers.alive() == ["b"]
            await peer.stop()
            await asyncio.sleep(3.0)  # down for 3 s: probed all along, at most every 2 x 0.2 s
            assert peers.alive() == [] and len(log.events("peer unreachable")) == 1
            assert not peers._attempts[peer.address].dropped
            assert 7 <= peers._attempts[peer.address].failures <= 16
            healed = time.monotonic()
            await peer.start(port=port)
            while peers.alive() != ["b"]:
                assert time.monotonic() - healed < 2 * 0.2 + 0.5, "healed peer not found in time"
                await asyncio.sleep(0.01)
        finally:
            await peers.stop()
            await peer.stop()

    run(scenario())


def test_failure_reasons_are_named() -> None:
    from agent.transport.client import HandshakeRefused

    assert failure_reason(HandshakeRefused("h:1", "config_hash differs: lr")) == (
        "handshake refused: config_hash differs: lr"
    )
    assert failure_reason(RuntimeError("boom")).startswith("handshake failed")
