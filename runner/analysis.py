"""What quantization did to one variant's weights: errors per layer, grids, activation outliers.

Plain functions, no Ray and no I/O. Everything returned is JSON-ready (python floats, ints, lists,
dicts; never numpy scalars or tensors) except `dequantized_linear_weights`, whose tensors feed the
others. Float results are always finite: where a quantity is undefined (the SQNR of an unchanged
layer, ...) the value is None and the docstring says so. What the predictions did is in
`effects.py`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping

import numpy as np
import torch
from transformers.pytorch_utils import Conv1D

from runner import machine
from runner.layers import LAYER_TYPES, classify_layer
from runner.precisions import PRECISIONS, config_for, default_settings, worker_of
from runner.precisions.worker import REFERENCE, FamilyWorker

__all__ = [
    "dequantized_linear_weights",
    "layer_weight_errors",
    "layer_weight_errors_by_layer",
    "layer_output_errors",
    "summarise_layer_errors",
    "weight_histograms",
    "quantization_grid",
    "activation_outlier_columns",
    "input_outliers",
]

# Bins of the fixed histogram behind `changed_bucket_share`.
CHANGE_BINS = 256


# --------------------------------------------------------------------------------------------------
# Dequantized weights
# --------------------------------------------------------------------------------------------------


def dequantized_linear_weights(
    model: torch.nn.Module, family_worker: FamilyWorker
) -> dict[str, torch.Tensor]:
    """Float32 CPU weight, [out_features, in_features], of every linear-like layer, keyed by module
    name: the weight the layer really computes with, as the variant's precision family reads it
    back (family_worker, its FamilyWorker: nn.Linear in any float dtype and GPT-2 Conv1D for every
    family, and its own layers: torch dynamic-quantized Linear, bitsandbytes Linear8bitLt and
    Linear4bit, torchao tensors). An FP32 model is read with runner.precisions.worker.REFERENCE.
    """
    weights = {}
    for name, module in model.named_modules():
        w = family_worker.layer_weight(name, module)
        if w is not None:
            weights[name] = w
    return weights


# --------------------------------------------------------------------------------------------------
# Per-layer weight errors
# --------------------------------------------------------------------------------------------------


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
    _check_same_layers(reference_weights, variant_weights)
    rows = []
    for name, ref in reference_weights.items():
        var = variant_weights[name]
        if ref.shape != var.shape:
            raise ValueError(
                f"layer {name!r}: reference weight shape {tuple(ref.shape)} != variant "
                f"{tuple(var.shape)}"
            )
        layer_type, depth = classify_layer(name)
        rows.append(
            {"layer": name, "layer_type": layer_type, "depth": depth, **_layer_error(ref, var)}
        )
    return rows


def layer_weight_errors_by_layer(
    reference_weights: Mapping[str, torch.Tensor],
    variant_model: torch.nn.Module,
    family_worker: FamilyWorker,
) -> list[dict]:
    """layer_weight_errors(reference_weights, dequantized_linear_weights(variant_model, ...)),
    with each variant layer dequantized only while its row is computed: one layer's float32 copy
    at a time, never the whole model's."""
    rows, seen = {}, []
    for name, module in variant_model.named_modules():
        weight = family_worker.layer_weight(name, module)
        if weight is None:
            continue
        seen.append(name)
        if name in reference_weights:
            rows[name] = layer_weight_errors({name: reference_weights[name]}, {name: weight})[0]
        del weight  # before the next layer is dequantized
        machine.trim_heap()
    _check_same_layers(reference_weights, seen)
    return [rows[name] for name in reference_weights]


def _check_same_layers(reference_names: Iterable[str], variant_names: Iterable[str]) -> None:
    missing = sorted(set(reference_names) ^ set(variant_names))
    if missing:
        raise ValueError(
            "reference and variant hold different linear layers; present in only one of them: "
            f"{missing[:10]}" + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        )


# Weights a layer's error is summed over at a time: float64 temporaries of 32 MiB each, where a
# whole output layer (SmolLM2's: 28M weights) took several of 226 MiB.
ERROR_CHUNK = 2**22


def _layer_error(ref: torch.Tensor, var: torch.Tensor) -> dict:
    """One row of layer_weight_errors, from n_weights on; sums in float64, chunk by chunk."""
    w_all, wq_all = ref.detach().cpu().reshape(-1), var.detach().cpu().reshape(-1)
    n = w_all.numel()
    low, high = (float(w_all.min()), float(w_all.max())) if n else (0.0, 0.0)
    signal = noise = var_energy = cross = max_abs = 0.0
    moved = 0
    for start in range(0, n, ERROR_CHUNK):
        w = w_all[start : start + ERROR_CHUNK].to(torch.float64)
        wq = wq_all[start : start + ERROR_CHUNK].to(torch.float64)
        err = w - wq
        signal += float(torch.dot(w, w))
        noise += float(torch.dot(err, err))
        var_energy += float(torch.dot(wq, wq))
        cross += float(torch.dot(w, wq))
        max_abs = max(max_abs, float(err.abs().max()))
        bins = _bin_index(w, low, high, CHANGE_BINS) != _bin_index(wq, low, high, CHANGE_BINS)
        moved += int(bins.sum())
    identical = noise == 0.0
    if identical or signal == 0.0:
        sqnr = None  # identical: no noise; no signal: -inf, nothing to measure against
    else:
        sqnr = _finite_or_none(10.0 * math.log10(signal / noise))
    return {
        "n_weights": int(n),
        "identical": bool(identical),
        "sqnr_db": sqnr,
        "rel_l2": math.sqrt(noise / signal) if signal > 0 else None,
        "cosine": cross / math.sqrt(signal * var_energy) if signal * var_energy > 0 else None,
        "max_abs_error": max_abs,
        "changed_bucket_share": moved / n if n else 0.0,
    }


# --------------------------------------------------------------------------------------------------
# Per-layer output errors
# --------------------------------------------------------------------------------------------------

# Samples whose layer outputs are compared: a few batches show the error's size; more only costs.
OUTPUT_ERROR_SAMPLES = 64


def layer_output_errors(
    reference_model: torch.nn.Module,
    variant_model: torch.nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    max_samples: int = OUTPUT_ERROR_SAMPLES,
) -> dict[str, dict]:
    """The error of every linear layer's output, the variant's layer against the FP32 one, both
    given the same input: the input the FP32 layer receives in the FP32 model.

    Hooks on the reference model's layers feed each layer's input to the variant's layer of the
    same name too, so a row measures that layer alone (its weights and, for a dynamic precision,
    its activation quantization), not the error that earlier layers passed on. Runs the reference
    model (FP32, CPU) on the batches' first `max_samples` samples. Returns {layer: {output_sqnr_db
    = 10 log10(sum y^2 / sum (y - y_q)^2) (None when the outputs are equal), output_rel_l2 =
    ||y - y_q|| / ||y|| (None when ||y|| = 0), what the FP32 input looked like
    (input_outliers), and input_rounding_sqnr_db: the same SQNR for the FP32 layer given its input
    rounded to per-tensor int8 (_int8_per_tensor), the part of a dynamic precision's output
    error that the input's rounding alone makes (None where it makes none)}}, sums in float64.
    """
    variant_layers = dict(variant_model.named_modules())
    # Where a layer holds no float tensor to say (a quantized weight, no bias): the model's device.
    device = next(
        (t.device for t in [*variant_model.parameters(), *variant_model.buffers()]),
        torch.device("cpu"),
    )
    sums: dict[str, list[float]] = {}  # layer: [signal, noise, noise of the input's rounding]
    column_max: dict[str, torch.Tensor] = {}  # layer: max |x| of each input column
    linear = REFERENCE.linear_classes()  # the reference is an FP32 model
    handles = [
        module.register_forward_hook(
            _compare_output(name, variant_layers[name], device, sums, column_max)
        )
        for name, module in reference_model.named_modules()
        if isinstance(module, linear) and name in variant_layers
    ]
    try:
        with torch.inference_mode():
            for batch in _first_samples(batches, max_samples):
                reference_model(**{k: v.cpu() for k, v in batch.items()})
    finally:
        for handle in handles:
            handle.remove()
    return {
        name: {
            **_output_error(signal, noise),
            **input_outliers(column_max[name]),
            "input_rounding_sqnr_db": _output_error(signal, rounding)["output_sqnr_db"],
        }
        for name, (signal, noise, rounding) in sums.items()
    }


def _compare_output(
    name: str, variant_layer: torch.nn.Module, model_device, sums: dict, column_max: dict
):
    """A forward hook that runs variant_layer on the reference layer's input and adds up the
    energy of the reference output, of the difference, and of the difference the input's
    per-tensor int8 rounding alone makes; and keeps each input column's max |x|."""
    device, dtype = _input_device_and_dtype(variant_layer, model_device)

    def hook(module, args, output):
        machine.trim_heap()  # the layers before: their outputs' and sums' temporaries
        x, y = args[0].detach(), output.detach()
        total = sums.setdefault(name, [0.0, 0.0, 0.0])
        # One compared output at a time beside FP32's: at an output layer each is [tokens,
        # vocabulary].
        y_q = variant_layer(x.to(device=device, dtype=dtype)).detach()
        _add_energies(total, y, y_q, noise_at=1, signal=True)
        del y_q
        # forward(), not the module: calling it would run this hook again.
        _add_energies(total, y, module.forward(_int8_per_tensor(x)).detach(), noise_at=2)
        columns = x.abs().reshape(-1, x.shape[-1]).amax(dim=0).to(device="cpu", dtype=torch.float64)
        seen = column_max.get(name)
        column_max[name] = columns if seen is None else torch.maximum(seen, columns)

    return hook


def _add_energies(total: list[float], y, other, noise_at: int, signal: bool = False) -> None:
    """Adds sum((y - other)^2) to total[noise_at], and sum(y^2) to total[0] where signal, a
    float64 chunk at a time, in the chunks' order."""
    for y_part, other_part in _float64_rows(y, other):
        err = y_part - other_part
        if signal:
            total[0] += float((y_part * y_part).sum())
        total[noise_at] += float((err * err).sum())


# Output values a hook sums over at a time, in float64 (8 MiB each): an output layer's output on
# one batch (8 windows of 64 tokens x 49152 logits for SmolLM2) is 200 MiB in float64.
OUTPUT_CHUNK = 2**20


def _float64_rows(*outputs: torch.Tensor):
    """The outputs' rows (last dimension whole), a chunk of about OUTPUT_CHUNK values at a time,
    each in float64 on the CPU: sums over a layer's output without a float64 copy of all of it."""
    width = outputs[0].shape[-1]
    rows = [output.reshape(-1, width) for output in outputs]
    step = max(1, OUTPUT_CHUNK // width)
    for start in range(0, rows[0].shape[0], step):
        yield [part[start : start + step].to(device="cpu", dtype=torch.float64) for part in rows]


def _int8_per_tensor(x: torch.Tensor) -> torch.Tensor:
    """x rounded to symmetric int8 with one scale, max|x| / 127, as a dynamic per-tensor
    activation quantization rounds one forward call's input."""
    scale = x.abs().max() / 127
    if scale == 0:
        return x
    return torch.round(x / scale).clamp(-127, 127) * scale


# LLM.int8()'s outlier threshold (bitsandbytes' llm_int8_threshold default): input columns with
# |x| at or above it are the ones its mixed-precision matmul keeps in 16-bit.
LLM_INT8_THRESHOLD = 6.0
# How many of a layer's largest input columns a row names.
TOP_COLUMNS = 3


def input_outliers(column_max: torch.Tensor) -> dict:
    """What a layer's input looked like, from the max |x| of each input column over every token
    seen: input_absmax (the largest |x|), input_outlier_ratio (the largest column max over the
    median column's; None where the median column is all zeros), input_outlier_columns (how many
    columns reach LLM_INT8_THRESHOLD) and input_top_columns (the TOP_COLUMNS largest columns'
    indices, largest first).

    A per-tensor activation scale is set by the largest column: at a ratio r the median column
    keeps about 1/r of the int8 grid's levels, which is why a few huge columns ruin the rest.
    """
    median = float(column_max.median())
    top = torch.argsort(column_max, descending=True, stable=True)[:TOP_COLUMNS]
    absmax = float(column_max.max())
    return {
        "input_absmax": absmax,
        "input_outlier_ratio": _finite_or_none(absmax / median) if median > 0 else None,
        "input_outlier_columns": int((column_max >= LLM_INT8_THRESHOLD).sum()),
        "input_top_columns": [int(i) for i in top],
    }


def _input_device_and_dtype(layer: torch.nn.Module, model_device) -> tuple:
    """Where and in what float dtype the layer takes its input: that of its first float tensor
    (a bias or an fp16 weight); float32 on the model's device for a layer holding only quantized
    tensors (torch.ao's packed Linear)."""
    for tensor in [*layer.parameters(), *layer.buffers()]:
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return model_device, torch.float32


def _first_samples(batches: Iterable[Mapping[str, torch.Tensor]], max_samples: int):
    seen = 0
    for batch in batches:
        if seen >= max_samples:
            return
        take = max_samples - seen
        batch = {k: v[:take] for k, v in batch.items()}
        seen += len(next(iter(batch.values())))
        yield batch


def _output_error(signal: float, noise: float) -> dict:
    if noise == 0.0 or signal == 0.0:
        sqnr = None  # equal outputs: no noise; no signal: nothing to measure against
    else:
        sqnr = _finite_or_none(10.0 * math.log10(signal / noise))
    return {
        "output_sqnr_db": sqnr,
        "output_rel_l2": math.sqrt(noise / signal) if signal > 0 else None,
    }


def _summarise_group(rows: list[dict]) -> dict:
    def values(key):  # results written before output errors were measured lack theirs
        return [r[key] for r in rows if r.get(key) is not None]

    sqnr, rel, cos = values("sqnr_db"), values("rel_l2"), values("cosine")
    out_sqnr, out_rel = values("output_sqnr_db"), values("output_rel_l2")
    ratios, rounding = values("input_outlier_ratio"), values("input_rounding_sqnr_db")
    n_weights = sum(r["n_weights"] for r in rows)
    return {
        "n_layers": len(rows),
        "n_weights": n_weights,
        "n_identical": sum(1 for r in rows if r["identical"]),
        "mean_sqnr_db": sum(sqnr) / len(sqnr) if sqnr else None,
        "min_sqnr_db": min(sqnr) if sqnr else None,
        "mean_rel_l2": sum(rel) / len(rel) if rel else None,
        "mean_cosine": sum(cos) / len(cos) if cos else None,
        "mean_output_sqnr_db": sum(out_sqnr) / len(out_sqnr) if out_sqnr else None,
        "min_output_sqnr_db": min(out_sqnr) if out_sqnr else None,
        "mean_output_rel_l2": sum(out_rel) / len(out_rel) if out_rel else None,
        "max_input_outlier_ratio": max(ratios) if ratios else None,
        "mean_input_rounding_sqnr_db": sum(rounding) / len(rounding) if rounding else None,
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
    changed; None if none did), mean_rel_l2, mean_cosine, mean_output_sqnr_db,
    min_output_sqnr_db, mean_output_rel_l2, max_input_outlier_ratio and
    mean_input_rounding_sqnr_db (from the rows' layer_output_errors, where they have them),
    max_abs_error (max over layers),
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
    (bins + 1 floats spanning that type's [min, max]), counts (bins ints)}}}. Reads the weights
    twice, one layer at a time (for each type's range, then its counts), never holding all of
    them: reference_weights may read each from the checkpoint as it is asked for.
    """
    if bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins}")
    ranges: dict[str, dict] = {}
    for name, w in reference_weights.items():
        seen = ranges.setdefault(
            classify_layer(name)[0], {"n_layers": 0, "n_weights": 0, "min": [], "max": []}
        )
        seen["n_layers"] += 1
        seen["n_weights"] += int(w.numel())
        seen["min"].append(float(w.min()))
        seen["max"].append(float(w.max()))
    counts: dict[str, np.ndarray] = {layer_type: np.zeros(bins, np.int64) for layer_type in ranges}
    for name, w in reference_weights.items():
        layer_type = classify_layer(name)[0]
        low, high = min(ranges[layer_type]["min"]), max(ranges[layer_type]["max"])
        counts[layer_type] += _layer_histogram(w.detach().cpu().reshape(-1), bins, low, high)
    out = {}
    for layer_type in LAYER_TYPES:
        if layer_type not in ranges:
            continue
        seen = ranges[layer_type]
        low, high = min(seen["min"]), max(seen["max"])
        edges = np.histogram_bin_edges(np.zeros(0), bins=bins, range=(low, high))
        out[layer_type] = {
            "n_layers": seen["n_layers"],
            "n_weights": seen["n_weights"],
            "min": low,
            "max": high,
            "edges": [float(e) for e in edges],
            "counts": [int(c) for c in counts[layer_type]],
        }
    return {"bins": int(bins), "by_layer_type": out}


def _layer_histogram(w: torch.Tensor, bins: int, low: float, high: float) -> np.ndarray:
    """np.histogram's counts of one layer's weights over [low, high]: each value's bin depends on
    that range alone, so counting a chunk at a time (in float64) and adding the layers' counts
    gives the pooled counts without a float64 copy of any whole layer."""
    counts = np.zeros(bins, dtype=np.int64)
    for start in range(0, w.numel(), ERROR_CHUNK):
        chunk = w[start : start + ERROR_CHUNK].to(torch.float64).numpy()
        counts += np.histogram(chunk, bins=bins, range=(low, high))[0]
    return counts


def make_grid(precision, scheme, granularity, codes, group_scales, block_size=None) -> dict:
    """A grid record: the normalised codes, and the scales of the groups (tensor, rows or blocks)
    that multiply them. A family's `grid` builds one."""
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


def layer_matrix(weight: torch.Tensor) -> torch.Tensor:
    """A layer weight as a CPU [out, in] matrix, for the grid functions, in its own dtype: a
    grid needs only the weight's scales, which absmax, row_blocks and flat_block_absmax take a
    block at a time, so no float64 copy of a whole output layer is made (Gemma's: 640 MiB in
    FP32). Raises ValueError for anything else."""
    w = weight.detach().cpu()
    if w.dim() != 2 or w.numel() == 0:
        raise ValueError(
            f"expected a non-empty 2-D [out, in] weight, got shape {tuple(weight.shape)}"
        )
    return w


def row_blocks(w: torch.Tensor) -> Iterator[torch.Tensor]:
    """The rows of a [out, in] weight in order, as float64 blocks of ERROR_CHUNK weights (at least
    one row). Scales per row or per group within a row, taken block by block and concatenated,
    are the whole weight's to the bit."""
    rows = max(1, ERROR_CHUNK // w.shape[1])
    for start in range(0, w.shape[0], rows):
        yield w[start : start + rows].to(torch.float64)


def absmax(w: torch.Tensor) -> torch.Tensor:
    """max |w| over the whole weight, a float64 scalar tensor, a block of rows at a time."""
    return torch.stack([rows.abs().max() for rows in row_blocks(w)]).max()


def flat_block_absmax(w: torch.Tensor, block_size: int) -> torch.Tensor:
    """max |w| of each block of block_size consecutive weights of the flattened weight (the last
    block zero-padded), in float64, ERROR_CHUNK weights at a time: bitsandbytes' 4-bit blocks."""
    flat = w.reshape(-1)
    step = max(1, ERROR_CHUNK // block_size) * block_size  # whole blocks, so only the last pads
    parts = []
    for start in range(0, flat.numel(), step):
        chunk = flat[start : start + step].to(torch.float64).abs()
        pad = (-chunk.numel()) % block_size
        parts.append(torch.nn.functional.pad(chunk, (0, pad)).reshape(-1, block_size).amax(dim=1))
    return torch.cat(parts)


def quantization_grid(
    precision: str, weight: torch.Tensor, settings: Mapping | None = None
) -> dict | None:
    """Values a precision can represent at the scale of one FP32 layer weight, as its family's
    worker draws them; None for fp32/fp16/bf16. settings: the job's flat settings (None: the
    defaults), which shape some grids (torchao's int4 group size).

    Returns precision, scheme, granularity (tensor | row | block | group), block_size, n_groups,
    codes (the normalised levels), group scales (scale_min, scale_median, scale_max), and values =
    codes * scale_max: the grid of the group holding the layer's largest |w|. Other rows/blocks use
    the same codes times their own, smaller scale.
    """
    if precision not in PRECISIONS:
        known = list(PRECISIONS)
        raise ValueError(f"no quantization grid for precision {precision!r}; known: {known}")
    declared = PRECISIONS[precision]
    config = config_for(declared, default_settings() if settings is None else settings)
    return worker_of(declared).grid(declared, config, weight)


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

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            in_features = module.in_features
        elif isinstance(module, Conv1D):
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
