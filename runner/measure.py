"""Measuring: the clock, memory peaks, model size and the environment a number was measured in.

Everything that turns work into a number lives here, implemented once: the latency statistics, the
peak-memory phases, the size of a state dict, the hardware and software versions. Nothing here knows
about jobs or Ray.
"""

from __future__ import annotations

import math
import os
import platform
import re
import statistics
import time
from datetime import UTC, datetime

import numpy as np

try:
    import resource
except ImportError:  # Windows
    resource = None

# Instruction-set extensions that decide CPU speed for FP32/BF16/INT8 kernels.
SPEED_FLAGS = (
    "avx2",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)


def now() -> str:
    """The time now, UTC, ISO 8601 to the millisecond: how results say when something happened."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


# A latency distribution is called noisy when its coefficient of variation exceeds this.
NOISY_CV = 0.10


def latency_stats(seconds: list[float]) -> dict:
    """The distribution of per-pass latencies, in milliseconds, with a 95% interval for the
    median."""
    ms = sorted(s * 1000.0 for s in seconds)
    n = len(ms)
    if n == 0:
        return {"n": 0}
    mean = statistics.fmean(ms)
    std = statistics.stdev(ms) if n > 1 else 0.0
    stats = {
        "mean": mean,
        "median": statistics.median(ms),
        "std": std,
        # numpy's default "linear": between the closest ranks, at (n - 1) * q / 100.
        "p90": float(np.percentile(ms, 90, method="linear")),
        "p99": float(np.percentile(ms, 99, method="linear")),
        "min": ms[0],
        "max": ms[-1],
        "n": n,
        "cv": std / mean if mean else 0.0,
        "median_ci95": median_ci95(ms),
    }
    return {
        k: (
            round(v, 4)
            if isinstance(v, float)
            else [round(x, 4) for x in v]
            if isinstance(v, list)
            else v
        )
        for k, v in stats.items()
    }


def median_ci95(sorted_values: list[float]) -> list[float]:
    """A distribution-free 95% interval for the median of sorted values: the order statistics at
    n/2 -+ 1.96 sqrt(n)/2 (for 7 values or fewer, their range)."""
    n = len(sorted_values)
    half_width = 1.96 * math.sqrt(n) / 2
    low = max(0, math.floor(n / 2 - half_width) - 1)
    high = min(n - 1, math.ceil(n / 2 + half_width) - 1)
    return [sorted_values[low], sorted_values[high]]


def same_shape_cv(seconds: list[float], shapes: list) -> tuple[float | None, int]:
    """The coefficient of variation of passes of the same shape, pooled over the shapes: the
    machine's noise, whatever the inputs' lengths. Each pass deviates from its own shape's mean,
    relative to that mean; with n passes of k shapes, n - k of them carry the spread. Returns (cv, n
    - k); cv is None when no shape was timed twice."""
    groups: dict = {}
    for value, shape in zip(seconds, shapes):
        groups.setdefault(shape, []).append(value)
    squares, repeated = 0.0, 0
    for values in groups.values():
        mean = statistics.fmean(values)
        if len(values) < 2 or not mean:
            continue
        squares += sum(((v - mean) / mean) ** 2 for v in values)
        repeated += len(values) - 1
    return (round(math.sqrt(squares / repeated), 4) if repeated else None), repeated


def preemptions() -> int | None:
    """How often the kernel has taken a CPU from this process's threads for another runnable thread
    so far (involuntary context switches); None where the platform does not count them."""
    if resource is None:  # Windows
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw


def niceness_warning(env: dict) -> str | None:
    if (env.get("niceness") or 0) > 0:
        return (
            f"the variant ran at niceness {env['niceness']} (Ray starts its workers at 15 unless "
            "the node "
            "sets RAY_worker_niceness=0): every process at a lower niceness took the CPU before it"
        )
    return None


def noisy_warning(stats: dict) -> str | None:
    cv = stats.get("repeat_cv")
    if cv is not None and cv > NOISY_CV:
        rate = stats.get("preemptions_per_s")
        return (
            f"latency is noisy: passes of the same shape vary by {cv:.1%} (coefficient of "
            "variation, above "
            f"{NOISY_CV:.0%}); another process may have shared the cores"
            + (
                f" (the variant's threads lost the CPU {rate:.0f} times a second while timed)"
                if rate is not None
                else ""
            )
        )
    return None


# ---------------------------------------------------------------------------------------------
# The clock.


class Stopwatch:
    def __init__(self):
        self.started = time.perf_counter()

    def seconds(self) -> float:
        return round(time.perf_counter() - self.started, 4)


# ---------------------------------------------------------------------------------------------
# The environment.


def cpu_info() -> dict:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as handle:
            text = handle.read()
        found = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        model = found.group(1).strip() if found else model
        found = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
        flags = set(found.group(1).split()) if found else set()
    except OSError:
        pass
    return {
        "model": model,
        "logical_cpus": os.cpu_count(),
        "available_cpus": available_cpus(),
        "flags": {flag: flag in flags for flag in SPEED_FLAGS},
    }


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# The label a user gives the machine a variant runs on (`quantbench run --machine` sets it): tables
# name columns by it in place of the host name, which is often just "vm" or "localhost".
MACHINE_VARIABLE = "QUANTBENCH_MACHINE"


def hardware_label(env: dict, device: str) -> str:
    """One line naming the hardware a result ran on, for table headers: the GPU and its compute
    capability, or the CPU, the instruction set its kernels used (older results did not record it)
    and its threads."""
    gpu = env.get("gpu")
    if device == "cuda" and gpu:
        capability = gpu.get("compute_capability")
        return f"{gpu['name']} (cc {capability})" if capability else gpu["name"]
    cpu = env.get("cpu", {})
    isa = env.get("cpu_capability")
    model = f"{cpu.get('model', '?')} ({isa})" if isa else cpu.get("model", "?")
    return f"{model} x{env.get('torch_threads', '?')} threads"


def machine_name(env: dict) -> str | None:
    """What names the machine in column names: the user's label, else the host's name."""
    return env.get("machine") or env.get("host")
