"""A checkpoint → the generator it holds, rebuilt from the configuration stored in the checkpoint.

Every checkpoint the project writes (a simulator's ``node-<i>/final.safetensors``, an agent's
``final.safetensors``, ``checkpoint.safetensors`` or ``checkpoint-<iteration>.safetensors``) carries
the full training configuration in its metadata; the model is rebuilt from it with
``GanProblem.build``, exactly as the agent that trained it did, and the stored tensors must match that
model's tensor schema.

Latents: every command draws z ~ N(0, I), float32, shape (N, latent_dim), on the CPU with
``GanProblem.latent`` from one ``torch.Generator``:

* ``seed=None``: the stream the agents' ``Evaluator`` uses (``node_seed(config.seed, EVAL_STREAM_OFFSET)``),
  so the samples are the ones behind the metrics the agents report and their ``samples-final.png``;
* ``seed=S``: ``torch.Generator().manual_seed(S)``, i.e. ``torch.randn(N, latent_dim, generator=g)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from agent.checkpoint import CHECKPOINT_NAME, Checkpoint, load_checkpoint, load_latest
from agent.core.config import ConfigError, TrainConfig, build_config
from agent.core.schema import SchemaError
from agent.models import build_models
from agent.train.data import DEFAULT_FOLDER_IMAGE_SIZE, Dataset, DatasetSpec, load_dataset
from agent.train.evaluate import EVAL_STREAM_OFFSET
from agent.train.workload import GanProblem, node_seed, resolve_device

FINAL_NAME = "final.safetensors"  # what a finished agent or simulator node leaves in its folder
# Per-sample shape of the image data sets before any ``image_size`` resize: (channels, side).
_NATIVE_IMAGES = {
    "digits": (1, 8),
    "mnist": (1, 28),
    "cifar10": (3, 32),
    "folder": (3, DEFAULT_FOLDER_IMAGE_SIZE),
}
# Classes per image set; a folder's are not known without reading its files.
_IMAGE_CLASSES = {"digits": 10, "mnist": 10, "cifar10": 10, "folder": 0}
# One forward pass draws all samples (the DCGAN's BatchNorm normalises with the batch's own statistics,
# so splitting the batch would change the samples); these bound its memory.
MAX_POINT_SAMPLES = 1_000_000
MAX_IMAGE_SAMPLES = 10_000


class ToolError(ValueError):
    """A tool cannot do what it was asked; the message is one line naming the file or argument."""


def resolve_checkpoint(path: Path) -> tuple[Path, Checkpoint]:
    """Read and verify a checkpoint file; a folder means its ``final.safetensors`` when there is one,
    else its newest checkpoint that verifies (``checkpoint.safetensors``, then the numbered copies)."""
    if path.is_dir():
        if (path / FINAL_NAME).is_file():
            return path / FINAL_NAME, load_checkpoint(path / FINAL_NAME)
        latest = load_latest(path)
        if latest is None:
            raise ToolError(f"{path} is a folder holding neither {FINAL_NAME} nor {CHECKPOINT_NAME}")
        return latest.path, latest.checkpoint
    return path, load_checkpoint(path)


def stored_config(path: Path, checkpoint: Checkpoint) -> TrainConfig:
    """The training configuration the checkpoint was written with (per-dataset defaults filled in)."""
    try:
        return build_config(dict(checkpoint.config))
    except ConfigError as error:
        raise ToolError(f"checkpoint {path}: its stored configuration is not valid here: {error}") from error


def sample_spec(config: TrainConfig) -> DatasetSpec:
    """What the model needs to know about the data, without reading image files: the mixtures are
    built in (and give their modes); an image set's shape follows from its name and ``image_size``."""
    if config.dataset in ("ring8", "grid25"):
        return load_dataset(config.dataset, seed=config.seed).spec
    channels, side = _NATIVE_IMAGES[config.dataset]
    if config.image_size is not None:
        side = config.image_size
    return DatasetSpec(config.dataset, "images", (channels, side, side), _IMAGE_CLASSES[config.dataset])


def latent_stream(config: TrainConfig, seed: int | None) -> torch.Generator:
    """The CPU generator latents come from: the agents' evaluation stream, or one seeded with ``seed``."""
    stream = torch.Generator(device="cpu")
    stream.manual_seed(node_seed(config.seed, EVAL_STREAM_OFFSET) if seed is None else seed)
    return stream


@dataclass
class LoadedModel:
    """A trained model rebuilt from its checkpoint.

    ``x`` is the flat (generator, discriminator) parameter vector on ``problem.device``, as the agents
    hold it; ``dataset`` is the loaded data set when it was asked for (evaluation), else None.
    """

    path: Path
    checkpoint: Checkpoint
    config: TrainConfig
    spec: DatasetSpec
    problem: GanProblem
    x: torch.Tensor
    dataset: Dataset | None = None

    @property
    def latent_dim(self) -> int:
        return self.problem.latent_dim

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.spec.sample_shape)

    def check_count(self, count: int, what: str) -> None:
        """Refuse a sample count outside 1..MAX_*_SAMPLES (``what`` names the flag in the message)."""
        limit = MAX_POINT_SAMPLES if self.spec.kind == "points" else MAX_IMAGE_SAMPLES
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= limit:
            raise ToolError(
                f"{what}: must be an integer from 1 to {limit} for {self.spec.name}, got {count!r}"
            )

    def latents(self, count: int, seed: int | None) -> torch.Tensor:
        """(count, latent_dim) float32 CPU latents: exactly those :meth:`samples` feeds the generator."""
        return self.problem.latent(count, latent_stream(self.config, seed)).cpu()

    def samples(self, count: int, seed: int | None) -> torch.Tensor:
        """(count, *sample_shape) float32 CPU samples of one forward pass: points in data coordinates,
        or images (C, H, W) in [-1, 1]."""
        self.check_count(count, "samples")
        return self.problem.generate(self.x, count, latent_stream(self.config, seed)).cpu()

    def generator_state(self) -> dict[str, torch.Tensor]:
        """The generator's state dict (CPU float32 copies), names without the ``generator.`` prefix."""
        return {
            name.removeprefix("generator."): tensor.detach().cpu().clone()
            for name, tensor in self.checkpoint.parameters.items()
            if name.startswith("generator.")
        }

    def generator_module(self) -> nn.Module:
        """A fresh CPU instance of the project's generator class holding the trained weights (eval mode)."""
        assert self.config.model is not None and self.config.latent_dim is not None
        with torch.random.fork_rng(devices=[]):  # construction draws initial weights: keep the caller's RNG
            generator, _ = build_models(
                self.config.model,
                self.sample_shape,
                latent_dim=self.config.latent_dim,
                width=self.config.width,
            )
        generator.load_state_dict(self.generator_state())
        return generator.eval()


def load_model(
    path: Path, device: str = "cpu", *, with_dataset: bool = False, data_path: str | None = None
) -> LoadedModel:
    """Load ``path`` (a checkpoint file or an agent's folder) and rebuild its model on ``device``.

    ``with_dataset`` also loads the training data set as the agents did (needed by the metrics);
    ``data_path`` replaces the stored ``data_path`` (mnist, cifar10 and folder read files from it).
    Every failure is a ValueError whose message names the file: CheckpointError, DatasetError, ToolError.
    """
    resolved, checkpoint = resolve_checkpoint(path)
    config = stored_config(resolved, checkpoint)
    dataset = None
    if with_dataset:
        dataset = load_dataset(
            config.dataset,
            path=data_path if data_path is not None else config.data_path,
            image_size=config.image_size,
            seed=config.seed,
        )
        spec = dataset.spec
    else:
        spec = sample_spec(config)
    target = resolve_device(device)
    with torch.random.fork_rng(devices=[]):  # GanProblem.build reseeds torch's global RNG
        problem = GanProblem.build(config, spec, target)
    if checkpoint.schema_hash and checkpoint.schema_hash != problem.layout.schema_hash():
        raise ToolError(
            f"checkpoint {resolved}: its tensors were written by another model than its configuration "
            f"builds (schema {checkpoint.schema_hash[:12]} vs {problem.layout.schema_hash()[:12]})"
        )
    try:
        x = problem.layout.flatten(checkpoint.parameters).to(target)
    except SchemaError as error:
        raise ToolError(f"checkpoint {resolved}: {error}") from error
    return LoadedModel(resolved, checkpoint, config, spec, problem, x, dataset)


__all__ = [
    "FINAL_NAME",
    "MAX_IMAGE_SAMPLES",
    "MAX_POINT_SAMPLES",
    "LoadedModel",
    "ToolError",
    "latent_stream",
    "load_model",
    "resolve_checkpoint",
    "sample_spec",
    "stored_config",
]
