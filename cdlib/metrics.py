"""Metrics that compare a learned model with the exact spiral density.

Densities on a plane are evaluated on a regular grid through the origin of the other
coordinates and normalised over the grid, so the model's unknown log-normaliser
cancels. The grid's extent and resolution are the approximation: mass outside the
grid is ignored.

The KL divergence over all dimensions needs the model's log-normaliser, which
:func:`kl_divergence_is` estimates by importance sampling from a mixture proposal
around the spiral, with the effective sample size as a check of the estimate.
"""

import dataclasses
import math
from dataclasses import dataclass

import torch

from ._validation import check_int_at_least, check_positive


@dataclass
class PlaneGrid:
    """A regular grid on the plane spanned by two coordinate axes of R^dim.

    ``points`` has shape (resolution**2, dim) and is zero outside ``axes``. ``u`` and
    ``v`` are the grid coordinates along the two axes, and ``cell_area`` is the area
    of one grid cell.
    """

    axes: tuple
    u: torch.Tensor
    v: torch.Tensor
    points: torch.Tensor
    cell_area: float

    @property
    def shape(self) -> tuple:
        return (self.v.numel(), self.u.numel())

    @property
    def extent(self) -> tuple:
        return (self.u[0].item(), self.u[-1].item(), self.v[0].item(), self.v[-1].item())


def plane_grid(
    axes=(0, 1),
    u_range=(-1.25, 1.25),
    v_range=(-1.25, 1.25),
    resolution: int = 128,
    dim: int = 10,
) -> PlaneGrid:
    """Build a ``resolution`` x ``resolution`` grid on the plane of ``axes``."""
    check_int_at_least("resolution", resolution, 2)
    if len(axes) != 2 or axes[0] == axes[1] or not all(0 <= a < dim for a in axes):
        raise ValueError(f"axes must be two distinct indices in [0, {dim}), got {axes!r}")
    u = torch.linspace(*u_range, resolution, dtype=torch.float64)
    v = torch.linspace(*v_range, resolution, dtype=torch.float64)
    vv, uu = torch.meshgrid(v, u, indexing="ij")
    points = torch.zeros(resolution * resolution, dim, dtype=torch.float64)
    points[:, axes[0]] = uu.reshape(-1)
    points[:, axes[1]] = vv.reshape(-1)
    cell_area = float((u[1] - u[0]) * (v[1] - v[0]))
    return PlaneGrid(tuple(axes), u, v, points, cell_area)


@torch.no_grad()
def model_log_density(model, points: torch.Tensor, batch_size: int = 8192) -> torch.Tensor:
    """Evaluate the model's unnormalised log-density at ``points`` in batches."""
    check_int_at_least("batch_size", batch_size, 1)
    parameter = next(model.parameters())
    out = [
        model(points[i : i + batch_size].to(parameter)).double().cpu()
        for i in range(0, points.shape[0], batch_size)
    ]
    return torch.cat(out)


def normalize_on_grid(log_values: torch.Tensor, cell_area: float) -> torch.Tensor:
    """Return log-densities that integrate to 1 over the grid."""
    check_positive("cell_area", cell_area)
    log_values = log_values.double()
    total = torch.logsumexp(log_values.reshape(-1), 0) + torch.log(
        torch.tensor(cell_area, dtype=torch.float64)
    )
    return log_values - total


def grid_kl(log_p: torch.Tensor, log_q: torch.Tensor, cell_area: float) -> float:
    """Return KL(p || q) in nats for two grid-normalised log-densities."""
    p = log_p.exp()
    difference = torch.where(p > 0, log_p - log_q, torch.zeros_like(log_p))
    return float((p * difference).sum() * cell_area)


def slice_kl(model, spiral, grid: PlaneGrid) -> float:
    """Return KL(p || p_theta) on a plane slice, both normalised over ``grid``."""
    log_p = normalize_on_grid(spiral.log_prob(grid.points), grid.cell_area)
    log_q = normalize_on_grid(model_log_density(model, grid.points), grid.cell_area)
    return grid_kl(log_p, log_q, grid.cell_area)


class DiagonalNormal:
    """The Gaussian N(0, diag(std^2)) in R^dim, with exact sampling and log-density."""

    def __init__(self, std: torch.Tensor):
        std = torch.as_tensor(std, dtype=torch.float64)
        if std.ndim != 1 or not torch.isfinite(std).all() or not (std > 0).all():
            raise ValueError(f"std must be a vector of finite numbers > 0, got {std}")
        self.std = std
        self.dim = std.numel()

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        check_int_at_least("n", n, 1)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return z * self.std

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        z = x.double() / self.std
        log_norm = self.std.log().sum() + 0.5 * self.dim * math.log(2.0 * math.pi)
        return -0.5 * z.square().sum(1) - log_norm


class MixtureProposal:
    """A finite mixture of distributions with ``sample(n, generator)`` and ``log_prob``.

    Component counts are drawn from the multinomial with the mixture weights, so a
    sample of size n contains a random number of points from each component, as a
    draw from the mixture must.
    """

    def __init__(self, components, weights):
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if len(components) != weights.numel() or len(components) == 0:
            raise ValueError(
                f"components and weights must have one entry each, got "
                f"{len(components)} components and {weights.numel()} weights"
            )
        if not torch.isfinite(weights).all() or not (weights > 0).all():
            raise ValueError(f"weights must be finite numbers > 0, got {weights.tolist()}")
        self.components = list(components)
        self.weights = weights / weights.sum()

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        check_int_at_least("n", n, 1)
        choice = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        counts = torch.bincount(choice, minlength=len(self.components)).tolist()
        parts = [
            component.sample(count, generator).double()
            for component, count in zip(self.components, counts)
            if count > 0
        ]
        x = torch.cat(parts)
        return x[torch.randperm(n, generator=generator)]

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        terms = [
            component.log_prob(x).double() + weight.log()
            for component, weight in zip(self.components, self.weights)
        ]
        return torch.logsumexp(torch.stack(terms), 0)


class _WideSpiral:
    """A spiral component of the proposal, with a coarser quadrature for speed.

    The noise of these components is at least 1.5 times the data's, and 128 panels
    of Gauss-Legendre nodes (spacing about 0.007 along the curve) integrate such
    wide Gaussians to far below the Monte Carlo error.
    """

    N_PANELS = 128

    def __init__(self, spiral):
        self.spiral = spiral

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return self.spiral.sample(n, generator, dtype=torch.float64)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return self.spiral.log_prob(x, n_panels=self.N_PANELS)


def spiral_proposal(spiral) -> MixtureProposal:
    """Return the importance-sampling proposal for the spiral model's log-normaliser.

    It has three components. Two are the spiral with its noise scaled by 1.5
    (weight 0.6) and by 3 (weight 0.3) in every direction, which cover a model
    somewhat wider than the data. The third is a broad Gaussian with std 0.75 in
    the plane and 0.1 off it (weight 0.1), which keeps the weights bounded where a
    model puts mass away from the curve.
    """
    wide = []
    for factor in (1.5, 3.0):
        scaled = dataclasses.replace(
            spiral,
            plane_std=factor * spiral.plane_std,
            off_plane_std=factor * spiral.off_plane_std,
        )
        wide.append(_WideSpiral(scaled))
    broad_std = torch.full((spiral.dim,), 0.1, dtype=torch.float64)
    broad_std[:2] = 0.75
    return MixtureProposal([*wide, DiagonalNormal(broad_std)], [0.6, 0.3, 0.1])


# A KL estimate this many standard errors below zero is rejected as biased.
NEGATIVE_KL_ERRORS = 3.0


class NonFiniteLogDensity(ValueError):
    """Raised when a model's log-density is NaN or infinite where it is evaluated."""


@dataclass(frozen=True)
class KLEstimate:
    """A Monte Carlo estimate of KL(p || p_theta) in nats, with its diagnostics.

    ``kl`` = mean over data draws of (log p - log p~_theta) + ``log_z``, where
    ``log_z`` estimates log Z_theta = log E_q[p~_theta / q] by importance sampling
    from ``n_proposal`` proposal draws. ``ess`` is the effective sample size
    (sum w)^2 / sum w^2 of the importance weights. ``standard_error`` combines the
    data term's standard error with the delta-method error of ``log_z``,
    sqrt(1/ess - 1/n_proposal). ``trusted`` is False when ``ess < min_ess``, or when
    ``kl`` lies more than :data:`NEGATIVE_KL_ERRORS` standard errors below 0, which
    a KL cannot and which shows that the proposal missed part of the model's mass.
    An untrusted estimate must not be reported as a KL value.
    """

    kl: float
    standard_error: float
    log_z: float
    log_z_standard_error: float
    ess: float
    n_data: int
    n_proposal: int
    min_ess: float

    @property
    def trusted(self) -> bool:
        enough_draws = self.ess >= self.min_ess
        plausible = self.kl >= -NEGATIVE_KL_ERRORS * self.standard_error
        return bool(enough_draws and plausible)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["trusted"] = self.trusted
        return out


def log_normalizer_is(model, proposal, n: int, generator: torch.Generator):
    """Estimate log Z_theta by importance sampling; return (log_z, se, ess).

    ``se`` is the delta-method standard error sqrt(1/ess - 1/n) of the estimate.
    """
    check_int_at_least("n", n, 2)
    y = proposal.sample(n, generator)
    log_w = model_log_density(model, y) - proposal.log_prob(y)
    if not torch.isfinite(log_w).all():
        bad = int((~torch.isfinite(log_w)).sum())
        raise NonFiniteLogDensity(
            f"{bad} of {n} importance log-weights are NaN or infinite, because the "
            "model's log-density is not finite at those proposal draws"
        )
    log_z = torch.logsumexp(log_w, 0) - math.log(n)
    ess = float(torch.exp(2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0)))
    se = math.sqrt(max(1.0 / ess - 1.0 / n, 0.0))
    return float(log_z), se, ess


def kl_divergence_is(
    model,
    spiral,
    generator: torch.Generator,
    n_data: int = 20_000,
    n_proposal: int = 100_000,
    proposal=None,
    min_ess: float = 200.0,
) -> KLEstimate:
    """Estimate KL(p || p_theta) over all dimensions of the spiral, in nats.

    ``proposal`` defaults to :func:`spiral_proposal`. The estimate is biased low
    when the model puts mass where the proposal has almost none. The effective
    sample size does not always reveal this (see :class:`KLEstimate`).
    """
    check_int_at_least("n_data", n_data, 2)
    check_int_at_least("n_proposal", n_proposal, 2)
    check_positive("min_ess", min_ess)
    if min_ess > n_proposal:
        raise ValueError(
            f"min_ess must be <= n_proposal, because the ESS cannot exceed the number "
            f"of draws; got min_ess={min_ess!r} and n_proposal={n_proposal!r}"
        )
    proposal = spiral_proposal(spiral) if proposal is None else proposal
    x = spiral.sample(n_data, generator, dtype=torch.float64)
    difference = spiral.log_prob(x) - model_log_density(model, x)
    if not torch.isfinite(difference).all():
        bad = int((~torch.isfinite(difference)).sum())
        raise NonFiniteLogDensity(
            f"the model's log-density is NaN or infinite at {bad} of {n_data} data draws"
        )
    data_term = float(difference.mean())
    data_se = float(difference.std()) / math.sqrt(n_data)
    log_z, log_z_se, ess = log_normalizer_is(model, proposal, n_proposal, generator)
    return KLEstimate(
        kl=data_term + log_z,
        standard_error=math.sqrt(data_se**2 + log_z_se**2),
        log_z=log_z,
        log_z_standard_error=log_z_se,
        ess=ess,
        n_data=n_data,
        n_proposal=n_proposal,
        min_ess=float(min_ess),
    )
