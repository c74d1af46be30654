"""Metrics that compare a learned model with the exact spiral density.

Densities on a plane are evaluated on a regular grid through the origin of the other
coordinates and normalised over the grid, so the model's unknown log-normaliser
cancels. The grid's extent and resolution are the approximation: mass outside the
grid is ignored.
"""

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
