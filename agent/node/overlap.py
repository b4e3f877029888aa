"""``overlap``: an agent's iteration with the gradient computed while the gossip rounds run.

DPOSG takes the gradient at the mixed point, after the gossip rounds; with ``overlap`` the gradient is
taken at the node's own (extrapolated) x on a second thread while the rounds of x run, then
x = x̃ − η·g (D-PSGD's form of the step; docs/compression.md). ``VirtualCluster(..., overlap=True)``
computes the same update, bit for bit.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch

from agent.core.algorithms import NodeState, advance, extrapolate
from agent.node.gossip import Traffic

if TYPE_CHECKING:
    from agent.node.agent import PeerAgent


class OverlappedIterations:
    """Runs an agent's iterations with overlap; owns the gradient thread (``dpgan-gradient-<node>``)."""

    def __init__(self, agent: PeerAgent, initializer: Any, threads: int) -> None:
        self.agent = agent
        self.thread = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix=f"dpgan-gradient-{agent.options.node_id}",
            initializer=initializer,
            initargs=(threads,),
        )

    def close(self) -> None:
        self.thread.shutdown(wait=True)

    def _gradient_at_own_point(self, state: NodeState) -> tuple[torch.Tensor, float]:
        agent = self.agent
        assert agent.operator is not None
        started = time.perf_counter()
        gradient = agent.operator(extrapolate(agent.algorithm, state, state.x, agent.hyper))
        return gradient, time.perf_counter() - started

    async def iterate(self, iteration: int, traffic: Traffic) -> Traffic | None:
        """One iteration; None when the agreed stop was reached while a round waited (the state before this
        iteration is kept, and so is the data stream: the gradient drew a minibatch a resumed run must
        draw again)."""
        agent = self.agent
        assert agent.state is not None
        state = agent.state
        stream_before = agent.stream.get_state()
        loop = asyncio.get_running_loop()
        gradient = loop.run_in_executor(self.thread, self._gradient_at_own_point, state)
        started = time.perf_counter()
        x: torch.Tensor | None = state.x
        try:
            for round_ in range(agent.config.rounds):
                assert x is not None
                x = await agent.gossip.round(x, iteration, round_, traffic)
                if x is None:
                    break
        finally:
            g, compute_seconds = await gradient
        if x is not None and not await agent.commit_step(iteration):
            x = None  # the agreed stop is here: abandoned like a round the stop interrupted
        traffic.communication_seconds = time.perf_counter() - started
        if x is None:
            agent.stream.set_state(stream_before)
            return None
        compute_started = time.perf_counter()
        agent.state = await agent.in_compute(advance, agent.algorithm, state, x, g, agent.hyper)
        traffic.compute_seconds = compute_seconds + time.perf_counter() - compute_started
        return traffic
