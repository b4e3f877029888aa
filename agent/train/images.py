"""Images in and out, with Pillow only (no matplotlib).

- :func:`normalize_image`: any image Pillow opens, as an image viewer shows it, in 8-bit greyscale or RGB
  (what the ``folder`` data set trains on).
- :func:`save_image_grid`: a grid of generated images, upscaled with nearest neighbour so 8×8 digits
  stay crisp and visible.
- :func:`save_scatter_png`: a scatter plot of 2-D samples with the mixture's modes marked.

Both write to a temporary file in the destination directory and ``os.replace`` it into place, so a
reader (a dashboard, a person refreshing a viewer) never sees a half-written PNG, and a crash mid-write
leaves the previous snapshot intact.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps
from torch import Tensor

from agent.files import write_atomic

# Gap between tiles, in source pixels (before upscaling), and its colour: mid-grey separates tiles
# whether digits are drawn light-on-dark or dark-on-light.
GRID_PADDING = 1
GRID_PADDING_VALUE = 128

SCATTER_BACKGROUND = (255, 255, 255)
SCATTER_AXIS_COLOUR = (225, 225, 225)
SCATTER_SAMPLE_COLOUR = (30, 30, 30)
SCATTER_MODE_COLOUR = (220, 30, 30)
# Auto extent: the view reaches this factor beyond the farthest mode (or the 99th percentile of the
# samples' magnitude when no modes are given), so modes are not drawn on the border.
AUTO_EXTENT_MARGIN = 1.25
# Robust to a handful of diverged samples that would otherwise shrink everything else to a dot.
AUTO_EXTENT_SAMPLE_QUANTILE = 0.99
MIN_EXTENT = 1e-3


# Transparent pixels are composited onto this colour (white, as most image viewers and web pages show
# them), so a colour hidden under alpha 0 never reaches training.
IMAGE_BACKGROUND = (255, 255, 255)
# Full scale of Pillow's integer modes: 16-bit files (PNG, TIFF) open as I;16* or, in older Pillow, as I.
_INTEGER_MODES_MAX = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535}
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def normalize_image(image: Image.Image, mode: str) -> Image.Image:
    """``image`` in 8-bit ``mode`` ("L" greyscale or "RGB"), as an image viewer shows it.

    One step for every mode Pillow returns:

    * EXIF orientation is applied first (a phone photo stored sideways is upright, as viewers show it).
    * 16-bit and 32-bit integer greys (``I;16``, ``I;16B``, ``I;16L``, ``I;16N``, ``I``) are scaled from
      their 16-bit full range 0..65535 to 0..255 (rounded; ``I`` is clipped to that range), never clipped
      at 255 as Pillow's own conversion does (which turns a 16-bit photo into two grey levels).
    * 32-bit float greys (``F``) are read as 0.0 = black .. 1.0 = white (clipped; NaN is black).
    * Transparency (``RGBA``, ``LA``, ``PA``, premultiplied ``RGBa``/``La``, and a palette ``P`` image with
      a transparent colour) is composited onto :data:`IMAGE_BACKGROUND`, white: a fully transparent
      pixel is white whatever colour it hides, a half transparent one is blended with white.
    * Palette (``P``), 1-bit (``1``: 0 and 255), ``CMYK``, ``YCbCr`` and the rest convert with Pillow.
    * Greyscale from colour uses Pillow's ITU-R 601-2 luma; colour from greyscale repeats the grey.
    """
    if mode not in ("L", "RGB"):
        raise ValueError(f"mode must be 'L' or 'RGB', got {mode!r}")
    image = ImageOps.exif_transpose(image)
    if image.mode in _INTEGER_MODES_MAX:
        values = np.asarray(image).astype(np.float64)
        scaled = np.clip(values, 0, _INTEGER_MODES_MAX[image.mode]) * (255 / _INTEGER_MODES_MAX[image.mode])
        image = Image.fromarray(np.rint(scaled).astype(np.uint8), mode="L")
    elif image.mode == "F":
        values = np.nan_to_num(np.asarray(image).astype(np.float64), nan=0.0, posinf=1.0, neginf=0.0)
        image = Image.fromarray(np.rint(np.clip(values, 0.0, 1.0) * 255).astype(np.uint8), mode="L")
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    elif image.mode in ("La", "RGBa"):
        image = image.convert(image.mode[:-1] + "A")  # un-premultiply first
    if image.mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*IMAGE_BACKGROUND, 255))
        image = Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode != mode:
        # RGB -> L: luma; L -> RGB: grey repeated; 1, P, CMYK, YCbCr, ... -> either: Pillow's conversion.
        image = image.convert(mode if image.mode in ("L", "RGB") else "RGB")
        if image.mode != mode:
            image = image.convert(mode)
    return image


def _write_png_atomically(image: Image.Image, path: str | os.PathLike[str]) -> None:
    destination = Path(path)
    if not destination.parent.is_dir():
        raise ValueError(f"cannot write {destination}: directory {destination.parent} does not exist")
    encoded = io.BytesIO()
    image.save(encoded, format="PNG")
    write_atomic(destination, encoded.getvalue())


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def save_image_grid(images: Tensor, path: str | os.PathLike[str], *, nrow: int = 8, scale: int = 4) -> None:
    """Save images (N, C, H, W) with values in [-1, 1] as one PNG grid, ``nrow`` images per row.

    C = 1 gives a greyscale PNG, C = 3 an RGB one. Tiles are separated by a 1-pixel grey gap, and the
    whole grid is upscaled ``scale`` times with nearest neighbour, so the PNG measures
    ``(cols·(W+1)+1)·scale`` × ``(rows·(H+1)+1)·scale`` pixels with cols = min(nrow, N) and
    rows = ceil(N / nrow). Values outside [-1, 1] are clipped and NaN is drawn as black (-1), so a
    diverging generator still produces a picture that shows it.
    """
    if not isinstance(images, Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a tensor of shape (N, C, H, W), got {shape}")
    count, channels, height, width = images.shape
    if count == 0 or height == 0 or width == 0:
        raise ValueError(f"images must be non-empty, got shape {tuple(images.shape)}")
    if channels not in (1, 3):
        raise ValueError(f"images must have 1 (grey) or 3 (RGB) channels, got {channels}")
    _check_positive_int("nrow", nrow)
    _check_positive_int("scale", scale)

    values = images.detach().to(device="cpu", dtype=torch.float32)
    values = torch.nan_to_num(values, nan=-1.0, posinf=1.0, neginf=-1.0).clamp(-1.0, 1.0)
    pixels = ((values + 1.0) * 127.5).round().to(torch.uint8)

    columns = min(nrow, count)
    rows = math.ceil(count / nrow)
    tile_height, tile_width = height + GRID_PADDING, width + GRID_PADDING
    canvas = torch.full(
        (channels, rows * tile_height + GRID_PADDING, columns * tile_width + GRID_PADDING),
        GRID_PADDING_VALUE,
        dtype=torch.uint8,
    )
    for index in range(count):
        top = GRID_PADDING + (index // nrow) * tile_height
        left = GRID_PADDING + (index % nrow) * tile_width
        canvas[:, top : top + height, left : left + width] = pixels[index]

    array = canvas[0].numpy() if channels == 1 else canvas.permute(1, 2, 0).contiguous().numpy()
    # uint8 (H, W) arrays become mode "L" and (H, W, 3) arrays mode "RGB".
    grid = Image.fromarray(array)
    if scale > 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), resample=Image.Resampling.NEAREST)
    _write_png_atomically(grid, path)


def _auto_extent(points: Tensor, modes: Tensor | None) -> float:
    if modes is not None:
        reach = float(modes.abs().max().item())
    elif points.shape[0] > 0:
        reach = float(torch.quantile(points.abs().max(dim=1).values, AUTO_EXTENT_SAMPLE_QUANTILE).item())
    else:
        reach = 1.0
    return max(reach * AUTO_EXTENT_MARGIN, MIN_EXTENT)


def save_scatter_png(
    points: Tensor,
    path: str | os.PathLike[str],
    *,
    modes: Tensor | None = None,
    size: int = 512,
    extent: float | None = None,
) -> None:
    """Save a ``size``×``size`` PNG scatter plot of 2-D samples (N, 2), optionally marking ``modes`` (M, 2).

    The view is the square [-extent, extent]² centred on the origin (where both 2-D benchmarks are
    centred). ``extent=None`` picks 1.25 × the largest mode coordinate, or 1.25 × the 99th percentile
    of the samples' largest coordinate when no modes are given. Samples are small dark dots; modes are
    red crosses drawn on top. Samples outside the view or not finite (a diverged generator) are not
    drawn: the picture should still be produced, and their absence is itself informative.
    """
    if not isinstance(points, Tensor) or points.dim() != 2 or points.shape[1] != 2:
        shape = tuple(points.shape) if isinstance(points, Tensor) else type(points).__name__
        raise ValueError(f"points must be a tensor of shape (N, 2), got {shape}")
    if modes is not None:
        if not isinstance(modes, Tensor) or modes.dim() != 2 or modes.shape[1] != 2 or modes.shape[0] == 0:
            shape = tuple(modes.shape) if isinstance(modes, Tensor) else type(modes).__name__
            raise ValueError(f"modes must be a tensor of shape (M, 2) with M ≥ 1, got {shape}")
        if not torch.isfinite(modes).all():
            raise ValueError("modes contain NaN or infinite values")
    _check_positive_int("size", size)
    if extent is not None and not (isinstance(extent, int | float) and math.isfinite(extent) and extent > 0):
        raise ValueError(f"extent must be a positive finite number or None, got {extent!r}")

    finite_points = points.detach().to(device="cpu", dtype=torch.float64)
    finite_points = finite_points[torch.isfinite(finite_points).all(dim=1)]
    mode_points = None if modes is None else modes.detach().to(device="cpu", dtype=torch.float64)
    half_width = float(extent) if extent is not None else _auto_extent(finite_points, mode_points)

    def to_pixels(coordinates: Tensor) -> Tensor:
        # Image y grows downwards, plot y upwards: flip it.
        pixel_x = (coordinates[:, 0] + half_width) / (2 * half_width) * (size - 1)
        pixel_y = (half_width - coordinates[:, 1]) / (2 * half_width) * (size - 1)
        return torch.stack([pixel_x, pixel_y], dim=1).round()

    image = Image.new("RGB", (size, size), SCATTER_BACKGROUND)
    draw = ImageDraw.Draw(image)
    centre = (size - 1) / 2
    draw.line([(0, centre), (size - 1, centre)], fill=SCATTER_AXIS_COLOUR)
    draw.line([(centre, 0), (centre, size - 1)], fill=SCATTER_AXIS_COLOUR)

    dot_radius = max(1, size // 512)
    sample_pixels = to_pixels(finite_points)
    inside = ((sample_pixels >= 0) & (sample_pixels <= size - 1)).all(dim=1)
    for pixel_x, pixel_y in sample_pixels[inside].tolist():
        draw.rectangle(
            [pixel_x - dot_radius, pixel_y - dot_radius, pixel_x + dot_radius, pixel_y + dot_radius],
            fill=SCATTER_SAMPLE_COLOUR,
        )

    if mode_points is not None:
        arm = max(4, size // 80)
        for pixel_x, pixel_y in to_pixels(mode_points).tolist():
            draw.line([(pixel_x - arm, pixel_y), (pixel_x + arm, pixel_y)], fill=SCATTER_MODE_COLOUR, width=2)
            draw.line([(pixel_x, pixel_y - arm), (pixel_x, pixel_y + arm)], fill=SCATTER_MODE_COLOUR, width=2)

    _write_png_atomically(image, path)


__all__ = ["IMAGE_BACKGROUND", "normalize_image", "save_image_grid", "save_scatter_png"]
