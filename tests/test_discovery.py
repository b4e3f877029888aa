"""Discovery: address parsing, TXT handling, the static and DNS sources, the merged peer table, and mDNS
between real zeroconf instances: in one process on loopback, and between processes in network
namespaces on a bridge (``multihost``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from structlog.testing import capture_logs
from zeroconf import IPVersion
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from agent.discovery import (
    SOURCE_DNS,
    SOURCE_HANDSHAKE,
    SOURCE_MDNS,
    SOURCE_STATIC,
    Candidate,
    ChangeCallback,
    DiscoveryError,
    DnsPeers,
    MalformedRecord,
    MdnsDiscovery,
    PeerTable,
    StaticPeers,
    build_discovery,
    parse_address,
)
from agent.discovery.mdns import (
    MAX_TXT_BYTES,
    SERVICE_TYPE,
    candidates_from_service,
    check_txt,
    instance_name,
    parse_txt_record,
    resolve_interfaces,
)

if TYPE_CHECKING:
    from tests.netns import NetnsCluster

# The netns_cluster fixture factory; loaded as a plugin (not imported) so pytest rewrites its asserts.
pytest_plugins = ["tests.netns"]

pytestmark = pytest.mark.timeout(30)

REPO = Path(__file__).resolve().parent.parent
TXT = {"proto": "1", "schema": "5c1e3a", "config": "9f00d2"}


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Every zeroconf instance, resolver thread and reader thread a test starts must be gone after it."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 3.0
    leaked = [thread for thread in threading.enumerate() if thread not in before]
    while leaked and time.monotonic() < deadline:
        time.sleep(0.05)
        leaked = [thread for thread in threading.enumerate() if thread not in before]
    assert not leaked, f"threads left running: {leaked}"


def run(coroutine: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coroutine)


def unique_service_type() -> str:
    """Loopback tests in concurrent test runs share the host's mDNS group; a type of their own
    keeps them from seeing each other."""
    return f"_dpgt{secrets.token_hex(4)}._tcp.local."


async def eventually(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Seconds until ``condition()`` held; fails the test after ``timeout``."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)
    return time.monotonic() - start


# ---- addresses ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "default_port", "expected"),
    [
        ("10.0.0.5:5000", None, ("10.0.0.5", 5000)),
        ("node-a:5000", None, ("node-a", 5000)),
        ("dpgan.default.svc.cluster.local", 5000, ("dpgan.default.svc.cluster.local", 5000)),
        ("[fd00::1]:7000", None, ("fd00::1", 7000)),
        ("[fd00::1]", 7000, ("fd00::1", 7000)),
        (" peer_1:1 ", None, ("peer_1", 1)),
    ],
)
def test_parse_address_accepts(text: str, default_port: int | None, expected: tuple[str, int]) -> None:
    assert parse_address(text, default_port=default_port) == expected


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("10.0.0.5", "expected host:port"),
        ("10.0.0.5:", "empty port"),
        ("10.0.0.5:0", "port must be 1-65535"),
        ("10.0.0.5:65536", "port must be 1-65535"),
        ("10.0.0.5:http", "port must be 1-65535"),
        (":5000", "empty host"),
        ("fd00::1:5000", "write IPv6 addresses in brackets"),
        ("[fd00::1:5000", "unclosed '['"),
        ("[fd00::1]5000", "expected ':port' after ']'"),
        ("bad host:5000", "neither an IP address nor a valid host name"),
        ("a..b:5000", "neither an IP address nor a valid host name"),
        ("-leading:5000", "neither an IP address nor a valid host name"),
    ],
)
def test_parse_address_rejects_with_the_reason(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match="--peers entry") as raised:
        parse_address(text, what="--peers entry")
    assert problem in str(raised.value)


# ---- static --------------------------------------------------------------------------------------------


def test_static_peers_are_candidates_with_unknown_node_ids() -> None:
    source = StaticPeers(["10.0.0.2:5000", "hostb:5001", "[FD00::1]:5002"])
    run(source.start(lambda: None))
    assert source.candidates() == [
        Candidate("10.0.0.2:5000", SOURCE_STATIC),
        Candidate("hostb:5001", SOURCE_STATIC),
        Candidate("[FD00::1]:5002", SOURCE_STATIC),
    ]
    run(source.stop())


def test_static_peers_reject_duplicates_and_bad_entries() -> None:
    with pytest.raises(ValueError, match=r"lists 10\.0\.0\.2:5000 twice"):
        StaticPeers(["10.0.0.2:5000", " 10.0.0.2:5000"])
    with pytest.raises(ValueError, match="expected host:port"):
        StaticPeers(["10.0.0.2"])


# ---- DNS ------------------------------------------------------------------------------------------------


def test_dns_resolves_names_with_default_and_explicit_ports() -> None:
    async def scenario() -> None:
        source = DnsPeers(["localhost", "localhost:7001"], default_port=7000, timeout=5)
        await source.resolve_once()
        addresses = {candidate.address for candidate in source.candidates()}
        assert {"127.0.0.1:7000", "127.0.0.1:7001"} <= addresses
        assert all(candidate.source == SOURCE_DNS for candidate in source.candidates())
        assert all(candidate.node_id is None for candidate in source.candidates())

    run(scenario())


@pytest.mark.parametrize("own", ["127.0.0.1:7000", "localhost:7000"])
def test_dns_leaves_out_this_nodes_own_address(own: str) -> None:
    async def scenario() -> None:
        source = DnsPeers(["localhost"], default_port=7000, exclude=[own])
        await source.resolve_once()
        assert "127.0.0.1:7000" not in {candidate.address for candidate in source.candidates()}
        # Same host, another port: another agent, so still a candidate.
        other = DnsPeers(["localhost:7001"], default_port=7000, exclude=[own])
        await other.resolve_once()
        assert "127.0.0.1:7001" in {candidate.address for candidate in other.candidates()}

    run(scenario())


def test_dns_logs_each_distinct_failure_once_and_keeps_resolving_the_others() -> None:
    async def scenario() -> list[dict[str, Any]]:
        source = DnsPeers(["does-not-exist.invalid", "localhost"], default_port=7000, timeout=5)
        with capture_logs() as logs:
            for _ in range(3):
                await source.resolve_once()
        assert "127.0.0.1:7000" in {candidate.address for candidate in source.candidates()}
        return logs

    logs = run(scenario())
    failures = [entry for entry in logs if entry["event"] == "DNS name does not resolve; retrying"]
    assert len(failures) == 1, logs
    assert failures[0]["name"] == "does-not-exist.invalid"
    assert failures[0]["log_level"] == "warning"
    assert failures[0]["error"]


def test_dns_source_re_resolves_periodically_and_reports_only_changes() -> None:
    async def scenario() -> None:
        changes: list[int] = []
        source = DnsPeers(["localhost"], default_port=7000, interval=0.05)
        await source.start(lambda: changes.append(len(source.candidates())))
        await eventually(lambda: bool(changes), 5, "the first resolution")
        await asyncio.sleep(0.3)  # several more rounds, all with the same answer
        await source.stop()
        assert changes == [changes[0]] and changes[0] >= 1

    run(scenario())


def test_dns_rejects_bad_configuration() -> None:
    with pytest.raises(ValueError, match="DNS name"):
        DnsPeers(["bad name"], default_port=7000)
    with pytest.raises(ValueError, match="must be positive"):
        DnsPeers(["localhost"], default_port=7000, interval=0)


# ---- TXT records and instance names -----------------------------------------------------------------


def txt_wire(*entries: bytes) -> bytes:
    return b"".join(bytes([len(entry)]) + entry for entry in entries)


def test_txt_parsing_follows_rfc6763() -> None:
    record = txt_wire(b"node_id=a", b"PROTO=1", b"flag", b"empty=", b"proto=2", b"=ignored", b"k=v=w")
    assert parse_txt_record(record) == {"node_id": "a", "proto": "1", "flag": "", "empty": "", "k": "v=w"}
    assert parse_txt_record(b"\x00") == {}
    assert parse_txt_record(b"") == {}
    assert parse_txt_record(txt_wire("node_id=nœud".encode())) == {"node_id": "nœud"}


@pytest.mark.parametrize(
    ("record", "problem"),
    [
        (txt_wire(b"node_id=\xff\xfe"), "not UTF-8"),
        (txt_wire(b"n\xe9=1"), "not ASCII"),
        (txt_wire(b"a\x01b=1"), "control characters"),
        (b"\x0anode_id=a", "runs past the end"),
        (txt_wire(*[b"k%d=v" % i for i in range(33)]), "more than 32 entries"),
        (txt_wire(*[b"k%d=" % i + b"v" * 200 for i in range(7)]), f"the limit is {MAX_TXT_BYTES}"),
    ],
)
def test_malformed_txt_records_are_refused_with_the_reason(record: bytes, problem: str) -> None:
    with pytest.raises(MalformedRecord, match=problem):
        parse_txt_record(record)


def test_advertised_txt_round_trips_through_the_wire_format() -> None:
    txt = check_txt({"node_id": "node-0", **TXT, "extra": "é" * 40})
    info = AsyncServiceInfo(SERVICE_TYPE, f"node-0.{SERVICE_TYPE}", port=1, properties=txt)
    assert parse_txt_record(info.text) == txt


@pytest.mark.parametrize(
    ("txt", "problem"),
    [
        ({"a=b": "1"}, "printable ASCII without '='"),
        ({"": "1"}, "printable ASCII without '='"),
        ({"Proto": "1", "proto": "2"}, "given twice"),
        ({"big": "x" * 300}, "the limit is 255"),
        ({f"k{i}": "v" * 100 for i in range(14)}, "1300 bytes"),
    ],
)
def test_advertised_txt_must_fit_what_peers_accept(txt: dict[str, str], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        check_txt(txt)


def test_instance_names_are_short_safe_and_distinct() -> None:
    assert instance_name("node-0") == "node-0"
    names = {node_id: instance_name(node_id) for node_id in ["10.0.0.1:5000", "10.0.0.1-5000", "a" * 128]}
    assert len(set(names.values())) == len(names)
    for node_id, name in names.items():
        assert len(name.encode()) <= 63
        assert set(name) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-")
        # Valid for zeroconf's strict checks, so registering it cannot fail on the name.
        AsyncServiceInfo(SERVICE_TYPE, f"{name}.{SERVICE_TYPE}", port=1, properties={"node_id": node_id})


def service(
    properties: dict[Any, Any], addresses: list[str] | None = None, port: int = 5000
) -> AsyncServiceInfo:
    return AsyncServiceInfo(
        SERVICE_TYPE,
        f"x.{SERVICE_TYPE}",
        port=port,
        properties=properties,
        addresses=[socket.inet_aton(a) for a in (addresses if addresses is not None else ["10.0.0.7"])],
    )


def test_a_resolved_service_becomes_one_candidate_per_address() -> None:
    found = candidates_from_service(service({"node_id": "n7", **TXT}, ["10.0.0.7", "192.168.1.7"]))
    assert [c.address for c in found] == ["10.0.0.7:5000", "192.168.1.7:5000"]
    assert {c.node_id for c in found} == {"n7"}
    assert found[0].source == SOURCE_MDNS
    assert dict(found[0].txt) == {"node_id": "n7", **TXT}


@pytest.mark.parametrize(
    ("properties", "addresses", "problem"),
    [
        ({"proto": "1"}, None, "no node_id"),
        ({"node_id": ""}, None, "no node_id"),
        ({"node_id": "has space"}, None, "is invalid"),
        ({"node_id": "n7"}, [], "no IPv4 address"),
    ],
)
def test_services_that_are_no_peers_are_refused(
    properties: dict[str, str], addresses: list[str] | None, problem: str
) -> None:
    with pytest.raises(MalformedRecord, match=problem):
        candidates_from_service(service(properties, addresses))


@pytest.mark.parametrize(
    ("arguments", "problem"),
    [
        ({"advertise_host": "node-a.example"}, "IPv4 address"),
        ({"advertise_host": "fd00::1"}, "IPv4 address"),
        ({"advertise_host": "0.0.0.0"}, "cannot dial"),
        ({"port": 0}, "1-65535"),
        ({"txt": {"node_id": "someone-else"}}, "differs from the node id"),
        ({"txt": {"x": "y" * 300}}, "limit is 255"),
        ({"interfaces": ["no-such-interface0"]}, "neither an IPv4 address nor an interface"),
        ({"node_id": "bad id"}, "is invalid"),
        ({"service_type": "_this-name-is-far-too-long._tcp.local."}, "service type"),
    ],
)
def test_mdns_configuration_errors_are_clear(arguments: dict[str, Any], problem: str) -> None:
    options: dict[str, Any] = {"node_id": "a", "advertise_host": "10.0.0.5", "port": 5000, "txt": TXT}
    with pytest.raises(ValueError, match=problem):
        MdnsDiscovery(**{**options, **arguments})


def test_interfaces_may_be_named_or_given_as_addresses() -> None:
    assert resolve_interfaces(["lo"]) == ["127.0.0.1"]
    assert resolve_interfaces(["127.0.0.1", "lo"]) == ["127.0.0.1"]


# ---- the peer table ------------------------------------------------------------------------------------


class ListedSource:
    """A source whose candidates the test sets; reports every change like a real source."""

    def __init__(
        self, name: str, candidates: list[Candidate] | None = None, fail_start: bool = False
    ) -> None:
        self.name = name
        self._candidates = list(candidates or [])
        self._on_change: ChangeCallback | None = None
        self.fail_start = fail_start
        self.running = False

    async def start(self, on_change: ChangeCallback) -> None:
        if self.fail_start:
            raise DiscoveryError(f"{self.name} cannot start")
        self._on_change = on_change
        self.running = True

    async def stop(self) -> None:
        self.running = False

    def candidates(self) -> list[Candidate]:
        return list(self._candidates)

    def set(self, candidates: list[Candidate]) -> None:
        self._candidates = list(candidates)
        assert self._on_change is not None
        self._on_change()


def mdns_candidate(address: str, node_id: str, **txt: str) -> Candidate:
    return Candidate(address, SOURCE_MDNS, node_id, {"node_id": node_id, **txt})


def test_table_merges_by_address_then_by_node_id() -> None:
    mdns = ListedSource(SOURCE_MDNS, [mdns_candidate("10.0.0.2:5000", "b", proto="1")])
    static = ListedSource(
        SOURCE_STATIC, [Candidate("10.0.0.2:5000", SOURCE_STATIC), Candidate("hc:5000", "static")]
    )
    dns = ListedSource(SOURCE_DNS, [Candidate("hc:5000", SOURCE_DNS), Candidate("10.0.0.4:5000", SOURCE_DNS)])
    table = PeerTable([mdns, static, dns], own_node_id="a")
    run(table.start())
    # 10.0.0.2:5000 is node b by its mDNS record, so the static entry for it merges into b's.
    assert table.candidates() == [
        Candidate("10.0.0.2:5000", SOURCE_MDNS, "b", {"node_id": "b", "proto": "1"}),
        Candidate("10.0.0.4:5000", SOURCE_DNS),
        Candidate("hc:5000", SOURCE_STATIC),
    ]
    run(table.stop())


def test_confirmed_addresses_are_keyed_by_node_id_and_keep_every_address() -> None:
    mdns = ListedSource(SOURCE_MDNS, [mdns_candidate("10.0.0.2:5000", "b", proto="1")])
    static = ListedSource(
        SOURCE_STATIC, [Candidate("hostb:5000", SOURCE_STATIC), Candidate("hc:5000", "static")]
    )
    table = PeerTable([mdns, static], own_node_id="a")
    run(table.start())
    table.confirm("hostb:5000", "b")
    assert table.confirmed() == {"b": "hostb:5000"}
    merged, unknown = table.candidates()
    # The address the handshake used comes first; the mDNS TXT stays with the node.
    assert merged == Candidate(
        "hostb:5000", SOURCE_STATIC, "b", {"node_id": "b", "proto": "1"}, alternates=("10.0.0.2:5000",)
    )
    assert merged.addresses == ("hostb:5000", "10.0.0.2:5000")
    assert unknown == Candidate("hc:5000", SOURCE_STATIC)
    # A second handshake via the other address moves the preference, loses no address.
    table.confirm("10.0.0.2:5000", "b")
    assert table.candidates()[0].addresses == ("10.0.0.2:5000", "hostb:5000")
    run(table.stop())


def test_handshake_beats_what_a_source_claims_and_reused_addresses_move() -> None:
    mdns = ListedSource(SOURCE_MDNS, [mdns_candidate("10.0.0.2:5000", "b")])  # stale: b crashed, c took it
    table = PeerTable([mdns], own_node_id="a")
    run(table.start())
    table.confirm("10.0.0.9:5000", "b")
    table.confirm("10.0.0.2:5000", "c")
    by_node = {candidate.node_id: candidate for candidate in table.candidates()}
    assert by_node["c"] == Candidate("10.0.0.2:5000", SOURCE_MDNS, "c")  # b's TXT is not c's
    assert by_node["b"] == Candidate("10.0.0.9:5000", SOURCE_HANDSHAKE, "b")
    # c now confirmed at b's old address, then b shows up there again: b wins it back, c loses it.
    table.confirm("10.0.0.2:5000", "b")
    assert table.confirmed() == {"b": "10.0.0.2:5000"}
    run(table.stop())


def test_this_node_never_appears() -> None:
    mdns = ListedSource(
        SOURCE_MDNS, [mdns_candidate("10.0.0.1:5000", "a"), mdns_candidate("10.0.0.2:5000", "b")]
    )
    dns = ListedSource(
        SOURCE_DNS, [Candidate("10.0.0.3:5000", SOURCE_DNS), Candidate("172.18.0.5:5000", "dns")]
    )
    table = PeerTable([mdns, dns], own_node_id="a", own_addresses=["10.0.0.3:5000"])
    run(table.start())
    assert [c.address for c in table.candidates()] == ["10.0.0.2:5000", "172.18.0.5:5000"]
    # A handshake reveals that a DNS answer was this node under another address.
    table.confirm("172.18.0.5:5000", "a")
    assert [c.address for c in table.candidates()] == ["10.0.0.2:5000"]
    assert table.confirmed() == {}
    run(table.stop())


def test_forget_drops_what_the_handshake_proved_but_keeps_listed_addresses() -> None:
    static = ListedSource(SOURCE_STATIC, [Candidate("hostb:5000", SOURCE_STATIC)])
    mdns = ListedSource(SOURCE_MDNS, [mdns_candidate("10.0.0.2:5000", "b")])
    table = PeerTable([mdns, static], own_node_id="a")
    run(table.start())
    table.confirm("hostb:5000", "b")
    table.confirm("10.0.0.9:5000", "x")
    table.forget("b")
    table.forget("x")
    table.forget("never-seen")
    assert table.confirmed() == {}
    # The static address is unknown again; the (possibly stale) mDNS record still offers b.
    assert table.candidates() == [
        mdns_candidate("10.0.0.2:5000", "b"),
        Candidate("hostb:5000", SOURCE_STATIC),
    ]
    run(table.stop())


def test_an_alias_is_listed_under_its_node_and_not_as_an_unknown_candidate() -> None:
    """The registry reached node b at one address and found it answers at another too (127.0.0.1 and
    ::1 of one name): that address becomes an alternate of b, not a candidate of its own."""
    dns = ListedSource(
        SOURCE_DNS, [Candidate("127.0.0.1:7000", SOURCE_DNS), Candidate("[::1]:7000", SOURCE_DNS)]
    )
    table = PeerTable([dns])
    table.confirm("127.0.0.1:7000", "b")
    assert [c.address for c in table.candidates()] == ["127.0.0.1:7000", "[::1]:7000"]
    table.alias("[::1]:7000", "b")
    (merged,) = table.candidates()
    assert (merged.address, merged.node_id, merged.alternates) == ("127.0.0.1:7000", "b", ("[::1]:7000",))
    assert table.confirmed() == {"b": "127.0.0.1:7000"}  # the alias does not become the address used
    table.forget("b")  # b is down: both addresses are candidates again
    assert [c.node_id for c in table.candidates()] == [None, None]


def test_wait_for_change_never_misses_a_change_between_reading_and_waiting() -> None:
    async def scenario() -> None:
        source = ListedSource(SOURCE_MDNS)
        table = PeerTable([source])
        await table.start()
        assert table.candidates() == []
        assert await table.wait_for_change(0.05) is False
        source.set([mdns_candidate("10.0.0.2:5000", "b")])  # lands before the agent waits
        assert await table.wait_for_change(5) is True
        assert await table.wait_for_change(0.05) is True  # still unread
        assert len(table.candidates()) == 1
        assert await table.wait_for_change(0.05) is False
        asyncio.get_running_loop().call_later(0.05, source.set, [])
        started = time.monotonic()
        assert await table.wait_for_change(5) is True
        assert time.monotonic() - started < 1
        await table.stop()

    run(scenario())


def test_a_source_that_fails_to_start_stops_the_ones_already_running() -> None:
    first, broken = ListedSource("first"), ListedSource("broken", fail_start=True)
    table = PeerTable([first, broken])
    with pytest.raises(DiscoveryError, match="broken cannot start"):
        run(table.start())
    assert not first.running


def test_build_discovery_composes_the_requested_sources() -> None:
    table = build_discovery(
        node_id="a",
        advertise="10.0.0.5:5000",
        listen_port=5000,
        peers=["10.0.0.6:5000"],
        dns_names=["dpgan"],
        mdns=True,
        interfaces=None,
        txt=TXT,
        dns_interval=5.0,
    )
    assert [type(source) for source in table.sources] == [MdnsDiscovery, StaticPeers, DnsPeers]
    assert table.own_node_id == "a"
    mdns = table.sources[0]
    assert isinstance(mdns, MdnsDiscovery)
    assert (mdns.advertise_host, mdns.port, mdns.txt) == ("10.0.0.5", 5000, {"node_id": "a", **TXT})
    only_static = build_discovery(
        node_id="a",
        advertise="hosta:5000",
        listen_port=5000,
        peers=["hostb:5000"],
        dns_names=[],
        mdns=False,
        interfaces=None,
        txt={},
        dns_interval=5.0,
    )
    assert [type(source) for source in only_static.sources] == [StaticPeers]


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        ({"advertise": "hosta:5000"}, "mDNS needs --advertise with this host's IPv4 address"),
        ({"advertise": "10.0.0.5"}, "--advertise"),
        ({"peers": ["10.0.0.5:5000"]}, "own address"),
        ({"node_id": "no spaces allowed"}, "is invalid"),
    ],
)
def test_build_discovery_names_the_bad_option(overrides: dict[str, Any], problem: str) -> None:
    options: dict[str, Any] = {
        "node_id": "a",
        "advertise": "10.0.0.5:5000",
        "listen_port": 5000,
        "peers": [],
        "dns_names": [],
        "mdns": True,
        "interfaces": None,
        "txt": TXT,
        "dns_interval": 5.0,
    }
    with pytest.raises(ValueError, match=problem):
        build_discovery(**{**options, **overrides})


# ---- mDNS between zeroconf instances in this process (loopback) --------------------------------------


def loopback_node(node_id: str, port: int, service_type: str) -> MdnsDiscovery:
    return MdnsDiscovery(node_id, "127.0.0.1", port, TXT, ["127.0.0.1"], service_type=service_type)


def test_mdns_peers_find_each_other_and_see_the_goodbye_on_loopback() -> None:
    async def scenario() -> None:
        service_type = unique_service_type()
        first = PeerTable([loopback_node("node-1", 7101, service_type)], own_node_id="node-1")
        second = PeerTable([loopback_node("node-2", 7102, service_type)], own_node_id="node-2")
        await asyncio.gather(first.start(), second.start())
        try:
            await eventually(lambda: len(first.candidates()) == 1, 5, "node-1 to see node-2")
            await eventually(lambda: len(second.candidates()) == 1, 5, "node-2 to see node-1")
            assert first.candidates() == [
                Candidate("127.0.0.1:7102", SOURCE_MDNS, "node-2", {"node_id": "node-2", **TXT})
            ]
            assert second.candidates() == [
                Candidate("127.0.0.1:7101", SOURCE_MDNS, "node-1", {"node_id": "node-1", **TXT})
            ]
        finally:
            await second.stop()
        # stop() returns after the goodbye went out, so the removal arrives at once, not after a TTL.
        assert await eventually(lambda: first.candidates() == [], 2, "node-1 to see node-2's goodbye") < 1
        await first.stop()

    run(scenario())


@contextlib.contextmanager
def bystanders(count: int) -> Iterator[None]:
    """``count`` sockets bound to 127.0.0.1:5353 with SO_REUSEPORT, as other mDNS responders on this host
    hold. They join the kernel's reuseport group for that address, which hands each unicast datagram to
    port 5353 to one member, chosen by a hash seeded per boot and network namespace: a different count
    moves that choice, so a check that relies on which member gets an answer fails on some count here
    as it would fail on some machine."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(("127.0.0.1", 5353))
        yield
    finally:
        for sock in sockets:
            sock.close()


@pytest.mark.parametrize("others", [0, 1, 2, 3], ids=lambda count: f"{count}-bystanders")
def test_a_second_agent_with_the_same_node_id_is_refused(others: int) -> None:
    """On one host too, whichever socket of the address's reuseport group the kernel picks for a
    unicast answer (zeroconf's own probes are answered that way, which made this host-dependent)."""

    async def scenario() -> None:
        service_type = unique_service_type()
        original = loopback_node("twin", 7111, service_type)
        await original.start(lambda: None)
        try:
            with pytest.raises(DiscoveryError, match="already advertises node id 'twin'"):
                await loopback_node("twin", 7112, service_type).start(lambda: None)
            # The refused twin withdrew nothing: the original is still there for its peers.
            observer = loopback_node("observer", 7113, service_type)
            await observer.start(lambda: None)
            try:
                await eventually(lambda: len(observer.candidates()) == 1, 5, "the original twin")
                assert [c.address for c in observer.candidates()] == ["127.0.0.1:7111"]
            finally:
                await observer.stop()
        finally:
            await original.stop()

    with bystanders(others):
        run(scenario())


def test_malformed_records_from_the_network_are_ignored_with_one_log_line_each() -> None:
    async def scenario() -> list[dict[str, Any]]:
        service_type = unique_service_type()
        rogue = AsyncZeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only)

        def record(instance: str, properties: dict[Any, Any], port: int = 7120) -> AsyncServiceInfo:
            return AsyncServiceInfo(
                service_type,
                f"{instance}.{service_type}",
                port=port,
                properties=properties,
                server=f"{instance}.local.",
                addresses=[socket.inet_aton("127.0.0.1")],
            )

        bad = {
            "no-id": record("no-id", {"proto": "1"}),
            "not-utf8": record("not-utf8", {b"node_id": b"\xff\xfe"}),
            "bad-id": record("bad-id", {"node_id": "spaces are not allowed"}),
            "oversized": record("oversized", {f"k{i}": "v" * 200 for i in range(8)}),
        }
        good = record("good", {"node_id": "good", **TXT}, port=7121)
        records = [*bad.values(), good]
        await asyncio.gather(*await asyncio.gather(*(rogue.async_register_service(r) for r in records)))
        observer = PeerTable([loopback_node("observer", 7122, service_type)], own_node_id="observer")
        with capture_logs() as logs:
            await observer.start()
            try:
                await eventually(lambda: len(observer.candidates()) == 1, 5, "the good record")
                assert observer.candidates() == [
                    Candidate("127.0.0.1:7121", SOURCE_MDNS, "good", {"node_id": "good", **TXT})
                ]
                ignored = lambda: [e for e in logs if e["event"] == "mDNS record ignored"]  # noqa: E731
                await eventually(lambda: len(ignored()) == len(bad), 5, "every bad record to be logged")
                # Re-announced with the same problem: not logged again. With another problem: logged.
                bad["no-id"] = record("no-id", {"proto": "1"}, port=7130)
                bad["bad-id"] = record("bad-id", {"node_id": "still bad"})
                # A peer that changes its TXT (a restart with a new config) is re-read.
                good = record("good", {"node_id": "good", **TXT, "config": "changed"}, port=7121)
                for info in (bad["no-id"], bad["bad-id"], good):
                    await (await rogue.async_update_service(info))
                await eventually(
                    lambda: observer.candidates()[0].txt.get("config") == "changed", 5, "the changed TXT"
                )
                await eventually(lambda: len(ignored()) == len(bad) + 1, 5, "the new problem to be logged")
                await asyncio.sleep(0.3)
            finally:
                await observer.stop()
                await rogue.async_close()  # sends the goodbyes for every record at once
        return ignored()

    ignored = run(scenario())
    assert len(ignored) == 5, ignored
    assert "still bad" in ignored[-1]["problem"] and ignored[-1]["service"].startswith("bad-id.")
    problems = {entry["service"].split(".")[0]: entry["problem"] for entry in ignored[:-1]}
    assert "no node_id" in problems["no-id"]
    assert "not UTF-8" in problems["not-utf8"]
    assert "is invalid" in problems["bad-id"]
    assert "limit is 1300" in problems["oversized"]
    assert all(entry["log_level"] == "warning" for entry in ignored)


# ---- mDNS between hosts: processes in network namespaces on a bridge -----------------------------------


class Probe:
    """``python -m agent.discovery`` in one namespace; its JSON events are collected as they arrive."""

    def __init__(
        self,
        cluster: NetnsCluster,
        host: str,
        node_id: str,
        log_path: Path,
        discovery: tuple[str, ...] = ("--interface", "eth0"),
    ) -> None:
        self.node_id = node_id
        self.address = f"{cluster.host(host).address}:5000"
        self.log_path = log_path
        argv = [sys.executable, "-m", "agent.discovery", "--node-id", node_id, "--advertise", self.address]
        argv += [*discovery, "--duration", "60", "--log-level", "info"]
        argv += [f"--txt={key}={value}" for key, value in TXT.items()]
        self._stderr = log_path.open("w")
        self.process = cluster.popen(
            host,
            argv,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        self.events: list[dict[str, Any]] = []
        self._reader = threading.Thread(target=self._read, name=f"probe-{node_id}")
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.events.append(json.loads(line))

    def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float, what: str
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in list(self.events):
                if predicate(event):
                    return event
            if self.process.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.01)
        raise AssertionError(
            f"{self.node_id}: no {what} within {timeout} s; events {self.events};"
            f" stderr {self.log_path.read_text()}"
        )

    def stop(self, signum: signal.Signals = signal.SIGTERM) -> float:
        """Signal the probe, wait for it and its output; returns the wall time of the signal."""
        sent = time.time()
        self.process.send_signal(signum)
        self.process.wait(timeout=10)
        self._reader.join(timeout=10)
        self._stderr.close()
        return sent


def sees(node_id: str) -> Callable[[dict[str, Any]], bool]:
    def predicate(event: dict[str, Any]) -> bool:
        return event["event"] == "candidates" and any(c["node_id"] == node_id for c in event["candidates"])

    return predicate


def addresses_in(event: dict[str, Any]) -> list[str] | None:
    """The sorted addresses of a ``candidates`` event; None for other events."""
    if event["event"] != "candidates":
        return None
    return sorted(candidate["address"] for candidate in event["candidates"])


def first_absence_after(probe: Probe, node_id: str, wall: float) -> dict[str, Any]:
    return probe.wait_for(
        lambda event: (
            event["wall"] >= wall
            and event["event"] == "candidates"
            and all(c["node_id"] != node_id for c in event["candidates"])
        ),
        5,
        f"removal of {node_id}",
    )


@pytest.mark.multihost
@pytest.mark.timeout(90)
def test_mdns_between_hosts_on_a_bridge(netns_cluster, tmp_path: Path) -> None:
    cluster: NetnsCluster = netns_cluster(3)
    early = [Probe(cluster, f"h{i}", f"node-{i}", tmp_path / f"node-{i}.log") for i in (0, 1)]
    probes = list(early)
    try:
        for probe in early:
            probe.wait_for(lambda event: event["event"] == "started", 20, "start")
        # Both announced: how long one node takes to see another that starts later.
        late = Probe(cluster, "h2", "node-2", tmp_path / "node-2.log")
        probes.append(late)
        late_start = late.wait_for(lambda event: event["event"] == "starting", 20, "starting")["wall"]
        for probe in probes:
            for other in probes:
                if other is not probe:
                    probe.wait_for(sees(other.node_id), 10, f"sighting of {other.node_id}")
        latencies = {p.node_id: p.wait_for(sees("node-2"), 1, "")["wall"] - late_start for p in early}
        late_sees = {o.node_id: late.wait_for(sees(o.node_id), 1, "")["wall"] - late_start for o in early}
        print(f"\nmDNS first sighting of a joining node (from its process start): {latencies}")
        print(f"joining node's first sighting of the others (from its process start): {late_sees}")
        assert all(latency < 5 for latency in [*latencies.values(), *late_sees.values()])

        for probe in probes:
            last = [event for event in probe.events if event["event"] == "candidates"][-1]["candidates"]
            assert sorted(last, key=lambda c: c["node_id"]) == [
                {
                    "address": other.address,
                    "source": SOURCE_MDNS,
                    "node_id": other.node_id,
                    "txt": {"node_id": other.node_id, **TXT},
                    "alternates": [],
                }
                for other in probes
                if other is not probe
            ]

        # A clean stop sends the goodbye: the others drop the node at once.
        stopped_at = late.stop()
        assert late.wait_for(lambda event: event["event"] == "stopped", 1, "stopped")
        for probe in early:
            removal = first_absence_after(probe, "node-2", stopped_at)["wall"] - stopped_at
            print(f"{probe.node_id} saw node-2's goodbye {removal:.3f} s after SIGTERM")
            assert removal < 2

        # A crash sends nothing: mDNS keeps offering the dead node, which is why liveness is gRPC's job.
        crashed_at = early[1].stop(signal.SIGKILL)
        time.sleep(2)
        still = [e for e in early[0].events if e["event"] == "candidates" and e["wall"] >= crashed_at]
        assert still == []  # no change at all: node-1 is still listed
        assert any(c["node_id"] == "node-1" for c in early[0].events[-1]["candidates"])
    finally:
        for probe in probes:
            if probe.process.poll() is None:
                probe.stop()


@pytest.mark.multihost
@pytest.mark.timeout(60)
def test_a_second_host_advertising_an_existing_node_id_is_refused(netns_cluster, tmp_path: Path) -> None:
    """Two hosts on a LAN (each its own network namespace, as in a deployment): the second agent
    advertising a node id that the first holds is refused and exits 2; the first keeps it."""
    cluster: NetnsCluster = netns_cluster(3)
    original = Probe(cluster, "h0", "twin", tmp_path / "twin-h0.log")
    observer = Probe(cluster, "h2", "observer", tmp_path / "observer-h2.log")
    try:
        original.wait_for(lambda event: event["event"] == "started", 20, "start")
        observer.wait_for(sees("twin"), 10, "sighting of the original twin")
        argv = [sys.executable, "-m", "agent.discovery", "--node-id", "twin", "--interface", "eth0"]
        argv += ["--advertise", f"{cluster.host('h1').address}:5000", "--duration", "5"]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        second = cluster.exec("h1", argv, check=False, timeout=30, env=env)
        assert second.returncode == 2, (second.returncode, second.stdout, second.stderr)
        assert "already advertises node id 'twin'" in second.stderr
        assert '"started"' not in second.stdout
        # The original stays listed with its own address: the refused twin sent no goodbye for it.
        time.sleep(1)
        last = [e for e in observer.events if e["event"] == "candidates"][-1]["candidates"]
        assert [(c["node_id"], c["address"]) for c in last] == [("twin", original.address)]
    finally:
        for probe in (original, observer):
            if probe.process.poll() is None:
                probe.stop()


@pytest.mark.multihost
@pytest.mark.timeout(60)
def test_hosts_cut_off_from_multicast_do_not_discover_each_other(netns_cluster, tmp_path: Path) -> None:
    cluster: NetnsCluster = netns_cluster(2)
    cluster.multicast(False)
    probes = [Probe(cluster, f"h{i}", f"node-{i}", tmp_path / f"node-{i}.log") for i in (0, 1)]
    try:
        for probe in probes:
            probe.wait_for(lambda event: event["event"] == "started", 20, "start")
        time.sleep(2)
    finally:
        for probe in probes:
            probe.stop()
    for probe in probes:
        assert all(e["candidates"] == [] for e in probe.events if e["event"] == "candidates"), probe.events
    # Unicast still crosses the bridge: the cut is multicast only.
    listener = cluster.popen("h0", [sys.executable, "-c", LISTEN_ONCE], stdout=subprocess.PIPE, text=True)
    assert listener.stdout is not None and listener.stdout.readline().strip() == "listening"
    cluster.exec("h1", [sys.executable, "-c", SEND_BYTES, cluster.host("h0").address, "1000"])
    assert listener.communicate(timeout=10)[0].strip() == "1000"


@pytest.mark.multihost
@pytest.mark.timeout(60)
def test_dns_name_of_a_scaled_service_follows_its_replicas(netns_cluster, tmp_path: Path) -> None:
    """Like a compose service or a headless Service: one name, every replica's address."""
    cluster: NetnsCluster = netns_cluster(3)
    addresses = [host.address for host in cluster.hosts]

    def scale_to(replicas: int) -> None:
        for host in cluster.hosts:
            cluster.set_names(host, {"dpgan": addresses[:replicas]} if replicas else {})

    scale_to(2)
    dns = ("--no-mdns", "--dns", "dpgan", "--dns-interval", "0.2")
    probes = [Probe(cluster, f"h{i}", f"node-{i}", tmp_path / f"node-{i}.log", dns) for i in range(3)]
    try:
        # Each replica lists the others, never itself; node ids stay unknown until a handshake.
        first = probes[0].wait_for(lambda e: e["event"] == "candidates" and e["candidates"], 10, "a replica")
        assert first["candidates"] == [
            {
                "address": f"{addresses[1]}:5000",
                "source": SOURCE_DNS,
                "node_id": None,
                "txt": {},
                "alternates": [],
            }
        ]
        scale_to(3)
        for index, probe in enumerate(probes):
            others = sorted(f"{a}:5000" for i, a in enumerate(addresses) if i != index)
            probe.wait_for(lambda e, others=others: addresses_in(e) == others, 5, "every other replica")
        # The name stops resolving: the last answer stands (one warning); it resolves again (one info).
        scale_to(0)
        failing_since = time.time()
        time.sleep(1.0)
        assert [e for e in probes[0].events if e["wall"] > failing_since] == []
        scale_to(3)
        time.sleep(1.0)
    finally:
        for probe in probes:
            probe.stop()
    log = [json.loads(line) for line in probes[0].log_path.read_text().splitlines()]
    events = [entry["event"] for entry in log if entry.get("name") == "dpgan"]
    assert events == ["DNS name does not resolve; retrying", "DNS name resolves again"], log


LISTEN_ONCE = """
import socket
server = socket.create_server(("0.0.0.0", 9000))
print("listening", flush=True)
connection, _ = server.accept()
total = 0
while chunk := connection.recv(65536):
    total += len(chunk)
print(total, flush=True)
"""
SEND_BYTES = """
import socket, sys
with socket.create_connection((sys.argv[1], 9000), timeout=10) as connection:
    connection.sendall(b"x" * int(sys.argv[2]))
"""


@pytest.mark.multihost
@pytest.mark.timeout(60)
def test_netns_cluster_shapes_links_and_cleans_up(netns_cluster) -> None:
    cluster: NetnsCluster = netns_cluster(2, subnet="10.78.0.0/24", attach_root=True)
    server = cluster.host("h0").address
    assert [host.address for host in cluster.hosts] == ["10.78.0.11", "10.78.0.12"]

    def transfer_seconds(size: int) -> float:
        listener = cluster.popen("h0", [sys.executable, "-c", LISTEN_ONCE], stdout=subprocess.PIPE, text=True)
        assert listener.stdout is not None and listener.stdout.readline().strip() == "listening"
        started = time.monotonic()
        cluster.exec("h1", [sys.executable, "-c", SEND_BYTES, server, str(size)])
        assert listener.communicate(timeout=30)[0].strip() == str(size)
        return time.monotonic() - started

    assert transfer_seconds(2_500_000) < 0.5  # unshaped veth: far faster than 20 Mbit/s
    cluster.set_rate("h1", 20)
    shaped = transfer_seconds(2_500_000)  # 20 Mbit at 20 Mbit/s: about one second
    assert 0.7 < shaped < 3, shaped
    cluster.set_rate("h1", None)
    assert transfer_seconds(2_500_000) < 0.5

    def gso_max_segs() -> set[str]:
        port = cluster.host("h1").switch_port
        shown = [
            cluster.exec("h1", ["ip", "-d", "link", "show", "dev", "eth0"]).stdout,
            subprocess.run(["ip", "-n", cluster.switch_namespace, "-d", "link", "show", "dev", port],
                           capture_output=True, text=True, check=True).stdout,
        ]  # fmt: skip
        return {text.split("gso_max_segs ")[1].split()[0] for text in shown}

    cluster.segmentation_offload("h1", False)  # bench/cluster_bench.py --no-gso
    assert gso_max_segs() == {"1"}
    assert transfer_seconds(2_500_000) < 0.5
    cluster.segmentation_offload("h1", True)
    assert gso_max_segs() == {"65535"}

    # attach_root puts this process on the bridge too.
    listener = cluster.popen("h0", [sys.executable, "-c", LISTEN_ONCE], stdout=subprocess.PIPE, text=True)
    assert listener.stdout is not None and listener.stdout.readline().strip() == "listening"
    with socket.create_connection((server, 9000), timeout=10) as connection:
        connection.sendall(b"from the test process")
    assert listener.communicate(timeout=10)[0].strip() == "21"

    cluster.link("h1", up=False)
    unreachable = cluster.exec("h1", [sys.executable, "-c", SEND_BYTES, server, "1"], check=False, timeout=20)
    assert unreachable.returncode != 0
    cluster.link("h1", up=True)

    namespaces = [host.namespace for host in cluster.hosts] + [cluster.switch_namespace]
    cluster.popen("h1", ["sleep", "600"])  # still running at teardown: close() must end it
    cluster.close()
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert not any(name in listing for name in namespaces)
    links = subprocess.run(["ip", "link"], capture_output=True, text=True, check=True).stdout
    assert f"{cluster.root_interface}@" not in links
