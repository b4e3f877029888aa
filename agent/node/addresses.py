"""Which address peers should dial: ``--advertise`` as given, or ``auto`` from the host's interfaces.

Hosts with container bridges (docker0, cni0) have several addresses; advertising the wrong one makes
the node unreachable, so ``--interface`` names the interface (or one of its IPv4 addresses) to use.
"""

from __future__ import annotations

import ipaddress

import ifaddr

# Interfaces that are never the one peers reach us on, checked by name prefix.
VIRTUAL_PREFIXES = ("lo", "docker", "br-", "veth", "cni", "flannel", "cali", "virbr", "tun", "tap")


def interface_ipv4_addresses() -> dict[str, list[str]]:
    addresses: dict[str, list[str]] = {}
    for adapter in ifaddr.get_adapters():
        ipv4 = [ip.ip for ip in adapter.ips if isinstance(ip.ip, str)]
        if ipv4:
            addresses[adapter.nice_name] = ipv4
    return addresses


def pick_ipv4(interface: str | None = None) -> str:
    """The IPv4 address of ``interface`` (a name or one of its addresses), else of the first interface
    that is neither loopback nor a typical container/virtual bridge."""
    table = interface_ipv4_addresses()
    if interface:
        if interface in table:
            return table[interface][0]
        for addresses in table.values():
            if interface in addresses:
                return interface
        known = ", ".join(f"{name} ({', '.join(ips)})" for name, ips in sorted(table.items()))
        raise ValueError(f"--interface: no interface or IPv4 address {interface!r}; this host has {known}")
    for name, addresses in sorted(table.items()):
        if name.startswith(VIRTUAL_PREFIXES):
            continue
        for address in addresses:
            if not ipaddress.IPv4Address(address).is_loopback:
                return address
    raise ValueError("--advertise auto: no non-loopback IPv4 interface found; give --advertise HOST:PORT")


def resolve_advertise(
    advertise: str | None, listen_host: str, listen_port: int, interface: str | None
) -> str:
    """The ``host:port`` to advertise. ``auto`` (or a wildcard listen address with an --interface) picks
    an interface address; with neither, a wildcard listen address advertises 127.0.0.1."""
    if advertise and advertise != "auto":
        return advertise
    wildcard = listen_host in ("0.0.0.0", "::", "")
    if advertise == "auto" or (wildcard and interface):
        return f"{pick_ipv4(interface)}:{listen_port}"
    return f"127.0.0.1:{listen_port}" if wildcard else f"{listen_host}:{listen_port}"
