"""Fully connected generator/discriminator pair for low-dimensional point data (the 2-D mixtures).

Both networks hold parameters only (no buffers): the trainer flattens (generator, discriminator)
into one vector and gossip-averages it across nodes, so any per-node running state would silently
diverge between peers.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

# Defaults sized for the 8-Gaussian ring and the 25-Gaussian grid: three hidden layers of 128 units
# fit both mixtures on CPU in a few thousand steps while keeping the gossiped vector ~35k values.
DEFAULT_HIDDEN = 128
DEFAULT_DEPTH = 3
# LeakyReLU in the discriminator keeps gradients flowing to the generator for samples far from
# the data, where a ReLU critic can go flat; 0.2 is the DCGAN/WGAN-GP convention.
DISCRIMINATOR_NEGATIVE_SLOPE = 0.2


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _hidden_stack(
    in_features: int, hidden: int, depth: int, make_activation: Callable[[], nn.Module]
) -> list[nn.Module]:
    layers: list[nn.Module] = []
    width_in = in_features
    for _ in range(depth):
        layers += [nn.Linear(width_in, hidden), make_activation()]
        width_in = hidden
    return layers


class MLPGenerator(nn.Module):
    """Maps latent codes (B, latent_dim) to points (B, out_dim) with an unbounded linear output."""

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
            *_hidden_stack(latent_dim, hidden, depth, nn.ReLU), nn.Linear(hidden, out_dim)
        )

    def forward(self, latent: Tensor) -> Tensor:
        if latent.dim() != 2 or latent.shape[1] != self.latent_dim:
            raise ValueError(
                f"MLPGenerator expects latent of shape (B, {self.latent_dim}), got {tuple(latent.shape)}"
            )
        return self.net(latent)


class MLPDiscriminator(nn.Module):
    """Maps points (B, in_dim) to one real-vs-fake logit per sample, shape (B,)."""

    def __init__(self, in_dim: int, hidden: int = DEFAULT_HIDDEN, depth: int = DEFAULT_DEPTH) -> None:
        super().__init__()
        _check_positive("in_dim", in_dim)
        _check_positive("hidden", hidden)
        _check_positive("depth", depth)
        self.sample_shape: tuple[int, ...] = (in_dim,)
        self.net = nn.Sequential(
            *_hidden_stack(in_dim, hidden, depth, lambda: nn.LeakyReLU(DISCRIMINATOR_NEGATIVE_SLOPE)),
            nn.Linear(hidden, 1),
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
    "MLPDiscriminator",
    "MLPGenerator",
]
