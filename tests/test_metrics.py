import math

import pytest
import torch

from cdlib.data import Spiral
from cdlib.metrics import (
    DiagonalNormal,
    KLEstimate,
    NonFiniteLogDensity,
    MixtureProposal,
    kl_divergence_is,
    log_normalizer_is,
)
from cdlib.models import EnergyMLP

from stats_helpers import normal_quantile

# Each statistical test below fails by chance with probability about 1e-6.
Z = normal_quantile(1e-6)


class ExactLogDensity(torch.nn.Module):
    """A "model" whose log-density is a spiral's exact one plus a constant."""

    def __init__(self, spiral, offset=0.0):
        super().__init__()
        self.spiral = spiral
        self.offset = offset
        # model_log_density reads the dtype from the first parameter.
        self.anchor = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, x):
        return self.spiral.log_prob(x) + self.offset


def test_kl_of_exact_model_is_zero():
    spiral = Spiral()
    estimate = kl_divergence_is(
        ExactLogDensity(spiral, offset=3.0), spiral, torch.Generator().manual_seed(0),
        n_data=4000, n_proposal=40_000,
    )
    assert estimate.trusted
    assert abs(estimate.kl) < Z * estimate.standard_error
    assert abs(estimate.log_z - 3.0) < Z * estimate.log_z_standard_error


def test_kl_of_wider_model_matches_closed_form():
    # Same plane density; off the plane N(0, 0.02^2) against the data's N(0, 0.01^2)
    # in 8 coordinates, so KL = 8 (log 2 + 1/8 - 1/2).
    spiral = Spiral()
    model = ExactLogDensity(Spiral(off_plane_std=0.02), offset=-1.0)
    estimate = kl_divergence_is(model, spiral, torch.Generator().manual_seed(1),
                                n_data=4000, n_proposal=40_000)
    expected = 8 * (math.log(2.0) + 0.125 - 0.5)
    assert estimate.trusted
    assert abs(estimate.kl - expected) < Z * estimate.standard_error


def test_kl_of_untrained_network_is_untrusted():
    torch.manual_seed(0)
    estimate = kl_divergence_is(EnergyMLP(width=32), Spiral(), torch.Generator().manual_seed(2),
                                n_data=1000, n_proposal=5000)
    assert estimate.ess < estimate.min_ess
    assert not estimate.trusted
    assert estimate.to_dict()["trusted"] is False


def test_log_normalizer_of_gaussian_model():
    # A normalised Gaussian target has Z = 1 whatever the proposal.
    std = torch.full((10,), 0.3, dtype=torch.float64)
    target = DiagonalNormal(std)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))

        def forward(self, x):
            return target.log_prob(x)

    proposal = DiagonalNormal(torch.full((10,), 0.4, dtype=torch.float64))
    log_z, se, ess = log_normalizer_is(Model(), proposal, 20_000, torch.Generator().manual_seed(3))
    assert 0 < ess <= 20_000
    assert abs(log_z) < Z * se


def test_mixture_draws_each_component_in_proportion():
    first = DiagonalNormal(torch.full((2,), 0.01))
    second = DiagonalNormal(torch.full((2,), 10.0))
    mixture = MixtureProposal([first, second], [3.0, 1.0])
    x = mixture.sample(40_000, torch.Generator().manual_seed(4))
    share = float((x.abs().max(1).values < 0.1).double().mean())
    # Binomial standard error of a share of 0.75 from 40,000 draws.
    assert abs(share - 0.75) < Z * math.sqrt(0.75 * 0.25 / 40_000) + 1e-3


def test_mixture_log_prob_integrates_to_one():
    mixture = MixtureProposal(
        [DiagonalNormal(torch.tensor([0.5])), DiagonalNormal(torch.tensor([2.0]))], [1.0, 1.0]
    )
    u = torch.linspace(-20, 20, 40_001, dtype=torch.float64)[:, None]
    total = float(mixture.log_prob(u).exp().sum() * (u[1, 0] - u[0, 0]))
    assert total == pytest.approx(1.0, abs=1e-8)


@pytest.mark.parametrize(
    "components, weights, message",
    [
        ([], [], "components and weights must have one entry each"),
        ([DiagonalNormal(torch.ones(2))], [1.0, 1.0], "components and weights must have one entry each"),
        ([DiagonalNormal(torch.ones(2))], [0.0], r"weights must be finite numbers > 0, got \[0.0\]"),
    ],
)
def test_mixture_rejects_bad_weights(components, weights, message):
    with pytest.raises(ValueError, match=message):
        MixtureProposal(components, weights)


def test_diagonal_normal_rejects_bad_std():
    with pytest.raises(ValueError, match="std must be a vector of finite numbers > 0"):
        DiagonalNormal(torch.tensor([1.0, -1.0]))


def test_kl_far_below_zero_is_untrusted():
    # Mass the proposal never reaches makes log Z, and so the KL, too low.
    kwargs = dict(log_z=0.0, log_z_standard_error=0.01, ess=5000.0, n_data=100,
                  n_proposal=10_000, min_ess=200.0)
    assert KLEstimate(kl=-0.02, standard_error=0.01, **kwargs).trusted
    assert not KLEstimate(kl=-0.05, standard_error=0.01, **kwargs).trusted
    assert not KLEstimate(kl=1.0, standard_error=0.01, **{**kwargs, "ess": 150.0}).trusted


def test_kl_of_nan_model_raises():
    model = EnergyMLP(width=8)
    with torch.no_grad():
        model.output.bias.fill_(float("nan"))
    with pytest.raises(NonFiniteLogDensity, match="NaN or infinite at 100 of 100 data draws"):
        kl_divergence_is(model, Spiral(), torch.Generator(), n_data=100, n_proposal=100,
                         min_ess=10)


def test_kl_rejects_bad_sizes():
    with pytest.raises(ValueError, match="n_data must be an integer >= 2, got 1"):
        kl_divergence_is(EnergyMLP(width=8), Spiral(), torch.Generator(), n_data=1)
    with pytest.raises(ValueError, match="min_ess must be a finite number > 0, got 0"):
        kl_divergence_is(EnergyMLP(width=8), Spiral(), torch.Generator(), min_ess=0)
    with pytest.raises(ValueError, match="min_ess must be <= n_proposal"):
        kl_divergence_is(EnergyMLP(width=8), Spiral(), torch.Generator(), n_proposal=50,
                         min_ess=1000)
