"""The spiral experiment as named runs: presets, configurations and studies.

A *configuration* is one of the five learning set-ups of the paper's appendix D
(a method, its step size or noise std, and a factor on the learning rate). A
*preset* fixes the scale: network, number of updates, optimiser and the sizes of
the evaluation. A *study* is the set of runs behind one figure or table:

- ``table``: every configuration, once per seed of the preset (the KL table and
  the paper's Figures 3 and 4);
- ``sweep``: CNCE, CD, CD with MH and adjusted CD at every step size of
  :data:`SWEEP_STEP_SIZES`, seed 0 (the paper's Figure 6);
- ``steps``: the same four configurations at their chosen step sizes, trained for
  each length in the preset's ``step_counts``, seed 0 (the paper's Figure 7);
- ``optimizer``: CNCE with the small std, CD with MH and adjusted CD at the
  preset's scale but with the paper's optimiser (:data:`PAPER_OPTIMIZER`), seed 0,
  to measure what a preset that changes the optimiser gains.

A run is identified by its :class:`RunSpec`, and runs shared by several studies
are trained once. The learning-rate schedule always spans the whole run, so a run of
20,000 updates is not the first half of a run of 40,000.

"The paper" is Yair and Michaeli, "Contrastive Divergence Learning is a Time
Reversal Adversarial Game", ICLR 2021; its appendix D lists the configurations.
"""

import dataclasses
from dataclasses import dataclass
from typing import Optional

from ._validation import check_choice
from .train import TrainConfig


@dataclass(frozen=True)
class Preset:
    """The scale of a reproduction; see the module docstring.

    The evaluation sizes are: ``kl_data`` draws from p and ``kl_proposal`` proposal
    draws for the importance-sampled KL, a ``grid_resolution`` squared grid for the
    densities on planes, and ``model_samples`` MALA chains of ``sampler_steps``
    steps for the samples of the learned model.
    """

    name: str
    width: int
    depth: int
    steps: int
    batch_size: int
    optimizer: str
    lr_start: float
    lr_end: float
    seeds: tuple
    step_counts: tuple
    checkpoint_every: int
    kl_data: int
    kl_proposal: int
    min_ess: float
    grid_resolution: int
    model_samples: int
    sampler_steps: int
    device: str = "cpu"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS = {
    # Seconds in all: checks that every study runs end to end, nothing more.
    "smoke": Preset(
        name="smoke",
        width=8,
        depth=8,
        steps=20,
        batch_size=32,
        optimizer="adam",
        lr_start=1e-3,
        lr_end=1e-5,
        seeds=(0, 1, 2),
        step_counts=(10, 20),
        checkpoint_every=10,
        kl_data=500,
        kl_proposal=2000,
        # Accepts every KL estimate, so that the smoke run exercises every branch
        # of the chapter; the smoke preset's numbers mean nothing.
        min_ess=1.0,
        grid_resolution=24,
        model_samples=100,
        sampler_steps=10,
    ),
    # Two CPU cores; see the spiral experiments chapter for why it differs from
    # the paper's scale (narrower network, fewer updates, Adam instead of SGD).
    "cpu": Preset(
        name="cpu",
        width=128,
        depth=8,
        steps=10_000,
        batch_size=256,
        optimizer="adam",
        lr_start=1e-3,
        lr_end=1e-5,
        seeds=(0, 1, 2),
        step_counts=(2_500, 5_000, 10_000, 20_000),
        checkpoint_every=1_000,
        kl_data=20_000,
        kl_proposal=60_000,
        min_ess=200.0,
        grid_resolution=96,
        model_samples=1000,
        sampler_steps=1000,
    ),
    # The paper's appendix D: width 512, 8 layers, 100,000 SGD updates with
    # momentum 0.9 and the rate decaying from 1e-2 to 1e-4. Meant for a GPU.
    "paper": Preset(
        name="paper",
        width=512,
        depth=8,
        steps=100_000,
        batch_size=256,
        optimizer="sgd",
        lr_start=1e-2,
        lr_end=1e-4,
        seeds=(0, 1, 2),
        step_counts=(10_000, 20_000, 50_000, 100_000, 200_000),
        checkpoint_every=5_000,
        kl_data=20_000,
        kl_proposal=200_000,
        min_ess=200.0,
        grid_resolution=128,
        model_samples=1000,
        sampler_steps=5000,
        device="cuda",
    ),
}


@dataclass(frozen=True)
class Configuration:
    """One learning set-up of the paper's appendix D."""

    label: str
    method: str
    step_size: float
    lr_scale: float = 1.0


CONFIGURATIONS = {
    "cnce_large": Configuration("CNCE, large std", "cnce", 0.3),
    "cnce_small": Configuration("CNCE, small std", "cnce", 0.0075),
    # The paper lowered the learning rate of CD without correction tenfold
    # because the run diverged at the full rate.
    "cd": Configuration("CD without correction", "cd", 0.0075, lr_scale=0.1),
    "cd_mh": Configuration("CD with MH", "cd_mh", 0.0125),
    "adjusted_cd": Configuration("adjusted CD", "adjusted_cd", 0.0125),
}

# The step sizes (noise stds for CNCE) of the paper's sweep, its Figure 6.
SWEEP_STEP_SIZES = (0.005, 0.0075, 0.01, 0.0125, 0.015, 0.0175)
# The configurations of the sweep and of the training-length study.
SWEPT_CONFIGURATIONS = ("cnce_small", "cd", "cd_mh", "adjusted_cd")
STUDIES = ("table", "sweep", "steps", "optimizer")
# The paper's optimiser: SGD with momentum 0.9, rate decaying from 1e-2 to 1e-4.
PAPER_OPTIMIZER = {"optimizer": "sgd", "lr_start": 1e-2, "lr_end": 1e-4}
OPTIMIZER_CONFIGURATIONS = ("cnce_small", "cd_mh", "adjusted_cd")
# Langevin steps per chain for the CD configurations, as in the paper.
CHAIN_LENGTH = 5


@dataclass(frozen=True)
class RunSpec:
    """One training run: a configuration, possibly at another step size or length.

    ``optimizer`` is None for the preset's optimiser and ``"paper"`` for
    :data:`PAPER_OPTIMIZER`.
    """

    configuration: str
    method: str
    step_size: float
    lr_scale: float
    steps: int
    seed: int
    optimizer: Optional[str] = None

    @property
    def name(self) -> str:
        """A file-system-safe name that differs for every distinct run."""
        suffix = "" if self.optimizer is None else f"_{self.optimizer}_optimizer"
        return (
            f"{self.method}_eps{self.step_size:g}_lr{self.lr_scale:g}"
            f"_steps{self.steps}_seed{self.seed}{suffix}"
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def get_preset(name: str) -> Preset:
    """Return the preset called ``name``; raise naming the allowed ones otherwise."""
    return PRESETS[check_choice("preset", name, tuple(PRESETS))]


def run_spec(configuration: str, preset: Preset, **changes) -> RunSpec:
    """Return the run of ``configuration`` at the preset's scale, with ``changes``."""
    check_choice("configuration", configuration, tuple(CONFIGURATIONS))
    base = CONFIGURATIONS[configuration]
    fields = dict(
        configuration=configuration,
        method=base.method,
        step_size=base.step_size,
        lr_scale=base.lr_scale,
        steps=preset.steps,
        seed=preset.seeds[0],
    )
    fields.update(changes)
    return RunSpec(**fields)


def study_runs(study: str, preset: Preset) -> list:
    """Return the runs of ``study`` (one of :data:`STUDIES`) at the preset's scale."""
    check_choice("study", study, STUDIES)
    if study == "table":
        return [
            run_spec(name, preset, seed=seed)
            for name in CONFIGURATIONS
            for seed in preset.seeds
        ]
    if study == "sweep":
        return [
            run_spec(name, preset, step_size=step_size)
            for name in SWEPT_CONFIGURATIONS
            for step_size in SWEEP_STEP_SIZES
        ]
    if study == "steps":
        return [
            run_spec(name, preset, steps=steps)
            for name in SWEPT_CONFIGURATIONS
            for steps in preset.step_counts
        ]
    return [run_spec(name, preset, optimizer="paper") for name in OPTIMIZER_CONFIGURATIONS]


def all_runs(preset: Preset, studies=STUDIES) -> list:
    """Return the runs of ``studies`` without duplicates, in a stable order."""
    runs = {}
    for study in studies:
        for spec in study_runs(study, preset):
            runs.setdefault(spec.name, spec)
    return list(runs.values())


def train_config(spec: RunSpec, preset: Preset, device=None) -> TrainConfig:
    """Return the :class:`TrainConfig` of ``spec`` at the preset's scale."""
    check_choice("optimizer", spec.optimizer, (None, "paper"))
    cd_method = spec.method not in ("nce", "cnce")
    optimizer = {"optimizer": preset.optimizer, "lr_start": preset.lr_start,
                 "lr_end": preset.lr_end}
    if spec.optimizer == "paper":
        optimizer = PAPER_OPTIMIZER
    return TrainConfig(
        method=spec.method,
        step_size=spec.step_size,
        k=CHAIN_LENGTH if cd_method else 1,
        batch_size=preset.batch_size,
        steps=spec.steps,
        width=preset.width,
        depth=preset.depth,
        lr_scale=spec.lr_scale,
        **optimizer,
        seed=spec.seed,
        device=preset.device if device is None else device,
        checkpoint_every=preset.checkpoint_every,
    )
