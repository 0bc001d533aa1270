"""collect on causal-LM results that ran benchmark tasks (lm-evaluation-harness): per task and
metric against the baseline, the score with its stderr, the delta and its paired bootstrap over
the items, McNemar's p, the flips both ways and the recovery; the refusal to pair two different
evaluations; and the verdict's min_recovery.

The results are tests/lm_results.py's causal-LM results with a benchmark added in the shape the
runner writes (metrics.benchmarks, predictions.benchmarks: docs/benchmarks.md). Every
expected number is worked out here from the items, never taken from collect.
"""

from __future__ import annotations

import math

import pytest
from conftest import typed
from lm_results import BASELINE_GREEDY, lm_result

from runner import collect
from runner.tasks import statistics
from runner.tasks.task import BOOTSTRAP

pytestmark = pytest.mark.usefixtures("causal_lm_task")

TASK = "qb_rt_polarity"
# Ten documents; the baseline gets 7 right, the variant 5: the baseline alone is right on
# documents 1, 2 and 9 (3 right→wrong), the variant alone on document 5 (1 wrong→right).
DOC_IDS = list(range(10))
BASELINE_ACC = [1, 1, 1, 1, 1, 0, 0, 0, 1, 1]
VARIANT_ACC = [1, 0, 0, 1, 1, 1, 0, 0, 1, 0]
# A metric whose per-item value is not 0/1 and where lower is better.
BASELINE_NLL = [0.5] * 10
VARIANT_NLL = [0.5] * 5 + [1.0] * 5


def with_benchmark(
    result: dict,
    acc: list[int],
    nll: list[float],
    doc_ids: list[int] = DOC_IDS,
    **fields,
) -> dict:
    """The result with TASK run on the documents doc_ids (items in that order): its scores in
    metrics.benchmarks, its items in predictions.benchmarks; fields replace the task's record's."""
    n = len(acc)
    mean_acc, mean_nll = sum(acc) / n, sum(nll) / n
    record = {
        "source": "lm_eval_tasks/rt_polarity/rt_polarity.yaml",
        "config_sha256": "c0ffee" * 10,
        "task_hash": "abc",
        "version": 1.0,
        "num_fewshot": 0,
        "limit": 10,
        "n_docs": {"original": 10662, "effective": n},
        "output_type": "multiple_choice",
        "metrics": {
            "acc": {
                "value": mean_acc,
                "stderr": math.sqrt(mean_acc * (1 - mean_acc) / (n - 1)),
                "higher_is_better": True,
            },
            "nll": {"value": mean_nll, "stderr": 0.01, "higher_is_better": False},
        },
        "primary": "acc",
        "seconds": 1.0,
        "truncated_requests": 0,
        **fields,
    }
    version = fields.pop("lm_eval_version", "0.4.13")
    record.pop("lm_eval_version", None)
    result["metrics"]["benchmarks"] = {"lm_eval_version": version, "tasks": {TASK: record}}
    result["predictions"]["benchmarks"] = {
        TASK: {
            "doc_id": list(doc_ids),
            "gold": [0] * n,
            "pred": [0 if a else 1 for a in acc],
            "items": {"acc": [float(a) for a in acc], "nll": list(nll)},
        }
    }
    return result


def two_results(tolerances: dict | None = None, **variant_fields) -> list[dict]:
    """FP32 (the baseline) and int8, both with the benchmark; the int8's items are stored in
    reverse document order, so only pairing by doc_id gives the numbers above."""
    base = lm_result("fp32-cpu", [2.0] * 3, BASELINE_GREEDY, 100.0, 400.0, tolerances=tolerances)
    variant = lm_result(
        "int8-dynamic-cpu", [2.0] * 3, BASELINE_GREEDY, 250.0, 100.0, tolerances=tolerances
    )
    return [
        with_benchmark(base, BASELINE_ACC, BASELINE_NLL),
        with_benchmark(
            variant, VARIANT_ACC[::-1], VARIANT_NLL[::-1], DOC_IDS[::-1], **variant_fields
        ),
    ]


def only_table(results: list[dict]) -> collect.JobTable:
    (table,) = collect.build_tables(typed(results))
    return table


def row_texts(table: collect.JobTable, label: str) -> list[str]:
    """One rendered row's cells after its label: baseline, variant, the variant's Δ."""
    _, rows, _ = collect.table_rows(table)
    return next(row for row in rows if row[0] == label)[1:]


def test_flips_mcnemar_recovery_and_the_delta_worked_out_from_the_items():
    table = only_table(two_results())
    acc = table.stats["int8-dynamic-cpu"]["benchmarks"][TASK]["acc"]
    assert acc["flips"] == {"right_to_wrong": 3, "wrong_to_right": 1}
    # Exact two-sided binomial test of 1 of 4 discordant items at 1/2: 2 * (1 + 4) / 16.
    assert acc["mcnemar"]["p_value"] == pytest.approx(10 / 16)
    assert acc["recovery"] == pytest.approx(0.5 / 0.7)
    expected = statistics.paired_bootstrap_mean(BASELINE_ACC, VARIANT_ACC, **BOOTSTRAP)
    assert acc["bootstrap"] == expected
    assert acc["bootstrap"]["delta"] == pytest.approx(-0.2)
    assert acc["bootstrap"]["ci_low"] <= -0.2 <= acc["bootstrap"]["ci_high"]
    nll = table.stats["int8-dynamic-cpu"]["benchmarks"][TASK]["nll"]
    assert nll["recovery"] == pytest.approx(0.5 / 0.75)  # lower is better: baseline / variant
    assert "mcnemar" not in nll and "flips" not in nll  # its items are not 0/1
    assert table.stats["int8-dynamic-cpu"]["min_recovery"] == pytest.approx(0.5 / 0.7)

    low, high = acc["bootstrap"]["ci_low"], acc["bootstrap"]["ci_high"]
    assert low <= 0 <= high  # 10 items: a delta of -0.2 is within noise, marked ≈
    assert row_texts(table, f"{TASK} acc") == ["0.7000", "0.5000", "-28.6% ≈"]
    assert row_texts(table, f"{TASK} acc r→w") == ["0", "3", ""]
    assert row_texts(table, f"{TASK} acc w→r") == ["0", "1", ""]
    assert row_texts(table, f"{TASK} acc McNemar p") == ["1", "0.625", ""]
    assert row_texts(table, f"{TASK} acc recovery") == ["1.0000", "0.7143", ""]
    assert row_texts(table, f"{TASK} acc ± s.e.")[:2] == [
        f"{math.sqrt(0.7 * 0.3 / 9):.4f}",
        f"{math.sqrt(0.5 * 0.5 / 9):.4f}",
    ]
    assert row_texts(table, f"{TASK} acc Δ (abs)")[1] == (f"-0.2000 [{low:+.4f}, {high:+.4f}] ≈")


def test_the_baseline_against_itself_has_no_flips_recovery_one_and_p_one():
    table = only_table(two_results())
    acc = table.stats["fp32-cpu"]["benchmarks"][TASK]["acc"]
    assert acc["flips"] == {"right_to_wrong": 0, "wrong_to_right": 0}
    assert acc["mcnemar"]["p_value"] == 1.0
    assert acc["recovery"] == 1.0
    assert "bootstrap" not in acc  # no interval of a delta against itself
    assert table.stats["fp32-cpu"]["min_recovery"] == 1.0


@pytest.mark.parametrize(
    ("fields", "said"),
    [
        ({"config_sha256": "beef" * 16}, "config_sha256 beefbeefbeef here, c0ffeec0ffee on the"),
        ({"num_fewshot": 5}, "num_fewshot 5 here, 0 on the baseline"),
        ({"limit": 200}, "limit 200 here, 10 on the baseline"),
        ({"lm_eval_version": "0.4.9"}, "lm-eval 0.4.9 here, 0.4.13 on the baseline"),
    ],
)
def test_two_different_evaluations_are_not_paired_and_the_note_says_which_differs(fields, said):
    table = only_table(two_results(**fields))
    (note,) = [n for n in table.notes if n.startswith(f"int8-dynamic-cpu: benchmark {TASK}")]
    assert said in note and "not the same evaluation" in note
    assert table.stats["int8-dynamic-cpu"]["benchmarks"] == {}
    assert table.stats["int8-dynamic-cpu"]["min_recovery"] is None
    # Its scores are shown; no delta cell, no interval, McNemar, flips or recovery.
    assert row_texts(table, f"{TASK} acc")[1:] == ["0.5000", ""]
    for suffix in (" Δ (abs)", " McNemar p", " r→w", " w→r", " recovery"):
        assert row_texts(table, f"{TASK} acc{suffix}")[1] == "–"


def test_a_task_that_failed_on_the_variant_is_not_compared_and_its_error_is_said():
    results = two_results()
    results[1]["metrics"]["benchmarks"]["tasks"][TASK] = {
        "source": "qb_rt_polarity",
        "error": "KeyError: 'label'",
    }
    table = only_table(results)
    assert (
        f"int8-dynamic-cpu: benchmark {TASK}: failed on this variant: KeyError: 'label'"
        in table.notes
    )
    assert row_texts(table, f"{TASK} acc")[1:] == ["–", ""]
    assert table.stats["int8-dynamic-cpu"]["min_recovery"] is None


def verdict(tolerances: dict, results: list[dict] | None = None) -> dict:
    table = only_table(results or two_results(tolerances))
    return table.stats["int8-dynamic-cpu"]["verdict"]


def test_min_recovery_met_failed_and_not_measured_in_the_verdict():
    assert verdict({"min_recovery": 0.7})["status"] == "pass"  # 0.7143

    failed = verdict({"min_recovery": 0.99})
    assert failed["status"] == "fail"
    (failure,) = failed["failures"]
    assert failure["reason"] == "benchmark recovery 0.7143 < min_recovery 0.99"

    results = two_results({"min_recovery": 0.7})
    del results[1]["metrics"]["benchmarks"], results[1]["predictions"]["benchmarks"]
    unmeasured = verdict({}, results)
    assert unmeasured["status"] == "fail"
    (failure,) = unmeasured["failures"]
    assert failure["value"] is None
    assert failure["reason"] == "benchmark recovery not measured"


def test_the_rows_fit_80_columns_and_a_row_is_chosen_by_its_label():
    tables = collect.build_tables(typed(two_results()))
    text = collect._as_table(tables, 80)
    assert f"{TASK} acc McNemar p" in text
    assert not [line for line in text.splitlines() if len(line) > 80]
    (chosen,) = collect.choose(tables, None, [f"{TASK} acc"])
    assert chosen.shown_rows == (f"{TASK} acc",)


def test_results_without_benchmarks_keep_the_causal_lm_rows():
    results = two_results()
    for result in results:
        del result["metrics"]["benchmarks"], result["predictions"]["benchmarks"]
    table = only_table(results)
    assert not any(row.label.startswith(TASK) for row in table.rows)
    assert "min_recovery" not in table.stats["int8-dynamic-cpu"]
