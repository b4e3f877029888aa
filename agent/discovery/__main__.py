"""``python -m agent.discovery --node-id a --advertise 10.0.0.5:5000 [--dns NAME] [--peers A,B]``:
run discovery alone and print what it finds, to check a network before training on it.

Prints JSON lines on stdout: ``starting`` (before anything binds), ``started`` (once the mDNS
announcement is out), ``candidates`` (the merged table, at start and on every change) and ``stopped``
(after the goodbye was sent). ``wall`` is ``time.time()``, so lines from several hosts line up.
Runs for ``--duration`` seconds or until SIGINT/SIGTERM. Logs go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from collections.abc import Sequence

from agent.discovery import SERVICE_TYPE, Candidate, DiscoveryError, build_discovery, parse_address
from agent.files import finite_json
from agent.logs import configure_logging


def _emit(event: str, **fields: object) -> None:
    record = finite_json({"event": event, "wall": time.time(), **fields})
    print(json.dumps(record, allow_nan=False), flush=True)


def _describe(candidate: Candidate) -> dict[str, object]:
    return {
        "address": candidate.address,
        "source": candidate.source,
        "node_id": candidate.node_id,
        "txt": dict(candidate.txt),
        "alternates": list(candidate.alternates),
    }


def _txt_pair(text: str) -> tuple[str, str]:
    key, separator, value = text.partition("=")
    if not separator or not key:
        raise argparse.ArgumentTypeError(f"--txt expects key=value, got {text!r}")
    return key, value


def parser() -> argparse.ArgumentParser:
    result = argparse.ArgumentParser(
        prog="python -m agent.discovery",
        description="Run discovery alone and print what it finds as JSON lines, to check a network.",
    )
    result.add_argument("--node-id", required=True)
    result.add_argument("--advertise", required=True, help="host:port peers dial (IPv4 host for mDNS)")
    result.add_argument("--peers", default="", help="comma-separated static host:port list")
    result.add_argument("--dns", action="append", default=[], help="DNS name[:port] to re-resolve")
    result.add_argument("--dns-interval", type=float, default=5.0, help="seconds between DNS resolutions")
    result.add_argument("--no-mdns", action="store_true", help="do not advertise or browse mDNS")
    result.add_argument("--interface", action="append", help="interface name or IPv4 for mDNS (repeatable)")
    result.add_argument("--txt", action="append", type=_txt_pair, default=[], help="extra TXT key=value")
    result.add_argument("--service-type", default=SERVICE_TYPE, help=argparse.SUPPRESS)
    result.add_argument("--duration", type=float, default=float("inf"), help="seconds to run")
    result.add_argument("--log-level", default="warning")
    return result


async def run(args: argparse.Namespace) -> None:
    _, advertised_port = parse_address(args.advertise, what="--advertise")
    table = build_discovery(
        node_id=args.node_id,
        advertise=args.advertise,
        listen_port=advertised_port,
        peers=[peer.strip() for peer in args.peers.split(",") if peer.strip()],
        dns_names=args.dns,
        mdns=not args.no_mdns,
        interfaces=args.interface,
        txt=dict(args.txt),
        dns_interval=args.dns_interval,
        service_type=args.service_type,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    _emit("starting", node_id=args.node_id)
    await table.start()
    stopping = asyncio.create_task(stop.wait())
    try:
        _emit("started", node_id=args.node_id)
        deadline = loop.time() + args.duration
        last: list[dict[str, object]] | None = None
        while not stop.is_set() and loop.time() < deadline:
            current = [_describe(candidate) for candidate in table.candidates()]
            if current != last:
                _emit("candidates", candidates=current)
                last = current
            remaining = min(deadline - loop.time(), 3600.0)
            changed = asyncio.create_task(table.wait_for_change(max(0.0, remaining)))
            # Either wakes us: a signal must not wait for the next change.
            await asyncio.wait({changed, stopping}, return_when=asyncio.FIRST_COMPLETED)
            changed.cancel()
    finally:
        stopping.cancel()
        await table.stop()
    _emit("stopped", node_id=args.node_id)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    configure_logging(level=args.log_level, json=True)
    try:
        asyncio.run(run(args))
    except (ValueError, DiscoveryError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
