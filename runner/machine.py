"""What a variant's process reads of its machine through torch: the peak memory of each phase of
its work, the device's clock synchronizer, the size of a model's state dict (and whether quantizing
untied its output layer from its embedding), and the environment a number was measured in.

The torch half of measuring (runner/measure.py holds the statistics and the clock, which the driver
and collect read without torch). Runs where the variant runs.
"""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import re
import socket
from contextlib import contextmanager
from dataclasses import dataclass
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


def trim_heap() -> None:
    """Asks glibc to hand the freed parts of its heap back to the system: between the layers of a
    loop whose temporaries (a layer's output, its float64 sums) would otherwise leave the heap as
    large as all of them together. Milliseconds; no garbage collection."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # no glibc: the freed memory stays with the process, for its next allocations


def release_freed_memory() -> None:
    """Collects what Python still holds and asks glibc to hand freed heap back to the system, so
    the next phase's peak RSS does not carry what this one freed (glibc keeps freed blocks below
    its mmap threshold, which rises to 32 MiB as large tensors are freed)."""
    gc.collect()
    trim_heap()


def model_size_mib(model) -> float:
    """Bytes of torch.save(model.state_dict()) / 2^20: what the published study measured.
    torch.save writes a storage that several tensors share once, so a tied embedding and output
    layer count once."""
    return round(saved_bytes(model.state_dict()) / 2**20, 4)


def saved_bytes(state: dict) -> int:
    """len(torch.save(state)) without the file in memory: torch's zip writer hands a file-like
    object each record as a view of the tensor's own storage, and ByteCounter keeps only the
    count (a BytesIO held a second copy of the model)."""
    counter = ByteCounter()
    torch.save(state, counter)
    return counter.written


class ByteCounter:
    """A write-only file that counts the bytes written to it and keeps none of them."""

    def __init__(self):
        self.written = 0

    def write(self, data) -> int:
        size = memoryview(data).nbytes
        self.written += size
        return size

    def flush(self) -> None:
        pass


@dataclass(frozen=True)
class UntiedOutput:
    """A tied output layer that quantization gave a weight of its own."""

    output_layer: str  # its module name: lm_head
    embedding: str  # the input embedding it was tied to: model.embed_tokens
    mib: float  # what its own copy adds to model_size_mib

    def warning(self) -> str:
        return (
            f"quantization untied the output layer from the embedding (+{self.mib:.4g} MiB): "
            f"{self.output_layer} holds a quantized copy of its own, {self.embedding} the "
            "weight as loaded"
        )


def untied_output(model) -> UntiedOutput | None:
    """Where the checkpoint ties its output layer to its input embedding but the model's output
    layer no longer computes with that same weight (torch.ao's int8-dynamic and torchao swap in
    a quantized copy; bitsandbytes and the casts keep the tie): the layers and what the copy adds
    to the size. None for an untied checkpoint or a tie that holds."""
    config = getattr(model, "config", None)
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()  # a multimodal config keeps the tie in its text part
    if not getattr(config, "tie_word_embeddings", False):
        return None
    try:
        embedding, output = model.get_input_embeddings(), model.get_output_embeddings()
    except NotImplementedError:  # a model transformers finds no embedding in
        return None
    if embedding is None or output is None or getattr(output, "weight", None) is embedding.weight:
        return None
    names = {module: name for name, module in model.named_modules()}
    output_name = names[output]
    state = model.state_dict()
    without = {key: v for key, v in state.items() if not key.startswith(output_name + ".")}
    mib = (saved_bytes(state) - saved_bytes(without)) / 2**20
    return UntiedOutput(output_name, names[embedding], round(mib, 4))


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
