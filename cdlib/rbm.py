"""Bernoulli restricted Boltzmann machines, with exact sums over the hidden units.

An RBM with binary visible units v in {0, 1}^D and binary hidden units h in {0, 1}^H
has the energy E(v, h) = -b.v - c.h - h.W v, with weights W of shape (H, D), visible
biases b and hidden biases c. Summing out h gives the free energy, and the model's
unnormalised log-density is

    log p_theta(v) = -F(v) = b.v + sum_j softplus(c_j + W_j.v),

so a :class:`BernoulliRBM` can be passed wherever the library expects
``model(x) -> log p_theta(x)`` of shape (n,).

With at most ``MAX_ENUMERATED_HIDDEN`` hidden units, sums over the 2^H hidden states
are done exactly, in log space and in chunks: the log-partition function
(:func:`log_partition`), the block Gibbs transition probability q(v'|v)
(:func:`log_transition`, used by :class:`BlockGibbs`) and exact samples
(:func:`sample_exact`). The book's RBM chapter derives each formula.
"""

import functools
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ._validation import check_batch, check_choice, check_int_at_least, check_positive
from .kernels import State, StepInfo, evaluate, log_weight

# 2^16 hidden states times 64 visible units are about 4 million terms per sum. One
# log Z took 0.04 to 0.4 s in float64 on a shared 2-core machine, depending on load.
MAX_ENUMERATED_HIDDEN = 16

# Entries of the (rows x hidden states) matrices built at once by the exact sums,
# 2^22 float64 values or 32 MiB.
CHUNK_ENTRIES = 2**22

TRAIN_METHODS = ("cd", "pcd")


def check_binary(name: str, v, n_visible: int, dtype=None) -> torch.Tensor:
    """Return ``v``, or raise unless it is a float tensor (n, n_visible) of 0 and 1.

    With ``dtype`` given, ``v`` must also have that dtype (the model's).
    """
    check_batch(name, v, n_visible)
    if dtype is not None and v.dtype != dtype:
        raise ValueError(
            f"{name} must have the model's dtype {dtype}, got {v.dtype}; "
            f"convert it with .to({dtype})"
        )
    is_binary = (v == 0) | (v == 1)
    if not is_binary.all():
        bad = int((~is_binary).sum())
        example = v[~is_binary][0].item()
        raise ValueError(
            f"{name} must contain only the values 0 and 1, got {bad} other entries "
            f"(for example {example!r}); binarise the data first"
        )
    return v


def check_enumerable(name: str, n_hidden: int) -> int:
    """Return ``n_hidden``, or raise if 2^n_hidden states are too many to sum over."""
    if n_hidden > MAX_ENUMERATED_HIDDEN:
        raise ValueError(
            f"{name} must be at most {MAX_ENUMERATED_HIDDEN} for exact sums over the "
            f"2^{name} hidden states, got {n_hidden!r}"
        )
    return n_hidden


def binary_states(n_bits: int, start: int = 0, stop=None, dtype=torch.float64):
    """Return the binary vectors of the integers start..stop-1 as rows.

    The shape is (stop - start, n_bits). Bit j of the integer is column j, so
    ``binary_states(n)`` lists all 2^n states.
    """
    check_int_at_least("n_bits", n_bits, 1)
    stop = 2**n_bits if stop is None else stop
    integers = torch.arange(start, stop)
    bits = torch.arange(n_bits)
    return ((integers[:, None] >> bits) & 1).to(dtype)


class BernoulliRBM(nn.Module):
    """An RBM with binary visible and hidden units, whose ``forward`` returns -F(v).

    ``weight`` is W with shape (n_hidden, n_visible), the layout of scikit-learn's
    ``BernoulliRBM.components_``. The initial weights are N(0, weight_std^2) draws
    from ``generator`` and the biases start at 0, as in scikit-learn 1.9.
    """

    def __init__(
        self,
        n_visible: int,
        n_hidden: int,
        generator: torch.Generator,
        weight_std: float = 0.01,
        dtype=torch.float64,
    ):
        super().__init__()
        self.n_visible = check_int_at_least("n_visible", n_visible, 1)
        self.n_hidden = check_int_at_least("n_hidden", n_hidden, 1)
        check_positive("weight_std", weight_std)
        weight = torch.randn(n_hidden, n_visible, generator=generator, dtype=dtype)
        self.weight = nn.Parameter(weight_std * weight)
        self.visible_bias = nn.Parameter(torch.zeros(n_visible, dtype=dtype))
        self.hidden_bias = nn.Parameter(torch.zeros(n_hidden, dtype=dtype))

    @classmethod
    def from_parameters(cls, weight, visible_bias, hidden_bias) -> "BernoulliRBM":
        """Build an RBM with copies of W (H, D), b (D,) and c (H,)."""
        weight = torch.as_tensor(weight)
        visible_bias = torch.as_tensor(visible_bias)
        hidden_bias = torch.as_tensor(hidden_bias)
        if weight.ndim != 2:
            raise ValueError(
                "weight must have shape (n_hidden, n_visible), got "
                f"{tuple(weight.shape)}"
            )
        n_hidden, n_visible = weight.shape
        for name, value in (("weight", weight), ("visible_bias", visible_bias), ("hidden_bias", hidden_bias)):
            if not value.is_floating_point() or not torch.isfinite(value).all():
                raise ValueError(f"{name} must be finite floating-point values, got {value.dtype} with non-finite or integer entries")
        if visible_bias.dtype != weight.dtype or hidden_bias.dtype != weight.dtype:
            raise ValueError(
                f"weight, visible_bias and hidden_bias must share one dtype, got "
                f"{weight.dtype}, {visible_bias.dtype} and {hidden_bias.dtype}"
            )
        if tuple(visible_bias.shape) != (n_visible,):
            raise ValueError(
                f"visible_bias must have shape ({n_visible},) to match weight "
                f"{tuple(weight.shape)}, got {tuple(visible_bias.shape)}"
            )
        if tuple(hidden_bias.shape) != (n_hidden,):
            raise ValueError(
                f"hidden_bias must have shape ({n_hidden},) to match weight "
                f"{tuple(weight.shape)}, got {tuple(hidden_bias.shape)}"
            )
        rbm = cls(n_visible, n_hidden, torch.Generator(), dtype=weight.dtype)
        with torch.no_grad():
            rbm.weight.copy_(weight)
            rbm.visible_bias.copy_(visible_bias)
            rbm.hidden_bias.copy_(hidden_bias)
        return rbm

    def hidden_logits(self, v: torch.Tensor) -> torch.Tensor:
        """Return c + W v, the logits of p(h_j = 1 | v), shape (n, n_hidden)."""
        return self.hidden_bias + v @ self.weight.T

    def visible_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Return b + W^T h, the logits of p(v_i = 1 | h), shape (n, n_visible)."""
        return self.visible_bias + h @ self.weight

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        """Return log p_theta(v) = -F(v) = b.v + sum_j softplus(c_j + W_j.v)."""
        check_binary("v", v, self.n_visible, self.weight.dtype)
        return v @ self.visible_bias + F.softplus(self.hidden_logits(v)).sum(-1)

    def free_energy(self, v: torch.Tensor) -> torch.Tensor:
        """Return F(v), so that p(v) = exp(-F(v)) / Z."""
        return -self(v)

    def energy(self, v: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Return E(v, h) = -b.v - c.h - h.W v for paired rows of v and h."""
        check_binary("v", v, self.n_visible, self.weight.dtype)
        check_binary("h", h, self.n_hidden, self.weight.dtype)
        if v.shape[0] != h.shape[0]:
            raise ValueError(
                f"v and h must have the same number of rows, got {v.shape[0]} and "
                f"{h.shape[0]}"
            )
        interaction = ((h @ self.weight) * v).sum(-1)
        return -(v @ self.visible_bias) - h @ self.hidden_bias - interaction

    def sample_hidden(self, v: torch.Tensor, generator: torch.Generator):
        """Draw h ~ p(h | v), each unit independently Bernoulli(sigmoid(c + W v))."""
        return _bernoulli(torch.sigmoid(self.hidden_logits(v)), generator)

    def sample_visible(self, h: torch.Tensor, generator: torch.Generator):
        """Draw v ~ p(v | h), each unit independently Bernoulli(sigmoid(b + W^T h))."""
        return _bernoulli(torch.sigmoid(self.visible_logits(h)), generator)

    def gibbs_step(self, v: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Draw v' from the block Gibbs kernel: h ~ p(h | v), then v' ~ p(v' | h).

        The draw is detached from the parameters.
        """
        check_binary("v", v, self.n_visible, self.weight.dtype)
        with torch.no_grad():
            h = self.sample_hidden(v, generator)
            return self.sample_visible(h, generator)


def _bernoulli(probability: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    u = torch.rand(
        probability.shape,
        generator=generator,
        dtype=probability.dtype,
        device=generator.device,
    )
    return (u.to(probability.device) < probability).to(probability.dtype)


@functools.lru_cache(maxsize=8)
def _all_states(n_bits: int, dtype) -> torch.Tensor:
    # Cached because the exact sums run after every training epoch. Callers only
    # read the table.
    return binary_states(n_bits, dtype=dtype)


def _hidden_chunks(n_hidden: int, rows: int, dtype):
    """Yield the 2^n_hidden hidden states in chunks of at most CHUNK_ENTRIES / rows."""
    size = max(1, CHUNK_ENTRIES // max(rows, 1))
    states = _all_states(n_hidden, dtype)
    yield from states.split(size)


def log_marginal_hidden(rbm: BernoulliRBM, h: torch.Tensor) -> torch.Tensor:
    """Return log sum_v exp(-E(v, h)) = c.h + sum_i softplus(b_i + (W^T h)_i)."""
    return h @ rbm.hidden_bias + F.softplus(rbm.visible_logits(h)).sum(-1)


def log_partition(rbm: BernoulliRBM) -> torch.Tensor:
    """Return log Z = log sum_h exp(c.h) prod_i (1 + exp(b_i + (W^T h)_i)), exactly.

    The sum runs over all 2^n_hidden hidden states, so n_hidden must be at most
    ``MAX_ENUMERATED_HIDDEN``. The result carries gradient to the parameters.
    """
    check_enumerable("n_hidden", rbm.n_hidden)
    dtype = rbm.weight.dtype
    parts = [
        torch.logsumexp(log_marginal_hidden(rbm, h), 0)
        for h in _hidden_chunks(rbm.n_hidden, rbm.n_visible, dtype)
    ]
    return torch.logsumexp(torch.stack(parts), 0)


def exact_log_likelihood(rbm: BernoulliRBM, v: torch.Tensor) -> torch.Tensor:
    """Return the mean exact log-likelihood mean(-F(v)) - log Z in nats per image."""
    check_binary("v", v, rbm.n_visible, rbm.weight.dtype)
    check_enumerable("n_hidden", rbm.n_hidden)
    return rbm(v).mean() - log_partition(rbm)


def log_transition(rbm: BernoulliRBM, v_to: torch.Tensor, v_from: torch.Tensor):
    """Return log q(v_to | v_from) of one block Gibbs step, row by row, exactly.

    q(v'|v) = sum_h p(h|v) p(v'|h), summed over all 2^n_hidden hidden states in log
    space (logsumexp). The result carries gradient to the parameters, so detach them
    to hold the kernel fixed.
    """
    check_enumerable("n_hidden", rbm.n_hidden)
    check_binary("v_to", v_to, rbm.n_visible, rbm.weight.dtype)
    check_binary("v_from", v_from, rbm.n_visible, rbm.weight.dtype)
    if v_to.shape[0] != v_from.shape[0]:
        raise ValueError(
            f"v_to and v_from must have the same number of rows, got {v_to.shape[0]} "
            f"and {v_from.shape[0]}"
        )

    # log p(h | v_from) = h.a - sum_j softplus(a_j) with a = c + W v_from.
    a = rbm.hidden_logits(v_from)
    log_norm_h = F.softplus(a).sum(-1, keepdim=True)
    parts = []
    for h in _hidden_chunks(rbm.n_hidden, v_to.shape[0], a.dtype):
        log_p_h = a @ h.T - log_norm_h

        # log p(v_to | h) = v_to.s - sum_i softplus(s_i) with s = b + W^T h.
        s = rbm.visible_logits(h)
        log_p_v = v_to @ s.T - F.softplus(s).sum(-1)

        parts.append(torch.logsumexp(log_p_h + log_p_v, dim=1))
    return torch.logsumexp(torch.stack(parts), 0)


def sample_exact(rbm: BernoulliRBM, n: int, generator: torch.Generator):
    """Draw n independent samples v ~ p_theta(v), with no Markov chain.

    The hidden state is drawn from its exact marginal p(h), proportional to
    exp(c.h) prod_i (1 + exp(b_i + (W^T h)_i)), by enumerating the 2^n_hidden
    states, and then v ~ p(v | h). Returns the visible samples and their hidden
    states, both shape (n, .) and detached.
    """
    check_int_at_least("n", n, 1)
    check_enumerable("n_hidden", rbm.n_hidden)
    with torch.no_grad():
        h_all = _all_states(rbm.n_hidden, rbm.weight.dtype)
        log_weights = log_marginal_hidden(rbm, h_all)
        probabilities = torch.softmax(log_weights, 0)
        index = torch.multinomial(
            probabilities, n, replacement=True, generator=generator
        )
        h = h_all[index]
        return rbm.sample_visible(h, generator), h


class BlockGibbs:
    """The block Gibbs kernel of an RBM: h ~ p(h|v), then v' ~ p(v'|h).

    Its transition probability q(v'|v) = sum_h p(h|v) p(v'|h) satisfies detailed
    balance with respect to the RBM's marginal p(v), so every weight
    w(v, v') = q(v|v') p(v') / (q(v'|v) p(v)) is 1 when the model is the kernel's RBM.
    ``log_q`` is exact, by enumerating the hidden states, and uses the RBM's current
    parameters detached: the kernel is held fixed while the model is updated.
    """

    needs_score = False

    def __init__(self, rbm: BernoulliRBM):
        if not isinstance(rbm, BernoulliRBM):
            raise ValueError(f"rbm must be a BernoulliRBM, got {type(rbm).__name__}")
        check_enumerable("rbm.n_hidden", rbm.n_hidden)
        self.rbm = rbm

    def log_q(self, state_to: State, state_from: State) -> torch.Tensor:
        """Return log q(v_to | v_from) with the parameters held fixed."""
        with torch.no_grad():
            return log_transition(self.rbm, state_to.x, state_from.x)

    def step(self, state: State, log_prob_fn, generator: torch.Generator):
        """Draw one Gibbs step of the kernel's RBM; return the new state and its log w.

        ``log_prob_fn`` supplies log p_theta for the new state and the weight, so
        log w is 0 up to rounding when it is the kernel's RBM itself.
        """
        v_new = self.rbm.gibbs_step(state.x, generator)
        new = evaluate(log_prob_fn, v_new, with_score=False)
        log_w = log_weight(self, state, new)
        nonfinite = int((~torch.isfinite(log_w)).sum())
        return new, StepInfo(log_w=log_w, nonfinite=nonfinite)


def cd_loss(rbm: BernoulliRBM, v_data: torch.Tensor, v_model: torch.Tensor):
    """Return mean F(v_data) - mean F(v_model), whose gradient descent is the CD update.

    Its negative gradient is the classical update: the data average of
    sigmoid(c + W v) v^T minus the same average over the contrastive samples, and
    likewise for the biases. ``v_model`` is treated as a constant.
    """
    return rbm.free_energy(v_data).mean() - rbm.free_energy(v_model.detach()).mean()


@dataclass
class RBMHistory:
    """Exact log-likelihoods (nats per image) after the epochs listed in ``epoch``.

    Entry 0 is before the first update.

    ``seconds`` is the wall time of the training epochs including the evaluations.
    ``chains`` is the final state of the persistent chains, or None for CD.
    """

    epoch: list = field(default_factory=list)
    train_log_likelihood: list = field(default_factory=list)
    test_log_likelihood: list = field(default_factory=list)
    seconds: float = 0.0
    chains: Optional[torch.Tensor] = None


def check_training_parameters(method, k, epochs, batch_size, learning_rate, n_hidden):
    """Raise ValueError unless the settings of :func:`train_rbm` are valid.

    n_hidden must be at most ``MAX_ENUMERATED_HIDDEN`` because every epoch ends with
    the exact log-likelihood.
    """
    check_choice("method", method, TRAIN_METHODS)
    check_int_at_least("k", k, 1)
    check_int_at_least("epochs", epochs, 0)
    check_int_at_least("batch_size", batch_size, 1)
    check_positive("learning_rate", learning_rate)
    check_int_at_least("n_hidden", n_hidden, 1)
    check_enumerable("n_hidden", n_hidden)


def train_rbm(
    rbm: BernoulliRBM,
    train_v: torch.Tensor,
    test_v: torch.Tensor,
    *,
    method: str,
    k: int,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    generator: torch.Generator,
    evaluate_every: int = 1,
) -> RBMHistory:
    """Train ``rbm`` with CD-k or persistent CD-k by plain SGD and return the history.

    Each epoch visits the training images once in a random order, in mini-batches
    of ``batch_size``. ``method="cd"`` starts the k Gibbs steps at the mini-batch.
    ``method="pcd"`` keeps ``batch_size`` chains between updates, starting from
    v ~ p(v | h = 0) as scikit-learn's ``BernoulliRBM`` does. The exact
    log-likelihood of both sets is recorded before training and after each epoch,
    which needs n_hidden <= ``MAX_ENUMERATED_HIDDEN``. With ``evaluate_every`` > 1 it
    is recorded only after every ``evaluate_every``-th epoch and after the last.
    """
    check_training_parameters(
        method, k, epochs, batch_size, learning_rate, rbm.n_hidden
    )
    check_int_at_least("evaluate_every", evaluate_every, 1)
    check_binary("train_v", train_v, rbm.n_visible, rbm.weight.dtype)
    check_binary("test_v", test_v, rbm.n_visible, rbm.weight.dtype)

    optimizer = torch.optim.SGD(rbm.parameters(), lr=learning_rate)
    chains = None
    if method == "pcd":
        hidden_zero = torch.zeros(batch_size, rbm.n_hidden, dtype=train_v.dtype)
        with torch.no_grad():
            chains = rbm.sample_visible(hidden_zero, generator)

    history = RBMHistory()
    _record(history, 0, rbm, train_v, test_v)
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        order = torch.randperm(train_v.shape[0], generator=generator)
        for batch in order.split(batch_size):
            v_data = train_v[batch]
            v_model = v_data if chains is None else chains
            for _ in range(k):
                v_model = rbm.gibbs_step(v_model, generator)
            if chains is not None:
                chains = v_model

            optimizer.zero_grad()
            cd_loss(rbm, v_data, v_model).backward()
            optimizer.step()
        if epoch % evaluate_every == 0 or epoch == epochs:
            _record(history, epoch, rbm, train_v, test_v)
    history.seconds = time.perf_counter() - start
    history.chains = chains
    return history


def _record(history: RBMHistory, epoch: int, rbm, train_v, test_v) -> None:
    with torch.no_grad():
        log_z = log_partition(rbm)
        history.epoch.append(epoch)
        history.train_log_likelihood.append((rbm(train_v).mean() - log_z).item())
        history.test_log_likelihood.append((rbm(test_v).mean() - log_z).item())


@dataclass
class DigitsSplit:
    """Binarised 8x8 digits: images as rows of 64 values in {0, 1}, and their labels."""

    train: torch.Tensor
    test: torch.Tensor
    train_labels: torch.Tensor
    test_labels: torch.Tensor
    threshold: int


def load_binary_digits(
    threshold: int = 8,
    test_fraction: float = 0.25,
    seed: int = 0,
    dtype=torch.float64,
) -> DigitsSplit:
    """Load scikit-learn's bundled 8x8 digits, binarised, with a seeded split.

    The 1797 images have pixel values 0..16, and a pixel becomes 1 when it is at
    least ``threshold``. A random permutation from
    ``torch.Generator().manual_seed(seed)`` puts round(test_fraction * 1797) images
    in the test set and the rest in the training set. The data ship with
    scikit-learn, so nothing is downloaded.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, int):
        raise ValueError(
            f"threshold must be an integer from 1 to 16, got {threshold!r}"
        )
    if not 1 <= threshold <= 16:
        raise ValueError(
            f"threshold must be an integer from 1 to 16, got {threshold!r}"
        )
    check_positive("test_fraction", test_fraction)
    if test_fraction >= 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    check_int_at_least("seed", seed, 0)

    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = torch.as_tensor(digits.data)
    labels = torch.as_tensor(digits.target)
    images = (pixels >= threshold).to(dtype)

    n = images.shape[0]
    n_test = round(test_fraction * n)
    if not 1 <= n_test < n:
        raise ValueError(
            f"test_fraction={test_fraction!r} leaves {n_test} of {n} images for "
            "testing; it must leave at least one image in each set"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    test_index, train_index = order[:n_test], order[n_test:]
    return DigitsSplit(
        train=images[train_index],
        test=images[test_index],
        train_labels=labels[train_index],
        test_labels=labels[test_index],
        threshold=threshold,
    )


def independent_bernoulli_log_likelihood(train_v, v, pseudocount: float = 1.0):
    """Return the mean log-likelihood of ``v`` under independent pixels fit to train_v.

    Each pixel's probability is (count of 1s + pseudocount) / (n + 2 pseudocount),
    a baseline with no hidden units (an RBM with W = 0).
    """
    if not isinstance(train_v, torch.Tensor) or train_v.ndim != 2:
        raise ValueError("train_v must be a tensor of shape (n, n_visible)")
    check_binary("train_v", train_v, train_v.shape[1])
    check_binary("v", v, train_v.shape[1])
    check_positive("pseudocount", pseudocount)
    n = train_v.shape[0]
    probability = (train_v.sum(0) + pseudocount) / (n + 2 * pseudocount)
    log_p = v @ probability.log() + (1 - v) @ (1 - probability).log()
    return log_p.mean()


__all__ = [
    "BernoulliRBM",
    "BlockGibbs",
    "DigitsSplit",
    "MAX_ENUMERATED_HIDDEN",
    "RBMHistory",
    "binary_states",
    "cd_loss",
    "check_binary",
    "check_enumerable",
    "check_training_parameters",
    "exact_log_likelihood",
    "independent_bernoulli_log_likelihood",
    "load_binary_digits",
    "log_partition",
    "log_transition",
    "log_marginal_hidden",
    "sample_exact",
    "train_rbm",
]
