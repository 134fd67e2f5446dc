"""What every benchmark shares: a clock that waits for the device, the machine's limits measured
in the same run, what a run records about itself, its JSON file and its plots.

A benchmark reads its rates against limits measured in the same run (a copy's bandwidth, a
square matmul's FLOP rate), so those limits are measured here, one way for every benchmark that
reads them: numbers from different benchmarks stay comparable. Two ways of timing a call, because
calls differ by six orders of magnitude: `Timer.median_s` times each call alone (an engine run, a
512 MiB copy, a 2048^3 matmul: milliseconds and up), `Timer.loop_us` times loops of back-to-back
calls (a kernel of a few microseconds, below what one clock reading resolves).

Benchmarks are scripts; this module and the libraries beside them (bench/e2e/presets.py,
hf_baseline.py, roofline.py) are imported, and a benchmark never imports another benchmark. A
script run as a file puts the checkout's root on sys.path first, so `bench.common` is this file.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import json
import platform
import re
import statistics
import subprocess
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

# The CPU features the kernels and torch's matmuls choose their paths by (x86: csrc/cpu/vec.h's
# AVX2 / AVX-512 paths, AVX512-BF16 dot products, oneDNN's AMX tiles; Arm: SVE, BF16).
CPU_ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "sve", "bf16")


# Timing.

@dataclass(frozen=True)
class Timer:
    """Wall-clock time on `device` that waits for its queued work first: torch.cuda.synchronize
    on CUDA; on the CPU an op has finished when it returns."""

    device: str

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    def now(self) -> float:
        """time.perf_counter() once the device has finished what was queued."""
        self.sync()
        return time.perf_counter()

    def median_s(self, fn, repeats: int) -> float:
        """Median seconds of fn() over `repeats` calls, each timed alone, after one warm-up."""
        fn()
        times = []
        for _ in range(repeats):
            start = self.now()
            fn()
            times.append(self.now() - start)
        return statistics.median(times)

    def loop_us(self, fn) -> float:
        """Microseconds per fn() call: the median of 5 loops of enough calls to fill ~50 ms (at
        most 1000), sized by one timed call after a warm-up."""
        fn()
        start = self.now()
        fn()
        once = max(self.now() - start, 1e-6)
        reps = max(1, min(1000, int(0.05 / once)))
        samples = []
        for _ in range(5):
            start = self.now()
            for _ in range(reps):
                fn()
            samples.append((self.now() - start) / reps * 1e6)
        return statistics.median(samples)


def free_device_memory(device: str) -> None:
    """Returns what freed objects held to the device (between engines that must not overlap)."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def check(name: str, got: torch.Tensor, want: torch.Tensor, tol: float = 3e-2) -> None:
    """Exits, naming the op, where fastgen's result is off its baseline's by more than tol of
    the baseline's largest magnitude: a result is checked before it is timed."""
    err = (got.float() - want.float()).abs().max().item()
    scale = want.float().abs().max().item() + 1e-6
    if err > tol * scale:
        raise SystemExit(f"{name}: fastgen differs from the baseline (max error {err:.3g})")


# Machine limits, measured in the same run.

def copy_bandwidth(device: str, nbytes: int = 1 << 29, time_s=None) -> float:
    """GB/s read + written by a plain copy of nbytes bytes on device: 2 * nbytes / its time.
    time_s(fn) gives the time in seconds; by default the median of 5 copies (Timer.median_s)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    time_s = time_s or partial(Timer(device).median_s, repeats=5)
    return 2 * nbytes / time_s(lambda: dst.copy_(src)) / 1e9


def matmul_tflop_s(device: str, dtype: torch.dtype, n: int = 2048, trials: int = 3,
                   time_s=None) -> float:
    """TFLOP/s of a square [n, n] @ [n, n] matmul in dtype: 2 n^3 / its time, the best of
    `trials` timings (a peak, so the best, not the median). time_s(fn) gives a timing in seconds;
    by default the median of 3 calls (Timer.median_s)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    time_s = time_s or partial(Timer(device).median_s, repeats=3)
    return max(2 * n ** 3 / time_s(lambda: a @ b) for _ in range(trials)) / 1e12


@dataclass(frozen=True)
class MachineLimits:
    """The two roofs a benchmark's rates are read against."""

    copy_gb_s: float       # read + write bytes per second of a large device copy
    matmul_tflop_s: float  # a square matmul in the benchmark's dtype
    matmul_size: int

    @classmethod
    def measure(cls, device: str, dtype: torch.dtype, matmul_size: int = 2048,
                copy_bytes: int = 1 << 29) -> MachineLimits:
        """A copy of copy_bytes (the median of 5), then a matmul_size^3 matmul (the best of 3
        medians of 3)."""
        return cls(copy_bandwidth(device, copy_bytes), matmul_tflop_s(device, dtype, matmul_size),
                   matmul_size)

    def best(self, other: MachineLimits) -> MachineLimits:
        """The higher of each limit. Benchmarks measure before and after their engines and keep
        the best: a limit measured while something else briefly held a core would make every
        fraction of it look too good."""
        return MachineLimits(max(self.copy_gb_s, other.copy_gb_s),
                             max(self.matmul_tflop_s, other.matmul_tflop_s), self.matmul_size)


# What a run records about itself.

def cpu_name(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name, with those of CPU_ISA_FLAGS it has: "AMD EPYC (avx2 avx512f
    avx512_bf16)". From cpuinfo; the platform's name where there is none."""
    try:
        info = cpuinfo.read_text()
    except OSError:
        return platform.processor() or platform.machine()
    model = re.search(r"^model name\s*:\s*(.+)$", info, re.MULTILINE)
    flags = re.search(r"^(?:flags|Features)\s*:\s*(.*)$", info, re.MULTILINE)  # x86 | Arm
    name = model.group(1).strip() if model else platform.machine()
    present = set(flags.group(1).split()) if flags else set()
    isa = [flag for flag in CPU_ISA_FLAGS if flag in present]
    return f"{name} ({' '.join(isa)})" if isa else name


def device_name(device: str) -> str:
    """The GPU's name, or the CPU's (cpu_name) with the threads torch runs on."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()}, {torch.get_num_threads()} threads"


def git_commit() -> str:
    """The commit of the fastgen being measured (the package imported, wherever it is), with
    "-dirty" when tracked files differ from it; "unknown" outside a git checkout."""
    import fastgen

    try:
        described = subprocess.run(["git", "describe", "--always", "--dirty"], check=True,
                                   cwd=Path(fastgen.__file__).parent, capture_output=True,
                                   text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return described or "unknown"


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def run_metadata(device: str) -> dict:
    """Where, when and on what a run ran: the device's name, the UTC date, fastgen's commit, and
    the torch and transformers versions (the baselines' code)."""
    return {"device_name": device_name(device),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": git_commit(), "torch": torch.__version__,
            "transformers": package_version("transformers")}


# Results: the JSON file, the plots.

def save_json(path: str | Path, results: dict, indent: int = 2) -> None:
    """results as JSON in path, keys in their insertion order."""
    Path(path).write_text(json.dumps(results, indent=indent) + "\n")


def add_output_options(parser: argparse.ArgumentParser) -> None:
    """--json, --plot and --plot-from, for a benchmark whose results are a JSON file written
    after every measurement and can be drawn again later, on any machine (see report)."""
    parser.add_argument("--json", help="write the results here (after every measurement)")
    parser.add_argument("--plot", help="draw a PNG here (needs matplotlib)")
    parser.add_argument("--plot-from", help="only draw --plot from this --json file")


def report(args, benchmark, print_table, plot) -> dict:
    """benchmark(args)'s results, or with --plot-from those read back from that JSON file,
    printed by print_table and, with --plot, drawn by plot(results, path)."""
    results = json.loads(Path(args.plot_from).read_text()) if args.plot_from else benchmark(args)
    print_table(results)
    if args.plot:
        plot(results, args.plot)
    return results


def pyplot(missing: str = "no plot (the JSON has the numbers)"):
    """matplotlib.pyplot on the Agg backend (files, no display), or None where matplotlib is not
    installed, after printing "matplotlib is not installed: " + missing."""
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed: {missing}")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str) -> None:
    """fig laid out and written to path as a PNG at 120 dpi."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def begin_plot(path: str):
    """(fig, (left, right)): a figure of two panels side by side, to be finished by end_plot;
    None, saying so, where matplotlib is not installed: the plot meant for `path` can then be
    drawn elsewhere with --plot-from."""
    plt = pyplot(f"no plot written to {path}; draw it elsewhere with --plot-from <the --json "
                 f"file> --plot {path}")
    return None if plt is None else plt.subplots(1, 2, figsize=(11, 4.2))


def end_plot(fig, path: str, xs: list[int], log_axis) -> bool:
    """Writes to path (a PNG) a begin_plot figure whose panels share the x values xs: on each,
    x ticks at exactly those, labelled plainly, a grid and a legend; log_axis, a log-scale axis,
    labelled in plain numbers (200, not 2 x 10^2), its minor ticks only at the 2s and 5s (20, 50,
    200, 500, ...: not every minor tick). True, as a plot function returns when it drew."""
    from matplotlib.ticker import FuncFormatter

    log_axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    log_axis.set_minor_formatter(FuncFormatter(
        lambda value, _: f"{value:g}" if f"{value:g}"[0] in "25" else ""))
    for axes in fig.axes:
        axes.set_xticks(xs, [str(x) for x in xs])
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    save_figure(fig, path)
    return True
