"""Sample-quality metrics: mode coverage for the 2-D mixtures, classifier FID for images.

Mode coverage follows VEEGAN (Srivastava et al. 2017) / PacGAN (Lin et al. 2018) exactly. For images,
Inception-based FID would need downloaded weights, so the feature network is a small MLP classifier
trained on the same data set (see /work/shared/REFERENCE.md): the Fréchet distance between Gaussians
fitted to its penultimate-layer features of generated and held-out real images.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ---------------------------------------------------------------------------------------------------
# Mode coverage (2-D mixtures)
# ---------------------------------------------------------------------------------------------------

# VEEGAN/PacGAN: a sample is "high quality" when it lies within this many standard deviations of
# its nearest mode.
HIGH_QUALITY_STD_MULTIPLE = 3.0


@dataclass(frozen=True)
class ModeCoverage:
    """Result of :func:`mode_coverage`.

    ``per_mode_counts[m]`` is the number of high-quality samples whose nearest mode is mode ``m``;
    a mode is covered when its count is at least one.
    """

    modes_covered: int
    high_quality_fraction: float
    per_mode_counts: list[int]


def mode_coverage(samples: Tensor, modes: Tensor, std: float) -> ModeCoverage:
    """Modes covered and fraction of high-quality samples, per VEEGAN / PacGAN.

    A sample is high quality if its Euclidean distance to the nearest mode is strictly less than
    3·std; a mode is covered if it is the nearest mode of at least one high-quality sample. Distances
    are computed in float64 so that the 3σ boundary does not depend on the samples' dtype. Ties for
    the nearest mode go to the mode listed first. The published protocol evaluates 2500 samples.
    """
    if not isinstance(samples, Tensor) or not isinstance(modes, Tensor):
        raise ValueError("samples and modes must be torch tensors")
    if samples.dim() != 2 or samples.shape[0] == 0:
        raise ValueError(f"samples must have shape (N, D) with N ≥ 1, got {tuple(samples.shape)}")
    if modes.dim() != 2 or modes.shape[0] == 0:
        raise ValueError(f"modes must have shape (M, D) with M ≥ 1, got {tuple(modes.shape)}")
    if samples.shape[1] != modes.shape[1]:
        raise ValueError(
            f"samples are {samples.shape[1]}-dimensional but modes are {modes.shape[1]}-dimensional"
        )
    if not (isinstance(std, int | float) and math.isfinite(std) and std > 0):
        raise ValueError(f"std must be a positive finite number, got {std!r}")

    points = samples.detach().to(device="cpu", dtype=torch.float64)
    centres = modes.detach().to(device="cpu", dtype=torch.float64)
    # Explicit differences rather than torch.cdist: cdist may use a matmul-based expansion whose
    # rounding could move a sample across the 3σ boundary.
    distances = (points[:, None, :] - centres[None, :, :]).square().sum(dim=2).sqrt()
    nearest_distance, nearest_mode = distances.min(dim=1)
    # NaN distances (diverged generator) compare False and so count as low quality, as they should.
    high_quality = nearest_distance < HIGH_QUALITY_STD_MULTIPLE * float(std)
    counts = torch.bincount(nearest_mode[high_quality], minlength=centres.shape[0])
    per_mode_counts = [int(count) for count in counts.tolist()]
    return ModeCoverage(
        modes_covered=sum(1 for count in per_mode_counts if count > 0),
        high_quality_fraction=float(high_quality.sum().item()) / points.shape[0],
        per_mode_counts=per_mode_counts,
    )


# ---------------------------------------------------------------------------------------------------
# Classifier FID (images)
# ---------------------------------------------------------------------------------------------------

FEATURE_HIDDEN = 128
FEATURE_DIM = 64
# 15 epochs of minibatch Adam reach 96-97.5% held-out accuracy on sklearn digits for every seed and
# split tried, in well under a second. Longer training barely helps accuracy but keeps growing the
# feature scale, and with it every FID value (FIDs are only comparable under the same settings).
DEFAULT_CLASSIFIER_EPOCHS = 15
CLASSIFIER_BATCH_SIZE = 64
CLASSIFIER_LEARNING_RATE = 1e-3
# A class counts as produced when at least this fraction of the samples is classified as it. With
# the recommended ≥ 1000 evaluation samples that is ≥ 10 images, far above what the classifier's ~3%
# error rate scatters into a missing class from a well-populated one (spread over nine classes).
DEFAULT_CLASS_COVERAGE_THRESHOLD = 0.01
# Fixed seeds for the reference-value sample sets, so reports are comparable across runs.
NOISE_REFERENCE_SEED = 12345


@contextmanager
def _single_intra_op_thread() -> Iterator[None]:
    """Run torch on one intra-op thread, restoring the previous count afterwards.

    The classifier's minibatch steps are tiny; splitting them across threads costs more than it
    saves, and when other processes keep the cores busy the threads wait on each other (measured on
    2 cores: 0.2 s on one thread against 4-8 s on two). One thread also makes the trained weights
    independent of the caller's thread setting.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class FeatureClassifier(nn.Module):
    """MLP classifier flatten → 128 → 64 → classes (ReLU) whose 64-d penultimate layer is the FID space.

    Inputs are images (N, *input_shape) scaled to [-1, 1]. :meth:`fit` re-initialises every weight from
    its own ``torch.Generator`` and visits minibatches in an order drawn from that generator, so the
    trained classifier (and every FID computed with it) depends on ``seed`` only, never on the global
    RNG state left behind by other code.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        shape = tuple(input_shape)
        if not shape or any(isinstance(d, bool) or not isinstance(d, int) or d <= 0 for d in shape):
            raise ValueError(
                f"input_shape must be a non-empty tuple of positive integers, got {input_shape!r}"
            )
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer ≥ 2, got {num_classes!r}")
        self.input_shape = shape
        self.num_classes = num_classes
        self.trunk = nn.Sequential(
            nn.Flatten(),
            nn.Linear(math.prod(shape), FEATURE_HIDDEN),
            nn.ReLU(),
            nn.Linear(FEATURE_HIDDEN, FEATURE_DIM),
            nn.ReLU(),
        )
        self.head = nn.Linear(FEATURE_DIM, num_classes)
        self.is_fitted = False

    def _check_images(self, images: Tensor) -> None:
        if not isinstance(images, Tensor) or not images.is_floating_point():
            raise ValueError("images must be a floating-point torch tensor")
        if images.dim() != len(self.input_shape) + 1 or tuple(images.shape[1:]) != self.input_shape:
            expected = ", ".join(map(str, self.input_shape))
            raise ValueError(f"images must have shape (N, {expected}), got {tuple(images.shape)}")
        if images.shape[0] == 0:
            raise ValueError("images is empty")

    def _check_labels(self, images: Tensor, labels: Tensor) -> Tensor:
        if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(f"labels must be a 1-D tensor with one label per image ({images.shape[0]})")
        if labels.is_floating_point():
            raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
        labels = labels.to(torch.long)
        if labels.min().item() < 0 or labels.max().item() >= self.num_classes:
            raise ValueError(f"labels must lie in [0, {self.num_classes - 1}]")
        return labels

    def forward(self, images: Tensor) -> Tensor:
        logits: Tensor = self.head(self.trunk(images))
        return logits

    def _reset_parameters(self, generator: torch.Generator) -> None:
        # PyTorch's own nn.Linear initialisation, but drawn from our generator.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
                bound = 1.0 / math.sqrt(module.in_features)
                nn.init.uniform_(module.bias, -bound, bound, generator=generator)

    def fit(
        self, images: Tensor, labels: Tensor, *, seed: int = 0, epochs: int = DEFAULT_CLASSIFIER_EPOCHS
    ) -> FeatureClassifier:
        """Train from scratch with Adam on minibatches of 64 in a seeded order; returns ``self``."""
        self._check_images(images)
        labels = self._check_labels(images, labels)
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs <= 0:
            raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
        generator = torch.Generator().manual_seed(seed)
        self._reset_parameters(generator)
        inputs = images.detach().to(device="cpu", dtype=torch.float32)
        labels = labels.cpu()
        self.requires_grad_(True)
        optimizer = torch.optim.Adam(self.parameters(), lr=CLASSIFIER_LEARNING_RATE)
        self.train()
        with _single_intra_op_thread():
            for _ in range(epochs):
                order = torch.randperm(inputs.shape[0], generator=generator)
                for start in range(0, inputs.shape[0], CLASSIFIER_BATCH_SIZE):
                    batch = order[start : start + CLASSIFIER_BATCH_SIZE]
                    loss = F.cross_entropy(self(inputs[batch]), labels[batch])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
        self.eval()
        self.requires_grad_(False)
        self.is_fitted = True
        return self

    def _prepare(self, images: Tensor) -> Tensor:
        if not self.is_fitted:
            raise ValueError("FeatureClassifier is not trained yet: call fit() first")
        self._check_images(images)
        return images.detach().to(device="cpu", dtype=torch.float32)

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        """Penultimate-layer (post-ReLU) activations, shape (N, 64)."""
        return self.trunk(self._prepare(images))

    @torch.no_grad()
    def predict(self, images: Tensor) -> Tensor:
        """Predicted class index per image, shape (N,)."""
        return self(self._prepare(images)).argmax(dim=1)

    def accuracy(self, images: Tensor, labels: Tensor) -> float:
        """Fraction of ``images`` whose predicted class equals ``labels``."""
        labels = self._check_labels(images, labels)
        return float((self.predict(images) == labels.cpu()).to(torch.float64).mean().item())


def _as_float64(name: str, value: Tensor, expected_dims: int) -> Tensor:
    tensor = torch.as_tensor(value).detach().to(device="cpu", dtype=torch.float64)
    if tensor.dim() != expected_dims:
        raise ValueError(f"{name} must be {expected_dims}-D, got shape {tuple(tensor.shape)}")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return tensor


def _symmetric_psd_sqrt(matrix: Tensor) -> Tensor:
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    # Rounding can leave tiny negative eigenvalues on a PSD matrix; they are zero in exact arithmetic.
    roots = eigenvalues.clamp(min=0.0).sqrt()
    return (eigenvectors * roots) @ eigenvectors.T


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor, eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    d² = ‖μ1 − μ2‖² + tr Σ1 + tr Σ2 − 2 tr (Σ1 Σ2)^{1/2}, with εI added to both covariances first (in
    every term, so identical statistics give exactly-zero-up-to-rounding distance). The trace term
    uses tr (Σ1 Σ2)^{1/2} = tr (Σ1^{1/2} Σ2 Σ1^{1/2})^{1/2}: the right-hand matrix is symmetric PSD,
    so both square roots come from symmetric eigen-decompositions, no scipy needed.
    """
    mean1 = _as_float64("mu1", mu1, 1)
    mean2 = _as_float64("mu2", mu2, 1)
    cov1 = _as_float64("sigma1", sigma1, 2)
    cov2 = _as_float64("sigma2", sigma2, 2)
    dim = mean1.shape[0]
    if mean2.shape[0] != dim or cov1.shape != (dim, dim) or cov2.shape != (dim, dim):
        raise ValueError(
            f"inconsistent shapes: mu1 {tuple(mean1.shape)}, sigma1 {tuple(cov1.shape)}, "
            f"mu2 {tuple(mean2.shape)}, sigma2 {tuple(cov2.shape)}"
        )
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite non-negative number, got {eps!r}")
    identity = torch.eye(dim, dtype=torch.float64)
    # Symmetrise first: covariance estimates can be asymmetric in the last bits, and eigh reads
    # only one triangle.
    cov1 = (cov1 + cov1.T) / 2 + eps * identity
    cov2 = (cov2 + cov2.T) / 2 + eps * identity
    root1 = _symmetric_psd_sqrt(cov1)
    middle = root1 @ cov2 @ root1
    middle = (middle + middle.T) / 2
    trace_sqrt_product = torch.linalg.eigvalsh(middle).clamp(min=0.0).sqrt().sum()
    distance = (mean1 - mean2).square().sum() + cov1.trace() + cov2.trace() - 2.0 * trace_sqrt_product
    # Mathematically ≥ 0; clamp the rounding-level negatives that identical statistics can produce.
    return max(float(distance.item()), 0.0)


def feature_statistics(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), in float64."""
    values = _as_float64("features", features, 2)
    if values.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {values.shape[0]}")
    mean = values.mean(dim=0)
    centred = values - mean
    covariance = centred.T @ centred / (values.shape[0] - 1)
    return mean, covariance


class ImageQuality:
    """Classifier-FID and class-coverage evaluator for generated images.

    The feature classifier is trained on ``train_images`` / ``train_labels``; the reference statistics
    that generated samples are compared with are those of the held-out images, which the classifier
    never saw. Images are (N, C, H, W) in [-1, 1].

    FID is biased upwards for small sample counts, so compare numbers computed from similar sample
    sizes; :meth:`reference_values` uses as many samples as the train split has images.
    """

    def __init__(
        self,
        train_images: Tensor,
        train_labels: Tensor,
        heldout_images: Tensor,
        heldout_labels: Tensor,
        *,
        seed: int = 0,
        epochs: int = DEFAULT_CLASSIFIER_EPOCHS,
        coverage_threshold: float = DEFAULT_CLASS_COVERAGE_THRESHOLD,
    ) -> None:
        if not isinstance(train_images, Tensor) or train_images.dim() < 2 or train_images.shape[0] < 2:
            raise ValueError("train_images must be a tensor of shape (N, C, H, W) with N ≥ 2")
        if not isinstance(heldout_images, Tensor) or tuple(heldout_images.shape[1:]) != tuple(
            train_images.shape[1:]
        ):
            raise ValueError("heldout_images must be a tensor with the same per-image shape as train_images")
        if heldout_images.shape[0] < 2:
            raise ValueError("need at least 2 held-out images to estimate reference statistics")
        for name, labels in (("train_labels", train_labels), ("heldout_labels", heldout_labels)):
            if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.is_floating_point():
                raise ValueError(f"{name} must be a 1-D integer tensor")
        if not (0.0 < coverage_threshold <= 1.0):
            raise ValueError(f"coverage_threshold must be in (0, 1], got {coverage_threshold!r}")
        # Classes are 0..K-1; take K from both splits so a class absent from one split still counts.
        num_classes = int(torch.cat([train_labels, heldout_labels]).max().item()) + 1
        self.sample_shape = tuple(train_images.shape[1:])
        self.coverage_threshold = coverage_threshold
        self.classifier = FeatureClassifier(self.sample_shape, num_classes).fit(
            train_images, train_labels, seed=seed, epochs=epochs
        )
        self.heldout_accuracy = self.classifier.accuracy(heldout_images, heldout_labels)
        self._train_images = train_images.detach().cpu()
        self._train_labels = train_labels.detach().cpu().to(torch.long)
        self._reference_mean, self._reference_covariance = feature_statistics(
            self.classifier.features(heldout_images)
        )
        self._seed = seed
        self._reference_values: dict[str, float] | None = None

    @property
    def num_classes(self) -> int:
        return self.classifier.num_classes

    def fid(self, samples: Tensor) -> float:
        """Classifier FID of ``samples`` against the held-out real images."""
        mean, covariance = feature_statistics(self.classifier.features(samples))
        return frechet_distance(mean, covariance, self._reference_mean, self._reference_covariance)

    def evaluate(self, samples: Tensor) -> dict[str, float | int | list[int]]:
        """{"classifier_fid", "classes_covered", "class_histogram"} for generated images (N, C, H, W).

        ``class_histogram[k]`` counts the samples classified as class k; a class is covered when that
        count is at least ``coverage_threshold`` · N (and at least one).
        """
        if not isinstance(samples, Tensor) or samples.shape[0] < 2:
            raise ValueError("samples must be a tensor holding at least 2 images")
        if not torch.isfinite(samples).all():
            raise ValueError("samples contain NaN or infinite values")
        histogram = torch.bincount(self.classifier.predict(samples), minlength=self.num_classes)
        minimum_count = max(1, math.ceil(self.coverage_threshold * samples.shape[0]))
        return {
            "classifier_fid": self.fid(samples),
            "classes_covered": int((histogram >= minimum_count).sum().item()),
            "class_histogram": [int(count) for count in histogram.tolist()],
        }

    def reference_values(self) -> dict[str, float]:
        """Anchor FIDs to print next to a model's number (all against the held-out statistics).

        - ``real_data_fid``: the training images themselves, i.e. a generator that samples the
          training distribution perfectly. (Splitting the held-out set in two halves would compare
          two tiny sets and mostly measure small-sample bias.)
        - ``uniform_noise_fid``: i.i.d. uniform pixels in [-1, 1], as many as there are training images.
        - ``one_class_fid``: the training images of the most frequent class only, a fully mode-collapsed
          generator that still draws perfect digits.
        """
        if self._reference_values is None:
            noise_generator = torch.Generator().manual_seed(NOISE_REFERENCE_SEED + self._seed)
            noise = torch.rand(self._train_images.shape, generator=noise_generator) * 2.0 - 1.0
            largest_class = int(torch.bincount(self._train_labels).argmax().item())
            one_class = self._train_images[self._train_labels == largest_class]
            self._reference_values = {
                "real_data_fid": self.fid(self._train_images),
                "uniform_noise_fid": self.fid(noise),
                "one_class_fid": self.fid(one_class),
            }
        return dict(self._reference_values)


__all__ = [
    "DEFAULT_CLASS_COVERAGE_THRESHOLD",
    "HIGH_QUALITY_STD_MULTIPLE",
    "FeatureClassifier",
    "ImageQuality",
    "ModeCoverage",
    "feature_statistics",
    "frechet_distance",
    "mode_coverage",
]
