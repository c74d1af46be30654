import math

import numpy as np
import pytest
import torch

from cdlib.data import Spiral
from cdlib.metrics import normalize_on_grid, plane_grid


def test_sample_shape_dtype_and_device(generator):
    x = Spiral().sample(500, generator, dtype=torch.float64)
    assert x.shape == (500, 10)
    assert x.dtype == torch.float64
    assert x.device.type == "cpu"


def test_sample_repeats_with_same_seed():
    first = Spiral().sample(100, torch.Generator().manual_seed(3))
    second = Spiral().sample(100, torch.Generator().manual_seed(3))
    assert torch.equal(first, second)


def test_sample_leaves_global_rng_alone(generator):
    state = torch.get_rng_state()
    Spiral().sample(10, generator)
    assert torch.equal(state, torch.get_rng_state())


def test_centre_line_stays_in_unit_box():
    t = torch.linspace(0, 1, 10_001, dtype=torch.float64)
    c = Spiral().centre(t)
    assert c.abs().max() <= 1.0


def test_noise_levels_match_paper(generator):
    spiral = Spiral()
    n = 200_000
    x = spiral.sample(n, generator, dtype=torch.float64)
    off_plane_std = x[:, 2:].std(0)
    # The std estimate's standard error is std / sqrt(2n); 6 standard errors leave a
    # failure rate below 1e-8 per axis.
    tolerance = 6 * 0.01 / math.sqrt(2 * n)
    assert (off_plane_std - 0.01).abs().max() < tolerance


def test_log_prob_converges_in_quadrature(generator):
    spiral = Spiral()
    on_manifold = spiral.sample(2000, generator, dtype=torch.float64)
    off_manifold = (torch.rand(2000, 10, generator=generator, dtype=torch.float64) - 0.5) * 3
    x = torch.cat([on_manifold, off_manifold])
    coarse = spiral.log_prob(x, n_panels=1024)
    fine = spiral.log_prob(x, n_panels=4096)
    assert (coarse - fine).abs().max() < 1e-9


def test_plane_marginal_integrates_to_one():
    spiral = Spiral()
    grid = plane_grid(u_range=(-1.4, 1.4), v_range=(-1.4, 1.4), resolution=200, dim=2)
    log_p = spiral.log_prob_plane(grid.points)
    total = log_p.exp().sum() * grid.cell_area
    assert abs(total.item() - 1.0) < 1e-4


def test_log_prob_matches_histogram_of_samples(generator):
    """The exact density predicts the fraction of samples in a box near the curve."""
    spiral = Spiral()
    n = 400_000
    x = spiral.sample(n, generator, dtype=torch.float64)
    centre = spiral.centre(torch.tensor(0.3, dtype=torch.float64))
    low, high = centre - 0.05, centre + 0.05
    inside = ((x[:, :2] > low) & (x[:, :2] < high)).all(1)
    fraction = inside.double().mean().item()

    u = torch.linspace(0, 1, 201, dtype=torch.float64)[:-1] + 0.0025
    uu, vv = torch.meshgrid(u, u, indexing="ij")
    points = torch.stack([low[0] + 0.1 * uu.reshape(-1), low[1] + 0.1 * vv.reshape(-1)], 1)
    predicted = spiral.log_prob_plane(points).exp().mean().item() * 0.01
    standard_error = math.sqrt(predicted * (1 - predicted) / n)
    assert abs(fraction - predicted) < 6 * standard_error


def test_log_prob_is_plane_times_off_plane(generator):
    spiral = Spiral()
    x = spiral.sample(50, generator, dtype=torch.float64)
    off_plane = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(0.01, dtype=torch.float64)).log_prob(x[:, 2:]).sum(1)
    expected = spiral.log_prob_plane(x[:, :2]) + off_plane
    assert torch.allclose(spiral.log_prob(x), expected, rtol=0, atol=1e-10)


def test_grid_normalisation_integrates_to_one():
    grid = plane_grid(resolution=64)
    log_values = -grid.points.square().sum(1)
    normalized = normalize_on_grid(log_values, grid.cell_area)
    assert abs(normalized.exp().sum().item() * grid.cell_area - 1.0) < 1e-12


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"plane_std": 0.0}, "plane_std must be a finite number > 0, got 0.0"),
        ({"off_plane_std": float("nan")}, "off_plane_std must be a finite number > 0"),
        ({"r_min": 1.5}, "r_min must lie in [0, 1), got 1.5"),
        ({"dim": 2}, "dim must be an integer >= 3, got 2"),
    ],
)
def test_spiral_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        Spiral(**kwargs)


def test_log_prob_rejects_wrong_dimension():
    with pytest.raises(ValueError, match=r"x must have shape \(n, 10\), got \(4, 3\)"):
        Spiral().log_prob(torch.zeros(4, 3))


def test_sample_rejects_bad_count(generator):
    with pytest.raises(ValueError, match="n must be an integer >= 1, got 0"):
        Spiral().sample(0, generator)


def test_log_prob_plane_rejects_wrong_shape():
    with pytest.raises(ValueError, match=r"x12 must be a tensor of shape \(n, 2\), got \(4, 3\)"):
        Spiral().log_prob_plane(torch.zeros(4, 3))


def test_log_prob_rejects_numpy_input():
    with pytest.raises(ValueError, match="x must have shape \\(n, 10\\), got ndarray"):
        Spiral().log_prob(np.zeros((4, 10)))
