"""awq-int4: AWQ's per-channel scales, then int4 weights on torchao-int4-weight's grid.

AWQ multiplies each input channel j of a layer's weight by s_j before quantizing and divides the
input by s_j, so the salient channels (large mean |x|) lose less to rounding. It tries
s = mean|x|^ratio (normalised) for ratio = 0, 1/n, ..., (n-1)/n and keeps the one whose
quantized layer's output moves least on the calibration inputs; ratio 0 is plain RTN.

This is torchao's AWQ search (AWQObserver.calculate_qparams, torchao 0.18), the same scales,
the same normalisation, the same loss, with two changes:
- torchao's observer keeps every calibration input and runs each candidate over all of them.
  Here hooks keep mean |x| and G = sum x^T x per layer (observe.py); the mean squared output
  error of a candidate whose computed weight differs from W by D is sum((D @ G) * D) / (tokens *
  out_features), exactly torchao's loss, in memory that does not grow with the calibration set.
  G is in x in floats per layer (500 MiB for SmolLM2-135M's): calibrate observes a part of the
  layers at a time (GRAM_PART_BYTES of G), searches their scales and frees their G before the
  next part, the model run over the rows once per part.
- the base config is torchao-int4-weight's own (IntxWeightOnlyConfig(int4, PerGroup(g)) on the
  CPU, where torchao's AWQConfig refuses it for lack of act_pre_scale; Int4WeightOnlyConfig on
  CUDA), and the layer is a PreScaledLinear: F.linear(x * (1 / s), W_q), W_q = int4(W * s).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchao
from torchao.core.config import config_to_dict
from torchao.quantization import Int4TilePackedTo4dTensor, IntxUnpackedToInt8Tensor
from torchao.quantization.quant_api import _QUANTIZE_CONFIG_HANDLER
from torchao.utils import DummyModule

from runner import machine
from runner.precisions.calibrated.observe import linear_layers, observe_inputs, quantize_layers
from runner.precisions.torchao import Int4Weight
from runner.precisions.torchao.worker import _int4_grid, check_group_size, torchao_config
from runner.precisions.worker import runs_of_about

SEARCH_GRID_SIZE = 20  # torchao AWQConfig's scale_search_space_size default
# sum x^T x held at once: the layers are observed a part of about this many bytes of them at a
# time (SmolLM2-135M's 210 layers hold 500 MiB of them, Gemma-3-270M's 127 about 500 MiB).
GRAM_PART_BYTES = 128 * 2**20


class PreScaledLinear(torch.nn.Linear):
    """y = F.linear(x * act_pre_scale, W_q, b): W_q is torchao's int4 tensor of W * s, and the
    buffer act_pre_scale = 1 / s."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x * self.act_pre_scale.to(x.dtype), self.weight, self.bias)


def int4_config(config, device: str):
    """torchao-int4-weight's torchao config on this device, at the job's group size."""
    return torchao_config(Int4Weight(config.torchao_int4_group_size), device)


@dataclass
class Searched:
    """What quantize takes from calibrate: each layer's chosen scales s [in] and ratio."""

    scales: dict[str, torch.Tensor]
    ratios: dict[str, float]


def calibrate(model, config, batches: list[dict], keep: frozenset[str]):
    """Each layer's AWQ scales, searched from its mean |x| per channel and sum x^T x over the
    calibration rows. The layers are observed a part of about GRAM_PART_BYTES of sums at a time,
    each part searched and its sums freed before the next is observed: the model runs over the
    rows once per part (each row only as far as the part's last layer), where observing every
    layer at once held every layer's in x in sums together. The FP32 model is unchanged until
    quantize, so each layer sees the inputs it would see in one pass. Raises ValueError first
    where the group size does not divide a layer to quantize."""
    check_group_size(model, config.torchao_int4_group_size, keep, "awq-int4")
    base = int4_config(config, next(model.parameters()).device.type)
    searched = Searched({}, {})
    for part in gram_parts(model, keep):
        observed = observe_inputs(model, batches, gram=True, names=part)
        for name in part:
            weight = model.get_submodule(name).weight.detach()
            scales, ratio = search_scales(weight, observed.pop(name), base)
            searched.scales[name], searched.ratios[name] = scales, ratio
        del observed
        machine.release_freed_memory()
    return model, searched


def gram_parts(model, keep: frozenset[str]) -> list[list[str]]:
    """The linear layers not kept, in order, cut into runs of about GRAM_PART_BYTES of float32
    [in, in] sums (at least one layer each)."""
    gram_bytes = {n: layer.in_features**2 * 4 for n, layer in linear_layers(model) if n not in keep}
    return runs_of_about(list(gram_bytes), gram_bytes.__getitem__, GRAM_PART_BYTES)


def quantize(model, config, keep: frozenset[str], searched: Searched) -> tuple:
    base = int4_config(config, next(model.parameters()).device.type)
    ratios: dict[str, int] = {}  # ratio chosen: how many layers chose it

    def scaled(name: str, layer):
        ratio = searched.ratios[name]
        ratios[f"{ratio:g}"] = ratios.get(f"{ratio:g}", 0) + 1
        return pre_scaled_layer(layer, searched.scales[name], base)

    quantize_layers(model, keep, "awq-int4", scaled)
    return model, {
        "method": "awq",
        "library": "torchao",
        "library_version": torchao.__version__,
        "config": config_to_dict(base),
        "granularity": config.granularity,
        "group_size": config.torchao_int4_group_size,
        "awq_search_grid_size": SEARCH_GRID_SIZE,
        "awq_ratios_chosen": dict(sorted(ratios.items(), key=lambda item: float(item[0]))),
    }


def search_scales(weight: torch.Tensor, stats, base_config) -> tuple[torch.Tensor, float]:
    """torchao's AWQ search: the scales s [in] whose quantized layer's output moves least over
    the calibration tokens, and the ratio they came from."""
    mean_abs = stats.mean_abs().to(weight.dtype)
    best_scales, best_ratio, best_loss = torch.ones_like(mean_abs), 0.0, float("inf")
    for i in range(SEARCH_GRID_SIZE):
        ratio = i / SEARCH_GRID_SIZE
        scales = mean_abs.pow(ratio).clamp(min=1e-4).view(-1)
        scales = scales / (scales.max() * scales.min()).sqrt()
        computed = dense(quantized_weight(weight * scales, base_config)) / scales
        loss = output_error(weight.float() - computed.float(), stats)
        if loss < best_loss:
            best_scales, best_ratio, best_loss = scales, ratio, loss
    return best_scales.detach(), best_ratio


def output_error(difference: torch.Tensor, stats) -> float:
    """mean over tokens and outputs of (x @ D^T)^2, from sum x^T x."""
    energy = ((difference @ stats.gram) * difference).sum()
    return float(energy) / (max(stats.tokens, 1) * difference.shape[0])


def quantized_weight(weight: torch.Tensor, base_config):
    """torchao's handler for the base config on this float weight: its tensor subclass."""
    if weight.device.type != "cpu":  # tinygemm takes bfloat16 weights, as torchao-int4-weight
        weight = weight.to(torch.bfloat16)
    return _QUANTIZE_CONFIG_HANDLER[type(base_config)](DummyModule(weight), base_config).weight


def dense(weight) -> torch.Tensor:
    """The float [out, in] values a torchao int4 tensor multiplies by. The CUDA tinygemm tensor
    has no dequantize: the identity through its own matmul gives them."""
    if isinstance(weight, Int4TilePackedTo4dTensor):
        eye = torch.eye(weight.shape[1], device=weight.device, dtype=weight.dtype)
        return F.linear(eye, weight).T
    return weight.dequantize()


def pre_scaled_layer(layer: torch.nn.Linear, scales, base_config) -> PreScaledLinear:
    """A PreScaledLinear computing layer with int4 weights W * s and inputs x / s."""
    weight = layer.weight.detach() * scales
    scaled = PreScaledLinear(
        layer.in_features, layer.out_features, layer.bias is not None, device="meta"
    )
    scaled.weight = torch.nn.Parameter(quantized_weight(weight, base_config), requires_grad=False)
    scaled.bias = layer.bias
    scaled.register_buffer("act_pre_scale", (1.0 / scales).float())
    return scaled


def effective_weight(module) -> torch.Tensor | None:
    """W_q times 1 / s: the weight in the layer's original input space."""
    if not is_quantized(module):
        return None
    weight = dense(module.weight).float() * module.act_pre_scale.float()[None, :]
    return weight.detach().cpu()


def is_quantized(module) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(module, PreScaledLinear) and (
        (type(weight) is IntxUnpackedToInt8Tensor and weight.target_dtype == torch.int4)
        or type(weight) is Int4TilePackedTo4dTensor
    )


def grid(precision, config, weight: torch.Tensor) -> dict:
    """torchao-int4-weight's grid at this weight's own group scales. The layer quantizes W * s,
    whose scales depend on the calibration set; in W's own space each column's step is divided
    by s_j."""
    drawn = _int4_grid(precision, Int4Weight(config.torchao_int4_group_size), weight)
    drawn["scheme"] += " of the scaled weight W * s (drawn at W's own group scales)"
    return drawn
