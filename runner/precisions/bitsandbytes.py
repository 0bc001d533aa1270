"""bnb-int8, bnb-nf4, bnb-fp4: bitsandbytes layers, quantized by transformers while loading.

LLM.int8() keeps int8 codes and one absmax per output row, and multiplies the input columns that
hold an outlier (|x| >= llm_int8_threshold) in 16-bit; its extra analysis finds those columns on
the FP32 model. The 4-bit kinds keep a 4-bit code (NormalFloat or float) and one absmax per block
of 64 values of the flattened weight. bitsandbytes is imported inside functions and otherwise
looked up in sys.modules: it is slow to import, CPU workers may lack it, and a model can only hold
its layers once it has been imported.

Layers named in `keep` stay plain FP32 nn.Linear: they join transformers' own skip list
(`llm_int8_skip_modules`, used by the 4-bit kinds too). transformers matches a skip name as a regex
from the start of a module name up to a dot boundary, or as a suffix; a full, escaped module name
matches that module only (layer.1.output.dense never catches layer.11.output.dense).
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass

from runner.precisions.common import Precision, as_cpu_float, check_keep

COMPUTE_DTYPES = ("float32", "float16", "bfloat16")
BNB_4BIT_BLOCKSIZE = 64  # bitsandbytes' default and what transformers' BitsAndBytesConfig uses
# Outlier columns of LLM.int8() are found on this many evaluation batches of the FP32 model.
OUTLIER_BATCHES = 4

# bitsandbytes code books (bitsandbytes.functional.get_4bit_type), copied so that CPU workers
# without bitsandbytes can draw the grid; a test checks them against the installed library.
# fmt: off
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
FP4_CODE = (
    0.0, 0.0052083334885537624, 0.6666666865348816, 1.0, 0.3333333432674408, 0.5,
    0.1666666716337204, 0.25, 0.0, -0.0052083334885537624, -0.6666666865348816, -1.0,
    -0.3333333432674408, -0.5, -0.1666666716337204, -0.25,
)
# fmt: on
CODE_BOOKS = {"bnb-nf4": NF4_CODE, "bnb-fp4": FP4_CODE}


@dataclass(frozen=True)
class Settings:
    llm_int8_threshold: float = 6.0
    bnb_4bit_compute_dtype: str = "float32"
    bnb_4bit_use_double_quant: bool = False


def read_settings(reader) -> Settings:
    """The job's settings.bnb_4bit_compute_dtype, .llm_int8_threshold, .bnb_4bit_use_double_quant.
    Raises SpecError."""
    compute_dtype = reader.get("bnb_4bit_compute_dtype", str, "float32")
    if compute_dtype not in COMPUTE_DTYPES:
        raise reader.error(
            "bnb_4bit_compute_dtype", compute_dtype, f"allowed: {', '.join(COMPUTE_DTYPES)}"
        )
    threshold = reader.get("llm_int8_threshold", float, 6.0)
    if threshold < 0:
        raise reader.error("llm_int8_threshold", threshold, "expected a number >= 0")
    return Settings(
        llm_int8_threshold=threshold,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=reader.get("bnb_4bit_use_double_quant", bool, False),
    )


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def _config(kind: str, settings, skip: list[str] | None = None):
    """transformers' BitsAndBytesConfig for one kind, and the settings recorded beside results.
    skip: llm_int8_skip_modules (None: transformers' defaults)."""
    import torch
    from transformers import BitsAndBytesConfig

    if kind == "int8":
        config = BitsAndBytesConfig(
            load_in_8bit=True,
            llm_int8_threshold=settings["llm_int8_threshold"],
            llm_int8_skip_modules=skip,
        )
        return config, {
            "method": "bitsandbytes LLM.int8()",
            "llm_int8_threshold": settings["llm_int8_threshold"],
        }
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=kind,
        bnb_4bit_compute_dtype=getattr(torch, settings["bnb_4bit_compute_dtype"]),
        bnb_4bit_use_double_quant=settings["bnb_4bit_use_double_quant"],
        llm_int8_skip_modules=skip,
    )
    return config, {
        "method": f"bitsandbytes 4-bit {kind}",
        "bnb_4bit_quant_type": kind,
        "bnb_4bit_compute_dtype": settings["bnb_4bit_compute_dtype"],
        "bnb_4bit_use_double_quant": settings["bnb_4bit_use_double_quant"],
    }


def _keep_unpackable_layers_unpacked(model) -> None:
    # On CPUs with AVX512-BF16, bnb's Linear4bit repacks its weight at the first forward into tiles
    # of 32 outputs x 64 inputs and crashes on a layer that does not fill whole tiles (a 32-wide
    # hidden size, a 3-label classifier). Such a layer keeps the layout every other CPU uses.
    import bitsandbytes as bnb

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
    import torch
    from transformers import AutoConfig
    from transformers.quantizers.base import get_keys_to_not_convert

    with torch.device("meta"):
        empty = model_class.from_config(AutoConfig.from_pretrained(model_dir))
    return sorted(get_keys_to_not_convert(empty)) + [re.escape(name) for name in sorted(keep)]


def _load(kind: str):
    def load(model_class, model_dir, device, settings, keep=frozenset()):
        config, recorded = _config(kind, settings, _skip_modules(model_class, model_dir, keep))
        # Quantized while loading, layer by layer: no full FP32 model is held at any time.
        model = model_class.from_pretrained(
            model_dir, quantization_config=config, device_map={"": device}
        ).eval()
        check_keep(model, keep, f"bnb-{kind}")
        if device == "cpu":
            _keep_unpackable_layers_unpacked(model)
        recorded["quantized_while_loading"] = True
        return model, recorded

    return load


IMPORTS = ("bitsandbytes", "transformers.integrations.bitsandbytes")

PRECISIONS = [
    Precision(
        "bnb-int8",
        "bitsandbytes",
        ("cpu", "cuda"),
        "bitsandbytes LLM.int8()",
        _load("int8"),
        imports=IMPORTS,
    ),
    Precision(
        "bnb-nf4",
        "bitsandbytes",
        ("cpu", "cuda"),
        "bitsandbytes 4-bit NormalFloat",
        _load("nf4"),
        imports=IMPORTS,
    ),
    Precision(
        "bnb-fp4",
        "bitsandbytes",
        ("cpu", "cuda"),
        "bitsandbytes 4-bit float",
        _load("fp4"),
        imports=IMPORTS,
    ),
]


# --------------------------------------------------------------------------------------------------
# Reading back the weights the layers compute with
# --------------------------------------------------------------------------------------------------


def linear_classes() -> tuple[type, ...]:
    bnb = sys.modules.get("bitsandbytes")
    return () if bnb is None else (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)


def _int8_codes_and_scales(name: str, layer):
    # bnb keeps the int8 codes and the per-row absmax (SCB) on the weight right after loading, and
    # moves both to layer.state on the first forward (init_8bit_state), leaving weight.CB/SCB None.
    import torch

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
    import bitsandbytes.functional as bnbf

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
    import torch

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
    import torch

    n = math.prod(quant_state.shape)
    packed = data.detach().reshape(-1).view(torch.uint8)
    nibbles = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[:n].long()
    absmax = quant_state.absmax
    if quant_state.nested:
        import bitsandbytes.functional as bnbf

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


def layer_weight(name: str, module):
    """The float32 CPU weight a bnb layer computes with: int8 codes * row absmax / 127 (LLM.int8()'s
    outlier columns multiply these same weights in 16-bit), or the 4-bit code times its block's
    absmax (also after bnb's CPU repacking, whose absmax is bf16). None for other modules."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return None
    if isinstance(module, bnb.nn.Linear8bitLt):
        return _int8_weight(name, module)
    if isinstance(module, bnb.nn.Linear4bit):
        return _4bit_weight(name, module)
    return None


def is_quantized(precision: str, module) -> bool:
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return False
    if precision == "bnb-int8":
        return isinstance(module, bnb.nn.Linear8bitLt)
    quant_state = getattr(getattr(module, "weight", None), "quant_state", None)
    return (
        isinstance(module, bnb.nn.Linear4bit)
        and quant_state is not None
        and f"bnb-{quant_state.quant_type}" == precision
    )


def leaves_unquantized(model, name: str) -> bool:
    """Whether transformers kept this layer out of quantization (tied or output embeddings, skip
    lists): it says so in the quantizer it leaves on the model."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    skipped = getattr(getattr(model, "hf_quantizer", None), "modules_to_not_convert", None)
    return not should_convert_module(name, skipped or None)


# --------------------------------------------------------------------------------------------------
# Grids and the LLM.int8() outlier analysis
# --------------------------------------------------------------------------------------------------


def grid(precision: str, weight, settings=None) -> dict:
    from runner.analysis import layer_matrix, make_grid

    w = layer_matrix(weight)
    if precision == "bnb-int8":
        # LLM.int8() weights: one absmax per output row of the fp16-cast weight, codes -127..127 /
        # 127.
        import torch

        absmax = w.to(torch.float16).to(torch.float64).abs().amax(dim=1)
        return make_grid(
            precision,
            "int8 absmax per row, codes -127..127 / 127 times row absmax",
            "row",
            [k / 127.0 for k in range(-127, 128)],
            absmax,
        )
    return _4bit_grid(precision, w, make_grid)


def _4bit_grid(precision: str, w, make_grid) -> dict:
    import torch

    flat = w.reshape(-1)
    pad = (-flat.numel()) % BNB_4BIT_BLOCKSIZE
    absmax = (
        torch.nn.functional.pad(flat.abs(), (0, pad)).reshape(-1, BNB_4BIT_BLOCKSIZE).amax(dim=1)
    )
    scheme = f"{precision.removeprefix('bnb-')} code book times block absmax"
    return make_grid(precision, scheme, "block", CODE_BOOKS[precision], absmax, BNB_4BIT_BLOCKSIZE)


def extra_analysis(precision: str, reference_model, batches: list[dict], settings) -> dict:
    """bnb-int8: the input columns of every linear layer of the FP32 model where LLM.int8() would
    see an outlier, found on a few evaluation batches (short and long ones)."""
    if precision != "bnb-int8":
        return {}
    from runner.analysis import activation_outlier_columns

    spread = batches[:: max(1, len(batches) // OUTLIER_BATCHES)][:OUTLIER_BATCHES]
    cpu_batches = [{k: v.cpu() for k, v in b.items()} for b in spread]
    columns = activation_outlier_columns(
        reference_model, cpu_batches, settings["llm_int8_threshold"]
    )
    return {
        "outlier_columns": {name: cols for name, cols in columns.items() if cols},
        "outlier_samples": sum(b["input_ids"].shape[0] for b in cpu_batches),
    }
