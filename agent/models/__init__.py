"""Model registry: build a (generator, discriminator) pair for a model family and a sample shape.

Families:
- ``"mlp"``: fully connected nets for flat vectors of shape (d,), e.g. the 2-D Gaussian mixtures.
- ``"dcgan"``: small convolutional nets for images (C, S, S) with C in {1, 3} and S in {8, 28, 32}.

Both nets of every family hold parameters only (no buffers), so the trainer can treat the pair as one
flat vector to gossip-average. Construction draws from torch's global RNG only, so calling
``torch.manual_seed(s)`` and then ``build_models(...)`` gives bit-identical weights on every node.
"""

from __future__ import annotations

from torch import nn

from agent.models.dcgan import (
    SUPPORTED_CHANNELS,
    SUPPORTED_IMAGE_SIZES,
    DCGANDiscriminator,
    DCGANGenerator,
    validate_image_shape,
)
from agent.models.mlp import DEFAULT_HIDDEN, MLPDiscriminator, MLPGenerator

MODEL_FAMILIES: tuple[str, ...] = ("mlp", "dcgan")


def _normalise_shape(sample_shape: tuple[int, ...]) -> tuple[int, ...]:
    shape = tuple(sample_shape)
    if not shape or any(isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0 for dim in shape):
        raise ValueError(f"sample_shape must be a non-empty tuple of positive integers, got {sample_shape!r}")
    return shape


def default_family(sample_shape: tuple[int, ...]) -> str:
    """The family that fits a sample shape: ``"mlp"`` for vectors (d,), ``"dcgan"`` for images (C, H, W)."""
    shape = _normalise_shape(sample_shape)
    if len(shape) == 1:
        return "mlp"
    if len(shape) == 3:
        validate_image_shape(shape)
        return "dcgan"
    raise ValueError(
        f"no model family for sample shape {shape}: expected a vector (d,) or an image (C, H, W)"
    )


def build_models(
    family: str, sample_shape: tuple[int, ...], *, latent_dim: int, width: int | None = None
) -> tuple[nn.Module, nn.Module]:
    """Build (generator, discriminator) for ``family`` and per-sample shape ``sample_shape``.

    ``width`` is the hidden width of the MLPs, or the base channel count of the DCGAN pair; ``None``
    picks the family's default for that shape. The generator maps (B, latent_dim) to (B, *sample_shape)
    and the discriminator maps (B, *sample_shape) to one logit per sample, shape (B,).
    """
    if family not in MODEL_FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {MODEL_FAMILIES}")
    shape = _normalise_shape(sample_shape)
    if isinstance(latent_dim, bool) or not isinstance(latent_dim, int) or latent_dim <= 0:
        raise ValueError(f"latent_dim must be a positive integer, got {latent_dim!r}")
    if width is not None and (isinstance(width, bool) or not isinstance(width, int) or width <= 0):
        raise ValueError(f"width must be a positive integer or None, got {width!r}")

    if family == "mlp":
        if len(shape) != 1:
            raise ValueError(
                f"model family 'mlp' supports flat vectors (d,), got sample shape {shape}; "
                "use 'dcgan' for images"
            )
        hidden = DEFAULT_HIDDEN if width is None else width
        return MLPGenerator(latent_dim, shape[0], hidden=hidden), MLPDiscriminator(shape[0], hidden=hidden)

    if len(shape) != 3:
        raise ValueError(
            f"model family 'dcgan' supports images (C, H, W) with C in {SUPPORTED_CHANNELS} and "
            f"H = W in {SUPPORTED_IMAGE_SIZES}, got sample shape {shape}; use 'mlp' for vectors"
        )
    image_shape = (shape[0], shape[1], shape[2])
    return DCGANGenerator(latent_dim, image_shape, width), DCGANDiscriminator(image_shape, width)


def count_parameters(module: nn.Module) -> int:
    """Number of scalar parameters: this module's share of the gossiped vector."""
    return sum(parameter.numel() for parameter in module.parameters())


__all__ = [
    "MODEL_FAMILIES",
    "DCGANDiscriminator",
    "DCGANGenerator",
    "MLPDiscriminator",
    "MLPGenerator",
    "build_models",
    "count_parameters",
    "default_family",
]
