"""``dpgan-agent evaluate``: the quality metrics the agents report, for the generator of one checkpoint.

The metrics are ``agent.train.evaluate.Evaluator``'s, unchanged, built as the agents build it (their
data set, ``config.seed`` for the image classifier):

* ring8 / grid25: ``modes_covered`` (of ``modes_total``) and ``high_quality``, the fraction of samples
  within 3 standard deviations of their nearest mode (VEEGAN / PacGAN);
* labelled image sets (digits, mnist, cifar10, a folder with class sub-folders): ``classifier_fid``
  (Fréchet distance in the feature space of a small classifier trained on the data set, lower is
  better) and ``classes_covered``, with the reference values the simulator prints beside them;
* an unlabelled image folder: no metric (an empty ``quality``);
* ``{"finite": false}`` when the generator produces NaN or Inf.

With ``samples=None`` and ``seed=None`` the numbers are exactly those an agent logs for that parameter
vector (``config.eval_samples`` samples, the evaluation latent stream).
"""

from __future__ import annotations

from typing import Any, cast

import torch

from agent.tools.loading import LoadedModel, latent_stream
from agent.train.evaluate import Evaluator
from agent.train.workload import GanProblem


class _FixedSamples:
    """Stands in for a GanProblem in ``Evaluator.evaluate``: its generator "produces" given samples, so
    samples from anywhere (another seed, an exported generator) get exactly the agents' metric code."""

    def __init__(self, samples: torch.Tensor) -> None:
        self._samples = samples

    def generate(self, x: torch.Tensor, count: int, stream: torch.Generator) -> torch.Tensor:
        return self._samples


def evaluate_samples(evaluator: Evaluator, samples: torch.Tensor) -> dict[str, Any]:
    """``Evaluator.evaluate``'s result for given samples (N, *sample_shape) instead of its own draw."""
    stand_in = cast(GanProblem, _FixedSamples(samples.detach().cpu()))
    return evaluator.evaluate(stand_in, torch.empty(0))


def make_evaluator(model: LoadedModel, samples: int | None = None) -> Evaluator:
    """The Evaluator the agents use for this model (trains the image classifier: about a second on digits)."""
    assert model.dataset is not None, "load_model(..., with_dataset=True) first"
    count = model.config.eval_samples if samples is None else samples
    model.check_count(count, "--samples")
    return Evaluator(model.dataset, count, model.config.seed)


def evaluate_model(model: LoadedModel, samples: int | None = None, seed: int | None = None) -> dict[str, Any]:
    """Metrics of ``model`` on ``samples`` samples (default: the configuration's ``eval_samples``) drawn
    with latents from ``seed`` (default: the agents' evaluation stream). Returns a JSON-ready dict:
    checkpoint, dataset, iteration, samples, seed, latents, quality and reference."""
    evaluator = make_evaluator(model, samples)
    if seed is None:
        quality = evaluator.evaluate(model.problem, model.x)
    else:
        drawn = model.problem.generate(model.x, evaluator.samples, latent_stream(model.config, seed))
        quality = evaluate_samples(evaluator, drawn)
    return {
        "checkpoint": str(model.path),
        "dataset": model.config.dataset,
        "iteration": model.checkpoint.iteration,
        "samples": evaluator.samples,
        "seed": seed,
        "latents": "evaluation stream of the agents" if seed is None else f"torch.Generator seeded {seed}",
        "quality": quality,
        "reference": evaluator.reference(),
    }


def _number(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def describe_result(result: dict[str, Any]) -> str:
    """One line: ``<checkpoint> (<dataset>, iteration k, N samples, latents): metric=value ...``."""
    quality = dict(result["quality"])
    parts = []
    if "modes_covered" in quality and "modes_total" in quality:
        parts.append(f"modes_covered={quality.pop('modes_covered')}/{quality.pop('modes_total')}")
    parts += [f"{key}={_number(value)}" for key, value in quality.items()]
    if not parts:
        parts.append("no metric for this data set")
    reference = result.get("reference") or {}
    if reference:
        parts.append("(reference: " + ", ".join(f"{k}={_number(v)}" for k, v in reference.items()) + ")")
    return (
        f"{result['checkpoint']} ({result['dataset']}, iteration {result['iteration']}, "
        f"{result['samples']} samples, {result['latents']}): " + " ".join(parts)
    )


__all__ = ["describe_result", "evaluate_model", "evaluate_samples", "make_evaluator"]
