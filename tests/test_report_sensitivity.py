"""A sensitivity study's figure in the report: each group's harm against its SQNR, and the
rank correlation of the two.

The study is synthetic but shaped as runner/sensitivity.py writes it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import spearmanr

from runner import report

SAMPLES = 40  # make_task's evaluation sample
MIXED = "int8-dynamic-mixed-cpu"


def measure(flips: int, kept: int = 0, kl: float = 0.01) -> dict:
    agreement = 1 - flips / SAMPLES
    return {
        "kept": kept,
        "accuracy": 0.55 - flips / SAMPLES / 2,
        "accuracy_fp32": 0.55,
        "agreement": agreement,
        "mean_kl": kl,
        "flips": flips,
        "bootstrap_accuracy_delta": {"delta": -flips / SAMPLES / 2, "ci_low": -0.1, "ci_high": 0},
        "mcnemar": {"b": flips, "c": 0, "p_value": 0.5},
    }


def ranked(groups: list[tuple[str, float | None, float | None, int]]) -> list[dict]:
    """(group, weight SQNR, output SQNR, flips with only it quantized), most harmful first."""
    ordered = sorted(groups, key=lambda g: (-g[3], g[0]))
    return [
        {
            "rank": i + 1,
            "group": group,
            "layers": [group],
            "only": measure(flips, kl=flips / 1000),
            "all_but": measure(max(0, 10 - flips)),
            "weight_sqnr_db": weight,
            "output_sqnr_db": output,
        }
        for i, (group, weight, output, flips) in enumerate(ordered)
    ]


def make_study(job: str, layers: list[dict]) -> dict:
    """A study of int8-dynamic-cpu over the result's layers: the lower a layer's weight SQNR, the
    more flips, except the first two, swapped; the classifier has no output SQNR."""
    by_sqnr = sorted(layers, key=lambda row: row["sqnr_db"])
    flips = [12, 15, 7, 5, 4, 3, 3, 2, 1, 1, 0, 0, 0, 0][: len(by_sqnr)]
    groups = [
        (
            row["layer"],
            row["sqnr_db"],
            None if row["layer"] == "classifier" else row["output_sqnr_db"],
            n,
        )
        for row, n in zip(by_sqnr, flips)
    ]
    ranking = ranked(groups)
    kept = [entry["group"] for entry in ranking[:2]]
    return {
        "kind": "sensitivity-study",
        "schema_version": 1,
        "job": job,
        "status": "ok",
        "error": None,
        "spec_hash": "test",
        "sensitivity": {"precision": "int8-dynamic", "device": "cpu", "groups": "layer"},
        "variant": "int8-dynamic-cpu",
        "mixed_variant": MIXED,
        "samples": SAMPLES,
        "layers": len(layers),
        "full": measure(20, kl=0.05),
        "ranking": ranking,
        "recipe": {
            "kept": sorted(kept),
            "groups": kept,
            "result": measure(0, kept=2, kl=0.001),
            "met": True,
            "tolerance": {"min_agreement": 0.99, "max_accuracy_drop": None},
            "tried": [
                {"groups": 1, "kept": 1, "agreement": 0.95, "accuracy": 0.53, "mean_kl": 0.01},
                {"groups": 2, "kept": 2, "agreement": 1.0, "accuracy": 0.55, "mean_kl": 0.001},
            ],
        },
        "cost": {"measurements": 28, "tasks": 1, "pass_s": 0.1, "load_s": 0.2},
    }


def test_spearman_matches_a_hand_computation_with_ties():
    # x ranks 1..5; y = 5 6 7 8 7 ranks 1 2 3.5 5 3.5 (the two 7s share ranks 3 and 4).
    # Deviations from the mean rank 3: x -2 -1 0 1 2, y -2 -1 .5 2 .5: Σxy = 8, Σx² = 10, Σy² = 9.5
    assert report.spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / math.sqrt(95))
    assert report.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1)
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 6, 40), rng.integers(0, 4, 40)  # many ties
    assert report.spearman(x, y) == pytest.approx(spearmanr(x, y).statistic)


def test_spearman_is_undefined_without_spread_or_points():
    assert report.spearman([1, 2, 3], [0, 0, 0]) is None
    assert report.spearman([1, 2], [2, 1]) is None
    with pytest.raises(ValueError, match="pairs"):
        report.spearman([1, 2, 3], [1, 2])


def small_study() -> dict:
    """Four groups: weight SQNR 10 20 30 40 dB, flips 5 5 1 0, so ρ is -4.5 / √22.5 by hand:
    x ranks 1 2 3 4, flips ranks 3.5 3.5 2 1; deviations x -1.5 -.5 .5 1.5, y 1 1 -.5 -1.5."""
    study = make_study("small", [])
    study["ranking"] = ranked(
        [
            ("bert.encoder.layer.0.attention.self.query", 10.0, None, 5),
            ("bert.encoder.layer.0.attention.self.key", 20.0, 25.0, 5),
            ("bert.encoder.layer.1.intermediate.dense", 30.0, 15.0, 1),
            ("classifier", 40.0, None, 0),
        ]
    )
    return study


def test_figure_panels_hold_the_groups_with_sqnr_and_their_correlation():
    figure = report.plot_sensitivity(small_study())
    weight, output = [ax for ax in figure.axes if ax.get_visible() and ax.get_xlabel()]
    assert weight.get_xlabel() == "weight SQNR (dB)" and output.get_xlabel() == "output SQNR (dB)"
    assert weight.get_title() == f"Spearman ρ = {-4.5 / math.sqrt(22.5):+.2f} (4 groups)"
    # Two groups have an output SQNR: too few for a correlation.
    assert output.get_title() == "Spearman ρ = undefined (2 groups)"
    points = sorted(tuple(map(float, xy)) for c in weight.collections for xy in c.get_offsets())
    assert points == [(10.0, 5.0), (20.0, 5.0), (30.0, 1.0), (40.0, 0.0)]
    assert output.get_shared_y_axes().joined(weight, output)
    labels = sorted(t.get_text() for t in weight.texts)
    assert labels == [
        "#1 …layer.0.attention.self.key",
        "#2 …layer.0.attention.self.query",
        "#3 …layer.1.intermediate.dense",
    ]
    assert weight.get_ylabel() == report.HARM_LABEL


def test_a_study_without_any_sqnr_draws_no_figure():
    study = small_study()
    for entry in study["ranking"]:
        entry["weight_sqnr_db"] = entry["output_sqnr_db"] = None
    assert report.plot_sensitivity(study) is None
