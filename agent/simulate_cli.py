"""``dpgan-agent simulate``: n virtual nodes in one process (the reference the agents reproduce)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent.allocator import keep_freed_memory
from agent.configfile import add_config_flags, config_from_args
from agent.logs import configure_logging, get_logger


def _simulate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dpgan-agent simulate",
        description="Run n virtual DPOSG nodes in one process and write metrics, samples and checkpoints.",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/simulate"), help="output folder")
    parser.add_argument("--json", action="store_true", help="also print summary.json to stdout")
    add_config_flags(parser)
    return parser


def _describe(record: dict[str, Any]) -> dict[str, Any]:
    quality = record.get("quality", {})
    fields = {"iteration": record.get("iteration"), **quality}
    for key in ("consensus_distance", "loss_g", "loss_d", "wall_seconds"):
        if key in record:
            value = record[key]
            fields[key] = round(value, 5) if isinstance(value, float) else value
    return fields


def simulate_main(argv: Sequence[str]) -> int:
    args = _simulate_parser().parse_args(argv)
    configure_logging()
    log = get_logger(mode="simulate")
    try:
        config = config_from_args(args)
    except ValueError as error:
        print(f"dpgan-agent simulate: error: {error}", file=sys.stderr)
        return 2
    import torch

    from agent.train.simulate import run_simulation  # heavy imports after argument checks

    keep_freed_memory()
    torch.set_num_threads(config.threads)
    log.info(
        "simulation starting",
        nodes=config.nodes,
        dataset=config.dataset,
        algorithm=config.algorithm,
        topology=config.topology,
        rounds=config.rounds,
        iterations=config.iterations,
        out=str(args.out),
    )
    try:
        summary = run_simulation(
            config, args.out, progress=lambda record: log.info("evaluation", **_describe(record))
        )
    except ValueError as error:
        print(f"dpgan-agent simulate: error: {error}", file=sys.stderr)
        return 2
    log.info("simulation finished", **_describe(summary["final"]), out=str(args.out))
    if args.json:
        print(json.dumps(summary, indent=2))
    return 0
