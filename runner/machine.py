"""What a variant's process reads of its machine through torch: the peak memory of each phase of
its work, the device's clock synchronizer, the size of a model's state dict, and the environment a
number was measured in.

The torch half of measuring (runner/measure.py holds the statistics and the clock, which the driver
and collect read without torch). Runs where the variant runs.
"""

from __future__ import annotations

import io
import os
import platform
import re
import socket
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version

import torch

from runner.measure import MACHINE_VARIABLE, cpu_info


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
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return round(buffer.tell() / 2**20, 4)


def synchronizer(device: str):
    """Returns the function that must run before the clock is read: CUDA work is asynchronous."""
    if device == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def gpu_info() -> dict | None:
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
    try:
        return version(module)
    except PackageNotFoundError:
        return None


def environment() -> dict:
    return {
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {
            name: _version(name)
            for name in ("torch", "transformers", "accelerate", "bitsandbytes", "ray")
        },
        "machine": os.environ.get(MACHINE_VARIABLE) or None,
        "cpu": cpu_info(),
        # The kernels' instruction set (AVX512, AVX2, ...): int8 kernels round differently on each.
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "gpu": gpu_info(),
        "torch_threads": torch.get_num_threads(),
        "niceness": os.nice(0),
        "quantized_engine": torch.backends.quantized.engine,
    }
