"""collect on causal-LM results: greedy agreement, the perplexity delta and its paired bootstrap
over windows, the verdict's tolerances and pick, every output format, and the notes when windows
cannot be paired. The results are hand-made (tests/lm_results.py): every expected number is worked
out here from the windows, never taken from collect.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math

import pytest
from conftest import run_cli, typed
from lm_results import BASELINE_GREEDY, lm_result, three_variants

from runner import collect
from runner.results import write_result
from runner.tasks import statistics as effects

pytestmark = pytest.mark.usefixtures("causal_lm_task")

# The rows a classification job's table had before tasks had their own comparisons.
CLASSIFICATION_ROWS = [
    *("size (MiB)", "accuracy", "avg confidence", "macro-F1", "agreement with baseline"),
    *("flip rate", "flips correct→wrong", "flips wrong→correct", "accuracy Δ vs baseline (abs)"),
    *("macro-F1 Δ vs baseline (abs)", "McNemar p", "KL vs baseline (nats)", "ECE"),
    *("confidence change (abs)", "latency mean (ms)", "latency median (ms)", "latency std (ms)"),
    *("latency p90 (ms)", "latency p99 (ms)", "throughput (samples/s)", "peak RSS (MiB)"),
    *("peak CUDA (MiB)", "load (s)", "calibrate (s)", "quantize (s)", "compile (s)"),
]
LM_ROWS = [
    *("perplexity", "perplexity Δ vs baseline (abs)", "bits per byte", "mean NLL (nats/token)"),
    *("scored tokens", "greedy agreement with baseline", "KL vs FP32 (nats/token)"),
    *("generation batch size", "time to first token (ms)", "decode tokens/s"),
    *("decode ms/token median", "KV cache (MiB)"),
    *("token KL median (nats)", "token KL p99 (nats)"),
    *("Δp RMS, correct token", "same top token as FP32", "same top token ± s.e."),
]


def only_table(results: list[dict]) -> collect.JobTable:
    tables = collect.build_tables(typed(results))
    assert len(tables) == 1
    return tables[0]


def cells(table: collect.JobTable, label: str) -> dict[str, tuple[str, str]]:
    """{column key: (value cell, Δ cell)} of one row of the rendered table."""
    _, rows, _ = collect.table_rows(table)
    texts = next(r for r in rows if r[0] == label)
    out, i = {}, 1
    for key in table.columns:
        has_delta = key != table.baseline
        out[key] = (texts[i], texts[i + 1] if has_delta else "")
        i += 2 if has_delta else 1
    return out


def single_window_delta(per_token_nll: float) -> float:
    """The perplexity delta of a resample that is one window three times: the baseline's NLL is
    2.0 on every token, so only the variant's NLL per token on that window counts."""
    return math.exp(per_token_nll) - math.exp(2.0)


def classification_result(variant: str, predicted: list[str]) -> dict:
    """A hand-made classifier's result from before results named their task: no spec.task."""
    precision, device = variant.rsplit("-", 1)
    gold = ["negative", "positive", "negative", "positive"]
    probabilities = [[0.8, 0.2] if p == "negative" else [0.3, 0.7] for p in predicted]
    return {
        "schema_version": 1,
        "job": "tiny-cls",
        "variant": variant,
        "precision": precision,
        "device": device,
        "status": "ok",
        "warnings": [],
        "metrics": {
            "model_size_mib": 10.0,
            "accuracy": sum(p == g for p, g in zip(predicted, gold)) / 4,
            "latency_ms": {"median": 5.0},
        },
        "environment": {"host": "box", "cpu": {"model": "test cpu"}},
        "spec": {"name": "tiny-cls", "baseline": "fp32-cpu"},
        "sample": {"fingerprint": "four"},
        "predictions": {
            "labels": ["negative", "positive"],
            "gold": gold,
            "predicted": predicted,
            "probabilities": probabilities,
        },
    }


# ---------------------------------------------------------------------------------------------
# The statistics, by hand.


def test_greedy_agreement_counts_the_positions_whose_next_token_is_the_baselines():
    table = only_table(three_variants())
    agreement = {key: table.stats[key]["agreement"] for key in table.columns}
    # int8 differs at window 0's last position and window 2's first: 6 of 8; nf4 at one: 7 of 8.
    assert agreement == {"fp32-cpu": 1.0, "int8-dynamic-cpu": 6 / 8, "bnb-nf4-cpu": 7 / 8}
    shown = cells(table, "greedy agreement with baseline")
    assert shown["int8-dynamic-cpu"] == ("0.7500", "")


def test_perplexity_delta_and_its_bootstrap_interval_by_hand():
    """With three windows, each resample that is one window three times has probability 1/27, more
    than the 2.5% in each tail, and the variant's delta rises with its mean NLL per token (the
    baseline's is 2.0 everywhere): the 95% interval's ends are the deltas of its best and worst
    window alone."""
    table = only_table(three_variants())
    int8 = table.stats["int8-dynamic-cpu"]["significance"]["perplexity"]
    # All windows: (1.9·4 + 2.0·2 + 2.3·2) / 8 = 2.025 nats per token.
    assert int8["delta"] == pytest.approx(math.exp(2.025) - math.exp(2.0))
    assert int8["ci_low"] == pytest.approx(single_window_delta(1.9))
    assert int8["ci_high"] == pytest.approx(single_window_delta(2.3))
    assert int8["within_noise"] is True
    nf4 = table.stats["bnb-nf4-cpu"]["significance"]["perplexity"]
    assert nf4["delta"] == pytest.approx(math.exp(2.2) - math.exp(2.0))  # (8.4+4.4+4.8) / 8
    assert nf4["ci_low"] == pytest.approx(single_window_delta(2.1)) and nf4["ci_low"] > 0
    assert nf4["within_noise"] is False
    assert table.stats["fp32-cpu"]["significance"] is None  # the baseline against itself


def test_the_bootstrap_resamples_windows_not_tokens():
    """Token by token, nf4's one bad window (8 tokens at 3.0 nats, the rest as the baseline) would
    be noise among 200 tokens; by windows it is one window in 3, and each resample's perplexity
    weighs it by its tokens."""
    paired = effects.paired_bootstrap_perplexity([8, 96, 96], [16, 192, 192], [24, 192, 192])
    assert paired["delta"] == pytest.approx(math.exp(408 / 200) - math.exp(2.0))
    assert paired["ci_low"] == pytest.approx(0.0)  # resamples without the bad window
    assert paired["ci_high"] == pytest.approx(math.exp(3.0) - math.exp(2.0))  # it, three times
    with pytest.raises(ValueError, match="tokens must be a 1-D array of positive counts"):
        effects.paired_bootstrap_perplexity([4, 0], [8, 0], [8, 0])


def test_the_table_marks_the_delta_within_noise_and_says_what_the_mark_means():
    table = only_table(three_variants())
    perplexity = cells(table, "perplexity")
    assert perplexity["int8-dynamic-cpu"] == (f"{math.exp(2.025):.4f}", "+2.5% ≈")
    assert perplexity["bnb-nf4-cpu"] == (f"{math.exp(2.2):.4f}", "+22.1%")
    delta = cells(table, "perplexity Δ vs baseline (abs)")["int8-dynamic-cpu"][0]
    low, high = single_window_delta(1.9), single_window_delta(2.3)
    assert delta == f"+{math.exp(2.025) - math.exp(2.0):.4f} [{low:+.4f}, +{high:.4f}] ≈"
    _, _, footnotes = collect.table_rows(table)
    assert any("resamples of the windows" in note and "contains 0" in note for note in footnotes)


def test_a_variants_warnings_are_marked_on_its_perplexity():
    results = three_variants()
    results[2]["warnings"] = ["the model repeated one token"]
    table = only_table(results)
    assert cells(table, "perplexity")["bnb-nf4-cpu"][0] == f"{math.exp(2.2):.4f} ⚠1"
    _, _, footnotes = collect.table_rows(table)
    assert "[1] bnb-nf4-cpu: the model repeated one token" in footnotes


def test_window_nll_delta_is_per_scored_token():
    table = only_table(three_variants())
    assert table.stats["int8-dynamic-cpu"]["window_nll_delta"] == pytest.approx([-0.1, 0.0, 0.3])
    assert table.stats["fp32-cpu"]["window_nll_delta"] is None


def test_kl_and_generation_rows_come_from_the_first_batch_size():
    table = only_table(three_variants())
    int8 = table.cells["int8-dynamic-cpu"]
    assert int8["KL vs FP32 (nats/token)"].value == 0.01
    assert int8["KL vs FP32 (nats/token)"].delta is None  # measured against FP32, not a delta
    assert int8["generation batch size"].value == 1
    assert int8["decode tokens/s"].value == 250.0
    assert int8["decode tokens/s"].delta == pytest.approx(1.5)  # 250 against 100
    assert int8["decode ms/token median"].value == pytest.approx(4.0)  # not batch 8's
    assert int8["KV cache (MiB)"].value == 0.75
    assert int8["latency median (ms)"].value == 20.0  # the rows every task has follow


# ---------------------------------------------------------------------------------------------
# Pairing: the notes.


def test_another_sample_gives_a_note_and_no_statistics():
    results = three_variants()
    results[1]["sample"]["fingerprint"] = "other-docs"
    table = only_table(results)
    assert "int8-dynamic-cpu: evaluated on a different sample than the baseline; no agreement" in (
        table.notes
    )
    stats = table.stats["int8-dynamic-cpu"]
    assert stats["agreement"] is None and stats["significance"] is None
    assert stats["perplexity_increase"] is None
    assert table.stats["bnb-nf4-cpu"]["agreement"] == 7 / 8  # the others still pair


@pytest.mark.parametrize(
    "key, value, greedy",
    [
        ("tokens", [4, 3, 1], [[1, 2, 3, 4], [5, 6, 7], [8]]),  # the same 8 tokens, cut elsewhere
        ("document", [0, 1, 1], BASELINE_GREEDY),  # the same counts from other documents
    ],
)
def test_other_windows_give_a_note_and_no_agreement(key, value, greedy):
    results = three_variants()
    other = results[2]["predictions"]
    other["windows"][key] = value
    other["greedy"] = greedy
    table = only_table(results)
    assert any(
        note.startswith("bnb-nf4-cpu: its windows are not the baseline's") for note in table.notes
    )
    stats = table.stats["bnb-nf4-cpu"]
    assert stats["agreement"] is None and stats["significance"] is None
    # The perplexity itself is the same sample's: its increase is still measured.
    assert stats["perplexity_increase"] == pytest.approx(math.exp(0.2) - 1)


def test_a_result_without_windows_says_so_once():
    results = three_variants()
    del results[0]["predictions"]  # the baseline kept none
    table = only_table(results)
    said = [note for note in table.notes if "no per-window predictions" in note]
    assert said == [
        "fp32-cpu: no per-window predictions: no greedy agreement or perplexity interval"
    ]


# ---------------------------------------------------------------------------------------------
# The verdict.


def test_verdict_checks_agreement_and_perplexity_increase_and_picks_the_fastest_decode():
    tolerances = {"min_agreement": 0.7, "max_perplexity_increase": 0.05}
    table = only_table(three_variants(tolerances))
    verdicts = {key: table.stats[key]["verdict"]["status"] for key in table.columns}
    assert verdicts == {"fp32-cpu": "pass", "int8-dynamic-cpu": "pass", "bnb-nf4-cpu": "fail"}
    (failure,) = table.stats["bnb-nf4-cpu"]["verdict"]["failures"]
    increase = math.exp(0.2) - 1  # exp(2.2) / exp(2.0) - 1
    assert failure["value"] == pytest.approx(increase)
    assert failure["reason"] == (
        f"perplexity increase {increase:.4f} > max_perplexity_increase 0.05"
    )
    # int8 decodes faster than FP32 though its window pass is slower: decode speed decides.
    assert table.best == "int8-dynamic-cpu"
    assert "fastest decode" in collect.verdict_lines(table)[-1]


def test_agreement_below_its_floor_fails_and_an_unpaired_variant_is_not_measured():
    results = three_variants({"min_agreement": 0.8})
    results[2]["sample"]["fingerprint"] = "other-docs"
    table = only_table(results)
    (low,) = table.stats["int8-dynamic-cpu"]["verdict"]["failures"]
    assert low["reason"] == "greedy agreement 0.7500 < min_agreement 0.8"
    (unpaired,) = table.stats["bnb-nf4-cpu"]["verdict"]["failures"]
    assert unpaired["reason"] == (
        "greedy agreement not measured against a baseline on the same sample"
    )


def test_a_classifiers_tolerance_is_ignored_with_a_note():
    table = only_table(three_variants({"max_accuracy_drop": 0.01, "max_size_mib": 200}))
    assert table.tolerances == {"max_size_mib": 200.0}
    assert (
        "tolerances that do not apply to a causal-lm job ignored: max_accuracy_drop" in table.notes
    )
    assert table.stats["fp32-cpu"]["verdict"]["status"] == "fail"  # 400 MiB > 200


# ---------------------------------------------------------------------------------------------
# Tasks side by side, and one this quantbench does not know.


def test_a_classification_job_keeps_its_rows_beside_a_causal_lm_job():
    classifier = [
        classification_result("fp32-cpu", ["negative", "positive", "negative", "positive"]),
        classification_result("int8-dynamic-cpu", ["negative", "positive", "positive", "positive"]),
    ]
    tables = {t.job: t for t in collect.build_tables(typed(classifier + three_variants()))}
    assert [row.label for row in tables["tiny-cls"].rows] == CLASSIFICATION_ROWS
    assert tables["tiny-cls"].task == "classification"
    assert tables["tiny-cls"].stats["int8-dynamic-cpu"]["agreement"] == 3 / 4
    first, last = CLASSIFICATION_ROWS[:1], CLASSIFICATION_ROWS[14:]
    assert [row.label for row in tables["tiny-lm"].rows] == first + LM_ROWS + last
    assert tables["tiny-lm"].task == "causal-lm"


def test_an_unknown_task_gets_only_the_rows_every_task_has():
    results = [
        lm_result("fp32-cpu", [2.0] * 3, BASELINE_GREEDY, 100.0, 400.0, task="translation"),
    ]
    table = only_table(results)
    assert any("task 'translation' is not known" in note for note in table.notes)
    labels = [row.label for row in table.rows]
    assert labels == CLASSIFICATION_ROWS[:1] + CLASSIFICATION_ROWS[14:]


# ---------------------------------------------------------------------------------------------
# Every output format, through the command line.


@pytest.fixture
def folder(tmp_path):
    for result in three_variants({"min_agreement": 0.7, "max_perplexity_increase": 0.05}):
        write_result(tmp_path / "results", typed([result])[0])
    return tmp_path / "results"


def test_json_carries_the_rows_statistics_and_verdict(folder, capsys):
    code, out, _ = run_cli(capsys, "collect", folder, "--format", "json")
    assert code == 0
    (table,) = json.loads(out)
    int8 = table["variants"]["int8-dynamic-cpu"]
    assert set(LM_ROWS) <= set(int8["metrics"])
    assert int8["metrics"]["greedy agreement with baseline"] == 0.75
    assert int8["metrics"]["KL vs FP32 (nats/token)"] == 0.01
    assert int8["deltas"]["decode tokens/s"] == pytest.approx(1.5)
    assert int8["significance"]["within_noise"] == {"perplexity": True}
    assert int8["window_nll_delta"] == pytest.approx([-0.1, 0.0, 0.3])
    assert table["verdict"]["best"] == "int8-dynamic-cpu"
    assert table["verdict"]["rule"].startswith("fastest decode")
    assert "resamples of the windows" in table["significance_method"]["rule"]


def test_csv_carries_a_row_per_metric_with_its_interval(folder, capsys):
    code, out, _ = run_cli(capsys, "collect", folder, "--format", "csv")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    int8 = {r["metric"]: r for r in rows if r["variant"] == "int8-dynamic-cpu"}
    assert set(LM_ROWS) <= set(int8)
    delta = int8["perplexity Δ vs baseline (abs)"]
    assert float(delta["ci_low"]) == pytest.approx(single_window_delta(1.9))
    assert delta["within_noise"] == "true" and delta["best"] == "yes"
    assert float(int8["greedy agreement with baseline"]["value"]) == 0.75


@pytest.mark.parametrize("fmt", ["markdown", "table"])
def test_text_formats_carry_the_rows_and_the_verdict(folder, capsys, fmt):
    code, out, _ = run_cli(capsys, "collect", folder, "--format", fmt)
    assert code == 0
    for label in LM_ROWS:
        assert label in out
    assert "bnb-nf4-cpu: fail: perplexity increase 0.2214 > max_perplexity_increase 0.05" in out
    assert "best variant that passes: int8-dynamic-cpu (fastest decode" in out


def test_results_are_not_changed_by_collect():
    """collect reads: the result dicts it is given stay as they were."""
    results = three_variants()
    before = copy.deepcopy(results)
    collect.render(typed(results), "json")
    assert results == before
