"""Node-local settings of the networked agent, its errors and the outcome of a training session."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from agent.core.config import TrainConfig
from agent.core.membership import IsolationPolicy
from agent.transport.options import DEFAULT_CHUNK_BYTES
from agent.transport.tls import TransportSecurity

# Exit status of an agent that left because it was isolated (policy "exit").
EXIT_ISOLATED = 3


class StopRequested(Exception):
    """A stop signal arrived while the node was waiting."""


class AgentError(RuntimeError):
    """The agent cannot start or continue (unreachable peers, refused handshake, bad checkpoint)."""


class NothingToJoin(AgentError):
    """The running cluster finishes before the next boundary at which this node could enter."""


@dataclass(frozen=True)
class AgentOptions:
    """Node-local settings of the networked agent (the cluster-wide ones are in TrainConfig)."""

    node_id: str
    listen_host: str
    listen_port: int
    advertise: str
    peers: tuple[str, ...]
    out: Path
    resume: bool = False
    checkpoint_every: int = 100
    log_every: int = 50
    round_timeout: float = 10.0
    startup_timeout: float = 60.0
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    min_peers: int | None = None  # None: every static peer (or 1 with discovery)
    settle_seconds: float = 0.0  # founders wait this long without new peers before starting
    view_period: int = 10
    probe_interval: float = 1.0
    mdns: bool = False
    dns_names: tuple[str, ...] = ()
    dns_interval: float = 5.0
    interfaces: tuple[str, ...] | None = None
    # Paced pushes (agent/transport/positions.py): "auto" paces on time-varying graphs, where partners
    # change every round and drift apart; "on" and "off" force it.
    pace: str = "auto"
    # Isolation (docs/membership.md): reaching fewer than isolation_min_peers live peers for longer than
    # isolation_timeout seconds (None: 2 x round_timeout) -> the policy, applied at a boundary.
    isolation: str = IsolationPolicy.PAUSE.value
    isolation_min_peers: int | None = None  # None: 1 when the run has peers at all, else 0
    isolation_timeout: float | None = None
    # While a stop is being agreed a silent member is waited for this long before it is left out.
    stop_grace: float = 10.0
    # Run folder (docs/deploy.md, "Run folders and checkpoints"): numbered checkpoints kept besides
    # checkpoint.safetensors, and whether a previous run's results in --out may be replaced.
    keep_checkpoints: int = 3
    overwrite: bool = False
    # When the run is finished: "exit" (status 0) or "serve" (keep the gRPC server up, healthy, handing
    # out the final state until stopped: agent/node/finished.py). With --resume, a run in --out of another
    # configuration or run id is refused ("refuse") or moved into <out>/previous/ ("new-run"): runs.py.
    when_finished: str = "exit"
    on_config_change: str = "refuse"
    # Mutual TLS and the allowlist (docs/security.md); plaintext by default for library use on loopback.
    security: TransportSecurity = field(default_factory=TransportSecurity.insecure)
    # Prometheus /metrics on listen_host:metrics_port (agent/node/telemetry.py); None: off, 0: any port.
    metrics_port: int | None = None
    # Pushes also received on listen_host:data_port over raw TCP/TLS (agent/transport/data_plane.py);
    # None: off, 0: any port (the handshake announces the bound one).
    data_port: int | None = None
    # A progress bar on the terminal (stderr is one and logs are for reading, not JSON).
    progress: bool = False
    # Said once at start (e.g. --insecure on a network address, a certificate about to expire).
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class Outcome:
    kind: str  # finished | stopped | paused | resync | isolated
    source: str = ""  # resync: the peer to re-enter through


def describe_security(config: TrainConfig, security: TransportSecurity) -> dict[str, str]:
    """Log fields saying which run this node is in, where that id came from, and how peers are trusted."""
    origin = (
        "--run-id"
        if config.run_id
        else "the configuration's hash: agents with identical configurations on this network join each "
        "other; give --run-id to keep runs apart"
    )
    if security.enabled and security.credentials is not None:
        tls = f"mutual TLS as {security.credentials.node_id!r}"
        if security.allowed_node_ids is not None:
            tls += f", allowlist of {len(security.allowed_node_ids)} node ids"
    else:
        tls = "off: plaintext, every host that reaches the port is trusted"
    return {"run": config.effective_run_id(), "run_id_from": origin, "tls": tls}
