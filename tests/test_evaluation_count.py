"""How often a chain and a CD update evaluate the model and its input gradient.

A chain of k Langevin or MALA steps needs log p and grad_x log p at its k + 1
states: the values at each state serve both the next proposal and the step's
weight or acceptance. A CD update then reuses the passes at x_0 and x_k for its
loss, so a whole training step runs k + 1 forward passes.
"""

import pytest
import torch

import cdlib.backprop
from cdlib.estimators import ContrastiveDivergence
from cdlib.kernels import MALA, Langevin, run_chain
from cdlib.models import EnergyMLP


class _CountBackward(torch.autograd.Function):
    """Identity on the network's output that counts the backward passes through it."""

    @staticmethod
    def forward(ctx, log_p, counter):
        ctx.counter = counter
        return log_p.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.counter.backward_calls += 1
        return grad, None


class CountingEnergy(torch.nn.Module):
    """The paper's network behind a wrapper that records every forward and backward pass."""

    def __init__(self, width=8, depth=4):
        super().__init__()
        self.model = EnergyMLP(width=width, depth=depth).double()
        self.forward_calls = 0
        self.backward_calls = 0
        self.points = []

    def forward(self, x):
        self.forward_calls += 1
        self.points.append(x.detach().clone())
        return _CountBackward.apply(self.model(x), self)


@pytest.mark.parametrize("kernel", [Langevin(0.3), MALA(0.3)])
@pytest.mark.parametrize("k", [1, 5, 10])
def test_chain_runs_one_pass_per_state(kernel, k, generator):
    energy = CountingEnergy()
    x0 = torch.randn(6, 10, generator=generator, dtype=torch.float64)
    chain = run_chain(kernel, energy, x0, k, generator, keep_path=True)
    assert energy.forward_calls == k + 1
    assert energy.backward_calls == k + 1
    assert chain.evaluations == k + 1
    assert torch.equal(energy.points[0], x0)


@pytest.mark.parametrize("k", [1, 5, 10])
def test_langevin_chain_evaluates_each_state_once(k, generator):
    """The evaluated points are the chain's states x_0, ..., x_k, in order."""
    energy = CountingEnergy()
    x0 = torch.randn(6, 10, generator=generator, dtype=torch.float64)
    chain = run_chain(Langevin(0.3), energy, x0, k, generator, keep_path=True)
    assert torch.equal(torch.stack(energy.points), chain.path)


@pytest.mark.parametrize("weighting", ["none", "alpha"])
@pytest.mark.parametrize("k", [1, 5, 10])
def test_cd_step_reuses_chain_passes(weighting, k, generator):
    """Estimator and backward together: k + 1 forward passes, k + 1 input
    gradients, and one parameter backward pass through each of x_0 and x_k."""
    energy = CountingEnergy()
    x0 = torch.randn(6, 10, generator=generator, dtype=torch.float64)
    out = ContrastiveDivergence(Langevin(0.3), k, weighting=weighting)(
        energy, x0, generator
    )
    out.loss.backward()
    assert energy.forward_calls == k + 1
    assert energy.backward_calls == k + 3


@pytest.mark.parametrize("weighting", ["none", "alpha"])
@pytest.mark.parametrize("k", [1, 5, 10])
def test_cd_step_on_energy_mlp_runs_k_plus_one_passes(
    weighting, k, generator, monkeypatch
):
    """On an EnergyMLP every pass is the hand-written one, and the loss needs no
    forward pass of its own."""
    calls = []
    original = cdlib.backprop.forward_backward

    def counting(model, x, keep_cache=False):
        calls.append(keep_cache)
        return original(model, x, keep_cache)

    def forbidden(self, x):
        raise AssertionError("the CD step called EnergyMLP.forward")

    monkeypatch.setattr(cdlib.backprop, "forward_backward", counting)
    model = EnergyMLP(width=8, depth=4).double()
    monkeypatch.setattr(EnergyMLP, "forward", forbidden)
    x0 = torch.randn(6, 10, generator=generator, dtype=torch.float64)
    out = ContrastiveDivergence(Langevin(0.3), k, weighting=weighting)(
        model, x0, generator
    )
    out.loss.backward()
    assert len(calls) == k + 1
    # Only the passes at x_0 and x_k keep their layer caches.
    assert calls == [True] + [False] * (k - 1) + [True]
    assert all(p.grad is not None for p in model.parameters())
