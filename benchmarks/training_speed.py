"""Measure the cost of a training step and write the book's benchmark page.

One run measures, with warm-up and medians of repeated runs:

* the float32 matmul rate on products the size of the energy network's layers;
* one forward pass plus input gradient of the network (autograd and the
  hand-written pass of ``cdlib.backprop``);
* one ``Trainer.train_step`` of CNCE, CD-k, CD-k with MH and adjusted CD-k for
  every k, batch size and width of the grid;
* one training step of TorchEBM's contrastive-divergence loss with its Langevin
  sampler on the same network, batch and k, if ``torchebm`` is installed.

It writes ``benchmarks.md`` (plain MyST Markdown, which the book does not
execute), its figures under ``benchmark_figures/`` and the raw numbers as JSON.

Usage, from the repository root::

    .venv/bin/python benchmarks/training_speed.py --threads 1
    .venv/bin/python benchmarks/training_speed.py --quick --output-dir /tmp/bench

TorchEBM is not a dependency of the project. Install it without letting pip
replace the pinned torch (its only declared dependency is torch)::

    .venv/bin/pip install --no-deps torchebm==0.8.9
"""

import argparse
import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from cdlib.kernels import evaluate
from cdlib.models import EnergyMLP
from cdlib.plots import OKABE_ITO
from cdlib.train import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parent.parent
STEP_SIZE = 0.0125  # TrainConfig's default Langevin step; it does not change the cost
LEARNING_RATE = 1e-4  # small, so the network barely changes while it is timed
DEPTH = 8
DIM = 10
CD_METHODS = ("cd", "cd_mh", "adjusted_cd")
METHOD_NAMES = {
    "cnce": "CNCE",
    "cd": "CD-k",
    "cd_mh": "CD-k + MH",
    "adjusted_cd": "adjusted CD-k",
    "torchebm": "TorchEBM CD-k",
}
METHOD_COLOURS = {
    "cd": OKABE_ITO[0],
    "cd_mh": OKABE_ITO[1],
    "adjusted_cd": OKABE_ITO[2],
    "torchebm": OKABE_ITO[3],
}
TORCHEBM_VERSION = "0.8.9"
INSTALL_TORCHEBM = f".venv/bin/pip install --no-deps torchebm=={TORCHEBM_VERSION}"


@dataclass
class Grid:
    """The sizes one run measures, and how often."""

    widths: tuple
    batches: tuple
    ks: tuple
    sweep_batches: tuple
    sweep_k: int
    repeats: int
    warmup: int
    sweep_repeats: int
    matmul_repeats: int
    side_experiments: bool


FULL = Grid(
    widths=(128, 512),
    batches=(256, 1024),
    ks=(1, 5, 10),
    sweep_batches=(64, 128, 256, 512, 1024, 2048),
    sweep_k=5,
    repeats=15,
    warmup=2,
    sweep_repeats=7,
    matmul_repeats=41,
    side_experiments=True,
)
QUICK = Grid(
    widths=(16,),
    batches=(32,),
    ks=(1, 2),
    sweep_batches=(16, 32),
    sweep_k=2,
    repeats=2,
    warmup=1,
    sweep_repeats=2,
    matmul_repeats=3,
    side_experiments=False,
)


# --- FLOP counts -------------------------------------------------------------


def forward_flops(n: int, width: int, depth: int = DEPTH) -> int:
    """Return the matmul FLOPs of one forward pass over n points, F(n, width)."""
    multiply_adds = DIM * width + (depth - 2) * width**2 + width
    return 2 * n * multiply_adds


def required_flops(method: str, n: int, width: int, k: int) -> int:
    """Return the matmul FLOPs that one training step of ``method`` needs.

    A CD-k step needs log p and its input gradient at the k + 1 states of each
    chain, 2F each, and the parameter gradient at x_0 and x_k, F each: (2k + 4)F.
    CNCE needs log p at 2n points with the parameters' gradient: 2F forward and
    4F backward. TorchEBM's CD-k runs k input gradients, two forward passes and
    the backward pass for the parameters: (2k + 6)F. The count for TorchEBM is
    what its code runs, the others are the minimum for the estimator's outputs.
    """
    f = forward_flops(n, width)
    if method == "cnce":
        return 6 * f
    if method == "torchebm":
        return (2 * k + 6) * f
    return (2 * k + 4) * f


# --- timing ------------------------------------------------------------------


class Timer:
    """Time a call by wall clock and process CPU time, or by CUDA events on a GPU.

    NOTE: the CUDA branch has not been run yet; no GPU was at hand when it was written.
    """

    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self, fn) -> tuple:
        if self.device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(self.device)
            return start.elapsed_time(end) / 1e3, float("nan")
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        return time.perf_counter() - wall, time.process_time() - cpu


def time_round_robin(fns: dict, timer: Timer, repeats: int, warmup: int) -> dict:
    """Return {name: {"wall": [...], "cpu": [...]}}, timing the calls in turn.

    Calling each function once per round spreads slow spells of a shared
    machine over all of them alike, so their ratios stay fair.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples = {name: {"wall": [], "cpu": []} for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            wall, cpu = timer(fn)
            samples[name]["wall"].append(wall)
            samples[name]["cpu"].append(cpu)
    return samples


def median(values) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.median(values) if values else float("nan")


# --- what is timed -----------------------------------------------------------


def make_trainer(method: str, width: int, n: int, k: int, device: str) -> Trainer:
    config = TrainConfig(
        method=method,
        step_size=STEP_SIZE,
        k=1 if method == "cnce" else k,
        batch_size=n,
        steps=10**6,
        width=width,
        depth=DEPTH,
        lr_start=LEARNING_RATE,
        lr_end=LEARNING_RATE / 10,
        n_data=max(4 * n, 4096),
        device=device,
    )
    return Trainer(config, progress=False)


def torchebm_available() -> bool:
    return importlib.util.find_spec("torchebm") is not None


def make_torchebm_step(trainer: Trainer, k: int):
    """Return one TorchEBM CD-k training step on a copy of ``trainer``'s network.

    TorchEBM models an energy E = -log p, and its Langevin update is
    x' = x - eta grad E(x) + sqrt(2 eta) * noise_scale * z. With eta = eps^2 / 2 and
    noise_scale 1 this is cdlib's Langevin(eps). Its regularisation of the
    squared energies is switched off, so the loss is the plain CD-k loss.
    """
    from torchebm.core import BaseModel
    from torchebm.losses import ContrastiveDivergence
    from torchebm.samplers import LangevinDynamics

    class NegatedLogDensity(BaseModel):
        def __init__(self, network, dtype, device):
            super().__init__(dtype=dtype, device=device)
            self.network = network

        def forward(self, x):
            return -self.network(x)

    config = trainer.config
    device, dtype = trainer.device, config.torch_dtype
    network = EnergyMLP(dim=DIM, width=config.width, depth=config.depth)
    network.load_state_dict(trainer.model.state_dict())
    energy = NegatedLogDensity(network.to(device=device, dtype=dtype), dtype, device)
    sampler = LangevinDynamics(
        energy, step_size=STEP_SIZE**2 / 2, noise_scale=1.0, dtype=dtype, device=device
    )
    loss_fn = ContrastiveDivergence(
        energy, sampler, k_steps=k, energy_reg_weight=0.0, dtype=dtype, device=device
    )
    optimizer = torch.optim.SGD(
        network.parameters(), lr=LEARNING_RATE, momentum=config.momentum
    )
    data = trainer.data
    batch_generator = torch.Generator().manual_seed(1)
    mcmc_generator = torch.Generator(device).manual_seed(2)

    def step():
        index = torch.randint(
            data.shape[0], (config.batch_size,), generator=batch_generator
        )
        loss, _ = loss_fn(data[index.to(device)], generator=mcmc_generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def measure_matmul(widths, batches, repeats, timer, device) -> dict:
    """Return the float32 GFLOP/s of the three products of a linear layer.

    ``forward`` is x W^T as in nn.Linear, ``input_grad`` is g W as in the input
    gradient, ``weight_grad`` is g^T x as in the weight gradient. ``rate`` is the
    best of the three medians, the limit a training step is compared with.
    """
    rates = {}
    for width in widths:
        for n in batches:
            generator = torch.Generator().manual_seed(0)
            x = torch.randn(n, width, generator=generator).to(device)
            w = torch.randn(width, width, generator=generator).to(device)
            products = {
                "forward": lambda: x @ w.t(),
                "input_grad": lambda: x @ w,
                "weight_grad": lambda: x.t() @ x,
            }
            samples = time_round_robin(products, timer, repeats, warmup=3)
            flops = 2 * n * width * width
            entry = {
                name: flops / median(s["wall"]) / 1e9 for name, s in samples.items()
            }
            entry["rate"] = max(entry.values())
            rates[f"{width},{n}"] = entry
    return rates


class _AutogradPath(torch.nn.Module):
    """The network behind a wrapper, so that ``evaluate`` takes the autograd path."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)


def measure_pass(widths, batches, repeats, warmup, timer, device) -> dict:
    """Return the time of one forward pass plus input gradient, both ways."""
    results = {}
    for width in widths:
        for n in batches:
            torch.manual_seed(0)
            model = EnergyMLP(dim=DIM, width=width, depth=DEPTH).to(device)
            x = torch.randn(n, DIM, generator=torch.Generator().manual_seed(0)).to(
                device
            )
            wrapped = _AutogradPath(model)
            fns = {
                "autograd": lambda: evaluate(wrapped, x, with_score=True),
                "cdlib.backprop": lambda: evaluate(model, x, with_score=True),
            }
            samples = time_round_robin(fns, timer, repeats, warmup)
            flops = 2 * forward_flops(n, width)
            results[f"{width},{n}"] = {
                name: {
                    "wall_ms": 1e3 * median(s["wall"]),
                    "cpu_ms": 1e3 * median(s["cpu"]),
                    "gflops": flops / median(s["wall"]) / 1e9,
                }
                for name, s in samples.items()
            }
    return results


def step_functions(width, n, k, device, with_cnce, with_torchebm) -> dict:
    methods = (("cnce",) if with_cnce else ()) + CD_METHODS
    trainers = {method: make_trainer(method, width, n, k, device) for method in methods}
    fns = {method: trainer.train_step for method, trainer in trainers.items()}
    if with_torchebm:
        fns["torchebm"] = make_torchebm_step(trainers["cd"], k)
    return fns


def summarise_steps(samples: dict, width: int, n: int, k: int) -> list:
    rows = []
    for method, s in samples.items():
        wall, cpu = median(s["wall"]), median(s["cpu"])
        flops = required_flops(method, n, width, 1 if method == "cnce" else k)
        rows.append(
            {
                "method": method,
                "width": width,
                "batch": n,
                "k": 1 if method == "cnce" else k,
                "wall_ms": 1e3 * wall,
                "cpu_ms": 1e3 * cpu,
                "flops": flops,
                "gflops_wall": flops / wall / 1e9,
                "gflops_cpu": flops / cpu / 1e9 if cpu > 0 else float("nan"),
            }
        )
    return rows


def measure_grid(grid: Grid, timer, device, with_torchebm, log) -> list:
    rows = []
    for width in grid.widths:
        for n in grid.batches:
            for k in grid.ks:
                fns = step_functions(
                    width, n, k, device, k == grid.ks[0], with_torchebm
                )
                samples = time_round_robin(fns, timer, grid.repeats, grid.warmup)
                rows += summarise_steps(samples, width, n, k)
                log(f"steps: width {width}, batch {n}, k {k} done")
    return rows


def measure_batch_sweep(grid: Grid, timer, device, with_torchebm, log) -> list:
    rows = []
    for width in grid.widths:
        for n in grid.sweep_batches:
            fns = step_functions(width, n, grid.sweep_k, device, False, with_torchebm)
            fns.pop("cd_mh")
            samples = time_round_robin(fns, timer, grid.sweep_repeats, grid.warmup)
            rows += summarise_steps(samples, width, n, grid.sweep_k)
        log(f"batch sweep: width {width} done")
    return rows


# --- side experiments (full mode only) ----------------------------------------


def measure_threads(threads_options, timer, device) -> list:
    """Return the matmul rate and pass time at each thread count, width 512, batch 1024."""
    results = []
    current = torch.get_num_threads()
    for threads in threads_options:
        torch.set_num_threads(threads)
        matmul = measure_matmul((512,), (1024,), 21, timer, device)["512,1024"]
        passes = measure_pass((512,), (1024,), 9, 2, timer, device)["512,1024"]
        results.append(
            {
                "threads": threads,
                "matmul_gflops": matmul["rate"],
                "pass_wall_ms": passes["cdlib.backprop"]["wall_ms"],
            }
        )
    torch.set_num_threads(current)
    return results


def measure_compile(timer, device) -> dict:
    """Time torch.compile of the hand-written pass at the spiral chapter's size.

    The first compile writes inductor's cache into a new, empty folder, as on a
    machine that has never compiled the pass. The second compile, after
    ``torch.compiler.reset()``, finds that cache, as a later run would.
    """
    from cdlib import backprop

    width, n = 128, 256
    torch.manual_seed(0)
    model = EnergyMLP(dim=DIM, width=width, depth=DEPTH).to(device)
    x = torch.randn(n, DIM, generator=torch.Generator().manual_seed(0)).to(device)

    def eager(x):
        result = backprop.forward_backward(model, x)
        return result.log_p, result.score

    def compile_once():
        torch.compiler.reset()
        compiled = torch.compile(eager, dynamic=False)
        start = time.perf_counter()
        compiled(x)
        return compiled, time.perf_counter() - start

    previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    with tempfile.TemporaryDirectory() as cache_dir:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
        try:
            _, cold_s = compile_once()
            compiled, warm_s = compile_once()
            samples = time_round_robin(
                {"eager": lambda: eager(x), "compiled": lambda: compiled(x)},
                timer,
                31,
                3,
            )
        finally:
            if previous is None:
                del os.environ["TORCHINDUCTOR_CACHE_DIR"]
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous
            torch.compiler.reset()
    return {
        "width": width,
        "batch": n,
        "warmup_s": cold_s,
        "cached_warmup_s": warm_s,
        "eager_ms": 1e3 * median(samples["eager"]["wall"]),
        "compiled_ms": 1e3 * median(samples["compiled"]["wall"]),
    }


def set_glibc_malloc_retention() -> bool:
    """Stop glibc from returning freed memory to the system; return whether it worked.

    By default glibc serves large blocks with mmap and trims the heap when memory
    is freed, so every step pays page faults for its fresh buffers again.
    M_MMAP_THRESHOLD (-3) and M_TRIM_THRESHOLD (-1) are the mallopt parameters of
    glibc's malloc.h; the same effect comes from the environment variables
    MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ at start-up.
    """
    name = ctypes.util.find_library("c")
    if name is None or platform.system() != "Linux":
        return False
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt"):
        return False
    mmap_ok = libc.mallopt(-3, 2**30)
    trim_ok = libc.mallopt(-1, 2**31 - 1)
    return bool(mmap_ok and trim_ok)


def measure_allocator(timer, device, with_torchebm, log) -> dict:
    """Time the main configuration before and after glibc keeps freed memory."""
    width, n, k = 512, 1024, 5
    results = {}
    for setting in ("default", "retain freed memory"):
        if setting != "default" and not set_glibc_malloc_retention():
            log("allocator: mallopt is not available, skipped")
            break
        fns = step_functions(width, n, k, device, False, with_torchebm)
        fns.pop("cd_mh")
        samples = time_round_robin(fns, timer, 9, 2)
        results[setting] = {m: 1e3 * median(s["wall"]) for m, s in samples.items()}
    return results


# --- analysis ----------------------------------------------------------------


def fit_line(x, y) -> dict:
    """Least-squares y = intercept + slope * x, with the largest relative residual."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    slope, intercept = np.polyfit(x, y, 1)
    residual = np.abs(y - (intercept + slope * x)) / y
    total = np.square(y - y.mean()).sum()
    unexplained = np.square(y - (intercept + slope * x)).sum()
    return {
        "intercept": intercept,
        "slope": slope,
        "max_relative_residual": residual.max(),
        "worst_x": x[residual.argmax()],
        "r_squared": 1.0 - unexplained / total if total > 0 else float("nan"),
    }


def find(rows, **keys):
    for row in rows:
        if all(row[name] == value for name, value in keys.items()):
            return row
    return None


def check_targets(rows, matmul, grid: Grid, with_torchebm, clocks) -> list:
    """Return one line per target: what was measured and whether it is met."""
    checks = []
    for clock in clocks:
        key = f"{clock}_ms"
        adjusted_ratios, te_cd, te_adjusted = [], [], []
        for width in grid.widths:
            for n in grid.batches:
                for k in grid.ks:
                    cd = find(rows, method="cd", width=width, batch=n, k=k)
                    adjusted = find(
                        rows, method="adjusted_cd", width=width, batch=n, k=k
                    )
                    adjusted_ratios.append(adjusted[key] / cd[key])
                    te = find(rows, method="torchebm", width=width, batch=n, k=k)
                    if te is not None:
                        te_cd.append(cd[key] / te[key])
                        te_adjusted.append(adjusted[key] / te[key])
        checks.append(
            target("adjusted CD-k / CD-k", clock, max(adjusted_ratios), 1.10, "max")
        )
        if with_torchebm:
            checks.append(
                target("CD-k / TorchEBM CD-k", clock, max(te_cd), 1.00, "max")
            )
            checks.append(
                target(
                    "adjusted CD-k / TorchEBM CD-k",
                    clock,
                    max(te_adjusted),
                    1.10,
                    "max",
                )
            )
    width, n, k = max(grid.widths), max(grid.batches), grid.ks[len(grid.ks) // 2]
    rate = matmul[f"{width},{n}"]["rate"]
    for method in CD_METHODS:
        row = find(rows, method=method, width=width, batch=n, k=k)
        for clock in clocks:
            fraction = row[f"gflops_{clock}"] / rate
            name = f"{METHOD_NAMES[method]} at width {width}, batch {n}, k = {k}: share of matmul rate"
            checks.append(target(name, clock, fraction, 0.70, "min"))
    return checks


def target(name, clock, value, bound, kind) -> dict:
    met = value <= bound if kind == "max" else value >= bound
    return {
        "target": name,
        "clock": clock,
        "value": value,
        "bound": bound,
        "kind": kind,
        "met": bool(met),
    }


# --- the page ----------------------------------------------------------------


def format_cache_size(sysfs_value: str) -> str:
    """Return a Linux sysfs cache size such as ``2048K`` as ``2 MiB``."""
    value = sysfs_value.strip()
    if not value.endswith("K") or not value[:-1].isdigit():
        return value
    kib = int(value[:-1])
    return f"{kib // 1024} MiB" if kib % 1024 == 0 else f"{kib} KiB"


def machine_description(device: torch.device, threads: int) -> dict:
    cpu_model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    l2_size = Path("/sys/devices/system/cpu/cpu0/cache/index2/size")
    description = {
        "cpu_model": cpu_model,
        "l2_cache": (
            format_cache_size(l2_size.read_text()) if l2_size.exists() else "unknown"
        ),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": (
            len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else os.cpu_count()
        ),
        "torch_threads": threads,
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torchebm": (
            importlib.metadata.version("torchebm") if torchebm_available() else None
        ),
    }
    return description


def plot_time_against_k(rows, matmul, grid: Grid, path: Path, clock: str) -> None:
    fig = Figure(
        figsize=(4.0 * len(grid.widths), 3.4 * len(grid.batches)), layout="constrained"
    )
    axes = fig.subplots(len(grid.batches), len(grid.widths), squeeze=False)
    methods = [m for m in (*CD_METHODS, "torchebm") if find(rows, method=m)]
    for i, n in enumerate(grid.batches):
        for j, width in enumerate(grid.widths):
            ax = axes[i][j]
            for method in methods:
                colour = METHOD_COLOURS[method]
                points = [
                    find(rows, method=method, width=width, batch=n, k=k)
                    for k in grid.ks
                ]
                times = [p[f"{clock}_ms"] for p in points]
                fit = fit_line(grid.ks, times)
                line = fit["intercept"] + fit["slope"] * np.asarray(grid.ks, float)
                ax.plot(grid.ks, times, "o", color=colour, label=METHOD_NAMES[method])
                ax.plot(grid.ks, line, "-", color=colour, linewidth=1)
            rate = matmul[f"{width},{n}"]["rate"]
            limit = [
                1e3 * required_flops("cd", n, width, k) / (rate * 1e9) for k in grid.ks
            ]
            ax.plot(
                grid.ks, limit, "--", color="grey", label="CD-k FLOPs at matmul rate"
            )
            ax.set_xlabel("chain length k (steps)")
            ax.set_ylabel("time per training step (ms)")
            ax.set_title(f"width {width}, batch {n}")
            ax.set_xticks(list(grid.ks))
            ax.set_ylim(bottom=0)
    axes[0][0].legend(fontsize="small")
    fig.savefig(path, dpi=120)


def plot_time_against_batch(rows, grid: Grid, path: Path, clock: str) -> None:
    fig = Figure(figsize=(4.0 * len(grid.widths), 3.4), layout="constrained")
    axes = fig.subplots(1, len(grid.widths), squeeze=False)[0]
    methods = [m for m in ("cd", "adjusted_cd", "torchebm") if find(rows, method=m)]
    for ax, width in zip(axes, grid.widths):
        for method in methods:
            colour = METHOD_COLOURS[method]
            points = [
                find(rows, method=method, width=width, batch=n)
                for n in grid.sweep_batches
            ]
            times = [p[f"{clock}_ms"] for p in points]
            fit = fit_line(grid.sweep_batches, times)
            line = fit["intercept"] + fit["slope"] * np.asarray(
                grid.sweep_batches, float
            )
            ax.plot(
                grid.sweep_batches, times, "o", color=colour, label=METHOD_NAMES[method]
            )
            ax.plot(grid.sweep_batches, line, "-", color=colour, linewidth=1)
        ax.set_xlabel("batch size (points)")
        ax.set_ylabel("time per training step (ms)")
        ax.set_title(f"width {width}, k = {grid.sweep_k}")
        ax.set_ylim(bottom=0)
    axes[0].legend(fontsize="small")
    fig.savefig(path, dpi=120)


def format_ms(value: float) -> str:
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def steps_table(rows, matmul, grid: Grid, clock: str) -> list:
    key = f"{clock}_ms"
    methods = [m for m in ("cnce", *CD_METHODS, "torchebm") if find(rows, method=m)]
    header = ["width", "batch", "k"] + [f"{METHOD_NAMES[m]} (ms)" for m in methods]
    header += ["adjusted / CD"]
    if "torchebm" in methods:
        header += ["CD / TorchEBM", "adjusted / TorchEBM"]
    header += ["CD-k GFLOP/s", "share of matmul rate"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for width in grid.widths:
        for n in grid.batches:
            for k in grid.ks:
                cells = [str(width), str(n), str(k)]
                for method in methods:
                    row = find(
                        rows,
                        method=method,
                        width=width,
                        batch=n,
                        k=1 if method == "cnce" else k,
                    )
                    show = row is not None and (method != "cnce" or k == grid.ks[0])
                    cells.append(format_ms(row[key]) if show else "")
                cd = find(rows, method="cd", width=width, batch=n, k=k)
                adjusted = find(rows, method="adjusted_cd", width=width, batch=n, k=k)
                cells.append(f"{adjusted[key] / cd[key]:.3f}")
                te = find(rows, method="torchebm", width=width, batch=n, k=k)
                if te is not None:
                    cells += [
                        f"{cd[key] / te[key]:.3f}",
                        f"{adjusted[key] / te[key]:.3f}",
                    ]
                rate = matmul[f"{width},{n}"]["rate"]
                cells += [
                    f"{cd[f'gflops_{clock}']:.0f}",
                    f"{cd[f'gflops_{clock}'] / rate:.0%}",
                ]
                lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_page(results: dict, grid: Grid, output_dir: Path) -> Path:
    """Write benchmarks.md and its figures into ``output_dir``."""
    figures = output_dir / "benchmark_figures"
    figures.mkdir(parents=True, exist_ok=True)
    rows, sweep, matmul = results["steps"], results["sweep"], results["matmul"]
    machine = results["machine"]
    clock = "wall"
    plot_time_against_k(rows, matmul, grid, figures / "time_against_k.png", clock)
    plot_time_against_batch(sweep, grid, figures / "time_against_batch.png", clock)
    (figures / "benchmark_results.json").write_text(
        json.dumps(results, indent=1, default=float)
    )

    page = PAGE_HEAD.format(
        command=results["command"],
        quick_note=QUICK_NOTE if results["quick"] else "",
        cpu=machine["cpu_model"],
        l2=machine["l2_cache"],
        cpus=machine["usable_cpus"],
        threads=machine["torch_threads"],
        torch=machine["torch"],
        capability=machine["cpu_capability"],
        device=machine["device"],
        gpu_note=GPU_NOTE if machine["gpu"] is None else f"GPU: {machine['gpu']}.",
        load_start=" / ".join(f"{v:.2f}" for v in results["load_start"]),
        load_end=" / ".join(f"{v:.2f}" for v in results["load_end"]),
        duration=results["duration_s"] / 60,
        repeats=grid.repeats,
        warmup=grid.warmup,
        torchebm=TORCHEBM_STATUS[results["torchebm"]].format(
            version=machine["torchebm"], install=INSTALL_TORCHEBM
        ),
    )
    lines = [page]
    if results.get("progress"):
        lines += [
            LOAD_INTRO,
            "",
            "| part of the run | finished after (s) | 1-minute load |",
        ]
        lines += ["|---|---|---|"]
        for entry in results["progress"]:
            lines.append(
                f"| {entry['message'].removesuffix(' done')} | "
                f"{entry['elapsed_s']:.0f} | {entry['load']:.2f} |"
            )
        lines.append("")
    lines += ["## Targets", "", TARGETS_INTRO, ""]
    lines += ["| target | clock | measured | bound | met |", "|---|---|---|---|---|"]
    for check in results["targets"]:
        relation = "≤" if check["kind"] == "max" else "≥"
        value = (
            f"{check['value']:.3f}"
            if check["kind"] == "max"
            else f"{check['value']:.1%}"
        )
        bound = (
            f"{check['bound']:.2f}"
            if check["kind"] == "max"
            else f"{check['bound']:.0%}"
        )
        lines.append(
            f"| {check['target']} | {check['clock']} | {value} | {relation} {bound} | "
            f"{'yes' if check['met'] else 'no'} |"
        )
    lines += ["", TARGETS_NOTES, ""]

    lines += ["## Matmul rate and one pass", "", MATMUL_INTRO, ""]
    lines += [
        "| width | batch | x W^T | g W | g^T x | rate |",
        "|---|---|---|---|---|---|",
    ]
    for key, entry in matmul.items():
        width, n = key.split(",")
        lines.append(
            f"| {width} | {n} | {entry['forward']:.0f} | {entry['input_grad']:.0f} | "
            f"{entry['weight_grad']:.0f} | {entry['rate']:.0f} |"
        )
    lines += ["", PASS_INTRO, ""]
    lines += [
        "| width | batch | clock | autograd (ms) | cdlib.backprop (ms) | GFLOP/s "
        "| share of matmul rate |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, entry in results["pass"].items():
        width, n = key.split(",")
        flops = 2 * forward_flops(int(n), int(width))
        for clock in ("wall", "cpu") if machine["gpu"] is None else ("wall",):
            autograd_ms = entry["autograd"][f"{clock}_ms"]
            fast_ms = entry["cdlib.backprop"][f"{clock}_ms"]
            gflops = flops / fast_ms / 1e6
            lines.append(
                f"| {width} | {n} | {clock} | {format_ms(autograd_ms)} | "
                f"{format_ms(fast_ms)} | {gflops:.0f} | "
                f"{gflops / matmul[key]['rate']:.0%} |"
            )

    lines += ["", "## Training steps", "", STEPS_INTRO, ""]
    lines += steps_table(rows, matmul, grid, "wall")
    if machine["gpu"] is None:
        lines += ["", "The same table by process CPU time:", ""]
        lines += steps_table(rows, matmul, grid, "cpu")
    lines += ["", FIGURE_K.format(k=grid.sweep_k), ""]
    lines += linearity_lines(rows, sweep, grid)
    lines += ["", FIGURE_BATCH.format(k=grid.sweep_k), ""]

    if results.get("threads"):
        lines += ["## Thread settings", "", THREADS_INTRO, ""]
        lines += ["| threads | matmul GFLOP/s | one pass (ms) |", "|---|---|---|"]
        for entry in results["threads"]:
            lines.append(
                f"| {entry['threads']} | {entry['matmul_gflops']:.0f} | "
                f"{format_ms(entry['pass_wall_ms'])} |"
            )
        lines.append("")
    if results.get("allocator"):
        lines += ["## Memory allocator", "", ALLOCATOR_INTRO, ""]
        settings = list(results["allocator"])
        methods = list(results["allocator"][settings[0]])
        lines += [
            "| allocator | "
            + " | ".join(f"{METHOD_NAMES[m]} (ms)" for m in methods)
            + " |"
        ]
        lines += ["|---|" + "---|" * len(methods)]
        for setting in settings:
            cells = [format_ms(results["allocator"][setting][m]) for m in methods]
            lines.append(f"| {setting} | " + " | ".join(cells) + " |")
        lines.append("")
    if results.get("compile"):
        lines += ["## torch.compile", "", compile_text(results["compile"]), ""]
    limits = LIMITS_TEXT.replace("{l2}", machine["l2_cache"])
    allocator = results.get("allocator", {})
    if "retain freed memory" in allocator:
        retained = allocator["retain freed memory"]["cd"]
        limits = limits.replace(
            "{allocator_default}", format_ms(allocator["default"]["cd"])
        ).replace("{allocator_retained}", format_ms(retained))
    else:
        limits = limits.replace(ALLOCATOR_LIMIT, "")
    lines += ["## What limits the speed", "", limits, ""]
    path = output_dir / "benchmarks.md"
    path.write_text("\n".join(lines))
    return path


def linearity_lines(rows, sweep, grid: Grid) -> list:
    lines = [
        "| method | width | batch | floor (ms) | per step of k (ms) | largest deviation |"
    ]
    lines += ["|---|---|---|---|---|---|"]
    methods = [m for m in (*CD_METHODS, "torchebm") if find(rows, method=m)]
    for method in methods:
        for width in grid.widths:
            for n in grid.batches:
                times = [
                    find(rows, method=method, width=width, batch=n, k=k)["wall_ms"]
                    for k in grid.ks
                ]
                fit = fit_line(grid.ks, times)
                lines.append(
                    f"| {METHOD_NAMES[method]} | {width} | {n} | {fit['intercept']:.3g} | "
                    f"{fit['slope']:.3g} | {fit['max_relative_residual']:.1%} |"
                )
    lines += ["", f"Against the batch size, at k = {grid.sweep_k}:", ""]
    lines += [
        "| method | width | floor (ms) | per point (ms) | R² | largest deviation "
        "| at batch |",
        "|---|---|---|---|---|---|---|",
    ]
    methods = [m for m in ("cd", "adjusted_cd", "torchebm") if find(sweep, method=m)]
    for method in methods:
        for width in grid.widths:
            times = [
                find(sweep, method=method, width=width, batch=n)["wall_ms"]
                for n in grid.sweep_batches
            ]
            fit = fit_line(grid.sweep_batches, times)
            lines.append(
                f"| {METHOD_NAMES[method]} | {width} | {fit['intercept']:.3g} | "
                f"{fit['slope']:.3g} | {fit['r_squared']:.4f} | "
                f"{fit['max_relative_residual']:.1%} | {fit['worst_x']:.0f} |"
            )
    lines += ["", SWEEP_NOTE]
    return lines


SWEEP_NOTE = """The deviation is relative to each measured time, so it is largest where the time is smallest and a fixed cost of a millisecond or two weighs most.
The fitted line still explains the share R² of the variation in the time."""

PAGE_HEAD = """# Training speed

This page is written by `benchmarks/training_speed.py`.
The numbers below come from one run of
```
{command}
```
{quick_note}
The script times a training step of each estimator on the paper's energy network (`cdlib.models.EnergyMLP`, depth 8).
It compares the step with the machine's matmul rate and with the contrastive-divergence loss of TorchEBM on the same network.

## The machine

- CPU: {cpu}, {cpus} usable cores, CPU capability {capability}, L2 cache {l2} per core.
- torch {torch}, `torch.set_num_threads({threads})`, device `{device}`.
  {gpu_note}
- Load average (1 / 5 / 15 minutes) at the start: {load_start}; at the end: {load_end}.
  A load above the number of cores means that other processes shared the CPU, which makes wall-clock times noisy.
- The run took {duration:.1f} minutes.
  Each time is the median of {repeats} timed runs after {warmup} warm-up runs.
  The configurations of one group are timed in turn, round after round, so that a slow spell of the machine hits all of them alike.
- {torchebm}

To rerun on a quiet machine, with all its cores:
```
.venv/bin/python benchmarks/training_speed.py --threads $(nproc)
```
"""

LOAD_INTRO = """The 1-minute load average as each part of the run finished shows which measurements shared the CPU with other work:"""

QUICK_NOTE = """
This is the quick mode, which CI runs to keep the script working.
Its sizes are tiny, so its timings do not measure speed.
"""

GPU_NOTE = (
    "No GPU was available for this run, so there are no GPU timings.\n"
    "  On a GPU, `--device cuda` times the same grid with CUDA events."
)

TORCHEBM_STATUS = {
    "measured": "TorchEBM {version}, installed with `{install}` so that pip keeps the pinned torch.",
    "skipped": "TorchEBM {version} is installed, but its rows are left out (`--skip-torchebm`).",
    "missing": "TorchEBM is not installed, so its rows are missing.\n"
    "  Install it with `{install}` (the flag keeps the pinned torch) and rerun.",
}

TARGETS_INTRO = """Each target is checked against two clocks.
The wall clock is what a reader waits for.
The CPU time of the process is less disturbed by a shared machine when torch runs one thread.
Ratios are the largest over the whole grid of widths, batch sizes and k.
The share of the matmul rate is the required FLOP count of the step (below) divided by its time, over the best matmul rate measured at the same width and batch size."""

TARGETS_NOTES = """The evaluation count is checked by tests, not timed.
`tests/test_evaluation_count.py` wraps the network in an energy that counts its forward and backward passes.
It asserts that a chain of k Langevin or MALA steps runs k + 1 of each, that a Langevin chain evaluates exactly its k + 1 states, and that a whole CD-k step (estimator and backward pass) runs k + 1 forward passes.

**FLOP count.**
Let $F = 2n(10w + 6w^2 + w)$ be the matmul FLOPs of one forward pass of $n$ points through the network of width $w$.
An input gradient costs another $F$, and a parameter gradient from stored layer inputs and output gradients costs $F$ more.
A CD-k step needs $\\log p_\\theta$ and its input gradient at the $k + 1$ states of each chain, $2F$ each, for the proposals and for the weights $\\log w$ that every CD estimator returns.
It also needs the parameter gradient at $x_0$ and $x_k$, so it needs $(2k + 4)F$ in all.
CNCE needs $6F$: a forward pass over $2n$ points and its backward pass for the parameters.
TorchEBM's CD-k runs $(2k + 6)F$: $k$ input gradients, forward passes at $x_0$ and $x_k$, and their backward pass.
Element-wise work (activations, skip connections, the Gaussian log-densities of the kernel) is not counted."""

MATMUL_INTRO = """The three products of a linear layer, in float32 GFLOP/s (median): $xW^\\top$ of the forward pass, $gW$ of the input gradient, and $g^\\top x$ of the weight gradient.
Here $x$ and $g$ have the shape (batch, width), and $W$ has the shape (width, width).
The rate is the best of the three, the limit that a training step is held against."""

PASS_INTRO = """One forward pass plus input gradient of the network, $2F$ FLOPs, timed through `cdlib.kernels.evaluate`.
It runs once behind a wrapper, so that autograd computes the gradient, and once on the network itself, which takes the hand-written pass of `cdlib.backprop`.
The GFLOP/s and the share of the matmul rate are those of the hand-written pass."""

STEPS_INTRO = """The table gives one `Trainer.train_step` in milliseconds (wall clock, median): batch selection, estimator, backward pass, SGD step with momentum and diagnostics.
CNCE contrasts each point with one sample, so it has one row per width and batch size, at k = 1.
The TorchEBM step selects a batch, calls TorchEBM's `ContrastiveDivergence` loss and applies the same SGD step.
Its `LangevinDynamics` sampler has the step $\\eta = \\varepsilon^2/2$ and the noise scale 1, which give the same update as `cdlib.kernels.Langevin(eps)`.
Its energy is $-\\log p_\\theta$ of a copy of the same network, and its energy regularisation is off.
The GFLOP/s column divides the FLOP count $(2k+4)F$ of CD-k by its time."""

FIGURE_K = """```{{figure}} benchmark_figures/time_against_k.png
:name: fig-benchmarks-k
:alt: Time per training step against k for each method, width and batch size.

Time per training step (wall clock, median) against the chain length k, with least-squares lines.
The dashed line is the time that the $(2k + 4)F$ FLOPs of a CD-k step would take at the matmul rate.
The intercept is the overhead floor: the batch selection, the parameter gradient, the SGD step and the per-call costs that do not grow with k.
```

The table gives each line's intercept and slope and the largest deviation of a measured time from its line."""

FIGURE_BATCH = """```{{figure}} benchmark_figures/time_against_batch.png
:name: fig-benchmarks-batch
:alt: Time per training step against the batch size at k = {k}.

Time per training step (wall clock, median) against the batch size at k = {k}, with least-squares lines.
```"""

THREADS_INTRO = """The best matmul rate and one hand-written pass at width 512 and batch 1024, with 1 thread and with every usable core.
On a machine whose cores are shared with other processes, each parallel region waits for its slowest thread.
A thread that the system has paused then holds up the whole operation, so one thread per process beats several.
On a quiet machine more threads are faster: rerun with `--threads $(nproc)`."""

ALLOCATOR_INTRO = """The step at width 512, batch 1024 and k = 5, timed first with the default settings of glibc's malloc.
The second row is timed after the benchmark has told malloc (with `mallopt`) to keep freed memory instead of returning it to the system.
By default, blocks of 128 kB and more come from `mmap`, and a freed heap is trimmed.
The buffers of each step are then new pages, which cost a page fault each when they are first written.
A training script gets the same setting from the environment, for example `MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=2147483647`, or from another allocator such as jemalloc.
`cdlib` leaves this process-wide choice to the user."""

SPIRAL_STEPS, SPIRAL_K = 4000, 5  # the spiral chapter's default run


def compile_text(c: dict) -> str:
    """Describe the torch.compile measurement and whether it pays for its warm-up."""
    passes = SPIRAL_STEPS * (SPIRAL_K + 1)
    saving_ms = c["eager_ms"] - c["compiled_ms"]
    break_even_ms = 1e3 * c["warmup_s"] / passes
    text = (
        f"`torch.compile` of the hand-written pass at the spiral chapter's size "
        f"(width {c['width']}, batch {c['batch']}) took {c['warmup_s']:.0f} s to compile "
        f"with an empty inductor cache, as in a reader's first run.\n"
        f"Compiling again in the same process, with the caches of the first compile, "
        f"took {c['cached_warmup_s']:.2g} s; a new process also finds the cache on disk, "
        f"but pays again for starting the compiler.\n"
        f"A compiled pass then took {c['compiled_ms']:.3g} ms against "
        f"{c['eager_ms']:.3g} ms eagerly, a saving of {saving_ms:.3g} ms per pass.\n"
        f"The chapter's {SPIRAL_STEPS} steps of adjusted CD-{SPIRAL_K} run {passes} "
        f"passes, so compiling pays for the first run's warm-up only if it saves "
        f"more than {break_even_ms:.3g} ms per pass.\n"
    )
    if saving_ms > break_even_ms:
        return text + (
            "It does on this machine, but the default path stays eager, because the "
            "gain depends on the machine and every new process pays a warm-up."
        )
    return text + "It does not, so the default path stays eager."


ALLOCATOR_LIMIT = """- **The allocator.**
  Fresh pages cost a page fault each when they are first written.
  Keeping freed memory changed the CD-k step at width 512, batch 1024 and k = 5 from {allocator_default} ms to {allocator_retained} ms, as the section on the memory allocator shows.
"""

LIMITS_TEXT = (
    """- **Where the FLOPs go.**
  A straightforward CD step runs its chain (k + 1 passes with input gradients) and then a new forward pass over $x_0$ and $x_k$ with the parameters' autograd graph and its backward pass, $(2k + 8)F$ in all.
  `ContrastiveDivergence` instead keeps the chain's own passes at $x_0$ and $x_k$.
  On an `EnergyMLP`, the hand-written pass of `cdlib.backprop` stores each layer's input and output gradient at those two states, and the parameter gradient is one product per layer: $(2k + 4)F$.
  With MH rejection, only the rows whose last proposal was rejected are evaluated again.
  CNCE draws its noise step without evaluating the model, because its loss evaluates both points with gradients anyway.
- **Element-wise work and memory.**
  Between the matrix products, every layer applies a LeakyReLU, its derivative and a skip connection, each a pass over a (batch, width) array.
  At batch 1024 and width 512 such an array takes 2 MB, against the L2 cache of {l2} per core given above, so these passes run at the speed of the memory rather than of the core.
  At width 128 each product is too short to keep the core busy for long, and the per-call costs of the Python loop and the PyTorch dispatcher weigh more.
"""
    + ALLOCATOR_LIMIT
    + """- **Tried and not kept.**
  `torch.compile`, see above.
  The transforms of `torch.func` run the same products as autograd, so they cannot remove the second backward pass over $x_0$ and $x_k$ that the stored layer gradients remove."""
)


def run(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes, for CI: checks that the script runs",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads value (default: every usable core)",
    )
    parser.add_argument(
        "--device", default="cpu", help="torch device to time, e.g. cpu or cuda"
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=ROOT / "book",
        help="folder for benchmarks.md and benchmark_figures/",
    )
    parser.add_argument(
        "--render-only",
        action="store_true",
        help="rewrite the page and figures from benchmark_figures/benchmark_results.json "
        "in --output-dir without measuring again",
    )
    parser.add_argument(
        "--skip-torchebm",
        action="store_true",
        help="leave out the TorchEBM rows even if it is installed",
    )
    args = parser.parse_args(argv)

    if args.render_only:
        saved = args.output_dir / "benchmark_figures" / "benchmark_results.json"
        if not saved.exists():
            parser.error(
                f"--render-only needs {saved}, which is missing; run a measurement first"
            )
        results = json.loads(saved.read_text())
        path = write_page(results, Grid(**results["grid"]), args.output_dir)
        print(f"wrote {path} from {saved}")
        return path

    started = time.perf_counter()
    usable = (
        len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count()
    )
    threads = usable if args.threads is None else args.threads
    if threads < 1:
        parser.error(f"--threads must be at least 1, got {threads}")
    torch.set_num_threads(threads)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device must name a torch device such as cpu or cuda, got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device is {args.device!r} but CUDA is not available")
    try:
        (args.output_dir / "benchmark_figures").mkdir(parents=True, exist_ok=True)
    except OSError as error:
        parser.error(f"--output-dir {str(args.output_dir)!r} cannot be created: {error}")
    grid = QUICK if args.quick else FULL
    timer = Timer(device)

    progress = []

    def log(message):
        elapsed = time.perf_counter() - started
        progress.append(
            {"message": message, "elapsed_s": elapsed, "load": os.getloadavg()[0]}
        )
        print(f"[{elapsed:6.1f} s] {message}", flush=True)

    if not torchebm_available():
        torchebm_status = "missing"
        log(
            f"skipping the TorchEBM rows: torchebm is not installed; install it with `{INSTALL_TORCHEBM}`"
        )
    elif args.skip_torchebm:
        torchebm_status = "skipped"
        log("skipping the TorchEBM rows: --skip-torchebm given")
    else:
        torchebm_status = "measured"
    with_torchebm = torchebm_status == "measured"

    command = "python benchmarks/training_speed.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    results = {
        "command": command.strip()
        + ("" if args.threads is not None else f" --threads {threads}"),
        "quick": args.quick,
        "torchebm": torchebm_status,
        "grid": asdict(grid),
        "load_start": os.getloadavg(),
        "machine": machine_description(device, threads),
    }
    batches = sorted(set(grid.batches))
    results["matmul"] = measure_matmul(
        grid.widths, batches, grid.matmul_repeats, timer, device
    )
    log("matmul rate done")
    results["pass"] = measure_pass(
        grid.widths, batches, grid.repeats, grid.warmup, timer, device
    )
    log("one pass done")
    results["steps"] = measure_grid(grid, timer, device, with_torchebm, log)
    results["sweep"] = measure_batch_sweep(grid, timer, device, with_torchebm, log)
    if grid.side_experiments and device.type == "cpu":
        results["threads"] = measure_threads(sorted({1, usable}), timer, device)
        log("thread settings done")
        results["compile"] = measure_compile(timer, device)
        log("torch.compile done")
        results["allocator"] = measure_allocator(timer, device, with_torchebm, log)
        log("allocator done")
    clocks = ("wall",) if device.type == "cuda" else ("wall", "cpu")
    results["targets"] = check_targets(
        results["steps"], results["matmul"], grid, with_torchebm, clocks
    )
    results["load_end"] = os.getloadavg()
    results["progress"] = progress
    results["duration_s"] = time.perf_counter() - started
    path = write_page(results, grid, args.output_dir)
    log(f"wrote {path}")
    return path


if __name__ == "__main__":
    run()
