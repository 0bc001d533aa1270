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

torchao is imported inside the functions and otherwise looked up in sys.modules: it takes seconds
to import, and a model can only hold its tensors once it has been imported.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from runner.precisions.common import Precision, as_cpu_float, check_keep, load_as

INT4_GROUP_SIZES = (32, 64, 128, 256)  # what torchao's Int4WeightOnlyConfig supports
FLOAT8_MIN_CAPABILITY = (8, 9)  # float8 matmuls: Ada Lovelace, Hopper and newer
FLOAT8_E4M3_MAX = 448.0


@dataclass(frozen=True)
class Settings:
    torchao_int4_group_size: int = 128  # torchao's default


def read_settings(reader) -> Settings:
    """The job's settings.torchao_int4_group_size. Raises SpecError."""
    group_size = reader.get("torchao_int4_group_size", int, 128)
    if group_size not in INT4_GROUP_SIZES:
        allowed = ", ".join(str(g) for g in INT4_GROUP_SIZES)
        raise reader.error("torchao_int4_group_size", group_size, f"allowed: {allowed}")
    return Settings(torchao_int4_group_size=group_size)


# --------------------------------------------------------------------------------------------------
# Loading and quantizing
# --------------------------------------------------------------------------------------------------


def _config(precision: str, device: str, settings):
    """torchao's config for one precision on one device, and its granularity in words."""
    import torch
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Int4WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        IntxWeightOnlyConfig,
        PerGroup,
    )

    group_size = settings["torchao_int4_group_size"]
    if precision == "torchao-int8-dynamic":
        return Int8DynamicActivationInt8WeightConfig(), "per row"
    if precision == "torchao-int8-weight":
        return Int8WeightOnlyConfig(), "per row"
    if precision == "torchao-float8-dynamic":
        return Float8DynamicActivationFloat8WeightConfig(), "per tensor"
    if device == "cpu":
        config = IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size))
    else:
        config = Int4WeightOnlyConfig(
            group_size=group_size, int4_packing_format="tile_packed_to_4d"
        )
    return config, f"per group of {group_size}"


def check_group_size(model, group_size: int, keep: frozenset[str] = frozenset()) -> None:
    """Every linear layer's in_features, but those kept in FP32, must be a whole number of groups:
    torchao would otherwise fail deep inside (CPU) or silently leave the layer in float (CUDA).
    Raises ValueError."""
    import torch

    for name, module in model.named_modules():
        if name in keep:
            continue
        if isinstance(module, torch.nn.Linear) and module.in_features % group_size:
            fits = [g for g in INT4_GROUP_SIZES if module.in_features % g == 0]
            raise ValueError(
                f"torchao-int4-weight: layer {name!r} has in_features {module.in_features}, not a "
                f"multiple of settings.torchao_int4_group_size {group_size}; "
                + (
                    f"group sizes that divide it: {', '.join(map(str, fits))}"
                    if fits
                    else f"no allowed group size ({', '.join(map(str, INT4_GROUP_SIZES))}) does"
                )
            )


def check_float8_gpu(device: str) -> None:
    """float8 matmuls need compute capability 8.9 or newer. Raises RuntimeError on an older GPU."""
    import torch

    capability = torch.cuda.get_device_capability(device)
    if capability < FLOAT8_MIN_CAPABILITY:
        needed = ".".join(map(str, FLOAT8_MIN_CAPABILITY))
        raise RuntimeError(
            f"torchao-float8-dynamic needs a GPU of compute capability {needed} or newer (Ada "
            f"Lovelace, Hopper) for its float8 matmuls; {torch.cuda.get_device_name(device)} has "
            f"{capability[0]}.{capability[1]}"
        )


def _load_float32(precision: str):
    def load(model_class, model_dir, device, settings, keep=frozenset()):
        if precision == "torchao-float8-dynamic":
            check_float8_gpu(device)
        return load_as("float32", model_class, model_dir, device)

    return load


def _quantize(precision: str):
    def quantize(model, settings, keep=frozenset()):
        import torch
        import torchao
        from torchao.core.config import config_to_dict
        from torchao.quantization import quantize_

        check_keep(model, keep, precision)
        device = next(model.parameters()).device.type
        config, granularity = _config(precision, device, settings)
        group_size = None
        if precision == "torchao-int4-weight":
            group_size = settings["torchao_int4_group_size"]
            check_group_size(model, group_size, keep)
            if device != "cpu":  # tinygemm takes bfloat16 weights; the layers cast their inputs
                for name, module in model.named_modules():
                    if isinstance(module, torch.nn.Linear) and name not in keep:
                        module.to(torch.bfloat16)
        if keep:
            quantize_(model, config, filter_fn=_linear_not_kept(keep))
        else:
            quantize_(model, config)
        return model, {
            "method": "torchao.quantization.quantize_",
            "torchao_config": type(config).__name__,
            "torchao_config_fields": config_to_dict(config),
            "torchao_version": torchao.__version__,
            "granularity": granularity,
            "group_size": group_size,
        }

    return quantize


def _linear_not_kept(keep: frozenset[str]):
    """quantize_'s filter: its own default (every nn.Linear whose weight is not yet a torchao
    tensor) less the layers kept in FP32."""
    from torchao.quantization.quant_api import _is_linear

    def convert(module, name: str) -> bool:
        return name not in keep and _is_linear(module, name)

    return convert


def _precision(name: str, devices: tuple[str, ...], how: str) -> Precision:
    return Precision(
        name, "torchao", devices, how, _load_float32(name), _quantize(name), imports=("torchao",)
    )


PRECISIONS = [
    _precision(
        "torchao-int8-dynamic",
        ("cpu", "cuda"),
        "torchao int8 weights and dynamic int8 activations (quantize_, the successor of torch.ao's "
        "int8-dynamic)",
    ),
    _precision("torchao-int8-weight", ("cpu", "cuda"), "torchao int8 weights, float activations"),
    _precision(
        "torchao-int4-weight", ("cpu", "cuda"), "torchao int4 weights per group, float activations"
    ),
    _precision(
        "torchao-float8-dynamic",
        ("cuda",),
        "torchao float8 weights and dynamic float8 activations; float8 matmuls need a GPU of "
        "compute capability 8.9 or newer",
    ),
]


# --------------------------------------------------------------------------------------------------
# Reading back the weights the layers compute with
# --------------------------------------------------------------------------------------------------


def linear_classes() -> tuple[type, ...]:
    import torch

    return (torch.nn.Linear,)  # quantize_ keeps the layer and swaps its weight


def _torchao_weight(module):
    """The layer's torchao tensor; None where torchao is not imported, for another module and for
    a float weight."""
    torchao_utils = sys.modules.get("torchao.utils")
    if torchao_utils is None:
        return None
    weight = getattr(module, "weight", None)
    return weight if isinstance(weight, torchao_utils.TorchAOBaseTensor) else None


def layer_weight(name: str, module):
    """The float32 CPU weight, [out, in], a layer holding a torchao tensor computes with: torchao's
    own dequantize(). None for other modules."""
    weight = _torchao_weight(module)
    return None if weight is None else as_cpu_float(weight.dequantize())


def is_quantized(precision: str, module) -> bool:
    import torch

    weight = _torchao_weight(module)
    if weight is None:
        return False
    kind = type(weight).__name__
    if precision == "torchao-int8-dynamic":
        return kind == "Int8Tensor" and weight.act_quant_kwargs is not None
    if precision == "torchao-int8-weight":
        return kind == "Int8Tensor" and weight.act_quant_kwargs is None
    if precision == "torchao-int4-weight":
        on_cpu = kind == "IntxUnpackedToInt8Tensor" and weight.target_dtype == torch.int4
        return on_cpu or kind == "Int4TilePackedTo4dTensor"
    return kind == "Float8Tensor"


def leaves_unquantized(model, name: str) -> bool:
    return False  # quantize_ converts every nn.Linear by default


# --------------------------------------------------------------------------------------------------
# Grids
# --------------------------------------------------------------------------------------------------


def _scales_by_torchao(precision: str, weight, settings):
    """torchao's own scales for this FP32 weight: quantized with the CPU config on a throwaway
    nn.Linear. Raises ValueError for a group size that does not divide the layer."""
    import torch
    from torchao.quantization import quantize_

    out_features, in_features = weight.shape
    layer = torch.nn.Linear(in_features, out_features, bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight.to(torch.float32))
    group_size = settings["torchao_int4_group_size"]
    if precision == "torchao-int4-weight" and in_features % group_size:
        raise ValueError(
            f"torchao-int4-weight grid: a weight of {in_features} inputs is not a whole number of "
            f"groups of {group_size} (settings.torchao_int4_group_size)"
        )
    config, _ = _config(precision, "cpu", settings)
    quantize_(layer, config)
    return layer.weight.scale.detach().to(torch.float64).reshape(-1)


def grid(precision: str, weight, settings=None) -> dict:
    """int8: codes -128..127 times one scale per row. int4: codes -8..7 times one scale per group,
    as the CPU quantizes (on CUDA the tinygemm layout adds a zero per group). float8: every finite
    e4m3 value, at the per-tensor scale max|w| / 448."""
    import torch

    from runner.analysis import layer_matrix, make_grid

    w = layer_matrix(weight)
    if precision == "torchao-float8-dynamic":
        every_byte = torch.arange(256, dtype=torch.int16).to(torch.uint8)
        e4m3 = every_byte.view(torch.float8_e4m3fn).to(torch.float64)
        e4m3 = e4m3[torch.isfinite(e4m3)]
        return make_grid(
            precision,
            "float8 e4m3 values times max|w| / 448",
            "tensor",
            (e4m3 / FLOAT8_E4M3_MAX).tolist(),
            w.abs().max().reshape(1),
        )
    scales = _scales_by_torchao(precision, w, settings)
    if precision == "torchao-int4-weight":
        group_size = settings["torchao_int4_group_size"]
        scheme = f"int4 symmetric, codes -8..7 times scale, per group of {group_size}"
        return make_grid(precision, scheme, "group", range(-8, 8), scales, group_size)
    scheme = "int8 symmetric, codes -128..127 times scale, per row"
    return make_grid(precision, scheme, "row", range(-128, 128), scales)


def extra_analysis(precision, reference_model, batches, settings) -> dict:
    return {}
