import math

import numpy as np
import pytest
import torch

from cdlib.train import TrainConfig, Trainer, TrainingDiverged, train

SMALL = dict(width=16, depth=4, batch_size=32, n_data=500)


def parameters_of(trainer):
    return [p.detach().clone() for p in trainer.model.parameters()]


def assert_same_parameters(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("method", ["nce", "cnce", "cd", "cd_mh", "adjusted_cd"])
def test_each_method_trains_and_records_history(method):
    trainer = train(TrainConfig(method=method, step_size=0.05, steps=5, **SMALL), progress=False)
    assert trainer.step == 5
    assert len(trainer.history["loss"]) == 5
    assert all(math.isfinite(v) for v in trainer.history["loss"])
    assert all(0.0 <= v <= 1.0 for v in trainer.history["alpha_median"])


def test_learning_rate_decays_from_start_to_end():
    config = TrainConfig(steps=10, lr_start=1e-2, lr_end=1e-4, **SMALL)
    trainer = train(config, progress=False)
    lr = trainer.history["lr"]
    assert lr[0] == pytest.approx(1e-2, rel=1e-12)
    final = trainer.optimizer.param_groups[0]["lr"]
    assert final == pytest.approx(1e-4, rel=1e-9)
    assert all(a > b for a, b in zip(lr, lr[1:]))


def test_lr_scale_multiplies_schedule():
    trainer = train(TrainConfig(steps=3, lr_scale=0.1, **SMALL), progress=False)
    assert trainer.history["lr"][0] == pytest.approx(1e-3, rel=1e-12)


def test_same_seed_gives_identical_parameters():
    config = TrainConfig(steps=8, **SMALL)
    first = train(config, progress=False)
    second = train(config, progress=False)
    assert_same_parameters(parameters_of(first), parameters_of(second))


def test_different_seed_gives_different_parameters():
    first = train(TrainConfig(steps=3, seed=0, **SMALL), progress=False)
    second = train(TrainConfig(steps=3, seed=1, **SMALL), progress=False)
    assert not torch.equal(parameters_of(first)[0], parameters_of(second)[0])


@pytest.mark.parametrize("method", ["cd_mh", "adjusted_cd", "cnce"])
def test_resumed_run_matches_uninterrupted_run(tmp_path, method):
    config = TrainConfig(method=method, step_size=0.05, steps=12, checkpoint_every=5, **SMALL)
    uninterrupted = train(config, checkpoint_path=tmp_path / "full.pt", progress=False)

    partial = Trainer(config, checkpoint_path=tmp_path / "part.pt", progress=False)
    for _ in range(5):
        partial.train_step()
    partial.save_checkpoint()
    del partial

    resumed = Trainer.from_checkpoint(tmp_path / "part.pt", progress=False)
    assert resumed.step == 5
    resumed.run()
    assert_same_parameters(parameters_of(uninterrupted), parameters_of(resumed))
    assert resumed.history.keys() == uninterrupted.history.keys()
    for key, values in uninterrupted.history.items():
        assert np.array_equal(resumed.history[key], values, equal_nan=True), key


def test_checkpoint_written_every_n_steps(tmp_path):
    config = TrainConfig(steps=7, checkpoint_every=3, **SMALL)
    path = tmp_path / "run.pt"
    trainer = Trainer(config, checkpoint_path=path, progress=False)
    for _ in range(3):
        trainer.train_step()
    assert not path.exists()
    trainer.run()
    state = torch.load(path, weights_only=False)
    assert state["step"] == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.pt"]


def test_resume_rejects_other_data(tmp_path):
    config = TrainConfig(steps=2, **SMALL)
    train(config, checkpoint_path=tmp_path / "run.pt", progress=False)
    with pytest.raises(ValueError, match="data does not match the data of the checkpoint"):
        Trainer.from_checkpoint(tmp_path / "run.pt", data=torch.zeros(10, 10), progress=False)


def test_divergence_stops_with_step_and_keeps_checkpoint(tmp_path):
    config = TrainConfig(steps=10, checkpoint_every=1, **SMALL)
    trainer = Trainer(config, checkpoint_path=tmp_path / "run.pt", progress=False)
    original = trainer.estimator

    def poisoned(model, x, generator):
        out = original(model, x, generator)
        if trainer.step == 3:
            out.loss = out.loss * float("nan")
        return out

    trainer.estimator = poisoned
    with pytest.raises(TrainingDiverged, match=r"diverged at step 3: .*method='adjusted_cd'"):
        trainer.run()
    assert torch.load(tmp_path / "run.pt", weights_only=False)["step"] == 3


BAD_CONFIGS = [
    ({"method": "pcd"}, "method must be one of 'nce', 'cnce', 'cd', 'cd_mh', 'adjusted_cd', got 'pcd'"),
    ({"step_size": 0.0}, "step_size must be a finite number > 0, got 0.0"),
    ({"step_size": -0.1}, "step_size must be a finite number > 0, got -0.1"),
    ({"step_size": float("nan")}, "step_size must be a finite number > 0, got nan"),
    ({"step_size": float("inf")}, "step_size must be a finite number > 0, got inf"),
    ({"k": 0}, "k must be an integer >= 1, got 0"),
    ({"k": 2.5}, "k must be an integer >= 1, got 2.5"),
    ({"method": "cnce", "k": 5}, "k must be 1 for method 'cnce', got 5"),
    ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
    ({"steps": 0}, "steps must be an integer >= 1, got 0"),
    ({"width": 0}, "width must be an integer >= 1, got 0"),
    ({"depth": 1}, "depth must be an integer >= 2, got 1"),
    ({"lr_start": float("nan")}, "lr_start must be a finite number > 0, got nan"),
    ({"momentum": 1.0}, r"momentum must lie in \[0, 1\), got 1.0"),
    ({"dtype": "float16"}, "dtype must be one of 'float32', 'float64', got 'float16'"),
    ({"device": "tpu:0"}, "device must name a torch device, got 'tpu:0'"),
    ({"device": "meta"}, r"device must be 'cpu' or a CUDA device \('cuda', 'cuda:N'\), got 'meta'"),
    ({"device": "mps"}, "device must be 'cpu' or a CUDA device"),
    ({"device": "cpu:7"}, "device must be 'cpu' or a CUDA device"),
    ({"seed": -1}, "seed must be an integer >= 0, got -1"),
]


@pytest.mark.parametrize("kwargs, message", BAD_CONFIGS)
def test_config_rejects_bad_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


@pytest.mark.parametrize(
    "data, message",
    [
        (torch.zeros(20, 3), r"data must have shape \(n, 10\) with n >= 1, got \(20, 3\)"),
        (torch.zeros(20), r"data must have shape \(n, 10\) with n >= 1, got \(20,\)"),
        (torch.zeros(20, 10, dtype=torch.int64), "data must be a floating-point tensor"),
        (torch.full((4, 10), float("nan")), "data must be finite, got 4 rows with NaN or inf"),
    ],
)
def test_trainer_rejects_bad_data(data, message):
    with pytest.raises(ValueError, match=message):
        Trainer(TrainConfig(steps=1, **SMALL), data=data, progress=False)


def test_float64_training_keeps_dtype():
    trainer = train(TrainConfig(steps=2, dtype="float64", **SMALL), progress=False)
    assert all(p.dtype == torch.float64 for p in trainer.model.parameters())


def test_config_accepts_numpy_integers():
    config = TrainConfig(steps=np.int64(3), batch_size=np.int32(8), **{k: v for k, v in SMALL.items() if k != "batch_size"})
    assert config.steps == 3
    assert isinstance(config.steps, int)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lr_start": 1e-4, "lr_end": 1.0}, "lr_end must be <= lr_start"),
        ({"momentum": "0.9"}, "momentum must be a number in"),
    ],
)
def test_config_rejects_growing_rate_and_text_momentum(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "could not be read"),
        (b"not a checkpoint at all", "could not be read"),
    ],
)
def test_resume_rejects_corrupt_file(tmp_path, content, message):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        Trainer.from_checkpoint(path, progress=False)


def test_resume_rejects_truncated_checkpoint(tmp_path):
    config = TrainConfig(steps=2, **SMALL)
    path = tmp_path / "run.pt"
    train(config, checkpoint_path=path, progress=False)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or not a cdlib checkpoint"):
        Trainer.from_checkpoint(path, progress=False)


def test_resume_rejects_foreign_state_dict(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"weight": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="missing version, config"):
        Trainer.from_checkpoint(path, progress=False)


def test_resume_rejects_missing_file(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        Trainer.from_checkpoint(tmp_path / "nope.pt", progress=False)


def test_divergence_without_checkpoint_says_so():
    trainer = Trainer(TrainConfig(steps=5, **SMALL), progress=False)
    original = trainer.estimator

    def poisoned(model, x, generator):
        out = original(model, x, generator)
        out.loss = out.loss * float("nan")
        return out

    trainer.estimator = poisoned
    with pytest.raises(TrainingDiverged, match="no checkpoint was written"):
        trainer.run()
