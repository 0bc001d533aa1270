"""torchao-int8-dynamic, torchao-int8-weight, torchao-int4-weight, torchao-float8-dynamic: torchao's
`quantize_(model, config)`, the successor of torch.ao.quantization (our int8-dynamic).

quantize_ keeps every nn.Linear and swaps its weight for a torchao tensor subclass, which does the
quantized matmul itself:

- int8 (both kinds): `Int8Tensor`, int8 codes and one scale per output row, symmetric: codes
  -128..127 times max|row| / 127.5. int8-dynamic also quantizes each batch's activations to int8,
  one scale per token; int8-weight multiplies in float.
- int4: one scale per group of `torchao_int4_group_size` inputs. On the CPU
  `IntxWeightOnlyConfig(int4, PerGroup(g))`, symmetric: codes -8..7 times max|group| / 7.5. On CUDA
  `Int4WeightOnlyConfig(group_size=g)` packed for torch's own tinygemm kernel (its default packing
  needs the mslk package), which multiplies in bfloat16 with a scale and a zero per group.
- float8 (CUDA, compute capability 8.9 or newer): float8 e4m3 weights and activations, one scale
  per tensor.

Layers named in `keep` stay in FP32: quantize_ is given a filter_fn that skips them (and torchao's
int4 group size need not divide them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from runner.precisions.declaration import Family, Precision

INT4_GROUP_SIZES = (32, 64, 128, 256)  # what torchao's Int4WeightOnlyConfig supports
FLOAT8_MIN_CAPABILITY = (8, 9)  # float8 matmuls: Ada Lovelace, Hopper and newer
FLOAT8_E4M3_MAX = 448.0


@dataclass(frozen=True)
class Int8Dynamic:
    """int8 weights, one scale per row; int8 activations, one scale per token of each batch."""

    granularity: ClassVar[str] = "per row"


@dataclass(frozen=True)
class Int8Weight:
    """int8 weights, one scale per row; float activations."""

    granularity: ClassVar[str] = "per row"


@dataclass(frozen=True)
class Int4Weight:
    """int4 weights, one scale per group of torchao_int4_group_size inputs; float activations."""

    torchao_int4_group_size: int = 128  # torchao's default

    @property
    def granularity(self) -> str:
        return f"per group of {self.torchao_int4_group_size}"


@dataclass(frozen=True)
class Float8Dynamic:
    """float8 e4m3 weights and activations, one scale per tensor (CUDA only)."""

    granularity: ClassVar[str] = "per tensor"


def read_settings(reader) -> dict:
    """The job's settings.torchao_int4_group_size. Raises SpecError."""
    group_size = reader.get("torchao_int4_group_size", int, Int4Weight.torchao_int4_group_size)
    if group_size not in INT4_GROUP_SIZES:
        allowed = ", ".join(str(g) for g in INT4_GROUP_SIZES)
        raise reader.error("torchao_int4_group_size", group_size, f"allowed: {allowed}")
    return {"torchao_int4_group_size": group_size}


FAMILY = Family(
    "torchao",
    (
        Precision(
            "torchao-int8-dynamic",
            "torchao",
            ("cpu", "cuda"),
            "torchao quantize_ with Int8DynamicActivationInt8WeightConfig: int8 weights per row, "
            "int8 activations per token (the successor of torch.ao's int8-dynamic)",
            Int8Dynamic,
        ),
        Precision(
            "torchao-int8-weight",
            "torchao",
            ("cpu", "cuda"),
            "torchao quantize_ with Int8WeightOnlyConfig: int8 weights per row, float activations",
            Int8Weight,
        ),
        Precision(
            "torchao-int4-weight",
            "torchao",
            ("cpu", "cuda"),
            "torchao quantize_, int4 weights per group, float activations; on the CPU "
            "IntxWeightOnlyConfig (symmetric), on CUDA Int4WeightOnlyConfig (a scale and a zero "
            "per group, torch's tinygemm kernel in bfloat16)",
            Int4Weight,
        ),
        Precision(
            "torchao-float8-dynamic",
            "torchao",
            ("cuda",),
            "torchao quantize_ with Float8DynamicActivationFloat8WeightConfig: float8 e4m3 "
            "weights and activations, one scale per tensor; float8 matmuls need a GPU of compute "
            "capability 8.9 or newer",
            Float8Dynamic,
        ),
    ),
    read_settings,
    worker="runner.precisions.torchao.worker:WORKER",
    # torchao takes seconds to import.
    imports=("torchao",),
)
