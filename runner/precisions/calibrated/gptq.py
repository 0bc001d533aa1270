"""gptq-int4: GPTQ's int4 weights through Intel Neural Compressor (neural-compressor-pt), then
computed with torchao's CPU int4 layer, so that it runs the kernel and the grid torchao-int4-weight
runs (like for like; INC's own layer dequantizes to FP32 and multiplies in FP32).

GPTQ rounds each layer's weights column by column and spreads each column's rounding error over
the columns not yet rounded, weighted by the inverse Hessian X^T X of the layer's inputs on the
calibration set, so that the layer's output moves least. INC runs it block by block: block i's
inputs are block i-1's outputs with block i-1 already quantized.

Three things INC 3.10 does not do as quantbench needs, done here:
- `quant_lm_head=True` feeds the output layer no calibration data (its loop runs over an empty
  list): its Hessian is zero and its weights come out all zero. INC quantizes the blocks only; every
  other linear layer (lm_head, a classifier) is quantized afterwards with INC's own GPTQ step on
  the inputs the quantized model feeds it.
- Its per-layer FP32 setting is ignored: the layers a study keeps in FP32 are put back after.
- It writes an nc_workspace/ folder into the working directory: it runs in a scratch folder.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import re
import shutil
import tempfile
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import torch
import transformers  # noqa: F401  before INC: it looks at import for whether transformers is loaded
from neural_compressor.torch.algorithms.weight_only.gptq import GPTQ as IncGptqLayer
from neural_compressor.torch.algorithms.weight_only.modules import INCWeightOnlyLinear
from neural_compressor.torch.algorithms.weight_only.utility import quant_weight_w_scale
from neural_compressor.torch.quantization import GPTQConfig, convert, prepare
from torchao.quantization import IntxUnpackedToInt8Tensor

from runner import machine
from runner.analysis import layer_matrix, make_grid, row_blocks
from runner.precisions.calibrated import GptqInt4
from runner.precisions.torchao.worker import check_group_size
from runner.precisions.worker import as_cpu_float

LIBRARY = "neural-compressor-pt"
INT4_CODES = range(-8, 8)


def inc_config(config: GptqInt4, scratch: Path) -> GPTQConfig:
    """INC's GPTQ config: symmetric int4 per group of torchao_int4_group_size, columns in their
    order (no act_order: torchao's layer has no permutation), the GPTQ paper's 1% damping.
    model_path: INC resolves it even when it loads nothing ("" goes to the hub); any folder does."""
    return GPTQConfig(
        bits=4,
        group_size=config.torchao_int4_group_size,
        use_sym=True,
        act_order=False,
        percdamp=0.01,
        block_size=128,
        quant_lm_head=False,  # INC's lm_head step has no data (module docstring): done here
        model_path=str(scratch),
    )


# --------------------------------------------------------------------------------------------------
# Calibrate: INC's prepare, then the calibration rows
# --------------------------------------------------------------------------------------------------


@dataclass
class Observed:
    """What quantize takes from calibrate."""

    inc_config: GPTQConfig
    scratch: Path  # INC's working directory, removed after quantize
    batches: list[dict]  # run again through the quantized model for the layers INC leaves
    kept: dict[str, torch.nn.Module]  # FP32 copies of the layers to keep: INC rounds them too


def calibrate(model, config: GptqInt4, batches: list[dict], keep: frozenset[str]):
    """INC's prepared model, which caught the first block's inputs for every calibration row (it
    stops each forward there: the rows cost one embedding each), and what quantize needs."""
    check_group_size(model, config.torchao_int4_group_size, keep, "gptq-int4")
    kept = {name: copy.deepcopy(model.get_submodule(name)) for name in keep}
    scratch = Path(tempfile.mkdtemp(prefix="quantbench-gptq-"))
    gptq_config = inc_config(config, scratch)
    with contextlib.chdir(scratch), torch.no_grad():
        prepared = prepare(model, gptq_config)
        for batch in batches:
            prepared(**batch)  # returns None: INC stops each forward at the first block
    return prepared, Observed(gptq_config, scratch, batches, kept)


# --------------------------------------------------------------------------------------------------
# Quantize: INC's convert, the kept layers back, the other layers, torchao's layer
# --------------------------------------------------------------------------------------------------


class _LayerTracker(logging.Handler):
    """Which layer INC's GPTQ is on, read from its log lines ("Quantizing layer 3 / 30..", then
    "Quantizing layer self_attn.q_proj"), to name the layer when INC fails."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.block, self.layer = None, None

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if found := re.match(r"Quantizing layer (\d+) / \d+", message):
            self.block, self.layer = int(found[1]) - 1, None
        elif found := re.match(r"Quantizing layer (\S+)$", message):
            self.layer = found[1]

    def where(self, model) -> str:
        if self.block is None:
            return "before its first block"
        suffix = f".{self.block}." + (self.layer or "")
        names = [n for n, _ in model.named_modules() if n.endswith(suffix)] if self.layer else []
        return f"layer {names[0]!r}" if names else f"block {self.block}"


def inc_convert(model, observed: Observed):
    """INC's GPTQ over the transformer blocks. Raises RuntimeError naming the layer it failed on."""
    inc_logger = logging.getLogger("neural_compressor")
    tracker, level = _LayerTracker(), inc_logger.level
    inc_logger.addHandler(tracker)
    inc_logger.setLevel(min(level or logging.INFO, logging.INFO))
    try:
        with contextlib.chdir(observed.scratch), torch.no_grad():
            return convert(model)
    except Exception as error:
        raise RuntimeError(
            f"gptq-int4: Intel Neural Compressor's GPTQ failed at {tracker.where(model)}: "
            f"{type(error).__name__}: {error}"
        ) from error
    finally:
        inc_logger.removeHandler(tracker)
        inc_logger.setLevel(level)


def restore_kept(model, kept: dict[str, torch.nn.Module]) -> None:
    """The layers to keep in FP32 back as they were (INC rounds every layer of a block)."""
    for name, module in kept.items():
        _replace(model, name, module)


def _layer_config(gptq_config: GPTQConfig) -> dict:
    """One layer's settings as INC's GPTQ step reads them (what INC builds from GPTQConfig)."""
    return {
        "dtype": gptq_config.dtype,
        "bits": gptq_config.bits,
        "sym": gptq_config.use_sym,
        "group_size": gptq_config.group_size,
        "perchannel": True,
        "mse": gptq_config.use_mse_search,
        "use_double_quant": False,
        "double_quant_dtype": "int",
        "double_quant_bits": 8,
        "double_quant_sym": False,
        "double_quant_group_size": 256,
    }


# Rows of a weight INC's GPTQ step rounds at a time outside the blocks: the step makes copies of
# what it is given (a float copy, the rounded values, their losses, the int32 codes).
ROW_BLOCK_BYTES = 16 * 2**20


def gptq_one_layer(name: str, layer: torch.nn.Linear, step, gptq_config) -> torch.nn.Linear:
    """INC's GPTQ step on one layer whose inputs it has seen (step.add_batch), as torchao's int4
    layer. GPTQ rounds each row of the weight on its own against the Hessian X^T X that the rows
    share, so the step runs on a block of about ROW_BLOCK_BYTES of rows at a time, each packed
    as INC packs the layers of its blocks and read back as torchao_layer reads them: the step's
    copies are a block's, not the layer's (108 MiB each for SmolLM2's 49152 x 576 output layer).
    Raises RuntimeError naming the layer."""
    weight = layer.weight.detach()
    hessian = step.H
    rows_per_block = max(1, ROW_BLOCK_BYTES // (weight.shape[1] * weight.element_size()))
    codes, scales, biases = [], [], []
    for start in range(0, weight.shape[0], rows_per_block):
        rows = slice(start, start + rows_per_block)
        step.H = hessian.clone()  # fasterquant changes the Hessian it is given in place
        bias = None if layer.bias is None else layer.bias[rows]
        packed = gptq_rows(name, weight[rows], bias, step, gptq_config)
        block_codes, block_scales = torchao_codes(packed)
        codes.append(block_codes)
        scales.append(block_scales)
        biases.append(packed.bias)
        del packed
    bias = None if layer.bias is None else torch.cat(biases)
    return int4_linear(torch.cat(codes), torch.cat(scales), bias, gptq_config.group_size)


def gptq_rows(name: str, rows: torch.Tensor, bias, step, gptq_config) -> INCWeightOnlyLinear:
    """INC's GPTQ step on these rows of a layer's weight, packed as INC packs the layers of its
    blocks. Raises RuntimeError naming the layer."""
    group_size = gptq_config.group_size
    try:
        scale, _, _, rounded = step.fasterquant(
            rows.clone(),  # fasterquant updates the columns it is given in place
            blocksize=gptq_config.block_size,
            percdamp=gptq_config.percdamp,
            groupsize=group_size,
        )
    except Exception as error:
        raise RuntimeError(
            f"gptq-int4: Intel Neural Compressor's GPTQ failed at layer {name!r}: "
            f"{type(error).__name__}: {error}"
        ) from error
    codes = quant_weight_w_scale(rounded, scale, None, None, group_size).to(torch.int32)
    del rounded
    packed = INCWeightOnlyLinear(
        rows.shape[1], rows.shape[0], bits=gptq_config.bits, group_size=group_size,
        bias=bias is not None,
    )  # fmt: skip
    packed.pack(codes, scale, None, bias)
    return packed


def gptq_outside_blocks(model, observed: Observed, keep: frozenset[str]) -> list[str]:
    """GPTQ on the linear layers INC's block pass leaves in FP32 (lm_head, a classifier), on the
    inputs the quantized model feeds them over the calibration rows; each becomes torchao's
    layer. Their names."""
    left = {
        name: module
        for name, module in model.named_modules()
        if type(module) is torch.nn.Linear and name not in keep and not is_quantized(module)
    }
    steps = {}
    for name, layer in left.items():
        steps[name] = IncGptqLayer(layer, layer.weight.detach())  # keeps X^T X, [in, in]
        steps[name].quantizer.configure(_layer_config(observed.inc_config))
    hooks = [
        layer.register_forward_hook(
            lambda _, args, out, step=steps[name]: step.add_batch(args[0], out)
        )
        for name, layer in left.items()
    ]
    try:
        with torch.no_grad():
            for batch in observed.batches:
                model(**batch)
    finally:
        for hook in hooks:
            hook.remove()
    names = sorted(left)
    for name in list(left):
        layer = left.pop(name)
        _replace(model, name, gptq_one_layer(name, layer, steps.pop(name), observed.inc_config))
        del layer
        machine.release_freed_memory()  # the FP32 layer, its Hessian and the step's copies
    return names


def _replace(model, name: str, module: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def torchao_layer(packed: INCWeightOnlyLinear) -> torch.nn.Linear:
    """An nn.Linear computing with torchao's CPU int4 tensor, as IntxWeightOnlyConfig(int4,
    PerGroup(g)) makes it for torchao-int4-weight, holding INC's codes and scales."""
    return int4_linear(*torchao_codes(packed), packed.bias, packed.group_size)


def torchao_codes(packed: INCWeightOnlyLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """INC's packed layer as torchao's int4 tensor takes it: INC stores codes + 8 (its symmetric
    zero point) and float16 scales; torchao takes the signed int8 codes [out, in] and float32
    scales [out, groups], zero point 0."""
    unpacked = packed.unpack()
    zero_point = unpacked["zp"].to(torch.int32).repeat_interleave(packed.group_size, dim=1)
    codes = (unpacked["int_weight"].to(torch.int32) - zero_point).to(torch.int8)
    return codes, unpacked["scales"].to(torch.float32)


def int4_linear(codes: torch.Tensor, scale: torch.Tensor, bias, group_size: int) -> torch.nn.Linear:
    """An nn.Linear whose weight is torchao's CPU int4 tensor of these codes and scales."""
    weight = IntxUnpackedToInt8Tensor(
        qdata=codes,
        scale=scale,
        zero_point=torch.zeros_like(scale, dtype=torch.int8),
        target_dtype=torch.int4,
        block_size=(1, group_size),
        dtype=torch.float32,
        activation_quantization=None,
    )
    out_features, in_features = codes.shape
    layer = torch.nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    layer.weight = torch.nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        layer.bias = torch.nn.Parameter(bias.to(torch.float32), requires_grad=False)
    return layer


def recorded_fields(gptq_config: GPTQConfig) -> dict:
    """The GPTQConfig's settings, less INC's bookkeeping and the scratch folder (model_path)."""
    fields = dict(gptq_config.to_dict().get("global", gptq_config.to_dict()))
    for internal in ("params_list", "non_tunable_params", "_is_initialized", "model_path"):
        fields.pop(internal, None)
    return fields


def quantize(model, config: GptqInt4, keep: frozenset[str], observed: Observed):
    """GPTQ on every linear layer but those in keep, each an nn.Linear with torchao's int4 tensor
    under its old name; and what to record."""
    try:
        model = inc_convert(model, observed)
        restore_kept(model, observed.kept)
        packed = [n for n, m in model.named_modules() if isinstance(m, INCWeightOnlyLinear)]
        for name in packed:  # each INC layer freed as it is replaced
            _replace(model, name, torchao_layer(model.get_submodule(name)))
        machine.release_freed_memory()
        outside_blocks = gptq_outside_blocks(model, observed, keep)
    finally:
        shutil.rmtree(observed.scratch, ignore_errors=True)
    fields = recorded_fields(observed.inc_config)
    return model, {
        "method": "GPTQ: neural_compressor.torch.quantization prepare + convert",
        "library": LIBRARY,
        "library_version": version(LIBRARY),
        "config": fields,
        "granularity": config.granularity,
        "group_size": config.torchao_int4_group_size,
        "kernel": "torchao IntxUnpackedToInt8Tensor int4, as torchao-int4-weight on the CPU",
        "gptq_outside_blocks": outside_blocks,  # by INC's GPTQ step, run by quantbench
    }


# --------------------------------------------------------------------------------------------------
# Reading the layers back
# --------------------------------------------------------------------------------------------------


def is_quantized(module) -> bool:
    """Whether this layer computes with gptq-int4's weight: torchao's int4 tensor."""
    weight = getattr(module, "weight", None)
    return type(weight) is IntxUnpackedToInt8Tensor and weight.target_dtype == torch.int4


def effective_weight(module) -> torch.Tensor | None:
    """The float32 CPU [out, in] weight a gptq-int4 layer computes with: codes times scales (no
    activation pre-scale: GPTQ changes the weights only). None for any other module."""
    return as_cpu_float(module.weight.dequantize()) if is_quantized(module) else None


def grid(precision, config: GptqInt4, weight: torch.Tensor) -> dict:
    """torchao-int4-weight's grid: codes -8..7 times max|group| / 7.5 of this FP32 weight, per
    group of torchao_int4_group_size. GPTQ's scales come from the weights as it has updated them,
    column by column, so they differ a little from these."""
    w = layer_matrix(weight)
    group_size = config.torchao_int4_group_size
    if w.shape[1] % group_size:
        raise ValueError(
            f"gptq-int4 grid: a weight of {w.shape[1]} inputs is not a whole number of groups of "
            f"{group_size} (settings.torchao_int4_group_size)"
        )
    groups = torch.cat(
        [rows.reshape(rows.shape[0], -1, group_size).abs().amax(dim=-1) for rows in row_blocks(w)]
    )
    scales = torch.where(groups > 0, groups / 7.5, 2 / 15)  # INC's scale for an all-zero group
    scheme = f"int4 symmetric, codes -8..7 times scale, per group of {group_size}"
    return make_grid(precision.name, scheme, "group", INT4_CODES, scales.reshape(-1), group_size)
