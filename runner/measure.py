"""Measuring: the clock, memory peaks, model size and the environment a number was measured in.

Everything that turns work into a number lives here, implemented once: the latency statistics, the
peak-memory phases, the size of a state dict, the hardware and software versions. Nothing here knows
about jobs or Ray.
"""

from __future__ import annotations

import io
import math
import os
import platform
import re
import socket
import statistics
import time
from contextlib import contextmanager
from datetime import UTC, datetime

import numpy as np

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
    try:
        import resource
    except ImportError:  # Windows
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
# Memory.


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            match = re.search(rf"^{field}:\s+(\d+) kB", handle.read(), re.M)
        return int(match.group(1)) if match else None
    except OSError:
        return None


def _reset_rss_peak() -> bool:
    """Linux lets a process reset its own high-water mark (clear_refs 5): peaks per phase."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


class MemoryPhases:
    """Peak resident memory (and CUDA memory) of this process for each named phase."""

    def __init__(self, device: str):
        self.device = device
        self.phases: dict[str, dict] = {}
        self.resettable = _reset_rss_peak()

    @contextmanager
    def phase(self, name: str):
        import torch

        cuda = self.device == "cuda" and torch.cuda.is_available()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.resettable = _reset_rss_peak() and self.resettable
        yield
        peak = _status_kib("VmHWM")
        record = {"peak_rss_mib": round(peak / 1024, 1) if peak else None}
        if cuda:
            torch.cuda.synchronize()
            record["peak_cuda_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            record["peak_cuda_reserved_mib"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
        self.phases[name] = record

    # Analysis loads an FP32 reference after the measured work: its peak is reported apart.
    MEASURED = ("load", "quantize", "evaluate")

    def peak_rss_mib(self) -> float | None:
        values = [
            p["peak_rss_mib"]
            for name, p in self.phases.items()
            if name in self.MEASURED and p.get("peak_rss_mib") is not None
        ]
        return max(values) if values else None

    def peak_cuda_mib(self) -> float | None:
        values = [
            p["peak_cuda_allocated_mib"]
            for name, p in self.phases.items()
            if name in self.MEASURED and "peak_cuda_allocated_mib" in p
        ]
        return max(values) if values else None


def model_size_mib(model) -> float:
    """Bytes of torch.save(model.state_dict()) / 2^20: what the published study measured."""
    import torch

    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return round(buffer.tell() / 2**20, 4)


# ---------------------------------------------------------------------------------------------
# The clock.


def synchronizer(device: str):
    """Returns the function that must run before the clock is read: CUDA work is asynchronous."""
    if device == "cuda":
        import torch

        return torch.cuda.synchronize
    return lambda: None


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


def gpu_info() -> dict | None:
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return {
        "name": props.name,
        "memory_mib": round(props.total_memory / 2**20),
        "compute_capability": f"{props.major}.{props.minor}",
        "cuda": torch.version.cuda,
        "count": torch.cuda.device_count(),
    }


def _version(module: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return None


def environment() -> dict:
    import torch

    return {
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {
            name: _version(name)
            for name in ("torch", "transformers", "accelerate", "bitsandbytes", "ray")
        },
        "cpu": cpu_info(),
        "gpu": gpu_info(),
        "torch_threads": torch.get_num_threads(),
        "niceness": os.nice(0),
        "quantized_engine": torch.backends.quantized.engine,
    }


def hardware_label(env: dict, device: str) -> str:
    """One line naming the hardware a result ran on, for table headers."""
    if device == "cuda" and env.get("gpu"):
        return env["gpu"]["name"]
    cpu = env.get("cpu", {})
    return f"{cpu.get('model', '?')} x{env.get('torch_threads', '?')} threads"
