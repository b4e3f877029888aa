"""``dpgan-agent simulate``: n virtual nodes in one process (the reference the agents reproduce).

Exit status: 0 done; 2 a configuration error (bad key or value, a topology that cannot be built for
``nodes``, data that cannot be loaded as configured); 1 the run failed (training diverged: a node's
parameters became NaN or inf, named with the iteration).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent import __version__
from agent.allocator import keep_freed_memory
from agent.configfile import add_config_flags, config_from_args, with_config_file
from agent.core.config import ConfigError, check_topology
from agent.files import dumps_json
from agent.logs import configure_logging, get_logger
from agent.progress import ProgressBar

EXIT_FAILED = 1
EXIT_USAGE = 2
PROGRESS_EVERY_S = 10.0


def _simulate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dpgan-agent simulate",
        description="Run n virtual DPOSG nodes in one process and write metrics, samples and checkpoints.",
    )
    parser.add_argument("--version", action="version", version=f"dpgan-agent {__version__}")
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
        try:
            check_topology(config, config.nodes)
        except ConfigError as error:
            raise with_config_file(error, args) from None
    except ValueError as error:
        print(f"dpgan-agent simulate: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    import torch

    from agent.core.algorithms import NonFiniteStateError
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
    bar = ProgressBar(config.iterations or 0, desc="simulate")
    last_line = [time.monotonic()]

    def on_iteration(k: int) -> None:
        bar.update_to(k)
        # Without a terminal: a progress line every PROGRESS_EVERY_S seconds, never minutes of silence.
        if not bar.enabled and time.monotonic() - last_line[0] >= PROGRESS_EVERY_S:
            last_line[0] = time.monotonic()
            log.info("progress", iteration=k, **bar.eta_fields(k))

    try:
        summary = run_simulation(
            config,
            args.out,
            progress=lambda record: log.info("evaluation", **_describe(record)),
            on_iteration=on_iteration,
        )
    except NonFiniteStateError as error:
        log.error("simulation failed", error=str(error))
        print(f"dpgan-agent simulate: error: {error}", file=sys.stderr)
        return EXIT_FAILED
    except ValueError as error:  # data or topology the configuration asked for
        print(f"dpgan-agent simulate: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        bar.close()
    log.info("simulation finished", **_describe(summary["final"]), out=str(args.out))
    if args.json:
        print(dumps_json(summary, indent=2))
    return 0
