import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from cdlib.metrics import plane_grid  # noqa: E402
from cdlib.plots import kl_label, plot_binned_alpha, plot_run_density  # noqa: E402
from cdlib.results import RunResult  # noqa: E402

GRID = plane_grid(resolution=6)


def finished_run(kl=0.5, ess=1000.0):
    record = {
        "name": "run",
        "status": "finished",
        "steps_done": 10,
        "metrics": {"kl": kl, "kl_standard_error": 0.01, "kl_estimate": {"ess": ess}},
    }
    log_density = np.full(GRID.shape, -np.log(GRID.cell_area * GRID.points.shape[0]))
    return RunResult(record, {"log_density_e1e2": log_density})


def diverged_run():
    record = {"name": "run", "status": "diverged", "steps_done": 7, "metrics": {}}
    return RunResult(record, {"history_step": np.arange(3.0)})


@pytest.fixture
def ax():
    fig, ax = plt.subplots()
    yield ax
    plt.close(fig)


def test_diverged_run_draws_no_density(ax):
    assert plot_run_density(ax, GRID, diverged_run(), "cd") is None
    assert len(ax.images) == 0
    texts = [text.get_text() for text in ax.texts]
    assert texts == ["diverged\nat step 7"]


def test_finished_run_draws_its_density(ax):
    image = plot_run_density(ax, GRID, finished_run(), "cd")
    assert image is ax.images[0]
    assert image.get_array().shape == GRID.shape


def test_kl_label_cases():
    assert kl_label(finished_run()) == "KL 0.50 ± 0.01"
    assert kl_label(finished_run(kl=None, ess=12.0)) == "ESS 12: no KL"
    assert kl_label(diverged_run()) == "diverged"


def test_binned_alpha_uses_log_scale(ax):
    arrays = {
        "history_step": np.arange(1.0, 4.0),
        "history_alpha_q10": np.array([0.1, 0.01, 0.001]),
        "history_alpha_median": np.array([0.4, 0.04, 0.004]),
        "history_alpha_q90": np.array([0.5, 0.1, 0.01]),
    }
    plot_binned_alpha(ax, arrays, "cnce")
    assert ax.get_yscale() == "log"
    assert ax.get_lines()[0].get_label() == "cnce"
