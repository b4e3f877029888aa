"""Quality of a generator held in a flat vector: mode coverage for 2-D mixtures, classifier FID for images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from agent.train.data import Dataset
from agent.train.images import save_image_grid, save_scatter_png
from agent.train.metrics import ImageQuality, mode_coverage
from agent.train.workload import GanProblem, node_seed

EVAL_STREAM_OFFSET = (
    1_000_003  # eval noise comes from its own stream, apart from every node's training stream
)


class Evaluator:
    """Evaluates any flat vector with the same latent noise every time, so evaluations are comparable."""

    def __init__(self, dataset: Dataset, samples: int, seed: int) -> None:
        self.dataset = dataset
        self.samples = samples
        self.seed = seed
        self.image_quality: ImageQuality | None = None
        if dataset.spec.kind == "images" and dataset.is_labelled:
            assert dataset.train_labels is not None and dataset.heldout_labels is not None
            self.image_quality = ImageQuality(
                dataset.train_samples,
                dataset.train_labels,
                dataset.heldout_samples,
                dataset.heldout_labels,
                seed=seed,
            )

    def _stream(self) -> torch.Generator:
        stream = torch.Generator()
        stream.manual_seed(node_seed(self.seed, EVAL_STREAM_OFFSET))
        return stream

    def generate(self, problem: GanProblem, x: torch.Tensor, count: int | None = None) -> torch.Tensor:
        return problem.generate(x, count or self.samples, self._stream()).cpu()

    def evaluate(self, problem: GanProblem, x: torch.Tensor) -> dict[str, Any]:
        samples = self.generate(problem, x)
        if not torch.isfinite(samples).all():
            return {"finite": False}
        spec = self.dataset.spec
        if spec.modes is not None and spec.mode_std is not None:
            coverage = mode_coverage(samples, spec.modes, spec.mode_std)
            return {
                "modes_covered": coverage.modes_covered,
                "modes_total": int(spec.modes.shape[0]),
                "high_quality": coverage.high_quality_fraction,
            }
        if self.image_quality is not None:
            result = self.image_quality.evaluate(samples)
            return {"classifier_fid": result["classifier_fid"], "classes_covered": result["classes_covered"]}
        return {}

    def reference(self) -> dict[str, float]:
        """Reference values to print beside a model's number (held-out real data, noise)."""
        if self.image_quality is None:
            return {}
        return dict(self.image_quality.reference_values())

    def save_samples(self, problem: GanProblem, x: torch.Tensor, path: Path) -> None:
        spec = self.dataset.spec
        if spec.kind == "points":
            save_scatter_png(self.generate(problem, x), path, modes=spec.modes)
        else:
            save_image_grid(self.generate(problem, x, 64), path, nrow=8)
