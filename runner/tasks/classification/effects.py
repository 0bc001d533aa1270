"""What quantization did to a classifier's predictions: flips, calibration, per-class scores and the
KL between two variants' class probabilities, on the same samples.

Plain functions of numpy arrays (runner/tasks/statistics.py has the paired tests). Everything
returned is JSON-ready; where a quantity is undefined (the precision of a class never predicted,
...) the value is None and the docstring says so.
"""

from __future__ import annotations

import numpy as np

from runner.tasks.statistics import class_indices, macro_f1, same_length


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
    gold = class_indices("gold", gold, k)
    p_base, p_var = (
        _probs("baseline_probs", baseline_probs, k),
        _probs("variant_probs", variant_probs, k),
    )
    same_length(gold=gold, baseline_probs=p_base, variant_probs=p_var)
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
