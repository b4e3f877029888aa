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


def resolve_device(name: str) -> torch.device:
    """``auto`` picks cuda when present, else mps, else cpu; an explicit device must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda was requested but torch sees no CUDA device")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device: mps was requested but it is not available")
    return torch.device(name)


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
            # One leaf per parameter view: differentiating w.r.t. the whole flat vectors would make
            # autograd fill a zero vector per slice and add into it (same values, ~15% slower step).
            point = z.detach()
            generator_params, discriminator_params = self._split_views(point[:boundary], point[boundary:])
            for view in (*generator_params.values(), *discriminator_params.values()):
                view.requires_grad_(True)
            fake = functional_call(self.generator, generator_params, (noise,))
            d_real = functional_call(self.discriminator, discriminator_params, (real,))
            d_fake = functional_call(self.discriminator, discriminator_params, (fake,))
            loss_d = discriminator_loss(self.loss, d_real, d_fake)
            if self.loss == "wgan_gp":

                def critic(x: torch.Tensor) -> torch.Tensor:
                    return functional_call(self.discriminator, discriminator_params, (x,))

                loss_d = loss_d + self.gp_weight * gradient_penalty(critic, real, fake.detach(), stream)
            loss_g = generator_loss(self.loss, d_fake)
            grads_v = torch.autograd.grad(loss_d, tuple(discriminator_params.values()), retain_graph=True)
            grads_u = torch.autograd.grad(loss_g, tuple(generator_params.values()))
        flat = [g.reshape(-1) for g in (*grads_u, *grads_v)]
        return torch.cat(flat), loss_g.detach(), loss_d.detach()

    def node_operator(self, data: NodeData, stream: torch.Generator) -> NodeOperator:
        return NodeOperator(self, data, stream)

    @torch.no_grad()
    def generate(self, x: torch.Tensor, count: int, stream: torch.Generator) -> torch.Tensor:
        generator_params, _ = self._split_views(
            x[: self.layout.generator_numel], x[self.layout.generator_numel :]
        )
        return functional_call(self.generator, generator_params, (self.latent(count, stream),))

    def state_dicts(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named tensors (``generator.*``, ``discriminator.*``) holding copies of x's values."""
        return {name: view.detach().cpu().clone() for name, view in self.layout.views(x).items()}


class NodeOperator:
    """Node i's stochastic operator T_i: every call draws a fresh minibatch and latent noise from the
    node's own stream, and remembers the losses at the point it was called with."""

    def __init__(self, problem: GanProblem, data: NodeData, stream: torch.Generator) -> None:
        self.problem = problem
        self.data = data
        self.stream = stream
        self.last_losses: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        problem = self.problem
        real = self.data.sample(problem.batch_size, self.stream).to(problem.device)
        noise = problem.latent(problem.batch_size, self.stream)
        gradient, loss_g, loss_d = problem.operator(z, real, noise, self.stream)
        self.last_losses = (loss_g, loss_d)
        return gradient

    def losses(self) -> dict[str, float]:
        if self.last_losses is None:
            return {}
        return {"loss_g": float(self.last_losses[0]), "loss_d": float(self.last_losses[1])}
