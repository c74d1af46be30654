import math

import pytest
import torch

from cdlib.kernels import MALA, GaussianNoise, Langevin, State, evaluate, run_chain
from cdlib.models import DiagonalGaussian, EnergyMLP

from stats_helpers import normal_quantile

# Each statistical check below may fail by chance with at most this probability,
# before the Bonferroni split over the checks in one test.
FAILURE_RATE = 1e-6


def gaussian_target(dim=3, precision=(4.0, 1.0, 0.25)):
    mean = torch.linspace(-1, 1, dim, dtype=torch.float64)
    return DiagonalGaussian(mean, torch.tensor(precision, dtype=torch.float64))


class CountingModel(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.model(x)


def test_gaussian_noise_log_q_matches_normal(generator):
    kernel = GaussianNoise(0.3)
    target = gaussian_target()
    state = evaluate(target, torch.randn(8, 3, generator=generator, dtype=torch.float64), False)
    x_to = torch.randn(8, 3, generator=generator, dtype=torch.float64)
    reference = torch.distributions.Normal(state.x, 0.3).log_prob(x_to).sum(1)
    assert torch.allclose(kernel.log_q(State(x_to, None), state), reference, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kernel_class", [Langevin, MALA])
def test_langevin_log_q_matches_normal(kernel_class, generator):
    eps = 0.2
    kernel = kernel_class(eps)
    target = gaussian_target()
    state = evaluate(target, torch.randn(8, 3, generator=generator, dtype=torch.float64), True)
    mean = state.x + 0.5 * eps**2 * target.grad_log_prob(state.x)
    x_to = torch.randn(8, 3, generator=generator, dtype=torch.float64)
    reference = torch.distributions.Normal(mean, eps).log_prob(x_to).sum(1)
    log_q = kernel.proposal_log_q(State(x_to, None), state)
    assert torch.allclose(log_q, reference, rtol=0, atol=1e-12)


def test_mala_transition_density_satisfies_detailed_balance(generator):
    """q_MH(b|a) p(a) = q_MH(a|b) p(b) for moves a != b, on the paper's network."""
    model = EnergyMLP(width=16, depth=4).double()
    kernel = MALA(0.7)
    a = evaluate(model, torch.randn(50, 10, generator=generator, dtype=torch.float64), True)
    b = evaluate(model, a.x + 0.7 * torch.randn(50, 10, generator=generator, dtype=torch.float64), True)
    forward = kernel.log_q(b, a) + a.log_p
    backward = kernel.log_q(a, b) + b.log_p
    assert (forward - backward).abs().max() < 1e-12
    unadjusted = Langevin(0.7)
    gap = unadjusted.log_q(b, a) + a.log_p - unadjusted.log_q(a, b) - b.log_p
    assert gap.abs().max() > 1e-3


def test_evaluate_leaves_parameter_gradients_empty():
    model = EnergyMLP(width=8, depth=4)
    state = evaluate(model, torch.randn(5, 10), with_score=True)
    assert state.score.shape == (5, 10)
    assert not state.x.requires_grad
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("kernel", [GaussianNoise(0.1), Langevin(0.1), MALA(0.1)])
def test_chain_shapes_and_dtype(kernel, generator):
    model = EnergyMLP(width=8, depth=4).double()
    x0 = torch.randn(6, 10, generator=generator, dtype=torch.float64)
    chain = run_chain(kernel, model, x0, 3, generator, keep_path=True)
    assert chain.xk.shape == (6, 10)
    assert chain.xk.dtype == torch.float64
    assert chain.log_w.shape == (6,)
    assert chain.log_w_steps.shape == (3, 6)
    assert chain.path.shape == (4, 6, 10)
    assert torch.equal(chain.path[0], x0)
    assert torch.equal(chain.path[-1], chain.xk)


@pytest.mark.parametrize("kernel", [GaussianNoise(0.1), Langevin(0.1), MALA(0.1)])
@pytest.mark.parametrize("k", [1, 5, 10])
def test_chain_evaluates_model_k_plus_one_times(kernel, k, generator):
    model = CountingModel(EnergyMLP(width=8, depth=4))
    chain = run_chain(kernel, model, torch.randn(4, 10), k, generator)
    assert model.calls == k + 1
    assert chain.evaluations == k + 1


def test_chain_repeats_with_same_seed():
    model = EnergyMLP(width=8, depth=4)
    x0 = torch.zeros(4, 10)
    state = torch.get_rng_state()
    first = run_chain(MALA(0.3), model, x0, 5, torch.Generator().manual_seed(9))
    second = run_chain(MALA(0.3), model, x0, 5, torch.Generator().manual_seed(9))
    assert torch.equal(first.xk, second.xk)
    assert torch.equal(state, torch.get_rng_state())


def moment_errors(x, target):
    """Return z-scores of the sample means and variances against the target's."""
    n = x.shape[0]
    var = 1.0 / target.precision.detach()
    mean_z = (x.mean(0) - target.mean.detach()) / (var / n).sqrt()
    var_z = (x.var(0) - var) / (var * math.sqrt(2.0 / (n - 1)))
    return mean_z, var_z


def exact_samples(target, n, generator):
    z = torch.randn(n, target.dim, generator=generator, dtype=torch.float64)
    return target.mean.detach() + z * target.precision.detach().rsqrt()


def test_mala_leaves_gaussian_invariant(generator):
    """Chains started from the target stay distributed as the target.

    A step of 0.9 makes unadjusted Langevin visibly biased on this target (next
    test), so passing here depends on the rejection step.
    """
    target = gaussian_target()
    x0 = exact_samples(target, 40_000, generator)
    chain = run_chain(MALA(0.9), target, x0, 20, generator)
    mean_z, var_z = moment_errors(chain.xk, target)
    z = normal_quantile(FAILURE_RATE / (2 * target.dim))
    assert mean_z.abs().max() < z
    assert var_z.abs().max() < z
    assert 0.3 < chain.acceptance.mean() < 0.95


def test_langevin_bias_breaks_invariance(generator):
    """The same check detects the bias of the unadjusted chain at the same step."""
    target = gaussian_target()
    x0 = exact_samples(target, 40_000, generator)
    chain = run_chain(Langevin(0.9), target, x0, 20, generator)
    _, var_z = moment_errors(chain.xk, target)
    assert var_z.abs().max() > 10 * normal_quantile(FAILURE_RATE)


def test_langevin_stationary_variance_matches_closed_form(generator):
    """On N(0, s^2) the chain x' = (1 - h) x + eps z, h = eps^2 / (2 s^2), has the
    stationary variance s^2 / (1 - eps^2 / (4 s^2))."""
    eps = 0.9
    target = gaussian_target()
    s2 = 1.0 / target.precision.detach()
    stationary = s2 / (1.0 - eps**2 / (4.0 * s2))
    n = 40_000
    x0 = exact_samples(target, n, generator)
    # The variance contracts toward the stationary value by (1 - h)^2 per step; 60
    # steps bring the largest of these factors below 1e-6 for this target.
    chain = run_chain(Langevin(eps), target, x0, 60, generator)
    var = chain.xk.var(0)
    standard_error = stationary * math.sqrt(2.0 / (n - 1))
    z = normal_quantile(FAILURE_RATE / target.dim)
    assert ((var - stationary) / standard_error).abs().max() < z
    assert ((var - s2) / standard_error).abs().max() > z


def test_mala_weight_is_exactly_one(generator):
    model = EnergyMLP(width=16, depth=4).double()
    x0 = torch.randn(200, 10, generator=generator, dtype=torch.float64)
    chain = run_chain(MALA(0.5), model, x0, 5, generator)
    assert 0.0 < chain.acceptance.mean() < 1.0
    assert chain.log_w_steps.abs().max() == 0.0
    alpha = torch.sigmoid(chain.log_w)
    assert (alpha - 0.5).abs().max() < 1e-15


def test_langevin_weight_differs_from_one(generator):
    model = EnergyMLP(width=16, depth=4).double()
    x0 = torch.randn(200, 10, generator=generator, dtype=torch.float64)
    chain = run_chain(Langevin(0.5), model, x0, 5, generator)
    assert chain.log_w.abs().max() > 1e-3


class LinearLogDensity(torch.nn.Module):
    """log p(x) = slope * x_1, whose steep slope gives |log w| far beyond 1e4."""

    def __init__(self, slope):
        super().__init__()
        self.slope = slope

    def forward(self, x):
        return self.slope * x[:, 0]


def test_mala_handles_huge_log_weights(generator):
    model = LinearLogDensity(1e5)
    chain = run_chain(MALA(1.0), model, torch.zeros(50, 2, dtype=torch.float64), 2, generator)
    assert torch.isfinite(chain.log_w).all()
    assert torch.isfinite(chain.xk).all()


def test_langevin_weights_stay_finite_at_large_log_ratio(generator):
    model = LinearLogDensity(-3e2)
    x0 = torch.zeros(50, 2, dtype=torch.float64)
    chain = run_chain(GaussianNoise(40.0), model, x0, 1, generator)
    assert chain.log_w.abs().max() > 1e4
    alpha = torch.sigmoid(chain.log_w)
    assert torch.isfinite(alpha).all()


class NaNBeyond(torch.nn.Module):
    """A log-density that is NaN for x_1 > 0, to test the rejection of NaN proposals."""

    def forward(self, x):
        value = -0.5 * x.square().sum(1)
        return torch.where(x[:, 0] > 0, torch.full_like(value, float("nan")), value)


def test_mala_rejects_nan_proposals_and_counts_them(generator):
    x0 = -torch.ones(400, 2, dtype=torch.float64)
    chain = run_chain(MALA(1.0), NaNBeyond(), x0, 3, generator)
    assert torch.isfinite(chain.xk).all()
    assert (chain.xk[:, 0] <= 0).all()
    assert chain.nonfinite > 0


@pytest.mark.parametrize("make", [lambda: GaussianNoise(0.0), lambda: Langevin(-1.0), lambda: MALA(float("inf"))])
def test_kernels_reject_bad_scale(make):
    with pytest.raises(ValueError, match="must be a finite number > 0"):
        make()


def test_run_chain_rejects_zero_steps(generator):
    with pytest.raises(ValueError, match="k must be an integer >= 1, got 0"):
        run_chain(MALA(0.1), gaussian_target(), torch.zeros(2, 3, dtype=torch.float64), 0, generator)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chain_keeps_device_and_dtype(device, dtype):
    model = EnergyMLP(width=8, depth=4).to(device=device, dtype=dtype)
    generator = torch.Generator(device).manual_seed(0)
    x0 = torch.randn(5, 10, device=device, dtype=dtype)
    for kernel in (GaussianNoise(0.1), Langevin(0.1), MALA(0.1)):
        chain = run_chain(kernel, model, x0, 2, generator)
        assert chain.xk.device.type == device
        assert chain.xk.dtype == dtype
        assert chain.log_w.dtype == dtype


def test_run_chain_rejects_one_dimensional_start(generator):
    with pytest.raises(ValueError, match=r"x0 must be a tensor of shape \(n, dim\), got \(3,\)"):
        run_chain(MALA(0.1), gaussian_target(), torch.zeros(3, dtype=torch.float64), 2, generator)


def test_run_chain_rejects_missing_generator():
    with pytest.raises(ValueError, match="generator must be a torch.Generator, got NoneType"):
        run_chain(MALA(0.1), gaussian_target(), torch.zeros(2, 3, dtype=torch.float64), 2, None)
