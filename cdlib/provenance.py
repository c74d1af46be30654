"""Facts about the process that executes a chapter, for the book's reproducibility page.

When the book is built, its Sphinx extension ``book/_ext/provenance.py`` appends a
hidden cell to every chapter that calls :func:`display_record`. The record is a
JSON output of MIME type :data:`MIME_TYPE` in the executed notebook, where the
extension reads it back. It describes the kernel that ran the chapter, so it
stays true even when the build process and the kernel differ.
"""

import datetime
import importlib.metadata
import os
import platform
import sys
from pathlib import Path

MIME_TYPE = "application/vnd.cdlib.provenance+json"

# Distributions whose versions can change a chapter's numbers or figures.
PACKAGES = (
    "cdlib",
    "torch",
    "numpy",
    "scipy",
    "sympy",
    "matplotlib",
    "scikit-learn",
    "ipykernel",
)

# Environment variables that set how many threads the numerical libraries use.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def package_versions(names=PACKAGES) -> dict[str, str | None]:
    """Return the installed version of each distribution, or None where it is missing."""
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """Return the processor's model name from ``cpuinfo`` (Linux), else platform's guess."""
    try:
        lines = cpuinfo.read_text(encoding="utf-8").splitlines()
    except OSError:
        lines = []
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            return value.strip()
    return platform.processor() or platform.machine() or "unknown"


def memory_gib(meminfo: Path = Path("/proc/meminfo")) -> float | None:
    """Return the total memory in GiB from ``meminfo`` (Linux), or None elsewhere."""
    try:
        lines = meminfo.read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() == "MemTotal":
            kibibytes = int(value.split()[0])
            return round(kibibytes / 2**20, 1)
    return None


def usable_cpus() -> int | None:
    """Return how many CPUs this process may run on (its affinity), where known."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count()


def environment_record() -> dict:
    """Return the facts about this process as a JSON-serialisable dict.

    ``torch_default_seed`` is ``torch.initial_seed()``: the seed of torch's global
    generator, which is the value given to ``torch.manual_seed`` if the chapter
    called it, and a random number otherwise.
    """
    import torch

    return {
        "recorded_at": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
        "python": platform.python_version(),
        "executable": sys.executable,
        "packages": package_versions(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable_cpus(),
        "memory_gib": memory_gib(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "torch_default_seed": torch.initial_seed(),
        "thread_variables": {
            name: os.environ[name] for name in THREAD_VARIABLES if name in os.environ
        },
    }


def display_record() -> None:
    """Publish :func:`environment_record` as a cell output of type :data:`MIME_TYPE`."""
    from IPython.display import display

    display({MIME_TYPE: environment_record()}, raw=True)
