"""``dpgan-agent generate``: samples of a checkpoint's generator, written in the format ``--out`` names.

Samples come from one forward pass of the project's generator on N latents (see agent.tools.loading
for the latent streams), float32, shape (N, *sample_shape): 2-D points in the data's own coordinates
(ring8 modes on the unit circle, grid25 modes at even coordinates in [-4, 4]), or images (C, H, W) in
[-1, 1]. The same checkpoint, N and seed give identical bytes in every output format.

``--out`` by its suffix:

* ``.png``: points → the scatter plot the agents draw (``save_scatter_png``, modes as red crosses);
  images → one grid of ceil(√N) columns, upscaled 4× (``save_image_grid``, as ``samples-*.png``).
* ``.npy``: the samples as a float32 numpy array (N, *sample_shape).
* ``.safetensors``: tensor ``samples`` (N, *sample_shape) and tensor ``latents`` (N, latent_dim), with
  one metadata entry ``dpgan`` (JSON: checkpoint, iteration, dataset, seed).
* a folder (an existing one, or a path without a suffix; created): images → ``sample-00000.png``, ...
  one PNG per sample at the data's resolution (pixel byte = round((x + 1) · 127.5), clipped; greyscale
  for one channel, RGB for three); points, which make no sense one file per point, → ``samples.npy``.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save as save_safetensors

from agent.files import dumps_json, write_atomic
from agent.tools.loading import LoadedModel, ToolError
from agent.train.images import save_image_grid, save_scatter_png

OutputKind = Literal["png", "npy", "safetensors", "folder"]
SUFFIXES: dict[str, OutputKind] = {".png": "png", ".npy": "npy", ".safetensors": "safetensors"}
MAX_GRID_IMAGES = 4096  # a PNG grid beyond this is unwieldy: write a folder or .npy instead


def output_kind(out: Path) -> OutputKind:
    """What ``out`` asks for: a file format by its suffix (case-insensitive), else a folder."""
    if out.is_dir() or out.suffix == "":
        return "folder"
    kind = SUFFIXES.get(out.suffix.lower())
    if kind is None:
        raise ToolError(
            f"--out {out}: unknown suffix {out.suffix!r}; use .png, .npy, .safetensors or a folder"
        )
    if out.exists() and not out.is_file():
        raise ToolError(f"--out {out}: exists and is not a file")
    return kind


def _npy_bytes(samples: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, samples.numpy(), allow_pickle=False)
    return buffer.getvalue()


def image_pixels(image: torch.Tensor) -> np.ndarray:
    """One image (C, H, W) in [-1, 1] → uint8 (H, W) or (H, W, 3): round((x + 1) · 127.5), NaN → 0,
    clipped to 0..255 (the inverse of how the data sets map bytes to [-1, 1])."""
    values = torch.nan_to_num(image.float(), nan=-1.0, posinf=1.0, neginf=-1.0).clamp(-1.0, 1.0)
    pixels = ((values + 1.0) * 127.5).round().to(torch.uint8)
    return pixels[0].numpy() if pixels.shape[0] == 1 else pixels.permute(1, 2, 0).contiguous().numpy()


def _png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _metadata(model: LoadedModel, count: int, seed: int | None) -> dict[str, str]:
    # One entry: safetensors writes several metadata entries in a varying order, which would make the
    # bytes differ between runs.
    facts = {
        "checkpoint": model.path.name,
        "iteration": model.checkpoint.iteration,
        "dataset": model.config.dataset,
        "samples": count,
        "seed": seed,
        "latents": "evaluation stream of the agents" if seed is None else f"torch.Generator seeded {seed}",
    }
    return {"dpgan": dumps_json(facts, sort_keys=True)}


def write_samples(model: LoadedModel, count: int, out: Path, seed: int | None = None) -> list[Path]:
    """Draw ``count`` samples with latents from ``seed`` (None: the agents' evaluation stream) and
    write them to ``out`` as described in the module docstring; returns the files written."""
    kind = output_kind(out)
    model.check_count(count, "--num")
    images = model.spec.kind == "images"
    if kind == "png" and images and count > MAX_GRID_IMAGES:
        raise ToolError(f"--num: a PNG grid holds at most {MAX_GRID_IMAGES} images; write a folder or .npy")
    samples = model.samples(count, seed).contiguous()
    if kind == "folder":
        out.mkdir(parents=True, exist_ok=True)
        if not images:
            write_atomic(out / "samples.npy", _npy_bytes(samples))
            return [out / "samples.npy"]
        digits = max(5, len(str(count - 1)))
        written = []
        for index in range(count):
            target = out / f"sample-{index:0{digits}d}.png"
            write_atomic(target, _png_bytes(image_pixels(samples[index])))
            written.append(target)
        return written
    out.parent.mkdir(parents=True, exist_ok=True)
    if kind == "npy":
        write_atomic(out, _npy_bytes(samples))
    elif kind == "safetensors":
        tensors = {"samples": samples, "latents": model.latents(count, seed).contiguous()}
        write_atomic(out, save_safetensors(tensors, metadata=_metadata(model, count, seed)))
    elif images:
        save_image_grid(samples, out, nrow=math.ceil(math.sqrt(count)))
    else:
        if model.sample_shape != (2,):
            raise ToolError(f"--out {out}: a scatter plot needs 2-D points, these are {model.sample_shape}")
        save_scatter_png(samples, out, modes=model.spec.modes)
    return [out]


__all__ = ["MAX_GRID_IMAGES", "SUFFIXES", "image_pixels", "output_kind", "write_samples"]
