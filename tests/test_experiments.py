import pytest

from cdlib.experiments import (
    CONFIGURATIONS,
    PRESETS,
    STUDIES,
    SWEEP_STEP_SIZES,
    all_runs,
    get_preset,
    run_spec,
    study_runs,
    train_config,
)


def test_configurations_follow_appendix_d():
    expected = {
        "cnce_large": ("cnce", 0.3, 1.0),
        "cnce_small": ("cnce", 0.0075, 1.0),
        "cd": ("cd", 0.0075, 0.1),
        "cd_mh": ("cd_mh", 0.0125, 1.0),
        "adjusted_cd": ("adjusted_cd", 0.0125, 1.0),
    }
    actual = {
        name: (c.method, c.step_size, c.lr_scale) for name, c in CONFIGURATIONS.items()
    }
    assert actual == expected


def test_paper_preset_has_paper_scale():
    preset = PRESETS["paper"]
    config = train_config(run_spec("adjusted_cd", preset), preset, device="cpu")
    assert (config.width, config.depth, config.steps) == (512, 8, 100_000)
    assert (config.optimizer, config.momentum) == ("sgd", 0.9)
    assert (config.lr_start, config.lr_end) == (1e-2, 1e-4)
    assert config.k == 5


@pytest.mark.parametrize("preset", list(PRESETS.values()), ids=list(PRESETS))
def test_table_has_every_configuration_and_seed(preset):
    runs = study_runs("table", preset)
    assert len(runs) == len(CONFIGURATIONS) * len(preset.seeds)
    assert len(preset.seeds) >= 3
    assert {r.configuration for r in runs} == set(CONFIGURATIONS)


@pytest.mark.parametrize("preset", list(PRESETS.values()), ids=list(PRESETS))
def test_sweep_covers_four_methods_and_six_steps(preset):
    runs = study_runs("sweep", preset)
    assert len(runs) == 4 * 6
    assert {r.method for r in runs} == {"cnce", "cd", "cd_mh", "adjusted_cd"}
    assert sorted({r.step_size for r in runs}) == list(SWEEP_STEP_SIZES)
    # CD without correction keeps its lowered learning rate across the sweep.
    assert {r.lr_scale for r in runs if r.method == "cd"} == {0.1}


def test_run_names_unique_across_studies():
    preset = PRESETS["cpu"]
    runs = all_runs(preset)
    names = [r.name for r in runs]
    assert len(names) == len(set(names))
    total = sum(len(study_runs(study, preset)) for study in STUDIES)
    # The chosen step sizes and lengths of the sweep and the length study are
    # also table runs with seed 0.
    assert len(runs) < total


def test_schedule_spans_each_run():
    preset = PRESETS["cpu"]
    short, long = (
        train_config(run_spec("cd_mh", preset, steps=steps), preset)
        for steps in preset.step_counts[:2]
    )
    assert short.steps < long.steps
    assert (short.lr_start, short.lr_end) == (long.lr_start, long.lr_end)


def test_optimizer_study_uses_paper_sgd():
    preset = PRESETS["cpu"]
    runs = study_runs("optimizer", preset)
    assert all(spec.name.endswith("_paper_optimizer") for spec in runs)
    config = train_config(runs[0], preset)
    assert (config.optimizer, config.lr_start, config.lr_end) == ("sgd", 1e-2, 1e-4)
    assert (config.width, config.steps) == (preset.width, preset.steps)


def test_cnce_runs_use_one_step_chains():
    preset = PRESETS["smoke"]
    assert train_config(run_spec("cnce_large", preset), preset).k == 1


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: get_preset("gpu"), "preset must be one of 'smoke', 'cpu', 'paper', got 'gpu'"),
        (lambda: study_runs("figure", PRESETS["smoke"]),
         "study must be one of 'table', 'sweep', 'steps', 'optimizer', got 'figure'"),
        (lambda: run_spec("pcd", PRESETS["smoke"]), "configuration must be one of"),
    ],
)
def test_bad_names_are_rejected(call, message):
    with pytest.raises(ValueError, match=message):
        call()
