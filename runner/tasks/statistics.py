"""Paired statistics the tasks' comparisons share: is a difference between two variants on the same
samples beyond noise? A paired bootstrap of a metric's delta, McNemar's exact test, and macro-F1.

Plain functions of numpy arrays, no torch, no Ray and no I/O: collect computes them without
importing torch. Everything returned is JSON-ready (python floats, ints, lists, dicts). Float
results are always finite: where a quantity is undefined the value is None and the docstring says
so.
"""

from __future__ import annotations

import numpy as np
from scipy.special import bdtr  # the binomial CDF; scipy.stats would cost 2 s of import


def class_indices(name: str, values, n_classes: int | None = None) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of class indices, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer) and not np.all(np.mod(arr, 1) == 0):
        raise ValueError(f"{name} must hold integer class indices, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if n_classes is not None and arr.size and (arr.min() < 0 or arr.max() >= n_classes):
        raise ValueError(
            f"{name} holds class indices outside 0..{n_classes - 1}: min {arr.min()}, max "
            f"{arr.max()}"
        )
    return arr


def same_length(**arrays):
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
    """Unweighted mean F1 over the classes that occur in gold or in pred (as sklearn's
    average='macro').

    A class absent from both would score 0/0 and is left out rather than counted as 0 or 1.
    """
    gold, pred = class_indices("gold", gold, n_classes), class_indices("pred", pred, n_classes)
    same_length(gold=gold, pred=pred)
    tp = np.bincount(gold[gold == pred], minlength=n_classes)
    n_gold, n_pred = np.bincount(gold, minlength=n_classes), np.bincount(pred, minlength=n_classes)
    return float(_macro_f1_from_counts(tp, n_gold, n_pred))


def _resampled_metric(
    metric: str, gold: np.ndarray, pred: np.ndarray, idx: np.ndarray, k: int
) -> np.ndarray:
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
    gold,
    baseline_pred,
    variant_pred,
    metric: str = "accuracy",
    n_resamples: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict:
    """Paired bootstrap of metric(variant) - metric(baseline), resampling samples with replacement.

    metric is 'accuracy' or 'macro_f1' (see macro_f1). Returns metric, n, n_resamples, confidence,
    baseline, variant, delta (on all samples), ci_low and ci_high (percentile interval of the
    resampled deltas), within_noise (the interval contains 0).
    """
    if metric not in ("accuracy", "macro_f1"):
        raise ValueError(f"metric must be 'accuracy' or 'macro_f1', got {metric!r}")
    _check_bootstrap(n_resamples, confidence)
    gold = class_indices("gold", gold)
    base, var = (
        class_indices("baseline_pred", baseline_pred),
        class_indices("variant_pred", variant_pred),
    )
    same_length(gold=gold, baseline_pred=base, variant_pred=var)
    if min(gold.min(), base.min(), var.min()) < 0:
        raise ValueError("class indices must be non-negative")
    n, k = len(gold), int(max(gold.max(), base.max(), var.max())) + 1

    def full(pred):
        return float(np.mean(gold == pred)) if metric == "accuracy" else macro_f1(gold, pred, k)

    deltas = _resampled_deltas(metric, gold, base, var, k, n_resamples, seed)
    return _bootstrap_interval(metric, n, deltas, confidence, full(base), full(var))


def _bootstrap_interval(
    metric: str, n: int, deltas: np.ndarray, confidence: float, baseline: float, variant: float
) -> dict:
    """A paired bootstrap's record: the values on all samples, their delta and the percentile
    interval of the resampled deltas; within_noise when it holds 0."""
    alpha = (1.0 - confidence) / 2.0
    ci_low, ci_high = (float(x) for x in np.quantile(deltas, [alpha, 1.0 - alpha]))
    return {
        "metric": metric,
        "n": int(n),
        "n_resamples": len(deltas),
        "confidence": float(confidence),
        "baseline": baseline,
        "variant": variant,
        "delta": variant - baseline,
        "ci_low": ci_low,
        "ci_high": ci_high,
        "within_noise": bool(ci_low <= 0.0 <= ci_high),
    }


def _check_bootstrap(n_resamples: int, confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be positive, got {n_resamples}")


def _resampled_deltas(
    metric: str,
    gold: np.ndarray,
    base: np.ndarray,
    var: np.ndarray,
    k: int,
    n_resamples: int,
    seed: int,
) -> np.ndarray:
    """metric(variant) - metric(baseline) on n_resamples resamples of the samples, seeded."""
    return np.concatenate(
        [
            _resampled_metric(metric, gold, var, idx, k)
            - _resampled_metric(metric, gold, base, idx, k)
            for idx in _resample_indices(len(gold), n_resamples, seed)
        ]
    )


def _resample_indices(n: int, n_resamples: int, seed: int):
    """n_resamples seeded resamples of range(n) with replacement, as [resamples, n] index
    matrices in chunks, so that the matrix stays small for large evaluation sets."""
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_resamples, 2_000_000 // n))
    for start in range(0, n_resamples, chunk):
        yield rng.integers(0, n, size=(min(chunk, n_resamples - start), n))


def mcnemar_exact(gold, baseline_pred, variant_pred, alpha: float = 0.05) -> dict:
    """Exact McNemar test: do baseline and variant err on different samples more than chance
    explains?

    b = samples the baseline gets right and the variant wrong, c = the reverse. p_value is the exact
    two-sided binomial test of b out of b + c at 1/2 (1.0 when b + c = 0). within_noise: p_value >=
    alpha. Returns b, c, n_discordant, p_value, alpha, within_noise.
    """
    gold = class_indices("gold", gold)
    base, var = (
        class_indices("baseline_pred", baseline_pred),
        class_indices("variant_pred", variant_pred),
    )
    same_length(gold=gold, baseline_pred=base, variant_pred=var)
    base_ok, var_ok = base == gold, var == gold
    b, c = int(np.sum(base_ok & ~var_ok)), int(np.sum(~base_ok & var_ok))
    # At 1/2 the binomial is symmetric: the two-sided exact p is twice the smaller tail (scipy's
    # binomtest).
    p_value = min(1.0, 2.0 * float(bdtr(min(b, c), b + c, 0.5))) if b + c else 1.0
    return {
        "b": b,
        "c": c,
        "n_discordant": b + c,
        "p_value": p_value,
        "alpha": float(alpha),
        "within_noise": bool(p_value >= alpha),
    }


def paired_bootstrap_perplexity(
    tokens,
    baseline_nll,
    variant_nll,
    n_resamples: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict:
    """Paired bootstrap of perplexity(variant) - perplexity(baseline) over a causal LM's windows.

    tokens: each window's scored tokens; baseline_nll, variant_nll: each window's summed NLL in
    nats, the same windows in the same order. Window indices are resampled with replacement, the
    same ones for both sides, and each side's perplexity is recomputed token-weighted on the
    resample, exp(sum nll / sum tokens), as on all windows. Returns metric ("perplexity"), n
    (windows), n_resamples, confidence, baseline, variant, delta (on all windows), ci_low and
    ci_high (percentile interval of the resampled deltas), within_noise (the interval contains 0).
    """
    _check_bootstrap(n_resamples, confidence)
    tokens = np.asarray(tokens, dtype=np.float64)
    base = np.asarray(baseline_nll, dtype=np.float64)
    var = np.asarray(variant_nll, dtype=np.float64)
    same_length(tokens=tokens, baseline_nll=base, variant_nll=var)
    if tokens.ndim != 1 or tokens.min() <= 0:
        raise ValueError(
            f"tokens must be a 1-D array of positive counts, got {tokens.tolist()[:5]}"
        )
    if not (np.all(np.isfinite(base)) and np.all(np.isfinite(var))):
        raise ValueError("baseline_nll and variant_nll must be finite")
    deltas = _resampled_perplexity_deltas(tokens, base, var, n_resamples, seed)
    baseline_value = float(np.exp(base.sum() / tokens.sum()))
    variant_value = float(np.exp(var.sum() / tokens.sum()))
    return _bootstrap_interval(
        "perplexity", len(tokens), deltas, confidence, baseline_value, variant_value
    )


def _resampled_perplexity_deltas(
    tokens: np.ndarray, base: np.ndarray, var: np.ndarray, n_resamples: int, seed: int
) -> np.ndarray:
    """perplexity(variant) - perplexity(baseline) on n_resamples seeded resamples of the windows."""
    deltas = []
    for idx in _resample_indices(len(tokens), n_resamples, seed):
        counted = tokens[idx].sum(axis=1)
        deltas.append(
            np.exp(var[idx].sum(axis=1) / counted) - np.exp(base[idx].sum(axis=1) / counted)
        )
    return np.concatenate(deltas)


def paired_bootstrap_mean(
    baseline_values,
    variant_values,
    n_resamples: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict:
    """Paired bootstrap of mean(variant) - mean(baseline) over per-item scores (a benchmark's
    0/1 correctness, or any number per item), the same items in the same order on both sides.

    Item indices are resampled with replacement, the same ones for both sides. Returns metric
    ("mean"), n, n_resamples, confidence, baseline, variant, delta (on all items), ci_low and
    ci_high (percentile interval of the resampled deltas), within_noise (the interval contains 0).
    """
    _check_bootstrap(n_resamples, confidence)
    base = np.asarray(baseline_values, dtype=np.float64)
    var = np.asarray(variant_values, dtype=np.float64)
    same_length(baseline_values=base, variant_values=var)
    if not (np.all(np.isfinite(base)) and np.all(np.isfinite(var))):
        raise ValueError("baseline_values and variant_values must be finite")
    differences = var - base  # the mean of a resample's differences is its delta of means
    indices = _resample_indices(len(differences), n_resamples, seed)
    deltas = np.concatenate([differences[idx].mean(axis=1) for idx in indices])
    return _bootstrap_interval(
        "mean", len(differences), deltas, confidence, float(base.mean()), float(var.mean())
    )
