"""Fault-tolerance trials (issue 9): N trials per scenario of tests/faults.py on real agents, a results table
on stdout and in docs/reliability.md.

    python bench/faults.py                       # 3 trials of every scenario, writes docs/reliability.md
    python bench/faults.py --trials 20 --scenarios stagger stagger-frozen
    python bench/faults.py --trials 1 --no-write

"cut" needs root (network namespaces); without it the scenario is reported as skipped. Runs one cluster
at a time. Every trial's full figures go to --json (default runs/faults/results.json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests import faults  # noqa: E402
from tests.netns import NetnsCluster, netns_unavailable_reason, remove_stale_namespaces  # noqa: E402

# Which figure of a scenario fills each column of the table.
COLUMNS = {
    "recovery": ("recovery_s", "rejoin_s", "dropped_within_s"),
    "speed": ("speed_ratio",),
    "spread": ("spread_ratio",),
    "memory": ("pinned_mib",),
}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with_model = Path("/proc/cpuinfo")
    if with_model.exists():
        for line in with_model.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{platform.node()}: {cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def summarise(values: list[float | None], unit: str = "", fmt: str = "{:.2f}") -> str:
    present = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    missing = len(values) - len(present)
    if not present:
        return "never" if values else "–"
    text = fmt.format(statistics.median(present)) + unit
    if len(present) > 1:
        text += f" ({fmt.format(min(present))}–{fmt.format(max(present))})"
    if missing:
        text += f", {missing}× never"
    return text


def column(results: list[faults.Result], key: str) -> str:
    for figure in COLUMNS[key]:
        values = [r.figures.get(figure, "absent") for r in results]
        if any(v != "absent" for v in values):
            unit = {"recovery_s": " s", "rejoin_s": " s", "dropped_within_s": " s", "pinned_mib": " MiB"}.get(
                figure, "×" if figure.endswith("ratio") else ""
            )
            return summarise([None if v == "absent" else v for v in values], unit)
    return "–"


def key_figures(result: faults.Result) -> str:
    skip = {f for names in COLUMNS.values() for f in names}
    return ", ".join(f"{k}={faults._fmt(v)}" for k, v in result.figures.items() if k not in skip)


def table(rows: dict[str, list[faults.Result]]) -> str:
    lines = [
        "| scenario | trials passed | recovery / rejoin / drop | speed after ÷ before | spread ÷ undisturbed "
        "| memory pinned |",
        "|---|---|---|---|---|---|",
    ]
    for results in rows.values():
        if not results:
            continue
        passed = sum(r.passed for r in results)
        lines.append(
            f"| {results[0].scenario} | {passed}/{len(results)} | {column(results, 'recovery')} "
            f"| {column(results, 'speed')} | {column(results, 'spread')} | {column(results, 'memory')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--scenarios", nargs="*", default=list(faults.SCENARIOS), choices=faults.SCENARIOS)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "faults")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "reliability.md")
    parser.add_argument("--no-write", action="store_true", help="print the table, leave docs/ alone")
    parser.add_argument("--keep", action="store_true", help="keep --json's earlier trials of other scenarios")
    args = parser.parse_args(argv)
    started = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    reason = netns_unavailable_reason()
    if reason is None:
        remove_stale_namespaces()
    reference = None
    if {"freeze", "cut"} & set(args.scenarios):
        reference = faults.undisturbed_spread(args.out)
        print(f"undisturbed spread ({faults.ITERATIONS} iterations, simulator = agents): {reference:.4f}")
    rows: dict[str, list[faults.Result]] = {}
    skipped: dict[str, str] = {}
    for name in args.scenarios:
        rows[name] = []
        if name == "cut" and reason is not None:
            skipped[name] = reason
            continue
        for trial in range(args.trials):
            try:
                result = faults.run_scenario(
                    name, args.out / name, trial=trial, reference=reference,
                    netns_factory=lambda: NetnsCluster(faults.NODES).__enter__(),
                )  # fmt: skip
            except Exception as error:  # a harness or cluster failure counts as a failed trial
                traceback.print_exc()
                result = faults.Result(name, failures=[f"trial crashed: {error!r}"[:300]])
            rows[name].append(result)
            print(f"[{time.time() - started:6.0f} s] trial {trial}: {result}", flush=True)
    json_path = args.json or args.out / "results.json"
    if args.keep and json_path.exists():
        earlier = json.loads(json_path.read_text())
        kept = {
            name: [
                faults.Result(r.get("scenario", name), r["figures"], r["failures"], r["notes"])
                for r in records
            ]
            for name, records in earlier.items()
            if name not in rows
        }
        rows = {
            name: kept.get(name) or rows.get(name, [])
            for name in faults.SCENARIOS
            if name in kept or name in rows
        }
    text = table(rows)
    print()
    print(text)
    records = {
        name: [{"scenario": r.scenario, "figures": r.figures, "failures": r.failures, "notes": r.notes}
               for r in results]
        for name, results in rows.items()
    }  # fmt: skip
    json_path.write_text(json.dumps(records, indent=2, default=str) + "\n")
    if not args.no_write:
        write_doc(args.doc, rows, skipped, args.trials, time.time() - started)
    return 0


def write_doc(path: Path, rows: dict[str, list[faults.Result]], skipped: dict[str, str], trials: int,
              seconds: float) -> None:  # fmt: skip
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    details = []
    for results in rows.values():
        for i, r in enumerate(results):
            status = "pass" if r.passed else "FAIL — " + "; ".join(r.failures)
            notes = f" ({'; '.join(r.notes)})" if r.notes else ""
            details.append(f"- **{r.scenario}**, trial {i}: {key_figures(r)}. {status}{notes}")
    skipped_lines = [f"- {name}: skipped ({why})" for name, why in skipped.items()]
    text = f"""# Reliability: the fault suite (issue 9)

Real `dpgan-agent` processes (4 agents, ring8, `--topology ring --rounds 1 --round-timeout 2
--log-every 10`), faults injected from outside, everything measured from the agents' JSON logs,
checkpoints and `/proc`. Harness: `tests/faults.py`; one trial per scenario in CI:
`pytest tests/test_faults.py` (marks `slow`, `multihost` for the network cut); this table:
`python bench/faults.py --trials {trials}`.

Measured {today} on {machine()}; {trials} trial(s) per scenario, {seconds / 60:.0f} min in all.

{table(rows)}

Done when (issue 9): recovery ≤ {faults.RECOVERY_BOUND_S:.0f} s after a 6 s freeze or a 10 s cut, speed
after ≥ {faults.SPEED_FRACTION:.0%} of before, spread ≤ {faults.SPREAD_FACTOR:.0f}× undisturbed; a restarted
node mixes within {faults.REJOIN_BOUND_S:.0f} s of its start; staggered stops leave one checkpoint iteration
and `--resume` equals the uninterrupted run (≤ {faults.BIT_FOR_BIT_TOLERANCE:g}); a stalled stream is dropped
within {faults.STALL_DROP_BOUND_S:.0f} s, and {faults.WAVES} waves of stalled streams add
≤ {faults.PINNED_BOUND_KIB // 1024} MiB of RSS in all, each after the first
≤ {faults.WAVE_GROWTH_BOUND_KIB // 1024} MiB on average; no "Traceback" in any agent.log; every round that
leaves a neighbour out is explained by a log line naming it.

## How each figure is measured
- **recovery**: from the heal (SIGCONT, link up) to the first "iteration" event after which every node's
  `neighbours` hold both ring neighbours in every event of the observation window (heal + 18 s). For a
  restart (**rejoin**): from the restarted process's start to the first events in which it mixes with both
  neighbours and both mix with it. For stalled streams (**drop**): from the stall to the server ending the
  last stream.
- **speed**: the slowest node's iterations per second from its "iteration" events, 5 s before the fault
  vs [heal + 10 s, heal + 18 s] (restart: [start + 5 s, start + 15 s]).
- **spread**: max L2 distance of a node's final parameters (flattened) to the nodes' mean, divided by the
  same for an undisturbed run (the simulator, which 4 undisturbed agents reproduce bit for bit). A run that
  has not finished 40 s after the observation window is stopped with SIGTERM and the stop checkpoints
  are compared instead ("models=checkpoint at stop").
- **memory pinned**: agent VmRSS after three waves of stalled streams (each held 8 s) minus VmRSS before,
  each the median of 9 readings 0.25 s apart (glibc keeps freed memory for reuse, so RSS does not fall
  back; what matters is that later waves add little: **growth per wave** is (after the last wave − after
  the first) / 2; keeping a wave's payloads would add 38.5 MiB).

## Trials
{chr(10).join(details + skipped_lines)}
"""
    path.write_text(text)
    print(f"wrote {path}")


if __name__ == "__main__":
    raise SystemExit(main())
