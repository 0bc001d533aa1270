"""The family protocol, as a worker runs it: `FamilyWorker`, whose defaults are a plain FP32
model's, and the one load-and-quantize every caller uses (`quantized_model`).

A family's `worker.py` subclasses FamilyWorker and overrides only what differs; the methods take
the precision's declaration (runner.precisions.Precision) and its config (the frozen dataclass of
the settings it reads) and dispatch on the config's type. This module imports torch and
transformers at its top: it is imported on workers only, never by the driver.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import transformers.modeling_utils
from transformers.pytorch_utils import Conv1D

from runner import machine
from runner.precisions import Precision

# --------------------------------------------------------------------------------------------------
# What every family shares
# --------------------------------------------------------------------------------------------------


@contextmanager
def files_read_not_mapped() -> Iterator[None]:
    """from_pretrained reads safetensors files with pread instead of mapping them (safetensors'
    other backend; transformers itself uses it on Windows and MPS). A mapped file's pages stay
    resident, and count in the process's RSS, for as long as any tensor views the file: an
    embedding kept in FP32 kept all of it, so a quantized variant held its FP32 checkpoint too
    (SmolLM2: 513 MiB). Read, each tensor has memory of its own, freed when it is."""
    original = getattr(transformers.modeling_utils, "safe_open", None)
    if original is None:  # a transformers that reads otherwise: its own way, mapped or not
        yield
        return

    def read_with_pread(*args, **kwargs):
        kwargs["backend"] = "pread"
        return original(*args, **kwargs)

    transformers.modeling_utils.safe_open = read_with_pread
    try:
        yield
    finally:
        transformers.modeling_utils.safe_open = original


def load_as(dtype_name: str, model_class, model_dir, device):
    """The checkpoint loaded straight into dtype_name (a cast variant never holds an FP32 copy it
    drops), on the device, in eval mode; and what to record of it."""
    with files_read_not_mapped():
        model = model_class.from_pretrained(model_dir, dtype=getattr(torch, dtype_name))
    return model.to(device).eval(), {"dtype": dtype_name}


def as_cpu_float(t: torch.Tensor) -> torch.Tensor:
    """A weight as float32 on the CPU: what every family's read-back weights are."""
    return t.detach().to(device="cpu", dtype=torch.float32)


def linear_names(model) -> list[str]:
    """The module names of the model's nn.Linear layers (bnb's layers subclass it), in order."""
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def check_keep(model, keep: frozenset[str], precision: str) -> None:
    """Every name to keep in FP32 must be a linear layer of the model. Raises ValueError."""
    linears = linear_names(model)
    unknown = sorted(set(keep) - set(linears))
    if unknown:
        shown = ", ".join(linears[:4]) + (", ..." if len(linears) > 4 else "")
        raise ValueError(
            f"{precision}: cannot keep {unknown} in FP32: not linear layers of the model; "
            f"its {len(linears)} linear layers are named like {shown}"
        )


# --------------------------------------------------------------------------------------------------
# The protocol
# --------------------------------------------------------------------------------------------------


class FamilyWorker:
    """What a family does on the worker. The defaults are a plain FP32 model's: loaded in FP32,
    nothing quantized, nn.Linear and GPT-2 Conv1D layers read as stored, no grid, no extra
    analysis. The weight analysis reads the FP32 reference with this class itself (REFERENCE)."""

    # True where loading already quantizes (bitsandbytes through transformers, the casts' dtype):
    # a study then loads again for each measurement instead of quantizing a copy of its FP32 model.
    quantizes_while_loading = False
    # True where quantize converts each linear layer on its own (no layer's result depends on
    # another's): quantized_model then converts the layers a few at a time.
    quantizes_layers_alone = False

    def load(
        self, precision: Precision, config, model_class, model_dir, device, keep=frozenset()
    ) -> tuple[Any, dict]:
        """The saved checkpoint through the task's transformers class (weights at their final
        dtype), on the device, in eval mode; and what to record of it. keep: module names of linear
        layers to leave in FP32 (a sensitivity study's mixed model). Raises ValueError for a kept
        name that is not a linear layer."""
        model, recorded = load_as("float32", model_class, model_dir, device)
        check_keep(model, keep, precision.name)
        return model, recorded

    def calibrate(
        self, model, precision: Precision, config, batches: list[dict], keep=frozenset()
    ) -> tuple[Any, Any]:
        """What a calibrated precision (precision.calibrated) observes of the FP32 model on the
        calibration batches (model inputs of one row each, on the model's device): the model to
        quantize (the same one, or a library's prepared copy) and the observations quantize
        takes. The whole model is observed, the layers in keep too. Never called for a precision
        that does not calibrate."""
        return model, None

    def quantize(
        self, model, precision: Precision, config, keep=frozenset(), calibration=None
    ) -> tuple[Any, dict]:
        """The model quantized, but the layers in keep; and what to record of it. calibration:
        what calibrate observed (None for a precision that does not calibrate)."""
        return model, {}

    def linear_classes(self) -> tuple[type, ...]:
        """The layer classes its models compute a linear layer with (counted in a result's
        settings.linear_layers)."""
        return (torch.nn.Linear,)

    def layer_weight(self, name: str, module) -> torch.Tensor | None:
        """The float32 CPU weight, [out, in], one of its layers really computes with (dequantized);
        None for a module that is no linear layer."""
        if isinstance(module, torch.nn.Linear):
            return as_cpu_float(module.weight)
        if isinstance(module, Conv1D):
            # GPT-2 style Conv1D stores [in, out]; transpose to nn.Linear's [out, in].
            return as_cpu_float(module.weight).T.contiguous()
        return None

    def is_quantized(self, config, module) -> bool:
        """Whether this layer holds its weight as the precision does: a plain FP32 model quantizes
        nothing."""
        return False

    def leaves_unquantized(self, model, name: str) -> bool:
        """Whether the family keeps this linear layer out of quantization by design."""
        return False

    def grid(self, precision: Precision, config, weight: torch.Tensor) -> dict | None:
        """The values it can represent at this FP32 weight's scale (runner.analysis.make_grid);
        None where there is none to draw (a float format)."""
        return None

    def extra_analysis(self, config, reference_model, batches: list[dict]) -> dict:
        """What it analyses beyond the weight errors, on the FP32 model and evaluation batches."""
        return {}

    def linear_layer_kinds(self, model) -> dict[str, int]:
        """How many linear layers of each class the model computes with: shows what was really
        quantized. A layer that computes with a tensor subclass (torchao's) names it too:
        "torch.nn.modules.linear.Linear[torchao.quantization.Int8Tensor]"."""
        classes = self.linear_classes()
        counts: dict[str, int] = {}
        for module in model.modules():
            if isinstance(module, classes):
                name = _class_name(type(module))
                weight_class = _tensor_subclass(getattr(module, "weight", None))
                if weight_class is not None:
                    name += f"[{_class_name(weight_class)}]"
                counts[name] = counts.get(name, 0) + 1
        return counts


# How the FP32 reference's weights are read.
REFERENCE = FamilyWorker()


def _class_name(cls: type) -> str:
    return cls.__module__ + "." + cls.__name__


def _tensor_subclass(weight) -> type | None:
    """The weight's class where it is a tensor subclass that does its own matmul; None for a plain
    tensor or a Parameter subclass (bnb's Int8Params, Params4bit: their layer class says it)."""
    kind = type(weight)
    if not isinstance(weight, torch.Tensor) or kind is torch.Tensor:
        return None
    return None if issubclass(kind, torch.nn.Parameter) else kind


# --------------------------------------------------------------------------------------------------
# Loading and quantizing
# --------------------------------------------------------------------------------------------------


@dataclass
class Quantized:
    """The model as the precision computes with it, what loading and quantizing recorded, and how
    long each took."""

    model: Any
    recorded: dict
    load_s: float
    quantize_s: float
    calibrate_s: float | None = None  # None: the precision does not calibrate


def _no_phase(name: str) -> AbstractContextManager:
    return nullcontext()


def quantized_model(
    precision: Precision,
    config,
    family: FamilyWorker,
    model_class,
    model_dir,
    device: str,
    keep=frozenset(),
    calibration: list[dict] | None = None,
    phase: Callable[[str], AbstractContextManager] = _no_phase,
    fp32=None,
) -> Quantized:
    """The checkpoint loaded and quantized as the precision does, every linear layer but those
    named in keep (full module names, kept as FP32 nn.Linear). calibration: the batches a
    calibrated precision observes first, in a step of its own. phase(name): a context manager
    around the "load", "calibrate" and "quantize" steps (the worker's memory phases). fp32: the
    FP32 model already loaded (a study's), quantized as a copy instead of loading again, unless
    the family quantizes while loading. Raises ValueError for a kept name that is not a linear
    layer, or a cast (fp16, bf16) asked to keep."""
    keep = frozenset(keep)
    with phase("load"):
        started = time.perf_counter()
        if fp32 is None or family.quantizes_while_loading:
            model, recorded = family.load(precision, config, model_class, model_dir, device, keep)
        else:
            model, recorded = copy.deepcopy(fp32), {}
            check_keep(model, keep, precision.name)
        load_s = time.perf_counter() - started
    observed, calibrate_s = None, None
    if precision.calibrated:
        if not calibration:
            raise ValueError(f"{precision.name} calibrates on data: it needs calibration batches")
        with phase("calibrate"):
            started = time.perf_counter()
            model, observed = family.calibrate(model, precision, config, calibration, keep)
            calibrate_s = time.perf_counter() - started
    with phase("quantize"):
        started = time.perf_counter()
        if family.quantizes_layers_alone:
            model, quantized = quantize_in_parts(model, precision, config, family, keep)
        else:
            model, quantized = family.quantize(model, precision, config, keep, observed)
        quantize_s = time.perf_counter() - started
    recorded.update(quantized)
    if keep:
        recorded["kept_in_fp32"] = sorted(keep)
    return Quantized(model, recorded, load_s, quantize_s, calibrate_s)


# Each part's FP32 weights are freed before the next part is converted.
PART_BYTES = 64 * 2**20


def quantize_in_parts(model, precision: Precision, config, family: FamilyWorker, keep):
    """family.quantize over the linear layers not kept, a part of about PART_BYTES of weights at
    a time, each part's freed FP32 weights and the library's temporaries handed back before the
    next: the quantize phase's peak is the loaded model and one part, where converting all at once
    held a second model's worth (torch.ao's replaced layers wait in reference cycles for the
    garbage collector; torchao's temporaries fragment the heap). The layers convert alone, so the
    result is the same."""
    names = [n for n in linear_names(model) if n not in keep]
    if not names:
        return family.quantize(model, precision, config, keep)
    for part in _parts(model, names):
        others = frozenset(keep) | (frozenset(names) - frozenset(part))
        model, recorded = family.quantize(model, precision, config, others)
        machine.release_freed_memory()
    return model, recorded


def _parts(model, names: list[str]) -> list[list[str]]:
    """names in order, cut into runs of about PART_BYTES of weights (at least one layer each)."""
    modules = dict(model.named_modules())
    return runs_of_about(names, lambda name: modules[name].weight.nbytes, PART_BYTES)


def runs_of_about(names: list[str], nbytes: Callable[[str], int], limit: int) -> list[list[str]]:
    """names in order, cut into runs of about limit bytes as nbytes(name) counts them (at least
    one name each)."""
    parts: list[list[str]] = [[]]
    size = 0
    for name in names:
        if parts[-1] and size + nbytes(name) > limit:
            parts.append([])
            size = 0
        parts[-1].append(name)
        size += nbytes(name)
    return [part for part in parts if part]
