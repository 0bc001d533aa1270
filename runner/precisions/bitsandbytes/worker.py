"""bitsandbytes on the worker: transformers' BitsAndBytesConfig applied while loading, reading back
the Linear8bitLt and Linear4bit layers it leaves, the grids, and LLM.int8()'s outlier columns."""

from __future__ import annotations

import math
import re

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import torch
from transformers import AutoConfig, BitsAndBytesConfig
from transformers.quantizers.base import get_keys_to_not_convert
from transformers.quantizers.quantizers_utils import should_convert_module

from runner.analysis import (
    activation_outlier_columns,
    flat_block_absmax,
    layer_matrix,
    make_grid,
    row_blocks,
)
from runner.precisions import Precision
from runner.precisions.bitsandbytes import (
    BNB_4BIT_BLOCKSIZE,
    FP4,
    NF4,
    OUTLIER_BATCHES,
    FourBit,
    Int8,
)
from runner.precisions.worker import (
    FamilyWorker,
    as_cpu_float,
    check_keep,
    files_read_not_mapped,
)

# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def _int8_config(config: Int8, skip: list[str] | None):
    return BitsAndBytesConfig(
        load_in_8bit=True,
        llm_int8_threshold=config.llm_int8_threshold,
        llm_int8_skip_modules=skip,
    ), {
        "method": "bitsandbytes LLM.int8()",
        "llm_int8_threshold": config.llm_int8_threshold,
    }


def _4bit_config(config: FourBit, skip: list[str] | None):
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=config.quant_type,
        bnb_4bit_compute_dtype=getattr(torch, config.bnb_4bit_compute_dtype),
        bnb_4bit_use_double_quant=config.bnb_4bit_use_double_quant,
        llm_int8_skip_modules=skip,
    ), {
        "method": f"bitsandbytes 4-bit {config.quant_type}",
        "bnb_4bit_quant_type": config.quant_type,
        "bnb_4bit_compute_dtype": config.bnb_4bit_compute_dtype,
        "bnb_4bit_use_double_quant": config.bnb_4bit_use_double_quant,
    }


# (our config, skip) -> (transformers' BitsAndBytesConfig, the settings recorded beside results),
# by our config's type. skip: llm_int8_skip_modules (None: transformers' defaults).
BNB_CONFIGS = {Int8: _int8_config, NF4: _4bit_config, FP4: _4bit_config}


def _keep_unpackable_layers_unpacked(model) -> None:
    # On CPUs with AVX512-BF16, bnb's Linear4bit repacks its weight at the first forward into tiles
    # of 32 outputs x 64 inputs and crashes on a layer that does not fill whole tiles (a 32-wide
    # hidden size, a 3-label classifier). Such a layer keeps the layout every other CPU uses.
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            blocksize = module.weight.quant_state.blocksize
            if module.in_features % blocksize or module.out_features % 32:
                module.support_avx512bf16_for_cpu = False


def _skip_modules(model_class, model_dir, keep: frozenset[str]) -> list[str] | None:
    """transformers' default skip list (tied and output embeddings, the last module), found on an
    empty model of the checkpoint's config, plus the kept layers' escaped full names; None (the
    defaults, as before) when nothing is kept. A given skip list replaces the defaults."""
    if not keep:
        return None
    with torch.device("meta"):
        empty = model_class.from_config(AutoConfig.from_pretrained(model_dir))
    return sorted(get_keys_to_not_convert(empty)) + [re.escape(name) for name in sorted(keep)]


# --------------------------------------------------------------------------------------------------
# Reading back the weights the layers compute with
# --------------------------------------------------------------------------------------------------


def _int8_codes_and_scales(name: str, layer):
    # bnb keeps the int8 codes and the per-row absmax (SCB) on the weight right after loading, and
    # moves both to layer.state on the first forward (init_8bit_state), leaving weight.CB/SCB None.
    weight = layer.weight
    state = getattr(layer, "state", None)
    codes = getattr(weight, "CB", None)
    if codes is None and state is not None:
        codes = getattr(state, "CB", None)
    if codes is None and weight.dtype == torch.int8:
        codes = weight.data
    scales = getattr(weight, "SCB", None)
    if scales is None and state is not None:
        scales = getattr(state, "SCB", None)
    if codes is None or scales is None or codes.dtype != torch.int8:
        raise ValueError(
            f"layer {name!r} is a bitsandbytes Linear8bitLt without int8 codes and row scales "
            f"(weight dtype {weight.dtype}, "
            f"has_fp16_weights={getattr(weight, 'has_fp16_weights', None)}); "
            "only inference-quantized layers (has_fp16_weights=False, moved to a device) can be "
            "read"
        )
    return codes, scales


def _int8_weight(name: str, layer):
    codes, scales = _int8_codes_and_scales(name, layer)
    # codes * row absmax / 127 by bnb itself: what its int8 matmul multiplies LLM.int8()'s outlier
    # columns with (int8_mixed_scaled_mm).
    return as_cpu_float(bnbf.int8_vectorwise_dequant(codes.detach(), scales.detach().float()))


def _unpack_cpu_packed_4bit(data, quant_state):
    # On CPUs with AVX512-BF16, bnb repacks 4-bit weights on the first forward into a blocked layout
    # with bf16 absmax of shape [K / blocksize, N]; dequantize_4bit no longer understands it, and
    # bnb's own inverse rewrites the module's quant_state in place, so decode the layout here
    # without touching the module. Layout: each 32-byte row holds 64 codes of an [N/32, K/2, 32, 2]
    # tile, the first 32 in the low nibbles and the next 32 in the high ones
    # (bitsandbytes.functional._convert_weight_packed_for_cpu).
    block_n = 32
    n_out, k_half = data.shape
    k_in = 2 * k_half
    packed = data.detach().cpu().view(torch.uint8).reshape(-1, block_n)
    nibbles = torch.cat([packed & 0xF, (packed >> 4) & 0xF], dim=-1)
    idx = (
        nibbles.reshape(n_out // block_n, k_half, block_n, 2)
        .transpose(1, 2)
        .reshape(n_out, k_in)
        .long()
    )
    code = quant_state.code.detach().cpu().to(torch.float32)
    absmax = quant_state.absmax.detach().cpu().to(torch.float32).T  # [N, K / blocksize]
    scale = absmax.repeat_interleave(quant_state.blocksize, dim=1)
    return code[idx] * scale


def _decode_4bit(data, quant_state):
    # Decoded here, not with bnb's dequantize_4bit: on CPUs with AVX512, bnb's CPU kernel takes the
    # blocks of 64 as lying within rows, while quantize_4bit made them over the flattened weight, so
    # for in_features not a multiple of 64 it scales values by another block's absmax. This is the
    # arithmetic of bnb's portable kernel (backends/default/ops.py): the high nibble first, code
    # times the block's absmax in float32, cast to the weight's dtype.
    n = math.prod(quant_state.shape)
    packed = data.detach().reshape(-1).view(torch.uint8)
    nibbles = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[:n].long()
    absmax = quant_state.absmax
    if quant_state.nested:
        absmax = bnbf.dequantize_blockwise(absmax, quant_state.state2) + quant_state.offset
    scale = absmax.float().repeat_interleave(quant_state.blocksize)[:n]
    values = quant_state.code.to(torch.float32)[nibbles] * scale
    return as_cpu_float(values.to(quant_state.dtype).reshape(tuple(quant_state.shape)))


def _4bit_weight(name: str, layer):
    weight = layer.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is None:
        raise ValueError(
            f"layer {name!r} is a bitsandbytes Linear4bit whose weight is not quantized yet (no "
            "quant_state); "
            "read it after the model has been loaded or moved to its device"
        )
    if getattr(quant_state, "packing_format_for_cpu", False):
        return _unpack_cpu_packed_4bit(weight.data, quant_state)
    return _decode_4bit(weight.data, quant_state)


# --------------------------------------------------------------------------------------------------
# Grids
# --------------------------------------------------------------------------------------------------


def _int8_grid(precision: Precision, config: Int8, w) -> dict:
    # LLM.int8() weights: one absmax per output row of the fp16-cast weight, codes -127..127 / 127.
    absmax = torch.cat(
        [rows.to(torch.float16).to(torch.float64).abs().amax(dim=1) for rows in row_blocks(w)]
    )
    return make_grid(
        precision.name,
        "int8 absmax per row, codes -127..127 / 127 times row absmax",
        "row",
        [k / 127.0 for k in range(-127, 128)],
        absmax,
    )


def _4bit_grid(precision: Precision, config: FourBit, w) -> dict:
    absmax = flat_block_absmax(w, BNB_4BIT_BLOCKSIZE)
    scheme = f"{config.quant_type} code book times block absmax"
    return make_grid(precision.name, scheme, "block", config.code_book, absmax, BNB_4BIT_BLOCKSIZE)


GRIDS = {Int8: _int8_grid, NF4: _4bit_grid, FP4: _4bit_grid}


# --------------------------------------------------------------------------------------------------
# The worker
# --------------------------------------------------------------------------------------------------


class BitsAndBytesWorker(FamilyWorker):
    # Quantized while loading, layer by layer: no full FP32 model is held at any time.
    quantizes_while_loading = True

    def load(self, precision: Precision, config, model_class, model_dir, device, keep=frozenset()):
        skip = _skip_modules(model_class, model_dir, keep)
        quantization_config, recorded = BNB_CONFIGS[type(config)](config, skip)
        with files_read_not_mapped():
            model = model_class.from_pretrained(
                model_dir, quantization_config=quantization_config, device_map={"": device}
            ).eval()
        check_keep(model, keep, precision.name)
        if device == "cpu":
            _keep_unpackable_layers_unpacked(model)
        recorded["quantized_while_loading"] = True
        return model, recorded

    def linear_classes(self) -> tuple[type, ...]:
        return (*super().linear_classes(), bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)

    def layer_weight(self, name: str, module):
        """The float32 CPU weight a bnb layer computes with: int8 codes * row absmax / 127
        (LLM.int8()'s outlier columns multiply these same weights in 16-bit), or the 4-bit code
        times its block's absmax (also after bnb's CPU repacking, whose absmax is bf16). A layer
        left in float as FamilyWorker reads it."""
        if isinstance(module, bnb.nn.Linear8bitLt):
            return _int8_weight(name, module)
        if isinstance(module, bnb.nn.Linear4bit):
            return _4bit_weight(name, module)
        return super().layer_weight(name, module)

    def is_quantized(self, config, module) -> bool:
        if isinstance(config, Int8):
            return isinstance(module, bnb.nn.Linear8bitLt)
        quant_state = getattr(getattr(module, "weight", None), "quant_state", None)
        return (
            isinstance(module, bnb.nn.Linear4bit)
            and quant_state is not None
            and quant_state.quant_type == config.quant_type
        )

    def leaves_unquantized(self, model, name: str) -> bool:
        """Whether transformers kept this layer out of quantization (tied or output embeddings,
        skip lists): it says so in the quantizer it leaves on the model."""
        skipped = getattr(getattr(model, "hf_quantizer", None), "modules_to_not_convert", None)
        return not should_convert_module(name, skipped or None)

    def grid(self, precision: Precision, config, weight) -> dict:
        return GRIDS[type(config)](precision, config, layer_matrix(weight))

    def extra_analysis(self, config, reference_model, batches: list[dict]) -> dict:
        """bnb-int8: the input columns of every linear layer of the FP32 model where LLM.int8()
        would see an outlier, found on a few evaluation batches (short and long ones)."""
        if not isinstance(config, Int8):
            return {}
        spread = batches[:: max(1, len(batches) // OUTLIER_BATCHES)][:OUTLIER_BATCHES]
        cpu_batches = [{k: v.cpu() for k, v in b.items()} for b in spread]
        columns = activation_outlier_columns(
            reference_model, cpu_batches, config.llm_int8_threshold
        )
        return {
            "outlier_columns": {name: cols for name, cols in columns.items() if cols},
            "outlier_samples": sum(b["input_ids"].shape[0] for b in cpu_batches),
        }


WORKER = BitsAndBytesWorker()
