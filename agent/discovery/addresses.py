"""Which address peers on other hosts should dial: ``--advertise`` as given, or chosen from the host's
interfaces (``--advertise auto``, or a wildcard ``--listen`` such as ``0.0.0.0:P`` with no ``--advertise``).

The choice is a pure function (``choose_address``) over facts about the host's IPv4 addresses
(``InterfaceAddress``: interface, address, whether the interface is up, whether it holds the default
route), so it is testable without this host's interfaces; ``host_interface_addresses`` gathers those
facts on Linux (``ifaddr`` for addresses, ``/sys/class/net/<if>/{flags,operstate}`` for up/down,
``/proc/net/route`` for the IPv4 default route). The rule:

1. never a loopback (127/8), link-local (169.254/16), unspecified or multicast address, nor one on an
   interface that is down;
2. the address of the interface holding the IPv4 default route (the lowest metric first);
3. else the first address, by interface name, on an interface that is not a typical container or
   virtual bridge (docker0, br-*, veth*, cni0, virbr0, ...);
4. else a ValueError naming the flag to use (``--advertise HOST:PORT`` or ``--interface``).

``--interface NAME|ADDRESS`` picks the interface (or one of its addresses) explicitly; it must be up.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.discovery.base import format_address

# Interfaces that are never the one peers reach us on, checked by name prefix (unless one of them holds
# the default route, which then says otherwise).
VIRTUAL_PREFIXES = ("lo", "docker", "br-", "veth", "cni", "flannel", "cali", "virbr", "tun", "tap")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
IFF_UP = 0x1
RTF_UP = 0x1
_DOWN_OPERSTATES = frozenset({"down", "lowerlayerdown", "notpresent"})


@dataclass(frozen=True)
class InterfaceAddress:
    """One IPv4 address of this host and what is known of its interface."""

    interface: str
    address: str
    is_up: bool = True
    has_default_route: bool = False


def _unusable(fact: InterfaceAddress) -> str | None:
    """Why peers on other hosts cannot dial ``fact``; None when they can."""
    try:
        address = ipaddress.IPv4Address(fact.address)
    except ValueError:
        return "not an IPv4 address"
    if not fact.is_up:
        return "interface down"
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local"
    if address.is_unspecified or address.is_multicast:
        return "not a unicast address"
    return None


def _describe(facts: Sequence[InterfaceAddress]) -> str:
    if not facts:
        return "no IPv4 address at all"
    parts = []
    for fact in facts:
        why = _unusable(fact) or ("default route" if fact.has_default_route else "usable")
        parts.append(f"{fact.interface} {fact.address} ({why})")
    return ", ".join(parts)


def choose_address(
    facts: Sequence[InterfaceAddress], interface: str | None = None, *, what: str = "--advertise auto"
) -> str:
    """The IPv4 address to advertise, by the rule in the module docstring; ValueError naming ``what``
    and the flags that fix it when there is none."""
    if interface:
        named = [f for f in facts if f.interface == interface] or [f for f in facts if f.address == interface]
        if not named:
            raise ValueError(
                f"--interface: no interface or IPv4 address {interface!r}; this host has {_describe(facts)}"
            )
        if not any(f.is_up for f in named):
            raise ValueError(f"--interface {interface!r} is down; this host has {_describe(facts)}")
        up = [f for f in named if f.is_up]
        # An explicit choice may be link-local, but a routable address of that interface comes first.
        return next((f.address for f in up if _unusable(f) is None), up[0].address)
    usable = [f for f in facts if _unusable(f) is None]
    for fact in usable:
        if fact.has_default_route:
            return fact.address
    for fact in sorted(usable, key=lambda f: f.interface):
        if not fact.interface.startswith(VIRTUAL_PREFIXES):
            return fact.address
    raise ValueError(
        f"{what}: no address that peers on other hosts can dial (this host has {_describe(facts)}); "
        "give --advertise HOST:PORT (e.g. 127.0.0.1:PORT for a single-host cluster) or --interface NAME"
    )


# ---- facts about this host (Linux; elsewhere every interface counts as up, none as the default) -----


def default_route_interfaces(route_table: str) -> list[str]:
    """Interfaces holding an IPv4 default route in ``/proc/net/route`` text, lowest metric first."""
    routes: list[tuple[int, str]] = []
    for line in route_table.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8:
            continue
        try:
            destination, flags, metric, mask = (int(fields[i], 16) for i in (1, 3, 6, 7))
        except ValueError:
            continue
        if destination == 0 and mask == 0 and flags & RTF_UP:
            routes.append((metric, fields[0]))
    return list(dict.fromkeys(name for _, name in sorted(routes)))


def interface_is_up(name: str, sys_class_net: Path = Path("/sys/class/net")) -> bool:
    """Administratively up (IFF_UP) and not reported down by the kernel (no carrier, lower layer down).
    Interfaces without a carrier notion (dummy, tun, lo) report operstate "unknown": up if IFF_UP."""
    folder = sys_class_net / name
    try:
        flags = int((folder / "flags").read_text().strip(), 16)
    except (OSError, ValueError):
        return True  # not Linux, or no such entry: nothing says it is down
    if not flags & IFF_UP:
        return False
    try:
        operstate = (folder / "operstate").read_text().strip().lower()
    except OSError:
        return True
    return operstate not in _DOWN_OPERSTATES


def host_interface_addresses(
    route_file: Path = Path("/proc/net/route"), sys_class_net: Path = Path("/sys/class/net")
) -> list[InterfaceAddress]:
    """This host's IPv4 addresses with their interface's state; default-route interfaces first."""
    import ifaddr  # a dependency of zeroconf

    try:
        defaults = default_route_interfaces(route_file.read_text())
    except OSError:
        defaults = []
    facts = [
        InterfaceAddress(
            interface=adapter.nice_name,
            address=ip.ip,
            is_up=interface_is_up(adapter.nice_name, sys_class_net),
            has_default_route=adapter.nice_name in defaults,
        )
        for adapter in ifaddr.get_adapters()
        for ip in adapter.ips
        if isinstance(ip.ip, str)  # IPv4 as str; IPv6 as (address, flowinfo, scope) tuples
    ]
    rank = {name: index for index, name in enumerate(defaults)}
    return sorted(facts, key=lambda f: rank.get(f.interface, len(rank)))  # stable otherwise


def resolve_advertise(
    advertise: str | None,
    listen_host: str,
    listen_port: int,
    interface: str | None,
    facts: Iterable[InterfaceAddress] | None = None,
) -> str:
    """The ``host:port`` to advertise. ``auto`` picks an interface address by ``choose_address``; so
    does a wildcard listen address (``0.0.0.0``, ``::``) with no ``--advertise``: what it would
    advertise otherwise (127.0.0.1) is unreachable from other hosts. ``facts`` defaults to this host's."""
    if advertise and advertise != "auto":
        return advertise
    if advertise == "auto" or listen_host in WILDCARD_HOSTS:
        what = (
            "--advertise auto"
            if advertise == "auto"
            else f"--listen {format_address(listen_host or '0.0.0.0', listen_port)} without --advertise"
        )
        known = list(facts) if facts is not None else host_interface_addresses()
        return format_address(choose_address(known, interface, what=what), listen_port)
    return format_address(listen_host, listen_port)
