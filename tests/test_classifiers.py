import pytest
import torch

from cdlib.classifiers import TimeReversalClassifier, nce_logit, present_in_random_order
from cdlib.estimators import CNCE, GaussianReference, alpha_from_log_w
from cdlib.kernels import MALA, GaussianNoise, Langevin, run_chain
from cdlib.models import EnergyMLP

TOLERANCE = 1e-10


def flat(grads):
    return torch.cat([g.reshape(-1) for g in grads])


def max_relative_error(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max()).item()


@pytest.fixture
def model():
    torch.manual_seed(0)
    return EnergyMLP(dim=4, width=16, depth=4).double()


@pytest.fixture
def x(generator):
    return torch.randn(40, 4, generator=generator, dtype=torch.float64)


def test_reversed_chain_gets_complementary_probability(model, x):
    kernel = Langevin(0.5)
    chain = run_chain(kernel, model, x, 4, torch.Generator().manual_seed(1), keep_path=True)
    classifier = TimeReversalClassifier(model, kernel)
    forward = classifier.probability(chain.path)
    backward = classifier.probability(chain.path.flip(0))
    assert (forward + backward - 1).abs().max() < 1e-12


def test_classifier_log_w_matches_chain_weights(model, x):
    kernel = Langevin(0.5)
    chain = run_chain(kernel, model, x, 4, torch.Generator().manual_seed(1), keep_path=True)
    log_w = TimeReversalClassifier(model, kernel).log_w(chain.path)
    assert (log_w - chain.log_w).abs().max() < 1e-10


def test_mala_classifier_gives_alpha_one_half(model, x):
    kernel = MALA(0.8)
    chain = run_chain(kernel, model, x, 5, torch.Generator().manual_seed(2), keep_path=True)
    assert 0.0 < chain.acceptance.mean() < 1.0
    log_w = TimeReversalClassifier(model, kernel).log_w(chain.path)
    assert (alpha_from_log_w(log_w.detach()) - 0.5).abs().max() < 1e-12


def test_random_order_bce_equals_in_order_loss(model, x):
    """Reversing a chain and flipping its label leaves its BCE term unchanged."""
    kernel = Langevin(0.5)
    chain = run_chain(kernel, model, x, 3, torch.Generator().manual_seed(3), keep_path=True)
    classifier = TimeReversalClassifier(model, kernel)
    presented, is_original = present_in_random_order(chain.path, torch.Generator().manual_seed(4))
    assert 0 < int(is_original.sum()) < x.shape[0]
    random_order = classifier.loss(presented, is_original)
    in_order = classifier.loss(chain.path, torch.ones(x.shape[0], dtype=torch.bool))
    assert abs(random_order.item() - in_order.item()) < 1e-12


def test_random_order_gradient_is_alpha_weighted_cd(model, x):
    kernel = Langevin(0.5)
    chain = run_chain(kernel, model, x, 3, torch.Generator().manual_seed(3), keep_path=True)
    classifier = TimeReversalClassifier(model, kernel)
    presented, is_original = present_in_random_order(chain.path, torch.Generator().manual_seed(4))
    params = list(model.parameters())
    game = flat(torch.autograd.grad(classifier.loss(presented, is_original), params))
    alpha = alpha_from_log_w(chain.log_w)
    update = flat(torch.autograd.grad((alpha * (model(chain.xk) - model(chain.x0))).mean(), params))
    assert max_relative_error(game, update) < TOLERANCE


def test_pair_classifier_loss_equals_cnce_loss(model, x):
    estimator = CNCE(0.3)
    out = estimator(model, x, torch.Generator().manual_seed(5))
    path = torch.stack([x, out.x_tilde])
    classifier = TimeReversalClassifier(model, GaussianNoise(0.3))
    pair_loss = classifier.loss(path, torch.ones(x.shape[0], dtype=torch.bool))
    assert abs(pair_loss.item() - out.loss.item()) < 1e-12


def test_classifier_rejects_single_state(model, x):
    with pytest.raises(ValueError, match=r"path must have shape \(k \+ 1, n, dim\) with k >= 1"):
        TimeReversalClassifier(model, Langevin(0.1)).log_w(x[None])


def test_nce_logit_is_log_ratio(model, x):
    reference = GaussianReference(4, 2.0)
    expected = model(x) - reference.log_prob(x)
    assert torch.equal(nce_logit(model, reference, x), expected)
