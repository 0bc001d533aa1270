"""The verdict refuses what it cannot judge: a classifier that predicts one class (or whose
macro-F1 is at chance), as the baseline or as a variant, and a variant whose latency interval
overlaps the baseline's, never pass and are never the best.

The results are built by hand, in the shape a worker writes, on the sample of the report that
asked for this: 300 SmSA samples, 128 of them positive (0.4267), where a fine-tuned MiniLM
predicted positive for every one (accuracy 0.4267, macro-F1 0.1994). Expected numbers are
recounted here (scikit-learn for the F1), never taken from collect.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import ok_result_head, typed
from sklearn.metrics import f1_score

from runner import collect
from runner.cli import main
from runner.results import write_result

LABELS = ["positive", "neutral", "negative"]
GOLD = ["positive"] * 128 + ["neutral"] * 72 + ["negative"] * 100  # 128 / 300 = 0.4267
CONSTANT = ["positive"] * 300
# A model that learned something: right on all but the first 60 negatives, read as positive.
GOOD = ["positive"] * 128 + ["neutral"] * 72 + ["positive"] * 60 + ["negative"] * 40
FAST, SLOW = [4.0, 4.4], [9.0, 9.8]  # 95% intervals of the median latency, in ms, apart


def classifier_result(
    variant: str, predicted: list[str], interval: list[float], tolerances: dict
) -> dict:
    """One ok result of job smsa: its metrics follow from the predictions."""
    head = ok_result_head("smsa", variant)
    right = [p == g for p, g in zip(predicted, GOLD)]
    median = sum(interval) / 2
    return {
        **head,
        "metrics": {
            "model_size_mib": 87.0 if head["precision"] == "fp32" else 30.0,
            "accuracy": sum(right) / len(right),
            "macro_f1": float(f1_score(GOLD, predicted, average="macro")),
            "avg_confidence": 0.8,
            "latency_ms": {"mean": median, "median": median, "n": 40, "median_ci95": interval},
        },
        "settings": {},
        "environment": {"host": "box", "cpu": {"model": "test cpu"}},
        "spec_hash": "smsa",
        "spec": {"name": "smsa", "baseline": "fp32-cpu", "tolerances": tolerances},
        "sample": {"rows": len(GOLD), "fingerprint": "smsa-300"},
        "model": None,
        "repeat": 0,
        "started_at": None,
        "ended_at": None,
        "predictions": {
            "labels": LABELS,
            "gold": GOLD,
            "predicted": predicted,
            "confidence": [0.8] * len(GOLD),
            "probabilities": [[0.8 if name == p else 0.1 for name in LABELS] for p in predicted],
        },
    }


def table_of(*results: dict) -> collect.JobTable:
    (table,) = collect.build_tables(typed(list(results)))
    return table


def verdict(table: collect.JobTable, key: str) -> dict:
    return table.stats[key]["verdict"]


LOOSE = {"max_accuracy_drop": 0.5, "max_size_mib": 100.0}


def test_the_fixture_is_the_reported_constant_predictor():
    result = classifier_result("fp32-cpu", CONSTANT, SLOW, LOOSE)
    assert round(result["metrics"]["accuracy"], 4) == 0.4267
    assert round(result["metrics"]["macro_f1"], 4) == 0.1994


def test_a_constant_baseline_and_its_constant_variant_cannot_be_judged_and_none_is_best():
    table = table_of(
        classifier_result("fp32-cpu", CONSTANT, SLOW, LOOSE),
        classifier_result("int8-dynamic-cpu", CONSTANT, FAST, LOOSE),
    )
    assert verdict(table, "fp32-cpu")["status"] == "cannot judge"
    assert verdict(table, "int8-dynamic-cpu")["status"] == "cannot judge"
    assert table.best is None

    lines = collect.verdict_lines(table)
    why = "predicts positive for all 300 samples (its accuracy 0.4267 is that class's share"
    assert f"fp32-cpu: cannot judge: {why}" in "\n".join(lines)
    variant_line = next(line for line in lines if line.startswith("int8-dynamic-cpu:"))
    assert "the baseline fp32-cpu cannot be judged: predicts positive" in variant_line
    assert lines[-1] == (
        "best variant that passes: none passes; cannot judge fp32-cpu, int8-dynamic-cpu"
    )


def test_no_variant_passes_against_a_constant_baseline_however_good_it_is():
    table = table_of(
        classifier_result("fp32-cpu", CONSTANT, SLOW, LOOSE),
        classifier_result("int8-dynamic-cpu", GOOD, FAST, LOOSE),
    )
    found = verdict(table, "int8-dynamic-cpu")
    assert found["status"] == "cannot judge" and found["failures"] == []
    assert found["reason"].startswith("the baseline fp32-cpu cannot be judged")
    assert table.best is None


def test_a_constant_variant_is_never_best_even_when_it_is_the_fastest():
    table = table_of(
        classifier_result("fp32-cpu", GOOD, SLOW, LOOSE),
        classifier_result("int8-dynamic-cpu", CONSTANT, FAST, LOOSE),
    )
    assert verdict(table, "fp32-cpu") == {"status": "pass", "failures": [], "reason": None}
    assert verdict(table, "int8-dynamic-cpu")["status"] == "cannot judge"
    assert table.best == "fp32-cpu"
    assert collect.verdict_lines(table)[-1] == (
        "best variant that passes: fp32-cpu (fastest median latency among passing; "
        "cannot judge int8-dynamic-cpu)"
    )


def test_a_variant_with_two_classes_but_a_macro_f1_at_chance_cannot_be_judged():
    # Positive for all but ten positives read as neutral: two classes, macro-F1 below the
    # constant predictor's.
    near_constant = ["neutral"] * 10 + ["positive"] * 290
    chance = f1_score(GOLD, CONSTANT, average="macro")
    f1 = f1_score(GOLD, near_constant, average="macro")
    assert f1 < chance
    table = table_of(
        classifier_result("fp32-cpu", GOOD, SLOW, LOOSE),
        classifier_result("int8-dynamic-cpu", near_constant, FAST, LOOSE),
    )
    found = verdict(table, "int8-dynamic-cpu")
    assert found["status"] == "cannot judge"
    assert found["reason"] == (
        f"macro-F1 {f1:.4f} is at chance: no better than always predicting positive ({chance:.4f})"
    )


def test_a_broken_tolerance_fails_and_still_says_what_cannot_be_judged():
    table = table_of(
        classifier_result("fp32-cpu", GOOD, SLOW, {"max_accuracy_drop": 0.01}),
        classifier_result("int8-dynamic-cpu", CONSTANT, FAST, {"max_accuracy_drop": 0.01}),
    )
    found = verdict(table, "int8-dynamic-cpu")
    assert found["status"] == "fail"
    drop = (240 - 128) / 300
    assert collect.verdict_text(found) == (
        f"fail: accuracy drop {drop:.4f} > max_accuracy_drop 0.01 (and cannot be judged: "
        "predicts positive for all 300 samples (its accuracy 0.4267 is that class's share of "
        "the gold labels))"
    )


@pytest.mark.parametrize(
    ("variant_interval", "status"),
    [([8.5, 9.2], "cannot judge"), ([9.8, 10.5], "cannot judge"), ([4.0, 8.9], "pass")],
)
def test_a_variant_whose_latency_interval_overlaps_the_baseline_s_cannot_be_judged(
    variant_interval, status
):
    table = table_of(
        classifier_result("fp32-cpu", GOOD, SLOW, LOOSE),
        classifier_result("int8-dynamic-cpu", GOOD, variant_interval, LOOSE),
    )
    found = verdict(table, "int8-dynamic-cpu")
    assert found["status"] == status
    assert verdict(table, "fp32-cpu")["status"] == "pass"  # the baseline against itself
    if status == "pass":
        assert table.best == "int8-dynamic-cpu"
    else:
        low, high = variant_interval
        assert found["reason"] == (
            f"its latency median's 95% interval [{low:.2f}, {high:.2f}] ms overlaps the "
            "baseline's [9.00, 9.80] ms: not measurably faster or slower"
        )
        assert table.best == "fp32-cpu"


def test_json_and_the_table_say_why_a_variant_cannot_be_judged(tmp_path, capsys):
    for result in (
        classifier_result("fp32-cpu", CONSTANT, SLOW, LOOSE),
        classifier_result("int8-dynamic-cpu", CONSTANT, FAST, LOOSE),
    ):
        write_result(tmp_path, typed([result])[0])

    assert main(["collect", str(tmp_path), "--format", "json"]) == 0
    (payload,) = json.loads(capsys.readouterr().out)
    assert payload["verdict"]["best"] is None
    assert set(payload["verdict"]["cannot_judge"]) == {"fp32-cpu", "int8-dynamic-cpu"}
    mine = payload["variants"]["fp32-cpu"]["verdict"]
    assert mine["status"] == "cannot judge" and "predicts positive" in mine["reason"]

    assert main(["collect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "  fp32-cpu: cannot judge: predicts positive for all 300 samples" in out
    assert ": pass" not in out


def test_the_report_says_why_and_picks_no_best(tmp_path):
    from runner.report import write_report

    results = typed(
        [
            classifier_result("fp32-cpu", CONSTANT, SLOW, LOOSE),
            classifier_result("int8-dynamic-cpu", CONSTANT, FAST, LOOSE),
        ]
    )
    html = write_report(results, tmp_path / "report.html").path.read_text(encoding="utf-8")
    assert '<li class="cannot-judge"><b>fp32-cpu</b>: cannot judge: predicts positive' in html
    assert "best variant that passes: none passes; cannot judge" in html


def test_the_worker_warns_when_every_prediction_is_one_class():
    from runner.tasks.classification.worker import label_guard

    gold = np.array([LABELS.index(name) for name in GOLD])
    warnings = label_guard(gold, np.zeros_like(gold), LABELS)  # positive, the majority class
    assert warnings == [
        "every prediction is positive: the model answers one class whatever it reads (its "
        "accuracy 42.67% is that class's share of the gold labels)"
    ]
    assert label_guard(gold, gold, LABELS) == []
