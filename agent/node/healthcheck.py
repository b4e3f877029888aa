"""``python -m agent.node.healthcheck --address 127.0.0.1:5000 [--timeout 2]``: probe an agent's health.

Calls the standard gRPC health service (``grpc.health.v1.Health/Check``) that every agent serves on
its gossip port, prints the answer and exits 0 when it is SERVING (the agent is training), 1 otherwise
(NOT_SERVING: still waiting for peers or stopping; or no answer within ``--timeout``). Container
health checks (Dockerfile HEALTHCHECK, compose) and probes that cannot speak gRPC themselves use it.

``--alive`` relaxes the test to "the health service answers at all", whatever the status: a liveness
check that must not restart an agent merely because it is still waiting for its peers, yet catches one
whose server no longer responds.

Imports only grpc and the health stubs, so a probe starts in a fraction of a second.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

EXIT_HEALTHY = 0
EXIT_UNHEALTHY = 1

_SERVING = health_pb2.HealthCheckResponse.SERVING
# A probe must reach the address it is given, never an HTTP proxy from the environment.
_CHANNEL_OPTIONS = (("grpc.enable_http_proxy", 0),)


class HealthCheckFailed(Exception):
    """The health service did not answer (unreachable, deadline exceeded, unknown service)."""


def check(address: str, timeout: float, service: str = "") -> str:
    """The serving status name (``SERVING``, ``NOT_SERVING``, ...) `address` reports for `service`.

    `timeout` bounds the whole call, connection included. Raises HealthCheckFailed when no status
    comes back.
    """
    with grpc.insecure_channel(address, options=_CHANNEL_OPTIONS) as channel:
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
    result.add_argument(
        "--service", default="", help="health service name to ask about (default: the whole server)"
    )
    result.add_argument(
        "--alive",
        action="store_true",
        help="exit 0 for any answer, NOT_SERVING included (liveness rather than readiness)",
    )
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        status = check(args.address, args.timeout, args.service)
    except HealthCheckFailed as error:
        print(f"{args.address}: unreachable ({error})")
        return EXIT_UNHEALTHY
    print(f"{args.address}: {status}")
    return EXIT_HEALTHY if status == "SERVING" or args.alive else EXIT_UNHEALTHY


if __name__ == "__main__":
    sys.exit(main())
