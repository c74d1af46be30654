"""Each estimator's autograd gradient against the paper's update, in float64.

The reference updates are computed from closed-form expressions for a diagonal
Gaussian model, independently of the estimators' code: for
log p(x) = -0.5 * sum_i lambda_i (x_i - mu_i)^2 with lambda = exp(log_precision),

    d log p / d mu            = lambda * (x - mu),
    d log p / d log_precision = -0.5 * lambda * (x - mu)^2.
"""

import pytest
import torch
import torch.nn.functional as F

from cdlib.estimators import (
    CNCE,
    NCE,
    ContrastiveDivergence,
    GaussianReference,
    alpha_from_log_w,
    make_estimator,
    time_reversal_loss,
)
from cdlib.kernels import MALA, Langevin, run_chain
from cdlib.models import DiagonalGaussian, EnergyMLP

TOLERANCE = 1e-10


def make_model():
    mean = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)
    precision = torch.tensor([2.0, 0.5, 1.3], dtype=torch.float64)
    return DiagonalGaussian(mean, precision)


def parameter_grad_log_p(model, x):
    """Return per-sample d log p / d(mean, log_precision), shape (n, 2 * dim)."""
    with torch.no_grad():
        precision = model.precision
        centred = x - model.mean
        return torch.cat([precision * centred, -0.5 * precision * centred.square()], 1)


def autograd_of(loss, model):
    grads = torch.autograd.grad(loss, [model.mean, model.log_precision])
    return torch.cat([g.reshape(-1) for g in grads])


def closed_form_log_q_langevin(model, x_to, x_from, eps):
    with torch.no_grad():
        mean = x_from + 0.5 * eps**2 * model.grad_log_prob(x_from)
        return torch.distributions.Normal(mean, eps).log_prob(x_to).sum(1)


def max_relative_error(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max()).item()


@pytest.fixture
def batch(generator):
    return torch.randn(64, 3, generator=generator, dtype=torch.float64)


def test_cnce_gradient_is_alpha_weighted_difference(batch):
    """Observation 1 (eq. 10): grad = mean alpha * (grad log p(x~) - grad log p(x))."""
    model = make_model()
    out = CNCE(0.4)(model, batch, torch.Generator().manual_seed(5))
    x_tilde = out.x_tilde
    with torch.no_grad():
        log_w = model(x_tilde) - model(batch)
    alpha = torch.sigmoid(log_w)
    difference = parameter_grad_log_p(model, x_tilde) - parameter_grad_log_p(model, batch)
    expected = (alpha[:, None] * difference).mean(0)
    assert max_relative_error(autograd_of(out.loss, model), expected) < TOLERANCE
    assert torch.allclose(out.alpha, alpha, rtol=0, atol=1e-15)


def test_nce_gradient_matches_bce_formula(batch):
    model = make_model()
    reference = GaussianReference(3, 1.5)
    out = NCE(reference)(model, batch, torch.Generator().manual_seed(6))
    y = out.x_tilde
    with torch.no_grad():
        d_data = torch.sigmoid(model(batch) - reference.log_prob(batch))
        d_ref = torch.sigmoid(model(y) - reference.log_prob(y))
    expected = -((1 - d_data)[:, None] * parameter_grad_log_p(model, batch)).mean(0)
    expected += (d_ref[:, None] * parameter_grad_log_p(model, y)).mean(0)
    assert max_relative_error(autograd_of(out.loss, model), expected) < TOLERANCE


@pytest.mark.parametrize("kernel_class", [Langevin, MALA])
def test_plain_cd_gradient_is_endpoint_difference(kernel_class, batch):
    """Eq. 3: grad = mean(grad log p(x_k) - grad log p(x_0))."""
    model = make_model()
    estimator = ContrastiveDivergence(kernel_class(0.5), k=4, weighting="none")
    out = estimator(model, batch, torch.Generator().manual_seed(7))
    expected = (parameter_grad_log_p(model, out.x_tilde) - parameter_grad_log_p(model, batch)).mean(0)
    assert max_relative_error(autograd_of(out.loss, model), expected) < TOLERANCE


def closed_form_chain_log_w(model, path, eps):
    log_w = torch.zeros(path.shape[1], dtype=torch.float64)
    with torch.no_grad():
        for before, after in zip(path[:-1], path[1:]):
            log_w += closed_form_log_q_langevin(model, before, after, eps)
            log_w -= closed_form_log_q_langevin(model, after, before, eps)
            log_w += model(after) - model(before)
    return log_w


def test_adjusted_cd_gradient_matches_algorithm_2(batch):
    """Algorithm 2: grad = mean alpha_chain * (grad log p(x_k) - grad log p(x_0))."""
    model = make_model()
    eps, k = 0.6, 4
    out = ContrastiveDivergence(Langevin(eps), k, weighting="alpha")(
        model, batch, torch.Generator().manual_seed(8)
    )
    # The same seed replays the same chain, this time keeping every state.
    path = run_chain(Langevin(eps), model, batch, k, torch.Generator().manual_seed(8), keep_path=True).path
    assert torch.equal(path[-1], out.x_tilde)
    alpha = torch.sigmoid(closed_form_chain_log_w(model, path, eps))
    assert alpha.min() < 0.45 or alpha.max() > 0.55
    difference = parameter_grad_log_p(model, out.x_tilde) - parameter_grad_log_p(model, batch)
    expected = (alpha[:, None] * difference).mean(0)
    assert max_relative_error(autograd_of(out.loss, model), expected) < TOLERANCE


def test_cd_with_mh_has_alpha_one_half(batch):
    model = EnergyMLP(dim=3, width=16, depth=4).double()
    out = make_estimator("cd_mh", 1.5, 5, dim=3)(model, batch, torch.Generator().manual_seed(2))
    assert (out.alpha - 0.5).abs().max() < 1e-15
    assert 0.0 < out.acceptance.mean() < 1.0


def test_time_reversal_loss_gives_alpha_weighted_update(batch):
    """Observation 3 (eq. 18): the BCE of the chain-order classifier has the
    alpha-weighted CD-k gradient, on the paper's network."""
    model = EnergyMLP(dim=3, width=16, depth=4).double()
    kernel = Langevin(0.4)
    chain = run_chain(kernel, model, batch, 3, torch.Generator().manual_seed(4), keep_path=True)
    params = list(model.parameters())
    game = torch.autograd.grad(time_reversal_loss(model, chain, kernel), params)
    alpha = alpha_from_log_w(chain.log_w)
    surrogate = (alpha * (model(chain.xk) - model(chain.x0))).mean()
    update = torch.autograd.grad(surrogate, params)
    game = torch.cat([g.reshape(-1) for g in game])
    update = torch.cat([g.reshape(-1) for g in update])
    assert max_relative_error(game, update) < TOLERANCE


def test_time_reversal_loss_detects_moving_kernel(batch):
    """Letting gradient flow through the kernel's log q (not holding it fixed)
    changes the gradient, so the identity above can fail."""
    model = EnergyMLP(dim=3, width=16, depth=4).double()
    kernel = Langevin(0.4)
    chain = run_chain(kernel, model, batch, 3, torch.Generator().manual_seed(4), keep_path=True)
    params = list(model.parameters())

    log_w = torch.zeros(batch.shape[0], dtype=torch.float64)
    for before, after in zip(chain.path[:-1], chain.path[1:]):
        # Scores with create_graph=True keep log q differentiable in theta.
        b = before.clone().requires_grad_(True)
        a = after.clone().requires_grad_(True)
        (score_b,) = torch.autograd.grad(model(b).sum(), b, create_graph=True)
        (score_a,) = torch.autograd.grad(model(a).sum(), a, create_graph=True)
        mean_b = before + 0.5 * 0.4**2 * score_b
        mean_a = after + 0.5 * 0.4**2 * score_a
        log_q_back = -((before - mean_a).square().sum(1)) / (2 * 0.4**2)
        log_q_fwd = -((after - mean_b).square().sum(1)) / (2 * 0.4**2)
        log_w = log_w + log_q_back - log_q_fwd + model(after) - model(before)
    wrong = torch.autograd.grad(F.softplus(log_w).mean(), params)
    right = torch.autograd.grad(time_reversal_loss(model, chain, kernel), params)
    wrong = torch.cat([g.reshape(-1) for g in wrong])
    right = torch.cat([g.reshape(-1) for g in right])
    assert max_relative_error(wrong, right) > 1e-3


def test_time_reversal_loss_needs_path(batch):
    model = make_model()
    chain = run_chain(Langevin(0.1), model, batch, 2, torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="keep_path=True"):
        time_reversal_loss(model, chain, Langevin(0.1))


def test_alpha_is_finite_for_huge_log_weights():
    log_w = torch.tensor([-1e4, -50.0, 0.0, 50.0, 1e4], dtype=torch.float64)
    alpha = alpha_from_log_w(log_w)
    assert torch.isfinite(alpha).all()
    assert alpha[0] == 0.0
    assert alpha[2] == 0.5
    assert alpha[-1] == 1.0


def test_estimator_outputs_are_detached(batch):
    model = EnergyMLP(dim=3, width=8, depth=4).double()
    out = make_estimator("adjusted_cd", 0.3, 2, dim=3)(model, batch, torch.Generator().manual_seed(3))
    assert out.loss.requires_grad
    assert not out.alpha.requires_grad
    assert not out.log_w.requires_grad
    assert not out.x_tilde.requires_grad


@pytest.mark.parametrize(
    "args, message",
    [
        (("sgld", 0.1, 1), "method must be one of 'nce', 'cnce', 'cd', 'cd_mh', 'adjusted_cd', got 'sgld'"),
        (("cd", 0.0, 5), "step_size must be a finite number > 0, got 0.0"),
        (("cd", 0.1, 0), "k must be an integer >= 1, got 0"),
        (("cnce", 0.1, 3), "k must be 1 for method 'cnce', got 3"),
    ],
)
def test_make_estimator_rejects_bad_input(args, message):
    with pytest.raises(ValueError, match=message):
        make_estimator(*args)


def test_softplus_gradient_is_sigmoid_beyond_threshold():
    from cdlib.estimators import softplus

    x = torch.tensor([-40.0, -21.0, 0.0, 21.0, 25.0, 40.0], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(softplus(x).sum(), x)
    expected = torch.sigmoid(x.detach())
    assert torch.allclose(grad, expected, rtol=1e-14, atol=0)
    (torch_grad,) = torch.autograd.grad(torch.nn.functional.softplus(x).sum(), x)
    assert not torch.allclose(torch_grad, expected, rtol=1e-12, atol=0)
