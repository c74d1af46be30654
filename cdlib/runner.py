"""Train, evaluate and store the runs of the spiral experiment.

Command line (from the repository root, with the environment of the README)::

    python -m cdlib.runner --preset cpu --jobs 2 --retrain

trains every run of the preset (see :mod:`cdlib.experiments`) and rewrites its
stored results under ``book/results/<preset>/``. Checkpoints go to
``runs/<preset>/<run name>/checkpoint.pt``. A command that is interrupted is
continued by the same command without ``--retrain``: finished runs are skipped and
the others resume from their last checkpoint, ending exactly where an
uninterrupted run would.
"""

import argparse
import concurrent.futures
import contextlib
import ctypes
import ctypes.util
import datetime
import fcntl
import logging
import math
import multiprocessing
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from . import __version__
from ._validation import check_int_at_least
from .data import Spiral
from .experiments import STUDIES, all_runs, get_preset, train_config
from .kernels import MALA, run_chain
from .metrics import (
    NonFiniteLogDensity,
    kl_divergence_is,
    model_log_density,
    normalize_on_grid,
    plane_grid,
    slice_kl,
)
from .provenance import cpu_model, package_versions
from .results import RESULT_FILE, check_current, git_commit, read_run, write_run
from .train import Trainer, TrainingDiverged, _spawn_seeds

LOG = logging.getLogger("cdlib.runner")
REPOSITORY = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS = REPOSITORY / "book" / "results"
DEFAULT_WORK = REPOSITORY / "runs"
# The planes of the stored densities and the slice KLs: (axes, u range, v range).
PLANES = {
    "e1-e2": ((0, 1), (-1.25, 1.25), (-1.25, 1.25)),
    "e1-e3": ((0, 2), (-1.25, 1.25), (-0.06, 0.06)),
}
# Bins of the stored alpha history: at most this many points per curve.
HISTORY_BINS = 500
# Data points whose contrastive samples are stored for the figures.
CONTRASTIVE_POINTS = 500
# MALA step of the sampler that draws from each learned model, in data units.
SAMPLER_STEP_SIZE = 0.0125


def train_run(spec, preset, work_root: Path, device=None, progress=False):
    """Train ``spec`` from its last checkpoint, or from scratch if there is none.

    Returns ``(trainer, error)``, where ``error`` is the :class:`TrainingDiverged`
    that stopped a diverged run and None otherwise.
    """
    config = train_config(spec, preset, device)
    checkpoint = Path(work_root) / preset.name / spec.name / "checkpoint.pt"
    if checkpoint.exists():
        try:
            trainer = Trainer.from_checkpoint(checkpoint, progress=progress)
        except ValueError as error:
            raise ValueError(
                f"run {spec.name}: {error}. Delete {str(checkpoint)!r} to train the run "
                "from scratch, or rerun with --retrain"
            ) from error
        if trainer.config != config:
            stored, wanted = trainer.config.to_dict(), config.to_dict()
            fields = ", ".join(
                f"{key}={stored[key]!r} instead of {wanted[key]!r}"
                for key in wanted if stored[key] != wanted[key]
            )
            raise ValueError(
                f"checkpoint {str(checkpoint)!r} belongs to another configuration "
                f"({fields}); delete it or rerun with --retrain"
            )
        LOG.info("%s: resuming at step %d of %d", spec.name, trainer.step, config.steps)
    else:
        trainer = Trainer(config, checkpoint_path=checkpoint, progress=progress)
    try:
        trainer.run()
    except TrainingDiverged as error:
        return trainer, error
    return trainer, None


def evaluate_run(trainer, preset) -> tuple[dict, dict]:
    """Measure a finished run; return ``(metrics, arrays)`` for :func:`write_run`.

    Every draw comes from a generator seeded from the run's seed, so evaluating the
    same trained model twice gives the same numbers.
    """
    kl_seed, contrastive_seed, sampler_seed = _spawn_seeds(trainer.config.seed + 7919, 3)
    model = trainer.model
    spiral = Spiral()
    estimate = kl_divergence_is(
        model,
        spiral,
        torch.Generator().manual_seed(kl_seed),
        n_data=preset.kl_data,
        n_proposal=preset.kl_proposal,
        min_ess=preset.min_ess,
    )
    metrics = {
        "kl": estimate.kl if estimate.trusted else None,
        "kl_standard_error": estimate.standard_error if estimate.trusted else None,
        "kl_estimate": estimate.to_dict(),
    }
    arrays = {}
    for name, (axes, u_range, v_range) in PLANES.items():
        grid = plane_grid(axes, u_range, v_range, resolution=preset.grid_resolution)
        metrics[f"slice_kl_{name}"] = slice_kl(model, spiral, grid)
        if name == "e1-e2":
            log_q = normalize_on_grid(model_log_density(model, grid.points), grid.cell_area)
            arrays["log_density_e1e2"] = log_q.reshape(grid.shape).float().numpy()
    arrays.update(_model_samples(model, preset, sampler_seed))
    for name, values in arrays.items():
        if not np.isfinite(values).all():
            raise NonFiniteLogDensity(f"the stored array {name} has NaN or infinite values")
    for name in PLANES:
        if not math.isfinite(metrics[f"slice_kl_{name}"]):
            raise NonFiniteLogDensity(f"the KL on the {name} slice is not finite")
    metrics.update(_history_metrics(trainer.history))
    arrays.update(_binned_history(trainer.history))
    arrays.update(_contrastive_samples(trainer, contrastive_seed))
    metrics["sampler_acceptance"] = float(arrays.pop("sampler_acceptance"))
    return metrics, arrays


def _history_metrics(history: dict) -> dict:
    """Final alpha and acceptance: medians and means over the last 1% of updates."""
    tail = max(1, len(history["alpha_median"]) // 100)
    acceptance = np.asarray(history["acceptance"][-tail:], dtype=float)
    return {
        "final_alpha_median": float(np.median(history["alpha_median"][-tail:])),
        "final_log10_alpha_median": float(
            np.median(history["log10_alpha_median"][-tail:])
        ),
        "acceptance": None if np.isnan(acceptance).all() else float(acceptance.mean()),
        "final_loss": float(np.mean(history["loss"][-tail:])),
    }


def _binned_history(history: dict) -> dict:
    """Return the per-update alpha curves reduced to medians over equal bins."""
    n = len(history["alpha_median"])
    if n == 0:
        return {}
    edges = np.unique(np.linspace(0, n, min(HISTORY_BINS, n) + 1).astype(int))
    out = {"history_step": (edges[1:] + edges[:-1]) / 2.0}
    for key in ("alpha_median", "alpha_q10", "alpha_q90", "log10_alpha_median", "loss"):
        values = np.asarray(history[key], dtype=float)
        out[f"history_{key}"] = np.array(
            [np.median(values[a:b]) for a, b in zip(edges[:-1], edges[1:])]
        )
    return out


def _contrastive_samples(trainer, seed: int) -> dict:
    """Return data points and their contrastive samples under the trained model."""
    generator = torch.Generator().manual_seed(seed)
    index = torch.randint(trainer.data.shape[0], (CONTRASTIVE_POINTS,), generator=generator)
    x = trainer.data[index]
    out = trainer.estimator(trainer.model, x, torch.Generator(trainer.device).manual_seed(seed))
    return {
        "contrastive_x": x[:, :3].detach().cpu().float().numpy(),
        "contrastive_x_tilde": out.x_tilde[:, :3].detach().cpu().float().numpy(),
        "contrastive_alpha": out.alpha.detach().cpu().double().numpy(),
    }


def _model_samples(model, preset, seed: int) -> dict:
    """Draw from the learned model with MALA chains started from a broad Gaussian."""
    generator = torch.Generator().manual_seed(seed)
    parameter = next(model.parameters())
    start = 0.5 * torch.randn(preset.model_samples, 10, generator=generator)
    start[:, 2:] *= 0.02
    start = start.to(parameter)
    chain_generator = torch.Generator(parameter.device).manual_seed(seed)
    chain = run_chain(MALA(SAMPLER_STEP_SIZE), model, start, preset.sampler_steps, chain_generator)
    return {
        "model_samples": chain.xk[:, :3].detach().cpu().float().numpy(),
        "sampler_acceptance": float(chain.acceptance.mean()),
    }


def provenance(trainer, commit: dict) -> dict:
    """Return the facts that tie a run's result to its code and machine.

    ``commit`` is :func:`~cdlib.results.git_commit` as read when the training
    command started, because the checkout may change while the command runs.
    """
    device = torch.device(trainer.config.device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    return {
        "cdlib_version": __version__,
        **commit,
        "packages": package_versions(("torch", "numpy")),
        "device": device_name,
        "torch_threads": torch.get_num_threads(),
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
    }


def execute_run(
    spec, preset, results_root: Path, work_root: Path, device=None, commit=None
) -> dict:
    """Train (or resume), evaluate and store one run; return its record.

    Returns None, doing nothing, when a current result of the run is already stored.
    ``commit`` defaults to the git commit checked out when this function starts.
    """
    commit = git_commit() if commit is None else commit
    work_folder = Path(work_root) / preset.name / spec.name
    results_folder = Path(results_root) / preset.name / spec.name
    with _exclusive(work_folder):
        # Another command may have finished this run while this one waited.
        if stored_result_is_current(results_folder, spec, preset):
            LOG.info("%s: already stored by another command; skipped", spec.name)
            return None
        # Left behind by a process killed while writing; the lock makes them stale.
        for folder in (work_folder, results_folder):
            for leftover in folder.glob("*.tmp"):
                leftover.unlink()
        trainer, error = train_run(spec, preset, work_root, device)
        record = _finish_run(spec, preset, results_root, trainer, error, commit)
    return record


@contextlib.contextmanager
def _exclusive(run_folder: Path):
    """Hold an exclusive lock on a run's folder, so two commands cannot train it at once."""
    run_folder.mkdir(parents=True, exist_ok=True)
    with open(run_folder / "lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(
                f"run folder {str(run_folder)!r} is locked by another process that is "
                "training this run; wait for it or stop it first"
            ) from None
        yield


def _finish_run(spec, preset, results_root, trainer, error, commit) -> dict:
    started = time.perf_counter()
    record = {
        "name": spec.name,
        "spec": spec.to_dict(),
        "config": trainer.config.to_dict(),
        "seed": trainer.config.seed,
        "preset": preset.to_dict(),
        "steps_done": trainer.step,
        "train_seconds": trainer.elapsed_seconds,
        "provenance": provenance(trainer, commit),
    }
    if error is None:
        try:
            metrics, arrays = evaluate_run(trainer, preset)
        except NonFiniteLogDensity as failure:
            error = TrainingDiverged(
                f"evaluation after step {trainer.step} failed: {failure} "
                f"({trainer.describe()})"
            )
    if error is None:
        record.update(status="finished", metrics=metrics, error=None)
    else:
        # No metric or figure is computed from a model whose update failed.
        arrays = _binned_history(trainer.history)
        record.update(status="diverged", metrics={}, error=str(error))
    record["evaluation_seconds"] = time.perf_counter() - started
    write_run(Path(results_root) / preset.name / spec.name, record, arrays)
    return record


def _worker(spec, preset, results_root, work_root, device, threads, commit):
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    return execute_run(spec, preset, results_root, work_root, device, commit)


def stored_result_is_current(folder: Path, spec, preset) -> bool:
    """Return True if ``folder`` contains a readable result of ``spec`` at ``preset``.

    An unreadable result counts as missing, so the run is trained again and the
    result rewritten. A readable result of another configuration raises, because
    replacing it silently would mix two versions of a preset.
    """
    if not (folder / RESULT_FILE).is_file():
        return False
    try:
        result = read_run(folder)
    except ValueError as error:
        LOG.warning("%s; training the run again", error)
        return False
    check_current(result, spec, preset, folder, "rerun with --retrain to replace it")
    return True


def pending_runs(runs, preset, results_root: Path) -> list:
    """Return the runs without a current stored result, longest first."""
    folder = Path(results_root) / preset.name
    todo = [
        spec for spec in runs
        if not stored_result_is_current(folder / spec.name, spec, preset)
    ]
    return sorted(todo, key=lambda spec: -spec.steps)


def prepare(
    preset_name: str, studies, results_root, work_root, jobs: int, threads: int, device
):
    """Check every argument of :func:`run_all`; return the preset and its runs.

    Everything that can be checked before training is checked here, so that a bad
    argument fails before any result is deleted or any run trained.
    """
    preset = get_preset(preset_name)
    check_int_at_least("jobs", jobs, 1)
    check_int_at_least("threads", threads, 1)
    studies = list(studies)
    if not studies:
        raise ValueError(f"studies must name at least one of {STUDIES}, got none")
    for study in studies:
        if study not in STUDIES:
            raise ValueError(f"study must be one of {STUDIES}, got {study!r}")
    runs = all_runs(preset, studies)
    # One TrainConfig is built now, so that a missing device (CUDA, which the
    # paper preset requests, on a CPU machine) fails before anything else happens.
    train_config(runs[0], preset, device)
    for option, root in (("--results", results_root), ("--work", work_root)):
        _check_writable(option, Path(root) / preset.name)
        for spec in runs:
            folder = Path(root) / preset.name / spec.name
            if folder.exists() and not folder.is_dir():
                raise ValueError(
                    f"{option} path {str(folder)!r} of run {spec.name} is a file, not a "
                    "folder; move it away"
                )
    return preset, runs


def _check_writable(option: str, folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise ValueError(
            f"{option} folder {str(folder)!r} cannot be created or written "
            f"({error.strerror or error}); choose a writable folder"
        ) from error


def run_all(
    preset_name: str,
    studies=STUDIES,
    results_root: Path = DEFAULT_RESULTS,
    work_root: Path = DEFAULT_WORK,
    jobs: int = 1,
    threads: int = 1,
    retrain: bool = False,
    device=None,
) -> list:
    """Train every run of ``studies`` that has no stored result; return the records.

    ``retrain`` first deletes the stored results and checkpoints of these runs
    (and only these). ``jobs`` runs train in parallel processes, each with
    ``threads`` torch threads. Runs skipped because another command stored them
    meanwhile have no record in the list.
    """
    results_root, work_root = Path(results_root), Path(work_root)
    preset, runs = prepare(preset_name, studies, results_root, work_root, jobs, threads, device)
    if retrain:
        for spec in runs:
            # Fails, before anything is deleted, if another command trains the run.
            with _exclusive(work_root / preset.name / spec.name):
                pass
        for spec in runs:
            for root in (results_root, work_root):
                shutil.rmtree(root / preset.name / spec.name, ignore_errors=True)
    commit = git_commit()
    todo = pending_runs(runs, preset, results_root)
    LOG.info("preset %s: %d runs to train, %d jobs", preset.name, len(todo), jobs)
    if jobs == 1:
        torch.set_num_threads(threads)
        records = []
        for spec in todo:
            record = execute_run(spec, preset, results_root, work_root, device, commit)
            if record is not None:
                records.append(_log_done(record))
        return records
    context = multiprocessing.get_context("spawn")
    records = []
    with concurrent.futures.ProcessPoolExecutor(
        jobs, mp_context=context, initializer=_end_with_parent
    ) as pool:
        futures = [
            pool.submit(_worker, spec, preset, results_root, work_root, device, threads, commit)
            for spec in todo
        ]
        for future in concurrent.futures.as_completed(futures):
            record = future.result()
            if record is not None:
                records.append(_log_done(record))
    return records


def _end_with_parent() -> None:
    """Make this worker receive SIGTERM when the command that started it dies (Linux).

    Without it, workers of a command killed with SIGKILL would go on training and
    keep their runs locked. A worker stopped this way leaves its last checkpoint.
    """
    if not sys.platform.startswith("linux"):
        return
    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


def _log_done(record: dict) -> dict:
    metrics = record["metrics"]
    kl = metrics.get("kl")
    LOG.info(
        "%s: %s after %d steps in %.0f s%s",
        record["name"],
        record["status"],
        record["steps_done"],
        record["train_seconds"],
        "" if kl is None else f", KL {kl:.3f} nats",
    )
    return record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cdlib.runner",
        description="Train the spiral experiment's runs and store their results.",
    )

    parser.add_argument("--preset", required=True, help="smoke, cpu or paper")
    parser.add_argument(
        "--studies", nargs="+", default=list(STUDIES),
        help=f"which studies to train (default: all of {', '.join(STUDIES)})",
    )
    parser.add_argument("--jobs", type=int, default=1, help="runs trained in parallel")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS,
                        help="folder of the stored results (default: book/results)")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK,
                        help="folder of the checkpoints (default: runs)")
    parser.add_argument("--device", default=None,
                        help="torch device, overriding the preset's (cpu, cuda)")
    parser.add_argument("--retrain", action="store_true",
                        help="delete the preset's results and checkpoints first")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        prepare(args.preset, args.studies, args.results, args.work,
                args.jobs, args.threads, args.device)
    except ValueError as error:
        parser.error(str(error))
    try:
        records = run_all(
            args.preset, args.studies, args.results, args.work,
            args.jobs, args.threads, args.retrain, args.device,
        )
    except (RuntimeError, ValueError) as error:
        LOG.error("stopped: %s", error)
        return 1

    diverged = sum(record["status"] == "diverged" for record in records)
    LOG.info("%d runs trained, %d of them diverged", len(records), diverged)
    return 0


if __name__ == "__main__":
    sys.exit(main())
