"""The Langevin kernels' shortcut for log w against the general formula of eq. 8."""

import pytest
import torch

from cdlib.kernels import MALA, Langevin, evaluate, log_weight
from cdlib.models import EnergyMLP


@pytest.mark.parametrize("kernel_class", [Langevin, MALA])
@pytest.mark.parametrize("eps", [0.05, 0.7])
def test_proposal_log_weight_matches_eq8(kernel_class, eps, generator):
    """The normalising constants cancel; the rest is log q(x|x') - log q(x'|x) + log p' - log p."""
    model = EnergyMLP(width=16, depth=4).double()
    kernel = kernel_class(eps)
    x = torch.randn(50, 10, generator=generator, dtype=torch.float64)
    a = evaluate(model, x, with_score=True)
    b = evaluate(model, kernel.propose(a, model, generator).x, with_score=True)
    general = log_weight(Langevin(eps), a, b)
    shortcut = kernel.proposal_log_weight(a, b)
    # log w is a difference of log-densities of order 10, which cancel to far less,
    # so the two sums of the same terms agree to an absolute, not relative, 1e-12.
    assert (shortcut - general).abs().max() < 1e-12
    assert general.abs().max() > 1e-4
