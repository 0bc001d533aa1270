"""The precisions: a registry of names, each run by one family, a module of this package.

A family is one way of quantizing, in the manner of torchao: a settings dataclass plus the functions
registered for it. Each family module (casts, torch_ao, torchao, bitsandbytes) defines:

- `Settings` and `read_settings(reader)`: its keys of the job's `settings:` (flat, all families'
  side by side), checked as they are read;
- `PRECISIONS`: its registry entries (how each loads a saved FP32 checkpoint and quantizes it,
  leaving the linear layers named in `keep` in FP32: see load_quantized);
- `linear_classes()`, `layer_weight(name, module)`: the layer classes it computes with, and the
  float32 weight one of its layers really computes with;
- `is_quantized(precision, module)`, `leaves_unquantized(model, name)`;
- `grid(precision, weight, settings)`: the values it can represent at a layer's scale (None for a
  float cast);
- `extra_analysis(precision, reference_model, batches, settings)`: anything only it needs.

A new family is one module plus its line below. The order of PRECISIONS is the table's column
order. torch and each family's library are imported inside the functions: the driver validates
jobs without importing them.
"""

from __future__ import annotations

from runner.precisions import bitsandbytes, casts, torch_ao, torchao
from runner.precisions.common import Precision

__all__ = ["DEVICES", "FAMILIES", "PRECISIONS", "Precision", "default_settings", "load_quantized"]

DEVICES = ("cpu", "cuda")

# The order their layers are asked in (bnb's layers subclass nn.Linear and torchao's keep it, so
# the plain casts come last) and the order of their settings in a job's errors and a result's
# record.
FAMILIES = {"bitsandbytes": bitsandbytes, "torch_ao": torch_ao, "torchao": torchao, "casts": casts}

# torch.ao's int8-dynamic and torchao's precisions side by side: the two generations.
PRECISIONS: dict[str, Precision] = {
    p.name: p
    for p in [
        *casts.PRECISIONS,
        *torch_ao.PRECISIONS,
        *torchao.PRECISIONS,
        *bitsandbytes.PRECISIONS,
    ]
}


def family_of(precision: str):
    """The module that knows this precision. Raises ValueError for an unknown one."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; known: {list(PRECISIONS)}")
    return FAMILIES[PRECISIONS[precision].family]


def load_quantized(
    precision: str, model_class, model_dir, device: str, settings, keep=frozenset()
) -> tuple:
    """The checkpoint loaded and quantized as the precision does, every linear layer but those
    named in keep (full module names, kept as FP32 nn.Linear); (model, recorded settings). Raises
    ValueError for a kept name that is not a linear layer, or a cast (fp16, bf16) asked to keep."""
    family_of(precision)  # raises ValueError for an unknown precision
    spec = PRECISIONS[precision]
    keep = frozenset(keep)
    model, recorded = spec.load(model_class, model_dir, device, settings, keep=keep)
    if spec.quantize is not None:
        model, quantized = spec.quantize(model, settings, keep=keep)
        recorded.update(quantized)
    if keep:
        recorded["kept_in_fp32"] = sorted(keep)
    return model, recorded


def default_settings(**values) -> dict:
    """Every family's keys of the job's flat `settings:` with their defaults, in FAMILIES order,
    the given values in place of theirs. Raises ValueError for a key no family reads."""
    from dataclasses import MISSING, fields

    found = {}
    for family in FAMILIES.values():
        for f in fields(family.Settings):
            assert f.default is not MISSING, f"{family.__name__}.Settings.{f.name} needs a default"
            found[f.name] = f.default
    unknown = sorted(set(values) - set(found))
    if unknown:
        raise ValueError(f"no precision family reads settings {unknown}; known: {list(found)}")
    found.update(values)
    return found


def read_settings(reader) -> dict:
    """The values of every family's settings, read and checked by its own read_settings."""
    from dataclasses import fields

    values = {}
    for family in FAMILIES.values():
        settings = family.read_settings(reader)
        values.update({f.name: getattr(settings, f.name) for f in fields(settings)})
    return values


def layer_weight(name: str, module):
    """The float32 CPU weight, [out, in], a linear-like module computes with; None for others."""
    for family in FAMILIES.values():
        weight = family.layer_weight(name, module)
        if weight is not None:
            return weight
    return None


def is_quantized(precision: str, module) -> bool:
    """Whether this layer holds its weight as the precision does (a cast: in its dtype)."""
    return family_of(precision).is_quantized(precision, module)


def leaves_unquantized(precision: str, model, name: str) -> bool:
    """Whether the precision's family keeps this linear layer out of quantization."""
    return family_of(precision).leaves_unquantized(model, name)


def quantization_grid(precision: str, weight, settings=None):
    """The precision's grid at this FP32 weight's scale; settings: the job's flat settings (None:
    the defaults), for a grid a setting shapes (torchao's int4 group size)."""
    settings = default_settings() if settings is None else settings
    return family_of(precision).grid(precision, weight, settings)


def extra_analysis(precision: str, reference_model, batches: list[dict], settings) -> dict:
    """What the precision's family analyses beyond weight errors (bnb-int8: outlier columns)."""
    return family_of(precision).extra_analysis(precision, reference_model, batches, settings)


def linear_classes() -> tuple[type, ...]:
    """Every layer class a family computes a linear layer with (nn.Linear, GPT-2 Conv1D, torch.ao's
    and bitsandbytes' quantized Linear)."""
    return tuple(c for family in FAMILIES.values() for c in family.linear_classes())


def linear_layer_kinds(model) -> dict[str, int]:
    """How many linear layers of each class the model computes with: shows what was really
    quantized. A layer that computes with a tensor subclass (torchao's) names it too:
    "torch.nn.modules.linear.Linear[torchao.quantization.Int8Tensor]"."""
    classes = linear_classes()
    counts: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, classes):
            name = _class_name(type(module))
            weight_class = _tensor_subclass(getattr(module, "weight", None))
            if weight_class is not None:
                name += f"[{_class_name(weight_class)}]"
            counts[name] = counts.get(name, 0) + 1
    return counts


def _class_name(cls: type) -> str:
    return cls.__module__ + "." + cls.__name__


def _tensor_subclass(weight) -> type | None:
    """The weight's class where it is a tensor subclass that does its own matmul; None for a plain
    tensor or a Parameter subclass (bnb's Int8Params, Params4bit: their layer class says it)."""
    import torch

    kind = type(weight)
    if not isinstance(weight, torch.Tensor) or kind is torch.Tensor:
        return None
    return None if issubclass(kind, torch.nn.Parameter) else kind
