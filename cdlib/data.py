"""The toy data set: a noisy 2-D spiral embedded in R^10.

Parametrisation. For ``t`` in [0, 1] the spiral's centre line in the e1-e2 plane is

    c(t) = r(t) * (cos(phi(t)), sin(phi(t))),
    r(t) = r_min + (1 - r_min) * t,
    phi(t) = 2 * pi * turns * t,

so ``|c(t)| <= 1`` and the curve stays inside [-1, 1] in both axes. A sample draws
``t ~ Uniform(0, 1)``, which is uniform in the parameter, not in arc length. It places
the point ``c(t)`` in the first two coordinates and zeros elsewhere, and adds independent
Gaussian noise of standard deviation ``plane_std`` along e1 and e2 and
``off_plane_std`` along e3..e10. The defaults follow the paper's stated noise levels
(0.05 and 0.01); the number of turns and the inner radius are our choice, since the
paper shows the spiral only as a picture.

The exact log-density is the mixture

    log p(x) = log N(x_{3:}; 0, off_plane_std^2 I)
               + log int_0^1 N(x_{1:2}; c(t), plane_std^2 I) dt,

whose integral is evaluated by composite Gauss-Legendre quadrature in log space.

Equation, algorithm and observation numbers are those of Yair and Michaeli,
"Contrastive Divergence Learning is a Time Reversal Adversarial Game", ICLR 2021.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch

from ._validation import check_int_at_least, check_positive

# Gauss-Legendre nodes per panel. With 8 nodes and the default 1024 panels,
# quadrupling the panel count changes log p by less than 1e-9 nats on and around the spiral
# (checked in tests/test_data.py).
_NODES_PER_PANEL = 8


@dataclass(frozen=True)
class Spiral:
    """The spiral distribution; see the module docstring for the parametrisation."""

    turns: float = 2.0
    r_min: float = 0.15
    plane_std: float = 0.05
    off_plane_std: float = 0.01
    dim: int = 10

    def __post_init__(self):
        check_positive("turns", self.turns)
        check_positive("plane_std", self.plane_std)
        check_positive("off_plane_std", self.off_plane_std)
        check_int_at_least("dim", self.dim, 3)
        if not (0.0 <= self.r_min < 1.0):
            raise ValueError(f"r_min must lie in [0, 1), got {self.r_min!r}")

    def centre(self, t: torch.Tensor) -> torch.Tensor:
        """Return the centre-line points c(t), shape ``t.shape + (2,)``."""
        radius = self.r_min + (1.0 - self.r_min) * t
        angle = 2.0 * math.pi * self.turns * t
        return torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], -1)

    def std(self, dtype=torch.float64, device="cpu") -> torch.Tensor:
        """Return the per-axis noise standard deviations, shape (dim,)."""
        std = torch.full((self.dim,), self.off_plane_std, dtype=dtype, device=device)
        std[:2] = self.plane_std
        return std

    def sample(
        self,
        n: int,
        generator: torch.Generator,
        dtype: torch.dtype = torch.float32,
        device="cpu",
    ) -> torch.Tensor:
        """Draw ``n`` points, shape (n, dim).

        The draws are made in float64 on the generator's device and then cast, so the
        same generator state gives the same points for every ``dtype`` and ``device``.
        """
        check_int_at_least("n", n, 1)
        if not isinstance(generator, torch.Generator):
            raise ValueError(
                f"generator must be a torch.Generator, got {type(generator).__name__}"
            )
        kwargs = dict(generator=generator, dtype=torch.float64, device=generator.device)
        t = torch.rand(n, **kwargs)
        noise = torch.randn(n, self.dim, **kwargs)
        x = noise * self.std(device=generator.device)
        x[:, :2] += self.centre(t)
        return x.to(dtype=dtype, device=device)

    def log_prob_plane(self, x12: torch.Tensor, n_panels: int = 1024) -> torch.Tensor:
        """Return the exact log-density of the e1-e2 marginal at points (n, 2), float64."""
        check_int_at_least("n_panels", n_panels, 1)
        if not isinstance(x12, torch.Tensor) or x12.ndim != 2 or x12.shape[1] != 2:
            shape = tuple(x12.shape) if isinstance(x12, torch.Tensor) else type(x12).__name__
            raise ValueError(f"x12 must be a tensor of shape (n, 2), got {shape}")
        x12 = x12.to(torch.float64)
        t, log_weight = _gauss_legendre_unit(n_panels, x12.device)
        centres = self.centre(t)
        var = self.plane_std**2
        log_norm = -math.log(2.0 * math.pi * var)
        out = torch.empty(x12.shape[0], dtype=torch.float64, device=x12.device)
        # Chunks keep the (chunk, nodes) matrix near 64 MB.
        chunk = max(1, 2**23 // t.numel())
        for start in range(0, x12.shape[0], chunk):
            block = x12[start : start + chunk]
            sq = torch.cdist(block, centres).square()
            out[start : start + chunk] = torch.logsumexp(
                log_weight - sq / (2.0 * var), dim=1
            )
        return out + log_norm

    def log_prob(self, x: torch.Tensor, n_panels: int = 1024) -> torch.Tensor:
        """Return the exact log-density log p(x) at points (n, dim), float64."""
        if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[1] != self.dim:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must have shape (n, {self.dim}), got {shape}")
        x = x.to(torch.float64)
        rest = x[:, 2:]
        var = self.off_plane_std**2
        log_rest = -0.5 * (rest.square().sum(1) / var)
        log_rest = log_rest - 0.5 * rest.shape[1] * math.log(2.0 * math.pi * var)
        return self.log_prob_plane(x[:, :2], n_panels) + log_rest


def _gauss_legendre_unit(n_panels: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Return composite Gauss-Legendre nodes on [0, 1] and their log-weights."""
    nodes, weights = np.polynomial.legendre.leggauss(_NODES_PER_PANEL)
    width = 1.0 / n_panels
    left = np.arange(n_panels)[:, None] * width
    t = (left + (nodes[None, :] + 1.0) * 0.5 * width).ravel()
    w = np.broadcast_to(weights * 0.5 * width, (n_panels, _NODES_PER_PANEL)).ravel()
    t = torch.as_tensor(t, dtype=torch.float64, device=device)
    log_w = torch.as_tensor(np.log(w), dtype=torch.float64, device=device)
    return t, log_w
