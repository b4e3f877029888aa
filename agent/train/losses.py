"""GAN objectives on discriminator logits, plus the WGAN-GP gradient penalty.

Every loss takes raw discriminator outputs (logits / critic values, any shape, usually (B,)) and
returns a scalar that its player *minimises*; the trainer's operator T(z) = (∇_G L_G, ∇_D L_D) is
built from exactly these two functions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LOSS_NAMES: tuple[str, ...] = ("nonsaturating", "wgan_gp", "hinge")
# λ from Gulrajani et al. 2017 ("Improved Training of Wasserstein GANs"), used unchanged in most
# follow-up work.
GP_WEIGHT_DEFAULT = 10.0


def _check_name(name: str) -> None:
    if name not in LOSS_NAMES:
        raise ValueError(f"unknown GAN loss {name!r}; expected one of {LOSS_NAMES}")


def _check_logits(label: str, logits: Tensor) -> None:
    if not isinstance(logits, Tensor):
        raise ValueError(f"{label} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.numel() == 0:
        raise ValueError(f"{label} is empty; a loss needs at least one discriminator output")
    if not logits.is_floating_point():
        raise ValueError(f"{label} must be a floating-point tensor, got dtype {logits.dtype}")


def discriminator_loss(name: str, d_real: Tensor, d_fake: Tensor) -> Tensor:
    """Discriminator (critic) loss for the real and fake logits; the gradient penalty is separate."""
    _check_name(name)
    _check_logits("d_real", d_real)
    _check_logits("d_fake", d_fake)
    if name == "nonsaturating":
        # softplus(-x) = -log σ(x) and softplus(x) = -log(1 - σ(x)): the binary cross-entropy of the
        # original GAN, written without the sigmoid so large logits don't saturate to log(0).
        return F.softplus(-d_real).mean() + F.softplus(d_fake).mean()
    if name == "hinge":
        return F.relu(1.0 - d_real).mean() + F.relu(1.0 + d_fake).mean()
    return d_fake.mean() - d_real.mean()


def generator_loss(name: str, d_fake: Tensor) -> Tensor:
    """Generator loss for the discriminator's logits on generated samples."""
    _check_name(name)
    _check_logits("d_fake", d_fake)
    if name == "nonsaturating":
        # -log σ(D(G(z))) rather than log(1 - σ(D(G(z)))): strong gradients early, when D wins easily.
        return F.softplus(-d_fake).mean()
    # Hinge and WGAN share the generator objective: raise the critic's score on fakes.
    return -d_fake.mean()


def gradient_penalty(
    discriminator: nn.Module, real: Tensor, fake: Tensor, generator: torch.Generator
) -> Tensor:
    """WGAN-GP penalty ((‖∇_x D(x̂)‖₂ − 1)²).mean() on random interpolates x̂ of real and fake samples.

    The interpolation coefficients are drawn from ``generator`` on the CPU and then moved to the
    samples' device, so the penalty is reproducible and independent of the accelerator's RNG.
    ``create_graph=True`` keeps the penalty differentiable with respect to the critic's parameters.
    The caller multiplies by the weight (``GP_WEIGHT_DEFAULT``) and adds it to the critic loss.
    """
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU torch.Generator, got one on {generator.device}")
    if real.shape != fake.shape:
        raise ValueError(
            f"real and fake batches must have the same shape, got {tuple(real.shape)} and {tuple(fake.shape)}"
        )
    if real.dim() < 2 or real.shape[0] == 0:
        raise ValueError(f"expected a non-empty batch (B, ...), got shape {tuple(real.shape)}")
    if not real.is_floating_point():
        raise ValueError(f"samples must be floating point, got dtype {real.dtype}")

    batch = real.shape[0]
    # One coefficient per sample, broadcast over that sample's features.
    coefficient_shape = (batch,) + (1,) * (real.dim() - 1)
    alpha = torch.rand(coefficient_shape, generator=generator, dtype=real.dtype).to(real.device)
    # Detach both ends: the penalty constrains the critic only and must not push on the generator.
    interpolates = (alpha * real.detach() + (1.0 - alpha) * fake.detach()).requires_grad_(True)
    scores = discriminator(interpolates)
    (gradients,) = torch.autograd.grad(
        outputs=scores.sum(), inputs=interpolates, create_graph=True, retain_graph=True
    )
    gradient_norms = gradients.reshape(batch, -1).norm(2, dim=1)
    return ((gradient_norms - 1.0) ** 2).mean()


__all__ = [
    "GP_WEIGHT_DEFAULT",
    "LOSS_NAMES",
    "discriminator_loss",
    "generator_loss",
    "gradient_penalty",
]
