"""All nodes' GAN operators in one call: T(Z) row by row for a (n, d) stack of points Z.

The per-node ``NodeOperator`` loop (``GanProblem.operator``) is the exact reference the networked agents
reproduce bit for bit. ``BatchedGanOperator`` computes the same quantity for every node at once with
``torch.func.vmap`` over ``torch.func.grad``: the models run functionally on per-node slices of the
stack, so n small networks become a few batched matmuls/convolutions instead of n Python round trips.

What is identical to the exact path: the random numbers. Each node still draws its minibatch, its latent
noise and (WGAN-GP) its interpolation coefficients from its own stream, in the same order and with the
same calls as ``NodeOperator``/``gradient_penalty``, so after any number of iterations every stream is in
the same state under both paths. What is not: the last bits of the gradients, because batched kernels
sum in a different order than the per-node ones (see docs/simulator-scale.md for the observed gap).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from agent.train.losses import discriminator_loss, generator_loss
from agent.train.workload import GanProblem, NodeOperator

# vmap runs this many nodes per batched call (torch.func's chunk_size), so activation memory stays
# bounded as n grows. Measured on ring8 (docs/simulator-scale.md): against one call for all nodes, 3-25%
# slower at n = 64, mostly faster at n = 256 (activations out of cache) and 0.6 GB smaller there.
NODES_PER_CALL = 32
_BATCH_COUPLING = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class _FlatSplit:
    """How one flat vector splits into both players' named tensors, precomputed once: a single
    ``torch.split`` per call, whose backward is a single concatenation straight into the flat gradient."""

    def __init__(self, problem: GanProblem) -> None:
        specs = problem.layout.tensors
        self.sizes = [spec.numel for spec in specs]
        self.entries = [
            (spec.name.startswith("generator."), spec.name.partition(".")[2], torch.Size(spec.shape))
            for spec in specs
        ]

    def __call__(self, flat: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        generator_params: dict[str, Tensor] = {}
        discriminator_params: dict[str, Tensor] = {}
        parts = torch.split(flat, self.sizes)
        for (is_generator, name, shape), part in zip(self.entries, parts, strict=True):
            (generator_params if is_generator else discriminator_params)[name] = part.view(shape)
        return generator_params, discriminator_params


class BatchedGanOperator:
    """Node i's stochastic operator T_i for every i at once: ``(n, d) -> (n, d)``.

    Wraps the nodes' ``NodeOperator``s (their data shares and streams) and, like them, records each
    node's losses in ``NodeOperator.last_losses`` so reporting code cannot tell the paths apart.
    """

    def __init__(
        self,
        problem: GanProblem,
        operators: Sequence[NodeOperator],
        nodes_per_call: int | None = NODES_PER_CALL,
    ) -> None:
        if not operators:
            raise ValueError("a batched operator needs at least one node")
        if any(op.problem is not problem for op in operators):
            raise ValueError("every node operator must belong to the same GanProblem")
        if nodes_per_call is not None and nodes_per_call < 1:
            raise ValueError(f"nodes_per_call must be positive or None, got {nodes_per_call}")
        self.problem = problem
        self.operators = list(operators)
        self._split = _FlatSplit(problem)
        self._uses_penalty = problem.loss == "wgan_gp"
        # Scoring real and fake samples in one pass equals two passes only if the critic treats samples
        # independently; batch norm would mix their statistics (the bundled critics have none).
        self._joint_critic_pass = not any(
            isinstance(module, _BATCH_COUPLING) for module in problem.discriminator.modules()
        )
        # in_dims: points, real and noise vary per node; alpha is absent (None) without a penalty.
        self._batched = vmap(
            grad(self._node_objective, has_aux=True),
            in_dims=(0, 0, 0, 0 if self._uses_penalty else None),
            chunk_size=nodes_per_call,
        )

    @property
    def n(self) -> int:
        return len(self.operators)

    def draw(self) -> tuple[Tensor, Tensor, Tensor | None]:
        """Every node's (real, noise, alpha) from its own stream, stacked in node order.

        Same calls in the same order as ``NodeOperator.__call__`` then ``gradient_penalty``: data first,
        latent noise second, interpolation coefficients last.
        """
        problem = self.problem
        batch = problem.batch_size
        reals: list[Tensor] = []
        noises: list[Tensor] = []
        alphas: list[Tensor] = []
        for op in self.operators:
            real = op.data.sample(batch, op.stream)
            reals.append(real)
            noises.append(problem.latent(batch, op.stream))
            if self._uses_penalty:
                shape = (batch,) + (1,) * (real.dim() - 1)
                alphas.append(torch.rand(shape, generator=op.stream, dtype=real.dtype))
        device = problem.device
        alpha = torch.stack(alphas).to(device) if self._uses_penalty else None
        return torch.stack(reals).to(device), torch.stack(noises), alpha

    def _node_objective(
        self, z: Tensor, real: Tensor, noise: Tensor, alpha: Tensor | None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """L_G with the critic frozen plus L_D with the generator frozen, for one node.

        Its gradient w.r.t. (u, v) is exactly (∂L_G/∂u, ∂L_D/∂v): the detaches cut the cross terms, so
        one backward pass gives both players' gradients (the price is one extra critic forward on the
        fakes, cheaper than a second backward through the generator).
        """
        problem = self.problem
        generator_params, discriminator_params = self._split(z)
        frozen_critic = {name: p.detach() for name, p in discriminator_params.items()}
        fake = functional_call(problem.generator, generator_params, (noise,))
        fake_fixed = fake.detach()
        if self._joint_critic_pass:
            # One critic pass over real and fake together: half the kernel launches, larger matmuls.
            both = torch.cat([real, fake_fixed])
            d_both = functional_call(problem.discriminator, discriminator_params, (both,))
            d_real, d_fake = d_both[: real.shape[0]], d_both[real.shape[0] :]
        else:
            d_real = functional_call(problem.discriminator, discriminator_params, (real,))
            d_fake = functional_call(problem.discriminator, discriminator_params, (fake_fixed,))
        loss_d = discriminator_loss(problem.loss, d_real, d_fake)
        if alpha is not None:
            loss_d = loss_d + problem.gp_weight * self._penalty(discriminator_params, real, fake_fixed, alpha)
        loss_g = generator_loss(problem.loss, functional_call(problem.discriminator, frozen_critic, (fake,)))
        return loss_g + loss_d, (loss_g.detach(), loss_d.detach())

    def _penalty(self, critic_params: dict[str, Tensor], real: Tensor, fake: Tensor, alpha: Tensor) -> Tensor:
        """``losses.gradient_penalty`` with pre-drawn coefficients, differentiable w.r.t. the critic."""
        interpolates = alpha * real + (1.0 - alpha) * fake

        def critic_sum(samples: Tensor) -> Tensor:
            return functional_call(self.problem.discriminator, critic_params, (samples,)).sum()

        gradients = grad(critic_sum)(interpolates)
        norms = gradients.reshape(gradients.shape[0], -1).norm(2, dim=1)
        return ((norms - 1.0) ** 2).mean()

    def __call__(self, points: Tensor) -> Tensor:
        if points.dim() != 2 or points.shape[0] != self.n:
            raise ValueError(f"expected a ({self.n}, d) stack of points, got shape {tuple(points.shape)}")
        real, noise, alpha = self.draw()
        with torch.enable_grad():
            gradients, (loss_g, loss_d) = self._batched(points.detach(), real, noise, alpha)
        for op, node_loss_g, node_loss_d in zip(self.operators, loss_g, loss_d, strict=True):
            op.last_losses = (node_loss_g, node_loss_d)
        return gradients
