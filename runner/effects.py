"""What quantization did to the predictions: flips, calibration, per-class scores, and whether a
difference between two variants is beyond noise (paired bootstrap, McNemar's exact test).

Plain functions of numpy arrays, no torch, no Ray and no I/O: the driver uses them for `collect`
without importing torch. Everything returned is JSON-ready (python floats, ints, lists, dicts).
Float results are always finite: where a quantity is undefined (the precision of a class never
predicted, ...) the value is None and the docstring says so.
"""

from __future__ import annotations

import numpy as np


def _labels(name: str, values, n_classes: int | None = None) -> np.ndarray:
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
    """Unweighted mean F1 over the classes that occur in gold or in pred (as sklearn's
    average='macro').

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
        raise ValueError(
            f"{name} must have shape [n, {n_classes}] (one column per label name), got {arr.shape}"
        )
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
        bins.append(
            {
                "lo": b / n_bins,
                "hi": (b + 1) / n_bins,
                "count": count,
                "mean_confidence": mean_conf,
                "accuracy": accuracy,
            }
        )
    return {"ece": float(ece), "n_bins": int(n_bins), "bins": bins}


def prediction_effects(gold, baseline_probs, variant_probs, label_names, n_bins: int = 10) -> dict:
    """How the variant's predictions differ from the baseline's on the same samples.

    Returns n, accuracy_baseline, accuracy_variant, agreement (same predicted label), flip_rate,
    flips [{from, to, count}] (baseline label -> variant label, most frequent first),
    correct_to_wrong, wrong_to_correct, mean_kl_baseline_variant (KL(baseline || variant) in nats,
    averaged over samples; probabilities are floored at 1e-12 so it stays finite), per_class
    [{label, precision, recall, f1, support}] for the variant (precision None when the class is
    never predicted, recall None with no support), macro_f1_variant, confusion_matrix {labels, rows:
    "gold", cols: "predicted", matrix}, calibration_variant / calibration_baseline {ece, n_bins,
    bins [{lo, hi, count, mean_confidence, accuracy}]} over max-probability confidence,
    mean_confidence_baseline, mean_confidence_variant and mean_confidence_change (variant -
    baseline, in probability units).
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins}")
    label_names = [str(n) for n in label_names]
    k = len(label_names)
    gold = _labels("gold", gold, k)
    p_base, p_var = (
        _probs("baseline_probs", baseline_probs, k),
        _probs("variant_probs", variant_probs, k),
    )
    _same_length(gold=gold, baseline_probs=p_base, variant_probs=p_var)
    pred_base, pred_var = p_base.argmax(axis=1), p_var.argmax(axis=1)
    base_correct, var_correct = pred_base == gold, pred_var == gold
    conf_base, conf_var = float(p_base.max(axis=1).mean()), float(p_var.max(axis=1).mean())
    agreement = float(np.mean(pred_base == pred_var))
    confusion = np.bincount(gold * k + pred_var, minlength=k * k).reshape(k, k)
    return {
        "n": len(gold),
        "accuracy_baseline": float(base_correct.mean()),
        "accuracy_variant": float(var_correct.mean()),
        "agreement": agreement,
        "flip_rate": 1.0 - agreement,
        "flips": _flips(pred_base, pred_var, label_names),
        "correct_to_wrong": int(np.sum(base_correct & ~var_correct)),
        "wrong_to_correct": int(np.sum(~base_correct & var_correct)),
        "mean_kl_baseline_variant": _mean_kl(p_base, p_var),
        "per_class": _per_class(confusion, label_names),
        "macro_f1_variant": macro_f1(gold, pred_var, k),
        "confusion_matrix": _confusion_json(confusion, label_names),
        "calibration_variant": _calibration(gold, p_var, n_bins),
        "calibration_baseline": _calibration(gold, p_base, n_bins),
        "mean_confidence_baseline": conf_base,
        "mean_confidence_variant": conf_var,
        "mean_confidence_change": conf_var - conf_base,
    }


def _confusion_json(confusion: np.ndarray, label_names: list[str]) -> dict:
    matrix = [[int(x) for x in row] for row in confusion]
    return {"labels": label_names, "rows": "gold", "cols": "predicted", "matrix": matrix}


def _flips(pred_base: np.ndarray, pred_var: np.ndarray, label_names: list[str]) -> list[dict]:
    """[{from, to, count}] of the samples whose label changed, most frequent first."""
    k = len(label_names)
    transitions = np.bincount(pred_base * k + pred_var, minlength=k * k).reshape(k, k)
    flips = [
        {"from": label_names[a], "to": label_names[b], "count": int(transitions[a, b])}
        for a in range(k)
        for b in range(k)
        if a != b and transitions[a, b]
    ]
    flips.sort(key=lambda f: -f["count"])
    return flips


def _mean_kl(p_base: np.ndarray, p_var: np.ndarray, eps: float = 1e-12) -> float:
    """KL(baseline || variant) in nats, averaged over samples; floored at eps to stay finite."""
    p, q = np.clip(p_base, eps, None), np.clip(p_var, eps, None)
    return float(np.sum(p_base * (np.log(p) - np.log(q)), axis=1).mean())


def _per_class(confusion: np.ndarray, label_names: list[str]) -> list[dict]:
    """Precision, recall, F1 and support per class from a confusion matrix (rows gold)."""
    per_class = []
    for c, label in enumerate(label_names):
        tp, predicted, support = (
            int(confusion[c, c]),
            int(confusion[:, c].sum()),
            int(confusion[c, :].sum()),
        )
        precision = tp / predicted if predicted else None
        recall = tp / support if support else None
        f1 = 2 * tp / (predicted + support) if predicted + support else None
        per_class.append(
            {"label": label, "precision": precision, "recall": recall, "f1": f1, "support": support}
        )
    return per_class


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
    gold = _labels("gold", gold)
    base, var = _labels("baseline_pred", baseline_pred), _labels("variant_pred", variant_pred)
    _same_length(gold=gold, baseline_pred=base, variant_pred=var)
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
    rng = np.random.default_rng(seed)
    n, deltas = len(gold), []
    # Chunks keep the [resamples, n] index matrix small for large evaluation sets.
    chunk = max(1, min(n_resamples, 2_000_000 // n))
    for start in range(0, n_resamples, chunk):
        idx = rng.integers(0, n, size=(min(chunk, n_resamples - start), n))
        deltas.append(
            _resampled_metric(metric, gold, var, idx, k)
            - _resampled_metric(metric, gold, base, idx, k)
        )
    return np.concatenate(deltas)


def mcnemar_exact(gold, baseline_pred, variant_pred, alpha: float = 0.05) -> dict:
    """Exact McNemar test: do baseline and variant err on different samples more than chance
    explains?

    b = samples the baseline gets right and the variant wrong, c = the reverse. p_value is the exact
    two-sided binomial test of b out of b + c at 1/2 (1.0 when b + c = 0). within_noise: p_value >=
    alpha. Returns b, c, n_discordant, p_value, alpha, within_noise.
    """
    from scipy.special import (
        bdtr,
    )  # the binomial CDF; scipy.stats would cost 2 s of import per collect

    gold = _labels("gold", gold)
    base, var = _labels("baseline_pred", baseline_pred), _labels("variant_pred", variant_pred)
    _same_length(gold=gold, baseline_pred=base, variant_pred=var)
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
    _same_length(tokens=tokens, baseline_nll=base, variant_nll=var)
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
    rng = np.random.default_rng(seed)
    n, deltas = len(tokens), []
    chunk = max(1, min(n_resamples, 2_000_000 // n))  # a small [resamples, n] index matrix
    for start in range(0, n_resamples, chunk):
        idx = rng.integers(0, n, size=(min(chunk, n_resamples - start), n))
        counted = tokens[idx].sum(axis=1)
        deltas.append(
            np.exp(var[idx].sum(axis=1) / counted) - np.exp(base[idx].sum(axis=1) / counted)
        )
    return np.concatenate(deltas)
