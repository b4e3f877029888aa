"""Fully connected generator/discriminator pair for low-dimensional point data (the 2-D mixtures).

Both networks hold parameters only (no buffers): the trainer flattens (generator, discriminator)
into one vector and gossip-averages it across nodes, so any per-node running state would silently
diverge between peers.

Tuned for plain optimistic SGD (DPOSG, one step size for both players; see docs/quality.md):

* The generator's hidden layers use tanh. Saturated tanh units give flat regions of the latent space,
  which is how a continuous generator fed Gaussian noise can put its mass on separated modes; with
  ReLU units the samples stayed spread along the ring between the modes.
* Some layers are *scaled linear* layers: they compute ``F.linear(x, c·W, c·b)`` with the stored
  parameters initialised to PyTorch's default divided by ``c``. The function at initialisation is
  unchanged, but a plain SGD step of size η moves ``c·W`` by ``c²·η·∇``: a per-layer learning-rate
  multiplier written into the parametrisation (like the "equalised learning rate" of progressive
  GANs), which needs no optimizer state and no change to the update rule. Measured with Adam on the
  ring, the gradient of the generator's output layer is ~100× that of its hidden layers, so one plain
  step size either stalls the hidden layers or throws the samples off the data; and the
  discriminator must learn faster than the generator (the two time-scale rule) for the samples to
  settle on modes of std 0.01.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Defaults sized for the 8-Gaussian ring and the 25-Gaussian grid: three hidden layers of 128 units
# fit both mixtures on CPU in a few thousand steps while keeping the gossiped vector ~35k values.
DEFAULT_HIDDEN = 128
DEFAULT_DEPTH = 3
# LeakyReLU in the discriminator keeps gradients flowing to the generator for samples far from
# the data, where a ReLU critic can go flat; 0.2 is the DCGAN/WGAN-GP convention.
DISCRIMINATOR_NEGATIVE_SLOPE = 0.2
# Effective SGD learning-rate multipliers (c² of the scaled linear layers), relative to the step size
# the generator's hidden layers see. Found on ring8 with DPOSG (docs/quality.md): 8× for every
# discriminator layer, 0.1× for the generator's output layer.
DISCRIMINATOR_LR_MULTIPLIER = 8.0
GENERATOR_OUTPUT_LR_MULTIPLIER = 0.1


class ScaledLinear(nn.Linear):
    """``nn.Linear`` whose weight and bias are used multiplied by a constant ``scale`` (a plain float,
    not a buffer). Parameters start at PyTorch's default initialisation divided by ``scale``, so the
    layer's function at initialisation is the default one and SGD's step on it is ``scale²`` larger."""

    def __init__(self, in_features: int, out_features: int, scale: float) -> None:
        if not scale > 0.0:
            raise ValueError(f"scale must be positive, got {scale!r}")
        super().__init__(in_features, out_features)
        self.scale = float(scale)
        with torch.no_grad():
            self.weight.div_(self.scale)
            self.bias.div_(self.scale)

    def forward(self, inputs: Tensor) -> Tensor:
        return F.linear(inputs, self.weight * self.scale, self.bias * self.scale)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale={self.scale:g}"


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _hidden_stack(
    in_features: int, hidden: int, depth: int, make_activation: Callable[[], nn.Module], scale: float
) -> list[nn.Module]:
    layers: list[nn.Module] = []
    width_in = in_features
    for _ in range(depth):
        layers += [ScaledLinear(width_in, hidden, scale), make_activation()]
        width_in = hidden
    return layers


class MLPGenerator(nn.Module):
    """Maps latent codes (B, latent_dim) to points (B, out_dim): tanh hidden layers, linear output."""

    def __init__(
        self, latent_dim: int, out_dim: int, hidden: int = DEFAULT_HIDDEN, depth: int = DEFAULT_DEPTH
    ) -> None:
        super().__init__()
        _check_positive("latent_dim", latent_dim)
        _check_positive("out_dim", out_dim)
        _check_positive("hidden", hidden)
        _check_positive("depth", depth)
        self.latent_dim = latent_dim
        self.sample_shape: tuple[int, ...] = (out_dim,)
        # Linear output: mixture modes sit at arbitrary coordinates (up to ±4 on the grid), so a
        # squashing output would need data rescaling that the metrics would then have to undo.
        self.net = nn.Sequential(
            *_hidden_stack(latent_dim, hidden, depth, nn.Tanh, 1.0),
            ScaledLinear(hidden, out_dim, GENERATOR_OUTPUT_LR_MULTIPLIER**0.5),
        )

    def forward(self, latent: Tensor) -> Tensor:
        if latent.dim() != 2 or latent.shape[1] != self.latent_dim:
            raise ValueError(
                f"MLPGenerator expects latent of shape (B, {self.latent_dim}), got {tuple(latent.shape)}"
            )
        points: Tensor = self.net(latent)
        return points


class MLPDiscriminator(nn.Module):
    """Maps points (B, in_dim) to one real-vs-fake logit per sample, shape (B,)."""

    def __init__(self, in_dim: int, hidden: int = DEFAULT_HIDDEN, depth: int = DEFAULT_DEPTH) -> None:
        super().__init__()
        _check_positive("in_dim", in_dim)
        _check_positive("hidden", hidden)
        _check_positive("depth", depth)
        self.sample_shape: tuple[int, ...] = (in_dim,)
        scale = DISCRIMINATOR_LR_MULTIPLIER**0.5
        self.net = nn.Sequential(
            *_hidden_stack(in_dim, hidden, depth, lambda: nn.LeakyReLU(DISCRIMINATOR_NEGATIVE_SLOPE), scale),
            ScaledLinear(hidden, 1, scale),
        )

    def forward(self, samples: Tensor) -> Tensor:
        if samples.dim() != 2 or samples.shape[1] != self.sample_shape[0]:
            raise ValueError(
                f"MLPDiscriminator expects samples of shape (B, {self.sample_shape[0]}), "
                f"got {tuple(samples.shape)}"
            )
        logits: Tensor = self.net(samples)
        return logits.squeeze(1)


__all__ = [
    "DEFAULT_DEPTH",
    "DEFAULT_HIDDEN",
    "DISCRIMINATOR_LR_MULTIPLIER",
    "GENERATOR_OUTPUT_LR_MULTIPLIER",
    "MLPDiscriminator",
    "MLPGenerator",
    "ScaledLinear",
]
