"""Peer discovery: who might be out there. Three sources feed one ``PeerTable``:

- **mDNS** (``MdnsDiscovery``, ``_dpgan._tcp.local.``): advertises this node (an explicit IPv4
  address and port; TXT ``node_id``, ``proto``, ``schema``, ``config``, ``run``) and browses for the
  others on the local link. Its candidates carry the node id and TXT the peer advertised. Malformed
  records from the network are ignored with one log line, and so are agents of another run (TXT
  ``run`` differs).
- **static** (``StaticPeers``, ``--peers host:port,...``): fixed addresses; node id unknown.
- **DNS** (``DnsPeers``, ``name[:port]``): names re-resolved every few seconds (A and AAAA), so a compose
  service or a Kubernetes headless Service yields every replica; this node's own address is left out.
  Resolution failures are logged once per distinct error and retried. Node id unknown.

The table merges them: one entry per node id (the address a handshake confirmed first, then mDNS,
static, DNS; every other address in ``Candidate.alternates``), one entry per address whose node is
unknown. A candidate is *not* a member: membership requires the gRPC handshake, after which the agent
calls ``table.confirm(address, node_id)`` and the table keys that address by the node id (confirming
this node's own id marks the address as self, never offered again). mDNS is *not* a liveness signal
either: a crashed peer sends no goodbye and lingers in mDNS caches for up to 75 minutes. Liveness comes
from gRPC; when a peer is down the agent calls ``table.forget(node_id)``.

Typical use, on the agent's event loop::

    table = build_discovery(node_id="a", advertise="10.0.0.5:5000", listen_port=5000, peers=[],
                            dns_names=["dpgan"], mdns=True, interfaces=None,
                            txt={"proto": "4", "schema": h1, "config": h2, "run": r}, dns_interval=5.0)
    await table.start()
    while running:
        for candidate in table.candidates():   # dial, handshake, then table.confirm(...)
            ...
        await table.wait_for_change(timeout=probe_interval)
    await table.stop()                         # mDNS goodbye is on the wire when this returns

``python -m agent.discovery --node-id a --advertise 10.0.0.5:5000`` advertises and prints what it finds,
to check discovery on a network without training anything.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from typing import Any

from agent.core.membership import check_node_id
from agent.discovery.base import (
    SOURCE_DNS,
    SOURCE_HANDSHAKE,
    SOURCE_MDNS,
    SOURCE_STATIC,
    Candidate,
    ChangeCallback,
    DiscoveryError,
    DiscoverySource,
    format_address,
    parse_address,
)
from agent.discovery.dns import DnsPeers
from agent.discovery.mdns import (
    SERVICE_TYPE,
    TXT_CONFIG,
    TXT_NODE_ID,
    TXT_PROTOCOL,
    TXT_SCHEMA,
    MalformedRecord,
    MdnsDiscovery,
)
from agent.discovery.static import StaticPeers
from agent.discovery.table import TXT_RUN, PeerTable
from agent.logs import get_logger

__all__ = [
    "SERVICE_TYPE",
    "SOURCE_DNS",
    "SOURCE_HANDSHAKE",
    "SOURCE_MDNS",
    "SOURCE_STATIC",
    "TXT_CONFIG",
    "TXT_NODE_ID",
    "TXT_PROTOCOL",
    "TXT_RUN",
    "TXT_SCHEMA",
    "Candidate",
    "ChangeCallback",
    "DiscoveryError",
    "DiscoverySource",
    "DnsPeers",
    "MalformedRecord",
    "MdnsDiscovery",
    "PeerTable",
    "StaticPeers",
    "build_discovery",
    "format_address",
    "parse_address",
]


def build_discovery(
    *,
    node_id: str,
    advertise: str,
    listen_port: int,
    peers: Sequence[str],
    dns_names: Sequence[str],
    mdns: bool,
    interfaces: Sequence[str] | None,
    txt: Mapping[str, str],
    dns_interval: float,
    service_type: str = SERVICE_TYPE,
    log: Any | None = None,
) -> PeerTable:
    """The table over the sources the options ask for; ValueError naming the bad option otherwise.

    ``advertise`` is this node's ``host:port``; mDNS needs its host to be an IPv4 address. DNS names
    without a port use ``listen_port`` (replicas of one service listen on the same port).
    """
    check_node_id(node_id)
    host, port = parse_address(advertise, what="--advertise")
    own_address = format_address(host, port)
    log = log if log is not None else get_logger(node=node_id)
    sources: list[DiscoverySource] = []
    if mdns:
        try:
            advertised = ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(
                f"mDNS needs --advertise with this host's IPv4 address (peers dial it), got {advertise!r}"
            ) from None
        if advertised.is_loopback or advertised.is_link_local:
            log.warning(
                "mDNS announces an address other hosts cannot dial; only agents on this host will "
                "reach this node (give --advertise auto or this host's LAN address)",
                advertise=advertise,
            )
        sources.append(
            MdnsDiscovery(
                node_id,
                host,
                port,
                txt,
                interfaces,
                service_type=service_type,
                log=log.bind(discovery=SOURCE_MDNS),
            )
        )
    if peers:
        static = StaticPeers(peers)
        if any(candidate.address == own_address for candidate in static.candidates()):
            raise ValueError(f"--peers lists this node's own address {own_address}")
        sources.append(static)
    if dns_names:
        sources.append(
            DnsPeers(
                dns_names,
                default_port=listen_port,
                exclude=[own_address],
                interval=dns_interval,
                log=log.bind(discovery=SOURCE_DNS),
            )
        )
    return PeerTable(
        sources,
        own_node_id=node_id,
        own_addresses=[own_address],
        run_id=txt.get(TXT_RUN),
        log=log.bind(discovery="table"),
    )
