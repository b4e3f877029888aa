"""``--peers host:port,...``: a fixed list of candidates whose node ids are unknown until the handshake."""

from __future__ import annotations

from collections.abc import Sequence

from agent.discovery.base import SOURCE_STATIC, Candidate, ChangeCallback, format_address, parse_address


class StaticPeers:
    """The configured addresses, validated up front (a typo is a configuration error, not a peer)."""

    name = SOURCE_STATIC

    def __init__(self, addresses: Sequence[str]) -> None:
        normalised: list[str] = []
        for text in addresses:
            host, port = parse_address(text, what="--peers entry")
            address = format_address(host, port)
            if address in normalised:
                raise ValueError(f"--peers lists {address} twice")
            normalised.append(address)
        self._candidates = [Candidate(address=address, source=SOURCE_STATIC) for address in normalised]

    async def start(self, on_change: ChangeCallback) -> None:
        # The list never changes, so there is nothing to report after start.
        return None

    async def stop(self) -> None:
        return None

    def candidates(self) -> list[Candidate]:
        return list(self._candidates)
