"""fp32, fp16, bf16: the FP32 checkpoint loaded straight into a float dtype, nothing quantized.

Every linear layer keeps its nn.Linear (or GPT-2 Conv1D) and computes with its weight as stored. A
float format's grid is every number it represents, too dense to draw over a histogram: none is
given.

Keeping layers in FP32 (`keep`): fp32 keeps every layer already, so any linear layers may be named;
fp16 and bf16 refuse a non-empty keep, since the checkpoint is loaded straight into their dtype (no
FP32 weights to keep) and a model of mixed float dtypes is out of scope.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from runner.precisions.declaration import Family, Precision


@dataclass(frozen=True)
class Cast:
    """A float cast has no settings of its own; dtype: the torch dtype it loads the weights into."""

    dtype: ClassVar[str]


@dataclass(frozen=True)
class FP32(Cast):
    dtype: ClassVar[str] = "float32"


@dataclass(frozen=True)
class FP16(Cast):
    dtype: ClassVar[str] = "float16"


@dataclass(frozen=True)
class BF16(Cast):
    dtype: ClassVar[str] = "bfloat16"


def read_settings(reader) -> dict:
    return {}


FAMILY = Family(
    "casts",
    (
        Precision("fp32", "casts", ("cpu", "cuda"), "float32 weights and compute, as loaded", FP32),
        Precision(
            "fp16", "casts", ("cpu", "cuda"), "float16 weights and compute, loaded as such", FP16
        ),
        Precision(
            "bf16", "casts", ("cpu", "cuda"), "bfloat16 weights and compute, loaded as such", BF16
        ),
    ),
    read_settings,
    worker="runner.precisions.casts.worker:WORKER",
    quantizes_layers=False,
)
