"""Small DCGAN-style convolutional generator/discriminator pair for 8×8, 28×28 and 32×32 images.

Both nets upsample/downsample by exactly two factors of 2, so the generator starts from a
(2·width, size/4, size/4) feature map: 2×2 for 8×8 digits, 7×7 for 28×28, 8×8 for 32×32.

No module here keeps buffers. The trainer gossip-averages the flat (generator, discriminator)
parameter vector between nodes; BatchNorm running statistics would be per-node state outside that
vector (and would make the same weights behave differently on different peers), so the generator's
BatchNorm layers use ``track_running_stats=False``: they always normalise with the current batch's
statistics, in training and in evaluation alike. The discriminator has no normalisation at all,
because the WGAN-GP penalty is defined per sample and batch norm couples the samples of a batch.
"""

from __future__ import annotations

from torch import Tensor, nn

SUPPORTED_IMAGE_SIZES = (8, 28, 32)
SUPPORTED_CHANNELS = (1, 3)
# Default widths keep CPU training practical: with latent_dim 64 the 8×8 pair has ~21k (G) + ~34k (D)
# parameters, the 28×28 / 32×32 pairs ~250-320k (G) + ~140k (D).
DEFAULT_WIDTH_BY_SIZE = {8: 16, 28: 32, 32: 32}
LEAKY_SLOPE = 0.2
# Each stride-2 (transposed) convolution with kernel 4, padding 1 exactly doubles / halves the size.
_UPSAMPLE_STAGES = 2


def validate_image_shape(sample_shape: tuple[int, ...]) -> tuple[int, int]:
    """Return (channels, size) for a supported (C, H, W) shape, else raise a ValueError saying why."""
    if len(sample_shape) != 3:
        raise ValueError(f"dcgan models need an image shape (C, H, W), got {sample_shape}")
    channels, height, width = sample_shape
    if channels not in SUPPORTED_CHANNELS:
        raise ValueError(
            f"dcgan models support {SUPPORTED_CHANNELS} channels, got {channels} in {sample_shape}"
        )
    if height != width:
        raise ValueError(f"dcgan models need square images, got {height}×{width}")
    if height not in SUPPORTED_IMAGE_SIZES:
        raise ValueError(f"dcgan models support image sizes {SUPPORTED_IMAGE_SIZES}, got {height}×{width}")
    return channels, height


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _resolve_width(size: int, width: int | None) -> int:
    if width is None:
        return DEFAULT_WIDTH_BY_SIZE[size]
    _check_positive("width", width)
    return width


class DCGANGenerator(nn.Module):
    """Latent (B, latent_dim) → images (B, C, S, S) in [-1, 1]."""

    def __init__(self, latent_dim: int, sample_shape: tuple[int, int, int], width: int | None = None) -> None:
        super().__init__()
        _check_positive("latent_dim", latent_dim)
        channels, size = validate_image_shape(tuple(sample_shape))
        width = _resolve_width(size, width)
        self.latent_dim = latent_dim
        self.sample_shape: tuple[int, ...] = (channels, size, size)
        start = size // (2**_UPSAMPLE_STAGES)
        base_channels = 2 * width
        self.project = nn.Linear(latent_dim, base_channels * start * start)
        self.body = nn.Sequential(
            nn.Unflatten(1, (base_channels, start, start)),
            nn.BatchNorm2d(base_channels, track_running_stats=False),
            nn.ReLU(),
            nn.ConvTranspose2d(base_channels, width, kernel_size=4, stride=2, padding=1),
            nn.BatchNorm2d(width, track_running_stats=False),
            nn.ReLU(),
            nn.ConvTranspose2d(width, width, kernel_size=4, stride=2, padding=1),
            nn.BatchNorm2d(width, track_running_stats=False),
            nn.ReLU(),
            # A final stride-1 3×3 conv smooths the checkerboard pattern that stride-2 transposed
            # convolutions leave behind, which is very visible at 8×8.
            nn.Conv2d(width, channels, kernel_size=3, padding=1),
            nn.Tanh(),
        )

    def forward(self, latent: Tensor) -> Tensor:
        if latent.dim() != 2 or latent.shape[1] != self.latent_dim:
            raise ValueError(
                f"DCGANGenerator expects latent of shape (B, {self.latent_dim}), got {tuple(latent.shape)}"
            )
        images: Tensor = self.body(self.project(latent))
        return images


class DCGANDiscriminator(nn.Module):
    """Images (B, C, S, S) → one real-vs-fake logit per sample, shape (B,)."""

    def __init__(self, sample_shape: tuple[int, int, int], width: int | None = None) -> None:
        super().__init__()
        channels, size = validate_image_shape(tuple(sample_shape))
        width = _resolve_width(size, width)
        self.sample_shape: tuple[int, ...] = (channels, size, size)
        end = size // (2**_UPSAMPLE_STAGES)
        # Twice the generator's channel counts: the critic sees only a single stride-2 pyramid
        # without normalisation, and an under-sized critic is the usual cause of blurry, mode-averaged
        # samples; this keeps the two nets' parameter counts within a factor of ~2.
        self.net = nn.Sequential(
            nn.Conv2d(channels, 2 * width, kernel_size=4, stride=2, padding=1),
            nn.LeakyReLU(LEAKY_SLOPE),
            nn.Conv2d(2 * width, 4 * width, kernel_size=4, stride=2, padding=1),
            nn.LeakyReLU(LEAKY_SLOPE),
            nn.Flatten(),
            nn.Linear(4 * width * end * end, 1),
        )

    def forward(self, images: Tensor) -> Tensor:
        if tuple(images.shape[1:]) != self.sample_shape or images.dim() != 4:
            raise ValueError(
                f"DCGANDiscriminator expects images of shape (B, {', '.join(map(str, self.sample_shape))}), "
                f"got {tuple(images.shape)}"
            )
        logits: Tensor = self.net(images)
        return logits.squeeze(1)


__all__ = [
    "DEFAULT_WIDTH_BY_SIZE",
    "SUPPORTED_CHANNELS",
    "SUPPORTED_IMAGE_SIZES",
    "DCGANDiscriminator",
    "DCGANGenerator",
    "validate_image_shape",
]
