"""fp32, fp16, bf16: the FP32 checkpoint loaded straight into a float dtype, nothing quantized.

Every linear layer keeps its nn.Linear (or GPT-2 Conv1D) and computes with its weight as stored. A
float format's grid is every number it represents, too dense to draw over a histogram: none is
given.

Keeping layers in FP32 (`keep`): fp32 keeps every layer already, so any linear layers may be named;
fp16 and bf16 refuse a non-empty keep, since the checkpoint is loaded straight into their dtype (no
FP32 weights to keep) and a model of mixed float dtypes is out of scope.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from runner.precisions.common import Precision, as_cpu_float, check_keep, load_as

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


@dataclass(frozen=True)
class Settings:
    """A cast has no settings of its own."""


def read_settings(reader) -> Settings:
    return Settings()


def _load_as(dtype_name: str):
    name = next(p for p, d in DTYPES.items() if d == dtype_name)

    def load(model_class, model_dir, device, settings, keep=frozenset()):
        if keep and dtype_name != "float32":
            raise ValueError(
                f"{name} cannot keep layers in FP32 (asked: {sorted(keep)}): a cast loads every "
                "weight straight into its dtype; keep is allowed for fp32 and the quantized "
                "precisions"
            )
        model, recorded = load_as(dtype_name, model_class, model_dir, device)
        check_keep(model, keep, name)
        return model, recorded

    return load


PRECISIONS = [
    Precision("fp32", "casts", ("cpu", "cuda"), "weights as loaded", _load_as("float32")),
    Precision("fp16", "casts", ("cpu", "cuda"), "loaded as float16", _load_as("float16")),
    Precision("bf16", "casts", ("cpu", "cuda"), "loaded as bfloat16", _load_as("bfloat16")),
]


def linear_classes() -> tuple[type, ...]:
    """The layer classes this family computes with (bnb's layers subclass nn.Linear too)."""
    import torch

    return (torch.nn.Linear,)


def layer_weight(name: str, module):
    """The float32 CPU weight, [out, in], of a plain linear layer; None for any other module."""
    import torch

    if isinstance(module, torch.nn.Linear):
        return as_cpu_float(module.weight)
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    if pytorch_utils is not None and isinstance(module, pytorch_utils.Conv1D):
        # GPT-2 style Conv1D stores [in, out]; transpose to nn.Linear's [out, in].
        return as_cpu_float(module.weight).T.contiguous()
    return None


def is_quantized(precision: str, module) -> bool:
    """A cast layer is 'quantized' when its weight is held in the precision's dtype."""
    import torch

    return module.weight.dtype == getattr(torch, DTYPES[precision])


def leaves_unquantized(model, name: str) -> bool:
    return False  # every layer is cast


def grid(precision: str, weight, settings=None) -> None:
    return None


def extra_analysis(precision, reference_model, batches, settings) -> dict:
    return {}
