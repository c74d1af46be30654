"""Estimators: surrogate losses whose autograd gradient is the paper's update.

Each estimator is called as ``estimator(model, x, generator)`` on a data batch ``x``
and returns an :class:`EstimatorOutput`. Minimising ``loss`` with a gradient method
applies the estimator's update. The weights ``alpha`` and the chain diagnostics are
detached, so they never carry gradient.

Equation, algorithm and observation numbers are those of Yair and Michaeli,
"Contrastive Divergence Learning is a Time Reversal Adversarial Game", ICLR 2021.
"""

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from ._validation import check_choice, check_int_at_least, check_positive
from .classifiers import TimeReversalClassifier
from . import backprop
from .kernels import (
    MALA,
    GaussianNoise,
    Langevin,
    State,
    run_chain,
    standard_normal_like,
)

METHODS = ("nce", "cnce", "cd", "cd_mh", "adjusted_cd")


@dataclass
class EstimatorOutput:
    """The result of one estimator call.

    ``loss`` is the scalar to minimise. ``alpha`` is the weight of each data point
    in the update, ``log_w`` the log-weight it comes from (``alpha = sigmoid(log_w)``),
    ``x_tilde`` the contrastive samples, and ``game_loss`` the value of the
    time-reversal classification loss, mean softplus(log_w), for every method but NCE.
    """

    loss: torch.Tensor
    alpha: torch.Tensor
    log_w: torch.Tensor
    x_tilde: torch.Tensor
    game_loss: Optional[torch.Tensor] = None
    acceptance: Optional[torch.Tensor] = None
    nonfinite: int = 0
    extra: dict = field(default_factory=dict)


def softplus(x: torch.Tensor) -> torch.Tensor:
    """Return log(1 + exp(x)) with the exact gradient sigmoid(x) for every x.

    ``torch.nn.functional.softplus`` returns x itself above its threshold of 20, whose
    gradient 1 differs from sigmoid(x) by up to 2e-9, enough to break the 1e-10
    gradient identities.
    """
    return torch.logaddexp(torch.zeros_like(x), x)


def alpha_from_log_w(log_w: torch.Tensor) -> torch.Tensor:
    """Return alpha = (1 + 1/w)^-1 = sigmoid(log w), the paper's eqs. 11 and 19.

    The sigmoid of the log-ratio is finite for every finite ``log_w``, so weights
    of 1e4 nats either way give alpha of exactly 1 or 0, never NaN.
    """
    return torch.sigmoid(log_w)


class GaussianReference:
    """An isotropic Gaussian N(mean, std^2 I) as the NCE reference density."""

    def __init__(self, dim: int, std: float, mean: Optional[torch.Tensor] = None):
        self.dim = check_int_at_least("dim", dim, 1)
        self.std = check_positive("std", std)
        self.mean = torch.zeros(dim) if mean is None else mean.detach()

    def sample(self, n, generator, dtype=torch.float32, device="cpu") -> torch.Tensor:
        z = torch.randn(
            n, self.dim, generator=generator, dtype=dtype, device=generator.device
        )
        return (self.mean.to(z) + self.std * z).to(device)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        dim = x.shape[-1]
        sq = (x - self.mean.to(x)).square().sum(-1)
        return -0.5 * sq / self.std**2 - dim * math.log(self.std * math.sqrt(2 * math.pi))


class NCE:
    """Noise-contrastive estimation with one reference sample per data point.

    The classifier is D(x) = sigmoid(log p_theta(x) - log p_ref(x)) (the paper's
    eq. 5), trained with the binary cross-entropy. The model must carry its own
    normalisation, for example through an output bias. ``alpha`` is 1 - D(x) on the
    data points, the factor on grad log p_theta(x) in the gradient; the reference
    points' factors D(y) are in ``extra["reference_weight"]``.
    """

    def __init__(self, reference):
        self.reference = reference

    def __call__(self, model, x, generator) -> EstimatorOutput:
        y = self.reference.sample(x.shape[0], generator, dtype=x.dtype, device=x.device)
        logit_data = model(x) - self.reference.log_prob(x)
        logit_ref = model(y) - self.reference.log_prob(y)
        loss = softplus(-logit_data).mean() + softplus(logit_ref).mean()
        log_w = (-logit_data).detach()
        return EstimatorOutput(
            loss=loss,
            alpha=alpha_from_log_w(log_w),
            log_w=log_w,
            x_tilde=y,
            extra={"reference_weight": torch.sigmoid(logit_ref.detach())},
        )


class CNCE:
    """Conditional NCE with the fixed Gaussian kernel x_tilde = x + std * z.

    The loss is the BCE of the pair classifier D(x, x_tilde) = (1 + w)^-1 (the paper's
    eqs. 7-9), which is mean softplus(log w). Its gradient is the alpha-weighted
    update of Observation 1, eq. 10.
    """

    def __init__(self, std: float):
        self.kernel = GaussianNoise(std)

    def __call__(self, model, x, generator) -> EstimatorOutput:
        # The same draw as one step of run_chain(self.kernel, ...), without the
        # chain's own evaluations of log p: the loss below needs both with gradient.
        x_tilde = x.detach() + self.kernel.std * standard_normal_like(x, generator)
        x_state, x_tilde_state = _point(x), _point(x_tilde)
        log_q_ratio = self.kernel.log_q(x_state, x_tilde_state)
        log_q_ratio = log_q_ratio - self.kernel.log_q(x_tilde_state, x_state)
        log_p = model(torch.cat([x, x_tilde]))
        log_w = log_q_ratio + log_p[x.shape[0] :] - log_p[: x.shape[0]]
        log_w_detached = log_w.detach()
        return EstimatorOutput(
            loss=softplus(log_w).mean(),
            alpha=alpha_from_log_w(log_w_detached),
            log_w=log_w_detached,
            x_tilde=x_tilde,
            game_loss=softplus(log_w_detached).mean(),
            nonfinite=int((~torch.isfinite(log_w_detached)).sum()),
        )


class ContrastiveDivergence:
    """CD-k with a Langevin-type kernel started at the data.

    ``weighting="none"`` gives the classical update, eq. 3 of the paper:
    mean(grad log p(x_k) - grad log p(x_0)). ``weighting="alpha"`` gives adjusted
    CD (the paper's Algorithm 2), which weights each chain by its alpha from eq. 19.
    The loss's gradient with respect to the parameters is the update itself; the
    chain, and therefore the kernel, is held fixed.

    The loss reuses the chain's own evaluations of log p_theta at x_0 and x_k, so a
    call runs k + 1 passes through the model, each a forward pass and an input
    gradient, plus the backward pass for the parameters. With a rejecting kernel,
    the rows whose last proposal was rejected get one more pass.
    """

    def __init__(self, kernel, k: int, weighting: str = "none"):
        self.kernel = kernel
        self.k = check_int_at_least("k", k, 1)
        self.weighting = check_choice("weighting", weighting, ("none", "alpha"))

    def __call__(self, model, x, generator) -> EstimatorOutput:
        recorder = _EndpointRecorder(model, self.k)
        chain = run_chain(self.kernel, recorder, x, self.k, generator)
        alpha = alpha_from_log_w(chain.log_w)
        weight = alpha if self.weighting == "alpha" else None
        if recorder.first is None:
            loss = _endpoint_loss_from_forward(model, x, chain.xk, weight)
        else:
            loss = recorder.endpoint_loss(chain.xk, weight)
        return EstimatorOutput(
            loss=loss,
            alpha=alpha,
            log_w=chain.log_w,
            x_tilde=chain.xk,
            game_loss=softplus(chain.log_w).mean(),
            acceptance=chain.acceptance,
            nonfinite=chain.nonfinite,
        )


def time_reversal_loss(model, chain, kernel) -> torch.Tensor:
    """Return the BCE of the time-reversal classifier on chains shown in order.

    The loss is mean softplus(log w) = -mean log D_theta(x_0, ..., x_k) (eq. 17 with the
    kernel held fixed). By Observation 3 its gradient is the alpha-weighted CD-k update.
    ``chain`` must have been run with ``keep_path=True``.
    """
    if chain.path is None:
        raise ValueError("chain must be run with keep_path=True to score its order")
    return softplus(TimeReversalClassifier(model, kernel).log_w(chain.path)).mean()


def make_estimator(method: str, step_size: float, k: int, dim: int = 10):
    """Build the estimator named ``method`` (one of ``METHODS``).

    ``step_size`` is the reference std for ``nce``, the noise std for ``cnce`` and the
    Langevin step eps for the three CD methods. ``k`` must be 1 for ``nce`` and
    ``cnce``, which contrast each data point with one sample.
    """
    check_choice("method", method, METHODS)
    check_positive("step_size", step_size)
    check_int_at_least("k", k, 1)
    if method in ("nce", "cnce"):
        if k != 1:
            raise ValueError(f"k must be 1 for method {method!r}, got {k!r}")
        if method == "nce":
            return NCE(GaussianReference(dim, step_size))
        return CNCE(step_size)
    if method == "cd":
        return ContrastiveDivergence(Langevin(step_size), k, weighting="none")
    if method == "cd_mh":
        return ContrastiveDivergence(MALA(step_size), k, weighting="none")
    return ContrastiveDivergence(Langevin(step_size), k, weighting="alpha")


def _endpoint_loss_from_forward(model, x0, xk, weight):
    """Return mean(weight * (log p(x_k) - log p(x_0))) from a new forward pass."""
    log_p = model(torch.cat([x0, xk]))
    difference = log_p[x0.shape[0] :] - log_p[: x0.shape[0]]
    return difference.mean() if weight is None else (weight * difference).mean()


@dataclass
class _Evaluation:
    """One pass through the model at ``x``.

    With ``kept`` set, the pass kept what the parameter gradient needs: the layer
    cache of :mod:`cdlib.backprop` in ``cache`` (``log_p`` is then detached), or,
    for other models, the autograd graph behind ``log_p``.
    """

    x: torch.Tensor
    log_p: torch.Tensor
    score: torch.Tensor
    kept: bool
    cache: Optional[backprop.LayerCache] = None


class _EndpointRecorder:
    """A wrapper of the model that keeps the chain passes the CD loss reuses.

    ``run_chain`` evaluates log p_theta and its score once per state, k + 1 times,
    through :meth:`log_prob_and_score`. The recorder keeps the first pass, at x_0,
    and the (k + 1)-th, at the last proposal, so that the loss at x_0 and x_k needs
    no new forward pass. Passes in between keep nothing: holding their caches
    would only cost memory. For an :class:`EnergyMLP` the passes are those of
    :mod:`cdlib.backprop`; any other model keeps its autograd graph.
    """

    def __init__(self, model, k: int):
        self.model = model
        self.k = k
        self.evaluations = 0
        self.first: Optional[_Evaluation] = None
        self.last: Optional[_Evaluation] = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def log_prob_and_score(self, x: torch.Tensor):
        keep = self.evaluations in (0, self.k)
        evaluation = self._evaluate(x, keep)
        self.evaluations += 1
        if self.first is None:
            self.first = evaluation
        self.last = evaluation
        return evaluation.log_p.detach(), evaluation.score

    def _evaluate(self, x: torch.Tensor, keep: bool) -> _Evaluation:
        if backprop.supports(self.model, x):
            result = backprop.forward_backward(self.model, x, keep_cache=keep)
            return _Evaluation(x, result.log_p, result.score, keep, result.cache)
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_p = self.model(x_in)
            (score,) = torch.autograd.grad(log_p.sum(), x_in, retain_graph=keep)
        return _Evaluation(x, log_p if keep else log_p.detach(), score, keep)

    def _final(self, xk: torch.Tensor) -> _Evaluation:
        """Return a kept pass at ``xk``, evaluating the rows the last pass missed.

        A chain without rejection ends at its last proposal. After a rejection a
        row ends at an earlier state, whose pass the recorder did not keep.
        """
        last = self.last
        if not last.kept:
            return self._evaluate(xk, keep=True)
        if xk is last.x:
            return last
        same = (xk == last.x) | (xk.isnan() & last.x.isnan())
        missed = (~same.all(-1)).nonzero().squeeze(-1)
        if missed.numel() == 0:
            return last
        rows = self._evaluate(xk[missed], keep=True)
        score = last.score.index_copy(0, missed, rows.score)
        if last.cache is None:
            log_p = last.log_p.index_put((missed,), rows.log_p)
            return _Evaluation(xk, log_p, score, kept=True)
        log_p = last.log_p.index_copy(0, missed, rows.log_p)
        cache = last.cache.index_copy(missed, rows.cache)
        return _Evaluation(xk, log_p, score, kept=True, cache=cache)

    def endpoint_loss(self, xk: torch.Tensor, weight: Optional[torch.Tensor]):
        """Return mean(weight * (log p(x_k) - log p(x_0))), weight 1 if None."""
        first, final = self.first, self._final(xk)
        difference = final.log_p - first.log_p
        loss = difference.mean() if weight is None else (weight * difference).mean()
        if first.cache is None:
            return loss
        n = xk.shape[0]
        c = torch.full_like(difference, 1.0 / n) if weight is None else weight / n
        terms = [(-c, first.cache), (c, final.cache)]
        return backprop.weighted_log_prob_sum(self.model, loss, terms)


def _point(x: torch.Tensor) -> State:
    """Wrap ``x`` as a state for kernels whose log q ignores log p and the score."""
    return State(x=x, log_p=torch.zeros(x.shape[0], dtype=x.dtype, device=x.device))
