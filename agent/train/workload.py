"""A GAN as a min-max operator on one flat vector: T(z) = (∇_u L_G, ∇_v L_D) at z = (u, v).

The same ``GanProblem`` serves the simulator (many nodes, one process) and the agent (one node per
process). As in DDP's flat buckets, the modules' parameters are views into one persistent flat
buffer: evaluating T at z is one copy of z into that buffer, the modules called directly (no per-call
parameter swapping through ``functional_call``), two ``backward`` calls, and one concatenation of the
gradients into a new flat vector. The vector that gossip averages is exactly what the networks compute
with. Measured against a hand-written loop of the same model in bench/agent_overhead.py.
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

# Marks which problem's flat buffers a module's parameters currently view.
_BINDING_ATTRIBUTE = "_dpgan_flat_binding"


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

    def __post_init__(self) -> None:
        self._bind_flat_buffers()

    def _bound(self) -> bool:
        """Whether the modules still hold this problem's views (``dataclasses.replace`` makes a second
        problem that shares a module, and binding that one takes the module over)."""
        token = self._binding_token
        return (
            self.generator.__dict__.get(_BINDING_ATTRIBUTE) is token
            and self.discriminator.__dict__.get(_BINDING_ATTRIBUTE) is token
        )

    def _bind_flat_buffers(self) -> None:
        """Make every module parameter a view of ``self._point``."""
        self._point = self.x0.clone()
        self._generator_parameters: list[nn.Parameter] = []
        self._discriminator_parameters: list[nn.Parameter] = []
        modules = {"generator": self.generator, "discriminator": self.discriminator}
        self._binding_token = object()
        for module in modules.values():
            module.__dict__[_BINDING_ATTRIBUTE] = self._binding_token
        for spec in self.layout.tensors:
            player, _, name = spec.name.partition(".")
            owner_path, _, leaf = name.rpartition(".")
            owner = modules[player].get_submodule(owner_path)
            window = slice(spec.offset, spec.offset + spec.numel)
            parameter = nn.Parameter(self._point[window].view(spec.shape))
            owner._parameters[leaf] = parameter
            players = self._generator_parameters if player == "generator" else self._discriminator_parameters
            players.append(parameter)

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
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Both players' gradients at z, from one minibatch, (∂L_G/∂u, ∂L_D/∂v) as a new flat tensor,
        and the two losses (loss_g, loss_d) at z.

        Not reentrant: one call at a time per problem (the agent and the simulator call it sequentially).
        """
        if not self._bound():
            self._bind_flat_buffers()
        with torch.no_grad():
            self._point.copy_(z)
        parameters = (*self._generator_parameters, *self._discriminator_parameters)
        for parameter in parameters:
            parameter.grad = None  # autograd then hands each gradient over without a copy
        with torch.enable_grad():
            fake = self.generator(noise)
            d_real = self.discriminator(real)
            d_fake = self.discriminator(fake)
            loss_d = discriminator_loss(self.loss, d_real, d_fake)
            if self.loss == "wgan_gp":
                loss_d = loss_d + self.gp_weight * gradient_penalty(
                    self.discriminator, real, fake.detach(), stream
                )
            loss_g = generator_loss(self.loss, d_fake)
            # Each player differentiates its own loss w.r.t. its own parameters only.
            torch.autograd.backward(loss_d, inputs=self._discriminator_parameters, retain_graph=True)
            torch.autograd.backward(loss_g, inputs=self._generator_parameters)
        # One copy, into the new flat gradient (a parameter without a gradient path contributes zeros).
        flat = torch.cat(
            [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in parameters]
        )
        for parameter in parameters:
            parameter.grad = None
        return flat, loss_g.detach(), loss_d.detach()

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
