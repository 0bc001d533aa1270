"""collect's statistics on real results: flips, KL, calibration, within-noise marks and the
deployment verdict.

The results come from run_variant on the tiny BERT; a "degraded" variant is a copy of the FP32
result whose predictions are flipped on chosen samples (probabilities swapped, so labels and
probabilities agree). Every expected number is recounted here from the predictions, never taken from
collect itself.
"""

from __future__ import annotations

import collections
import copy
import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import RT_POLARITY, build_tiny_bert, labelled, typed, variant_json

from runner import collect
from runner.cli import main
from runner.job import EvaluationSpec, Variant
from runner.precisions import default_settings, family_of
from runner.results import write_result
from runner.work import VariantWork

LABELS = ["negative", "positive"]
N_EACH = 20


def _sentences(name: str) -> list[str]:
    return (RT_POLARITY / name).read_text(encoding="utf-8").splitlines()[:N_EACH]


def make_task(
    model_dir, precision: str, device: str = "cpu", tolerances: dict | None = None
) -> VariantWork:
    texts = [
        t
        for pair in zip(_sentences("rt-polarity.pos"), _sentences("rt-polarity.neg"))
        for t in pair
    ]
    spec = {
        "name": "tiny",
        "baseline": "fp32-cpu",
        **({"tolerances": tolerances} if tolerances else {}),
    }
    return VariantWork(
        job="tiny",
        variant=Variant(precision, device),
        family=family_of(precision),
        model_dir=str(model_dir),
        texts=texts,
        **labelled(["positive", "negative"] * N_EACH, LABELS),
        evaluation=EvaluationSpec(batch_size=4, warmup_passes=1, timed_passes=10),
        settings=default_settings(),
        max_length=32,
        spec_hash="test",
        spec_as_run=spec,
        sample={"rows": 2 * N_EACH, "fingerprint": "rt-40"},
    )


@pytest.fixture(scope="module")
def spread_model(tmp_path_factory) -> Path:
    """A tiny binary classifier whose probabilities spread beyond 0.5 ± 0.001 (initializer range
    0.1, not BERT's 0.02): int8 then moves them by 1e-3, well above the 6-digit rounding of a
    result, so their KL divergence is measured and not rounding noise."""
    folder = tmp_path_factory.mktemp("tiny-bert-spread")
    return build_tiny_bert(folder, ["negative", "positive"], initializer_range=0.1)


@pytest.fixture(scope="module")
def measured(spread_model) -> dict[str, dict]:
    results = {p: variant_json(make_task(spread_model, p)) for p in ("fp32", "int8-dynamic")}
    assert all(r["status"] == "ok" for r in results.values()), [
        r.get("error") for r in results.values()
    ]
    return results


def renamed(result: dict, variant: str) -> dict:
    out = copy.deepcopy(result)
    out["variant"] = variant
    out["precision"], out["device"] = variant.rsplit("-", 1)
    return out


def degraded(result: dict, variant: str, flip: list[int]) -> dict:
    """A copy whose predictions are the other label on the samples `flip`, metrics recomputed."""
    out = renamed(result, variant)
    preds = out["predictions"]
    for i in flip:
        preds["probabilities"][i] = preds["probabilities"][i][::-1]  # two classes: swapped
        preds["predicted"][i] = LABELS[int(np.argmax(preds["probabilities"][i]))]
        preds["confidence"][i] = max(preds["probabilities"][i])
    right = [p == g for p, g in zip(preds["predicted"], preds["gold"])]
    out["metrics"]["accuracy"] = sum(right) / len(right)
    out["metrics"]["avg_confidence"] = float(np.mean(preds["confidence"]))
    return out


def judgeable(result: dict) -> dict:
    """A copy the verdict can judge (tests/test_verdict.py says what it refuses). The tiny BERT
    predicts one class on every sample: ten of its wrong predictions are turned right. On a
    shared machine the measured latency intervals overlap: the median's is narrowed to itself."""
    wrong = [i for i in range(2 * N_EACH) if i not in correct_samples(result)]
    return timed(degraded(result, result["variant"], wrong[:10]), None)


def timed(result: dict, median_ms: float | None) -> dict:
    """The result with this median latency (None: its own) and an interval of that one value."""
    latency = result["metrics"]["latency_ms"]
    latency["median"] = latency["median"] if median_ms is None else median_ms
    latency["median_ci95"] = [latency["median"]] * 2
    return result


def correct_samples(result: dict) -> list[int]:
    preds = result["predictions"]
    return [i for i, (p, g) in enumerate(zip(preds["predicted"], preds["gold"])) if p == g]


def with_tolerances(results: list[dict], tolerances: dict) -> list[dict]:
    out = copy.deepcopy(results)
    for result in out:
        result["spec"] = {**result["spec"], "tolerances": tolerances}
    return out


def only_table(results: list[dict], baseline: str | None = None) -> collect.JobTable:
    tables = collect.build_tables(typed(results), baseline)
    assert len(tables) == 1
    return tables[0]


def row(table: collect.JobTable, label: str) -> dict[str, tuple[str, str]]:
    """{column key: (value cell, Δ cell)} of one row of the rendered table."""
    header, rows, _ = collect.table_rows(table)
    cells = next(r for r in rows if r[0] == label)
    out, i = {}, 1
    for key in table.columns:
        has_delta = key != table.baseline and table.baseline
        out[key] = (cells[i], cells[i + 1] if has_delta else "")
        i += 2 if has_delta else 1
    return out


# ------------------------------------------------------------------------------------------------
# Prediction-level effects
# ------------------------------------------------------------------------------------------------


def test_flips_equal_an_independent_recount_from_the_predictions(measured):
    fp32 = measured["fp32"]
    flip = (
        correct_samples(fp32)[:6]
        + [i for i in range(2 * N_EACH) if i not in correct_samples(fp32)][:2]
    )
    worse = degraded(fp32, "bnb-nf4-cpu", flip)
    table = only_table([fp32, measured["int8-dynamic"], worse])

    for variant in (measured["int8-dynamic"], worse):
        key = variant["variant"]
        base_pred, var_pred = fp32["predictions"]["predicted"], variant["predictions"]["predicted"]
        gold = fp32["predictions"]["gold"]
        changed = [i for i, (a, b) in enumerate(zip(base_pred, var_pred)) if a != b]
        recount = collections.Counter((base_pred[i], var_pred[i]) for i in changed)
        effects = table.stats[key]["effects"]
        assert {(f["from"], f["to"]): f["count"] for f in effects["flips"]} == dict(recount)
        assert [s["index"] for s in effects["flipped_samples"]] == changed
        assert all(
            s["gold"] == gold[s["index"]]
            and s["from"] == base_pred[s["index"]]
            and s["to"] == var_pred[s["index"]]
            for s in effects["flipped_samples"]
        )
        assert effects["correct_to_wrong"] == sum(base_pred[i] == gold[i] for i in changed)
        assert effects["wrong_to_correct"] == sum(var_pred[i] == gold[i] for i in changed)
        assert table.stats[key]["agreement"] == pytest.approx(1 - len(changed) / len(gold))
        assert row(table, "flip rate")[key][0] == f"{len(changed) / len(gold):.4f}"
        assert row(table, "flips correct→wrong")[key][0] == str(effects["correct_to_wrong"])

    assert len(table.stats["bnb-nf4-cpu"]["effects"]["flipped_samples"]) == 8
    assert table.stats["bnb-nf4-cpu"]["effects"]["correct_to_wrong"] == 6
    assert table.stats["bnb-nf4-cpu"]["effects"]["wrong_to_correct"] == 2
    # The baseline against itself: nothing flips, nothing diverges.
    assert (
        table.stats["fp32-cpu"]["effects"]["flips"] == []
        and row(table, "flip rate")["fp32-cpu"][0] == "0.0000"
    )
    assert table.stats["fp32-cpu"]["effects"]["mean_kl_baseline_variant"] == pytest.approx(
        0, abs=1e-12
    )


def test_kl_confidence_and_calibration_follow_the_probabilities(measured):
    fp32, int8 = measured["fp32"], measured["int8-dynamic"]
    table = only_table([fp32, int8])
    effects = table.stats["int8-dynamic-cpu"]["effects"]

    p = np.asarray(fp32["predictions"]["probabilities"])
    q = np.asarray(int8["predictions"]["probabilities"])
    kl = np.mean(np.sum(p * np.log(np.clip(p, 1e-12, None) / np.clip(q, 1e-12, None)), axis=1))
    assert effects["mean_kl_baseline_variant"] == pytest.approx(kl, rel=1e-6, abs=1e-12)
    assert (
        effects["mean_kl_baseline_variant"] > 0
    )  # int8 weights do move the probabilities a little
    # The worker's own mean confidences, from unrounded probabilities.
    change = int8["metrics"]["avg_confidence"] - fp32["metrics"]["avg_confidence"]
    assert effects["mean_confidence_change"] == pytest.approx(change, abs=2e-6)

    # ECE over 10 bins of the top probability, (lo, hi] each: recounted here.
    gold = np.array([LABELS.index(g) for g in int8["predictions"]["gold"]])
    confidence, right = q.max(axis=1), q.argmax(axis=1) == gold
    ece = 0.0
    for b in range(10):
        inside = (confidence > b / 10) & (confidence <= (b + 1) / 10) if b else confidence <= 0.1
        if inside.any():
            ece += inside.mean() * abs(right[inside].mean() - confidence[inside].mean())
    assert table.stats["int8-dynamic-cpu"]["calibration"]["ece"] == pytest.approx(ece)
    assert row(table, "ECE")["int8-dynamic-cpu"][0] == f"{ece:.4f}"
    matrix = table.stats["int8-dynamic-cpu"]["confusion_matrix"]["matrix"]
    assert (
        sum(map(sum, matrix)) == 2 * N_EACH and sum(matrix[i][i] for i in range(2)) == right.sum()
    )


# ------------------------------------------------------------------------------------------------
# Is the difference real?
# ------------------------------------------------------------------------------------------------


def test_within_noise_marks_identical_and_tiny_changes_but_not_a_real_drop(measured):
    fp32 = measured["fp32"]
    right = correct_samples(fp32)
    assert len(right) >= 12, "the tiny model should get a fair share of 40 samples right"
    same = renamed(fp32, "fp16-cpu")
    one = degraded(fp32, "bf16-cpu", right[:1])
    many = degraded(fp32, "bnb-nf4-cpu", right[:12])
    table = only_table([fp32, same, one, many])

    accuracy, f1 = row(table, "accuracy"), row(table, "macro-F1")
    for key in ("fp16-cpu", "bf16-cpu"):
        assert accuracy[key][1].endswith(collect.NOISE_MARK), (key, accuracy[key])
        assert table.stats[key]["significance"]["within_noise"]["accuracy"]
    assert accuracy["fp16-cpu"][1] == f"+0.0% {collect.NOISE_MARK}" and f1["fp16-cpu"][1].endswith(
        collect.NOISE_MARK
    )
    assert (
        collect.NOISE_MARK not in accuracy["bnb-nf4-cpu"][1]
        and collect.NOISE_MARK not in f1["bnb-nf4-cpu"][1]
    )
    assert collect.NOISE_MARK not in row(table, "accuracy Δ vs baseline (abs)")["bnb-nf4-cpu"][0]

    significance = table.stats["bnb-nf4-cpu"]["significance"]
    # 12 samples the baseline got right are now wrong, none the other way: b = 12, c = 0.
    assert (significance["mcnemar"]["b"], significance["mcnemar"]["c"]) == (12, 0)
    assert significance["mcnemar"]["p_value"] == pytest.approx(2 * 0.5**12)
    assert significance["accuracy"]["delta"] == pytest.approx(-12 / 40)
    assert significance["accuracy"]["ci_low"] <= -12 / 40 <= significance["accuracy"]["ci_high"] < 0
    assert not significance["within_noise"]["accuracy"]
    # One lost sample: McNemar p = 1 and a bootstrap interval that reaches 0.
    assert table.stats["bf16-cpu"]["significance"]["mcnemar"]["p_value"] == 1.0

    _, _, footnotes = collect.table_rows(table)
    assert any(
        note.startswith(collect.NOISE_MARK + " within noise") and "McNemar" in note
        for note in footnotes
    )
    text = collect.render(typed([fp32, same, one, many]))
    assert "≈ within noise" in text


# ------------------------------------------------------------------------------------------------
# Deployment verdict
# ------------------------------------------------------------------------------------------------


def test_verdict_fails_the_variant_above_a_latency_limit_set_between_two_measured_medians(
    measured, tiny_model
):
    fp32, int8 = judgeable(measured["fp32"]), judgeable(measured["int8-dynamic"])
    failed = variant_json(make_task(tiny_model, "fp16", "cuda"))  # no GPU here: a failed result
    medians = {r["variant"]: r["metrics"]["latency_ms"]["median"] for r in (fp32, int8)}
    assert medians["fp32-cpu"] != medians["int8-dynamic-cpu"]
    fast, slow = sorted(medians, key=medians.get)
    limit = (medians[fast] + medians[slow]) / 2
    table = only_table(with_tolerances([fp32, int8, failed], {"max_latency_ms": limit}))

    assert table.stats[fast]["verdict"] == {"status": "pass", "failures": [], "reason": None}
    verdict = table.stats[slow]["verdict"]
    assert verdict["status"] == "fail" and [f["tolerance"] for f in verdict["failures"]] == [
        "max_latency_ms"
    ]
    assert verdict["failures"][0]["value"] == medians[slow]
    assert table.stats["fp16-cuda"]["verdict"]["status"] == "no result"
    assert table.best == fast

    lines = collect.verdict_lines(table)
    assert (
        f"{slow}: fail: latency median {medians[slow]:.2f} ms > max_latency_ms {limit:g}" in lines
    )
    assert f"{fast}: pass" in lines and "fp16-cuda: no verdict (failed)" in lines
    assert lines[-1] == f"best variant that passes: {fast} (fastest median latency among passing)"

    # A limit equal to a measured value passes it; a limit under both passes none.
    assert only_table(with_tolerances([fp32, int8], {"max_latency_ms": medians[slow]})).best == fast
    none = only_table(with_tolerances([fp32, int8], {"max_latency_ms": medians[fast] / 2}))
    assert (
        none.best is None
        and collect.verdict_lines(none)[-1] == "best variant that passes: none passes"
    )


def test_verdict_names_every_tolerance_a_variant_breaks(measured):
    fp32 = judgeable(measured["fp32"])
    many = degraded(fp32, "bnb-nf4-cpu", correct_samples(fp32)[:8])  # accuracy -0.2, agreement 0.8
    timed(many, fp32["metrics"]["latency_ms"]["median"] / 2)
    size = fp32["metrics"]["model_size_mib"]
    tolerances = {
        "max_accuracy_drop": 0.1,
        "min_agreement": 0.9,
        "max_size_mib": size * 1.01,
        "max_peak_rss_mib": 1e6,
    }
    table = only_table(with_tolerances([fp32, many], tolerances))
    verdict = table.stats["bnb-nf4-cpu"]["verdict"]
    assert [f["tolerance"] for f in verdict["failures"]] == ["max_accuracy_drop", "min_agreement"]
    assert verdict["failures"][0]["value"] == pytest.approx(8 / 40)
    assert verdict["failures"][1]["value"] == pytest.approx(32 / 40)
    assert "accuracy drop 0.2000 > max_accuracy_drop 0.1" in collect.verdict_text(verdict)
    assert "agreement 0.8000 < min_agreement 0.9" in collect.verdict_text(verdict)
    assert table.stats["fp32-cpu"]["verdict"]["status"] == "pass" and table.best == "fp32-cpu"

    # Tolerances that admit the drop: the degraded variant passes.
    loose = only_table(
        with_tolerances([fp32, many], {"max_accuracy_drop": 0.2, "min_agreement": 0.8})
    )
    assert loose.stats["bnb-nf4-cpu"]["verdict"]["status"] == "pass"


def test_without_tolerances_there_is_no_verdict_section(measured):
    table = only_table([measured["fp32"], measured["int8-dynamic"]])
    assert table.tolerances == {} and table.best is None and collect.verdict_lines(table) == []
    assert "verdict" not in collect.render(typed([measured["fp32"], measured["int8-dynamic"]]))


# ------------------------------------------------------------------------------------------------
# What cannot be compared, and older results
# ------------------------------------------------------------------------------------------------


def test_a_variant_on_another_sample_gets_no_effects_and_cannot_pass_an_accuracy_tolerance(
    measured,
):
    other = renamed(measured["int8-dynamic"], "int8-dynamic-cpu")
    other["sample"] = {**other["sample"], "fingerprint": "another"}
    table = only_table(with_tolerances([measured["fp32"], other], {"max_accuracy_drop": 0.5}))
    stats = table.stats["int8-dynamic-cpu"]
    assert stats["effects"] is None and stats["significance"] is None and stats["agreement"] is None
    assert stats["calibration"] is not None  # its own calibration needs no baseline
    assert any("different sample" in note for note in table.notes)
    assert stats["verdict"]["status"] == "fail"
    assert "not measured against a baseline" in stats["verdict"]["failures"][0]["reason"]
    assert row(table, "KL vs baseline (nats)")["int8-dynamic-cpu"][0] == "–"


def test_results_without_probabilities_still_get_flips_and_significance(measured):
    old = [copy.deepcopy(measured["fp32"]), copy.deepcopy(measured["int8-dynamic"])]
    for result in old:  # an older result: labels and confidences only, no per-layer analysis
        del result["predictions"]["probabilities"]
        result.pop("analysis", None)
    table = only_table(old)
    stats = table.stats["int8-dynamic-cpu"]
    assert stats["effects"] is None and stats["calibration"] is None
    same = sum(
        a == b
        for a, b in zip(old[0]["predictions"]["predicted"], old[1]["predictions"]["predicted"])
    )
    assert stats["agreement"] == pytest.approx(same / 40)
    assert stats["significance"]["mcnemar"]["n_discordant"] <= 40 - same
    assert row(table, "ECE")["int8-dynamic-cpu"][0] == "–"


# ------------------------------------------------------------------------------------------------
# Formats and the command line
# ------------------------------------------------------------------------------------------------


def test_json_and_csv_carry_effects_significance_and_verdict(measured):
    fp32 = judgeable(measured["fp32"])
    many = degraded(fp32, "bnb-nf4-cpu", correct_samples(fp32)[:12])
    int8 = judgeable(measured["int8-dynamic"])
    results = with_tolerances([fp32, int8, many], {"max_accuracy_drop": 0.05})

    payload = json.loads(collect.render(typed(results), "json"))[0]
    nf4 = payload["variants"]["bnb-nf4-cpu"]
    assert nf4["effects"]["correct_to_wrong"] == 12 and len(nf4["effects"]["flipped_samples"]) == 12
    assert nf4["significance"]["within_noise"] == {"accuracy": False, "macro_f1": False}
    assert (
        nf4["verdict"]["status"] == "fail"
        and nf4["verdict"]["failures"][0]["tolerance"] == "max_accuracy_drop"
    )
    assert payload["variants"]["fp32-cpu"]["significance"] is None
    assert payload["verdict"]["tolerances"] == {"max_accuracy_drop": 0.05}
    assert payload["verdict"]["best"] in ("fp32-cpu", "int8-dynamic-cpu")
    assert payload["significance_method"]["n_resamples"] == collect.BOOTSTRAP["n_resamples"]
    assert nf4["metrics"]["flip rate"] == pytest.approx(12 / 40)

    rows = list(csv.DictReader(io.StringIO(collect.render(typed(results), "csv"))))
    mine = {r["metric"]: r for r in rows if r["variant"] == "bnb-nf4-cpu"}
    assert mine["accuracy Δ vs baseline (abs)"]["within_noise"] == "false"
    assert float(mine["accuracy Δ vs baseline (abs)"]["ci_high"]) < 0
    assert float(mine["accuracy Δ vs baseline (abs)"]["value"]) == pytest.approx(-12 / 40)
    assert (
        mine["accuracy"]["verdict"] == "fail"
        and mine["accuracy"]["failed_tolerances"] == "max_accuracy_drop"
    )
    assert float(mine["McNemar p"]["value"]) == pytest.approx(2 * 0.5**12)
    best = {r["variant"] for r in rows if r["best"] == "yes"}
    assert best == {payload["verdict"]["best"]}


def test_collect_command_prints_the_verdict_under_the_table(measured, tmp_path, capsys):
    results = with_tolerances(
        [judgeable(measured["fp32"]), judgeable(measured["int8-dynamic"])], {"min_agreement": 0.5}
    )
    for result in results:
        write_result(tmp_path, typed([result])[0])
    assert main(["collect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.index("latency median (ms)") < out.index(
        "verdict against the job's tolerances (min_agreement 0.5)"
    )
    assert "fp32-cpu: pass" in out and "best variant that passes:" in out
    assert main(["collect", str(tmp_path), "--format", "markdown"]) == 0
    assert "### verdict against the job's tolerances" in capsys.readouterr().out
