"""Model registry, model families and GAN losses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from agent.models import MODEL_FAMILIES, build_models, count_parameters, default_family
from agent.models.dcgan import DCGANDiscriminator, DCGANGenerator
from agent.models.mlp import MLPDiscriminator, MLPGenerator
from agent.train.losses import (
    GP_WEIGHT_DEFAULT,
    LOSS_NAMES,
    discriminator_loss,
    generator_loss,
    gradient_penalty,
)

LATENT_DIM = 16
SHAPES = [(2,), (1, 8, 8), (1, 28, 28), (3, 32, 32)]


def _build(shape: tuple[int, ...], seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    return build_models(default_family(shape), shape, latent_dim=LATENT_DIM)


# ---------------------------------------------------------------------------------------------------
# Registry and shapes
# ---------------------------------------------------------------------------------------------------


def test_families_listed() -> None:
    assert MODEL_FAMILIES == ("mlp", "dcgan")


@pytest.mark.parametrize(
    ("shape", "family"), [((2,), "mlp"), ((5,), "mlp"), ((1, 8, 8), "dcgan"), ((3, 32, 32), "dcgan")]
)
def test_default_family(shape: tuple[int, ...], family: str) -> None:
    assert default_family(shape) == family


@pytest.mark.parametrize("shape", SHAPES)
def test_output_shapes(shape: tuple[int, ...]) -> None:
    generator, discriminator = _build(shape)
    latent = torch.randn(5, LATENT_DIM)
    samples = generator(latent)
    assert samples.shape == (5, *shape)
    logits = discriminator(samples)
    assert logits.shape == (5,)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
def test_image_generator_output_in_tanh_range(shape: tuple[int, ...]) -> None:
    generator, _ = _build(shape)
    # Large latents push the pre-activation far out; tanh must still bound the output.
    images = generator(torch.randn(8, LATENT_DIM) * 50)
    assert images.min() >= -1.0 and images.max() <= 1.0
    assert any(isinstance(module, nn.Tanh) for module in generator.modules())


def test_point_generator_output_is_a_linear_readout() -> None:
    """Mixture modes sit at arbitrary coordinates (±4 on the grid): nothing squashes the output, so
    scaling the readout scales the points."""
    generator, _ = _build((2,))
    assert isinstance(generator.net[-1], torch.nn.Linear)
    latent = torch.randn(64, LATENT_DIM)
    before = generator(latent)
    with torch.no_grad():
        generator.net[-1].weight.mul_(100.0)
        generator.net[-1].bias.mul_(100.0)
    torch.testing.assert_close(generator(latent), 100.0 * before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", SHAPES)
def test_state_dict_holds_parameters_only(shape: tuple[int, ...]) -> None:
    for module in _build(shape):
        assert list(module.buffers()) == []
        parameter_names = {name for name, _ in module.named_parameters()}
        assert set(module.state_dict()) == parameter_names


@pytest.mark.parametrize("shape", SHAPES)
def test_initialisation_is_deterministic_under_manual_seed(shape: tuple[int, ...]) -> None:
    first = _build(shape, seed=7)
    second = _build(shape, seed=7)
    other = _build(shape, seed=8)
    for module_a, module_b, module_c in zip(first, second, other, strict=True):
        state_a, state_b, state_c = module_a.state_dict(), module_b.state_dict(), module_c.state_dict()
        assert all(torch.equal(state_a[name], state_b[name]) for name in state_a)
        assert not all(torch.equal(state_a[name], state_c[name]) for name in state_a)


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_is_bit_identical_for_identical_inputs(shape: tuple[int, ...]) -> None:
    generator, discriminator = _build(shape)
    latent = torch.randn(6, LATENT_DIM, generator=torch.Generator().manual_seed(3))
    samples_a, samples_b = generator(latent), generator(latent.clone())
    assert torch.equal(samples_a, samples_b)
    assert torch.equal(discriminator(samples_a), discriminator(samples_b))


def test_generator_batch_norm_uses_batch_statistics_in_eval_mode() -> None:
    # Without running statistics, eval mode must behave exactly like train mode.
    generator, _ = _build((1, 8, 8))
    latent = torch.randn(4, LATENT_DIM)
    training_output = generator.train()(latent)
    eval_output = generator.eval()(latent)
    assert torch.equal(training_output, eval_output)
    assert any(isinstance(module, nn.BatchNorm2d) for module in generator.modules())


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
def test_image_discriminator_has_no_normalisation(shape: tuple[int, ...]) -> None:
    _, discriminator = _build(shape)
    forbidden = (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d)
    assert not any(isinstance(module, forbidden) for module in discriminator.modules())


def test_parameter_budgets_fit_cpu_training() -> None:
    small = _build((1, 8, 8))
    assert all(5_000 <= count_parameters(module) <= 80_000 for module in small)
    for shape in [(1, 28, 28), (3, 32, 32)]:
        assert all(20_000 <= count_parameters(module) <= 600_000 for module in _build(shape))


def test_width_changes_model_size() -> None:
    torch.manual_seed(0)
    narrow = build_models("dcgan", (1, 8, 8), latent_dim=LATENT_DIM, width=8)
    wide = build_models("dcgan", (1, 8, 8), latent_dim=LATENT_DIM, width=32)
    assert count_parameters(narrow[0]) < count_parameters(wide[0])
    mlp_generator, mlp_discriminator = build_models("mlp", (2,), latent_dim=LATENT_DIM, width=32)
    first_layer = mlp_discriminator.net[0]
    assert isinstance(first_layer, nn.Linear) and first_layer.out_features == 32
    assert isinstance(mlp_generator, MLPGenerator)


def test_direct_constructors() -> None:
    assert MLPGenerator(4, 3, hidden=8, depth=1)(torch.zeros(2, 4)).shape == (2, 3)
    assert MLPDiscriminator(3, hidden=8, depth=2)(torch.zeros(2, 3)).shape == (2,)
    assert DCGANGenerator(4, (3, 28, 28), width=4)(torch.zeros(2, 4)).shape == (2, 3, 28, 28)
    assert DCGANDiscriminator((3, 28, 28), width=4)(torch.zeros(2, 3, 28, 28)).shape == (2,)


@pytest.mark.parametrize(
    ("family", "shape", "message"),
    [
        ("dcgan", (2,), "dcgan"),
        ("dcgan", (1, 16, 16), "image sizes"),
        ("dcgan", (2, 8, 8), "channels"),
        ("dcgan", (1, 8, 16), "square"),
        ("mlp", (1, 8, 8), "flat vectors"),
        ("resnet", (2,), "unknown model family"),
        ("mlp", (), "sample_shape"),
        ("mlp", (0,), "sample_shape"),
    ],
)
def test_unsupported_combinations_raise(family: str, shape: tuple[int, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_models(family, shape, latent_dim=LATENT_DIM)


def test_bad_sizes_raise() -> None:
    with pytest.raises(ValueError, match="latent_dim"):
        build_models("mlp", (2,), latent_dim=0)
    with pytest.raises(ValueError, match="width"):
        build_models("dcgan", (1, 8, 8), latent_dim=4, width=-1)
    with pytest.raises(ValueError, match="no model family"):
        default_family((8, 8))
    with pytest.raises(ValueError, match="image sizes"):
        default_family((1, 16, 16))


def test_wrong_input_shapes_raise() -> None:
    generator, discriminator = _build((1, 8, 8))
    with pytest.raises(ValueError, match="latent"):
        generator(torch.zeros(2, LATENT_DIM + 1))
    with pytest.raises(ValueError, match="1, 8, 8"):
        discriminator(torch.zeros(2, 1, 28, 28))
    point_generator, point_discriminator = _build((2,))
    with pytest.raises(ValueError, match="latent"):
        point_generator(torch.zeros(LATENT_DIM))
    with pytest.raises(ValueError, match="B, 2"):
        point_discriminator(torch.zeros(2, 3))


# ---------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------

REAL_LOGITS = torch.tensor([2.0, -1.0])
FAKE_LOGITS = torch.tensor([0.5, -3.0])


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_loss_names() -> None:
    assert LOSS_NAMES == ("nonsaturating", "wgan_gp", "hinge")
    assert GP_WEIGHT_DEFAULT == 10.0


def test_nonsaturating_losses_match_hand_computation() -> None:
    expected_d = (_softplus(-2.0) + _softplus(1.0)) / 2 + (_softplus(0.5) + _softplus(-3.0)) / 2
    expected_g = (_softplus(-0.5) + _softplus(3.0)) / 2
    assert discriminator_loss("nonsaturating", REAL_LOGITS, FAKE_LOGITS).item() == pytest.approx(expected_d)
    assert generator_loss("nonsaturating", FAKE_LOGITS).item() == pytest.approx(expected_g)
    # Same as the sigmoid cross-entropy it stands for.
    bce = F.binary_cross_entropy_with_logits
    reference = bce(REAL_LOGITS, torch.ones(2)) + bce(FAKE_LOGITS, torch.zeros(2))
    assert discriminator_loss("nonsaturating", REAL_LOGITS, FAKE_LOGITS).item() == pytest.approx(
        reference.item()
    )


def test_nonsaturating_stays_finite_for_huge_logits() -> None:
    loss = discriminator_loss("nonsaturating", torch.tensor([-1e4]), torch.tensor([1e4]))
    assert torch.isfinite(loss) and loss.item() == pytest.approx(2e4)


def test_hinge_losses_match_hand_computation() -> None:
    # relu(1-2)=0, relu(1+1)=2 → 1.0 ; relu(1+0.5)=1.5, relu(1-3)=0 → 0.75
    assert discriminator_loss("hinge", REAL_LOGITS, FAKE_LOGITS).item() == pytest.approx(1.75)
    assert generator_loss("hinge", FAKE_LOGITS).item() == pytest.approx(1.25)


def test_wgan_losses_match_hand_computation() -> None:
    # fake mean -1.25, real mean 0.5
    assert discriminator_loss("wgan_gp", REAL_LOGITS, FAKE_LOGITS).item() == pytest.approx(-1.75)
    assert generator_loss("wgan_gp", FAKE_LOGITS).item() == pytest.approx(1.25)


def test_losses_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="unknown GAN loss"):
        discriminator_loss("lsgan", REAL_LOGITS, FAKE_LOGITS)
    with pytest.raises(ValueError, match="unknown GAN loss"):
        generator_loss("lsgan", FAKE_LOGITS)
    with pytest.raises(ValueError, match="empty"):
        generator_loss("hinge", torch.empty(0))
    with pytest.raises(ValueError, match="floating-point"):
        generator_loss("hinge", torch.tensor([1, 2]))


class _LinearCritic(nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.clone())

    def forward(self, samples: torch.Tensor) -> torch.Tensor:
        return samples.flatten(1) @ self.weight


def test_gradient_penalty_vanishes_for_unit_norm_linear_critic() -> None:
    weight = torch.tensor([3.0, 4.0, 0.0, 0.0]) / 5.0
    critic = _LinearCritic(weight)
    real, fake = torch.randn(16, 1, 2, 2), torch.randn(16, 1, 2, 2)
    penalty = gradient_penalty(critic, real, fake, torch.Generator().manual_seed(0))
    assert penalty.item() == pytest.approx(0.0, abs=1e-10)


def test_gradient_penalty_positive_and_differentiable_otherwise() -> None:
    critic = _LinearCritic(torch.tensor([3.0, 4.0]))  # ‖w‖ = 5 → penalty (5-1)² = 16
    real, fake = torch.randn(8, 2), torch.randn(8, 2)
    penalty = gradient_penalty(critic, real, fake, torch.Generator().manual_seed(0))
    assert penalty.item() == pytest.approx(16.0)
    penalty.backward()
    # d/dw (‖w‖-1)² = 2(‖w‖-1) w/‖w‖ = 8 · (0.6, 0.8): create_graph must let this flow to the critic.
    assert critic.weight.grad is not None
    assert torch.allclose(critic.weight.grad, torch.tensor([4.8, 6.4]))


def test_gradient_penalty_on_real_model_is_reproducible() -> None:
    _, discriminator = _build((1, 8, 8))
    real, fake = torch.rand(4, 1, 8, 8) * 2 - 1, torch.rand(4, 1, 8, 8) * 2 - 1
    first = gradient_penalty(discriminator, real, fake, torch.Generator().manual_seed(5))
    second = gradient_penalty(discriminator, real, fake, torch.Generator().manual_seed(5))
    assert torch.equal(first, second) and first.item() > 0


def test_gradient_penalty_rejects_bad_input() -> None:
    critic = _LinearCritic(torch.ones(2))
    with pytest.raises(ValueError, match="same shape"):
        gradient_penalty(critic, torch.zeros(3, 2), torch.zeros(4, 2), torch.Generator())
    with pytest.raises(ValueError, match=r"torch\.Generator"):
        gradient_penalty(critic, torch.zeros(3, 2), torch.zeros(3, 2), 0)  # type: ignore[arg-type]
