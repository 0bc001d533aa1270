"""int8-dynamic: torch.ao.quantization.quantize_dynamic, int8 weights and per-batch int8
activations, on torch's CPU kernels only. torch 2.13 deprecates torch.ao.quantization; its successor
is torchao's quantize_ (torchao.py, torchao-int8-dynamic), kept beside it to compare the two.

With the default qconfig each weight is quantized per tensor, symmetric: codes -128..127 times
max|w| / 127.5. Every module of the types in `dynamic_modules` (nn.Linear) is replaced, except the
layers named in `keep` (kept in FP32): quantize_dynamic is then given the set of module names to
quantize instead of the set of types.
"""

from __future__ import annotations

from dataclasses import dataclass

from runner.precisions.common import Precision, as_cpu_float, check_keep, load_as

QUANTIZED_ENGINES = ("x86", "fbgemm", "qnnpack", "onednn")
DYNAMIC_MODULES = ("Linear",)


@dataclass(frozen=True)
class Settings:
    dynamic_modules: tuple[str, ...] = ("Linear",)
    quantized_engine: str | None = None  # None: torch's default for this CPU


def read_settings(reader) -> Settings:
    """The job's settings.quantized_engine and .dynamic_modules. Raises SpecError."""
    engine = reader.get("quantized_engine", str)
    if engine is not None and engine not in QUANTIZED_ENGINES:
        raise reader.error("quantized_engine", engine, f"allowed: {', '.join(QUANTIZED_ENGINES)}")
    modules = reader.get("dynamic_modules", list, list(DYNAMIC_MODULES))
    for module in modules:
        if module not in DYNAMIC_MODULES:
            raise reader.error("dynamic_modules", module, f"allowed: {', '.join(DYNAMIC_MODULES)}")
    return Settings(dynamic_modules=tuple(modules), quantized_engine=engine)


def _load_float32(model_class, model_dir, device, settings, keep=frozenset()):
    return load_as("float32", model_class, model_dir, device)


def _quantize_dynamic_int8(model, settings, keep=frozenset()):
    import torch

    engine = settings["quantized_engine"] or torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    modules = {getattr(torch.nn, name) for name in settings["dynamic_modules"]}
    spec = modules
    if keep:
        check_keep(model, keep, "int8-dynamic")
        # quantize_dynamic matches module types exactly, as it does with a set of types.
        spec = {n for n, m in model.named_modules() if type(m) in modules and n not in keep}
    # inplace: the FP32 Linear weights are released as each layer is replaced, not kept as a second
    # copy.
    model = torch.ao.quantization.quantize_dynamic(model, spec, dtype=torch.qint8, inplace=True)
    return model, {
        "method": "torch.ao.quantization.quantize_dynamic",
        "quantized_module_types": sorted(settings["dynamic_modules"]),
        "weight_dtype": "qint8 (per-tensor symmetric)",
        "activation_dtype": "quint8 (per-tensor, dynamic, computed per batch)",
        "quantized_engine": engine,
    }


PRECISIONS = [
    Precision(
        "int8-dynamic",
        "torch_ao",
        ("cpu",),
        "torch.ao's dynamic quantization (deprecated since torch 2.13; torchao-int8-dynamic is its "
        "successor), CPU kernels only",
        _load_float32,
        _quantize_dynamic_int8,
    ),
]


def linear_classes() -> tuple[type, ...]:
    import torch.ao.nn.quantized.dynamic as nnqd

    return (nnqd.Linear,)


def layer_weight(name: str, module):
    """The float32 CPU weight a dynamic-quantized Linear computes with; None for other modules."""
    import torch.ao.nn.quantized.dynamic as nnqd

    if not isinstance(module, nnqd.Linear):
        return None
    w = module.weight()
    # float16 dynamic quantization unpacks to a plain float tensor.
    return as_cpu_float(w.dequantize() if w.is_quantized else w)


def is_quantized(precision: str, module) -> bool:
    import torch
    import torch.ao.nn.quantized.dynamic as nnqd

    return isinstance(module, nnqd.Linear) and module.weight().dtype == torch.qint8


def leaves_unquantized(model, name: str) -> bool:
    return False  # quantize_dynamic replaces every nn.Linear


def grid(precision: str, weight, settings=None) -> dict:
    # torch's default dynamic qconfig: per-tensor symmetric qint8, scale = max|w| / ((127 - -128) /
    # 2).
    from runner.analysis import layer_matrix, make_grid

    w = layer_matrix(weight)
    scale = w.abs().max() / 127.5
    return make_grid(
        precision,
        "int8 symmetric, codes -128..127 times scale",
        "tensor",
        range(-128, 128),
        scale.reshape(1),
    )


def extra_analysis(precision, reference_model, batches, settings) -> dict:
    return {}
