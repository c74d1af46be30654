"""The hand-written pass of EnergyMLP against autograd, and the estimators built on it.

Exact identities are checked in float64: the pass repeats the operations of
``EnergyMLP.forward``, so it matches autograd up to rounding.
"""

import pytest
import torch

from cdlib import backprop
from cdlib.estimators import ContrastiveDivergence, make_estimator
from cdlib.kernels import MALA, Langevin, evaluate
from cdlib.models import EnergyMLP

TOLERANCE = 1e-12


def max_relative_error(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def flat(grads):
    return torch.cat([g.reshape(-1) for g in grads])


class Wrapped(torch.nn.Module):
    """The same network behind a wrapper, so that it takes the autograd path."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)


def network(depth=8, width=16, seed=0, output_scale=1.0):
    """Return an EnergyMLP in float64 whose output weights are scaled by ``output_scale``."""
    torch.manual_seed(seed)
    model = EnergyMLP(width=width, depth=depth).double()
    with torch.no_grad():
        model.output.weight.mul_(output_scale)
    return model


@pytest.mark.parametrize("depth", [2, 3, 4, 7, 8])
def test_pass_matches_autograd(depth, generator):
    model = network(depth)
    x = torch.randn(30, 10, generator=generator, dtype=torch.float64)
    assert backprop.supports(model, x)
    result = backprop.forward_backward(model, x)
    x_in = x.clone().requires_grad_(True)
    log_p = model(x_in)
    (score,) = torch.autograd.grad(log_p.sum(), x_in)
    assert max_relative_error(result.log_p, log_p) < TOLERANCE
    assert max_relative_error(result.score, score) < TOLERANCE
    assert not result.log_p.requires_grad
    assert result.cache is None


@pytest.mark.parametrize("depth", [2, 3, 8])
def test_weighted_sum_gradient_matches_autograd(depth, generator):
    model = network(depth)
    x = torch.randn(30, 10, generator=generator, dtype=torch.float64)
    y = torch.randn(20, 10, generator=generator, dtype=torch.float64)
    c_x = torch.randn(30, generator=generator, dtype=torch.float64)
    c_y = torch.randn(20, generator=generator, dtype=torch.float64)
    pass_x = backprop.forward_backward(model, x, keep_cache=True)
    pass_y = backprop.forward_backward(model, y, keep_cache=True)
    value = (c_x * pass_x.log_p).sum() + (c_y * pass_y.log_p).sum()
    total = backprop.weighted_log_prob_sum(
        model, value, [(c_x, pass_x.cache), (c_y, pass_y.cache)]
    )
    params = list(model.parameters())
    # The factor 3 checks that the incoming gradient scales the result.
    actual = flat(torch.autograd.grad(3.0 * total, params))
    reference = (c_x * model(x)).sum() + (c_y * model(y)).sum()
    expected = flat(torch.autograd.grad(3.0 * reference, params))
    assert torch.equal(total.detach(), value)
    assert max_relative_error(actual, expected) < 1e-10


def test_weighted_sum_backward_twice_raises(generator):
    model = network(4)
    x = torch.randn(5, 10, generator=generator, dtype=torch.float64)
    result = backprop.forward_backward(model, x, keep_cache=True)
    c = torch.ones(5, dtype=torch.float64)
    total = backprop.weighted_log_prob_sum(
        model, result.log_p.sum(), [(c, result.cache)]
    )
    total.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="already backpropagated once"):
        total.backward()


class Subclass(EnergyMLP):
    def forward(self, x):
        return 2.0 * super().forward(x)


def test_supports_only_plain_energy_mlp():
    model = EnergyMLP(width=8, depth=4)
    x = torch.zeros(3, 10)
    assert backprop.supports(model, x)
    assert not backprop.supports(Subclass(width=8, depth=4), x)
    assert not backprop.supports(Wrapped(model), x)
    assert not backprop.supports(model, x.double())
    assert not backprop.supports(model, torch.zeros(10))
    handle = model.blocks[0][0].register_forward_hook(lambda *args: None)
    assert not backprop.supports(model, x)
    handle.remove()
    assert backprop.supports(model, x)


def test_evaluate_takes_the_same_values_either_way(generator):
    model = network(8)
    x = torch.randn(40, 10, generator=generator, dtype=torch.float64)
    fast = evaluate(model, x, with_score=True)
    slow = evaluate(Wrapped(model), x, with_score=True)
    assert max_relative_error(fast.log_p, slow.log_p) < TOLERANCE
    assert max_relative_error(fast.score, slow.score) < TOLERANCE


def test_layer_cache_index_copy_replaces_rows(generator):
    model = network(4)
    x = torch.randn(6, 10, generator=generator, dtype=torch.float64)
    y = torch.randn(2, 10, generator=generator, dtype=torch.float64)
    cache_x = backprop.forward_backward(model, x, keep_cache=True).cache
    cache_y = backprop.forward_backward(model, y, keep_cache=True).cache
    index = torch.tensor([4, 1])
    merged_x = x.index_copy(0, index, y)
    expected = backprop.forward_backward(model, merged_x, keep_cache=True).cache
    merged = cache_x.index_copy(index, cache_y)
    for actual, reference in zip(
        merged.inputs + merged.output_grads, expected.inputs + expected.output_grads
    ):
        assert torch.allclose(actual, reference, rtol=0, atol=1e-14)
    assert torch.equal(cache_x.inputs[0], x)


ESTIMATOR_CASES = [
    ("cd", 0.3),
    ("adjusted_cd", 0.3),
    # On the steepened network a MALA step of 1 rejects many proposals, so the
    # last state of some chains is an earlier one, whose rows the estimator
    # evaluates again. A step of 0.05 rejects almost none.
    ("cd_mh", 1.0),
    ("cd_mh", 0.05),
]


@pytest.mark.parametrize("method, step_size", ESTIMATOR_CASES)
@pytest.mark.parametrize("k", [1, 3])
def test_estimators_agree_with_autograd_path(method, step_size, k, generator):
    """The cached loss of an EnergyMLP and the autograd loss of the same network
    behind a wrapper give the same chains, loss and parameter gradient."""
    model = network(8, output_scale=30.0)
    x = torch.randn(64, 10, generator=generator, dtype=torch.float64)
    estimator = make_estimator(method, step_size, k)
    fast = estimator(model, x, torch.Generator().manual_seed(11))
    slow = estimator(Wrapped(model), x, torch.Generator().manual_seed(11))
    params = list(model.parameters())
    assert torch.allclose(fast.x_tilde, slow.x_tilde, rtol=0, atol=1e-12)
    assert torch.allclose(fast.log_w, slow.log_w, rtol=0, atol=1e-10)
    assert abs(fast.loss.item() - slow.loss.item()) < 1e-12
    error = max_relative_error(
        flat(torch.autograd.grad(fast.loss, params)),
        flat(torch.autograd.grad(slow.loss, params)),
    )
    assert error < 1e-10
    if method == "cd_mh" and step_size == 1.0:
        assert fast.acceptance.mean() < 0.9


def test_cd_with_mala_reevaluates_rejected_rows(generator):
    """With many rejections the final pass mixes rows of several states."""
    model = network(8, output_scale=30.0)
    x = torch.randn(200, 10, generator=generator, dtype=torch.float64)
    out = ContrastiveDivergence(MALA(1.0), 2)(
        model, x, torch.Generator().manual_seed(3)
    )
    assert 0.0 < out.acceptance.mean() < 0.9
    params = list(model.parameters())
    expected = (model(out.x_tilde) - model(x)).mean()
    error = max_relative_error(
        flat(torch.autograd.grad(out.loss, params)),
        flat(torch.autograd.grad(expected, params)),
    )
    assert error < 1e-10


def test_estimator_under_no_grad_returns_constant_loss(generator):
    model = network(4)
    x = torch.randn(8, 10, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        out = ContrastiveDivergence(Langevin(0.1), 2, weighting="alpha")(
            model, x, generator
        )
    assert not out.loss.requires_grad


def test_weighted_sum_accepts_one_cache_twice(generator):
    """Two weights on the same points: their caches must not be scaled in place."""
    model = network(4)
    x = torch.randn(10, 10, generator=generator, dtype=torch.float64)
    result = backprop.forward_backward(model, x, keep_cache=True)
    c_1 = torch.randn(10, generator=generator, dtype=torch.float64)
    c_2 = torch.randn(10, generator=generator, dtype=torch.float64)
    value = ((c_1 + c_2) * result.log_p).sum()
    total = backprop.weighted_log_prob_sum(
        model, value, [(c_1, result.cache), (c_2, result.cache)]
    )
    params = list(model.parameters())
    actual = flat(torch.autograd.grad(total, params))
    expected = flat(torch.autograd.grad(((c_1 + c_2) * model(x)).sum(), params))
    assert max_relative_error(actual, expected) < 1e-10
