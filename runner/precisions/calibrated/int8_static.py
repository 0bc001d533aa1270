"""int8-static: W8A8 with each layer's activation scale fixed from the calibration set.

torchao's Int8StaticActivationInt8WeightConfig takes the activation scale but has no observer of
its own: forward pre-hooks record each layer's input max |x| over the calibration rows
(observe.py), torchao's own quantizer turns it into the scale (max|x| / 127.5, symmetric), and
torchao's handler quantizes the weight (int8, one scale per row) carrying that scale.

The static scale has the rank of the activations it was made for ([1, 1, 1] for [B, S, H]) and
torchao refuses an input of another rank; StaticInt8Linear folds any input into [1, tokens, H]
so that 2-D, 3-D and [1, 1, H] (generation) inputs all run. smoothquant.py builds on this module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchao
from torchao.core.config import config_to_dict
from torchao.quantization import (
    Int8StaticActivationInt8WeightConfig,
    Int8Tensor,
    PerRow,
    PerTensor,
)
from torchao.quantization.quant_api import _QUANTIZE_CONFIG_HANDLER
from torchao.quantization.quantize_.common import _choose_quant_func_and_quantize_tensor
from torchao.utils import DummyModule

from runner.analysis import make_grid, row_blocks
from runner.precisions.calibrated.observe import observe_inputs, quantize_layers


class StaticInt8Linear(torch.nn.Linear):
    """An nn.Linear whose weight is torchao's Int8Tensor with a static activation scale: runs its
    input folded to [1, tokens, in_features], the rank the scale was made for."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        folded = x.reshape(1, -1, x.shape[-1])
        return F.linear(folded, self.weight, self.bias).reshape(*x.shape[:-1], -1)


def torchao_static_config() -> Int8StaticActivationInt8WeightConfig:
    """Activations one scale per tensor (a static scale per row would be one per token), weights
    one per row."""
    return Int8StaticActivationInt8WeightConfig(granularity=[PerTensor(), PerRow()])


def activation_scale(absmax: torch.Tensor, config) -> torch.Tensor:
    """torchao's static activation scale, [1, 1, 1], for inputs whose largest |x| is absmax: its
    own quantizer run on a 3-D probe holding +-absmax."""
    probe = torch.stack([absmax, -absmax]).reshape(1, 1, 2).float()
    return _choose_quant_func_and_quantize_tensor(probe, config.get_act_quant_kwargs()).scale


def static_int8_layer(layer: torch.nn.Linear, absmax: torch.Tensor, smoothing=None):
    """A StaticInt8Linear computing layer with int8 weights and activations. absmax: max |x_j|
    of each input channel over the calibration set. smoothing: SmoothQuant's s [in] (None:
    none): the weight becomes W * s and the layer multiplies its input by 1 / s first, so the
    activation scale is that of x / s, max_j(absmax_j / s_j)."""
    config = torchao_static_config()
    weight = layer.weight.detach()
    if smoothing is not None:
        weight = weight * smoothing
        absmax = absmax / smoothing
    config.act_quant_scale = activation_scale(absmax.max(), config).to(weight.device)
    quantized = _QUANTIZE_CONFIG_HANDLER[type(config)](DummyModule(weight), config).weight
    if smoothing is not None:
        quantized.act_pre_scale = 1.0 / smoothing  # as torchao's SmoothQuant convert does
    static = StaticInt8Linear(
        layer.in_features, layer.out_features, layer.bias is not None, device="meta"
    )
    static.weight = torch.nn.Parameter(quantized, requires_grad=False)
    static.bias = layer.bias
    return static


def calibrate(model, config, batches: list[dict], keep: frozenset[str]):
    """Each layer's input max |x| per channel over the calibration rows."""
    return model, observe_inputs(model, batches)


def quantize(model, config, keep: frozenset[str], observed) -> tuple:
    def static(name: str, layer):
        return static_int8_layer(layer, observed[name].absmax)

    quantize_layers(model, keep, "int8-static", static)
    return model, recorded("int8-static", config)


def recorded(method: str, config) -> dict:
    """What a result records of a static int8 method (smoothquant.py adds its alpha)."""
    return {
        "method": method,
        "library": "torchao",
        "library_version": torchao.__version__,
        "config": config_to_dict(torchao_static_config()),
        "activation_scale": "per layer: max |x| over the calibration rows / 127.5",
        "granularity": config.granularity,
        "group_size": None,
    }


def effective_weight(module) -> torch.Tensor | None:
    """The weight a StaticInt8Linear computes with, in its original input space: the int8
    weight dequantized, times the input pre-scale 1 / s where SmoothQuant smoothed it."""
    if not is_quantized(module):
        return None
    weight = module.weight.dequantize().float()
    if module.weight.act_pre_scale is not None:
        weight = weight * module.weight.act_pre_scale.float()[None, :]
    return weight.detach().cpu()


def is_quantized(module) -> bool:
    weight = getattr(module, "weight", None)
    return (
        isinstance(module, StaticInt8Linear)
        and type(weight) is Int8Tensor
        and weight.act_quant_scale is not None
    )


def grid(precision, config, weight: torch.Tensor) -> dict:
    """int8 symmetric, codes -128..127 times max|row| / 127.5, one scale per row."""
    return make_grid(
        precision.name,
        "int8 symmetric, codes -128..127 times scale, per row",
        "row",
        range(-128, 128),
        row_scales(weight),
    )


def row_scales(weight: torch.Tensor) -> torch.Tensor:
    """torchao's per-row int8 scales for this weight, a block of rows at a time."""
    return torch.cat(
        [
            Int8Tensor.from_hp(rows.float(), PerRow()).scale.reshape(-1)
            for rows in row_blocks(weight)
        ]
    )
