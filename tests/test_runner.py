import dataclasses
import importlib.metadata
import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from cdlib.experiments import PRESETS, all_runs, run_spec
from cdlib.results import load_preset_results, read_run, summarize
from cdlib import runner
from cdlib.metrics import NonFiniteLogDensity
from cdlib.runner import _exclusive, execute_run, main, run_all
from cdlib.train import Trainer

SMOKE = PRESETS["smoke"]
# Long enough that the subprocess below is still training when it is killed.
LONG = dataclasses.replace(SMOKE, steps=3000, checkpoint_every=25)

TRAIN_SCRIPT = """
import dataclasses, sys
from cdlib.experiments import PRESETS, run_spec
from cdlib.runner import execute_run
preset = dataclasses.replace(PRESETS["smoke"], steps=3000, checkpoint_every=25)
execute_run(run_spec("adjusted_cd", preset), preset, sys.argv[1], sys.argv[2])
"""


def run_script(results, work):
    return subprocess.Popen([sys.executable, "-c", TRAIN_SCRIPT, str(results), str(work)])


def checkpoint_step(path):
    try:
        return torch.load(path, weights_only=False)["step"]
    except (OSError, RuntimeError, EOFError, KeyError):
        return None


def comparable(record):
    """The parts of a record that must not depend on interruptions or timing."""
    keep = ("name", "spec", "config", "seed", "preset", "steps_done", "status", "metrics")
    return {key: record[key] for key in keep}


def test_killed_run_resumes_to_identical_result(tmp_path):
    spec = run_spec("adjusted_cd", LONG)
    checkpoint = tmp_path / "work" / "smoke" / spec.name / "checkpoint.pt"
    process = run_script(tmp_path / "results", tmp_path / "work")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (checkpoint_step(checkpoint) or 0) >= 50:
        assert process.poll() is None, "the run ended before it could be killed"
        time.sleep(0.01)
    process.kill()
    process.wait()
    killed_at = checkpoint_step(checkpoint)
    assert killed_at is not None and 50 <= killed_at < LONG.steps
    assert not (tmp_path / "results" / "smoke" / spec.name / "result.json").exists()

    resumed = run_script(tmp_path / "results", tmp_path / "work")
    assert resumed.wait(timeout=300) == 0
    execute_run(spec, LONG, tmp_path / "full_results", tmp_path / "full_work")

    after_kill = read_run(tmp_path / "results" / "smoke" / spec.name)
    uninterrupted = read_run(tmp_path / "full_results" / "smoke" / spec.name)
    assert comparable(after_kill.record) == comparable(uninterrupted.record)
    assert after_kill.arrays.keys() == uninterrupted.arrays.keys()
    for key, value in uninterrupted.arrays.items():
        assert np.array_equal(after_kill.arrays[key], value, equal_nan=True), key
    first = Trainer.from_checkpoint(checkpoint, progress=False).model.state_dict()
    second = Trainer.from_checkpoint(
        tmp_path / "full_work" / "smoke" / spec.name / "checkpoint.pt", progress=False
    ).model.state_dict()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_diverged_run_is_recorded_without_figures(tmp_path):
    # SGD at a learning rate of 1e6 makes the parameters overflow within a few
    # updates. The run must stop, keep its checkpoint and be stored as diverged.
    preset = dataclasses.replace(SMOKE, optimizer="sgd", lr_start=1e6, lr_end=1e6,
                                 checkpoint_every=1)
    spec = run_spec("cd", preset, lr_scale=1.0)
    record = execute_run(spec, preset, tmp_path / "results", tmp_path / "work")
    assert record["status"] == "diverged"
    assert record["metrics"] == {}
    assert f"diverged at step {record['steps_done']}" in record["error"]
    assert "method='cd'" in record["error"]
    assert record["steps_done"] < preset.steps
    stored = read_run(tmp_path / "results" / "smoke" / spec.name)
    assert not stored.finished
    assert "log_density_e1e2" not in stored.arrays
    assert "model_samples" not in stored.arrays
    checkpoint = tmp_path / "work" / "smoke" / spec.name / "checkpoint.pt"
    assert checkpoint_step(checkpoint) == record["steps_done"]
    assert summarize([stored], "kl")["excluded"] == 1


def test_finished_run_stores_metrics_and_provenance(tmp_path):
    spec = run_spec("cd_mh", SMOKE)
    record = execute_run(spec, SMOKE, tmp_path / "results", tmp_path / "work")
    assert record["status"] == "finished"
    metrics = record["metrics"]
    for key in ("slice_kl_e1-e2", "slice_kl_e1-e3", "final_alpha_median", "acceptance"):
        assert np.isfinite(metrics[key]), key
    assert 0.0 <= metrics["acceptance"] <= 1.0
    assert metrics["kl_estimate"]["n_proposal"] == SMOKE.kl_proposal
    provenance = record["provenance"]
    assert provenance["cdlib_version"]
    assert len(provenance["commit"]) == 40
    assert provenance["packages"]["torch"] == importlib.metadata.version("torch")
    stored = json.loads(
        (tmp_path / "results" / "smoke" / spec.name / "result.json").read_text()
    )
    assert stored["seed"] == spec.seed
    assert stored["config"]["method"] == "cd_mh"


def test_stored_runs_are_skipped_and_retrain_redoes_them(tmp_path):
    args = dict(studies=("table",), results_root=tmp_path / "r", work_root=tmp_path / "w")
    first = run_all("smoke", **args)
    assert len(first) == len(all_runs(SMOKE, ("table",)))
    assert run_all("smoke", **args) == []
    again = run_all("smoke", retrain=True, **args)
    assert [comparable(r) for r in sorted(again, key=lambda r: r["name"])] == [
        comparable(r) for r in sorted(first, key=lambda r: r["name"])
    ]
    specs = all_runs(SMOKE, ("table",))
    loaded = load_preset_results(tmp_path / "r", SMOKE, specs)
    assert set(loaded) == {spec.name for spec in specs}


def test_retrain_of_one_study_keeps_others(tmp_path):
    args = dict(results_root=tmp_path / "r", work_root=tmp_path / "w")
    run_all("smoke", studies=("optimizer", "steps"), **args)
    again = run_all("smoke", studies=("optimizer",), retrain=True, **args)
    assert len(again) == len(all_runs(SMOKE, ("optimizer",)))
    for spec in all_runs(SMOKE, ("steps",)):
        assert (tmp_path / "r" / "smoke" / spec.name / "result.json").is_file(), spec.name
        assert (tmp_path / "w" / "smoke" / spec.name / "checkpoint.pt").is_file(), spec.name


def test_unwritable_results_folder_fails_first(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match="--results folder .* cannot be created or written"):
        run_all("smoke", studies=("optimizer",), results_root=blocker, work_root=tmp_path / "w")
    assert not (tmp_path / "w" / "smoke").exists() or not any((tmp_path / "w" / "smoke").iterdir())


def test_corrupt_result_is_trained_again(tmp_path):
    args = dict(studies=("optimizer",), results_root=tmp_path / "r", work_root=tmp_path / "w")
    first = {record["name"]: record for record in run_all("smoke", **args)}
    spec = all_runs(SMOKE, ("optimizer",))[0]
    path = tmp_path / "r" / "smoke" / spec.name / "result.json"
    path.write_text(path.read_text()[:300])
    with pytest.raises(ValueError, match=r"cannot be read \(JSONDecodeError"):
        read_run(path.parent)
    again = run_all("smoke", **args)
    assert [record["name"] for record in again] == [spec.name]
    assert comparable(again[0]) == comparable(first[spec.name])


def test_result_of_other_configuration_is_rejected(tmp_path):
    spec = run_spec("cd_mh", SMOKE)
    execute_run(spec, SMOKE, tmp_path / "r", tmp_path / "w")
    wider = dataclasses.replace(SMOKE, width=16)
    with pytest.raises(ValueError, match="was trained with another preset width, width than preset .smoke."):
        load_preset_results(tmp_path / "r", wider, [run_spec("cd_mh", wider)])
    with pytest.raises(ValueError, match="rerun with --retrain"):
        execute_run(run_spec("cd_mh", wider), wider, tmp_path / "r", tmp_path / "w2")


def test_stored_run_is_not_trained_again(tmp_path):
    spec = run_spec("cnce_small", SMOKE)
    assert execute_run(spec, SMOKE, tmp_path / "r", tmp_path / "w") is not None
    leftover = tmp_path / "w" / "smoke" / spec.name / "checkpoint.pt123.tmp"
    leftover.write_text("partial")
    assert execute_run(spec, SMOKE, tmp_path / "r", tmp_path / "w") is None
    (tmp_path / "r" / "smoke" / spec.name / "result.json").unlink()
    assert execute_run(spec, SMOKE, tmp_path / "r", tmp_path / "w")["status"] == "finished"
    assert not leftover.exists()


def test_nan_model_at_evaluation_is_diverged(tmp_path, monkeypatch):
    spec = run_spec("cd_mh", SMOKE)

    def nan_model(trainer, preset):
        raise NonFiniteLogDensity("the model's log-density is NaN or infinite at 5 of 5 data draws")

    monkeypatch.setattr(runner, "evaluate_run", nan_model)
    record = execute_run(spec, SMOKE, tmp_path / "r", tmp_path / "w")
    assert record["status"] == "diverged"
    assert record["error"].startswith(f"evaluation after step {SMOKE.steps} failed")
    assert "method='cd_mh'" in record["error"]


def test_result_files_are_readable_by_all(tmp_path):
    spec = run_spec("cnce_small", SMOKE)
    execute_run(spec, SMOKE, tmp_path / "r", tmp_path / "w")
    for name in ("result.json", "arrays.npz"):
        mode = (tmp_path / "r" / "smoke" / spec.name / name).stat().st_mode & 0o777
        assert mode == 0o644, name


def test_locked_run_is_not_trained_twice(tmp_path):
    spec = run_spec("cnce_small", SMOKE)
    with _exclusive(tmp_path / "w" / "smoke" / spec.name):
        with pytest.raises(RuntimeError, match="locked by another process"):
            execute_run(spec, SMOKE, tmp_path / "r", tmp_path / "w")
    assert not (tmp_path / "w" / "smoke" / spec.name / "checkpoint.pt").exists()
    assert execute_run(spec, SMOKE, tmp_path / "r", tmp_path / "w")["status"] == "finished"


def test_retrain_spares_locked_run(tmp_path):
    args = dict(studies=("optimizer",), results_root=tmp_path / "r", work_root=tmp_path / "w")
    run_all("smoke", **args)
    spec = all_runs(SMOKE, ("optimizer",))[0]
    with _exclusive(tmp_path / "w" / "smoke" / spec.name):
        with pytest.raises(RuntimeError, match="locked by another process"):
            run_all("smoke", retrain=True, **args)
    for spec in all_runs(SMOKE, ("optimizer",)):
        assert (tmp_path / "r" / "smoke" / spec.name / "result.json").is_file(), spec.name


def test_damaged_arrays_are_named(tmp_path):
    spec = run_spec("cnce_small", SMOKE)
    execute_run(spec, SMOKE, tmp_path / "r", tmp_path / "w")
    path = tmp_path / "r" / "smoke" / spec.name / "arrays.npz"
    data = bytearray(path.read_bytes())
    data[len(data) // 3 : len(data) // 3 + 400] = bytes(400)
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"stored run .*{spec.name}.* cannot be read"):
        read_run(path.parent)


def test_file_in_place_of_run_folder_fails_first(tmp_path):
    spec = all_runs(SMOKE, ("optimizer",))[0]
    (tmp_path / "r" / "smoke").mkdir(parents=True)
    (tmp_path / "r" / "smoke" / spec.name).write_text("not a folder")
    with pytest.raises(ValueError, match=f"--results path .*{spec.name}.* is a file"):
        run_all("smoke", studies=("optimizer",), results_root=tmp_path / "r",
                work_root=tmp_path / "w")
    assert not (tmp_path / "w" / "smoke" / spec.name / "checkpoint.pt").exists()


def test_missing_results_are_named(tmp_path):
    cpu = PRESETS["cpu"]
    with pytest.raises(ValueError, match=r"1 of 1 runs of preset 'cpu' have no stored result"):
        load_preset_results(tmp_path, cpu, [run_spec("cd", cpu)])


def test_checkpoint_of_other_configuration_is_rejected(tmp_path):
    spec = run_spec("cd_mh", SMOKE)
    execute_run(spec, SMOKE, tmp_path / "r", tmp_path / "w")
    other = dataclasses.replace(SMOKE, width=4)
    with pytest.raises(ValueError, match="belongs to another configuration"):
        execute_run(spec, other, tmp_path / "r2", tmp_path / "w")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--preset", "laptop"], "preset must be one of 'smoke', 'cpu', 'paper', got 'laptop'"),
        (["--preset", "smoke", "--jobs", "0"], "jobs must be an integer >= 1, got 0"),
        (["--preset", "smoke", "--studies", "figure3"], "study must be one of"),
        (["--preset", "smoke", "--device", "meta"], "device must be 'cpu' or a CUDA device"),
        pytest.param(
            ["--preset", "paper"],
            "device is 'cuda' but CUDA is not available",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available"),
        ),
        pytest.param(
            ["--preset", "smoke", "--device", "cuda:7"],
            "device is 'cuda:7' but CUDA is not available",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available"),
        ),
    ],
)
def test_command_line_rejects_bad_input(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(argv + ["--results", str(tmp_path / "r"), "--work", str(tmp_path / "w")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
