"""``python -m agent.node.healthcheck --address 127.0.0.1:5000 [--timeout 2]``: probe an agent's health.

Calls the standard gRPC health service (``grpc.health.v1.Health/Check``) that every agent serves on
its gossip port, prints the answer and exits 0 when it is SERVING (the agent is training, or serves
its finished run under ``--when-finished serve``), 1 otherwise (NOT_SERVING: still waiting for peers,
paused or stopping; or no answer within ``--timeout``). Container
health checks (Dockerfile HEALTHCHECK, compose) and probes that cannot speak gRPC themselves use it.

``--finished`` asks whether the run is finished instead: an agent registers the health service
``dpgan.v1.Run.finished``, NOT_SERVING while the run goes on and SERVING once it is finished (an agent
started with ``--when-finished serve`` keeps answering then); it prints ``finished`` or ``training`` and
exits 0 only when finished.

``--alive`` relaxes the test to "the health service answers at all", whatever the status: a liveness
check that must not restart an agent merely because it is still waiting for its peers, yet catches one
whose server no longer responds.

An agent that serves mutual TLS answers only clients with a certificate of its cluster: give the
node's own ``--tls-cert``, ``--tls-key`` and ``--tls-ca`` (or set ``DPGAN_TLS_CERT``, ``DPGAN_TLS_KEY``
and ``DPGAN_TLS_CA``, which is what the image, compose and the DaemonSet do).

Imports only grpc and the health stubs, so a probe starts in a fraction of a second.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

EXIT_HEALTHY = 0
EXIT_UNHEALTHY = 1

# The health service that says whether the agent's run is finished (SERVING) or not (NOT_SERVING).
FINISHED_HEALTH_SERVICE = "dpgan.v1.Run.finished"

_SERVING = health_pb2.HealthCheckResponse.SERVING
# A probe must reach the address it is given, never an HTTP proxy from the environment.
_CHANNEL_OPTIONS = (("grpc.enable_http_proxy", 0),)
# Every node certificate carries this DNS name (agent.security.certs.CLUSTER_SERVER_NAME; repeated here
# so a probe does not import the X.509 library).
_CLUSTER_SERVER_NAME = "dpgan-peer"


class HealthCheckFailed(Exception):
    """The health service did not answer (unreachable, deadline exceeded, unknown service)."""


def _channel(address: str, tls: tuple[bytes, bytes, bytes] | None) -> grpc.Channel:
    if tls is None:
        return grpc.insecure_channel(address, options=_CHANNEL_OPTIONS)
    cert, key, ca = tls
    credentials = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    options = (*_CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", _CLUSTER_SERVER_NAME))
    return grpc.secure_channel(address, credentials, options=options)


def check(
    address: str, timeout: float, service: str = "", tls: tuple[bytes, bytes, bytes] | None = None
) -> str:
    """The serving status name (``SERVING``, ``NOT_SERVING``, ...) `address` reports for `service`.

    `timeout` bounds the whole call, connection included. `tls`: (certificate, key, CA) PEM bytes for
    an agent that serves mutual TLS. Raises HealthCheckFailed when no status comes back.
    """
    with _channel(address, tls) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as error:
            code = error.code()
            name = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
            raise HealthCheckFailed(f"{name}: {error.details() or 'no details'}") from error
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return value


def parser() -> argparse.ArgumentParser:
    result = argparse.ArgumentParser(
        prog="python -m agent.node.healthcheck",
        description="Ask a dpgan agent's gRPC health service for its status; exit 0 when SERVING.",
    )
    result.add_argument(
        "--address", default="127.0.0.1:5000", help="host:port of the agent (default 127.0.0.1:5000)"
    )
    result.add_argument(
        "--timeout", type=_positive_seconds, default=2.0, help="seconds to wait for the answer (default 2)"
    )
    asked = result.add_mutually_exclusive_group()
    asked.add_argument(
        "--service", default="", help="health service name to ask about (default: the whole server)"
    )
    asked.add_argument(
        "--finished",
        action="store_true",
        help=f"ask whether the run is finished (service {FINISHED_HEALTH_SERVICE}): print 'finished' or "
        "'training', exit 0 only when finished",
    )
    for name, what in (("cert", "this node's certificate"), ("key", "its key"), ("ca", "the cluster CA")):
        variable = f"DPGAN_TLS_{name.upper()}"
        result.add_argument(
            f"--tls-{name}",
            type=Path,
            default=os.environ.get(variable) or None,
            help=f"{what} (PEM) for an agent that serves mutual TLS (default: ${variable})",
        )
    result.add_argument(
        "--alive",
        action="store_true",
        help="exit 0 for any answer, NOT_SERVING included (liveness rather than readiness)",
    )
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    files = (args.tls_cert, args.tls_key, args.tls_ca)
    tls = None
    if any(files):
        if not all(files):
            print("error: --tls-cert, --tls-key and --tls-ca go together", file=sys.stderr)
            return EXIT_UNHEALTHY
        try:
            cert, key, ca = (Path(path).read_bytes() for path in files)
        except OSError as error:
            print(f"error: cannot read {error.filename}: {error.strerror}", file=sys.stderr)
            return EXIT_UNHEALTHY
        tls = (cert, key, ca)
    service = FINISHED_HEALTH_SERVICE if args.finished else args.service
    try:
        status = check(args.address, args.timeout, service, tls)
    except HealthCheckFailed as error:
        print(f"{args.address}: unreachable ({error})")
        return EXIT_UNHEALTHY
    if args.finished:
        print(f"{args.address}: {'finished' if status == 'SERVING' else 'training'}")
    else:
        print(f"{args.address}: {status}")
    return EXIT_HEALTHY if status == "SERVING" or args.alive else EXIT_UNHEALTHY


if __name__ == "__main__":
    sys.exit(main())
