"""A classifier's part of `collect`: its metric rows and what its predictions say against the
baseline's (agreement and flips, KL divergence, calibration, and whether the accuracy and macro-F1
deltas are beyond noise: a paired bootstrap and McNemar's exact test).

Everything is computed from the per-sample predictions each result keeps, matched by label name.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runner.records import Record
from runner.schema import Result
from runner.tasks import statistics
from runner.tasks.classification import effects
from runner.tasks.task import (
    ALPHA,
    BOOTSTRAP,
    NOISE_MARK,
    Check,
    Compared,
    Row,
    Tolerance,
    metric,
    sample_note,
)


@dataclass
class LabelPredictions(Record):
    """A classifier's per-sample predictions, in sample order, with the label names of the model's
    classes (result.predictions)."""

    labels: list[str] | None = None
    gold: list[str] | None = None
    predicted: list[str] | None = None
    confidence: list[float] | None = None
    probabilities: list[list[float]] | None = None

    @classmethod
    def invariant(cls, data: dict, where: str) -> str | None:
        """As many predicted labels as gold ones, one probability per label in every row."""
        gold, predicted = data.get("gold") or [], data.get("predicted") or []
        labels = data.get("labels") or []
        if data.get("predicted") is not None and len(gold) != len(predicted):
            return f"{where}: {len(gold)} gold labels but {len(predicted)} predicted"
        ragged = [
            i for i, row in enumerate(data.get("probabilities") or []) if len(row) != len(labels)
        ]
        if ragged:
            return (
                f"{where}.probabilities[{ragged[0]}]: {len(labels)} values expected, one per label"
            )
        return None


def _effect(name: str):
    return lambda r, s: (s.get("effects") or {}).get(name)


def _delta_of(metric_name: str):
    return lambda r, s: ((s.get("significance") or {}).get(metric_name) or {}).get("delta")


def _mcnemar(name: str):
    return lambda r, s: ((s.get("significance") or {}).get("mcnemar") or {}).get(name)


ROWS = (
    Row("accuracy", metric("accuracy"), 4, noise="accuracy", carries_warnings=True),
    Row("avg confidence", metric("avg_confidence"), 4),
    Row("macro-F1", metric("macro_f1"), 4, noise="macro_f1"),
    Row("agreement with baseline", lambda r, s: s.get("agreement"), 4, delta=False),
    Row(
        "flip rate",
        lambda r, s: None if s.get("agreement") is None else 1.0 - s["agreement"],
        4,
        delta=False,
    ),
    Row("flips correct→wrong", _mcnemar("b"), 0, delta=False),
    Row("flips wrong→correct", _mcnemar("c"), 0, delta=False),
    Row(
        "accuracy Δ vs baseline (abs)",
        _delta_of("accuracy"),
        4,
        delta=False,
        signed=True,
        noise="accuracy",
    ),
    Row(
        "macro-F1 Δ vs baseline (abs)",
        _delta_of("macro_f1"),
        4,
        delta=False,
        signed=True,
        noise="macro_f1",
    ),
    Row("McNemar p", _mcnemar("p_value"), None, delta=False),
    Row("KL vs baseline (nats)", _effect("mean_kl_baseline_variant"), None, delta=False),
    Row("ECE", lambda r, s: (s.get("calibration") or {}).get("ece"), 4, delta=False),
    Row("confidence change (abs)", _effect("mean_confidence_change"), 4, delta=False, signed=True),
)


# ---------------------------------------------------------------------------------------------
# Statistics: one plain dict per variant.


def compare(result: Result, baseline: Result | None) -> Compared:
    """{agreement, effects, significance, calibration, confusion_matrix, per_class}.

    effects: effects.prediction_effects against the baseline, plus flipped_samples [{index, gold,
    from, to}]; significance: paired bootstrap intervals of the accuracy and macro-F1 deltas,
    McNemar's exact test and within_noise per metric. Both are None for the baseline's own
    significance, for results without predictions and for results on another sample than the
    baseline's. calibration (ECE and its bins), confusion_matrix and per_class describe the variant
    on its own, baseline or not.
    """
    stats = {
        "agreement": None,
        "effects": None,
        "significance": None,
        "calibration": None,
        "confusion_matrix": None,
        "per_class": None,
    }
    own = _encoded(result, result) if result.status == "ok" else None
    if own is not None and own["probs"] is not None:
        alone = effects.prediction_effects(own["gold"], own["probs"], own["probs"], own["labels"])
        stats.update(
            calibration=alone["calibration_variant"],
            confusion_matrix=alone["confusion_matrix"],
            per_class=alone["per_class"],
        )
    if own is None or baseline is None:
        return Compared(stats)
    paired, note = _paired(result, baseline)
    if paired is not None:
        stats.update(_against_baseline(paired, result is baseline))
    return Compared(stats, [note] if note else [])


def _encoded(result: Result, reference: Result) -> dict | None:
    """A result's predictions as class indices in `reference`'s label order (None when they cannot
    be)."""
    preds = result.predictions or LabelPredictions()
    labels = (reference.predictions or LabelPredictions()).labels
    if not preds.predicted or not labels or set(preds.labels or labels) != set(labels):
        return None
    index = {name: i for i, name in enumerate(labels)}
    if any(name not in index for name in list(preds.gold) + list(preds.predicted)):
        return None
    gold = np.array([index[name] for name in preds.gold])
    predicted = np.array([index[name] for name in preds.predicted])
    probs = None
    if preds.probabilities:
        own_order = [(preds.labels or labels).index(name) for name in labels]
        probs = np.asarray(preds.probabilities, dtype=np.float64)
        if probs.shape != (len(predicted), len(labels)):
            return None
        probs = probs[:, own_order]
        # Results round probabilities to 6 digits, which can tie two classes: the recorded label
        # breaks it.
        rows = np.flatnonzero(probs.argmax(axis=1) != predicted)
        probs[rows, predicted[rows]] += 1e-9
    return {"labels": list(labels), "gold": gold, "predicted": predicted, "probs": probs}


def _paired(result: Result, base: Result) -> tuple[dict | None, str | None]:
    """Both results' predictions in the baseline's label order, or None and why not."""
    note = sample_note(result, base)
    if note:
        return None, note
    mine, theirs = _encoded(result, base), _encoded(base, base)
    if mine is None or theirs is None or not np.array_equal(mine["gold"], theirs["gold"]):
        return None, "its predictions cannot be paired with the baseline's (other labels or gold)"
    return {"variant": mine, "baseline": theirs}, None


def _against_baseline(paired: dict, is_baseline: bool) -> dict:
    var, base = paired["variant"], paired["baseline"]
    gold, labels = var["gold"], var["labels"]
    out = {"agreement": float(np.mean(var["predicted"] == base["predicted"]))}
    if var["probs"] is not None and base["probs"] is not None:
        changes = effects.prediction_effects(gold, base["probs"], var["probs"], labels)
        changes["flipped_samples"] = [
            {
                "index": int(i),
                "gold": labels[gold[i]],
                "from": labels[base["predicted"][i]],
                "to": labels[var["predicted"][i]],
            }
            for i in np.flatnonzero(var["predicted"] != base["predicted"])
        ]
        out["effects"] = changes
    if not is_baseline:
        out["significance"] = _significance(gold, base["predicted"], var["predicted"])
    return out


def _significance(gold: np.ndarray, base: np.ndarray, var: np.ndarray) -> dict:
    accuracy = statistics.paired_bootstrap_delta(gold, base, var, "accuracy", **BOOTSTRAP)
    f1 = statistics.paired_bootstrap_delta(gold, base, var, "macro_f1", **BOOTSTRAP)
    mcnemar = statistics.mcnemar_exact(gold, base, var, ALPHA)
    return {
        "accuracy": accuracy,
        "macro_f1": f1,
        "mcnemar": mcnemar,
        # McNemar speaks to which samples are right, i.e. accuracy; macro-F1 has the bootstrap
        # alone.
        "within_noise": {
            "accuracy": accuracy["within_noise"] and mcnemar["within_noise"],
            "macro_f1": f1["within_noise"],
        },
    }


# ---------------------------------------------------------------------------------------------
# A classifier the verdict cannot judge.

_SLACK = 1e-9  # a macro-F1 equal to chance's, whatever the float rounding, is at chance


def one_class(predicted: np.ndarray) -> int | None:
    """The class every prediction is, or None when the predictions differ."""
    classes = np.unique(predicted)
    return int(classes[0]) if len(classes) == 1 else None


def constant_macro_f1(gold: np.ndarray, n_classes: int) -> tuple[float, int]:
    """The macro-F1 of the best constant predictor (always the same class) on these gold labels,
    and that class: what a model that learned nothing scores at most."""
    scores = [statistics.macro_f1(gold, np.full_like(gold, c), n_classes) for c in range(n_classes)]
    best = int(np.argmax(scores))
    return scores[best], best


def degenerate(result: Result) -> str | None:
    """Why a classifier's predictions cannot be judged: one class for every sample, or a macro-F1
    no better than the best constant predictor's. None when they can, or when the result keeps no
    predictions to tell (older results)."""
    own = _encoded(result, result) if result.status == "ok" else None
    if own is None:
        return None
    gold, predicted, labels = own["gold"], own["predicted"], own["labels"]
    only = one_class(predicted)
    if only is not None:
        share = float(np.mean(gold == only))
        return (
            f"predicts {labels[only]} for all {len(predicted)} samples (its accuracy "
            f"{share:.4f} is that class's share of the gold labels)"
        )
    f1 = statistics.macro_f1(gold, predicted, len(labels))
    chance, always = constant_macro_f1(gold, len(labels))
    if f1 > chance + _SLACK:
        return None
    return (
        f"macro-F1 {f1:.4f} is at chance: no better than always predicting {labels[always]} "
        f"({chance:.4f})"
    )


# ---------------------------------------------------------------------------------------------
# The tolerances only a classifier measures, and what the within-noise mark means.


def _accuracy_drop(result: Result, stats: dict, base: Result | None) -> float | None:
    if stats["agreement"] is None:
        return None
    return base.metrics.value("accuracy") - result.metrics.value("accuracy")


MAX_ACCURACY_DROP = Tolerance(
    "max_accuracy_drop",
    "accuracy points below the baseline, as a fraction (0.01 = one point)",
    Check("accuracy drop", _accuracy_drop, "{:.4f}", against_baseline=True),
)
MIN_AGREEMENT = Tolerance(
    "min_agreement",
    "share of samples predicted as the baseline predicts them",
    Check("agreement", lambda r, s, b: s["agreement"], "{:.4f}", against_baseline=True),
    at_most=1.0,
)

NOISE_RULE = (
    f"{NOISE_MARK} within noise: the {BOOTSTRAP['confidence']:.0%} paired-bootstrap interval "
    "of the "
    f"delta ({BOOTSTRAP['n_resamples']} resamples of the samples) contains 0 and, for "
    "accuracy, McNemar's "
    f"exact test on the paired predictions gives p ≥ {ALPHA:g}; a delta without the mark is "
    "beyond noise"
)
