"""What quantization did to one variant: weight errors per layer, activation outliers, prediction changes.

Plain functions, no Ray and no I/O. Everything returned is JSON-ready (python floats, ints, lists, dicts;
never numpy scalars or tensors) except `dequantized_linear_weights`, whose tensors feed the others.
Float results are always finite: where a quantity is undefined (SQNR of an unchanged layer, the
precision of a class never predicted, ...) the value is None and the docstring says so.
"""

from __future__ import annotations

import math
import re
import sys
from typing import Iterable, Mapping

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
    "macro_f1",
    "prediction_effects",
    "paired_bootstrap_delta",
    "mcnemar_exact",
]

LAYER_TYPES = ("query", "key", "value", "attention_output", "intermediate", "output", "classifier", "pooler", "other")

# Bins of the fixed histogram behind `changed_bucket_share`.
CHANGE_BINS = 256


# --------------------------------------------------------------------------------------------------
# Dequantized weights
# --------------------------------------------------------------------------------------------------


def _as_cpu_float(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(device="cpu", dtype=torch.float32)


def _bnb_int8_weight(name: str, layer) -> torch.Tensor:
    # bnb keeps the int8 codes and the per-row absmax (SCB) on the weight right after loading, and moves
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
            f"(weight dtype {weight.dtype}, has_fp16_weights={getattr(weight, 'has_fp16_weights', None)}); "
            "only inference-quantized layers (has_fp16_weights=False, moved to a device) can be read"
        )
    # Same arithmetic as bnb's own dequantizing matmul: codes * absmax / 127, row by row.
    return codes.detach().to(torch.float32).mul(scales.detach().to(torch.float32).unsqueeze(1) / 127.0).cpu()


def _unpack_cpu_packed_4bit(data: torch.Tensor, quant_state) -> torch.Tensor:
    # On CPUs with AVX512-BF16, bnb repacks 4-bit weights on the first forward into a blocked layout
    # with bf16 absmax of shape [K / blocksize, N]; dequantize_4bit no longer understands it, and bnb's
    # own inverse rewrites the module's quant_state in place, so decode the layout here without touching
    # the module. Layout: each 32-byte row holds 64 codes of an [N/32, K/2, 32, 2] tile, the first 32 in
    # the low nibbles and the next 32 in the high ones (bitsandbytes.functional._convert_weight_packed_for_cpu).
    block_n = 32
    n_out, k_half = data.shape
    k_in = 2 * k_half
    packed = data.detach().cpu().view(torch.uint8).reshape(-1, block_n)
    nibbles = torch.cat([packed & 0xF, (packed >> 4) & 0xF], dim=-1)
    idx = nibbles.reshape(n_out // block_n, k_half, block_n, 2).transpose(1, 2).reshape(n_out, k_in).long()
    code = quant_state.code.detach().cpu().to(torch.float32)
    absmax = quant_state.absmax.detach().cpu().to(torch.float32).T  # [N, K / blocksize]
    scale = absmax.repeat_interleave(quant_state.blocksize, dim=1)
    return code[idx] * scale


def _bnb_4bit_weight(name: str, layer) -> torch.Tensor:
    weight = layer.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is None:
        raise ValueError(
            f"layer {name!r} is a bitsandbytes Linear4bit whose weight is not quantized yet (no quant_state); "
            "read it after the model has been loaded or moved to its device"
        )
    if getattr(quant_state, "packing_format_for_cpu", False):
        return _unpack_cpu_packed_4bit(weight.data, quant_state)
    import bitsandbytes.functional as bnbf  # present: the model holds bnb layers

    return _as_cpu_float(bnbf.dequantize_4bit(weight.data, quant_state).reshape(tuple(quant_state.shape)))


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
    """Float32 CPU weight, [out_features, in_features], of every linear-like layer, keyed by module name.

    Handles nn.Linear in any float dtype, torch dynamic-quantized Linear, bitsandbytes Linear8bitLt
    (int8 codes * row absmax / 127; LLM.int8()'s outlier columns multiply these same dequantized weights
    in fp16) and Linear4bit (nf4/fp4, also after bnb's CPU repacking, whose absmax is bf16).
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
    ("attention_output", re.compile(r"(attention\.output\.dense|(^|\.)(o_proj|out_proj|out_lin))$")),
    ("intermediate", re.compile(r"(intermediate\.dense|ffn\.lin1)$")),
    ("output", re.compile(r"(output\.dense|ffn\.lin2)$")),
    ("pooler", re.compile(r"(^|\.)pooler(\.|$)")),
]
_DEPTH_PATTERN = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)(?:\.|$)")


def classify_layer(name: str) -> tuple[str, int | None]:
    """(layer_type, depth) from a BERT-style module name; depth is the encoder layer index or None."""
    layer_type = next((t for t, pattern in _LAYER_TYPE_PATTERNS if pattern.search(name)), "other")
    match = _DEPTH_PATTERN.search(name)
    return layer_type, (int(match.group(1)) if match else None)


def _bin_index(values: torch.Tensor, low: float, high: float, bins: int) -> torch.Tensor:
    if high <= low:
        return torch.zeros_like(values, dtype=torch.long)
    # Values pushed outside the FP32 range by quantization land in the edge bins, as a histogram clipped
    # to that range would show them.
    return torch.floor((values - low) * (bins / (high - low))).clamp(0, bins - 1).long()


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def layer_weight_errors(
    reference_weights: Mapping[str, torch.Tensor], variant_weights: Mapping[str, torch.Tensor]
) -> list[dict]:
    """Quantization error of every layer, variant against reference (both from dequantized_linear_weights).

    Each row: layer, layer_type, depth, n_weights, identical (the variant weight equals the reference
    exactly), sqnr_db = 10 log10(sum w^2 / sum (w - wq)^2) (None when identical), rel_l2 =
    ||w - wq|| / ||w|| (None when ||w|| = 0), cosine (None when either norm is 0), max_abs_error, and
    changed_bucket_share: split the reference layer's [min, max] into 256 equal bins; the share of weights
    whose quantized value lies in a different bin than its FP32 value (values outside the range count in
    the edge bin). It is the movement a 256-bin histogram of the layer can show. Sums are in float64.
    """
    missing = sorted(set(reference_weights) ^ set(variant_weights))
    if missing:
        raise ValueError(
            f"reference and variant hold different linear layers; present in only one of them: {missing[:10]}"
            + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        )
    rows = []
    for name, ref in reference_weights.items():
        var = variant_weights[name]
        if ref.shape != var.shape:
            raise ValueError(f"layer {name!r}: reference weight shape {tuple(ref.shape)} != variant {tuple(var.shape)}")
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
        changed = (_bin_index(w, low, high, CHANGE_BINS) != _bin_index(wq, low, high, CHANGE_BINS)).double().mean()
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
                "cosine": float(torch.dot(w, wq)) / math.sqrt(signal * var_energy) if signal * var_energy > 0 else None,
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
            sum(r["changed_bucket_share"] * r["n_weights"] for r in rows) / n_weights if n_weights else 0.0
        ),
    }


def summarise_layer_errors(rows: list[dict]) -> dict:
    """Rows of layer_weight_errors grouped: {overall, by_layer_type: [...], by_depth: [...]}.

    Each group: n_layers, n_weights, n_identical, mean_sqnr_db and min_sqnr_db (over layers that changed;
    None if none did), mean_rel_l2, mean_cosine, max_abs_error (max over layers), changed_bucket_share
    (weighted by n_weights). by_layer_type entries carry layer_type (in LAYER_TYPES order), by_depth
    entries carry depth (ascending, layers outside the encoder stack last with depth None).
    """
    if not rows:
        return {"overall": None, "by_layer_type": [], "by_depth": []}
    by_type = [
        {"layer_type": t, **_summarise_group([r for r in rows if r["layer_type"] == t])}
        for t in LAYER_TYPES
        if any(r["layer_type"] == t for r in rows)
    ]
    depths = sorted({r["depth"] for r in rows}, key=lambda d: (d is None, d if d is not None else 0))
    by_depth = [{"depth": d, **_summarise_group([r for r in rows if r["depth"] == d])} for d in depths]
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
        grouped.setdefault(classify_layer(name)[0], []).append(w.detach().cpu().to(torch.float64).reshape(-1).numpy())
    out = {}
    for layer_type in LAYER_TYPES:
        if layer_type not in grouped:
            continue
        values = np.concatenate(grouped[layer_type])
        counts, edges = np.histogram(values, bins=bins, range=(float(values.min()), float(values.max())))
        out[layer_type] = {
            "n_layers": len(grouped[layer_type]),
            "n_weights": int(values.size),
            "min": float(values.min()),
            "max": float(values.max()),
            "edges": [float(e) for e in edges],
            "counts": [int(c) for c in counts],
        }
    return {"bins": int(bins), "by_layer_type": out}


# bitsandbytes code books (bitsandbytes.functional.get_4bit_type), copied so that CPU workers without
# bitsandbytes can draw the grid; a test checks them against the installed library.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)  # fmt: skip
FP4_CODE = (
    0.0, 0.0052083334885537624, 0.6666666865348816, 1.0, 0.3333333432674408, 0.5, 0.1666666716337204, 0.25,
    0.0, -0.0052083334885537624, -0.6666666865348816, -1.0, -0.3333333432674408, -0.5, -0.1666666716337204, -0.25,
)  # fmt: skip
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
    # torch's default dynamic qconfig: per-tensor symmetric qint8, scale = max|w| / ((127 - -128) / 2).
    scale = w.abs().max() / 127.5
    return _grid(precision, "int8 symmetric, codes -128..127 times scale", "tensor", range(-128, 128), scale.reshape(1))


def _bnb_int8_grid(precision: str, w: torch.Tensor) -> dict:
    # LLM.int8() weights: one absmax per output row of the fp16-cast weight, codes -127..127 / 127.
    absmax = w.to(torch.float16).to(torch.float64).abs().amax(dim=1)
    return _grid(precision, "int8 absmax per row, codes -127..127 / 127 times row absmax", "row",
                 [k / 127.0 for k in range(-127, 128)], absmax)  # fmt: skip


def _bnb_4bit_grid(code_book):
    def grid(precision: str, w: torch.Tensor) -> dict:
        flat = w.reshape(-1)
        pad = (-flat.numel()) % BNB_4BIT_BLOCKSIZE
        absmax = torch.nn.functional.pad(flat.abs(), (0, pad)).reshape(-1, BNB_4BIT_BLOCKSIZE).amax(dim=1)
        return _grid(precision, f"{precision.removeprefix('bnb-')} code book times block absmax", "block",
                     code_book, absmax, BNB_4BIT_BLOCKSIZE)  # fmt: skip

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
    """Values a precision can represent at the scale of one FP32 layer weight; None for fp32/fp16/bf16.

    Returns precision, scheme, granularity (tensor | row | block), block_size, n_groups, codes (the
    normalised levels), group scales (scale_min, scale_median, scale_max), and values = codes * scale_max:
    the grid of the group holding the layer's largest |w|. Other rows/blocks use the same codes times
    their own, smaller scale.
    """
    if precision in _FLOAT_PRECISIONS:
        return None
    if precision not in _GRIDS:
        known = sorted(_GRIDS) + list(_FLOAT_PRECISIONS)
        raise ValueError(f"no quantization grid for precision {precision!r}; known: {known}")
    w = weight.detach().cpu().to(torch.float64)
    if w.dim() != 2 or w.numel() == 0:
        raise ValueError(f"expected a non-empty 2-D [out, in] weight, got shape {tuple(weight.shape)}")
    return _GRIDS[precision](precision, w)


# --------------------------------------------------------------------------------------------------
# Activation outliers
# --------------------------------------------------------------------------------------------------


def activation_outlier_columns(
    model: torch.nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], threshold: float = 6.0
) -> dict[str, list[int]]:
    """Input feature columns of every nn.Linear (and GPT-2 Conv1D) where |activation| >= threshold anywhere.

    These are the columns LLM.int8() (llm_int8_threshold) multiplies in 16-bit instead of int8. Like bnb,
    every token position counts, padding included. Runs `model(**batch)` in eval mode for each batch.
    Returns {layer name: sorted column indices}, with an empty list for layers without outliers.
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


# --------------------------------------------------------------------------------------------------
# Prediction-level effects
# --------------------------------------------------------------------------------------------------


def _labels(name: str, values, n_classes: int | None = None) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of class indices, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer) and not np.all(np.mod(arr, 1) == 0):
        raise ValueError(f"{name} must hold integer class indices, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if n_classes is not None and arr.size and (arr.min() < 0 or arr.max() >= n_classes):
        raise ValueError(f"{name} holds class indices outside 0..{n_classes - 1}: min {arr.min()}, max {arr.max()}")
    return arr


def _same_length(**arrays):
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"arrays must have the same length, got {lengths}")
    if not next(iter(lengths.values())):
        raise ValueError("need at least one sample")


def _macro_f1_from_counts(tp: np.ndarray, n_gold: np.ndarray, n_pred: np.ndarray) -> np.ndarray:
    # Works on the last axis, so it serves one evaluation and a batch of bootstrap resamples alike.
    present = (n_gold + n_pred) > 0
    f1 = np.where(present, 2.0 * tp / np.maximum(n_gold + n_pred, 1), 0.0)
    return f1.sum(axis=-1) / np.maximum(present.sum(axis=-1), 1)


def macro_f1(gold, pred, n_classes: int) -> float:
    """Unweighted mean F1 over the classes that occur in gold or in pred (as sklearn's average='macro').

    A class absent from both would score 0/0 and is left out rather than counted as 0 or 1.
    """
    gold, pred = _labels("gold", gold, n_classes), _labels("pred", pred, n_classes)
    _same_length(gold=gold, pred=pred)
    tp = np.bincount(gold[gold == pred], minlength=n_classes)
    n_gold, n_pred = np.bincount(gold, minlength=n_classes), np.bincount(pred, minlength=n_classes)
    return float(_macro_f1_from_counts(tp, n_gold, n_pred))


def _probs(name: str, probs, n_classes: int) -> np.ndarray:
    arr = np.asarray(probs, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != n_classes:
        raise ValueError(f"{name} must have shape [n, {n_classes}] (one column per label name), got {arr.shape}")
    if not np.all(np.isfinite(arr)) or arr.min() < 0:
        raise ValueError(f"{name} must hold finite, non-negative probabilities")
    return arr


def _calibration(gold: np.ndarray, probs: np.ndarray, n_bins: int) -> dict:
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == gold
    # Bins are (lo, hi], the first one [0, hi], so a confidence of exactly 1 falls in the last bin.
    index = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    bins, ece = [], 0.0
    for b in range(n_bins):
        in_bin = index == b
        count = int(in_bin.sum())
        mean_conf = float(confidence[in_bin].mean()) if count else None
        accuracy = float(correct[in_bin].mean()) if count else None
        if count:
            ece += count / len(gold) * abs(accuracy - mean_conf)
        bins.append({"lo": b / n_bins, "hi": (b + 1) / n_bins, "count": count,
                     "mean_confidence": mean_conf, "accuracy": accuracy})  # fmt: skip
    return {"ece": float(ece), "n_bins": int(n_bins), "bins": bins}


def prediction_effects(gold, baseline_probs, variant_probs, label_names, n_bins: int = 10) -> dict:
    """How the variant's predictions differ from the baseline's on the same samples.

    Returns n, accuracy_baseline, accuracy_variant, agreement (same predicted label), flip_rate,
    flips [{from, to, count}] (baseline label -> variant label, most frequent first), correct_to_wrong,
    wrong_to_correct, mean_kl_baseline_variant (KL(baseline || variant) in nats, averaged over samples;
    probabilities are floored at 1e-12 so it stays finite), per_class [{label, precision, recall, f1,
    support}] for the variant (precision None when the class is never predicted, recall None with no
    support), macro_f1_variant, confusion_matrix {labels, rows: "gold", cols: "predicted", matrix},
    calibration_variant / calibration_baseline {ece, n_bins, bins [{lo, hi, count, mean_confidence,
    accuracy}]} over max-probability confidence, mean_confidence_baseline, mean_confidence_variant and
    mean_confidence_change (variant - baseline, in probability units).
    """
    label_names = [str(n) for n in label_names]
    k = len(label_names)
    if n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins}")
    gold = _labels("gold", gold, k)
    p_base, p_var = _probs("baseline_probs", baseline_probs, k), _probs("variant_probs", variant_probs, k)
    _same_length(gold=gold, baseline_probs=p_base, variant_probs=p_var)
    n = len(gold)
    pred_base, pred_var = p_base.argmax(axis=1), p_var.argmax(axis=1)

    transitions = np.bincount(pred_base * k + pred_var, minlength=k * k).reshape(k, k)
    flips = [
        {"from": label_names[a], "to": label_names[b], "count": int(transitions[a, b])}
        for a in range(k)
        for b in range(k)
        if a != b and transitions[a, b]
    ]
    flips.sort(key=lambda f: -f["count"])

    eps = 1e-12
    p, q = np.clip(p_base, eps, None), np.clip(p_var, eps, None)
    kl = np.sum(p_base * (np.log(p) - np.log(q)), axis=1)

    confusion = np.bincount(gold * k + pred_var, minlength=k * k).reshape(k, k)
    per_class = []
    for c, label in enumerate(label_names):
        tp, predicted, support = int(confusion[c, c]), int(confusion[:, c].sum()), int(confusion[c, :].sum())
        precision = tp / predicted if predicted else None
        recall = tp / support if support else None
        f1 = 2 * tp / (predicted + support) if predicted + support else None
        per_class.append({"label": label, "precision": precision, "recall": recall, "f1": f1, "support": support})

    base_correct, var_correct = pred_base == gold, pred_var == gold
    conf_base, conf_var = float(p_base.max(axis=1).mean()), float(p_var.max(axis=1).mean())
    agreement = float(np.mean(pred_base == pred_var))
    return {
        "n": int(n),
        "accuracy_baseline": float(base_correct.mean()),
        "accuracy_variant": float(var_correct.mean()),
        "agreement": agreement,
        "flip_rate": 1.0 - agreement,
        "flips": flips,
        "correct_to_wrong": int(np.sum(base_correct & ~var_correct)),
        "wrong_to_correct": int(np.sum(~base_correct & var_correct)),
        "mean_kl_baseline_variant": float(kl.mean()),
        "per_class": per_class,
        "macro_f1_variant": macro_f1(gold, pred_var, k),
        "confusion_matrix": {"labels": label_names, "rows": "gold", "cols": "predicted",
                             "matrix": [[int(x) for x in row] for row in confusion]},  # fmt: skip
        "calibration_variant": _calibration(gold, p_var, n_bins),
        "calibration_baseline": _calibration(gold, p_base, n_bins),
        "mean_confidence_baseline": conf_base,
        "mean_confidence_variant": conf_var,
        "mean_confidence_change": conf_var - conf_base,
    }


def _resampled_metric(metric: str, gold: np.ndarray, pred: np.ndarray, idx: np.ndarray, k: int) -> np.ndarray:
    g, p = gold[idx], pred[idx]  # [r, n]
    if metric == "accuracy":
        return (g == p).mean(axis=1)
    # Per-resample class counts via one bincount over (resample, class) pairs.
    r = idx.shape[0]
    offset = (np.arange(r) * k)[:, None]
    tp = np.bincount((offset + g)[g == p], minlength=r * k).reshape(r, k)
    n_gold = np.bincount((offset + g).ravel(), minlength=r * k).reshape(r, k)
    n_pred = np.bincount((offset + p).ravel(), minlength=r * k).reshape(r, k)
    return _macro_f1_from_counts(tp, n_gold, n_pred)


def paired_bootstrap_delta(
    gold, baseline_pred, variant_pred, metric: str = "accuracy", n_resamples: int = 2000, seed: int = 0,
    confidence: float = 0.95,
) -> dict:  # fmt: skip
    """Paired bootstrap of metric(variant) - metric(baseline), resampling samples with replacement.

    metric is 'accuracy' or 'macro_f1' (see macro_f1). Returns metric, n, n_resamples, confidence,
    baseline, variant, delta (on all samples), ci_low and ci_high (percentile interval of the resampled
    deltas), within_noise (the interval contains 0).
    """
    if metric not in ("accuracy", "macro_f1"):
        raise ValueError(f"metric must be 'accuracy' or 'macro_f1', got {metric!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be positive, got {n_resamples}")
    gold = _labels("gold", gold)
    base, var = _labels("baseline_pred", baseline_pred), _labels("variant_pred", variant_pred)
    _same_length(gold=gold, baseline_pred=base, variant_pred=var)
    if min(gold.min(), base.min(), var.min()) < 0:
        raise ValueError("class indices must be non-negative")
    n, k = len(gold), int(max(gold.max(), base.max(), var.max())) + 1

    def full(pred):
        return float(np.mean(gold == pred)) if metric == "accuracy" else macro_f1(gold, pred, k)

    rng = np.random.default_rng(seed)
    deltas = []
    # Chunks keep the [resamples, n] index matrix small for large evaluation sets.
    chunk = max(1, min(n_resamples, 2_000_000 // n))
    for start in range(0, n_resamples, chunk):
        idx = rng.integers(0, n, size=(min(chunk, n_resamples - start), n))
        deltas.append(_resampled_metric(metric, gold, var, idx, k) - _resampled_metric(metric, gold, base, idx, k))
    deltas = np.concatenate(deltas)
    alpha = (1.0 - confidence) / 2.0
    ci_low, ci_high = (float(x) for x in np.quantile(deltas, [alpha, 1.0 - alpha]))
    baseline_value, variant_value = full(base), full(var)
    return {
        "metric": metric,
        "n": int(n),
        "n_resamples": int(n_resamples),
        "confidence": float(confidence),
        "baseline": baseline_value,
        "variant": variant_value,
        "delta": variant_value - baseline_value,
        "ci_low": ci_low,
        "ci_high": ci_high,
        "within_noise": bool(ci_low <= 0.0 <= ci_high),
    }


def mcnemar_exact(gold, baseline_pred, variant_pred, alpha: float = 0.05) -> dict:
    """Exact McNemar test: do baseline and variant err on different samples more than chance explains?

    b = samples the baseline gets right and the variant wrong, c = the reverse. p_value is the exact
    two-sided binomial test of b out of b + c at 1/2 (1.0 when b + c = 0). within_noise: p_value >= alpha.
    Returns b, c, n_discordant, p_value, alpha, within_noise.
    """
    from scipy.stats import binomtest

    gold = _labels("gold", gold)
    base, var = _labels("baseline_pred", baseline_pred), _labels("variant_pred", variant_pred)
    _same_length(gold=gold, baseline_pred=base, variant_pred=var)
    base_ok, var_ok = base == gold, var == gold
    b, c = int(np.sum(base_ok & ~var_ok)), int(np.sum(~base_ok & var_ok))
    p_value = float(binomtest(b, b + c, 0.5, alternative="two-sided").pvalue) if b + c else 1.0
    return {
        "b": b,
        "c": c,
        "n_discordant": b + c,
        "p_value": min(1.0, p_value),
        "alpha": float(alpha),
        "within_noise": bool(p_value >= alpha),
    }
