"""Figures shared by the chapters: densities on a plane, samples, alpha over training.

Colours come from the Okabe-Ito palette, which stays distinguishable under the common
forms of colour blindness.
"""

import matplotlib.pyplot as plt
import numpy as np
import torch

from .metrics import PlaneGrid

OKABE_ITO = (
    "#0072B2",
    "#E69F00",
    "#009E73",
    "#D55E00",
    "#CC79A7",
    "#56B4E9",
    "#F0E442",
    "#000000",
)
# Axis labels of the ten data coordinates, in the data's own units.
AXIS_NAMES = tuple(f"$x_{{{i + 1}}}$ (data units)" for i in range(10))


def plot_density(ax, grid: PlaneGrid, log_density: torch.Tensor, title: str = ""):
    """Show a grid-normalised density as an image with the plane's axis labels."""
    density = log_density.exp().reshape(grid.shape).numpy()
    image = ax.imshow(
        density,
        origin="lower",
        extent=grid.extent,
        cmap="viridis",
        aspect="auto",
        interpolation="nearest",
    )
    ax.set_xlabel(AXIS_NAMES[grid.axes[0]])
    ax.set_ylabel(AXIS_NAMES[grid.axes[1]])
    ax.set_title(title)
    return image


def plot_samples(ax, x: torch.Tensor, axes=(0, 1), title="", color=None, **kwargs):
    """Scatter the projection of samples (n, dim) onto two coordinate axes."""
    x = x.detach().cpu().numpy()
    kwargs.setdefault("s", 2)
    kwargs.setdefault("alpha", 0.5)
    ax.scatter(x[:, axes[0]], x[:, axes[1]], color=color or OKABE_ITO[0], **kwargs)
    ax.set_xlabel(AXIS_NAMES[axes[0]])
    ax.set_ylabel(AXIS_NAMES[axes[1]])
    ax.set_title(title)


def plot_alpha_history(ax, history: dict, label: str = "", color=None, window: int = 1):
    """Plot the median alpha per step and its 10-90% band, on a log scale.

    ``window`` > 1 smooths the three curves with a running mean over that many steps.
    """
    color = color or OKABE_ITO[0]
    curves = [np.asarray(history[key]) for key in ("alpha_q10", "alpha_median", "alpha_q90")]
    if window > 1:
        kernel = np.ones(window) / window
        curves = [np.convolve(c, kernel, mode="valid") for c in curves]
    steps = np.arange(1, curves[1].size + 1) + (window - 1)
    # Log axes mask alpha == 0 (a weight that underflowed) instead of drawing it.
    low, median, high = curves
    ax.fill_between(steps, low, high, color=color, alpha=0.25, linewidth=0)
    ax.plot(steps, median, color=color, label=label or "median")
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel(r"$\alpha_\theta$ (probability)")
    ax.axhline(0.5, color="0.5", linestyle=":", linewidth=1)


def figure_grid(rows: int, cols: int, size: float = 3.0):
    """Return a figure and a 2-D array of axes with a common style."""
    fig, axes = plt.subplots(
        rows, cols, figsize=(size * cols, size * rows), squeeze=False, constrained_layout=True
    )
    return fig, axes


def add_colorbar(fig, image, ax, label="density (per unit area)"):
    """Attach a colour bar with ``label`` to the image drawn on ``ax``."""
    bar = fig.colorbar(image, ax=ax, shrink=0.85)
    bar.set_label(label)
    return bar


def plot_stored_density(ax, grid: PlaneGrid, log_density, title: str = ""):
    """Show a stored grid-normalised log-density, an array of shape ``grid.shape``."""
    values = torch.as_tensor(np.asarray(log_density), dtype=torch.float64).reshape(-1)
    image = plot_density(ax, grid, values, title=title)
    ax.set_aspect("equal")
    return image


def mark_diverged(ax, record: dict, title: str = ""):
    """Replace a panel by the note that its run diverged, and at which step."""
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_facecolor("0.92")
    ax.text(
        0.5,
        0.5,
        f"diverged\nat step {record['steps_done']}",
        ha="center",
        va="center",
        transform=ax.transAxes,
        color=OKABE_ITO[3],
        fontsize="large",
    )
    ax.set_title(title)


def plot_binned_alpha(ax, arrays: dict, label: str, color=None):
    """Plot a stored run's binned median alpha and its 10-90% band, log scale."""
    color = color or OKABE_ITO[0]
    step = arrays["history_step"]
    ax.fill_between(
        step, arrays["history_alpha_q10"], arrays["history_alpha_q90"],
        color=color, alpha=0.2, linewidth=0,
    )
    ax.plot(step, arrays["history_alpha_median"], color=color, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel(r"$\alpha_\theta$ (probability)")
    ax.axhline(0.5, color="0.5", linestyle=":", linewidth=1)


def kl_label(result) -> str:
    """Return a panel title with a stored run's 10-D KL, or why it has none."""
    if not result.finished:
        return "diverged"
    kl = result.metrics["kl"]
    if kl is None:
        return f"ESS {result.metrics['kl_estimate']['ess']:.0f}: no KL"
    return f"KL {kl:.2f} ± {result.metrics['kl_standard_error']:.2f}"


def plot_run_density(ax, grid: PlaneGrid, result, title: str = ""):
    """Draw a stored run's learned e1-e2 density, or mark the run as diverged.

    Returns the image, or None for a diverged run, which has no density to draw.
    """
    if not result.finished:
        mark_diverged(ax, result.record, title)
        return None
    return plot_stored_density(ax, grid, result.arrays["log_density_e1e2"], title)
