"""What a run leaves behind: progress lines, periodic checkpoints, evaluations (metrics.jsonl) and the
summary (summary.json)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.checkpoint import CHECKPOINT_NAME, CheckpointError, load_checkpoint
from agent.files import finite_json, write_atomic
from agent.node.gossip import Traffic
from agent.node.options import EXIT_ISOLATED, Outcome
from agent.progress import ProgressBar
from agent.train.evaluate import Evaluator

if TYPE_CHECKING:
    from agent.node.agent import PeerAgent

__all__ = ["CHECKPOINT_NAME", "FINAL_NAME", "RunRecorder", "finished_iteration", "finished_summary"]

FINAL_NAME = "final.safetensors"


def finished_summary(out: Path, iteration: int) -> dict[str, Any]:
    """What a finished run left in ``out/summary.json`` (untouched), for the agent's closing log line."""
    try:
        summary = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        summary = {}
    if not isinstance(summary, dict):
        summary = {}
    return summary | {"finished": True, "iterations": iteration, "final": summary.get("final") or {}}


def finished_iteration(out: Path, iterations: int) -> int | None:
    """The iteration of ``out/final.safetensors`` when it verifies and reached ``iterations`` (the run in
    ``out`` is finished), else None (no final model, a damaged one, or the goal grew: train on)."""
    try:
        final = load_checkpoint(out / FINAL_NAME)
    except CheckpointError:
        return None
    return final.iteration if final.iteration >= iterations else None


def previous_wall_seconds(metrics: Path) -> float:
    """``wall_seconds`` of the last evaluation in ``metrics`` (0 when there is none or it is unreadable)."""
    try:
        lines = [line for line in metrics.read_text().splitlines() if line.strip()]
        value = json.loads(lines[-1]).get("wall_seconds", 0.0) if lines else 0.0
    except (OSError, ValueError, AttributeError):
        return 0.0
    return float(value) if isinstance(value, int | float) and value >= 0 else 0.0


class RunRecorder:
    """Progress lines, periodic checkpoints, evaluations (metrics.jsonl) and the summary of one run."""

    def __init__(self, agent: PeerAgent, evaluator: Evaluator) -> None:
        """``evaluator``: built on the compute thread (``build_evaluator``): for labelled images it trains
        the FID classifier, seconds of CPU during which the event loop must keep answering peers."""
        self.agent = agent
        config = agent.config
        assert config.iterations is not None and config.eval_every is not None
        self.evaluator = evaluator
        self.metrics_path = agent.options.out / "metrics.jsonl"
        if not (agent.options.resume and self.metrics_path.exists()):
            self.metrics_path.write_text("")
        # Wall time continues across resumes: from the last evaluation the previous session wrote.
        self.started = time.perf_counter() - previous_wall_seconds(self.metrics_path)
        self.totals = Traffic()
        self.record: dict[str, Any] = {}
        # A bar on a terminal with console logs; the iteration log lines carry total / percent / ETA.
        self.bar = ProgressBar(
            config.iterations,
            desc=agent.options.node_id,
            initial=agent.iteration,
            enabled=agent.options.progress,
        )

    async def after(self, traffic: Traffic) -> None:
        agent, config, options = self.agent, self.agent.config, self.agent.options
        assert config.iterations is not None and config.eval_every is not None
        totals = self.totals
        totals.compute_seconds += traffic.compute_seconds
        totals.communication_seconds += traffic.communication_seconds
        totals.bytes_sent += traffic.bytes_sent
        totals.bytes_received += traffic.bytes_received
        k = agent.iteration
        assert agent.operator is not None and agent.state is not None
        self.bar.update_to(k, **agent.operator.losses())
        if k % options.log_every == 0 or k == config.iterations:
            agent.log.info(
                "iteration",
                iteration=k,
                # 4 significant digits in the log; metrics.jsonl keeps full precision
                **{key: float(f"{value:.4g}") for key, value in agent.operator.losses().items()},
                # per iteration (a node alone runs several iterations per Traffic record)
                compute_s=round(traffic.compute_seconds / traffic.iterations, 5),
                communication_s=round(traffic.communication_seconds / traffic.iterations, 5),
                bytes_sent=traffic.bytes_sent,
                bytes_received=traffic.bytes_received,
                neighbours=sorted(traffic.participants),
                members=agent.views.view.size,
                iterations_alone=agent.iterations_alone,
                **self.bar.eta_fields(k),
            )
        if k % options.checkpoint_every == 0:
            await agent.in_compute(agent.checkpoint, CHECKPOINT_NAME)
        if k % config.eval_every == 0 or k == config.iterations:
            self.record = {
                "iteration": k,
                "node": options.node_id,
                "wall_seconds": round(time.perf_counter() - self.started, 3),
                "quality": await agent.in_compute(self.evaluator.evaluate, agent.problem, agent.state.x),
                # the samples of this evaluation, beside samples-final.png
                "samples": await agent.in_compute(self._samples, k),
                "members": agent.views.view.size,
                "iterations_alone": agent.iterations_alone,
                **agent.operator.losses(),
            }
            with self.metrics_path.open("a") as handle:
                handle.write(json.dumps(finite_json(self.record), allow_nan=False) + "\n")

    def _samples(self, iteration: int) -> str:
        assert self.agent.state is not None
        name = f"samples-{iteration:07d}.png"
        self.evaluator.save_samples(self.agent.problem, self.agent.state.x, self.agent.options.out / name)
        return name

    async def finish(self, outcome: Outcome) -> dict[str, Any]:
        self.bar.close()
        agent, config = self.agent, self.agent.config
        assert config.iterations is not None
        out = agent.options.out
        finished = agent.iteration >= config.iterations
        if agent.state is not None:
            await agent.in_compute(agent.checkpoint, CHECKPOINT_NAME)
            if finished:
                await agent.in_compute(agent.checkpoint, FINAL_NAME)
                self.evaluator.save_samples(agent.problem, agent.state.x, out / "samples-final.png")
        totals = self.totals
        summary = {
            "mode": "agent",
            "node": agent.options.node_id,
            "index": agent.views.index,
            "members": list(agent.views.view.node_ids),
            "iterations": agent.iteration,
            "finished": finished,
            "outcome": "finished" if finished else outcome.kind,
            "stop_at": agent.stop.stop_at,
            "iterations_alone": agent.iterations_alone,
            "wall_seconds": round(time.perf_counter() - self.started, 3),
            "compute_seconds": round(totals.compute_seconds, 3),
            "communication_seconds": round(totals.communication_seconds, 3),
            "bytes_sent": totals.bytes_sent,
            "bytes_received": totals.bytes_received,
            "paced_pushes": agent.gossip.paced(),
            # How neighbours' pushes met this node's inbox: with paced pushes none arrive ahead.
            "pushes_received": {o.value: count for o, count in agent.inbox.outcome_counts.items()},
            "final": self.record,
            "parameters": agent.problem.layout.numel,
            "schema_hash": agent.identity.schema_hash,
            "config_hash": agent.identity.config_hash,
            "config": config.to_dict(),
        }
        if outcome.kind == "isolated":
            summary["exit_code"] = EXIT_ISOLATED
            agent.log.error(
                "isolated for too long; exiting (--isolation exit)", iterations_alone=agent.iterations_alone
            )
        text = json.dumps(finite_json(summary), indent=2, allow_nan=False)
        write_atomic(out / "summary.json", (text + "\n").encode())
        return summary
