"""The stored cpu-preset results that the book draws must match the preset."""

from pathlib import Path

import numpy as np

from cdlib.experiments import PRESETS, all_runs
from cdlib.results import load_preset_results

RESULTS = Path(__file__).resolve().parents[1] / "book" / "results"


def test_stored_cpu_results_are_complete_and_current():
    preset = PRESETS["cpu"]
    runs = all_runs(preset)
    results = load_preset_results(RESULTS, preset, runs)
    assert set(results) == {spec.name for spec in runs}
    for name, result in results.items():
        provenance = result.record["provenance"]
        assert len(provenance["commit"]) == 40, name
        assert provenance["cdlib_modified"] is False, name
        if result.finished:
            shape = (preset.grid_resolution, preset.grid_resolution)
            assert result.arrays["log_density_e1e2"].shape == shape, name
            assert np.isfinite(result.arrays["log_density_e1e2"]).all(), name


def test_no_stray_files_in_stored_results():
    files = {path.name for path in (RESULTS / "cpu").rglob("*") if path.is_file()}
    assert files == {"result.json", "arrays.npz"}
