"""A node's training state in and out: from a checkpoint (resume), to and from a member (FetchState),
so the lifecycle only decides when."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from agent.checkpoint import Checkpoint, CheckpointError
from agent.core.algorithms import NodeState
from agent.core.config import TrainConfig
from agent.node.runs import config_change_message, config_differences
from agent.train.workload import GanProblem
from agent.transport.client import PeerClient
from agent.transport.state import StateSnapshot

STATE_POLL_SECONDS = 0.02
# A member whose served state does not advance for this many round timeouts (and at least MIN_STALL_S:
# the state it serves moves only at view boundaries) will not reach the boundary.
STALL_ROUNDS = 3
MIN_STALL_S = 20.0


def snapshot_of(boundary_state: tuple[int, NodeState] | None) -> StateSnapshot:
    """The state at the latest view boundary: what a joiner entering at that boundary starts from."""
    if boundary_state is None:
        raise RuntimeError("this node has no training state yet")
    iteration, state = boundary_state
    tensors = dict(state.tensors()) | {"step": torch.tensor([float(state.step)])}
    return StateSnapshot(iteration=iteration, round=0, tensors=tensors)


def state_from_snapshot(snapshot: StateSnapshot, device: torch.device) -> NodeState:
    tensors = {name: tensor.to(device) for name, tensor in snapshot.tensors.items()}
    step = int(tensors.pop("step").item()) if "step" in tensors else 0
    return NodeState(
        x=tensors["x"],
        direction=tensors.get("direction"),
        moment1=tensors.get("moment1"),
        moment2=tensors.get("moment2"),
        step=step,
    )


class SourceStalled(RuntimeError):
    """The member a node wanted to enter through stopped advancing before the boundary (it paused, or is
    itself re-entering): waiting longer would wait forever."""


class SourceNotTraining(SourceStalled):
    """The member a node wanted to enter through says it is no longer training (it is itself re-entering,
    paused or finished): it will not reach the boundary while it does not train."""


async def fetch_at_boundary(
    client: PeerClient, boundary: int, timeout: float, training: Callable[[], bool] | None = None
) -> StateSnapshot:
    """Poll a member's FetchState until it serves its state at ``boundary`` or later.

    ``training``: whether the member last said it trains (its latest status); polled with the state.
    Raises PeerUnavailable / PeerRpcError / WireError as the client does, SourceNotTraining as soon as
    the member says it does not train (short of the boundary), and SourceStalled when the member's state
    has not advanced for max(``STALL_ROUNDS`` × ``timeout``, ``MIN_STALL_S``) seconds (a member that
    stopped without saying so).
    """
    last_iteration, last_change = -1, time.monotonic()
    patience = max(STALL_ROUNDS * timeout, MIN_STALL_S)
    while True:
        snapshot = await client.fetch_state(timeout=timeout)
        if snapshot.iteration >= boundary:
            return snapshot
        if training is not None and not training():
            raise SourceNotTraining(
                f"{client.address} is not training (at iteration {snapshot.iteration}, short of the "
                f"boundary {boundary})"
            )
        if snapshot.iteration != last_iteration:
            last_iteration, last_change = snapshot.iteration, time.monotonic()
        elif time.monotonic() - last_change > patience:
            raise SourceStalled(
                f"{client.address} stayed at iteration {snapshot.iteration} for {patience:.0f} s, short "
                f"of the boundary {boundary}"
            )
        await asyncio.sleep(STATE_POLL_SECONDS)


def restore_state(
    problem: GanProblem, config: TrainConfig, path: Path, checkpoint: Checkpoint, device: torch.device
) -> NodeState:
    """The node state of a checkpoint; raises CheckpointError naming the file when it does not fit."""
    if checkpoint.schema_hash != problem.layout.schema_hash():
        raise CheckpointError(f"checkpoint {path} was written for a different model (schema hash differs)")
    # The iteration goal may grow on resume (train longer); everything else must match.
    differing = config_differences(checkpoint.config, config)
    if differing:
        raise CheckpointError(config_change_message(path, differing))
    x = problem.layout.flatten(checkpoint.parameters).to(device)
    optimizer: dict[str, Any] = {k: v.to(device) for k, v in checkpoint.optimizer.items()}
    return NodeState(
        x=x,
        direction=optimizer.get("direction"),
        moment1=optimizer.get("moment1"),
        moment2=optimizer.get("moment2"),
        step=checkpoint.step,
    )
