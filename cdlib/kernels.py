"""MCMC transition rules q(x'|x) with their log transition densities.

A kernel step takes a :class:`State` (a point with its log-density and score, both
already evaluated) and an explicit ``torch.Generator``, and returns the next state
with a :class:`StepInfo`. The score at each state is computed once and serves both
the next proposal and the weight of the step, so a chain of k steps evaluates the
model k + 1 times.

All chain computations are detached from the model's parameters: the kernel is held
fixed while the model is updated, as in the paper's adversarial reading of CD.

Equation, algorithm and observation numbers are those of Yair and Michaeli,
"Contrastive Divergence Learning is a Time Reversal Adversarial Game", ICLR 2021.
"""

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import backprop
from ._validation import check_int_at_least, check_positive

LogProbFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class State:
    """A batch of points with log p_theta and, if the kernel needs it, its score."""

    x: torch.Tensor
    log_p: torch.Tensor
    score: Optional[torch.Tensor] = None


@dataclass
class StepInfo:
    """Diagnostics of one transition for each chain.

    ``log_w`` is log w(x, x') = log q(x|x') + log p(x') - log q(x'|x) - log p(x) for
    the transition actually taken, the per-step factor of the chain's weight.
    ``accepted`` is None for kernels without a rejection step. ``nonfinite`` counts
    proposals whose log-density, score or acceptance ratio was NaN or infinite; a
    kernel with rejection rejects them, one without passes them on.
    """

    log_w: torch.Tensor
    accepted: Optional[torch.Tensor] = None
    nonfinite: int = 0


def evaluate(log_prob_fn: LogProbFn, x: torch.Tensor, with_score: bool) -> State:
    """Evaluate log p_theta and optionally its score at ``x``, detached from theta.

    The score comes from ``torch.autograd.grad`` with respect to ``x`` only, so no
    gradient accumulates in the model's parameters. Two cases take a faster route
    to the same values: an :class:`EnergyMLP` runs the hand-written pass of
    :mod:`cdlib.backprop`, and a ``log_prob_fn`` with a method
    ``log_prob_and_score(x)`` returning ``(log_p, score)`` is asked for both.
    """
    x = x.detach()
    if not with_score:
        with torch.no_grad():
            return State(x, log_prob_fn(x))
    log_prob_and_score = getattr(log_prob_fn, "log_prob_and_score", None)
    if log_prob_and_score is not None:
        log_p, score = log_prob_and_score(x)
        return State(x, log_p.detach(), score.detach())
    if backprop.supports(log_prob_fn, x):
        result = backprop.forward_backward(log_prob_fn, x)
        return State(x, result.log_p, result.score)
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        log_p = log_prob_fn(x_in)
        (score,) = torch.autograd.grad(log_p.sum(), x_in)
    return State(x, log_p.detach(), score)


def standard_normal_like(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Draw N(0, I) noise of x's shape, dtype and device from ``generator``."""
    z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=generator.device)
    return z.to(x.device)


def uniform_like(shape, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Draw Uniform(0, 1) values of ``shape`` with x's dtype and device."""
    u = torch.rand(shape, generator=generator, dtype=x.dtype, device=generator.device)
    return u.to(x.device)


def gaussian_log_density(
    x: torch.Tensor, mean: torch.Tensor, std: float
) -> torch.Tensor:
    """Return log N(x; mean, std^2 I) summed over the last axis."""
    dim = x.shape[-1]
    sq = (x - mean).square().sum(-1)
    return -0.5 * sq / std**2 - dim * (math.log(std) + 0.5 * math.log(2 * math.pi))


class GaussianNoise:
    """The fixed CNCE kernel x' = x + std * z, z ~ N(0, I), whatever the model."""

    needs_score = False

    def __init__(self, std: float):
        self.std = check_positive("std", std)

    def log_q(self, state_to: State, state_from: State) -> torch.Tensor:
        """Return log q(x_to | x_from) = log N(x_to; x_from, std^2 I)."""
        return gaussian_log_density(state_to.x, state_from.x, self.std)

    def step(self, state: State, log_prob_fn: LogProbFn, generator: torch.Generator):
        x_new = state.x + self.std * standard_normal_like(state.x, generator)
        new = evaluate(log_prob_fn, x_new, with_score=False)
        log_w = log_weight(self, state, new)
        nonfinite = int((~torch.isfinite(log_w)).sum())
        return new, StepInfo(log_w=log_w, nonfinite=nonfinite)


class Langevin:
    """Unadjusted Langevin: x' = x + (eps^2 / 2) grad log p(x) + eps * z.

    ``step_size`` is eps, the factor on the Gaussian noise, as in the paper. The
    chain satisfies detailed balance only as eps -> 0.
    """

    needs_score = True

    def __init__(self, step_size: float):
        self.step_size = check_positive("step_size", step_size)

    def proposal_mean(self, state: State) -> torch.Tensor:
        return torch.add(state.x, state.score, alpha=0.5 * self.step_size**2)

    def proposal_log_q(self, state_to: State, state_from: State) -> torch.Tensor:
        """Return log N(x_to; x_from + (eps^2 / 2) score(x_from), eps^2 I)."""
        mean = self.proposal_mean(state_from)
        return gaussian_log_density(state_to.x, mean, self.step_size)

    def log_q(self, state_to: State, state_from: State) -> torch.Tensor:
        """Return the log transition density, here the proposal's."""
        return self.proposal_log_q(state_to, state_from)

    def propose(self, state: State, log_prob_fn, generator) -> State:
        noise = standard_normal_like(state.x, generator)
        x_new = self.proposal_mean(state) + self.step_size * noise
        return evaluate(log_prob_fn, x_new, with_score=True)

    def proposal_log_weight(self, state_from: State, state_to: State) -> torch.Tensor:
        """Return log w(x, x') of eq. 8 for the Langevin proposal.

        The two Gaussian densities share the std eps, so their normalising
        constants cancel, leaving
        (|x' - mean(x)|^2 - |x - mean(x')|^2) / (2 eps^2) + log p(x') - log p(x).
        """
        forward = state_to.x - self.proposal_mean(state_from)
        backward = state_from.x - self.proposal_mean(state_to)
        squares = forward.square().sum(-1) - backward.square().sum(-1)
        return squares / (2.0 * self.step_size**2) + (state_to.log_p - state_from.log_p)

    def step(self, state: State, log_prob_fn: LogProbFn, generator: torch.Generator):
        new = self.propose(state, log_prob_fn, generator)
        log_w = self.proposal_log_weight(state, new)
        return new, StepInfo(log_w=log_w, nonfinite=_count_nonfinite(log_w))


class MALA(Langevin):
    """Langevin proposals with Metropolis-Hastings rejection.

    A proposal x' is accepted with probability A(x, x') = min(1, w(x, x')), the
    paper's eq. 20; a NaN or infinite ratio counts as a rejection. The weight of the
    realised transition is w(x, x') * A(x', x) / A(x, x') when accepted and 1 when
    rejected, which is 1 in exact arithmetic because the MH kernel satisfies
    detailed balance.
    """

    def log_q(self, state_to: State, state_from: State) -> torch.Tensor:
        """Return the log density of an accepted move, log q_prop(x_to|x_from) A(x_from, x_to).

        The kernel also has a point mass at x_from (a rejection). For such a stay the
        forward and backward terms of a weight are equal and cancel, whatever this
        returns.
        """
        log_w = _log_weight_with(self.proposal_log_q, state_from, state_to)
        return self.proposal_log_q(state_to, state_from) + torch.clamp(log_w, max=0.0)

    def step(self, state: State, log_prob_fn: LogProbFn, generator: torch.Generator):
        proposal = self.propose(state, log_prob_fn, generator)
        log_w_proposal = self.proposal_log_weight(state, proposal)
        finite = torch.isfinite(log_w_proposal)
        finite &= torch.isfinite(proposal.score).all(-1)
        log_w_proposal = torch.where(finite, log_w_proposal, -torch.inf)

        log_accept = torch.clamp(log_w_proposal, max=0.0)
        log_u = uniform_like(log_accept.shape, state.x, generator).log()
        accepted = (log_u < log_accept) & finite

        log_accept_reverse = torch.clamp(-log_w_proposal, max=0.0)
        log_w_taken = log_w_proposal + log_accept_reverse - log_accept
        log_w = torch.where(accepted, log_w_taken, torch.zeros_like(log_w_taken))

        keep = accepted.unsqueeze(-1)
        new = State(
            x=torch.where(keep, proposal.x, state.x),
            log_p=torch.where(accepted, proposal.log_p, state.log_p),
            score=torch.where(keep, proposal.score, state.score),
        )
        info = StepInfo(log_w=log_w, accepted=accepted, nonfinite=int((~finite).sum()))
        return new, info


def _count_nonfinite(values: torch.Tensor) -> int:
    """Return how many entries are NaN or infinite, checking all at once first."""
    finite = torch.isfinite(values)
    return 0 if bool(finite.all()) else int((~finite).sum())


def log_weight(kernel, state_from: State, state_to: State) -> torch.Tensor:
    """Return log w(x, x') = log q(x|x') p(x') - log q(x'|x) p(x), the paper's eq. 8."""
    return _log_weight_with(kernel.log_q, state_from, state_to)


def _log_weight_with(log_q, state_from: State, state_to: State) -> torch.Tensor:
    log_q_backward = log_q(state_from, state_to)
    log_q_forward = log_q(state_to, state_from)
    return log_q_backward - log_q_forward + state_to.log_p - state_from.log_p


@dataclass
class Chain:
    """A batch of chains x^(0) -> ... -> x^(k) and their diagnostics.

    ``log_w`` is the log of the chain's weight, the product over steps in the paper's
    eq. 17. ``path`` contains every state, shape (k + 1, n, dim), when requested.
    ``acceptance`` is the fraction of accepted steps per chain, or None.
    """

    x0: torch.Tensor
    xk: torch.Tensor
    log_w: torch.Tensor
    log_w_steps: torch.Tensor
    acceptance: Optional[torch.Tensor]
    nonfinite: int
    evaluations: int
    path: Optional[torch.Tensor] = None


def run_chain(
    kernel,
    log_prob_fn: LogProbFn,
    x0: torch.Tensor,
    k: int,
    generator: torch.Generator,
    keep_path: bool = False,
) -> Chain:
    """Run ``k`` steps of ``kernel`` from every row of ``x0``, shape (n, dim)."""
    check_int_at_least("k", k, 1)
    if not isinstance(x0, torch.Tensor) or x0.ndim != 2:
        shape = tuple(x0.shape) if isinstance(x0, torch.Tensor) else type(x0).__name__
        raise ValueError(f"x0 must be a tensor of shape (n, dim), got {shape}")
    if not isinstance(generator, torch.Generator):
        raise ValueError(
            f"generator must be a torch.Generator, got {type(generator).__name__}"
        )
    state = evaluate(log_prob_fn, x0, with_score=kernel.needs_score)
    evaluations = 1
    path = [state.x] if keep_path else None
    log_w_steps, accepted, nonfinite = [], [], 0
    for _ in range(k):
        state, info = kernel.step(state, log_prob_fn, generator)
        evaluations += 1
        log_w_steps.append(info.log_w)
        nonfinite += info.nonfinite
        if info.accepted is not None:
            accepted.append(info.accepted)
        if keep_path:
            path.append(state.x)
    log_w_steps = torch.stack(log_w_steps)
    acceptance = None
    if accepted:
        acceptance = torch.stack(accepted).to(x0.dtype).mean(0)
    return Chain(
        x0=x0.detach(),
        xk=state.x,
        log_w=log_w_steps.sum(0),
        log_w_steps=log_w_steps,
        acceptance=acceptance,
        nonfinite=nonfinite,
        evaluations=evaluations,
        path=torch.stack(path) if keep_path else None,
    )
