"""DNS names (``name[:port]``) re-resolved periodically: a compose service name or a Kubernetes headless
Service resolves to every replica's address, so the peer set follows scaling without any registry."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from collections.abc import Sequence
from typing import Any

from agent.discovery.base import SOURCE_DNS, Candidate, ChangeCallback, format_address, parse_address
from agent.logs import get_logger

DEFAULT_INTERVAL_S = 5.0
DEFAULT_TIMEOUT_S = 5.0


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class DnsPeers:
    """Resolves each name (A and AAAA, via the system resolver) every ``interval`` seconds.

    ``exclude`` holds this node's own ``host:port`` (its advertise address); a host name there is
    resolved too, because a service name resolves to this replica as well as to the others. A name
    that fails keeps its last good addresses, so a resolver hiccup does not empty the peer list;
    each distinct failure is logged once, and so is the recovery.
    """

    name = SOURCE_DNS

    def __init__(
        self,
        names: Sequence[str],
        *,
        default_port: int,
        exclude: Sequence[str] = (),
        interval: float = DEFAULT_INTERVAL_S,
        timeout: float = DEFAULT_TIMEOUT_S,
        log: Any | None = None,
    ) -> None:
        if interval <= 0 or timeout <= 0:
            raise ValueError(
                f"DNS re-resolve interval and timeout must be positive, got {interval}, {timeout}"
            )
        self._targets = [parse_address(name, default_port=default_port, what="DNS name") for name in names]
        self._exclude = [parse_address(address, what="own address") for address in exclude]
        self.interval = interval
        self.timeout = timeout
        self.log = log if log is not None else get_logger(discovery=SOURCE_DNS)
        self._addresses: dict[tuple[str, int], list[str]] = {}  # target -> last good addresses
        self._errors: dict[tuple[str, int], str] = {}  # target -> the failure last logged for it
        self._own: dict[tuple[str, int], list[str]] = {}  # own host name -> its last good addresses
        self._task: asyncio.Task[None] | None = None
        self._on_change: ChangeCallback | None = None

    async def start(self, on_change: ChangeCallback) -> None:
        self._on_change = on_change
        self._task = asyncio.create_task(self._resolve_forever(), name="dpgan-dns-discovery")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def candidates(self) -> list[Candidate]:
        own = {format_address(host, port) for host, port in self._exclude if _is_ip_literal(host)}
        own.update(address for addresses in self._own.values() for address in addresses)
        seen: dict[str, Candidate] = {}
        for addresses in self._addresses.values():
            for address in addresses:
                if address not in own and address not in seen:
                    seen[address] = Candidate(address=address, source=SOURCE_DNS)
        return list(seen.values())

    async def _resolve_forever(self) -> None:
        while True:
            await self.resolve_once()
            await asyncio.sleep(self.interval)

    async def resolve_once(self) -> None:
        """One round over every name; calls ``on_change`` when the candidate list changed."""
        before = self.candidates()
        own_names = [target for target in self._exclude if not _is_ip_literal(target[0])]
        # Concurrently: one slow name must not hold the others back a whole timeout each.
        results = await asyncio.gather(*(self._lookup(target) for target in [*own_names, *self._targets]))
        for index, addresses in enumerate(results):
            if addresses is None:
                continue
            if index < len(own_names):
                self._own[own_names[index]] = addresses
            else:
                self._addresses[self._targets[index - len(own_names)]] = addresses
        if self.candidates() != before and self._on_change is not None:
            self._on_change()

    async def _lookup(self, target: tuple[str, int]) -> list[str] | None:
        """The target's addresses, sorted; None (and a log line for a new failure) when it fails."""
        host, port = target
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout=self.timeout
            )
        # UnicodeError: a label the IDNA codec refuses; the resolver fails it before any query.
        except (OSError, TimeoutError, UnicodeError) as error:
            problem = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
            if self._errors.get(target) != problem:
                self._errors[target] = problem
                self.log.warning("DNS name does not resolve; retrying", name=host, port=port, error=problem)
            return None
        if target in self._errors:
            del self._errors[target]
            self.log.info("DNS name resolves again", name=host, port=port)
        # sockaddr[0] is the address for both families; an IPv6 scope id is dropped with the rest.
        return sorted({format_address(str(info[4][0]), port) for info in infos})
