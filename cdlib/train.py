"""Training loop: a validated configuration, SGD with momentum, checkpoints.

A run is fully determined by its :class:`TrainConfig` and data. Its random streams
(model initialisation, mini-batch selection, MCMC) come from three generators seeded
from ``config.seed``, and a checkpoint stores all of them, so a run continued from a
checkpoint ends with the same parameters as an uninterrupted one.
"""

import dataclasses
import hashlib
import math
import os
import tempfile
import time
from dataclasses import dataclass
from numbers import Real
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from . import __version__
from ._validation import check_batch, check_choice, check_int_at_least, check_positive
from .data import Spiral
from .estimators import METHODS, make_estimator
from .models import EnergyMLP

DTYPES = {"float32": torch.float32, "float64": torch.float64}
OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one training run; every field is checked on construction.

    ``step_size`` is the Langevin step eps for the CD methods, the noise std for
    ``cnce`` and the reference std for ``nce``. ``k`` defaults to 5 for the CD methods
    and must be 1 for ``nce`` and ``cnce``. The learning rate decays exponentially
    from ``lr_start * lr_scale`` to ``lr_end * lr_scale`` over ``steps`` updates.
    ``checkpoint_every`` = 0 writes a checkpoint only at the end of the run.
    """

    method: str = "adjusted_cd"
    step_size: float = 0.0125
    k: Optional[int] = None
    batch_size: int = 256
    steps: int = 1000
    width: int = 512
    depth: int = 8
    lr_start: float = 1e-2
    lr_end: float = 1e-4
    lr_scale: float = 1.0
    momentum: float = 0.9
    optimizer: str = "sgd"
    n_data: int = 50_000
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    checkpoint_every: int = 0

    def __post_init__(self):
        check_choice("method", self.method, METHODS)
        check_positive("step_size", self.step_size)
        if self.k is None:
            object.__setattr__(self, "k", 1 if self.method in ("nce", "cnce") else 5)
        check_int_at_least("k", self.k, 1)
        if self.method in ("nce", "cnce") and self.k != 1:
            raise ValueError(f"k must be 1 for method {self.method!r}, got {self.k!r}")
        for name, minimum in (("batch_size", 1), ("steps", 1), ("width", 1), ("depth", 2)):
            # NumPy integers pass and are stored as int, so the config pickles plainly.
            object.__setattr__(self, name, check_int_at_least(name, getattr(self, name), minimum))
        check_positive("lr_start", self.lr_start)
        check_positive("lr_end", self.lr_end)
        check_positive("lr_scale", self.lr_scale)
        if self.lr_end > self.lr_start:
            raise ValueError(
                f"lr_end must be <= lr_start (the rate decays), got lr_start="
                f"{self.lr_start!r} and lr_end={self.lr_end!r}"
            )
        momentum = self.momentum
        if isinstance(momentum, bool) or not isinstance(momentum, Real):
            raise ValueError(f"momentum must be a number in [0, 1), got {momentum!r}")
        if not (0.0 <= momentum < 1.0):
            raise ValueError(f"momentum must lie in [0, 1), got {momentum!r}")
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_int_at_least("n_data", self.n_data, 1)
        check_int_at_least("seed", self.seed, 0)
        check_choice("dtype", self.dtype, tuple(DTYPES))
        check_int_at_least("checkpoint_every", self.checkpoint_every, 0)
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError) as error:
            raise ValueError(f"device must name a torch device, got {self.device!r}") from error
        if device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index):
            raise ValueError(
                f"device must be 'cpu' or a CUDA device ('cuda', 'cuda:N'), got {self.device!r}"
            )
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device is {self.device!r} but CUDA is not available")
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise ValueError(
                f"device is {self.device!r} but only {torch.cuda.device_count()} CUDA "
                "devices are visible"
            )

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class TrainingDiverged(RuntimeError):
    """Raised when the loss or the contrastive samples stop being finite."""


HISTORY_KEYS = (
    "loss",
    "game_loss",
    "alpha_median",
    "alpha_q10",
    "alpha_q90",
    "log10_alpha_median",
    "acceptance",
    "lr",
)


class Trainer:
    """Train an :class:`EnergyMLP` on ``data`` with the estimator the config names.

    ``data`` defaults to ``config.n_data`` spiral samples drawn with the run's seed.
    With ``checkpoint_path`` set, a checkpoint is written atomically every
    ``config.checkpoint_every`` steps and at the end; :meth:`from_checkpoint`
    continues a run from such a file.
    """

    def __init__(
        self,
        config: TrainConfig,
        data: Optional[torch.Tensor] = None,
        checkpoint_path=None,
        progress: bool = True,
    ):
        if not isinstance(config, TrainConfig):
            raise ValueError(f"config must be a TrainConfig, got {type(config).__name__}")
        self.config = config
        self.checkpoint_path = None if checkpoint_path is None else Path(checkpoint_path)
        self.progress = progress
        self.device = torch.device(config.device)
        init_seed, data_seed, mcmc_seed = _spawn_seeds(config.seed, 3)

        if data is None:
            data = Spiral().sample(
                config.n_data, torch.Generator().manual_seed(data_seed)
            )
        check_batch("data", data, 10)
        self.data = data.to(device=self.device, dtype=config.torch_dtype)
        self.data_fingerprint = _fingerprint(self.data)

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            model = EnergyMLP(dim=10, width=config.width, depth=config.depth)
        self.model = model.to(device=self.device, dtype=config.torch_dtype)
        self.estimator = make_estimator(config.method, config.step_size, config.k)

        self.optimizer = _make_optimizer(config, self.model.parameters())
        gamma = (config.lr_end / config.lr_start) ** (1.0 / config.steps)
        self.scheduler = torch.optim.lr_scheduler.ExponentialLR(self.optimizer, gamma)
        self.batch_generator = torch.Generator().manual_seed(data_seed + 1)
        self.mcmc_generator = torch.Generator(self.device).manual_seed(mcmc_seed)
        self.step = 0
        # Seconds spent in train_step, summed over every process that ran this run.
        self.elapsed_seconds = 0.0
        self.history = {key: [] for key in HISTORY_KEYS}

    def train_step(self) -> None:
        """Apply one update and append its diagnostics to the history."""
        config = self.config
        index = torch.randint(
            self.data.shape[0], (config.batch_size,), generator=self.batch_generator
        )
        x = self.data[index.to(self.device)]
        out = self.estimator(self.model, x, self.mcmc_generator)
        bad_samples = int((~torch.isfinite(out.x_tilde)).any(1).sum())
        # log_w is built from log p_theta at the states each chain visited, so a
        # non-finite energy shows up there.
        bad_energies = int((~torch.isfinite(out.log_w)).sum())
        if not torch.isfinite(out.loss) or bad_samples or bad_energies:
            raise TrainingDiverged(
                f"training diverged at step {self.step}: loss={out.loss.item()!r}, "
                f"non-finite contrastive samples={bad_samples}, non-finite "
                f"log-weights={bad_energies} ({self.describe()})" + self._checkpoint_note()
            )
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        if not all(torch.isfinite(p).all() for p in self.model.parameters()):
            raise TrainingDiverged(
                f"training diverged at step {self.step}: the update made parameters "
                f"non-finite ({self.describe()})" + self._checkpoint_note()
            )
        self.scheduler.step()
        self.step += 1
        self._record(out, lr)

    def describe(self) -> str:
        """Return the run's main settings, for error messages."""
        config = self.config
        return (
            f"method={config.method!r}, step_size={config.step_size!r}, k={config.k}, "
            f"width={config.width}, steps={config.steps}, lr_scale={config.lr_scale!r}, "
            f"optimizer={config.optimizer!r}, seed={config.seed}"
        )

    def _checkpoint_note(self) -> str:
        if self.checkpoint_path is None or not self.checkpoint_path.exists():
            return "; no checkpoint was written"
        return f"; the last good checkpoint is kept at {str(self.checkpoint_path)!r}"

    def _record(self, out, lr: float) -> None:
        alpha = out.alpha.double()
        quantiles = torch.quantile(alpha, torch.tensor([0.1, 0.5, 0.9], dtype=alpha.dtype))
        log_alpha_median = torch.nn.functional.logsigmoid(out.log_w.double()).median()
        game = float("nan") if out.game_loss is None else out.game_loss.item()
        acceptance = float("nan") if out.acceptance is None else out.acceptance.mean().item()
        row = {
            "loss": out.loss.item(),
            "game_loss": game,
            "alpha_median": quantiles[1].item(),
            "alpha_q10": quantiles[0].item(),
            "alpha_q90": quantiles[2].item(),
            "log10_alpha_median": log_alpha_median.item() / math.log(10.0),
            "acceptance": acceptance,
            "lr": lr,
        }
        for key, value in row.items():
            self.history[key].append(value)

    def run(self) -> dict:
        """Train until ``config.steps`` updates are done; return the history."""
        every = self.config.checkpoint_every
        bar = tqdm(
            total=self.config.steps,
            initial=self.step,
            disable=not self.progress,
            desc=self.config.method,
            mininterval=2.0,
        )
        with bar:
            while self.step < self.config.steps:
                started = time.perf_counter()
                self.train_step()
                self.elapsed_seconds += time.perf_counter() - started
                bar.update(1)
                if every and self.step % every == 0:
                    bar.set_postfix(alpha=f"{self.history['alpha_median'][-1]:.3g}")
                    self.save_checkpoint()
        self.save_checkpoint()
        return self.history

    def state_dict(self) -> dict:
        return {
            "version": __version__,
            "config": self.config.to_dict(),
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "batch_generator": self.batch_generator.get_state(),
            "mcmc_generator": self.mcmc_generator.get_state(),
            "history": self.history,
            "data_fingerprint": self.data_fingerprint,
            "elapsed_seconds": self.elapsed_seconds,
        }

    def save_checkpoint(self, path=None) -> Optional[Path]:
        """Write the run's state to ``path`` (default: the trainer's checkpoint path).

        The file is written to a temporary name in the same folder and then renamed,
        so a reader sees either the old checkpoint or the new one, never a partial file.
        """
        path = self.checkpoint_path if path is None else Path(path)
        if path is None:
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        os.close(handle)
        try:
            torch.save(self.state_dict(), tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return path

    @classmethod
    def from_checkpoint(
        cls, path, data: Optional[torch.Tensor] = None, progress: bool = True
    ) -> "Trainer":
        """Rebuild a trainer from a checkpoint so that :meth:`run` continues it.

        ``data`` must be the tensor the run was started with (its fingerprint is
        checked); the default regenerates the spiral data from the seed.
        """
        state = _load_checkpoint(path)
        config = TrainConfig(**state["config"])
        trainer = cls(config, data=data, checkpoint_path=path, progress=progress)
        if trainer.data_fingerprint != state["data_fingerprint"]:
            raise ValueError(
                f"data does not match the data of the checkpoint {str(path)!r}; "
                "pass the tensor the run was started with"
            )
        trainer.model.load_state_dict(state["model"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.scheduler.load_state_dict(state["scheduler"])
        trainer.batch_generator.set_state(state["batch_generator"])
        trainer.mcmc_generator.set_state(state["mcmc_generator"])
        trainer.step = state["step"]
        trainer.history = state["history"]
        trainer.elapsed_seconds = state.get("elapsed_seconds", 0.0)
        return trainer


def _make_optimizer(config: TrainConfig, parameters) -> torch.optim.Optimizer:
    lr0 = config.lr_start * config.lr_scale
    if config.optimizer == "adam":
        return torch.optim.Adam(parameters, lr=lr0, betas=(config.momentum, 0.999))
    return torch.optim.SGD(parameters, lr=lr0, momentum=config.momentum)


def train(config: TrainConfig, data=None, checkpoint_path=None, progress=True) -> Trainer:
    """Train a model from scratch with ``config``; return the finished trainer."""
    trainer = Trainer(config, data=data, checkpoint_path=checkpoint_path, progress=progress)
    trainer.run()
    return trainer


CHECKPOINT_KEYS = (
    "version",
    "config",
    "step",
    "model",
    "optimizer",
    "scheduler",
    "batch_generator",
    "mcmc_generator",
    "history",
    "data_fingerprint",
)


def _load_checkpoint(path) -> dict:
    """Read a checkpoint written by :meth:`Trainer.save_checkpoint`.

    The file is unpickled with ``weights_only=False`` because it stores the history
    and the generator states, so load only checkpoints you wrote yourself.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {str(path)!r} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise ValueError(
            f"checkpoint {str(path)!r} could not be read ({type(error).__name__}: "
            f"{error}); it is truncated or not a cdlib checkpoint"
        ) from error
    missing = [key for key in CHECKPOINT_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise ValueError(
            f"checkpoint {str(path)!r} is not a cdlib training checkpoint: "
            f"missing {', '.join(missing)}"
        )
    if state["version"] != __version__:
        raise ValueError(
            f"checkpoint {str(path)!r} was written by cdlib {state['version']}, "
            f"this is cdlib {__version__}; continue it with that version"
        )
    return state


def _spawn_seeds(seed: int, count: int) -> list[int]:
    """Derive ``count`` independent 63-bit seeds from one seed."""
    children = np.random.SeedSequence(seed).spawn(count)
    return [int(child.generate_state(1, dtype=np.uint64)[0] >> 1) for child in children]


def _fingerprint(data: torch.Tensor) -> str:
    array = data.detach().to("cpu", torch.float64).contiguous().numpy()
    return hashlib.sha256(array.tobytes()).hexdigest()
