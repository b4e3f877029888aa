"""One peer table over every discovery source, keyed by node id wherever a node id is known."""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Sequence
from typing import Any

from agent.discovery.base import (
    SOURCE_DNS,
    SOURCE_HANDSHAKE,
    SOURCE_MDNS,
    SOURCE_STATIC,
    Candidate,
    DiscoverySource,
)
from agent.logs import get_logger

# TXT key of the mDNS record that names the advertising agent's run (docs/security.md).
TXT_RUN = "run"

# Which source's address to dial first for a node when the handshake has not picked one: mDNS
# addresses are what the node itself advertises; static and DNS ones are what an operator wrote.
_SOURCE_PREFERENCE = {SOURCE_HANDSHAKE: 0, SOURCE_MDNS: 1, SOURCE_STATIC: 2, SOURCE_DNS: 3}


class PeerTable:
    """Merges the sources' candidates and remembers what handshakes proved.

    ``candidates()`` returns one entry per node id (its confirmed address first, then mDNS, static,
    DNS; every other address seen in ``alternates``) plus one entry per address whose node is still
    unknown. A handshake (``confirm``) binds an address to a node id and beats whatever a source
    claims about that address. Addresses of this node itself (its own node id, or ``own_addresses``)
    never appear. With ``run_id``, an mDNS record whose TXT ``run`` differs (or is missing) is another
    run's agent and never becomes a candidate (logged once per record). All methods run on the agent's
    event loop.
    """

    def __init__(
        self,
        sources: Sequence[DiscoverySource],
        *,
        own_node_id: str | None = None,
        own_addresses: Collection[str] = (),
        run_id: str | None = None,
        log: Any | None = None,
    ) -> None:
        self.sources = list(sources)
        self.own_node_id = own_node_id
        self.run_id = run_id
        self._other_runs_logged: set[tuple[str, str]] = set()
        self.log = log if log is not None else get_logger(discovery="table")
        self._own_addresses = set(own_addresses)
        self._node_at: dict[str, str] = {}  # address -> node id, from handshakes
        self._confirmed: dict[str, str] = {}  # node id -> the address its last handshake used
        self._started: list[DiscoverySource] = []
        self._generation = 0  # bumped whenever a source reports a change
        self._read_generation = 0  # the generation the last candidates() call saw
        self._changed = asyncio.Event()

    async def start(self) -> None:
        """Start every source; if one fails, stop those already started and re-raise."""
        for source in self.sources:
            try:
                await source.start(self._on_source_change)
            except BaseException:
                await self.stop()
                raise
            self._started.append(source)

    async def stop(self) -> None:
        """Stop the started sources in reverse order; a failing stop is logged, the rest still run."""
        while self._started:
            source = self._started.pop()
            try:
                await source.stop()
            except Exception as error:  # one broken source must not keep the others' sockets open
                self.log.error("discovery source failed to stop", source=source.name, error=repr(error))

    def _on_source_change(self) -> None:
        self._generation += 1
        self._changed.set()

    async def wait_for_change(self, timeout: float) -> bool:
        """True as soon as a source changed since the last ``candidates()`` call (at once if one
        already has, so no change between reading and waiting is lost); False after ``timeout``."""
        if self._generation != self._read_generation:
            return True
        self._changed.clear()
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def candidates(self) -> list[Candidate]:
        self._read_generation = self._generation
        reported = [
            candidate
            for source in self.sources
            for candidate in source.candidates()
            if candidate.address not in self._own_addresses and self._in_this_run(candidate)
        ]
        node_at = {c.address: c.node_id for c in reported if c.node_id is not None}
        node_at.update(self._node_at)
        by_node: dict[str, list[Candidate]] = {}
        unknown: dict[str, Candidate] = {}
        for candidate in reported:
            node_id = node_at.get(candidate.address)
            if node_id is None:
                unknown.setdefault(candidate.address, candidate)
            elif node_id != self.own_node_id:
                stale = candidate.node_id not in (None, node_id)
                # A handshake proved the source's claim stale: the address stays, the TXT was another node's.
                entry = Candidate(address=candidate.address, source=candidate.source) if stale else candidate
                by_node.setdefault(node_id, []).append(entry)
        for node_id, address in self._confirmed.items():
            # A peer that dialled us may be listed by no source; the handshake vouches for it.
            listed = by_node.setdefault(node_id, [])
            if all(candidate.address != address for candidate in listed):
                listed.append(Candidate(address=address, source=SOURCE_HANDSHAKE))
        merged = [self._merge(node_id, candidates) for node_id, candidates in sorted(by_node.items())]
        return merged + [unknown[address] for address in sorted(unknown)]

    def _in_this_run(self, candidate: Candidate) -> bool:
        if self.run_id is None or candidate.source != SOURCE_MDNS:
            return True  # static and DNS peers carry no TXT: the handshake compares run ids
        run = candidate.txt.get(TXT_RUN, "")
        if run == self.run_id:
            return True
        key = (candidate.node_id or candidate.address, run)
        if key not in self._other_runs_logged:
            self._other_runs_logged.add(key)
            self.log.info(
                "ignoring an agent of another run",
                peer=candidate.node_id,
                address=candidate.address,
                its_run=run or "(none advertised)",
                run=self.run_id,
            )
        return False

    def _merge(self, node_id: str, candidates: list[Candidate]) -> Candidate:
        confirmed = self._confirmed.get(node_id)

        def preference(candidate: Candidate) -> tuple[int, int]:
            return (0 if candidate.address == confirmed else 1, _SOURCE_PREFERENCE.get(candidate.source, 9))

        ordered = sorted(candidates, key=preference)  # stable: a source's own order breaks ties
        addresses = list(dict.fromkeys(candidate.address for candidate in ordered))
        txt = next((c.txt for c in ordered if c.source == SOURCE_MDNS), None) or next(
            (c.txt for c in ordered if c.txt), {}
        )
        return Candidate(
            address=addresses[0],
            source=ordered[0].source,
            node_id=node_id,
            txt=txt,
            alternates=tuple(addresses[1:]),
        )

    def confirm(self, address: str, node_id: str) -> None:
        """A handshake at ``address`` answered as ``node_id``: from now on that address is that node."""
        if node_id == self.own_node_id:
            # A DNS name or static list that includes this node: never dial it again.
            if address not in self._own_addresses:
                self._own_addresses.add(address)
                self.log.info("address is this node itself; ignoring it", address=address)
            return
        previous_owner = self._node_at.get(address, node_id)
        # The address now belongs to another node (a restart reused it): the old owner is not there.
        if previous_owner != node_id and self._confirmed.get(previous_owner) == address:
            del self._confirmed[previous_owner]
        self._node_at[address] = node_id
        self._confirmed[node_id] = address

    def alias(self, address: str, node_id: str) -> None:
        """A handshake at ``address`` answered as ``node_id``, which the agent keeps using at its
        confirmed address: list ``address`` among that node's alternates, not as a separate candidate
        (so it is not dialled as an unknown node). ``forget(node_id)`` unbinds it again."""
        if node_id == self.own_node_id:
            self.confirm(address, node_id)
            return
        previous_owner = self._node_at.get(address, node_id)
        if previous_owner != node_id and self._confirmed.get(previous_owner) == address:
            del self._confirmed[previous_owner]
        self._node_at[address] = node_id

    def confirmed(self) -> dict[str, str]:
        """node id -> the address its most recent handshake used."""
        return dict(self._confirmed)

    def forget(self, node_id: str) -> None:
        """The node is down (gRPC says so): drop what its handshakes proved. Sources that still list it
        (a crashed peer stays in mDNS caches) keep offering its addresses; redial with backoff."""
        self._confirmed.pop(node_id, None)
        for address in [address for address, owner in self._node_at.items() if owner == node_id]:
            del self._node_at[address]
