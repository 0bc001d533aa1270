"""What quantization did to one variant's weights: errors per layer, grids, activation outliers.

Plain functions, no Ray and no I/O. Everything returned is JSON-ready (python floats, ints, lists,
dicts; never numpy scalars or tensors) except `dequantized_linear_weights`, whose tensors feed the
others. Float results are always finite: where a quantity is undefined (the SQNR of an unchanged
layer, ...) the value is None and the docstring says so. What the predictions did is in
`effects.py`.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Iterable, Mapping

import numpy as np
import torch

__all__ = [
    "dequantized_linear_weights",
    "classify_layer",
    "layer_weight_errors",
    "summarise_layer_errors",
    "weight_histograms",
    "quantization_grid",
    "activation_outlier_columns",
]

LAYER_TYPES = (
    "query",
    "key",
    "value",
    "attention_output",
    "intermediate",
    "output",
    "classifier",
    "pooler",
    "other",
)

# Bins of the fixed histogram behind `changed_bucket_share`.
CHANGE_BINS = 256


# --------------------------------------------------------------------------------------------------
# Dequantized weights
# --------------------------------------------------------------------------------------------------


def _as_cpu_float(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(device="cpu", dtype=torch.float32)


def _bnb_int8_weight(name: str, layer) -> torch.Tensor:
    # bnb keeps the int8 codes and the per-row absmax (SCB) on the weight right after loading, and
    # moves
    # both to layer.state on the first forward (init_8bit_state), leaving weight.CB/SCB None.
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
    # Same arithmetic as bnb's own dequantizing matmul: codes * absmax / 127, row by row.
    return (
        codes.detach()
        .to(torch.float32)
        .mul(scales.detach().to(torch.float32).unsqueeze(1) / 127.0)
        .cpu()
    )


def _unpack_cpu_packed_4bit(data: torch.Tensor, quant_state) -> torch.Tensor:
    # On CPUs with AVX512-BF16, bnb repacks 4-bit weights on the first forward into a blocked layout
    # with bf16 absmax of shape [K / blocksize, N]; dequantize_4bit no longer understands it, and
    # bnb's
    # own inverse rewrites the module's quant_state in place, so decode the layout here without
    # touching
    # the module. Layout: each 32-byte row holds 64 codes of an [N/32, K/2, 32, 2] tile, the first
    # 32 in
    # the low nibbles and the next 32 in the high ones
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


def _decode_4bit(data: torch.Tensor, quant_state) -> torch.Tensor:
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
        import bitsandbytes.functional as bnbf  # present: the model holds bnb layers

        absmax = bnbf.dequantize_blockwise(absmax, quant_state.state2) + quant_state.offset
    scale = absmax.float().repeat_interleave(quant_state.blocksize)[:n]
    values = quant_state.code.to(torch.float32)[nibbles] * scale
    return _as_cpu_float(values.to(quant_state.dtype).reshape(tuple(quant_state.shape)))


def _bnb_4bit_weight(name: str, layer) -> torch.Tensor:
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


def _effective_weight(name: str, module: torch.nn.Module) -> torch.Tensor | None:
    """The float32 CPU weight a linear-like module computes with, or None for other modules."""
    # bitsandbytes is looked up, never imported: it is slow to import and absent on CPU workers,
    # and a model can only hold its layers once it has been imported.
    bnb = sys.modules.get("bitsandbytes")
    if bnb is not None:
        # bnb layers subclass nn.Linear, so they must be recognised first.
        if isinstance(module, bnb.nn.Linear8bitLt):
            return _bnb_int8_weight(name, module)
        if isinstance(module, bnb.nn.Linear4bit):
            return _bnb_4bit_weight(name, module)
    import torch.ao.nn.quantized.dynamic as nnqd

    if isinstance(module, nnqd.Linear):
        w = module.weight()
        # float16 dynamic quantization unpacks to a plain float tensor.
        return _as_cpu_float(w.dequantize() if w.is_quantized else w)
    if isinstance(module, torch.nn.Linear):
        return _as_cpu_float(module.weight)
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    if pytorch_utils is not None and isinstance(module, pytorch_utils.Conv1D):
        # GPT-2 style Conv1D stores [in, out]; transpose to nn.Linear's [out, in].
        return _as_cpu_float(module.weight).T.contiguous()
    return None


def dequantized_linear_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Float32 CPU weight, [out_features, in_features], of every linear-like layer, keyed by module
    name.

    Handles nn.Linear in any float dtype, torch dynamic-quantized Linear, bitsandbytes Linear8bitLt
    (int8 codes * row absmax / 127; LLM.int8()'s outlier columns multiply these same dequantized
    weights in fp16) and Linear4bit (nf4/fp4, also after bnb's CPU repacking, whose absmax is bf16).
    """
    weights = {}
    for name, module in model.named_modules():
        w = _effective_weight(name, module)
        if w is not None:
            weights[name] = w
    return weights


# --------------------------------------------------------------------------------------------------
# Per-layer weight errors
# --------------------------------------------------------------------------------------------------

# First match wins; order matters where one name contains another (attention.output before output).
_LAYER_TYPE_PATTERNS = [
    ("query", re.compile(r"(^|\.)(query|q_proj|q_lin)$")),
    ("key", re.compile(r"(^|\.)(key|k_proj|k_lin)$")),
    ("value", re.compile(r"(^|\.)(value|v_proj|v_lin)$")),
    # Before attention_output: RoBERTa's head is classifier.out_proj.
    ("classifier", re.compile(r"(^|\.)(pre_classifier|classifier)(\.|$)")),
    (
        "attention_output",
        re.compile(r"(attention\.output\.dense|(^|\.)(o_proj|out_proj|out_lin))$"),
    ),
    ("intermediate", re.compile(r"(intermediate\.dense|ffn\.lin1)$")),
    ("output", re.compile(r"(output\.dense|ffn\.lin2)$")),
    ("pooler", re.compile(r"(^|\.)pooler(\.|$)")),
]
_DEPTH_PATTERN = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)(?:\.|$)")


def classify_layer(name: str) -> tuple[str, int | None]:
    """(layer_type, depth) from a BERT-style module name; depth is the encoder layer index or
    None."""
    layer_type = next((t for t, pattern in _LAYER_TYPE_PATTERNS if pattern.search(name)), "other")
    match = _DEPTH_PATTERN.search(name)
    return layer_type, (int(match.group(1)) if match else None)


def _bin_index(values: torch.Tensor, low: float, high: float, bins: int) -> torch.Tensor:
    if high <= low:
        return torch.zeros_like(values, dtype=torch.long)
    # Values pushed outside the FP32 range by quantization land in the edge bins, as a histogram
    # clipped
    # to that range would show them.
    return torch.floor((values - low) * (bins / (high - low))).clamp(0, bins - 1).long()


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def layer_weight_errors(
    reference_weights: Mapping[str, torch.Tensor], variant_weights: Mapping[str, torch.Tensor]
) -> list[dict]:
    """Quantization error of every layer, variant against reference (both from
    dequantized_linear_weights).

    Each row: layer, layer_type, depth, n_weights, identical (the variant weight equals the
    reference exactly), sqnr_db = 10 log10(sum w^2 / sum (w - wq)^2) (None when identical), rel_l2 =
    ||w - wq|| / ||w|| (None when ||w|| = 0), cosine (None when either norm is 0), max_abs_error,
    and changed_bucket_share: split the reference layer's [min, max] into 256 equal bins; the share
    of weights whose quantized value lies in a different bin than its FP32 value (values outside the
    range count in the edge bin). It is the movement a 256-bin histogram of the layer can show. Sums
    are in float64.
    """
    missing = sorted(set(reference_weights) ^ set(variant_weights))
    if missing:
        raise ValueError(
            "reference and variant hold different linear layers; present in only one of them: "
            f"{missing[:10]}" + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        )
    rows = []
    for name, ref in reference_weights.items():
        var = variant_weights[name]
        if ref.shape != var.shape:
            raise ValueError(
                f"layer {name!r}: reference weight shape {tuple(ref.shape)} != variant "
                f"{tuple(var.shape)}"
            )
        w = ref.detach().cpu().to(torch.float64).reshape(-1)
        wq = var.detach().cpu().to(torch.float64).reshape(-1)
        err = w - wq
        signal = float(torch.dot(w, w))
        noise = float(torch.dot(err, err))
        var_energy = float(torch.dot(wq, wq))
        identical = noise == 0.0
        if identical:
            sqnr = None
        elif signal == 0.0:
            sqnr = None  # -inf: nothing to measure against
        else:
            sqnr = _finite_or_none(10.0 * math.log10(signal / noise))
        low, high = (float(w.min()), float(w.max())) if w.numel() else (0.0, 0.0)
        changed = (
            (_bin_index(w, low, high, CHANGE_BINS) != _bin_index(wq, low, high, CHANGE_BINS))
            .double()
            .mean()
        )
        layer_type, depth = classify_layer(name)
        rows.append(
            {
                "layer": name,
                "layer_type": layer_type,
                "depth": depth,
                "n_weights": int(w.numel()),
                "identical": bool(identical),
                "sqnr_db": sqnr,
                "rel_l2": math.sqrt(noise / signal) if signal > 0 else None,
                "cosine": float(torch.dot(w, wq)) / math.sqrt(signal * var_energy)
                if signal * var_energy > 0
                else None,
                "max_abs_error": float(err.abs().max()) if w.numel() else 0.0,
                "changed_bucket_share": float(changed) if w.numel() else 0.0,
            }
        )
    return rows


def _summarise_group(rows: list[dict]) -> dict:
    def values(key):
        return [r[key] for r in rows if r[key] is not None]

    sqnr, rel, cos = values("sqnr_db"), values("rel_l2"), values("cosine")
    n_weights = sum(r["n_weights"] for r in rows)
    return {
        "n_layers": len(rows),
        "n_weights": n_weights,
        "n_identical": sum(1 for r in rows if r["identical"]),
        "mean_sqnr_db": sum(sqnr) / len(sqnr) if sqnr else None,
        "min_sqnr_db": min(sqnr) if sqnr else None,
        "mean_rel_l2": sum(rel) / len(rel) if rel else None,
        "mean_cosine": sum(cos) / len(cos) if cos else None,
        "max_abs_error": max(r["max_abs_error"] for r in rows),
        # Weighted by layer size so it is the share of all weights in the group that moved bins.
        "changed_bucket_share": (
            sum(r["changed_bucket_share"] * r["n_weights"] for r in rows) / n_weights
            if n_weights
            else 0.0
        ),
    }


def summarise_layer_errors(rows: list[dict]) -> dict:
    """Rows of layer_weight_errors grouped: {overall, by_layer_type: [...], by_depth: [...]}.

    Each group: n_layers, n_weights, n_identical, mean_sqnr_db and min_sqnr_db (over layers that
    changed; None if none did), mean_rel_l2, mean_cosine, max_abs_error (max over layers),
    changed_bucket_share (weighted by n_weights). by_layer_type entries carry layer_type (in
    LAYER_TYPES order), by_depth entries carry depth (ascending, layers outside the encoder stack
    last with depth None).
    """
    if not rows:
        return {"overall": None, "by_layer_type": [], "by_depth": []}
    by_type = [
        {"layer_type": t, **_summarise_group([r for r in rows if r["layer_type"] == t])}
        for t in LAYER_TYPES
        if any(r["layer_type"] == t for r in rows)
    ]
    depths = sorted(
        {r["depth"] for r in rows}, key=lambda d: (d is None, d if d is not None else 0)
    )
    by_depth = [
        {"depth": d, **_summarise_group([r for r in rows if r["depth"] == d])} for d in depths
    ]
    return {"overall": _summarise_group(rows), "by_layer_type": by_type, "by_depth": by_depth}


# --------------------------------------------------------------------------------------------------
# Histograms and quantization grids, for plotting one over the other
# --------------------------------------------------------------------------------------------------


def weight_histograms(reference_weights: Mapping[str, torch.Tensor], bins: int = 128) -> dict:
    """Histogram of the reference weights pooled by layer type.

    Returns {"bins": bins, "by_layer_type": {layer_type: {n_layers, n_weights, min, max, edges
    (bins + 1 floats spanning that type's [min, max]), counts (bins ints)}}}.
    """
    if bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins}")
    grouped: dict[str, list[np.ndarray]] = {}
    for name, w in reference_weights.items():
        grouped.setdefault(classify_layer(name)[0], []).append(
            w.detach().cpu().to(torch.float64).reshape(-1).numpy()
        )
    out = {}
    for layer_type in LAYER_TYPES:
        if layer_type not in grouped:
            continue
        values = np.concatenate(grouped[layer_type])
        counts, edges = np.histogram(
            values, bins=bins, range=(float(values.min()), float(values.max()))
        )
        out[layer_type] = {
            "n_layers": len(grouped[layer_type]),
            "n_weights": int(values.size),
            "min": float(values.min()),
            "max": float(values.max()),
            "edges": [float(e) for e in edges],
            "counts": [int(c) for c in counts],
        }
    return {"bins": int(bins), "by_layer_type": out}


# bitsandbytes code books (bitsandbytes.functional.get_4bit_type), copied so that CPU workers
# without
# bitsandbytes can draw the grid; a test checks them against the installed library.
NF4_CODE = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
FP4_CODE = (
    0.0,
    0.0052083334885537624,
    0.6666666865348816,
    1.0,
    0.3333333432674408,
    0.5,
    0.1666666716337204,
    0.25,
    0.0,
    -0.0052083334885537624,
    -0.6666666865348816,
    -1.0,
    -0.3333333432674408,
    -0.5,
    -0.1666666716337204,
    -0.25,
)
BNB_4BIT_BLOCKSIZE = 64  # bitsandbytes' default and what transformers' BitsAndBytesConfig uses


def _grid(precision, scheme, granularity, codes, group_scales, block_size=None) -> dict:
    codes = sorted(set(float(c) for c in codes))
    group_scales = group_scales.to(torch.float64)
    scale = float(group_scales.max())
    return {
        "precision": precision,
        "scheme": scheme,
        "granularity": granularity,
        "block_size": block_size,
        "n_groups": int(group_scales.numel()),
        "codes": codes,
        "scale": scale,
        "scale_min": float(group_scales.min()),
        "scale_median": float(group_scales.median()),
        "scale_max": scale,
        "values": [c * scale for c in codes],
    }


def _int8_dynamic_grid(precision: str, w: torch.Tensor) -> dict:
    # torch's default dynamic qconfig: per-tensor symmetric qint8, scale = max|w| / ((127 - -128) /
    # 2).
    scale = w.abs().max() / 127.5
    return _grid(
        precision,
        "int8 symmetric, codes -128..127 times scale",
        "tensor",
        range(-128, 128),
        scale.reshape(1),
    )


def _bnb_int8_grid(precision: str, w: torch.Tensor) -> dict:
    # LLM.int8() weights: one absmax per output row of the fp16-cast weight, codes -127..127 / 127.
    absmax = w.to(torch.float16).to(torch.float64).abs().amax(dim=1)
    return _grid(
        precision,
        "int8 absmax per row, codes -127..127 / 127 times row absmax",
        "row",
        [k / 127.0 for k in range(-127, 128)],
        absmax,
    )


def _bnb_4bit_grid(code_book):
    def grid(precision: str, w: torch.Tensor) -> dict:
        flat = w.reshape(-1)
        pad = (-flat.numel()) % BNB_4BIT_BLOCKSIZE
        absmax = (
            torch.nn.functional.pad(flat.abs(), (0, pad))
            .reshape(-1, BNB_4BIT_BLOCKSIZE)
            .amax(dim=1)
        )
        scheme = f"{precision.removeprefix('bnb-')} code book times block absmax"
        return _grid(precision, scheme, "block", code_book, absmax, BNB_4BIT_BLOCKSIZE)

    return grid


# A float format's grid is all of its representable numbers, too dense to draw over a histogram.
_FLOAT_PRECISIONS = ("fp32", "fp16", "bf16")
_GRIDS = {
    "int8-dynamic": _int8_dynamic_grid,
    "bnb-int8": _bnb_int8_grid,
    "bnb-nf4": _bnb_4bit_grid(NF4_CODE),
    "bnb-fp4": _bnb_4bit_grid(FP4_CODE),
}


def quantization_grid(precision: str, weight: torch.Tensor) -> dict | None:
    """Values a precision can represent at the scale of one FP32 layer weight; None for
    fp32/fp16/bf16.

    Returns precision, scheme, granularity (tensor | row | block), block_size, n_groups, codes (the
    normalised levels), group scales (scale_min, scale_median, scale_max), and values = codes *
    scale_max: the grid of the group holding the layer's largest |w|. Other rows/blocks use the same
    codes times their own, smaller scale.
    """
    if precision in _FLOAT_PRECISIONS:
        return None
    if precision not in _GRIDS:
        known = sorted(_GRIDS) + list(_FLOAT_PRECISIONS)
        raise ValueError(f"no quantization grid for precision {precision!r}; known: {known}")
    w = weight.detach().cpu().to(torch.float64)
    if w.dim() != 2 or w.numel() == 0:
        raise ValueError(
            f"expected a non-empty 2-D [out, in] weight, got shape {tuple(weight.shape)}"
        )
    return _GRIDS[precision](precision, w)


# --------------------------------------------------------------------------------------------------
# Activation outliers
# --------------------------------------------------------------------------------------------------


def activation_outlier_columns(
    model: torch.nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], threshold: float = 6.0
) -> dict[str, list[int]]:
    """Input feature columns of every nn.Linear (and GPT-2 Conv1D) where |activation| >= threshold
    anywhere.

    These are the columns LLM.int8() (llm_int8_threshold) multiplies in 16-bit instead of int8. Like
    bnb, every token position counts, padding included. Runs `model(**batch)` in eval mode for each
    batch. Returns {layer name: sorted column indices}, with an empty list for layers without
    outliers.
    """
    masks: dict[str, torch.Tensor] = {}
    handles = []

    def hook_for(name):
        def hook(module, args, kwargs):
            x = (args[0] if args else kwargs["input"]).detach()
            # bnb compares with >= on the fp16 input; fp32 here differs only at the boundary.
            hit = (x.abs() >= threshold).reshape(-1, x.shape[-1]).any(dim=0).cpu()
            masks[name] = masks[name] | hit

        return hook

    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            in_features = module.in_features
        elif pytorch_utils is not None and isinstance(module, pytorch_utils.Conv1D):
            in_features = module.weight.shape[0]  # Conv1D stores [in, out]
        else:
            continue
        masks[name] = torch.zeros(in_features, dtype=torch.bool)
        handles.append(module.register_forward_pre_hook(hook_for(name), with_kwargs=True))
    was_training = model.training
    # Dropout would add outliers that inference never sees.
    model.eval()
    try:
        with torch.inference_mode():
            for batch in batches:
                model(**batch)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {name: [int(i) for i in torch.nonzero(mask).reshape(-1)] for name, mask in masks.items()}
