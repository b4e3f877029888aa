"""Tests for agent.train.data: dataset decoding, validation errors, partitions and sampling determinism."""

import gzip
import hashlib
import math
import os
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from agent.train.data import (
    CIFAR10_BATCH_NAMES,
    DATASET_NAMES,
    GRID25_STD,
    MIXTURE_POOL_SIZE,
    RING8_STD,
    Dataset,
    DatasetError,
    IndexedNodeData,
    MixtureNodeData,
    grid25_modes,
    load_dataset,
    partition,
    read_cifar10_batch,
    read_idx_file,
    ring8_modes,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits")


# ---------------------------------------------------------------- mixtures


def test_ring8_has_eight_distinct_modes_at_multiples_of_45_degrees():
    modes = ring8_modes()
    assert modes.shape == (8, 2) and modes.dtype == torch.float32
    expected = torch.tensor(
        [[math.cos(2 * math.pi * k / 8), math.sin(2 * math.pi * k / 8)] for k in range(8)],
        dtype=torch.float64,
    )
    torch.testing.assert_close(modes.double(), expected, atol=1e-7, rtol=0)
    # linspace(0, 2π, 8) would repeat angle 0 and give a near-zero distance between two modes.
    pairwise = torch.cdist(modes.double(), modes.double()) + torch.eye(8, dtype=torch.float64) * 10
    assert pairwise.min().item() == pytest.approx(2 * math.sin(math.pi / 8), abs=1e-6)
    assert modes[2].tolist() == [0.0, 1.0] and modes[4].tolist() == [-1.0, 0.0]


def test_grid25_modes_are_the_25_even_lattice_points():
    modes = grid25_modes()
    assert modes.shape == (25, 2) and modes.dtype == torch.float32
    points = {tuple(point) for point in modes.tolist()}
    lattice = {(float(i), float(j)) for i in (-4, -2, 0, 2, 4) for j in (-4, -2, 0, 2, 4)}
    assert points == lattice


@pytest.mark.parametrize(("name", "std", "mode_count"), [("ring8", RING8_STD, 8), ("grid25", GRID25_STD, 25)])
def test_mixture_samples_sit_on_modes_with_the_configured_std(name, std, mode_count):
    dataset = load_dataset(name)
    assert dataset.spec.kind == "points" and dataset.spec.mode_std == std
    assert dataset.spec.num_classes == mode_count and dataset.spec.is_mixture
    (node,) = partition(dataset, 1, "iid")
    assert isinstance(node, MixtureNodeData)
    batch = node.sample(20_000, seeded(7))
    assert batch.shape == (20_000, 2) and batch.dtype == torch.float32
    nearest = torch.cdist(batch, dataset.spec.modes).argmin(dim=1)
    residual = batch - dataset.spec.modes[nearest]
    # Modes are many std apart, so the nearest mode is the generating one and residuals are N(0, std²).
    assert residual.std().item() == pytest.approx(std, rel=0.03)
    assert residual.mean(dim=0).abs().max().item() < 3 * std / math.sqrt(20_000) * 2
    frequencies = torch.bincount(nearest, minlength=mode_count).double() / len(batch)
    assert frequencies.min().item() > 0.7 / mode_count and frequencies.max().item() < 1.3 / mode_count


def test_mixture_pool_is_split_into_train_and_heldout_with_mode_labels():
    dataset = load_dataset("ring8")
    assert len(dataset) + len(dataset.heldout_samples) == MIXTURE_POOL_SIZE
    assert 0.19 < len(dataset.heldout_samples) / MIXTURE_POOL_SIZE < 0.21
    assert dataset.train_labels is not None and dataset.heldout_labels is not None
    for samples, labels in (
        (dataset.train_samples, dataset.train_labels),
        (dataset.heldout_samples, dataset.heldout_labels),
    ):
        distance_to_label_mode = (samples - dataset.spec.modes[labels]).norm(dim=1)
        assert distance_to_label_mode.max().item() < 6 * RING8_STD
    assert torch.equal(load_dataset("ring8", seed=0).train_samples, dataset.train_samples)
    assert not torch.equal(load_dataset("ring8", seed=1).train_samples[:10], dataset.train_samples[:10])


def test_mixture_label_skew_nodes_only_produce_their_modes():
    dataset = load_dataset("ring8")
    nodes = partition(dataset, 4, "label_skew", classes_per_node=2)
    assert [node.classes for node in nodes] == [(0, 1), (2, 3), (4, 5), (6, 7)]
    for node in nodes:
        batch = node.sample(500, seeded(node.node_index))
        nearest = torch.cdist(batch, dataset.spec.modes).argmin(dim=1)
        assert set(nearest.tolist()) == set(node.classes)


# ---------------------------------------------------------------- determinism


def test_same_generator_seed_gives_identical_batches_and_other_seeds_differ(digits):
    nodes = partition(digits, 4, "shards", seed=3)
    first = nodes[1].sample(64, seeded(11))
    again = nodes[1].sample(64, seeded(11))
    assert torch.equal(first, again)
    assert not torch.equal(first, nodes[1].sample(64, seeded(12)))
    assert not torch.equal(first, nodes[2].sample(64, seeded(11)))
    ring = partition(load_dataset("ring8"), 2, "iid")
    assert torch.equal(ring[0].sample(32, seeded(5)), ring[1].sample(32, seeded(5)))
    assert not torch.equal(ring[0].sample(32, seeded(5)), ring[0].sample(32, seeded(6)))


def test_sampling_leaves_the_global_rng_alone(digits):
    (node,) = partition(digits, 1, "iid")
    torch.manual_seed(0)
    expected_next = torch.rand(3)
    torch.manual_seed(0)
    node.sample(16, seeded(1))
    partition(load_dataset("ring8"), 1, "iid")[0].sample(16, seeded(1))
    assert torch.equal(torch.rand(3), expected_next)


def test_batches_are_bit_identical_in_a_separate_process(digits):
    script = """
import hashlib, torch
from agent.train.data import load_dataset, partition
torch.set_num_threads(1)
torch.manual_seed(999)  # the global RNG must not matter
def digest(t):
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()
shard = partition(load_dataset("digits"), 4, "label_skew", seed=2, classes_per_node=3)[2]
print(digest(shard.sample(128, torch.Generator().manual_seed(42))))
ring = partition(load_dataset("ring8", seed=4), 3, "iid")[1]
print(digest(ring.sample(128, torch.Generator().manual_seed(42))))
"""
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    completed = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=environment,
        check=True,
    )
    shard = partition(digits, 4, "label_skew", seed=2, classes_per_node=3)[2]
    ring = partition(load_dataset("ring8", seed=4), 3, "iid")[1]
    expected = [digest(shard.sample(128, seeded(42))), digest(ring.sample(128, seeded(42)))]
    assert completed.stdout.split() == expected


def test_sample_rejects_bad_arguments(digits):
    (node,) = partition(digits, 1, "iid")
    with pytest.raises(DatasetError, match="batch_size"):
        node.sample(0, seeded(0))
    with pytest.raises(DatasetError, match=r"torch\.Generator"):
        node.sample(4, 0)  # type: ignore[arg-type]


# ---------------------------------------------------------------- digits


def test_digits_shape_range_classes_and_heldout(digits):
    assert digits.spec.name == "digits" and digits.spec.kind == "images"
    assert digits.spec.sample_shape == (1, 8, 8) and digits.spec.num_classes == 10
    assert digits.spec.modes is None and digits.spec.mode_std is None
    assert len(digits) + len(digits.heldout_samples) == 1797
    assert digits.train_samples.dtype == torch.float32 and digits.train_labels.dtype == torch.int64
    assert digits.train_samples.min().item() == -1.0 and digits.train_samples.max().item() == 1.0
    assert set(digits.train_labels.tolist()) == set(range(10)) == set(digits.heldout_labels.tolist())
    held_per_class = torch.bincount(digits.heldout_labels, minlength=10)
    all_per_class = held_per_class + torch.bincount(digits.train_labels, minlength=10)
    assert torch.equal(held_per_class, torch.floor(all_per_class * 0.2).long())


def test_digits_values_are_the_sklearn_counts_rescaled(digits):
    from sklearn.datasets import load_digits

    raw = load_digits()
    expected = torch.from_numpy(raw.images.astype(np.float32)).unsqueeze(1) / 8 - 1
    loaded = torch.cat([digits.train_samples, digits.heldout_samples])
    loaded_labels = torch.cat([digits.train_labels, digits.heldout_labels])

    def as_counter(images: torch.Tensor, labels: torch.Tensor) -> Counter:
        return Counter(
            (image.numpy().tobytes(), int(label)) for image, label in zip(images, labels, strict=True)
        )

    assert as_counter(loaded, loaded_labels) == as_counter(expected, torch.from_numpy(raw.target))


def test_digits_image_size_upsamples_bilinearly():
    resized = load_dataset("digits", image_size=16)
    assert resized.spec.sample_shape == (1, 16, 16)
    assert resized.train_samples.min().item() >= -1.0 and resized.train_samples.max().item() <= 1.0
    native = load_dataset("digits")
    expected = torch.nn.functional.interpolate(native.train_samples[:4], size=(16, 16), mode="bilinear")
    torch.testing.assert_close(resized.train_samples[:4], expected.clamp(-1, 1))


def test_heldout_split_depends_on_seed():
    first, second = load_dataset("digits", seed=0), load_dataset("digits", seed=1)
    assert len(first) == len(second)
    assert not torch.equal(first.heldout_samples, second.heldout_samples)
    assert torch.equal(load_dataset("digits", seed=1).heldout_samples, second.heldout_samples)


# ---------------------------------------------------------------- MNIST idx files


def idx_bytes(magic: int, array: np.ndarray) -> bytes:
    return (
        struct.pack(">I", magic)
        + struct.pack(f">{array.ndim}I", *array.shape)
        + array.astype(np.uint8).tobytes()
    )


def mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    images = np.zeros((3, 28, 28), dtype=np.uint8)
    images[0, 0, 0] = 255
    images[1] = 255
    images[2, 27, 27] = 128
    images[2, 5, 9] = 51
    return images, np.array([3, 7, 0], dtype=np.uint8)


def write_mnist(
    directory: Path, *, compress: bool, images: bytes | None = None, labels: bytes | None = None
) -> Path:
    default_images, default_labels = mnist_arrays()
    contents = {
        "train-images-idx3-ubyte": images if images is not None else idx_bytes(0x803, default_images),
        "train-labels-idx1-ubyte": labels if labels is not None else idx_bytes(0x801, default_labels),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for name, payload in contents.items():
        if compress:
            (directory / f"{name}.gz").write_bytes(gzip.compress(payload))
        else:
            (directory / name).write_bytes(payload)
    return directory


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_decodes_pixels_exactly(tmp_path, compress):
    root = write_mnist(tmp_path / "mnist", compress=compress)
    dataset = load_dataset("mnist", path=root)
    assert dataset.spec.sample_shape == (1, 28, 28) and dataset.spec.num_classes == 10
    # Each image has its own class, so floor(20% of 1) holds none out and the order is kept.
    assert len(dataset) == 3 and len(dataset.heldout_samples) == 0
    assert dataset.train_labels.tolist() == [3, 7, 0]
    images = dataset.train_samples
    assert images[0, 0, 0, 0].item() == 1.0 and images[0, 0, 0, 1].item() == -1.0
    assert images[0].sum().item() == pytest.approx(1.0 - (28 * 28 - 1))
    assert bool((images[1] == 1.0).all())
    assert images[2, 0, 27, 27].item() == pytest.approx(128 / 127.5 - 1, abs=1e-6)
    assert images[2, 0, 5, 9].item() == pytest.approx(51 / 127.5 - 1, abs=1e-6)
    assert images[2, 0, 9, 5].item() == -1.0  # rows then columns, not transposed


def test_read_idx_file_returns_header_shape(tmp_path):
    path = tmp_path / "labels"
    path.write_bytes(idx_bytes(0x801, np.arange(5, dtype=np.uint8)))
    assert read_idx_file(path, 0x801).tolist() == [0, 1, 2, 3, 4]


def test_mnist_truncated_image_file_names_file_and_sizes(tmp_path):
    images, _ = mnist_arrays()
    truncated = idx_bytes(0x803, images)[:-10]
    root = write_mnist(tmp_path, compress=False, images=truncated)
    expected_bytes = 16 + 3 * 28 * 28
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte") as raised:
        load_dataset("mnist", path=root)
    assert f"need {expected_bytes} bytes, got {expected_bytes - 10}" in str(raised.value)
    assert "truncated" in str(raised.value)


def test_mnist_trailing_bytes_are_rejected(tmp_path):
    images, _ = mnist_arrays()
    root = write_mnist(tmp_path, compress=True, images=idx_bytes(0x803, images) + b"\0")
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte\.gz.*trailing"):
        load_dataset("mnist", path=root)


def test_mnist_wrong_magic_names_file(tmp_path):
    _, labels = mnist_arrays()
    root = write_mnist(tmp_path, compress=False, labels=idx_bytes(0x803, labels.reshape(3, 1, 1)))
    with pytest.raises(DatasetError, match=r"train-labels-idx1-ubyte.*0x00000803, expected 0x00000801"):
        load_dataset("mnist", path=root)


def test_mnist_label_count_must_match_image_count(tmp_path):
    root = write_mnist(tmp_path, compress=False, labels=idx_bytes(0x801, np.array([1, 2], dtype=np.uint8)))
    with pytest.raises(DatasetError, match=r"holds 2 labels but .*train-images-idx3-ubyte holds 3 images"):
        load_dataset("mnist", path=root)


def test_mnist_label_out_of_range_and_short_header(tmp_path):
    root = write_mnist(
        tmp_path / "a", compress=False, labels=idx_bytes(0x801, np.array([1, 12, 2], dtype=np.uint8))
    )
    with pytest.raises(DatasetError, match="label 12 at record 1"):
        load_dataset("mnist", path=root)
    root = write_mnist(tmp_path / "b", compress=False, images=struct.pack(">II", 0x803, 3))
    with pytest.raises(DatasetError, match="truncated idx header, expected 16 bytes, got 8"):
        load_dataset("mnist", path=root)


def test_mnist_corrupt_gzip_and_missing_files_are_named(tmp_path):
    root = write_mnist(tmp_path / "gz", compress=True)
    (root / "train-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(DatasetError, match=r"train-labels-idx1-ubyte\.gz"):
        load_dataset("mnist", path=root)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte .*not found"):
        load_dataset("mnist", path=tmp_path / "empty")


# ---------------------------------------------------------------- CIFAR-10 binary batches


def cifar_record(label: int, red: int, green: int, blue: int) -> bytes:
    return bytes([label]) + bytes([red]) * 1024 + bytes([green]) * 1024 + bytes([blue]) * 1024


def write_cifar(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for batch, name in enumerate(CIFAR10_BATCH_NAMES):
        # Two records per batch, each of its own class so none is held out and the order is kept.
        records = cifar_record(2 * batch, 255, 0, 128) + cifar_record(2 * batch + 1, 0, 255, batch)
        (directory / name).write_bytes(records)
    return directory


def test_cifar10_decodes_labels_and_rgb_planes(tmp_path):
    write_cifar(tmp_path / "cifar-10-batches-bin")
    # The parent directory is accepted too.
    dataset = load_dataset("cifar10", path=tmp_path)
    assert dataset.spec.sample_shape == (3, 32, 32) and dataset.spec.num_classes == 10
    assert dataset.train_labels.tolist() == list(range(10))
    first, second = dataset.train_samples[0], dataset.train_samples[1]
    assert bool((first[0] == 1.0).all()) and bool((first[1] == -1.0).all())
    assert first[2, 0, 0].item() == pytest.approx(128 / 127.5 - 1, abs=1e-6)
    assert (
        bool((second[0] == -1.0).all()) and bool((second[1] == 1.0).all()) and bool((second[2] == -1.0).all())
    )
    assert dataset.train_samples[9, 2, 31, 31].item() == pytest.approx(4 / 127.5 - 1, abs=1e-6)


def test_cifar10_pixel_layout_is_row_major_within_planes(tmp_path):
    pixels = np.zeros(3072, dtype=np.uint8)
    pixels[1024 + 32 * 3 + 5] = 200  # green plane, row 3, column 5
    path = tmp_path / "data_batch_1.bin"
    path.write_bytes(bytes([6]) + pixels.tobytes())
    images, labels = read_cifar10_batch(path)
    assert labels.tolist() == [6] and images.shape == (1, 3, 32, 32)
    assert np.argwhere(images[0] == 200).tolist() == [[1, 3, 5]]


def test_cifar10_truncated_batch_and_bad_label_are_named(tmp_path):
    root = write_cifar(tmp_path / "t")
    (root / "data_batch_3.bin").write_bytes(cifar_record(1, 0, 0, 0)[:-7])
    with pytest.raises(DatasetError, match=r"data_batch_3\.bin: size 3066 bytes .*3073"):
        load_dataset("cifar10", path=root)
    root = write_cifar(tmp_path / "l")
    (root / "data_batch_5.bin").write_bytes(cifar_record(1, 0, 0, 0) + cifar_record(10, 0, 0, 0))
    with pytest.raises(DatasetError, match=r"data_batch_5\.bin: label 10 at record 1"):
        load_dataset("cifar10", path=root)


def test_cifar10_missing_batch_is_listed(tmp_path):
    root = write_cifar(tmp_path)
    (root / "data_batch_4.bin").unlink()
    with pytest.raises(DatasetError, match=r"missing .*data_batch_4\.bin"):
        load_dataset("cifar10", path=root)


# ---------------------------------------------------------------- image folders


def save_solid(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_folder_with_class_subfolders(tmp_path):
    save_solid(tmp_path / "b_blue" / "one.png", (0, 0, 255))
    save_solid(tmp_path / "b_blue" / "nested" / "two.png", (0, 0, 255), (20, 20))
    save_solid(tmp_path / "a_red" / "x.png", (255, 0, 0))
    save_solid(tmp_path / "a_red" / "y.bmp", (255, 0, 0), (17, 50))
    (tmp_path / "a_red" / "notes.txt").write_text("not an image")
    (tmp_path / "no_images").mkdir()
    dataset = load_dataset("folder", path=tmp_path, image_size=12)
    assert dataset.class_names == ("a_red", "b_blue")
    assert dataset.spec.sample_shape == (3, 12, 12) and dataset.spec.num_classes == 2
    assert dataset.train_labels.tolist() == [0, 0, 1, 1]  # 2 per class: none held out at 20%
    red, blue = dataset.train_samples[0], dataset.train_samples[2]
    assert red[0].eq(1.0).all() and red[1:].eq(-1.0).all()
    assert blue[2].eq(1.0).all() and blue[:2].eq(-1.0).all()


def test_folder_unlabelled_greyscale_default_size(tmp_path):
    for index in range(5):
        Image.new("L", (33, 33), 51 * index).save(tmp_path / f"{index}.png")
    dataset = load_dataset("folder", path=tmp_path, channels=1, seed=0)
    assert dataset.spec.sample_shape == (1, 32, 32) and dataset.spec.num_classes == 0
    assert dataset.train_labels is None and dataset.heldout_labels is None
    assert len(dataset) == 4 and len(dataset.heldout_samples) == 1
    values = sorted(torch.cat([dataset.train_samples, dataset.heldout_samples])[:, 0, 0, 0].tolist())
    assert values == pytest.approx([51 * index / 127.5 - 1 for index in range(5)])
    with pytest.raises(DatasetError, match="unlabelled"):
        partition(dataset, 2, "label_skew")


def test_folder_corrupt_image_is_named(tmp_path):
    save_solid(tmp_path / "cats" / "good.png", (1, 2, 3))
    (tmp_path / "cats" / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    with pytest.raises(DatasetError, match=r"broken\.jpg"):
        load_dataset("folder", path=tmp_path)


def test_folder_truncated_png_is_named(tmp_path):
    save_solid(tmp_path / "whole.png", (9, 9, 9))
    complete = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(complete[: len(complete) // 2])
    with pytest.raises(DatasetError, match=r"cut\.png"):
        load_dataset("folder", path=tmp_path)


def test_folder_empty_or_ambiguous_is_rejected(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="contains no images"):
        load_dataset("folder", path=tmp_path / "empty")
    save_solid(tmp_path / "mixed" / "loose.png", (0, 0, 0))
    save_solid(tmp_path / "mixed" / "class" / "inside.png", (0, 0, 0))
    with pytest.raises(DatasetError, match=r"loose\.png"):
        load_dataset("folder", path=tmp_path / "mixed")
    with pytest.raises(DatasetError, match="not a directory"):
        load_dataset("folder", path=tmp_path / "absent")


# ---------------------------------------------------------------- partitions


def test_iid_nodes_draw_from_the_whole_training_set(digits):
    nodes = partition(digits, 3, "iid")
    assert all(isinstance(node, IndexedNodeData) and len(node) == len(digits) for node in nodes)
    assert all(torch.equal(node.indices, torch.arange(len(digits))) for node in nodes)
    batch = nodes[0].sample(4000, seeded(0))
    train_rows = {row.numpy().tobytes() for row in digits.train_samples}
    assert all(row.numpy().tobytes() in train_rows for row in batch)
    # A node restricted to a third of the data could show at most ~480 distinct examples.
    distinct = len({row.numpy().tobytes() for row in batch})
    assert distinct > 1000


def test_shards_are_disjoint_cover_the_set_and_are_balanced(digits):
    nodes = partition(digits, 5, "shards", seed=9)
    all_indices = torch.cat([node.indices for node in nodes])
    assert torch.equal(torch.sort(all_indices).values, torch.arange(len(digits)))
    sizes = [len(node) for node in nodes]
    assert max(sizes) - min(sizes) <= 1
    # A permutation, not contiguous blocks of the (class-sorted-ish) original order.
    assert len(nodes[0].classes) == 10
    for node in nodes:
        batch = node.sample(300, seeded(1))
        own_rows = {row.numpy().tobytes() for row in digits.train_samples[node.indices]}
        assert all(row.numpy().tobytes() in own_rows for row in batch)
    reshuffled = partition(digits, 5, "shards", seed=10)
    assert not torch.equal(reshuffled[0].indices, nodes[0].indices)


def test_label_skew_gives_each_node_its_classes_and_covers_all(digits):
    nodes = partition(digits, 4, "label_skew", classes_per_node=3, seed=1)
    assert [node.classes for node in nodes] == [(0, 1, 2), (3, 4, 5), (6, 7, 8), (0, 1, 9)]
    labels = digits.train_labels
    labels_of_image: dict[bytes, set[int]] = {}
    for image, label in zip(digits.train_samples, labels.tolist(), strict=True):
        labels_of_image.setdefault(image.numpy().tobytes(), set()).add(label)
    for node in nodes:
        assert set(labels[node.indices].tolist()) == set(node.classes)
        for image in node.sample(200, seeded(node.node_index)):
            assert labels_of_image[image.numpy().tobytes()] & set(node.classes)
    all_indices = torch.cat([node.indices for node in nodes])
    assert len(set(all_indices.tolist())) == len(all_indices) == len(digits)
    # Classes 0 and 1 are shared by nodes 0 and 3, which split their examples near-evenly.
    zeros_0 = int((labels[nodes[0].indices] == 0).sum())
    zeros_3 = int((labels[nodes[3].indices] == 0).sum())
    assert abs(zeros_0 - zeros_3) <= 1


def test_partition_rejects_bad_requests(digits, tmp_path):
    with pytest.raises(DatasetError, match="n_nodes"):
        partition(digits, 0)
    with pytest.raises(DatasetError, match="scheme"):
        partition(digits, 2, "round_robin")  # type: ignore[arg-type]
    with pytest.raises(DatasetError, match="non-empty shards"):
        partition(digits, len(digits) + 1, "shards")
    with pytest.raises(DatasetError, match="covers only 4 of the 10 classes"):
        partition(digits, 2, "label_skew", classes_per_node=2)
    with pytest.raises(DatasetError, match="exceeds the 10 classes"):
        partition(digits, 2, "label_skew", classes_per_node=11)
    one_per_class = write_mnist(
        tmp_path,
        compress=False,
        images=idx_bytes(0x803, np.zeros((10, 28, 28), dtype=np.uint8)),
        labels=idx_bytes(0x801, np.arange(10, dtype=np.uint8)),
    )
    tiny = load_dataset("mnist", path=one_per_class)
    with pytest.raises(DatasetError, match=r"class 0 .* has 1 training examples .* 2 nodes"):
        partition(tiny, 2, "label_skew", classes_per_node=10)


def test_load_dataset_rejects_bad_arguments(tmp_path):
    assert DATASET_NAMES == ("ring8", "grid25", "digits", "mnist", "cifar10", "folder")
    with pytest.raises(DatasetError, match="unknown dataset 'svhn'"):
        load_dataset("svhn")
    with pytest.raises(DatasetError, match="needs path"):
        load_dataset("mnist")
    with pytest.raises(DatasetError, match="takes no path"):
        load_dataset("digits", path=tmp_path)
    with pytest.raises(DatasetError, match="image_size does not apply"):
        load_dataset("ring8", image_size=8)
    with pytest.raises(DatasetError, match="image_size"):
        load_dataset("digits", image_size=0)
    with pytest.raises(DatasetError, match="heldout_fraction"):
        load_dataset("digits", heldout_fraction=1.0)
    with pytest.raises(DatasetError, match="channels applies only"):
        load_dataset("digits", channels=1)
    with pytest.raises(DatasetError, match="channels must be 1"):
        save_solid(tmp_path / "a.png", (0, 0, 0))
        load_dataset("folder", path=tmp_path, channels=4)
