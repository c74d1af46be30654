import math

import pytest
import torch
from torch import nn

from cdlib.models import DiagonalGaussian, EnergyMLP


def test_energy_mlp_shape_and_dtype():
    model = EnergyMLP(width=16, depth=8).double()
    out = model(torch.zeros(7, 10, dtype=torch.float64))
    assert out.shape == (7,)
    assert out.dtype == torch.float64


def test_energy_mlp_has_depth_linear_layers():
    model = EnergyMLP(width=16, depth=8)
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linear) == 8
    assert len(model.blocks) == 3
    assert linear[0].in_features == 10
    assert linear[-1].out_features == 1


def test_energy_mlp_odd_depth_keeps_every_layer():
    model = EnergyMLP(width=8, depth=5)
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linear) == 5
    assert [len(block) for block in model.blocks] == [2, 1]


def test_energy_mlp_skips_add_block_input():
    """With the hidden layers zeroed, each residual block passes its input through."""
    model = EnergyMLP(width=8, depth=6).double()
    for block in model.blocks:
        for layer in block:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
    x = torch.randn(5, 10, dtype=torch.float64)
    h = model.input(x)
    expected = model.output(model.activation(h)).squeeze(-1)
    assert torch.allclose(model(x), expected, rtol=0, atol=1e-14)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"width": 0}, "width must be an integer >= 1, got 0"),
        ({"depth": 1}, "depth must be an integer >= 2, got 1"),
        ({"dim": 2.5}, "dim must be an integer >= 1, got 2.5"),
    ],
)
def test_energy_mlp_rejects_bad_sizes(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EnergyMLP(**kwargs)


def test_gaussian_normalizer_matches_torch():
    mean = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    precision = torch.tensor([4.0, 0.25, 1.5], dtype=torch.float64)
    model = DiagonalGaussian(mean, precision)
    x = torch.randn(20, 3, dtype=torch.float64)
    reference = torch.distributions.Normal(mean, precision.rsqrt()).log_prob(x).sum(1)
    assert torch.allclose(model.log_prob_normalized(x), reference, rtol=0, atol=1e-12)


def test_gaussian_score_matches_autograd():
    model = DiagonalGaussian(torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64) * 3)
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    (score,) = torch.autograd.grad(model(x).sum(), x)
    assert torch.allclose(score, model.grad_log_prob(x), rtol=0, atol=1e-14)


def test_gaussian_rejects_nonpositive_precision():
    with pytest.raises(ValueError, match="precision must be finite and > 0"):
        DiagonalGaussian(torch.zeros(2), torch.tensor([1.0, 0.0]))


def test_gaussian_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"got \(2,\) and \(3,\)"):
        DiagonalGaussian(torch.zeros(2), torch.ones(3))


def test_gaussian_log_normalizer_value():
    model = DiagonalGaussian(torch.zeros(1, dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64))
    assert model.log_normalizer().item() == pytest.approx(0.5 * math.log(2 * math.pi), abs=1e-15)


def test_gaussian_rejects_nan_mean():
    with pytest.raises(ValueError, match="mean must be finite"):
        DiagonalGaussian(torch.tensor([0.0, float("nan")]), torch.ones(2))
