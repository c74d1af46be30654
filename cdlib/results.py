"""Stored results of spiral runs: writing, reading and summarising them.

Each run owns a folder ``<results>/<preset>/<run name>/`` with two files:

- ``result.json``: the status (``finished`` or ``diverged``), the metrics, the run's
  :class:`~cdlib.train.TrainConfig`, its seed, the preset, and provenance (cdlib
  version, git commit, package versions, device, times);
- ``arrays.npz``: what the figures need (the learned log-density on the e1-e2
  plane, samples of the model, contrastive samples, the binned alpha history).

``arrays.npz`` is written before ``result.json``, and each file is written to a
temporary name and renamed, so a folder with a ``result.json`` is complete.
"""

import json
import math
import os
import subprocess
import tempfile
import textwrap
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .experiments import train_config

RESULT_FILE = "result.json"
ARRAYS_FILE = "arrays.npz"
STATUSES = ("finished", "diverged")
RECORD_KEYS = ("name", "spec", "config", "seed", "preset", "steps_done", "metrics",
               "provenance", "train_seconds", "evaluation_seconds")


@dataclass
class RunResult:
    """A stored run: its ``result.json`` as a dict and its arrays."""

    record: dict
    arrays: dict

    @property
    def name(self) -> str:
        return self.record["name"]

    @property
    def spec(self) -> dict:
        return self.record["spec"]

    @property
    def finished(self) -> bool:
        return self.record["status"] == "finished"

    @property
    def metrics(self) -> dict:
        return self.record["metrics"]


def git_commit(repository: Path = Path(__file__).resolve().parent.parent) -> dict:
    """Return the commit checked out in ``repository`` and whether files differ from it.

    Both values are None when ``repository`` is not a git checkout (an installed
    copy of cdlib) or git is missing.
    """
    try:
        commit = subprocess.run(
            ["git", "-C", str(repository), "rev-parse", "HEAD"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(repository), "status", "--porcelain", "--", "cdlib"],
            capture_output=True, text=True, check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "cdlib_modified": None}
    return {"commit": commit, "cdlib_modified": bool(status.strip())}


def write_run(folder: Path, record: dict, arrays: dict) -> None:
    """Write one run's arrays, then its record, each atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _atomic_write(folder / ARRAYS_FILE, lambda handle: np.savez_compressed(handle, **arrays))
    text = json.dumps(_json_safe(record), indent=2, sort_keys=True) + "\n"
    _atomic_write(folder / RESULT_FILE, lambda handle: handle.write(text.encode()))


def read_run(folder: Path) -> RunResult:
    """Read the run stored in ``folder``; raise ValueError if it is missing or unreadable."""
    folder = Path(folder)
    path = folder / RESULT_FILE
    if not path.is_file():
        raise ValueError(f"no {RESULT_FILE} in {str(folder)!r}; the run has not finished")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        with np.load(folder / ARRAYS_FILE) as stored:
            arrays = {key: stored[key] for key in stored.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as error:
        raise ValueError(
            f"stored run {str(folder)!r} cannot be read ({type(error).__name__}: {error}); "
            "delete the folder and train the run again"
        ) from error
    if not isinstance(record, dict) or record.get("status") not in STATUSES:
        raise ValueError(
            f"{str(path)!r} is not a run record with a status in {STATUSES}; "
            "delete the folder and train the run again"
        )
    missing = [key for key in RECORD_KEYS if key not in record]
    if missing:
        raise ValueError(
            f"{str(path)!r} lacks {', '.join(missing)}; delete the folder and train "
            "the run again"
        )
    return RunResult(record, arrays)


def config_differences(record: dict, spec, preset) -> list:
    """Return the settings in which a stored run differs from ``spec`` at ``preset``.

    These are the fields of its :class:`~cdlib.train.TrainConfig` and of the
    preset, which also sets the evaluation. The device is left out, because the
    same configuration may run on a CPU or a GPU.
    """
    expected = train_config(spec, preset, device="cpu").to_dict()
    stored = record.get("config", {})
    differences = [
        key for key in expected if key != "device" and stored.get(key) != expected[key]
    ]
    # The preset also sets the evaluation; JSON stores its tuples as lists.
    expected_preset = json.loads(json.dumps(preset.to_dict()))
    stored_preset = record.get("preset", {})
    differences += [
        f"preset {key}"
        for key in expected_preset
        if key != "device" and stored_preset.get(key) != expected_preset[key]
    ]
    return sorted(differences)


def check_current(result: RunResult, spec, preset, folder: Path, advice: str) -> None:
    """Raise ValueError, ending with ``advice``, if ``result`` is stale for ``preset``."""
    differences = config_differences(result.record, spec, preset)
    if differences:
        raise ValueError(
            f"stored run {str(folder)!r} was trained with another "
            f"{', '.join(differences)} than preset {preset.name!r} sets; {advice}"
        )


def load_preset_results(results_root: Path, preset, specs) -> dict:
    """Return the stored runs ``specs`` of ``preset`` (a :class:`Preset`) by name.

    Raises ValueError when a run is missing, unreadable, or was trained with a
    configuration other than the preset's, so that a figure is never drawn from a
    partial or stale set.
    """
    folder = Path(results_root) / preset.name
    missing = [spec.name for spec in specs if not (folder / spec.name / RESULT_FILE).is_file()]
    if missing:
        raise ValueError(
            f"{len(missing)} of {len(specs)} runs of preset {preset.name!r} have no stored "
            f"result in {str(folder)!r} (first: {missing[0]}); train them with "
            f"`python -m cdlib.runner --preset {preset.name} --results {results_root}`"
        )
    results = {}
    for spec in specs:
        result = read_run(folder / spec.name)
        check_current(
            result, spec, preset, folder / spec.name,
            f"train it again with `python -m cdlib.runner --preset {preset.name} "
            f"--results {results_root} --retrain`",
        )
        results[spec.name] = result
    return results


def summarize(results: list, key: str) -> dict:
    """Return mean, sample standard deviation and count of a metric over runs.

    Runs that diverged, or whose value is missing or NaN (an untrusted KL), are
    counted in ``excluded`` rather than averaged.
    """
    values, excluded = [], 0
    for result in results:
        value = result.metrics.get(key) if result.finished else None
        if value is None or not math.isfinite(value):
            excluded += 1
        else:
            values.append(value)
    if not values:
        return {"mean": math.nan, "std": math.nan, "n": 0, "excluded": excluded}
    std = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
    return {"mean": float(np.mean(values)), "std": std, "n": len(values), "excluded": excluded}


def _atomic_write(path: Path, write) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
        # mkstemp creates the file readable by its owner only; results are shared.
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def _json_safe(value):
    """Replace NaN and infinities, which JSON lacks, by None, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


def cdlib_changed_since(commit, repository: Path = Path(__file__).resolve().parent.parent):
    """Return whether ``cdlib/`` in the checkout differs from ``commit``, or None if unknown."""
    if not commit:
        return None
    try:
        status = subprocess.run(
            ["git", "-C", str(repository), "diff", "--quiet", commit, "--", "cdlib"],
            capture_output=True,
        ).returncode
    except OSError:
        return None
    return {0: False, 1: True}.get(status)


def provenance_summary(results) -> str:
    """Return a paragraph, wrapped at 90 characters, on where stored runs came from.

    It lists the distinct values of each provenance field over the runs, so a
    figure built from runs of two commits or two machines shows it, and it states
    whether ``cdlib`` in the current checkout differs from each commit.
    """
    records = [result.record for result in results]

    def distinct(values):
        return ", ".join(sorted({str(value) for value in values}))

    provenance = [record["provenance"] for record in records]
    commits = []
    for commit in sorted({p["commit"] for p in provenance}, key=str):
        changed = cdlib_changed_since(commit)
        note = {False: "cdlib unchanged since", True: "cdlib changed since"}.get(changed, "")
        commits.append(f"{(commit or 'unknown')[:10]}" + (f" ({note})" if note else ""))
    if any(p["cdlib_modified"] for p in provenance):
        commits.append("some with uncommitted changes to cdlib")
    dates = sorted(p["finished_at"][:10] for p in provenance)
    finished = dates[0] if dates[0] == dates[-1] else f"{dates[0]} to {dates[-1]}"
    text = (
        f"{len(records)} stored runs of preset {distinct(r['preset']['name'] for r in records)}; "
        f"seeds {distinct(r['seed'] for r in records)}; "
        f"cdlib {distinct(p['cdlib_version'] for p in provenance)} at commit "
        f"{', '.join(commits)}; "
        f"torch {distinct(p['packages']['torch'] for p in provenance)}; "
        f"device {distinct(p['device'] for p in provenance)}, "
        f"{distinct(p['torch_threads'] for p in provenance)} torch thread(s) per run; "
        f"finished {finished}."
    )
    return textwrap.fill(text, width=90)
