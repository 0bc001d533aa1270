"""int8-dynamic: torch.ao.quantization.quantize_dynamic, int8 weights and per-batch int8
activations, on torch's CPU kernels only. torch 2.13 deprecates torch.ao.quantization; its successor
is torchao's quantize_ (the torchao family's torchao-int8-dynamic), kept beside it to compare the
two.

With the default qconfig each weight is quantized per tensor, symmetric: codes -128..127 times
max|w| / 127.5. Every module of the types in `dynamic_modules` (nn.Linear) is replaced, except the
layers named in `keep` (kept in FP32): quantize_dynamic is then given the set of module names to
quantize instead of the set of types.
"""

from __future__ import annotations

from dataclasses import dataclass

from runner.precisions.declaration import Family, Precision

QUANTIZED_ENGINES = ("x86", "fbgemm", "qnnpack", "onednn")
DYNAMIC_MODULES = ("Linear",)


@dataclass(frozen=True)
class Int8Dynamic:
    """int8 weights per tensor, int8 activations per batch."""

    dynamic_modules: tuple[str, ...] = DYNAMIC_MODULES  # names of torch.nn module types
    quantized_engine: str | None = None  # None: torch's default for this CPU


def read_settings(reader) -> dict:
    """The job's settings.quantized_engine and .dynamic_modules. Raises SpecError."""
    engine = reader.get("quantized_engine", str)
    if engine is not None and engine not in QUANTIZED_ENGINES:
        raise reader.error("quantized_engine", engine, f"allowed: {', '.join(QUANTIZED_ENGINES)}")
    modules = reader.get("dynamic_modules", list, list(DYNAMIC_MODULES))
    for module in modules:
        if module not in DYNAMIC_MODULES:
            raise reader.error("dynamic_modules", module, f"allowed: {', '.join(DYNAMIC_MODULES)}")
    return {"dynamic_modules": tuple(modules), "quantized_engine": engine}


FAMILY = Family(
    "torch_ao",
    (
        Precision(
            "int8-dynamic",
            "torch_ao",
            ("cpu",),
            "torch.ao quantize_dynamic: int8 weights per tensor, int8 activations per batch, on "
            "torch's CPU kernels only (deprecated since torch 2.13; torchao-int8-dynamic is its "
            "successor)",
            Int8Dynamic,
        ),
    ),
    read_settings,
    worker="runner.precisions.torch_ao.worker:WORKER",
)
