"""Datasets and per-node minibatch sampling for decentralized GAN training.

Every node of the trainer owns a :class:`NodeData` and draws its minibatches with its own seeded
``torch.Generator``. The simulator and the networked agents are compared bit for bit, so sampling uses
nothing but that generator (never the global torch or numpy RNG), runs on the CPU and returns float32.
Loading is deterministic too: the same files, name and ``seed`` give the same tensors in any process.

Datasets (:func:`load_dataset`, names in :data:`DATASET_NAMES`)
    ``ring8``   8 Gaussians with means on the unit circle at angles 2πk/8, k = 0..7, std 0.01.
    ``grid25``  25 Gaussians at (i, j), i, j ∈ {−4, −2, 0, 2, 4}, std 0.05 (row-major over i then j).
    ``digits``  scikit-learn's bundled ``load_digits``: 1797 images, (1, 8, 8), 10 classes.
    ``mnist``   idx files ``train-images-idx3-ubyte`` and ``train-labels-idx1-ubyte`` (either may be
                gzipped with a ``.gz`` suffix) in ``path``: (1, 28, 28), 10 classes.
    ``cifar10`` the "binary version" batches ``data_batch_1.bin`` … ``data_batch_5.bin`` in ``path`` or in
                ``path/cifar-10-batches-bin``: (3, 32, 32), 10 classes. No pickle is ever read.
    ``folder``  image files (png, jpg, jpeg, bmp, gif, webp, tif, tiff) read with Pillow. If ``path`` has
                subfolders holding images, each such subfolder (searched recursively) is a class,
                numbered in sorted name order, and subfolders holding no images are ignored; otherwise the
                images directly in ``path`` form an unlabelled set. Every image is first brought to 8-bit
                RGB (``channels=3``, the default) or greyscale (``channels=1``) as an image viewer shows
                it (``agent.train.images.normalize_image``: EXIF orientation applied, 16-bit greys scaled
                to 8 bits, transparency composited onto white, palette, CMYK, 1-bit and float images
                converted), then centre-cropped to a square (so nothing is stretched) and resized to
                ``image_size`` (default 32) with bicubic filtering.

Images are float32 in [-1, 1] (pixel byte 0 → −1.0, 255 → 1.0 exactly; digits' 0..16 → −1..1).
``image_size`` on ``digits``, ``mnist`` and ``cifar10`` resizes the decoded tensors to a square with
bilinear interpolation (``align_corners=False``; antialiased when shrinking), clamped back to [-1, 1].

Held-out split
    Every dataset is finite once loaded: a deterministic fraction (``heldout_fraction``, default 20%) is
    held out as the "real" reference for evaluation metrics and never handed to a node. Labelled sets are
    split per class (each class keeps its proportion), unlabelled ones over the whole set; the choice
    depends only on ``seed``. Both parts keep the original order of the examples.

Mixtures (``ring8``, ``grid25``) are treated as labelled sets whose label is the mode index. Loading
draws a deterministic pool of :data:`MIXTURE_POOL_SIZE` points from ``seed`` (mode uniform, then
Gaussian noise), split like any labelled set, so about 10 000 training and 2 500 held-out points, the
latter matching the 2 500 samples of the VEEGAN/PacGAN mode-coverage metric. ``spec.modes`` and
``spec.mode_std`` describe the mixture itself.

Partitions (:func:`partition`)
    ``iid``        Every node samples uniformly from the whole training set. For mixtures it instead
                   draws fresh points from the full mixture (the true distribution is infinite); such a
                   node's ``len()`` is, by convention, the size of the training pool.
    ``shards``     A permutation of the training set drawn from ``seed`` is cut into ``n_nodes`` disjoint,
                   contiguous shards whose sizes differ by at most one.
    ``label_skew`` Node i holds classes (i·c + j) mod K for j = 0..c−1 (c = ``classes_per_node``,
                   K = number of classes), so consecutive nodes take consecutive blocks of classes and
                   every class is covered as soon as n·c ≥ K (fewer is refused, as some classes would be
                   unreachable). The examples of a class are shuffled (from ``seed``) and split disjointly
                   into near-equal parts among the nodes holding it. For mixtures a class is a mode.
    Within its share every node samples with replacement (``torch.randint`` on its generator).
"""

import gzip
import math
import struct
import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from agent.train.images import normalize_image

DATASET_NAMES: Final = ("ring8", "grid25", "digits", "mnist", "cifar10", "folder")
PARTITION_SCHEMES: Final = ("iid", "shards", "label_skew")
PartitionScheme = Literal["iid", "shards", "label_skew"]

RING8_STD: Final = 0.01
GRID25_STD: Final = 0.05
# 10 000 training points plus the 2 500 held-out points the mode-coverage metric evaluates against.
MIXTURE_POOL_SIZE: Final = 12_500
DEFAULT_HELDOUT_FRACTION: Final = 0.2
DEFAULT_FOLDER_IMAGE_SIZE: Final = 32
IMAGE_EXTENSIONS: Final = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})

MNIST_IMAGES_MAGIC: Final = 0x00000803
MNIST_LABELS_MAGIC: Final = 0x00000801
MNIST_IMAGES_NAME: Final = "train-images-idx3-ubyte"
MNIST_LABELS_NAME: Final = "train-labels-idx1-ubyte"
MNIST_NUM_CLASSES: Final = 10

CIFAR10_NUM_CLASSES: Final = 10
CIFAR10_IMAGE_SHAPE: Final = (3, 32, 32)
CIFAR10_RECORD_BYTES: Final = 1 + 3 * 32 * 32
CIFAR10_BATCH_NAMES: Final = tuple(f"data_batch_{index}.bin" for index in range(1, 6))
CIFAR10_SUBDIRECTORY: Final = "cifar-10-batches-bin"


class DatasetError(ValueError):
    """A dataset cannot be loaded or partitioned as asked; the message names the file or argument."""


@dataclass(frozen=True, eq=False)  # eq=False: generated __eq__ would compare the modes tensor ambiguously
class DatasetSpec:
    """What models and metrics need to know about a dataset.

    ``num_classes`` is the number of modes for mixtures, of classes for labelled images and 0 for an
    unlabelled folder. ``modes`` (M, 2) and ``mode_std`` are set for mixtures only; do not mutate ``modes``.
    """

    name: str
    kind: Literal["points", "images"]
    sample_shape: tuple[int, ...]
    num_classes: int
    modes: torch.Tensor | None = None
    mode_std: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("points", "images"):
            raise DatasetError(f"dataset kind must be 'points' or 'images', got {self.kind!r}")
        expected_rank = 1 if self.kind == "points" else 3
        if len(self.sample_shape) != expected_rank or any(size < 1 for size in self.sample_shape):
            raise DatasetError(
                f"{self.kind} need a positive {expected_rank}-d sample_shape, got {self.sample_shape}"
            )
        if self.num_classes < 0:
            raise DatasetError(f"num_classes must be >= 0, got {self.num_classes}")
        if (self.modes is None) != (self.mode_std is None):
            raise DatasetError("modes and mode_std must be given together (mixtures) or both left None")
        if self.modes is not None and tuple(self.modes.shape) != (self.num_classes, *self.sample_shape):
            raise DatasetError(
                f"modes must have shape {(self.num_classes, *self.sample_shape)}, "
                f"got {tuple(self.modes.shape)}"
            )

    @property
    def is_mixture(self) -> bool:
        """True for the Gaussian mixtures, whose iid nodes draw fresh points instead of reusing a pool."""
        return self.modes is not None


@dataclass(frozen=True, eq=False)
class Dataset:
    """A loaded dataset: training part for the nodes and a held-out part for evaluation.

    ``train_samples``/``heldout_samples`` are float32 CPU tensors of shape (N, *spec.sample_shape): images in
    [-1, 1] or, for mixtures, points. ``train_labels``/``heldout_labels`` are int64 (N,) class or mode
    indices, or None for an unlabelled folder. ``class_names`` names the classes of a labelled folder
    (empty otherwise). Treat the tensors as read-only: nodes index into them without copying.
    """

    spec: DatasetSpec
    train_samples: torch.Tensor
    train_labels: torch.Tensor | None
    heldout_samples: torch.Tensor
    heldout_labels: torch.Tensor | None
    class_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for part, samples, labels in (
            ("train", self.train_samples, self.train_labels),
            ("heldout", self.heldout_samples, self.heldout_labels),
        ):
            if samples.dtype != torch.float32 or tuple(samples.shape[1:]) != self.spec.sample_shape:
                raise DatasetError(
                    f"{part} samples must be float32 of shape (N, {self.spec.sample_shape}), "
                    f"got {samples.dtype} {tuple(samples.shape)}"
                )
            if (labels is None) != (self.spec.num_classes == 0):
                raise DatasetError(f"{part} labels must be given exactly when num_classes > 0")
            if labels is not None and labels.shape != (samples.shape[0],):
                raise DatasetError(
                    f"{part} labels shape {tuple(labels.shape)} does not match {samples.shape[0]} samples"
                )
        if len(self.train_samples) == 0:
            raise DatasetError(f"dataset {self.spec.name!r} has no training examples")

    @property
    def is_labelled(self) -> bool:
        return self.train_labels is not None

    def __len__(self) -> int:
        """Number of training examples (the held-out part is not counted)."""
        return len(self.train_samples)


class NodeData(ABC):
    """The share of a dataset one node trains on.

    ``classes`` lists the class (or mode) indices the node can produce, None for unlabelled data.
    """

    def __init__(self, spec: DatasetSpec, node_index: int, classes: tuple[int, ...] | None) -> None:
        self.spec = spec
        self.node_index = node_index
        self.classes = classes

    @abstractmethod
    def sample(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """A (batch_size, *spec.sample_shape) float32 CPU minibatch drawn with ``generator`` only."""

    @abstractmethod
    def __len__(self) -> int:
        """Number of examples this node holds."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec.name!r}, node={self.node_index}, size={len(self)})"


class IndexedNodeData(NodeData):
    """A node holding a subset (``indices``, sorted int64) of a training tensor, sampled with replacement."""

    def __init__(
        self,
        spec: DatasetSpec,
        node_index: int,
        source: torch.Tensor,
        indices: torch.Tensor,
        classes: tuple[int, ...] | None,
    ) -> None:
        if len(indices) == 0:
            raise DatasetError(f"node {node_index} of {spec.name!r} would hold no examples")
        super().__init__(spec, node_index, classes)
        self.source = source
        self.indices = indices

    def sample(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        _check_sample_arguments(batch_size, generator)
        positions = torch.randint(len(self.indices), (batch_size,), generator=generator)
        # Advanced indexing copies, so callers may modify the batch without touching the dataset.
        return self.source[self.indices[positions]]

    def __len__(self) -> int:
        return len(self.indices)


class MixtureNodeData(NodeData):
    """A node drawing fresh points from the whole Gaussian mixture (the ``iid`` scheme on mixtures).

    ``len()`` is ``nominal_size`` (the training pool size) since the node's supply is unbounded.
    """

    def __init__(self, spec: DatasetSpec, node_index: int, nominal_size: int) -> None:
        if spec.modes is None or spec.mode_std is None:
            raise DatasetError(f"dataset {spec.name!r} is not a Gaussian mixture")
        super().__init__(spec, node_index, tuple(range(spec.num_classes)))
        self.nominal_size = nominal_size
        self._modes = spec.modes
        self._mode_std = spec.mode_std

    def sample(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        _check_sample_arguments(batch_size, generator)
        points, _ = draw_mixture(self._modes, self._mode_std, batch_size, generator)
        return points

    def __len__(self) -> int:
        return self.nominal_size


def ring8_modes() -> torch.Tensor:
    """(8, 2) float32 means on the unit circle at angles 2πk/8, k = 0..7 (k = 8 would repeat k = 0)."""
    angles = 2.0 * math.pi * torch.arange(8, dtype=torch.float64) / 8
    modes = torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    # cos(π/2) evaluates to 6e-17; snap such round-off to exact zeros so the axis modes are exact.
    modes[modes.abs() < 1e-12] = 0.0
    return modes.to(torch.float32)


def grid25_modes() -> torch.Tensor:
    """(25, 2) float32 means at (i, j), i, j ∈ {−4, −2, 0, 2, 4}, ordered row-major over i then j."""
    coordinates = torch.arange(-4.0, 5.0, 2.0)
    first, second = torch.meshgrid(coordinates, coordinates, indexing="ij")
    return torch.stack([first.flatten(), second.flatten()], dim=1)


def draw_mixture(
    modes: torch.Tensor, mode_std: float, count: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``count`` points from an isotropic Gaussian mixture with uniform weights.

    Returns (points (count, 2) float32, mode indices (count,) int64). The mode indices are drawn first,
    then the noise, both from ``generator``; this order is part of the determinism contract.
    """
    mode_indices = torch.randint(len(modes), (count,), generator=generator)
    noise = torch.randn((count, modes.shape[1]), generator=generator, dtype=torch.float32)
    return modes[mode_indices] + mode_std * noise, mode_indices


def load_dataset(
    name: str,
    *,
    path: str | Path | None = None,
    image_size: int | None = None,
    seed: int = 0,
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
    channels: int | None = None,
) -> Dataset:
    """Load dataset ``name`` (one of :data:`DATASET_NAMES`); see the module docstring for each.

    ``path`` is required for ``mnist``, ``cifar10`` and ``folder`` and refused for the others.
    ``image_size`` resizes images to a square (``folder`` defaults to 32); it is refused for mixtures.
    ``seed`` fixes the mixture pool and the held-out split. ``channels`` (1 or 3) applies to ``folder``.
    """
    if name not in DATASET_NAMES:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")
    _require_int(seed, "seed", minimum=0)
    if isinstance(heldout_fraction, bool) or not isinstance(heldout_fraction, int | float):
        raise DatasetError(f"heldout_fraction must be a number, got {heldout_fraction!r}")
    if not 0.0 < heldout_fraction < 1.0:
        raise DatasetError(f"heldout_fraction must lie strictly between 0 and 1, got {heldout_fraction}")
    if image_size is not None:
        _require_int(image_size, "image_size", minimum=1)
    if channels is not None and name != "folder":
        raise DatasetError(f"channels applies only to the 'folder' dataset, not {name!r}")
    needs_path = name in ("mnist", "cifar10", "folder")
    if needs_path and path is None:
        raise DatasetError(f"dataset {name!r} needs path= pointing at its files")
    if not needs_path and path is not None:
        raise DatasetError(f"dataset {name!r} is built in and takes no path (got {path!r})")

    generator = torch.Generator().manual_seed(seed)
    if name in ("ring8", "grid25"):
        if image_size is not None:
            raise DatasetError(f"image_size does not apply to the 2-D mixture {name!r}")
        modes, mode_std = (ring8_modes(), RING8_STD) if name == "ring8" else (grid25_modes(), GRID25_STD)
        spec = DatasetSpec(name, "points", (2,), len(modes), modes, mode_std)
        points, mode_indices = draw_mixture(modes, mode_std, MIXTURE_POOL_SIZE, generator)
        return _split_heldout(spec, points, mode_indices, heldout_fraction, generator)

    class_names: tuple[str, ...] = ()
    if name == "digits":
        images, labels = _load_digits()
        num_classes = 10
    else:
        assert path is not None  # needs_path was checked above
        root = Path(path)
        if name == "mnist":
            images, labels = _load_mnist(root)
            num_classes = MNIST_NUM_CLASSES
        elif name == "cifar10":
            images, labels = _load_cifar10(root)
            num_classes = CIFAR10_NUM_CLASSES
        else:
            if channels is not None and channels not in (1, 3):
                raise DatasetError(f"channels must be 1 (greyscale) or 3 (RGB), got {channels!r}")
            folder_size = DEFAULT_FOLDER_IMAGE_SIZE if image_size is None else image_size
            images, labels, class_names = _load_folder(root, folder_size, channels or 3)
            num_classes = len(class_names)
    if image_size is not None:
        images = _resize_images(images, image_size)
    spec = DatasetSpec(name, "images", tuple(images.shape[1:]), num_classes)
    return _split_heldout(spec, images, labels, heldout_fraction, generator, class_names)


def partition(
    dataset: Dataset,
    n_nodes: int,
    scheme: PartitionScheme = "iid",
    *,
    seed: int = 0,
    classes_per_node: int = 2,
) -> list[NodeData]:
    """Give each of ``n_nodes`` nodes its share of ``dataset``'s training part (see the module docstring).

    ``seed`` fixes the shard permutation and how a class's examples are divided; ``classes_per_node``
    applies to ``label_skew`` only. Node ``i`` of the returned list has ``node_index == i``.
    """
    _require_int(n_nodes, "n_nodes", minimum=1)
    _require_int(seed, "seed", minimum=0)
    if scheme not in PARTITION_SCHEMES:
        raise DatasetError(
            f"unknown partition scheme {scheme!r}; choose one of {', '.join(PARTITION_SCHEMES)}"
        )
    spec = dataset.spec
    size = len(dataset)
    generator = torch.Generator().manual_seed(seed)

    if scheme == "iid":
        if spec.is_mixture:
            return [MixtureNodeData(spec, node, size) for node in range(n_nodes)]
        everything = torch.arange(size)
        classes = _classes_present(dataset.train_labels, everything)
        return [
            IndexedNodeData(spec, node, dataset.train_samples, everything, classes) for node in range(n_nodes)
        ]

    if scheme == "shards":
        if n_nodes > size:
            raise DatasetError(
                f"cannot cut {size} training examples of {spec.name!r} into {n_nodes} non-empty shards"
            )
        shards = torch.tensor_split(torch.randperm(size, generator=generator), n_nodes)
        node_indices = [torch.sort(shard).values for shard in shards]
        return [
            IndexedNodeData(
                spec, node, dataset.train_samples, indices, _classes_present(dataset.train_labels, indices)
            )
            for node, indices in enumerate(node_indices)
        ]

    labels = dataset.train_labels
    if labels is None:
        raise DatasetError(f"label_skew needs class labels, but dataset {spec.name!r} is unlabelled")
    num_classes = spec.num_classes
    _require_int(classes_per_node, "classes_per_node", minimum=1)
    if classes_per_node > num_classes:
        raise DatasetError(
            f"classes_per_node={classes_per_node} exceeds the {num_classes} classes of {spec.name!r}"
        )
    if n_nodes * classes_per_node < num_classes:
        raise DatasetError(
            f"label_skew with {n_nodes} nodes x {classes_per_node} classes covers only "
            f"{n_nodes * classes_per_node} of the {num_classes} classes of {spec.name!r}; "
            f"use classes_per_node >= {math.ceil(num_classes / n_nodes)}"
        )
    node_classes = [
        tuple(sorted((node * classes_per_node + offset) % num_classes for offset in range(classes_per_node)))
        for node in range(n_nodes)
    ]
    chunks_per_node: list[list[torch.Tensor]] = [[] for _ in range(n_nodes)]
    for label in range(num_classes):
        holders = [node for node in range(n_nodes) if label in node_classes[node]]
        members = torch.nonzero(labels == label).flatten()
        if len(members) < len(holders):
            raise DatasetError(
                f"class {label} of {spec.name!r} has {len(members)} training examples but label_skew "
                f"gives it to {len(holders)} nodes; use fewer nodes or classes_per_node"
            )
        shuffled = members[torch.randperm(len(members), generator=generator)]
        for holder, chunk in zip(holders, torch.tensor_split(shuffled, len(holders)), strict=True):
            chunks_per_node[holder].append(chunk)
    return [
        IndexedNodeData(
            spec, node, dataset.train_samples, torch.sort(torch.cat(chunks)).values, node_classes[node]
        )
        for node, chunks in enumerate(chunks_per_node)
    ]


def read_idx_file(path: Path, expected_magic: int) -> np.ndarray:
    """Read an unsigned-byte idx file (optionally gzipped) into a uint8 array shaped by its header.

    Checks the magic number, that the header is complete and that the payload matches the declared
    dimensions exactly; any mismatch raises :class:`DatasetError` naming ``path``.
    """
    raw = _read_bytes(path)
    where = f"{path} (decompressed)" if path.suffix == ".gz" else str(path)
    if len(raw) < 4:
        raise DatasetError(f"{where}: {len(raw)} bytes is too short for the 4-byte idx magic number")
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected_magic:
        raise DatasetError(f"{where}: idx magic number is 0x{magic:08x}, expected 0x{expected_magic:08x}")
    rank = magic & 0xFF
    header_bytes = 4 + 4 * rank
    if len(raw) < header_bytes:
        raise DatasetError(f"{where}: truncated idx header, expected {header_bytes} bytes, got {len(raw)}")
    dimensions = struct.unpack(f">{rank}I", raw[4:header_bytes])
    expected_bytes = header_bytes + math.prod(dimensions)
    if len(raw) != expected_bytes:
        problem = "truncated" if len(raw) < expected_bytes else "has trailing bytes"
        raise DatasetError(
            f"{where}: {problem}: dimensions {dimensions} need {expected_bytes} bytes, got {len(raw)}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_bytes).reshape(dimensions)  # read-only view


def read_cifar10_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 binary batch: (uint8 images (N, 3, 32, 32) in R, G, B planes, int64 labels (N,))."""
    raw = _read_bytes(path)
    if len(raw) == 0 or len(raw) % CIFAR10_RECORD_BYTES != 0:
        raise DatasetError(
            f"{path}: size {len(raw)} bytes is not a positive multiple of the {CIFAR10_RECORD_BYTES}-byte "
            f"record (1 label byte + 3072 pixel bytes); {len(raw) % CIFAR10_RECORD_BYTES} bytes left over"
        )
    records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, CIFAR10_RECORD_BYTES)
    labels = records[:, 0].astype(np.int64)
    _check_label_range(labels, CIFAR10_NUM_CLASSES, path)
    return records[:, 1:].reshape(-1, *CIFAR10_IMAGE_SHAPE), labels


def _require_int(value: object, what: str, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise DatasetError(f"{what} must be an integer, got {value!r}")
    if value < minimum:
        raise DatasetError(f"{what} must be >= {minimum}, got {value}")


def _check_sample_arguments(batch_size: int, generator: torch.Generator) -> None:
    _require_int(batch_size, "batch_size", minimum=1)
    if not isinstance(generator, torch.Generator):
        raise DatasetError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != "cpu":
        raise DatasetError(
            f"sampling needs a CPU torch.Generator for reproducibility, got one on {generator.device}"
        )


def _classes_present(labels: torch.Tensor | None, indices: torch.Tensor) -> tuple[int, ...] | None:
    if labels is None:
        return None
    return tuple(int(label) for label in torch.unique(labels[indices]))


def _split_heldout(
    spec: DatasetSpec,
    samples: torch.Tensor,
    labels: torch.Tensor | None,
    heldout_fraction: float,
    generator: torch.Generator,
    class_names: tuple[str, ...] = (),
) -> Dataset:
    # Per-class splitting keeps every class present in both parts; floor() leaves each class at
    # least one training example because the fraction is below 1.
    groups = (
        [torch.arange(len(samples))]
        if labels is None
        else [torch.nonzero(labels == label).flatten() for label in range(spec.num_classes)]
    )
    heldout_parts = []
    for members in groups:
        heldout_count = math.floor(len(members) * heldout_fraction)
        heldout_parts.append(members[torch.randperm(len(members), generator=generator)[:heldout_count]])
    is_heldout = torch.zeros(len(samples), dtype=torch.bool)
    is_heldout[torch.cat(heldout_parts)] = True
    return Dataset(
        spec=spec,
        train_samples=samples[~is_heldout],
        train_labels=None if labels is None else labels[~is_heldout],
        heldout_samples=samples[is_heldout],
        heldout_labels=None if labels is None else labels[is_heldout],
        class_names=class_names,
    )


def _bytes_to_unit_range(pixels: np.ndarray) -> torch.Tensor:
    """uint8 0..255 → float32 −1..1; exact at the ends because 255 / 127.5 is exactly 2 in float32."""
    return torch.from_numpy(pixels.astype(np.float32)).div_(127.5).sub_(1.0)


def _resize_images(images: torch.Tensor, image_size: int) -> torch.Tensor:
    height, width = images.shape[-2:]
    if (height, width) == (image_size, image_size):
        return images
    shrinking = image_size < height or image_size < width
    resized = F.interpolate(
        images, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=shrinking
    )
    # Interpolation weights are convex, but round-off can step a hair outside the range.
    return resized.clamp_(-1.0, 1.0)


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as compressed:
                return compressed.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as error:
        raise DatasetError(f"{path}: cannot read file: {error}") from error


def _check_label_range(labels: np.ndarray, num_classes: int, path: Path) -> None:
    out_of_range = np.flatnonzero(labels >= num_classes)
    if len(out_of_range) > 0:
        first = int(out_of_range[0])
        raise DatasetError(
            f"{path}: label {int(labels[first])} at record {first} is outside 0..{num_classes - 1}"
        )


def _load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits  # imported lazily: scikit-learn is slow to import

    digits = load_digits()
    # Pixel values are integer counts 0..16, so x / 8 − 1 maps them exactly onto [-1, 1].
    images = torch.from_numpy(digits.images.astype(np.float32)).div_(8.0).sub_(1.0).unsqueeze(1)
    return images.contiguous(), torch.from_numpy(digits.target.astype(np.int64))


def _find_idx_file(root: Path, name: str) -> Path:
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise DatasetError(f"MNIST file {name} (or {name}.gz) not found in {root}")


def _load_mnist(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    if not root.is_dir():
        raise DatasetError(f"MNIST path {root} is not a directory")
    images_path = _find_idx_file(root, MNIST_IMAGES_NAME)
    labels_path = _find_idx_file(root, MNIST_LABELS_NAME)
    pixels = read_idx_file(images_path, MNIST_IMAGES_MAGIC)
    labels = read_idx_file(labels_path, MNIST_LABELS_MAGIC).astype(np.int64)
    if len(pixels) == 0:
        raise DatasetError(f"{images_path}: contains no images")
    if len(labels) != len(pixels):
        raise DatasetError(
            f"{labels_path}: holds {len(labels)} labels but {images_path} holds {len(pixels)} images"
        )
    _check_label_range(labels, MNIST_NUM_CLASSES, labels_path)
    return _bytes_to_unit_range(pixels[:, None]), torch.from_numpy(labels)


def _load_cifar10(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    if (root / CIFAR10_SUBDIRECTORY).is_dir():
        root = root / CIFAR10_SUBDIRECTORY
    if not root.is_dir():
        raise DatasetError(f"CIFAR-10 path {root} is not a directory")
    missing = [name for name in CIFAR10_BATCH_NAMES if not (root / name).is_file()]
    if missing:
        raise DatasetError(f"CIFAR-10 binary batches missing from {root}: {', '.join(missing)}")
    batches = [read_cifar10_batch(root / name) for name in CIFAR10_BATCH_NAMES]
    pixels = np.concatenate([batch_pixels for batch_pixels, _ in batches])
    labels = np.concatenate([batch_labels for _, batch_labels in batches])
    return _bytes_to_unit_range(pixels), torch.from_numpy(labels)


def _image_files(directory: Path, *, recursive: bool) -> list[Path]:
    candidates = directory.rglob("*") if recursive else directory.iterdir()
    found = [
        candidate
        for candidate in candidates
        if candidate.suffix.lower() in IMAGE_EXTENSIONS
        # Hidden entries are editor or OS metadata (e.g. macOS "._x.png" forks), never images to train on.
        and not any(part.startswith(".") for part in candidate.relative_to(directory).parts)
        and candidate.is_file()
    ]
    return sorted(found, key=lambda candidate: candidate.relative_to(directory).as_posix())


def _load_folder(
    root: Path, image_size: int, channels: int
) -> tuple[torch.Tensor, torch.Tensor | None, tuple[str, ...]]:
    if not root.is_dir():
        raise DatasetError(f"image folder {root} is not a directory")
    subdirectories = sorted(
        (entry for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith(".")),
        key=lambda entry: entry.name,
    )
    classes = [
        (entry.name, files) for entry in subdirectories if (files := _image_files(entry, recursive=True))
    ]
    loose_files = _image_files(root, recursive=False)
    if classes and loose_files:
        raise DatasetError(
            f"image folder {root} mixes images at its top level ({loose_files[0].name}, ...) with class "
            f"subfolders ({classes[0][0]}, ...); move the loose images into a class folder or remove them"
        )
    if not classes and not loose_files:
        raise DatasetError(f"image folder {root} contains no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")

    mode = "L" if channels == 1 else "RGB"
    if classes:
        files = [file for _, class_files in classes for file in class_files]
        labels = torch.tensor(
            [label for label, (_, class_files) in enumerate(classes) for _ in class_files], dtype=torch.int64
        )
    else:
        files, labels = loose_files, None
    pixels = np.stack([_read_image(file, image_size, mode) for file in files])
    # Pillow gives (H, W) for greyscale and (H, W, C) for RGB; the models want channels first.
    pixels = pixels[:, None] if channels == 1 else pixels.transpose(0, 3, 1, 2)
    return _bytes_to_unit_range(pixels), labels, tuple(name for name, _ in classes)


def _read_image(path: Path, image_size: int, mode: str) -> np.ndarray:
    try:
        with Image.open(path) as opened:
            # Decodes in full (truncation surfaces here) and brings every Pillow mode to 8-bit ``mode``.
            image = normalize_image(opened, mode)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise DatasetError(f"{path}: Pillow cannot read this image: {error}") from error
    # Centre-crop to a square first so resizing never changes the aspect ratio of the content.
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    square = image.crop((left, top, left + side, top + side))
    resized = square.resize((image_size, image_size), Image.Resampling.BICUBIC)
    return np.asarray(resized, dtype=np.uint8)
