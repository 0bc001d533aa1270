"""smoothquant-int8: SmoothQuant's smoothing, then int8-static's W8A8.

A few input channels of an LLM's layers carry activations far larger than the rest, and one
per-tensor activation scale set by them leaves the rest few int8 levels. SmoothQuant divides
each input channel j by s_j = max|x_j|^alpha / max|W_:,j|^(1 - alpha) and multiplies the
weight's column j by s_j: the layer computes the same function, with the outliers moved into
the weights, which are quantized per row.

torchao's SmoothQuantConfig keeps every calibration input (and its running-absmax observer fails
with a static base config in torchao 0.18), so this follows its recipe with running statistics:
per-channel max |x| by hooks (observe.py), s as torchao computes it, torchao's handler on W * s
and act_pre_scale = 1 / s. The activation scale, max_j(max|x_j| / s_j), equals torchao's
max |x / s| over every input: the result is bit-identical to SmoothQuantConfig's.
"""

from __future__ import annotations

import torch

from runner.precisions.calibrated import int8_static
from runner.precisions.calibrated.observe import observe_inputs, quantize_layers

# torchao's guard against a zero channel (smoothquant/core.py)
EPS = torch.finfo(torch.float32).eps


def smoothing_factor(weight: torch.Tensor, absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's s [in] for one layer, as torchao computes it."""
    weight_absmax = weight.detach().abs().amax(dim=0)
    return (absmax + EPS).pow(alpha) / (weight_absmax + EPS).pow(1 - alpha)


def calibrate(model, config, batches: list[dict], keep: frozenset[str]):
    """Each layer's input max |x| per channel over the calibration rows."""
    return model, observe_inputs(model, batches)


def quantize(model, config, keep: frozenset[str], observed) -> tuple:
    alpha = config.smoothquant_alpha

    def smoothed(name: str, layer):
        absmax = observed[name].absmax
        s = smoothing_factor(layer.weight, absmax, alpha)
        return int8_static.static_int8_layer(layer, absmax, smoothing=s)

    quantize_layers(model, keep, "smoothquant-int8", smoothed)
    recorded = int8_static.recorded("smoothquant", config)
    recorded["smoothquant_alpha"] = alpha
    recorded["activation_scale"] = "per layer: max |x / s| over the calibration rows / 127.5"
    return model, recorded


def effective_weight(module) -> torch.Tensor | None:
    """W * s dequantized, times 1 / s: the weight in the layer's original input space."""
    return int8_static.effective_weight(module)


def is_quantized(module) -> bool:
    return int8_static.is_quantized(module) and module.weight.act_pre_scale is not None


def grid(precision, config, weight: torch.Tensor) -> dict:
    """int8's codes at this weight's own per-row scales. The layer quantizes W * s, whose row
    scales depend on the calibration set; in W's own space each column's step is divided by s_j."""
    drawn = int8_static.grid(precision, config, weight)
    drawn["scheme"] = (
        "int8 symmetric, codes -128..127 times scale, per row of the smoothed weight W * s "
        "(drawn at W's own row scales; s comes from the calibration set)"
    )
    return drawn
