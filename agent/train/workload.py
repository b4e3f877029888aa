"""A GAN as a min-max operator on one flat vector: T(z) = (∇_u L_G, ∇_v L_D) at z = (u, v).

The same ``GanProblem`` serves the simulator (many nodes, one process) and the agent (one node per
process). Parameters are never copied into modules: the models run functionally on views of the
flat vector, so the vector that gossip averages is exactly what the networks compute with.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from agent.core.algorithms import GradientFn
from agent.core.config import TrainConfig
from agent.core.schema import ParameterLayout
from agent.models import build_models
from agent.train.data import DatasetSpec, NodeData
from agent.train.losses import discriminator_loss, generator_loss, gradient_penalty


def node_seed(seed: int, node_index: int) -> int:
    """The seed of node i's private stream (minibatches and latent noise), the same in every process."""
    return int(np.random.SeedSequence([seed, node_index]).generate_state(1, dtype=np.uint64)[0] % (2**63))


def node_generator(seed: int, node_index: int) -> torch.Generator:
    generator = torch.Generator(device="cpu")
    generator.manual_seed(node_seed(seed, node_index))
    return generator


@dataclass
class GanProblem:
    generator: nn.Module
    discriminator: nn.Module
    layout: ParameterLayout
    x0: torch.Tensor
    latent_dim: int
    batch_size: int
    loss: str
    gp_weight: float
    device: torch.device

    @classmethod
    def build(cls, config: TrainConfig, spec: DatasetSpec, device: torch.device) -> GanProblem:
        """Models initialised from the shared seed: every node computes the same x0."""
        assert config.model is not None and config.latent_dim is not None and config.batch_size is not None
        torch.manual_seed(config.seed)
        generator, discriminator = build_models(
            config.model, spec.sample_shape, latent_dim=config.latent_dim, width=config.width
        )
        generator_state, discriminator_state = generator.state_dict(), discriminator.state_dict()
        layout = ParameterLayout.from_state_dicts(generator_state, discriminator_state)
        named = {f"generator.{k}": v for k, v in generator_state.items()}
        named |= {f"discriminator.{k}": v for k, v in discriminator_state.items()}
        x0 = layout.flatten(named).to(device)
        return cls(
            generator.to(device),
            discriminator.to(device),
            layout,
            x0,
            config.latent_dim,
            config.batch_size,
            config.loss,
            config.gp_weight,
            device,
        )

    def _split_views(
        self, u: torch.Tensor, v: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        generator_params: dict[str, torch.Tensor] = {}
        discriminator_params: dict[str, torch.Tensor] = {}
        boundary = self.layout.generator_numel
        for spec in self.layout.tensors:
            player, _, name = spec.name.partition(".")
            if player == "generator":
                generator_params[name] = u[spec.offset : spec.offset + spec.numel].view(spec.shape)
            else:
                start = spec.offset - boundary
                discriminator_params[name] = v[start : start + spec.numel].view(spec.shape)
        return generator_params, discriminator_params

    def latent(self, count: int, stream: torch.Generator) -> torch.Tensor:
        # Drawn on the CPU from the node's stream, so every device sees the same numbers.
        return torch.randn(count, self.latent_dim, generator=stream).to(self.device)

    def operator(
        self, z: torch.Tensor, real: torch.Tensor, noise: torch.Tensor, stream: torch.Generator
    ) -> torch.Tensor:
        """Both players' gradients at z, from one minibatch: (∂L_G/∂u, ∂L_D/∂v)."""
        boundary = self.layout.generator_numel
        with torch.enable_grad():
            u = z[:boundary].detach().requires_grad_(True)
            v = z[boundary:].detach().requires_grad_(True)
            generator_params, discriminator_params = self._split_views(u, v)
            fake = functional_call(self.generator, generator_params, (noise,))
            d_real = functional_call(self.discriminator, discriminator_params, (real,))
            d_fake = functional_call(self.discriminator, discriminator_params, (fake,))
            loss_d = discriminator_loss(self.loss, d_real, d_fake)
            if self.loss == "wgan_gp":

                def critic(x: torch.Tensor) -> torch.Tensor:
                    return functional_call(self.discriminator, discriminator_params, (x,))

                loss_d = loss_d + self.gp_weight * gradient_penalty(critic, real, fake.detach(), stream)
            loss_g = generator_loss(self.loss, d_fake)
            (grad_v,) = torch.autograd.grad(loss_d, v, retain_graph=True)
            (grad_u,) = torch.autograd.grad(loss_g, u)
        return torch.cat([grad_u, grad_v])

    def node_operator(self, data: NodeData, stream: torch.Generator) -> GradientFn:
        """Node i's stochastic operator: every call draws a fresh minibatch and noise from its stream."""

        def gradient_at(z: torch.Tensor) -> torch.Tensor:
            real = data.sample(self.batch_size, stream).to(self.device)
            noise = self.latent(self.batch_size, stream)
            return self.operator(z, real, noise, stream)

        return gradient_at

    @torch.no_grad()
    def generate(self, x: torch.Tensor, count: int, stream: torch.Generator) -> torch.Tensor:
        generator_params, _ = self._split_views(
            x[: self.layout.generator_numel], x[self.layout.generator_numel :]
        )
        return functional_call(self.generator, generator_params, (self.latent(count, stream),))

    def state_dicts(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named tensors (``generator.*``, ``discriminator.*``) holding copies of x's values."""
        return {name: view.detach().cpu().clone() for name, view in self.layout.views(x).items()}
