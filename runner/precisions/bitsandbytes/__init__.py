"""bnb-int8, bnb-nf4, bnb-fp4: bitsandbytes layers, quantized by transformers while loading.

LLM.int8() keeps int8 codes and one absmax per output row, and multiplies the input columns that
hold an outlier (|x| >= llm_int8_threshold) in 16-bit; its extra analysis finds those columns on
the FP32 model. The 4-bit kinds keep a 4-bit code (NormalFloat or float) and one absmax per block
of 64 values of the flattened weight. bitsandbytes is slow to import, CPU workers may lack it, and
it may set CUDA up as it is imported: only the worker (worker.py) imports it, in the variant's own
process (or a fork server on a node without a GPU).

Layers named in `keep` stay plain FP32 nn.Linear: they join transformers' own skip list
(`llm_int8_skip_modules`, used by the 4-bit kinds too). transformers matches a skip name as a regex
from the start of a module name up to a dot boundary, or as a suffix; a full, escaped module name
matches that module only (layer.1.output.dense never catches layer.11.output.dense).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from runner.precisions.declaration import Family, Precision

COMPUTE_DTYPES = ("float32", "float16", "bfloat16")
BNB_4BIT_BLOCKSIZE = 64  # bitsandbytes' default and what transformers' BitsAndBytesConfig uses
# Outlier columns of LLM.int8() are found on this many evaluation batches of the FP32 model.
OUTLIER_BATCHES = 4

# bitsandbytes code books (bitsandbytes.functional.get_4bit_type), copied so that CPU workers
# without bitsandbytes can draw the grid; a test checks them against the installed library.
# fmt: off
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
FP4_CODE = (
    0.0, 0.0052083334885537624, 0.6666666865348816, 1.0, 0.3333333432674408, 0.5,
    0.1666666716337204, 0.25, 0.0, -0.0052083334885537624, -0.6666666865348816, -1.0,
    -0.3333333432674408, -0.5, -0.1666666716337204, -0.25,
)
# fmt: on


@dataclass(frozen=True)
class Int8:
    """LLM.int8(): int8 weights, one absmax per row; outlier input columns multiplied in 16-bit."""

    llm_int8_threshold: float = 6.0


@dataclass(frozen=True)
class FourBit:
    """A 4-bit code book times one absmax per block of 64 values of the flattened weight."""

    bnb_4bit_compute_dtype: str = "float32"
    bnb_4bit_use_double_quant: bool = False
    quant_type: ClassVar[str]  # bitsandbytes' name of the code book
    code_book: ClassVar[tuple[float, ...]]


@dataclass(frozen=True)
class NF4(FourBit):
    quant_type: ClassVar[str] = "nf4"
    code_book: ClassVar[tuple[float, ...]] = NF4_CODE


@dataclass(frozen=True)
class FP4(FourBit):
    quant_type: ClassVar[str] = "fp4"
    code_book: ClassVar[tuple[float, ...]] = FP4_CODE


def read_settings(reader) -> dict:
    """The job's settings.bnb_4bit_compute_dtype, .llm_int8_threshold, .bnb_4bit_use_double_quant.
    Raises SpecError."""
    compute_dtype = reader.get("bnb_4bit_compute_dtype", str, FourBit.bnb_4bit_compute_dtype)
    if compute_dtype not in COMPUTE_DTYPES:
        raise reader.error(
            "bnb_4bit_compute_dtype", compute_dtype, f"allowed: {', '.join(COMPUTE_DTYPES)}"
        )
    threshold = reader.get("llm_int8_threshold", float, Int8.llm_int8_threshold)
    if threshold < 0:
        raise reader.error("llm_int8_threshold", threshold, "expected a number >= 0")
    double_quant = reader.get("bnb_4bit_use_double_quant", bool, FourBit.bnb_4bit_use_double_quant)
    return {
        "llm_int8_threshold": threshold,
        "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_use_double_quant": double_quant,
    }


FAMILY = Family(
    "bitsandbytes",
    (
        Precision(
            "bnb-int8",
            "bitsandbytes",
            ("cpu", "cuda"),
            "bitsandbytes LLM.int8(): int8 weights, one absmax per row; the input columns that "
            "hold an outlier (llm_int8_threshold) multiplied in 16-bit",
            Int8,
        ),
        Precision(
            "bnb-nf4",
            "bitsandbytes",
            ("cpu", "cuda"),
            "bitsandbytes 4-bit NormalFloat weights, one absmax per block of 64; computes in "
            "bnb_4bit_compute_dtype",
            NF4,
        ),
        Precision(
            "bnb-fp4",
            "bitsandbytes",
            ("cpu", "cuda"),
            "bitsandbytes 4-bit float weights, one absmax per block of 64; computes in "
            "bnb_4bit_compute_dtype",
            FP4,
        ),
    ),
    read_settings,
    worker="runner.precisions.bitsandbytes.worker:WORKER",
    imports=("bitsandbytes", "transformers.integrations.bitsandbytes"),
)
