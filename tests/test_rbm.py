import math

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import binomtest

from cdlib.classifiers import TimeReversalClassifier, present_in_random_order
from cdlib.estimators import alpha_from_log_w
from cdlib.kernels import State, run_chain
from cdlib.rbm import (
    MAX_ENUMERATED_HIDDEN,
    BernoulliRBM,
    BlockGibbs,
    binary_states,
    cd_loss,
    exact_log_likelihood,
    independent_bernoulli_log_likelihood,
    load_binary_digits,
    log_partition,
    log_transition,
    sample_exact,
    train_rbm,
)

TOLERANCE = 1e-10
N_VISIBLE, N_HIDDEN = 5, 3


def flat(grads):
    return torch.cat([g.reshape(-1) for g in grads])


def max_relative_error(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def random_rbm(n_visible, n_hidden, seed, scale=1.0):
    """An RBM with N(0, scale^2) weights and biases, far from the flat initial one."""
    generator = torch.Generator().manual_seed(seed)
    shapes = [(n_hidden, n_visible), (n_visible,), (n_hidden,)]
    values = [
        scale * torch.randn(s, generator=generator, dtype=torch.float64) for s in shapes
    ]
    return BernoulliRBM.from_parameters(*values)


@pytest.fixture
def rbm():
    return random_rbm(N_VISIBLE, N_HIDDEN, seed=0)


@pytest.fixture
def all_pairs():
    """Every (v, v') pair of visible states, as two (32 * 32, 5) tensors."""
    states = binary_states(N_VISIBLE)
    n = states.shape[0]
    v_from = states.repeat_interleave(n, dim=0)
    v_to = states.repeat(n, 1)
    return v_to, v_from


def brute_force_transition(rbm, v_to, v_from):
    """q(v'|v) = sum_h p(h|v) p(v'|h) in probability space, from Bernoulli products."""
    total = torch.zeros(v_to.shape[0], dtype=torch.float64)
    for h in binary_states(rbm.n_hidden):
        p_hidden = torch.sigmoid(rbm.hidden_logits(v_from))
        p_h_given_v = (p_hidden**h * (1 - p_hidden) ** (1 - h)).prod(-1)
        p_visible = torch.sigmoid(rbm.visible_logits(h[None]))
        p_v_given_h = (p_visible**v_to * (1 - p_visible) ** (1 - v_to)).prod(-1)
        total = total + p_h_given_v * p_v_given_h
    return total


def test_free_energy_sums_out_hidden_units(rbm):
    v = binary_states(N_VISIBLE)
    h_all = binary_states(N_HIDDEN)
    pairs_v = v.repeat_interleave(h_all.shape[0], dim=0)
    pairs_h = h_all.repeat(v.shape[0], 1)
    joint = -rbm.energy(pairs_v, pairs_h).reshape(v.shape[0], h_all.shape[0])
    with torch.no_grad():
        assert max_relative_error(rbm(v), torch.logsumexp(joint, 1)) < TOLERANCE


def test_log_partition_matches_joint_enumeration(rbm):
    v = binary_states(N_VISIBLE)
    h_all = binary_states(N_HIDDEN)
    pairs_v = v.repeat_interleave(h_all.shape[0], dim=0)
    pairs_h = h_all.repeat(v.shape[0], 1)
    with torch.no_grad():
        by_joint = torch.logsumexp(-rbm.energy(pairs_v, pairs_h), 0)
        by_visible = torch.logsumexp(rbm(v), 0)
        by_hidden = log_partition(rbm)
    assert abs(by_hidden - by_joint) / abs(by_joint) < TOLERANCE
    assert abs(by_hidden - by_visible) / abs(by_visible) < TOLERANCE


def test_log_partition_is_chunked_consistently(rbm, monkeypatch):
    whole = log_partition(rbm).item()
    monkeypatch.setattr("cdlib.rbm.CHUNK_ENTRIES", 2 * N_VISIBLE)
    chunked = log_partition(rbm).item()
    assert abs(whole - chunked) < 1e-12


def test_transition_matches_brute_force(rbm, all_pairs):
    v_to, v_from = all_pairs
    with torch.no_grad():
        exact = log_transition(rbm, v_to, v_from).exp()
        expected = brute_force_transition(rbm, v_to, v_from)
    assert max_relative_error(exact, expected) < TOLERANCE


def test_transition_is_chunked_consistently(rbm, all_pairs, monkeypatch):
    v_to, v_from = all_pairs
    with torch.no_grad():
        whole = log_transition(rbm, v_to, v_from)
        monkeypatch.setattr("cdlib.rbm.CHUNK_ENTRIES", v_to.shape[0])
        chunked = log_transition(rbm, v_to, v_from)
    assert (whole - chunked).abs().max() < 1e-12


def test_transition_rows_sum_to_one(rbm, all_pairs):
    v_to, v_from = all_pairs
    n = 2**N_VISIBLE
    with torch.no_grad():
        log_q = log_transition(rbm, v_to, v_from).reshape(n, n)
    assert torch.logsumexp(log_q, 1).abs().max() < 1e-12


def test_gibbs_weight_is_one_for_every_pair(rbm, all_pairs):
    v_to, v_from = all_pairs
    kernel = BlockGibbs(rbm)
    with torch.no_grad():
        state_from = State(v_from, rbm(v_from))
        state_to = State(v_to, rbm(v_to))
        log_q_forward = kernel.log_q(state_to, state_from)
        log_q_backward = kernel.log_q(state_from, state_to)
    log_w = log_q_backward - log_q_forward + state_to.log_p - state_from.log_p
    assert log_w.abs().max() < TOLERANCE
    assert (alpha_from_log_w(log_w) - 0.5).abs().max() < TOLERANCE


def test_model_marginal_is_stationary(rbm, all_pairs):
    v_to, v_from = all_pairs
    n = 2**N_VISIBLE
    with torch.no_grad():
        log_p = rbm(binary_states(N_VISIBLE)) - log_partition(rbm)
        log_q = log_transition(rbm, v_to, v_from).reshape(n, n)
    after_one_step = torch.logsumexp(log_p[:, None] + log_q, 0)
    assert (after_one_step - log_p).abs().max() < TOLERANCE


def test_mean_field_transition_breaks_detailed_balance(rbm, all_pairs):
    """The shortcut q(v'|v) = p(v' | h = E[h|v]) is not the Gibbs kernel, so w != 1."""
    v_to, v_from = all_pairs
    with torch.no_grad():

        def mean_field_log_q(to, frm):
            s = rbm.visible_logits(torch.sigmoid(rbm.hidden_logits(frm)))
            return (to * s - F.softplus(s)).sum(-1)

        log_w = mean_field_log_q(v_from, v_to) - mean_field_log_q(v_to, v_from)
        log_w = log_w + rbm(v_to) - rbm(v_from)
    assert log_w.abs().max() > 1e-2


class MeanFieldGibbs(BlockGibbs):
    """A deliberately wrong kernel: the Gibbs sampler with a mean-field log q."""

    def log_q(self, state_to, state_from):
        with torch.no_grad():
            mean_h = torch.sigmoid(self.rbm.hidden_logits(state_from.x))
            s = self.rbm.visible_logits(mean_h)
            return (state_to.x * s - F.softplus(s)).sum(-1)


def gibbs_chain_gradients(rbm, kernel, v0, k, seed):
    """Return the game's gradient and half the CD-k gradient on the same chains."""
    chain = run_chain(
        kernel, rbm, v0, k, torch.Generator().manual_seed(seed), keep_path=True
    )
    presented, is_original = present_in_random_order(
        chain.path, torch.Generator().manual_seed(seed + 1)
    )
    params = list(rbm.parameters())
    classifier = TimeReversalClassifier(rbm, kernel)
    game = flat(torch.autograd.grad(classifier.loss(presented, is_original), params))
    half_cd = 0.5 * flat(torch.autograd.grad(cd_loss(rbm, chain.x0, chain.xk), params))
    return game, half_cd, chain


def test_game_gradient_is_half_cd_on_gibbs_chains():
    rbm = random_rbm(8, 4, seed=1)
    v0 = binary_states(8)[::3]
    game, half_cd, chain = gibbs_chain_gradients(rbm, BlockGibbs(rbm), v0, 3, seed=2)
    assert not torch.equal(chain.x0, chain.xk)
    assert chain.log_w.abs().max() < TOLERANCE
    assert max_relative_error(game, half_cd) < TOLERANCE


def test_game_with_wrong_transition_is_not_half_cd():
    rbm = random_rbm(8, 4, seed=1)
    v0 = binary_states(8)[::3]
    game, half_cd, _ = gibbs_chain_gradients(rbm, MeanFieldGibbs(rbm), v0, 3, seed=2)
    assert max_relative_error(game, half_cd) > 1e-3


def test_cd_loss_gives_classical_update(rbm):
    generator = torch.Generator().manual_seed(3)
    v_data = binary_states(N_VISIBLE)[::2]
    v_model = rbm.gibbs_step(v_data, generator)
    weight_grad, visible_grad, hidden_grad = torch.autograd.grad(
        cd_loss(rbm, v_data, v_model), [rbm.weight, rbm.visible_bias, rbm.hidden_bias]
    )
    with torch.no_grad():
        h_data = torch.sigmoid(rbm.hidden_logits(v_data))
        h_model = torch.sigmoid(rbm.hidden_logits(v_model))
        n = v_data.shape[0]
        update_weight = (h_data.T @ v_data - h_model.T @ v_model) / n
        update_visible = (v_data - v_model).mean(0)
        update_hidden = (h_data - h_model).mean(0)
    assert max_relative_error(-weight_grad, update_weight) < TOLERANCE
    assert max_relative_error(-visible_grad, update_visible) < TOLERANCE
    assert max_relative_error(-hidden_grad, update_hidden) < TOLERANCE


def test_moving_kernel_gives_zero_gradient(rbm):
    """Not holding the Gibbs kernel fixed makes log w = 0 for every theta, so the
    game's gradient vanishes instead of being half the CD update."""
    v0 = binary_states(N_VISIBLE)
    chain = run_chain(
        BlockGibbs(rbm), rbm, v0, 2, torch.Generator().manual_seed(4), keep_path=True
    )
    log_w = torch.zeros(v0.shape[0], dtype=torch.float64)
    for before, after in zip(chain.path[:-1], chain.path[1:]):
        log_w = (
            log_w
            + log_transition(rbm, before, after)
            - log_transition(rbm, after, before)
        )
        log_w = log_w + rbm(after) - rbm(before)
    params = list(rbm.parameters())
    moving = flat(torch.autograd.grad(F.softplus(log_w).mean(), params))
    half_cd = 0.5 * flat(torch.autograd.grad(cd_loss(rbm, chain.x0, chain.xk), params))
    assert moving.abs().max() < 1e-12
    assert half_cd.abs().max() > 1e-2


def test_kernel_log_q_is_detached(rbm):
    v = binary_states(N_VISIBLE)
    state = State(v, rbm(v).detach())
    assert not BlockGibbs(rbm).log_q(state, state).requires_grad


def min_binomial_p_value(counts, probabilities):
    """Return the smallest exact two-sided binomial p-value over the cells."""
    n = int(counts.sum())
    return min(
        binomtest(int(count), n, float(probability)).pvalue
        for count, probability in zip(counts, probabilities)
    )


def test_gibbs_frequencies_match_transition(rbm):
    """Counts of v' from one start, against exact q(v'|v).

    Each of the 32 cells gets an exact binomial test. With the failure rate split
    evenly over them (Bonferroni), the test fails with probability at most 1e-6
    when q is right.
    """
    n = 200_000
    states = binary_states(N_VISIBLE)
    v_start = states[13]
    draws = rbm.gibbs_step(v_start.repeat(n, 1), torch.Generator().manual_seed(5))
    index = (draws * 2 ** torch.arange(N_VISIBLE)).sum(-1).long()
    counts = torch.bincount(index, minlength=states.shape[0])
    with torch.no_grad():
        q = log_transition(rbm, states, v_start.repeat(states.shape[0], 1)).exp()
    assert min_binomial_p_value(counts, q) > 1e-6 / states.shape[0]


def test_exact_samples_match_model_marginal(rbm):
    n = 200_000
    states = binary_states(N_VISIBLE)
    samples, hidden = sample_exact(rbm, n, torch.Generator().manual_seed(6))
    assert samples.shape == (n, N_VISIBLE)
    assert hidden.shape == (n, N_HIDDEN)
    index = (samples * 2 ** torch.arange(N_VISIBLE)).sum(-1).long()
    counts = torch.bincount(index, minlength=states.shape[0])
    with torch.no_grad():
        p = (rbm(states) - log_partition(rbm)).exp()
    assert min_binomial_p_value(counts, p) > 1e-6 / states.shape[0]


def test_wrong_transition_fails_frequency_check(rbm):
    """The frequency check has power: the mean-field q is rejected by it."""
    n = 200_000
    states = binary_states(N_VISIBLE)
    v_start = states[13]
    draws = rbm.gibbs_step(v_start.repeat(n, 1), torch.Generator().manual_seed(5))
    index = (draws * 2 ** torch.arange(N_VISIBLE)).sum(-1).long()
    counts = torch.bincount(index, minlength=states.shape[0])
    with torch.no_grad():
        s = rbm.visible_logits(torch.sigmoid(rbm.hidden_logits(v_start[None])))
        wrong_q = (states * s - F.softplus(s)).sum(-1).exp()
    assert abs(wrong_q.sum().item() - 1) < 1e-12
    assert min_binomial_p_value(counts, wrong_q) < 1e-6 / states.shape[0]


def test_run_chain_with_gibbs_kernel(rbm):
    v0 = binary_states(N_VISIBLE)
    chain = run_chain(
        BlockGibbs(rbm), rbm, v0, 4, torch.Generator().manual_seed(7), keep_path=True
    )
    assert chain.path.shape == (5, v0.shape[0], N_VISIBLE)
    assert chain.evaluations == 5
    assert chain.nonfinite == 0
    assert chain.acceptance is None
    assert chain.log_w_steps.abs().max() < TOLERANCE


def test_gibbs_weight_differs_for_other_model(rbm):
    other = random_rbm(N_VISIBLE, N_HIDDEN, seed=8)
    v0 = binary_states(N_VISIBLE)
    chain = run_chain(BlockGibbs(other), rbm, v0, 2, torch.Generator().manual_seed(9))
    assert chain.log_w.abs().max() > 1e-2


def test_training_improves_exact_log_likelihood():
    digits = load_binary_digits()
    train, test = digits.train[:300], digits.test[:100]
    for method in ("cd", "pcd"):
        rbm = BernoulliRBM(64, 8, torch.Generator().manual_seed(0))
        history = train_rbm(
            rbm,
            train,
            test,
            method=method,
            k=1,
            epochs=3,
            batch_size=10,
            learning_rate=0.1,
            generator=torch.Generator().manual_seed(1),
        )
        assert history.epoch == [0, 1, 2, 3]
        assert history.test_log_likelihood[-1] > history.test_log_likelihood[0] + 5
        final = exact_log_likelihood(rbm, test).item()
        assert abs(final - history.test_log_likelihood[-1]) < 1e-12
        if method == "pcd":
            assert history.chains.shape == (10, 64)
        else:
            assert history.chains is None


def test_training_evaluates_every_few_epochs():
    digits = load_binary_digits()
    rbm = BernoulliRBM(64, 4, torch.Generator().manual_seed(0))
    history = train_rbm(
        rbm,
        digits.train[:50],
        digits.test[:20],
        method="cd",
        k=1,
        epochs=5,
        batch_size=25,
        learning_rate=0.1,
        generator=torch.Generator().manual_seed(1),
        evaluate_every=2,
    )
    assert history.epoch == [0, 2, 4, 5]
    assert len(history.test_log_likelihood) == 4
    assert len(history.train_log_likelihood) == 4


def test_digits_are_binary_and_split():
    digits = load_binary_digits(threshold=8, test_fraction=0.25, seed=0)
    assert digits.train.shape == (1348, 64)
    assert digits.test.shape == (449, 64)
    values = torch.cat([digits.train, digits.test]).unique()
    assert values.tolist() == [0.0, 1.0]
    again = load_binary_digits(threshold=8, test_fraction=0.25, seed=0)
    assert torch.equal(digits.test, again.test)


def test_baseline_equals_rbm_without_weights():
    digits = load_binary_digits()
    train, test = digits.train, digits.test
    baseline = independent_bernoulli_log_likelihood(train, test)
    probability = (train.sum(0) + 1) / (train.shape[0] + 2)
    rbm = BernoulliRBM.from_parameters(
        torch.zeros(1, 64, dtype=torch.float64),
        torch.logit(probability),
        torch.zeros(1, dtype=torch.float64),
    )
    assert abs(exact_log_likelihood(rbm, test).item() - baseline.item()) < 1e-10


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda m: m(torch.full((2, N_VISIBLE), 0.5, dtype=torch.float64)),
            r"v must contain only the values 0 and 1, got 10 other entries "
            r"\(for example 0.5\)",
        ),
        (
            lambda m: m(torch.zeros(2, N_VISIBLE + 1, dtype=torch.float64)),
            r"v must have shape \(n, 5\) with n >= 1, got \(2, 6\)",
        ),
        (
            lambda m: m(torch.zeros(2, N_VISIBLE, dtype=torch.long)),
            "v must be a floating-point tensor",
        ),
        (
            lambda m: log_transition(
                m,
                torch.zeros(3, N_VISIBLE, dtype=torch.float64),
                torch.zeros(2, N_VISIBLE, dtype=torch.float64),
            ),
            "v_to and v_from must have the same number of rows, got 3 and 2",
        ),
        (
            lambda m: exact_log_likelihood(
                m, torch.full((1, N_VISIBLE), 2.0, dtype=torch.float64)
            ),
            "v must contain only the values 0 and 1",
        ),
        (
            lambda m: m.energy(
                torch.zeros(2, N_VISIBLE, dtype=torch.float64),
                torch.zeros(3, N_HIDDEN, dtype=torch.float64),
            ),
            "v and h must have the same number of rows",
        ),
    ],
)
def test_rbm_rejects_bad_input(rbm, call, message):
    with pytest.raises(ValueError, match=message):
        call(rbm)


def test_too_many_hidden_units_are_rejected():
    large = BernoulliRBM(4, MAX_ENUMERATED_HIDDEN + 1, torch.Generator().manual_seed(0))
    v = torch.zeros(2, 4, dtype=torch.float64)
    message = (
        r"n_hidden must be at most 16 for exact sums over the 2\^n_hidden hidden "
        r"states, got 17"
    )
    for call in (
        lambda: log_partition(large),
        lambda: exact_log_likelihood(large, v),
        lambda: log_transition(large, v, v),
        lambda: sample_exact(large, 3, torch.Generator()),
    ):
        with pytest.raises(ValueError, match=message):
            call()
    with pytest.raises(ValueError, match=r"rbm.n_hidden must be at most 16"):
        BlockGibbs(large)


def test_train_rejects_bad_input_before_training():
    rbm = BernoulliRBM(64, 4, torch.Generator().manual_seed(0))
    weight_before = rbm.weight.detach().clone()
    data = load_binary_digits().train[:20]
    good = dict(method="cd", k=1, epochs=1, batch_size=10, learning_rate=0.1)
    cases = [
        (dict(method="gibbs"), "method must be one of 'cd', 'pcd', got 'gibbs'"),
        (dict(k=0), "k must be an integer >= 1, got 0"),
        (dict(batch_size=0), "batch_size must be an integer >= 1, got 0"),
        (
            dict(learning_rate=-1.0),
            r"learning_rate must be a finite number > 0, got -1.0",
        ),
        (dict(evaluate_every=0), "evaluate_every must be an integer >= 1, got 0"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            train_rbm(
                rbm, data, data, generator=torch.Generator(), **{**good, **change}
            )
    grey = data * 0.5
    with pytest.raises(
        ValueError, match="train_v must contain only the values 0 and 1"
    ):
        train_rbm(rbm, grey, data, generator=torch.Generator(), **good)
    with pytest.raises(ValueError, match=r"test_v must have shape \(n, 64\)"):
        train_rbm(rbm, data, data[:, :10], generator=torch.Generator(), **good)
    large = BernoulliRBM(64, 17, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="n_hidden must be at most 16"):
        train_rbm(large, data, data, generator=torch.Generator(), **good)
    assert torch.equal(rbm.weight, weight_before)


@pytest.mark.parametrize(
    "shapes, message",
    [
        (
            ((3, 5), (4,), (3,)),
            r"visible_bias must have shape \(5,\) to match weight \(3, 5\), got \(4,\)",
        ),
        (
            ((3, 5), (5,), (2,)),
            r"hidden_bias must have shape \(3,\) to match weight \(3, 5\), got \(2,\)",
        ),
        (
            ((15,), (5,), (3,)),
            r"weight must have shape \(n_hidden, n_visible\), got \(15,\)",
        ),
    ],
)
def test_from_parameters_rejects_mismatched_shapes(shapes, message):
    values = [torch.zeros(s, dtype=torch.float64) for s in shapes]
    with pytest.raises(ValueError, match=message):
        BernoulliRBM.from_parameters(*values)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(threshold=0), "threshold must be an integer from 1 to 16, got 0"),
        (dict(threshold=8.5), "threshold must be an integer from 1 to 16, got 8.5"),
        (dict(test_fraction=1.0), r"test_fraction must be in \(0, 1\), got 1.0"),
        (dict(test_fraction=1e-5), "leaves 0 of 1797 images for testing"),
    ],
)
def test_load_digits_rejects_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_binary_digits(**kwargs)


def test_binary_states_lists_every_state():
    states = binary_states(3)
    assert states.shape == (8, 3)
    assert states.unique(dim=0).shape[0] == 8
    assert states[5].tolist() == [1.0, 0.0, 1.0]
    assert math.isclose(states.sum().item(), 12.0)


def test_rbm_rejects_data_of_other_dtype():
    rbm = BernoulliRBM(4, 3, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="v must have the model's dtype torch.float64, got torch.float32"):
        rbm(torch.zeros(2, 4, dtype=torch.float32))


def test_from_parameters_rejects_nan_weight():
    weight = torch.zeros(3, 4, dtype=torch.float64)
    weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="weight must be finite"):
        BernoulliRBM.from_parameters(weight, torch.zeros(4, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
