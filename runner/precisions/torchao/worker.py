"""torchao's precisions on the worker: `quantize_(model, config)` with the torchao config each of
ours maps to, reading back the tensor subclass quantize_ puts in each nn.Linear, and the grids."""

from __future__ import annotations

import torch
import torchao
from torchao.core.config import config_to_dict
from torchao.quantization import (
    Float8DynamicActivationFloat8WeightConfig,
    Float8Tensor,
    Int4TilePackedTo4dTensor,
    Int4WeightOnlyConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8Tensor,
    Int8WeightOnlyConfig,
    IntxUnpackedToInt8Tensor,
    IntxWeightOnlyConfig,
    PerGroup,
    quantize_,
)
from torchao.quantization.quant_api import _is_linear
from torchao.utils import TorchAOBaseTensor

from runner.analysis import absmax, layer_matrix, make_grid, row_blocks
from runner.precisions import Precision
from runner.precisions.torchao import (
    FLOAT8_E4M3_MAX,
    FLOAT8_MIN_CAPABILITY,
    INT4_GROUP_SIZES,
    Float8Dynamic,
    Int4Weight,
    Int8Dynamic,
    Int8Weight,
)
from runner.precisions.worker import FamilyWorker, as_cpu_float

# --------------------------------------------------------------------------------------------------
# Our configs as torchao's
# --------------------------------------------------------------------------------------------------


def _int4_config(config: Int4Weight, device: str):
    group_size = config.torchao_int4_group_size
    if device == "cpu":
        return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size))
    return Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="tile_packed_to_4d")


# (our config, device) -> torchao's config, by our config's type.
TORCHAO_CONFIGS = {
    Int8Dynamic: lambda config, device: Int8DynamicActivationInt8WeightConfig(),
    Int8Weight: lambda config, device: Int8WeightOnlyConfig(),
    Int4Weight: _int4_config,
    Float8Dynamic: lambda config, device: Float8DynamicActivationFloat8WeightConfig(),
}


def torchao_config(config, device: str):
    """torchao's config for one of our configs on one device."""
    return TORCHAO_CONFIGS[type(config)](config, device)


def check_group_size(
    model,
    group_size: int,
    keep: frozenset[str] = frozenset(),
    precision: str = "torchao-int4-weight",
) -> None:
    """Every linear layer's in_features, but those kept in FP32, must be a whole number of groups:
    torchao would otherwise fail deep inside (CPU) or silently leave the layer in float (CUDA).
    precision: the int4 precision that asks (every one computes with torchao's int4 layer).
    Raises ValueError."""
    for name, module in model.named_modules():
        if name in keep:
            continue
        if isinstance(module, torch.nn.Linear) and module.in_features % group_size:
            fits = [g for g in INT4_GROUP_SIZES if module.in_features % g == 0]
            raise ValueError(
                f"{precision}: layer {name!r} has in_features {module.in_features}, not a "
                f"multiple of settings.torchao_int4_group_size {group_size}; "
                + (
                    f"group sizes that divide it: {', '.join(map(str, fits))}"
                    if fits
                    else f"no allowed group size ({', '.join(map(str, INT4_GROUP_SIZES))}) does"
                )
            )


def check_float8_gpu(device: str) -> None:
    """float8 matmuls need compute capability 8.9 or newer. Raises RuntimeError on an older GPU."""
    capability = torch.cuda.get_device_capability(device)
    if capability < FLOAT8_MIN_CAPABILITY:
        needed = ".".join(map(str, FLOAT8_MIN_CAPABILITY))
        raise RuntimeError(
            f"torchao-float8-dynamic needs a GPU of compute capability {needed} or newer (Ada "
            f"Lovelace, Hopper) for its float8 matmuls; {torch.cuda.get_device_name(device)} has "
            f"{capability[0]}.{capability[1]}"
        )


def _linear_not_kept(keep: frozenset[str]):
    """quantize_'s filter: its own default (every nn.Linear whose weight is not yet a torchao
    tensor) less the layers kept in FP32."""

    def convert(module, name: str) -> bool:
        return name not in keep and _is_linear(module, name)

    return convert


# --------------------------------------------------------------------------------------------------
# Which torchao tensor each of our configs leaves in a quantized layer
# --------------------------------------------------------------------------------------------------

IS_QUANTIZED = {
    Int8Dynamic: lambda w: type(w) is Int8Tensor and w.act_quant_kwargs is not None,
    Int8Weight: lambda w: type(w) is Int8Tensor and w.act_quant_kwargs is None,
    Int4Weight: lambda w: (
        (type(w) is IntxUnpackedToInt8Tensor and w.target_dtype == torch.int4)
        or type(w) is Int4TilePackedTo4dTensor
    ),
    Float8Dynamic: lambda w: type(w) is Float8Tensor,
}


def _torchao_weight(module):
    """The layer's torchao tensor; None for another module and for a float weight."""
    weight = getattr(module, "weight", None)
    return weight if isinstance(weight, TorchAOBaseTensor) else None


# --------------------------------------------------------------------------------------------------
# Grids
# --------------------------------------------------------------------------------------------------


def _scales_by_torchao(config, weight):
    """torchao's own scales for this FP32 weight, in row order: each block of rows quantized with
    the CPU config on a throwaway nn.Linear (the scales are per row or per group within a row, so
    blocks give the whole weight's). Raises ValueError for a group size that does not divide the
    layer."""
    in_features = weight.shape[1]
    if isinstance(config, Int4Weight) and in_features % config.torchao_int4_group_size:
        raise ValueError(
            f"torchao-int4-weight grid: a weight of {in_features} inputs is not a whole number of "
            f"groups of {config.torchao_int4_group_size} (settings.torchao_int4_group_size)"
        )
    return torch.cat([_block_scales(config, rows) for rows in row_blocks(weight)])


def _block_scales(config, rows):
    layer = torch.nn.Linear(rows.shape[1], rows.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(rows.to(torch.float32))
    quantize_(layer, torchao_config(config, "cpu"))
    return layer.weight.scale.detach().to(torch.float64).reshape(-1)


def _float8_grid(precision: Precision, config: Float8Dynamic, w) -> dict:
    every_byte = torch.arange(256, dtype=torch.int16).to(torch.uint8)
    e4m3 = every_byte.view(torch.float8_e4m3fn).to(torch.float64)
    e4m3 = e4m3[torch.isfinite(e4m3)]
    return make_grid(
        precision.name,
        "float8 e4m3 values times max|w| / 448",
        "tensor",
        (e4m3 / FLOAT8_E4M3_MAX).tolist(),
        absmax(w).reshape(1),
    )


def _int4_grid(precision: Precision, config: Int4Weight, w) -> dict:
    group_size = config.torchao_int4_group_size
    scheme = f"int4 symmetric, codes -8..7 times scale, per group of {group_size}"
    scales = _scales_by_torchao(config, w)
    return make_grid(precision.name, scheme, "group", range(-8, 8), scales, group_size)


def _int8_grid(precision: Precision, config, w) -> dict:
    scheme = "int8 symmetric, codes -128..127 times scale, per row"
    return make_grid(precision.name, scheme, "row", range(-128, 128), _scales_by_torchao(config, w))


GRIDS = {
    Int8Dynamic: _int8_grid,
    Int8Weight: _int8_grid,
    Int4Weight: _int4_grid,
    Float8Dynamic: _float8_grid,
}


# --------------------------------------------------------------------------------------------------
# The worker
# --------------------------------------------------------------------------------------------------


class TorchaoWorker(FamilyWorker):
    quantizes_layers_alone = True  # each nn.Linear is converted on its own

    def load(self, precision: Precision, config, model_class, model_dir, device, keep=frozenset()):
        if isinstance(config, Float8Dynamic):
            check_float8_gpu(device)
        return super().load(precision, config, model_class, model_dir, device, keep)

    def quantize(self, model, precision: Precision, config, keep=frozenset(), calibration=None):
        device = next(model.parameters()).device.type
        converted = torchao_config(config, device)
        group_size = None
        if isinstance(config, Int4Weight):
            group_size = config.torchao_int4_group_size
            check_group_size(model, group_size, keep)
            if device != "cpu":  # tinygemm takes bfloat16 weights; the layers cast their inputs
                for name, module in model.named_modules():
                    if isinstance(module, torch.nn.Linear) and name not in keep:
                        module.to(torch.bfloat16)
        if keep:
            quantize_(model, converted, filter_fn=_linear_not_kept(keep))
        else:
            quantize_(model, converted)
        return model, {
            "method": "torchao.quantization.quantize_",
            "torchao_config": type(converted).__name__,
            "torchao_config_fields": config_to_dict(converted),
            "torchao_version": torchao.__version__,
            "granularity": config.granularity,
            "group_size": group_size,
        }

    def layer_weight(self, name: str, module):
        """The float32 CPU weight, [out, in], a layer holding a torchao tensor computes with:
        torchao's own dequantize(). A layer kept in FP32 as FamilyWorker reads it."""
        weight = _torchao_weight(module)
        if weight is None:
            return super().layer_weight(name, module)
        return as_cpu_float(weight.dequantize())

    def is_quantized(self, config, module) -> bool:
        weight = _torchao_weight(module)
        return weight is not None and IS_QUANTIZED[type(config)](weight)

    def grid(self, precision: Precision, config, weight) -> dict:
        """int8: codes -128..127 times one scale per row. int4: codes -8..7 times one scale per
        group, as the CPU quantizes (on CUDA the tinygemm layout adds a zero per group). float8:
        every finite e4m3 value, at the per-tensor scale max|w| / 448."""
        return GRIDS[type(config)](precision, config, layer_matrix(weight))


WORKER = TorchaoWorker()
