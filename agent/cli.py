"""The ``dpgan-agent`` command line: dispatches to its commands, importing only what each needs.

``dpgan-agent simulate ...`` (agent.simulate_cli), ``dpgan-agent certs ...`` (agent.security.cli: X.509
only, starts without torch), ``dpgan-agent generate | export | evaluate ...`` (agent.tools.cli: use a
trained checkpoint), otherwise the networked agent (agent.node.main).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    # gRPC core logs every refused TLS handshake (a stranger's probe) at INFO on stderr: a host without a
    # certificate could grow an agent's log without bound. Errors only, unless the operator asks
    # (GRPC_VERBOSITY=info shows why each TLS handshake failed; docs/security.md). Read when grpc loads.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments and arguments[0] == "simulate":
        from agent.simulate_cli import simulate_main

        return simulate_main(arguments[1:])
    if arguments and arguments[0] == "certs":
        from agent.security.cli import certs_main

        return certs_main(arguments[1:])
    if arguments and arguments[0] == "generate":
        from agent.tools.cli import generate_main

        return generate_main(arguments[1:])
    if arguments and arguments[0] == "export":
        from agent.tools.cli import export_main

        return export_main(arguments[1:])
    if arguments and arguments[0] == "evaluate":
        from agent.tools.cli import evaluate_main

        return evaluate_main(arguments[1:])
    from agent.node.main import agent_main  # the networked agent

    return agent_main(arguments)


if __name__ == "__main__":
    sys.exit(main())
