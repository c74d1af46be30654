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
import torch.nn.functional as F

from ._validation import check_choice, check_int_at_least, check_positive
from .classifiers import TimeReversalClassifier
from .kernels import MALA, GaussianNoise, Langevin, State, run_chain

METHODS = ("nce", "cnce", "cd", "cd_mh", "adjusted_cd")


@dataclass
class EstimatorOutput:
    """What one estimator call returns.

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
        loss = F.softplus(-logit_data).mean() + F.softplus(logit_ref).mean()
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
        chain = run_chain(self.kernel, model, x, 1, generator)
        x_tilde = chain.xk
        x_state, x_tilde_state = _point(x), _point(x_tilde)
        log_q_ratio = self.kernel.log_q(x_state, x_tilde_state)
        log_q_ratio = log_q_ratio - self.kernel.log_q(x_tilde_state, x_state)
        log_w = log_q_ratio + model(x_tilde) - model(x)
        log_w_detached = log_w.detach()
        return EstimatorOutput(
            loss=F.softplus(log_w).mean(),
            alpha=alpha_from_log_w(log_w_detached),
            log_w=log_w_detached,
            x_tilde=x_tilde,
            game_loss=F.softplus(log_w_detached).mean(),
            nonfinite=chain.nonfinite,
        )


class ContrastiveDivergence:
    """CD-k with a Langevin-type kernel started at the data.

    ``weighting="none"`` gives the classical update, eq. 3 of the paper:
    mean(grad log p(x_k) - grad log p(x_0)). ``weighting="alpha"`` gives adjusted
    CD (the paper's Algorithm 2), which weights each chain by its alpha from eq. 19.
    The loss's gradient with respect to the parameters is the update itself; the
    chain, and therefore the kernel, is held fixed.
    """

    def __init__(self, kernel, k: int, weighting: str = "none"):
        self.kernel = kernel
        self.k = check_int_at_least("k", k, 1)
        self.weighting = check_choice("weighting", weighting, ("none", "alpha"))

    def __call__(self, model, x, generator) -> EstimatorOutput:
        chain = run_chain(self.kernel, model, x, self.k, generator)
        log_p = model(torch.cat([x, chain.xk]))
        log_p_x, log_p_xk = log_p[: x.shape[0]], log_p[x.shape[0] :]
        difference = log_p_xk - log_p_x
        alpha = alpha_from_log_w(chain.log_w)
        if self.weighting == "alpha":
            loss = (alpha * difference).mean()
        else:
            loss = difference.mean()
        return EstimatorOutput(
            loss=loss,
            alpha=alpha,
            log_w=chain.log_w,
            x_tilde=chain.xk,
            game_loss=F.softplus(chain.log_w).mean(),
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
    return F.softplus(TimeReversalClassifier(model, kernel).log_w(chain.path)).mean()


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


def _point(x: torch.Tensor) -> State:
    """Wrap ``x`` as a state for kernels whose log q ignores log p and the score."""
    return State(x=x, log_p=torch.zeros(x.shape[0], dtype=x.dtype, device=x.device))
