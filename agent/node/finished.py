"""What a finished agent does: exit (``--when-finished exit``) or stay up (``--when-finished serve``).

Long-lived deployments restart an agent that exits, even with status 0: a Kubernetes DaemonSet always,
compose and systemd with their restart policies, each time with ``--resume``. With ``serve`` an agent
whose run is finished (it just trained the last iteration, or ``--resume`` found the run in ``--out``
finished) keeps its gRPC server up instead, until SIGTERM/SIGINT, then exits 0 at once without writing:

- health: the overall status is SERVING, and the service ``dpgan.v1.Run.finished``
  (``FINISHED_HEALTH_SERVICE``, NOT_SERVING until then) is SERVING, so
  ``python -m agent.node.healthcheck --finished`` tells a finished run from one still training;
- handshakes and status probes are answered: not training, not ready, at the final iteration;
- FetchState hands out the final state (parameters and optimizer state at the final iteration), for a
  peer or a tool that wants the trained model without reading this node's files.

Serving waits on the stop event on the event loop: no compute thread, no polling, no peer probes (the
peer registry stops: this node gossips no more).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from agent.checkpoint import Checkpoint
from agent.node.healthcheck import FINISHED_HEALTH_SERVICE
from agent.node.state import restore_state
from agent.transport._generated.dpgan.v1 import dpgan_pb2 as pb
from agent.transport.identity import identity_mismatch

if TYPE_CHECKING:
    from agent.node.agent import PeerAgent

__all__ = ["FINISHED_HEALTH_SERVICE", "SERVING_EVENT", "WHEN_FINISHED", "FinishedRun"]

WHEN_FINISHED = ("exit", "serve")
SERVING_EVENT = "run finished; serving its results until stopped"


class FinishedRun:
    """The end of one ``PeerAgent``'s run: the "run finished" health entry, and serving under
    ``--when-finished serve``."""

    def __init__(self, agent: PeerAgent) -> None:
        self.agent = agent
        self.serving = False

    async def register(self) -> None:
        """Add the "run finished" health entry, NOT_SERVING (call before the server starts)."""
        await self.agent.server.set_health(FINISHED_HEALTH_SERVICE, False)

    def handshake_policy(self, request: pb.HandshakeRequest) -> tuple[bool, str]:
        """While serving: any compatible node may handshake (to probe or to fetch the final state); it is
        not remembered as a peer, since this node trains with no one any more."""
        mismatch = identity_mismatch(self.agent.identity, request)
        return (False, mismatch) if mismatch is not None else (True, "")

    async def after(
        self, summary: dict[str, Any], final: tuple[Path, Checkpoint] | None = None
    ) -> dict[str, Any]:
        """Called with the run's summary once everything is written; ``final``: the final model when
        --resume found the run finished (else the agent's state is the final one). Returns the summary
        at once unless the run finished and --when-finished serve: then serves until a stop is asked."""
        agent = self.agent
        if not summary.get("finished"):
            return summary
        await agent.server.set_health(FINISHED_HEALTH_SERVICE, True)
        if agent.options.when_finished != "serve" or agent.stop.requested.is_set():
            return summary
        if final is None:
            assert agent.state is not None
            iteration, state = agent.iteration, agent.state
        else:
            path, checkpoint = final
            iteration = checkpoint.iteration
            state = restore_state(agent.problem, agent.config, path, checkpoint, torch.device("cpu"))
        agent.iteration, agent.boundary_state = iteration, (iteration, state)
        agent.training = agent.paused = False
        agent.ready_from = None
        self.serving = True
        await agent.registry.stop()
        await agent.server.set_serving(True)
        agent.log.info(SERVING_EVENT, iteration=iteration, out=str(agent.options.out))
        await agent.stop.requested.wait()
        agent.log.info("stopping; the finished run's results stay as they are", iteration=iteration)
        return summary
