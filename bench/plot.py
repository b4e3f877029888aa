"""Seconds per iteration against link rate, one line per system, one panel per cluster size (PNG).

    python bench/plot.py runs/cluster_bench/<stamp>/results.json docs/benchmarks-time-per-iteration.png

Reads the results.json that bench/cluster_bench.py writes and draws with Pillow alone (matplotlib is not
a dependency): log-scaled seconds per iteration (median over the repeat windows) on the y axis, the
shaped rates and the unshaped link on the x axis, slowest link on the left.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

PANEL_WIDTH = 620
PANEL_HEIGHT = 460
MARGIN_LEFT = 70
MARGIN_RIGHT = 20
MARGIN_TOP = 50
MARGIN_BOTTOM = 60
LEGEND_HEIGHT = 120
BACKGROUND = (255, 255, 255)
INK = (30, 30, 30)
GRID = (225, 225, 225)
# Colour-blind-safe palette (Okabe–Ito), one per system in the harness's order.
COLOURS = {
    "ring": (0, 114, 178),
    "ring-t2": (86, 180, 233),
    "one-peer-exp": (0, 158, 115),
    "one-peer-exp-eager": (0, 0, 0),
    "ring-bf16": (204, 121, 167),
    "allreduce": (230, 159, 0),
    "ps": (213, 94, 0),
}
LABELS = {
    "ring": "DPOSG ring, t=1",
    "ring-t2": "DPOSG ring, t=2",
    "one-peer-exp": "DPOSG one-peer exponential (paced)",
    "one-peer-exp-eager": "DPOSG one-peer exponential, unpaced",
    "ring-bf16": "DPOSG ring, t=1, bf16 wire",
    "allreduce": "CPOSG gloo all-reduce",
    "ps": "CPOSG parameter server",
}


def font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def rate_sort_key(rate: float | None) -> float:
    return math.inf if rate is None else rate


def rate_text(rate: float | None) -> str:
    return "unshaped" if rate is None else f"{rate:g} Mbit/s"


def medians(results: list[dict[str, Any]]) -> dict[int, dict[str, dict[float | None, float]]]:
    """nodes -> system -> rate -> median seconds per iteration over that rate's windows."""
    table: dict[int, dict[str, dict[float | None, float]]] = {}
    for result in results:
        if result.get("error"):
            continue
        by_rate: dict[float | None, list[float]] = {}
        for window in result["windows"]:
            if window["seconds_per_iteration"] is not None:
                by_rate.setdefault(window["rate"], []).append(window["seconds_per_iteration"])
        table.setdefault(result["nodes"], {})[result["system"]] = {
            rate: statistics.median(values) for rate, values in by_rate.items()
        }
    return table


def log_ticks(low: float, high: float) -> list[float]:
    ticks = []
    for exponent in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1):
        for mantissa in (1, 2, 5):
            value = mantissa * 10.0**exponent
            if low <= value <= high:
                ticks.append(value)
    return ticks


def paste_rotated(image: Image.Image, text: str, centre: tuple[int, int]) -> None:
    """Vertical text (reading bottom to top) centred at ``centre``; ImageDraw cannot rotate text itself."""
    label_font = font(14)
    left, top, right, bottom = label_font.getbbox(text)
    strip = Image.new("RGB", (right - left + 4, bottom - top + 4), BACKGROUND)
    ImageDraw.Draw(strip).text((2 - left, 2 - top), text, fill=INK, font=label_font)
    rotated = strip.rotate(90, expand=True)
    image.paste(rotated, (centre[0] - rotated.width // 2, centre[1] - rotated.height // 2))


def draw_panel(
    image: Image.Image,
    origin: tuple[int, int],
    title: str,
    series: dict[str, dict[float | None, float]],
    rates: list[float | None],
    y_range: tuple[float, float],
) -> None:
    left = origin[0] + MARGIN_LEFT
    right = origin[0] + PANEL_WIDTH - MARGIN_RIGHT
    top = origin[1] + MARGIN_TOP
    bottom = origin[1] + PANEL_HEIGHT - MARGIN_BOTTOM
    low, high = y_range
    draw = ImageDraw.Draw(image)

    def y_of(value: float) -> float:
        share = (math.log10(value) - math.log10(low)) / (math.log10(high) - math.log10(low))
        return bottom - share * (bottom - top)

    def x_of(index: int) -> float:
        step = (right - left) / len(rates)
        return left + step * (index + 0.5)

    draw.text(((left + right) / 2, origin[1] + 18), title, fill=INK, font=font(18), anchor="mm")
    for tick in log_ticks(low, high):
        y = y_of(tick)
        draw.line([(left, y), (right, y)], fill=GRID, width=1)
        draw.text((left - 8, y), f"{tick:g}", fill=INK, font=font(13), anchor="rm")
    for index, rate in enumerate(rates):
        draw.text((x_of(index), bottom + 14), rate_text(rate), fill=INK, font=font(13), anchor="mt")
    draw.rectangle([left, top, right, bottom], outline=INK, width=1)
    draw.text(((left + right) / 2, bottom + 40), "per-node link rate", fill=INK, font=font(14), anchor="mt")
    paste_rotated(image, "seconds per iteration", (origin[0] + 14, (top + bottom) // 2))
    for system, by_rate in series.items():
        colour = COLOURS.get(system, INK)
        points = [(x_of(i), y_of(by_rate[rate])) for i, rate in enumerate(rates) if rate in by_rate]
        if len(points) > 1:
            draw.line(points, fill=colour, width=3)
        for x, y in points:
            draw.ellipse([x - 5, y - 5, x + 5, y + 5], fill=colour, outline=INK)


def plot_time_per_iteration(results_path: Path, png_path: Path) -> None:
    document = json.loads(results_path.read_text())
    table = medians(document["results"])
    if not table:
        raise SystemExit(f"{results_path}: no successful launch to plot")
    rates = sorted(
        {rate for systems in table.values() for by_rate in systems.values() for rate in by_rate},
        key=rate_sort_key,
    )
    values = [v for systems in table.values() for by_rate in systems.values() for v in by_rate.values()]
    y_range = (10 ** math.floor(math.log10(min(values))), 10 ** math.ceil(math.log10(max(values))))
    sizes = sorted(table)
    image = Image.new("RGB", (PANEL_WIDTH * len(sizes), PANEL_HEIGHT + LEGEND_HEIGHT), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for index, n in enumerate(sizes):
        draw_panel(image, (index * PANEL_WIDTH, 0), f"{n} nodes", table[n], rates, y_range)
    systems = [s for s in COLOURS if any(s in table[n] for n in sizes)]
    columns = max(1, image.width // 300)
    for index, system in enumerate(systems):
        x = 40 + (index % columns) * (image.width - 80) / columns
        y = PANEL_HEIGHT + 15 + (index // columns) * 26
        draw.line([(x, y + 8), (x + 28, y + 8)], fill=COLOURS[system], width=3)
        draw.ellipse([x + 9, y + 3, x + 19, y + 13], fill=COLOURS[system], outline=INK)
        draw.text((x + 36, y + 8), LABELS.get(system, system), fill=INK, font=font(14), anchor="lm")
    header = document.get("header", [])
    facts = [line.split(": ", 1)[1] for line in header if line.startswith(("# machine:", "# model:"))]
    caption = "; ".join(["median over repeat windows, log scale", *facts])
    draw.text((40, image.height - 16), caption, fill=INK, font=font(12), anchor="lm")
    png_path.parent.mkdir(parents=True, exist_ok=True)
    image.save(png_path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="results.json from bench/cluster_bench.py")
    parser.add_argument("png", type=Path, help="output PNG")
    args = parser.parse_args()
    plot_time_per_iteration(args.results, args.png)


if __name__ == "__main__":
    main()
