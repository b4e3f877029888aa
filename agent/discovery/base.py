"""What every discovery source produces (``Candidate``), the interface it implements
(``DiscoverySource``), and the one place that parses and formats ``host:port`` addresses."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol

SOURCE_MDNS = "mdns"
SOURCE_STATIC = "static"
SOURCE_DNS = "dns"
SOURCE_HANDSHAKE = "handshake"  # an address the agent confirmed that no source lists (e.g. an inbound peer)

ChangeCallback = Callable[[], None]

# RFC 1123 host names (letters, digits, hyphens; underscores too, as compose and Kubernetes names allow).
_HOST_LABEL = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")


class DiscoveryError(RuntimeError):
    """Discovery cannot run as configured (e.g. another host already advertises this node id)."""


@dataclass(frozen=True)
class Candidate:
    """A peer that may be dialled. ``node_id`` is what a source claims (mDNS TXT) or what a handshake
    confirmed; None means unknown until the handshake. Only the handshake makes a candidate a member."""

    address: str  # "host:port" to dial, IPv6 hosts in brackets
    source: str  # SOURCE_MDNS, SOURCE_STATIC, SOURCE_DNS or SOURCE_HANDSHAKE
    node_id: str | None = None
    txt: Mapping[str, str] = field(default_factory=dict)
    alternates: tuple[str, ...] = ()  # other addresses seen for the same node id, best first

    def __post_init__(self) -> None:
        # Frozen means the TXT of a candidate handed out cannot change under the caller either.
        object.__setattr__(self, "txt", MappingProxyType(dict(self.txt)))

    @property
    def addresses(self) -> tuple[str, ...]:
        return (self.address, *self.alternates)


class DiscoverySource(Protocol):
    """One way of finding peers. All methods run on the agent's event loop; ``start`` and ``stop`` are
    each called once. ``on_change`` is called (on the loop) whenever ``candidates()`` would change."""

    name: str

    async def start(self, on_change: ChangeCallback) -> None: ...

    async def stop(self) -> None: ...

    def candidates(self) -> list[Candidate]: ...


def format_address(host: str, port: int) -> str:
    """``host:port``, with IPv6 literals in brackets so the last colon always separates the port."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_address(text: str, *, default_port: int | None = None, what: str = "address") -> tuple[str, int]:
    """Split ``host[:port]`` (``[v6]:port`` for IPv6) and check both parts; ValueError names ``what``.

    The port may be left out only when ``default_port`` is given.
    """
    value = text.strip()
    host, port_text = value, ""
    if value.startswith("["):
        closing = value.find("]")
        if closing < 0:
            raise ValueError(f"{what} {text!r}: unclosed '[' in an IPv6 address")
        host, rest = value[1:closing], value[closing + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError(f"{what} {text!r}: expected ':port' after ']'")
        port_text = rest[1:]
        if rest == ":":
            raise ValueError(f"{what} {text!r}: empty port")
    elif value.count(":") == 1:
        host, port_text = value.split(":")
        if not port_text:
            raise ValueError(f"{what} {text!r}: empty port")
    elif value.count(":") > 1:
        raise ValueError(f"{what} {text!r}: write IPv6 addresses in brackets, e.g. [fd00::1]:5000")
    if port_text:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise ValueError(f"{what} {text!r}: port must be 1-65535")
        port = int(port_text)
    elif default_port is None:
        raise ValueError(f"{what} {text!r}: expected host:port")
    else:
        port = default_port
    check_host(host, what=f"{what} {text!r}")
    return host, port


def check_host(host: str, *, what: str = "host") -> str:
    """An IP literal or a syntactically valid DNS name; ValueError otherwise."""
    if not host:
        raise ValueError(f"{what}: empty host")
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    name = host[:-1] if host.endswith(".") else host
    if len(name) > 253 or not all(_HOST_LABEL.match(label) for label in name.split(".")):
        raise ValueError(f"{what}: {host!r} is neither an IP address nor a valid host name")
    return host
