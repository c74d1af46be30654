"""The training-speed benchmark in its quick mode, as CI runs it.

The sizes are tiny, so the timings mean nothing: the test checks that the
script runs and writes its page and figures, not how fast anything is.
"""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "training_speed.py"


@pytest.fixture(scope="module")
def benchmark():
    spec = importlib.util.spec_from_file_location("training_speed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_mode_writes_page(benchmark, tmp_path):
    page = benchmark.run(["--quick", "--threads", "1", "--output-dir", str(tmp_path)])
    text = page.read_text()
    figures = tmp_path / "benchmark_figures"
    assert page == tmp_path / "benchmarks.md"
    assert text.startswith("# Training speed")
    assert "jupytext" not in text
    assert "| adjusted CD-k / CD-k | wall |" in text
    assert "torch.set_num_threads(1)" in text
    assert (figures / "time_against_k.png").stat().st_size > 0
    assert (figures / "time_against_batch.png").stat().st_size > 0
    results = json.loads((figures / "benchmark_results.json").read_text())
    methods = {row["method"] for row in results["steps"]}
    assert {"cnce", "cd", "cd_mh", "adjusted_cd"} <= methods


def test_quick_mode_without_torchebm(benchmark, tmp_path):
    page = benchmark.run(
        ["--quick", "--threads", "1", "--skip-torchebm", "--output-dir", str(tmp_path)]
    )
    text = page.read_text()
    assert "TorchEBM CD-k (ms)" not in text
    assert "TorchEBM is not installed" in text or "its rows are left out" in text


def test_quick_mode_names_missing_torchebm(benchmark, tmp_path, monkeypatch):
    """Without torchebm the page gives its install command and leaves its rows out."""
    monkeypatch.setattr(benchmark, "torchebm_available", lambda: False)
    page = benchmark.run(["--quick", "--threads", "1", "--output-dir", str(tmp_path)])
    text = page.read_text()
    assert "TorchEBM CD-k (ms)" not in text
    assert "TorchEBM is not installed" in text
    assert benchmark.INSTALL_TORCHEBM in text


def test_flop_count_of_cd_step(benchmark):
    """(2k + 4) F for CD-k, with F the forward FLOPs of the width-w network."""
    f = 2 * 1024 * (10 * 512 + 6 * 512**2 + 512)
    assert benchmark.forward_flops(1024, 512) == f
    assert benchmark.required_flops("adjusted_cd", 1024, 512, 5) == 14 * f
    assert benchmark.required_flops("torchebm", 1024, 512, 5) == 16 * f
    assert benchmark.required_flops("cnce", 1024, 512, 1) == 6 * f
