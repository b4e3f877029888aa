"""``dpgan-agent [--listen H:P] [--peers A,B] [--config F] ...``: run one peer, or ``--local N`` peers."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from agent import __version__
from agent.allocator import keep_freed_memory
from agent.configfile import add_config_flags, config_from_args, with_config_file
from agent.core.config import ConfigError, TrainConfig
from agent.core.membership import MembershipError, check_node_id
from agent.discovery.addresses import resolve_advertise
from agent.logs import configure_logging, get_logger
from agent.transport.options import DEFAULT_CHUNK_BYTES, validate_chunk_bytes

EXIT_USAGE = 2
EXIT_FAILED = 1


def split_host_port(value: str, what: str) -> tuple[str, int]:
    host, separator, port_text = value.rpartition(":")
    if not separator or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{what}: expected host:port, got {value!r}")
    return host.strip("[]"), int(port_text)


def agent_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dpgan-agent",
        description="Decentralized GAN training peer (DPOSG). See 'dpgan-agent simulate --help' too.",
    )
    parser.add_argument("--version", action="version", version=f"dpgan-agent {__version__}")
    parser.add_argument(
        "--local", type=int, metavar="N", help="start N agent processes on loopback and train"
    )
    parser.add_argument(
        "--listen", default="0.0.0.0:5000", help="gRPC listen address host:port (port 0: any)"
    )
    parser.add_argument(
        "--advertise",
        help="host:port peers should dial; 'auto': the address of the interface holding the default route "
        "(default: the listen address, or 'auto' when listening on 0.0.0.0)",
    )
    parser.add_argument("--peers", default="", help="comma-separated host:port of the other agents")
    parser.add_argument(
        "--node-id",
        help="stable unique node id (default: the common name of --tls-cert, else the advertised address)",
    )
    parser.add_argument(
        "--node-id-file",
        type=Path,
        help="keep the node id in this file (first start: --node-id or the hostname), so a container "
        "re-created over the same data volume keeps its identity",
    )
    parser.add_argument(
        "--tls-issue-from",
        type=Path,
        metavar="CA_DIR",
        help="issue this node's certificate at start from CA_DIR/ca.crt and ca.key into <out>/tls (kept "
        "while valid); for single-host clusters whose nodes share one trust domain (compose)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve Prometheus metrics at http://<listen host>:PORT/metrics (0: any free port)",
    )
    parser.add_argument(
        "--data-port",
        type=int,
        metavar="PORT",
        help="also receive gossip pushes on this TCP port, raw bytes beside gRPC (0: any free port; "
        "announced in the handshake; plaintext, so not with --tls-*). Faster than gRPC for vectors of "
        "1 MiB and up on fast links (docs/transport.md); peers that cannot reach it push over gRPC",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="allow plaintext gRPC on a network address (without TLS every host that reaches the port "
        "can join the run); without it an agent with no --tls-* listens on loopback only",
    )
    parser.add_argument("--out", type=Path, help="output folder (default runs/agent-<node id> or runs/local)")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    parser.add_argument("--checkpoint-every", type=int, default=100, help="iterations between checkpoints")
    parser.add_argument("--log-every", type=int, default=50, help="iterations between progress log lines")
    parser.add_argument(
        "--round-timeout", type=float, default=10.0, help="seconds to wait for a neighbour per round"
    )
    parser.add_argument("--startup-timeout", type=float, default=60.0, help="seconds to wait for all --peers")
    parser.add_argument(
        "--chunk-bytes", type=int, default=DEFAULT_CHUNK_BYTES, help="gossip stream chunk size"
    )
    parser.add_argument(
        "--min-peers",
        type=int,
        help="peers that must answer before training starts (default: all --peers, else 1)",
    )
    parser.add_argument(
        "--settle", type=float, default=None, help="seconds without new peers before founding"
    )
    parser.add_argument(
        "--view-period",
        type=int,
        default=10,
        help="iterations between membership-view boundaries (cluster-wide)",
    )
    parser.add_argument("--probe-interval", type=float, default=1.0, help="seconds between liveness probes")
    parser.add_argument(
        "--isolation",
        choices=("pause", "continue", "exit"),
        default="pause",
        help="when the node reaches too few peers for --isolation-timeout s: pause at a boundary (not "
        "ready; rejoin on heal), continue alone (counted in logs and summary) or exit with status 3",
    )
    parser.add_argument(
        "--isolation-min-peers",
        type=int,
        help="live peers a node must reach to keep training (default 1; 0 with no peers configured)",
    )
    parser.add_argument(
        "--isolation-timeout",
        type=float,
        help="seconds below --isolation-min-peers before the policy applies (default 2 x --round-timeout)",
    )
    parser.add_argument(
        "--stop-grace",
        type=float,
        default=10.0,
        help="while a stop is being agreed, seconds to wait for a silent member before leaving it out; "
        "at the agreed stop, seconds to wait until every member confirmed it",
    )
    parser.add_argument(
        "--pace",
        choices=("auto", "on", "off"),
        default="auto",
        help="send a round's vector only once the neighbour has entered that round "
        "(auto: on time-varying graphs such as one_peer_exponential)",
    )
    parser.add_argument(
        "--discovery",
        choices=("mdns", "none"),
        help="mdns: advertise and browse _dpgan._tcp.local. (default when neither --peers nor --dns-name)",
    )
    parser.add_argument(
        "--dns-name",
        action="append",
        default=[],
        help="name[:port] re-resolved for peers (compose service, k8s headless Service); repeatable",
    )
    parser.add_argument("--dns-interval", type=float, default=5.0, help="seconds between DNS re-resolutions")
    parser.add_argument(
        "--interface",
        help="interface name or IPv4 address to advertise and to run mDNS on (multi-homed hosts)",
    )
    parser.add_argument("--log-format", choices=("auto", "json", "console"), default="auto")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start a fresh run in an --out that holds a previous run's results, deleting them "
        "(without it, or --resume, such a folder is refused)",
    )
    parser.add_argument(
        "--keep-checkpoints",
        type=int,
        default=3,
        metavar="K",
        help="numbered checkpoints kept besides checkpoint.safetensors, the fallbacks when the newest "
        "is damaged",
    )
    parser.add_argument(
        "--when-finished",
        choices=("exit", "serve"),
        default="exit",
        help="when the run is finished (also when --resume finds it finished): exit 0, or serve: keep the "
        "gRPC server up and healthy, reporting the run finished and handing out the final state, until "
        "SIGTERM/SIGINT (for deployments that restart an agent that exits: DaemonSet, compose, systemd)",
    )
    parser.add_argument(
        "--on-config-change",
        choices=("refuse", "new-run"),
        default="refuse",
        help="with --resume, when --out holds a run of another configuration (any cluster key but "
        "iterations) or run id: refuse (exit 1 naming the keys), or new-run: move that run's files into "
        "<out>/previous/<run id>-<UTC time>/ (nothing is deleted) and start a new run",
    )
    add_config_flags(parser)
    return parser


def _positive(value: float, what: str) -> None:
    if not value > 0:
        raise ValueError(f"{what}: must be positive, got {value}")


def build_options(args: argparse.Namespace, config: TrainConfig):  # noqa: ANN201 - AgentOptions (lazy)
    from agent.node.options import AgentOptions
    from agent.node.trust import certificate_id, configure_trust, issue_own_certificate, persistent_node_id

    host, port = split_host_port(args.listen, "--listen")
    if port == 0 and args.advertise in (None, "", "auto"):
        raise ValueError("--listen with port 0 needs --advertise HOST:PORT (peers must know the port)")
    # A wildcard --listen with no --advertise advertises what --advertise auto picks (never 127.0.0.1)
    # or fails naming the flag: see agent.discovery.addresses.
    advertise = resolve_advertise(args.advertise, host, port, args.interface)
    split_host_port(advertise, "--advertise")
    peers = tuple(p.strip() for p in args.peers.split(",") if p.strip())
    for peer in peers:
        split_host_port(peer, "--peers")
    if advertise in peers:
        raise ValueError(f"--peers lists this agent's own address {advertise}")
    if len(set(peers)) != len(peers):
        raise ValueError("--peers lists an address twice")
    given_id = args.node_id
    if args.node_id_file is not None:
        # With a certificate, its common name is the id a new file records (configure_trust checks it).
        first = args.node_id or (certificate_id(Path(config.tls_cert)) if config.tls_cert else None)
        given_id = persistent_node_id(args.node_id_file, args.node_id, default=first)
    if args.tls_issue_from is not None:
        if config.tls_cert or config.tls_key:
            raise ValueError("--tls-issue-from issues --tls-cert and --tls-key itself; give one or the other")
        if given_id is None:
            raise ValueError("--tls-issue-from needs the node id first: give --node-id or --node-id-file")
        folder = (args.out or Path("runs") / f"agent-{given_id}") / "tls"
        cert, key, ca = issue_own_certificate(args.tls_issue_from, given_id, folder)
        config = dataclasses.replace(config, tls_cert=cert, tls_key=key, tls_ca=config.tls_ca or ca)
    trust = configure_trust(
        config,
        node_id=given_id,
        hosts=(host, split_host_port(advertise, "--advertise")[0]),
        insecure=args.insecure,
    )
    node_id = check_node_id(trust.node_id or given_id or advertise)
    if args.data_port is not None and trust.security.enabled:
        raise ValueError(
            "--data-port: the data plane is plaintext and this agent runs mutual TLS (--tls-*); drop "
            "--data-port, or run without TLS on a trusted network (docs/transport.md)"
        )
    for value, what in ((args.checkpoint_every, "--checkpoint-every"), (args.log_every, "--log-every")):
        _positive(value, what)
    _positive(args.round_timeout, "--round-timeout")
    _positive(args.startup_timeout, "--startup-timeout")
    validate_chunk_bytes(args.chunk_bytes)
    if args.min_peers is not None and args.min_peers < 0:
        raise ValueError(f"--min-peers: must be >= 0, got {args.min_peers}")
    _positive(args.view_period, "--view-period")
    if args.isolation_min_peers is not None and args.isolation_min_peers < 0:
        raise ValueError(f"--isolation-min-peers: must be >= 0, got {args.isolation_min_peers}")
    if args.isolation_timeout is not None:
        _positive(args.isolation_timeout, "--isolation-timeout")
    _positive(args.stop_grace, "--stop-grace")
    _positive(args.probe_interval, "--probe-interval")
    if args.data_port is not None and not 0 <= args.data_port <= 65535:
        raise ValueError(f"--data-port: must be 0 to 65535, got {args.data_port}")
    if args.settle is not None and args.settle < 0:
        raise ValueError(f"--settle: must be >= 0, got {args.settle}")
    dns_names = tuple(name.strip() for value in args.dns_name for name in value.split(",") if name.strip())
    mdns = args.discovery == "mdns" or (args.discovery is None and not peers and not dns_names)
    _positive(args.dns_interval, "--dns-interval")
    safe_id = "".join(c if c.isalnum() or c in "-_." else "_" for c in node_id)
    if args.keep_checkpoints < 1:
        raise ValueError(f"--keep-checkpoints: must be at least 1, got {args.keep_checkpoints}")
    from agent.files import check_run_folder

    check_run_folder(
        args.out or Path("runs") / f"agent-{safe_id}", resume=args.resume, overwrite=args.overwrite
    )
    return AgentOptions(
        node_id=node_id,
        listen_host=host,
        listen_port=port,
        advertise=advertise,
        peers=peers,
        out=args.out or Path("runs") / f"agent-{safe_id}",
        resume=args.resume,
        checkpoint_every=args.checkpoint_every,
        log_every=args.log_every,
        round_timeout=args.round_timeout,
        pace=args.pace,
        startup_timeout=args.startup_timeout,
        chunk_bytes=args.chunk_bytes,
        min_peers=args.min_peers,
        mdns=mdns,
        dns_names=dns_names,
        dns_interval=args.dns_interval,
        interfaces=(args.interface,) if args.interface else None,
        settle_seconds=args.settle if args.settle is not None else 0.0,
        view_period=args.view_period,
        probe_interval=args.probe_interval,
        isolation=args.isolation,
        isolation_min_peers=args.isolation_min_peers,
        isolation_timeout=args.isolation_timeout,
        stop_grace=args.stop_grace,
        keep_checkpoints=args.keep_checkpoints,
        overwrite=args.overwrite,
        when_finished=args.when_finished,
        on_config_change=args.on_config_change,
        security=trust.security,
        metrics_port=args.metrics_port,
        data_port=args.data_port,
        progress=sys.stderr.isatty() and args.log_format != "json",
        warnings=trust.warnings,
    )


async def _run_agent(agent) -> int:  # noqa: ANN001 - PeerAgent
    loop = asyncio.get_running_loop()
    signals_seen = 0

    def on_signal(signum: int) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen > 1:
            os._exit(128 + signum)  # a second signal: leave at once
        agent.log.info("stop requested; agreeing a stop boundary", signal=signal.Signals(signum).name)
        agent.request_stop()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    summary = await agent.run()
    # Everything is written: a stop that arrives now (an operator stopping nodes one by one) has nothing
    # left to do and must not turn a clean exit into death by signal once the event loop is gone.
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(signum)
        signal.signal(signum, signal.SIG_IGN)
    agent.log.info(
        "agent finished" if summary["finished"] else "agent stopped",
        iterations=summary["iterations"],
        quality=summary["final"].get("quality"),
        out=str(agent.options.out),
    )
    return int(summary.get("exit_code", 0))


def agent_main(argv: Sequence[str]) -> int:
    args = agent_parser().parse_args(argv)
    configure_logging(
        level=os.environ.get("DPGAN_LOG_LEVEL", "info"),
        json={"auto": None, "json": True, "console": False}[args.log_format],
    )
    try:
        config = config_from_args(args)
        if args.local is not None:
            from agent.node.local import run_local_cluster

            try:
                return run_local_cluster(args.local, argv, args.out or Path("runs/local"), config)
            except ConfigError as error:  # the topology for --local's node count
                raise with_config_file(error, args) from None
        options = build_options(args, config)
    except (ValueError, MembershipError) as error:
        print(f"dpgan-agent: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    import torch  # after the arguments: --help and --version start without it

    from agent.core.topology import TopologyError
    from agent.train.data import DatasetError

    keep_freed_memory()
    torch.set_num_threads(config.threads)
    from agent.checkpoint import CheckpointError
    from agent.discovery import DiscoveryError
    from agent.node.agent import PeerAgent
    from agent.node.options import AgentError

    log = get_logger(node=options.node_id)
    for warning in options.warnings:
        log.warning(warning)
    try:
        agent = PeerAgent(config, options)
        return asyncio.run(_run_agent(agent))
    except (ConfigError, TopologyError, DatasetError) as error:  # configuration errors: the usage status
        log.error("agent failed", error=str(error))
        print(f"dpgan-agent: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (AgentError, CheckpointError, DiscoveryError, ValueError, OSError) as error:
        log.error("agent failed", error=str(error))
        print(f"dpgan-agent: error: {error}", file=sys.stderr)
        return EXIT_FAILED
