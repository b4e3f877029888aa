"""Mode coverage, classifier FID and PNG snapshots."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from agent.train.images import save_image_grid, save_scatter_png
from agent.train.metrics import (
    FeatureClassifier,
    ImageQuality,
    ModeCoverage,
    feature_statistics,
    frechet_distance,
    mode_coverage,
)

# ---------------------------------------------------------------------------------------------------
# Mode coverage
# ---------------------------------------------------------------------------------------------------

RING_MODES = torch.tensor(
    [[math.cos(2 * math.pi * k / 8), math.sin(2 * math.pi * k / 8)] for k in range(8)], dtype=torch.float64
)
RING_STD = 0.01


def test_all_modes_covered_by_samples_on_the_modes() -> None:
    samples = RING_MODES.repeat(10, 1) + 0.005
    result = mode_coverage(samples, RING_MODES, RING_STD)
    assert result == ModeCoverage(modes_covered=8, high_quality_fraction=1.0, per_mode_counts=[10] * 8)


def test_single_mode_collapse() -> None:
    samples = RING_MODES[3].repeat(50, 1) + torch.randn(50, 2, dtype=torch.float64) * 0.001
    result = mode_coverage(samples, RING_MODES, RING_STD)
    assert result.modes_covered == 1
    assert result.high_quality_fraction == 1.0
    assert result.per_mode_counts == [0, 0, 0, 50, 0, 0, 0, 0]


def test_outliers_are_not_high_quality_and_cover_nothing() -> None:
    near_mode_zero = RING_MODES[0].repeat(3, 1)
    # The origin and a point between modes 0 and 1 are each far (≫ 3σ) from every mode.
    between = ((RING_MODES[0] + RING_MODES[1]) / 2).unsqueeze(0)
    samples = torch.cat([near_mode_zero, torch.zeros(1, 2, dtype=torch.float64), between])
    result = mode_coverage(samples, RING_MODES, RING_STD)
    assert result.modes_covered == 1
    assert result.high_quality_fraction == pytest.approx(3 / 5)
    assert result.per_mode_counts[0] == 3 and sum(result.per_mode_counts) == 3


def test_exactly_three_std_is_not_high_quality() -> None:
    # Exactly representable numbers: std 0.5, distances 1.5 (= 3σ, excluded) and 1.25 (included).
    modes = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    samples = torch.tensor([[1.5, 0.0], [0.0, -1.5], [10.0, 1.25], [8.75, 0.0]])
    result = mode_coverage(samples, modes, 0.5)
    assert result.per_mode_counts == [0, 2]
    assert result.modes_covered == 1
    assert result.high_quality_fraction == 0.5


def test_non_finite_samples_count_as_low_quality() -> None:
    samples = torch.tensor([[float("nan"), 0.0], [1.0, 0.0]], dtype=torch.float64)
    result = mode_coverage(samples, RING_MODES, RING_STD)
    assert result.high_quality_fraction == 0.5 and result.modes_covered == 1


def test_mode_coverage_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="samples"):
        mode_coverage(torch.zeros(0, 2), RING_MODES, RING_STD)
    with pytest.raises(ValueError, match="dimensional"):
        mode_coverage(torch.zeros(4, 3), RING_MODES, RING_STD)
    with pytest.raises(ValueError, match="std"):
        mode_coverage(torch.zeros(4, 2), RING_MODES, 0.0)
    with pytest.raises(ValueError, match="modes"):
        mode_coverage(torch.zeros(4, 2), torch.zeros(2), RING_STD)


# ---------------------------------------------------------------------------------------------------
# Fréchet distance
# ---------------------------------------------------------------------------------------------------


def test_frechet_distance_zero_for_identical_statistics() -> None:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(200, 6, generator=generator, dtype=torch.float64)
    mean, covariance = feature_statistics(features)
    assert frechet_distance(mean, covariance, mean, covariance) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_matches_closed_form_for_diagonal_covariances() -> None:
    mean1 = torch.tensor([0.0, 1.0, -2.0])
    mean2 = torch.tensor([1.0, 1.0, 0.5])
    variances1 = torch.tensor([1.0, 4.0, 0.25])
    variances2 = torch.tensor([9.0, 1.0, 0.25])
    expected = float(((mean1 - mean2) ** 2).sum() + ((variances1.sqrt() - variances2.sqrt()) ** 2).sum())
    value = frechet_distance(mean1, torch.diag(variances1), mean2, torch.diag(variances2))
    assert value == pytest.approx(expected, rel=1e-6)  # 7.25 + 4 + 1 + 0 = 12.25
    assert expected == pytest.approx(12.25)


def test_frechet_distance_is_symmetric_for_full_covariances() -> None:
    generator = torch.Generator().manual_seed(1)
    stats_a = feature_statistics(torch.randn(100, 4, generator=generator))
    stats_b = feature_statistics(torch.randn(100, 4, generator=generator) * 2 + 1)
    forward = frechet_distance(*stats_a, *stats_b)
    assert forward > 1.0
    assert forward == pytest.approx(frechet_distance(*stats_b, *stats_a), rel=1e-9)


def test_frechet_distance_handles_singular_covariances() -> None:
    # Rank-one covariances (e.g. dead ReLU features) need the εI to stay well defined.
    singular = torch.zeros(3, 3)
    singular[0, 0] = 1.0
    value = frechet_distance(torch.zeros(3), singular, torch.zeros(3), torch.zeros(3, 3))
    assert value == pytest.approx(1.0, abs=1e-2)


def test_frechet_distance_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="inconsistent shapes"):
        frechet_distance(torch.zeros(2), torch.eye(2), torch.zeros(3), torch.eye(3))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(torch.tensor([float("nan"), 0.0]), torch.eye(2), torch.zeros(2), torch.eye(2))
    with pytest.raises(ValueError, match="at least 2"):
        feature_statistics(torch.zeros(1, 3))


# ---------------------------------------------------------------------------------------------------
# Classifier FID on sklearn digits
# ---------------------------------------------------------------------------------------------------

HELDOUT_FRACTION = 0.2


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    labels = torch.tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(0))
    heldout_count = int(images.shape[0] * HELDOUT_FRACTION)
    heldout, train = order[:heldout_count], order[heldout_count:]
    return images[train], labels[train], images[heldout], labels[heldout]


@pytest.fixture(scope="module")
def quality(digits: tuple[torch.Tensor, ...]) -> ImageQuality:
    return ImageQuality(*digits, seed=0)


def test_digits_are_scaled_to_unit_range(digits: tuple[torch.Tensor, ...]) -> None:
    train_images = digits[0]
    assert train_images.min() == -1.0 and train_images.max() == 1.0


def test_classifier_reaches_95_percent_on_heldout_digits(quality: ImageQuality) -> None:
    assert quality.heldout_accuracy >= 0.95


def test_classifier_training_is_deterministic(digits: tuple[torch.Tensor, ...]) -> None:
    train_images, train_labels, heldout_images, _ = digits
    subset = slice(0, 300)
    torch.manual_seed(123)  # global RNG state must not matter
    first = FeatureClassifier((1, 8, 8), 10).fit(train_images[subset], train_labels[subset], seed=4, epochs=2)
    torch.manual_seed(999)
    second = FeatureClassifier((1, 8, 8), 10).fit(
        train_images[subset], train_labels[subset], seed=4, epochs=2
    )
    other = FeatureClassifier((1, 8, 8), 10).fit(train_images[subset], train_labels[subset], seed=5, epochs=2)
    assert torch.equal(first.features(heldout_images), second.features(heldout_images))
    assert not torch.equal(first.features(heldout_images), other.features(heldout_images))
    assert first.features(heldout_images).shape == (heldout_images.shape[0], 64)
    assert first.predict(heldout_images).shape == (heldout_images.shape[0],)


def test_classifier_fit_restores_thread_count(digits: tuple[torch.Tensor, ...]) -> None:
    before = torch.get_num_threads()
    FeatureClassifier((1, 8, 8), 10).fit(digits[0][:64], digits[1][:64], epochs=1)
    assert torch.get_num_threads() == before


def test_classifier_works_for_rgb_images() -> None:
    # Class = which channel is bright: trivially separable, checks (C, H, W) ≠ (1, 8, 8) plumbing.
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(60) % 3
    images = torch.rand(60, 3, 32, 32, generator=generator) * 0.2 - 1.0
    images[torch.arange(60), labels] += 1.5
    classifier = FeatureClassifier((3, 32, 32), 3).fit(images, labels, epochs=5)
    assert classifier.accuracy(images, labels) == 1.0


def test_classifier_rejects_bad_input(digits: tuple[torch.Tensor, ...]) -> None:
    train_images, train_labels, _, _ = digits
    classifier = FeatureClassifier((1, 8, 8), 10)
    with pytest.raises(ValueError, match="not trained"):
        classifier.features(train_images)
    with pytest.raises(ValueError, match="shape"):
        classifier.fit(train_images.reshape(-1, 64), train_labels)
    with pytest.raises(ValueError, match="labels must lie"):
        classifier.fit(train_images, train_labels + 5)
    with pytest.raises(ValueError, match="integer class indices"):
        classifier.fit(train_images, train_labels.float())
    with pytest.raises(ValueError, match="one label per image"):
        classifier.fit(train_images, train_labels[:-1])
    with pytest.raises(ValueError, match="num_classes"):
        FeatureClassifier((1, 8, 8), 1)


def test_heldout_real_scores_far_better_than_noise_and_collapse(
    quality: ImageQuality, digits: tuple[torch.Tensor, ...]
) -> None:
    train_images, train_labels, heldout_images, _ = digits
    references = quality.reference_values()
    assert set(references) == {"real_data_fid", "uniform_noise_fid", "one_class_fid"}
    real_fid = references["real_data_fid"]
    collapsed = train_images[train_labels == 3]
    collapsed_fid = quality.evaluate(collapsed)["classifier_fid"]
    assert 0.0 < real_fid < 10.0
    assert references["uniform_noise_fid"] > 20 * real_fid
    assert collapsed_fid > 20 * real_fid
    assert references["one_class_fid"] > 20 * real_fid
    # The held-out set scores (near) zero against its own statistics.
    assert quality.evaluate(heldout_images)["classifier_fid"] == pytest.approx(0.0, abs=1e-6)


def test_class_coverage_real_versus_collapsed(
    quality: ImageQuality, digits: tuple[torch.Tensor, ...]
) -> None:
    train_images, train_labels, heldout_images, _ = digits
    real = quality.evaluate(heldout_images)
    assert real["classes_covered"] == 10
    assert sum(real["class_histogram"]) == heldout_images.shape[0]
    collapsed = quality.evaluate(train_images[train_labels == 7])
    assert collapsed["classes_covered"] == 1
    assert max(collapsed["class_histogram"]) == collapsed["class_histogram"][7]


def test_coverage_threshold_ignores_stray_predictions(
    quality: ImageQuality, digits: tuple[torch.Tensor, ...]
) -> None:
    train_images, train_labels, _, _ = digits
    # 199 sevens plus one zero: the single zero is 0.5% of the samples, below the 1% threshold.
    sevens = train_images[train_labels == 7]
    sevens = sevens[quality.classifier.predict(sevens) == 7][:99]
    zero = train_images[train_labels == 0]
    zero = zero[quality.classifier.predict(zero) == 0][:1]
    samples = torch.cat([sevens, sevens, zero])
    result = quality.evaluate(samples)
    assert result["class_histogram"][0] == 1
    assert result["classes_covered"] == 1


def test_evaluate_rejects_bad_samples(quality: ImageQuality) -> None:
    with pytest.raises(ValueError, match="shape"):
        quality.evaluate(torch.zeros(4, 1, 28, 28))
    with pytest.raises(ValueError, match="NaN"):
        quality.evaluate(torch.full((4, 1, 8, 8), float("nan")))
    with pytest.raises(ValueError, match="at least 2"):
        quality.evaluate(torch.zeros(1, 1, 8, 8))


# ---------------------------------------------------------------------------------------------------
# PNG output
# ---------------------------------------------------------------------------------------------------


def test_grey_image_grid(tmp_path: Path) -> None:
    images = torch.linspace(-1, 1, 10 * 64).reshape(10, 1, 8, 8)
    path = tmp_path / "grid.png"
    save_image_grid(images, path, nrow=4, scale=3)
    with Image.open(path) as png:
        assert png.format == "PNG" and png.mode == "L"
        # 4 columns, 3 rows of 8×8 tiles with 1-pixel gaps, ×3.
        assert png.size == ((4 * 9 + 1) * 3, (3 * 9 + 1) * 3)
        # First tile's top-left pixel is -1 → black; padding is grey.
        assert png.getpixel((3, 3)) == 0
        assert png.getpixel((0, 0)) == 128
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]  # no temporary file left behind


def test_rgb_image_grid_clips_and_survives_nan(tmp_path: Path) -> None:
    images = torch.zeros(3, 3, 32, 32)
    images[0, 0] = 5.0  # clipped to 1 → pure red channel
    images[1] = float("nan")
    path = tmp_path / "rgb.png"
    save_image_grid(images, path, nrow=8, scale=1)
    with Image.open(path) as png:
        assert png.mode == "RGB"
        assert png.size == (3 * 33 + 1, 33 + 1)
        assert png.getpixel((1, 1)) == (255, 128, 128)
        assert png.getpixel((34, 1)) == (0, 0, 0)


def test_image_grid_replaces_existing_file_atomically(tmp_path: Path) -> None:
    path = tmp_path / "grid.png"
    path.write_bytes(b"old")
    save_image_grid(torch.zeros(1, 1, 8, 8), path)
    with Image.open(path) as png:
        assert png.size == (9 * 4 + 4, 9 * 4 + 4)
    assert sorted(os.listdir(tmp_path)) == ["grid.png"]


def test_image_grid_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="channels"):
        save_image_grid(torch.zeros(2, 2, 8, 8), tmp_path / "x.png")
    with pytest.raises(ValueError, match="N, C, H, W"):
        save_image_grid(torch.zeros(8, 8), tmp_path / "x.png")
    with pytest.raises(ValueError, match="nrow"):
        save_image_grid(torch.zeros(1, 1, 8, 8), tmp_path / "x.png", nrow=0)
    with pytest.raises(ValueError, match="does not exist"):
        save_image_grid(torch.zeros(1, 1, 8, 8), tmp_path / "missing" / "x.png")


def test_scatter_png_draws_samples_and_modes(tmp_path: Path) -> None:
    path = tmp_path / "ring.png"
    samples = torch.tensor([[0.0, 0.5], [1e9, 0.0], [float("nan"), 0.0]])
    save_scatter_png(samples, path, modes=RING_MODES, size=200)
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size == (200, 200) and png.mode == "RGB"
        colours = {colour for _, colour in png.getcolors(maxcolors=200 * 200)}
    # Auto extent 1.25 → the mode at (1, 0) sits at x = (1 + 1.25) / 2.5 · 199 ≈ 179, y ≈ 99.5 → 100.
    assert (220, 30, 30) in colours
    with Image.open(path) as png:
        assert png.getpixel((179, 100)) == (220, 30, 30)
        # Sample (0, 0.5) → (99.5 → 100, (1.25 - 0.5)/2.5 · 199 ≈ 60): a dark dot there.
        assert png.getpixel((100, 60)) == (30, 30, 30)
        assert png.getpixel((5, 5)) == (255, 255, 255)


def test_scatter_png_with_explicit_extent_and_no_modes(tmp_path: Path) -> None:
    path = tmp_path / "points.png"
    save_scatter_png(torch.tensor([[2.0, 2.0]]), path, size=101, extent=4.0)
    with Image.open(path) as png:
        assert png.size == (101, 101)
        # (2, 2) → x = 6/8 · 100 = 75, y = 2/8 · 100 = 25.
        assert png.getpixel((75, 25)) == (30, 30, 30)
        assert (220, 30, 30) not in {colour for _, colour in png.getcolors(maxcolors=101 * 101)}


def test_scatter_png_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="N, 2"):
        save_scatter_png(torch.zeros(5, 3), tmp_path / "x.png")
    with pytest.raises(ValueError, match="modes"):
        save_scatter_png(torch.zeros(5, 2), tmp_path / "x.png", modes=torch.zeros(5))
    with pytest.raises(ValueError, match="extent"):
        save_scatter_png(torch.zeros(5, 2), tmp_path / "x.png", extent=-1.0)
    with pytest.raises(ValueError, match="size"):
        save_scatter_png(torch.zeros(5, 2), tmp_path / "x.png", size=0)
