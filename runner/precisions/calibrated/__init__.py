"""int8-static, smoothquant-int8, awq-int4, gptq-int4: the methods that calibrate on data before
they quantize. Each observes the FP32 model on the job's calibration set (its `calibration:` block)
in a step of its own, then computes its weights or scales from what it saw:

- int8-static: W8A8, int8 weights one scale per row, activations quantized to int8 with one
  scale per layer fixed from the calibration set's max |x| (torchao
  `Int8StaticActivationInt8WeightConfig`).
- smoothquant-int8: SmoothQuant first moves activation outliers into the weights, channel by
  channel (s_j = max|x_j|^alpha / max|w_j|^(1-alpha), alpha = settings.smoothquant_alpha), then
  the same static W8A8 (torchao's SmoothQuant recipe).
- awq-int4: AWQ searches per-channel scales that keep the salient input channels' weights
  precise, then int4 weight-only on the grid torchao-int4-weight uses (torchao's AWQ search).
- gptq-int4: GPTQ rounds each layer's weights column by column, correcting the columns not yet
  rounded for the error made, so that the layer's output on the calibration inputs moves least
  (Intel Neural Compressor's GPTQ, which runs on the CPU).

The int4 methods take torchao-int4-weight's group size (settings.torchao_int4_group_size): every
int4 method compares like for like.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from runner.precisions.declaration import Family, Precision
from runner.precisions.torchao import Int4Weight


@dataclass(frozen=True)
class Int8Static:
    """int8 weights, one scale per row; int8 activations, one static scale per layer."""

    granularity: ClassVar[str] = "weights per row, activations per tensor (static)"


@dataclass(frozen=True)
class SmoothQuantInt8:
    """SmoothQuant smoothing with strength smoothquant_alpha, then Int8Static."""

    smoothquant_alpha: float = 0.5  # the SmoothQuant paper's default
    granularity: ClassVar[str] = "weights per row, activations per tensor (static), smoothed"


@dataclass(frozen=True)
class AwqInt4(Int4Weight):
    """AWQ's per-channel scales, then int4 weights one scale per group."""


@dataclass(frozen=True)
class GptqInt4(Int4Weight):
    """GPTQ's error-correcting rounding of int4 weights, one scale per group."""


def read_settings(reader) -> dict:
    """The job's settings.smoothquant_alpha, in [0, 1]. Raises SpecError."""
    alpha = reader.get("smoothquant_alpha", float, SmoothQuantInt8.smoothquant_alpha)
    if not 0.0 <= alpha <= 1.0:
        raise reader.error("smoothquant_alpha", alpha, "a number from 0 to 1")
    return {"smoothquant_alpha": alpha}


FAMILY = Family(
    "calibrated",
    (
        Precision(
            "int8-static",
            "calibrated",
            ("cpu", "cuda"),
            "torchao Int8StaticActivationInt8WeightConfig: int8 weights per row, int8 activations "
            "with one scale per layer from the calibration set's max |x|",
            Int8Static,
            calibrated=True,
        ),
        Precision(
            "smoothquant-int8",
            "calibrated",
            ("cpu", "cuda"),
            "SmoothQuant (torchao's recipe): activation outliers moved into the weights channel by "
            "channel (settings.smoothquant_alpha), then int8-static",
            SmoothQuantInt8,
            calibrated=True,
        ),
        Precision(
            "awq-int4",
            "calibrated",
            ("cpu", "cuda"),
            "AWQ (torchao's scale search): per-channel scales for the salient inputs, then int4 "
            "weights per group as torchao-int4-weight",
            AwqInt4,
            calibrated=True,
        ),
        Precision(
            "gptq-int4",
            "calibrated",
            ("cpu",),
            "GPTQ (Intel Neural Compressor): int4 weights per group rounded column by column, "
            "each column's error corrected in the columns after it",
            GptqInt4,
            calibrated=True,
        ),
    ),
    read_settings,
    worker="runner.precisions.calibrated.worker:WORKER",
    imports=("torchao",),
    shares=("torchao_int4_group_size",),
)
