"""Forward and input-gradient pass of :class:`EnergyMLP` written out by hand.

A chain step needs log p_theta(x) and its score grad_x log p_theta(x) at a new state.
Autograd gets the score by recording a graph during the forward pass and walking it
backwards; :func:`forward_backward` computes the same two quantities with the same
matrix products, without recording a graph, so a step pays no autograd bookkeeping.

The pass can also keep, for every linear layer, its input A (n, fan_in) and the
gradient G (n, fan_out) of log p_theta with respect to its output. The parameter
gradient of any weighted sum sum_i c_i log p_theta(x_i) then costs one matrix product
per layer, dW = (c * G)^T A, with no second backward pass:
:func:`weighted_log_prob_sum` returns that sum as a tensor whose autograd gradient
is computed this way. The CD estimators use it at the chain's two ends, whose passes
the chain has already run.
"""

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .models import EnergyMLP


@dataclass
class LayerCache:
    """Layer inputs and output gradients of one pass over n points, for the parameter gradient.

    ``inputs[l]`` is the input of the l-th linear layer (``x`` itself for the first)
    and ``output_grads[l]`` the gradient of sum_i log p_theta(x_i) with respect to
    that layer's output. The output layer's output gradient is 1 for every point and
    is not stored, so ``output_grads`` has one entry fewer than ``inputs``.
    """

    inputs: list
    output_grads: list

    def index_copy(self, index: torch.Tensor, rows: "LayerCache") -> "LayerCache":
        """Return a copy whose rows ``index`` are replaced by the rows of ``rows``."""
        return LayerCache(
            inputs=[
                a.index_copy(0, index, b) for a, b in zip(self.inputs, rows.inputs)
            ],
            output_grads=[
                g.index_copy(0, index, h)
                for g, h in zip(self.output_grads, rows.output_grads)
            ],
        )


@dataclass
class Pass:
    """log p_theta, its score and, if requested, the layer cache at a batch of points."""

    log_p: torch.Tensor
    score: torch.Tensor
    cache: Optional[LayerCache] = None


def supports(model, x: torch.Tensor) -> bool:
    """Return whether :func:`forward_backward` computes exactly ``model``'s forward.

    That holds for an :class:`EnergyMLP` itself (not a subclass, which may change
    ``forward``) with a LeakyReLU activation and no module hooks, evaluated on a
    batch of shape (n, dim) with the parameters' dtype and device.
    """
    if type(model) is not EnergyMLP or not isinstance(model.activation, nn.LeakyReLU):
        return False
    weight = model.input.weight
    if x.ndim != 2 or x.dtype != weight.dtype or x.device != weight.device:
        return False
    return not any(
        module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
        for module in model.modules()
    )


def linear_layers(model: EnergyMLP) -> list:
    """Return the model's linear layers in the order the forward pass applies them."""
    hidden = [layer for block in model.blocks for layer in block]
    return [model.input, *hidden, model.output]


def forward_backward(
    model: EnergyMLP, x: torch.Tensor, keep_cache: bool = False
) -> Pass:
    """Compute log p_theta(x) and grad_x log p_theta(x) without an autograd graph.

    The forward pass repeats :meth:`EnergyMLP.forward` operation by operation. The
    backward pass applies the chain rule to sum_i log p_theta(x_i): through the
    output layer, each LeakyReLU (slope ``negative_slope`` where its input is
    negative), each hidden layer and each skip connection, down to ``x``.
    Call :func:`supports` first.
    """
    slope = model.activation.negative_slope
    with torch.no_grad():
        inputs, log_p = _forward(model, x, slope)
        score, output_grads = _backward(model, inputs, slope)
    cache = LayerCache(inputs, output_grads) if keep_cache else None
    return Pass(log_p=log_p, score=score, cache=cache)


def _forward(model: EnergyMLP, x: torch.Tensor, slope: float):
    """Return the input of each linear layer and log p_theta."""
    inputs = [x]
    h = torch.addmm(model.input.bias, x, model.input.weight.t())
    for block in model.blocks:
        residual = h
        for position, layer in enumerate(block):
            # The block's input is its skip connection, so only later layers may
            # overwrite their input with the activation.
            if position == 0:
                a = nn.functional.leaky_relu(h, slope)
            else:
                a = nn.functional.leaky_relu_(h, slope)
            inputs.append(a)
            h = torch.addmm(layer.bias, a, layer.weight.t())
        h += residual
    a = nn.functional.leaky_relu(h, slope)
    inputs.append(a)
    log_p = torch.addmm(model.output.bias, a, model.output.weight.t()).squeeze(-1)
    return inputs, log_p


def _leaky_relu_backward_(grad: torch.Tensor, result: torch.Tensor, slope: float):
    """Multiply ``grad`` in place by LeakyReLU'(z), read from result = LeakyReLU(z).

    For a positive slope, z and LeakyReLU(z) have the same sign, so the activation's
    output is all the backward pass needs to keep.
    """
    return torch.ops.aten.leaky_relu_backward.grad_input(
        grad, result, slope, True, grad_input=grad
    )


def _backward(model: EnergyMLP, inputs: list, slope: float):
    """Return the score and the gradient at every linear layer's output."""
    g = model.output.weight.expand(inputs[0].shape[0], -1).clone()
    g = _leaky_relu_backward_(g, inputs[-1], slope)
    output_grads = [None] * (len(inputs) - 1)
    layer_index = len(inputs) - 2
    for block in reversed(model.blocks):
        residual_grad = g
        for layer in reversed(block):
            output_grads[layer_index] = g
            g = _leaky_relu_backward_(g @ layer.weight, inputs[layer_index], slope)
            layer_index -= 1
        g += residual_grad
    output_grads[0] = g
    score = g @ model.input.weight
    return score, output_grads


def weighted_log_prob_sum(model: EnergyMLP, value: torch.Tensor, terms: list):
    """Return ``value`` with the parameter gradient of sum_t sum_i c_ti log p_theta(x_ti).

    ``terms`` lists pairs ``(c, cache)``: per-point weights of shape (n_t,) and the
    :class:`LayerCache` of the pass at those points. ``value`` must be the sum's
    value, and it is returned unchanged. Backpropagating from it puts
    sum_t (c_t * G_t)^T A_t into each weight's ``.grad``, with the weights c treated
    as constants, like detached tensors. The gradient is computed from the caches
    alone, so the parameters must not change between this call and the backward
    pass, and the result cannot be differentiated twice. The backward pass scales
    the caches' output gradients in place, so the caches are spent afterwards.
    """
    parameters = [
        p for layer in linear_layers(model) for p in (layer.weight, layer.bias)
    ]
    return _WeightedLogProbSum.apply(value, terms, *parameters)


class _WeightedLogProbSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value, terms, *parameters):
        ctx.terms = terms
        return value.detach().clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        if ctx.terms is None:
            raise RuntimeError(
                "the weighted log-density sum was already backpropagated once; "
                "its layer caches are freed, so compute it again"
            )
        scaled = [(c * grad_output, cache) for c, cache in ctx.terms]
        ctx.terms = None
        in_place = len({id(cache) for _, cache in scaled}) == len(scaled)
        return (None, None, *_parameter_grads(scaled, in_place))


def _parameter_grads(terms: list, in_place: bool) -> list:
    """Return [dW_0, db_0, dW_1, db_1, ...] for weighted sums of log p_theta.

    With ``in_place`` set, each cache's output gradients are scaled by its weights
    in place, which spares an allocation per layer; that needs distinct caches.
    """
    grads = []
    n_hidden = len(terms[0][1].output_grads)
    for index in range(n_hidden):
        weight_grad, bias_grad = None, None
        for c, cache in terms:
            g = cache.output_grads[index]
            scaled_grad = g.mul_(c.unsqueeze(-1)) if in_place else g * c.unsqueeze(-1)
            a = cache.inputs[index]
            if weight_grad is None:
                weight_grad = scaled_grad.t() @ a
                bias_grad = scaled_grad.sum(0)
            else:
                weight_grad.addmm_(scaled_grad.t(), a)
                bias_grad += scaled_grad.sum(0)
        grads += [weight_grad, bias_grad]
    output_weight_grad = sum(c @ cache.inputs[-1] for c, cache in terms)
    output_bias_grad = sum(c.sum() for c, _ in terms)
    return grads + [output_weight_grad.unsqueeze(0), output_bias_grad.reshape(1)]
