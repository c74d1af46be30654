"""Models of the unnormalised log-density log p_theta(x).

Every model maps a batch of shape (n, dim) to log p_theta(x) of shape (n,), up to an
additive constant that does not depend on x.

Equation, algorithm and observation numbers are those of Yair and Michaeli,
"Contrastive Divergence Learning is a Time Reversal Adversarial Game", ICLR 2021.
"""

import math

import torch
from torch import nn

from ._validation import check_int_at_least, check_positive


class EnergyMLP(nn.Module):
    """The paper's toy-experiment network for log p_theta (its Figure 5).

    ``depth`` counts fully connected layers: one input layer ``dim -> width``,
    ``depth - 2`` hidden layers ``width -> width`` grouped in residual pairs
    (a single leftover hidden layer forms its own residual block), and one output layer
    ``width -> 1``. The defaults, width 512 and depth 8, give the paper's three skip
    connections. Each hidden layer is preceded by a LeakyReLU. The paper's figure
    fixes the layer sizes and the skips but not where the activations sit, so this
    placement is our reading of it.
    """

    def __init__(
        self,
        dim: int = 10,
        width: int = 512,
        depth: int = 8,
        negative_slope: float = 0.2,
    ):
        super().__init__()
        check_int_at_least("dim", dim, 1)
        check_int_at_least("width", width, 1)
        check_int_at_least("depth", depth, 2)
        check_positive("negative_slope", negative_slope)
        self.dim = dim
        self.input = nn.Linear(dim, width)
        hidden = [nn.Linear(width, width) for _ in range(depth - 2)]
        self.blocks = nn.ModuleList(
            nn.ModuleList(hidden[i : i + 2]) for i in range(0, len(hidden), 2)
        )
        self.output = nn.Linear(width, 1)
        self.activation = nn.LeakyReLU(negative_slope)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.input(x)
        for block in self.blocks:
            residual = h
            for layer in block:
                h = layer(self.activation(h))
            h = h + residual
        return self.output(self.activation(h)).squeeze(-1)


class DiagonalGaussian(nn.Module):
    """A Gaussian with learnable mean and diagonal precision, for exact checks.

    ``forward`` returns the unnormalised log-density
    ``-0.5 * sum_i lambda_i (x_i - mu_i)^2``, and ``log_normalizer`` the constant
    ``log Z = 0.5 * sum_i log(2 pi / lambda_i)`` that ``forward`` leaves out.
    The precision is stored as ``log_precision`` so that it stays positive.
    """

    def __init__(self, mean: torch.Tensor, precision: torch.Tensor):
        super().__init__()
        if mean.ndim != 1 or precision.shape != mean.shape:
            raise ValueError(
                "mean and precision must be vectors of one shape, got "
                f"{tuple(mean.shape)} and {tuple(precision.shape)}"
            )
        if not torch.isfinite(mean).all():
            raise ValueError(f"mean must be finite, got {mean}")
        if not (precision > 0).all() or not torch.isfinite(precision).all():
            raise ValueError(f"precision must be finite and > 0, got {precision}")
        self.dim = mean.shape[0]
        self.mean = nn.Parameter(mean.clone())
        self.log_precision = nn.Parameter(precision.log())

    @property
    def precision(self) -> torch.Tensor:
        return self.log_precision.exp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -0.5 * ((x - self.mean).square() * self.precision).sum(-1)

    def grad_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Return the closed-form score d log p / dx = -lambda * (x - mu)."""
        return -self.precision * (x - self.mean)

    def log_normalizer(self) -> torch.Tensor:
        return 0.5 * (math.log(2.0 * math.pi) - self.log_precision).sum()

    def log_prob_normalized(self, x: torch.Tensor) -> torch.Tensor:
        return self(x) - self.log_normalizer()
