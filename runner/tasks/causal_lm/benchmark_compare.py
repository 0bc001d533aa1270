"""A causal LM's benchmark tasks (lm-evaluation-harness) in collect: per task and metric, against
the baseline, the score with lm-eval's stderr, the delta with a paired bootstrap interval over the
items, McNemar's exact p and the flips both ways where every item is 0 or 1, and the recovery.

A result keeps its benchmarks in metrics.benchmarks (each task's scores and what it ran: config
hash, few-shot, limit, lm-eval's version) and predictions.benchmarks (per task, per item: doc_id
and each metric's value). Two results' items pair by doc_id, and only when the task's
config_sha256, num_fewshot, limit and lm-eval's version are the same on both sides: otherwise the
difference would not be the quantization's, and the notes say which differs.

Recovery is the variant's score over the baseline's (the baseline's over the variant's for a
metric where lower is better): 1.0 is the baseline's quality, 0.99 keeps 99% of it (MLPerf's
closed division). `min_recovery` judges the lowest over the tasks' primary metrics.

The rows depend on the job's tasks and metrics, so they are built from the results (rows()).
"""

from __future__ import annotations

import numpy as np

from runner.schema import Result
from runner.tasks import statistics
from runner.tasks.task import BOOTSTRAP, Row

# The fields of a task's record that must be equal on both sides for its items to pair.
PAIRED_FIELDS = ("config_sha256", "num_fewshot", "limit")

# Each row's label is "<task> <metric>" and one of these (short: labels fit collect's blocks).
SCORE, STDERR, DELTA = "", " ± s.e.", " Δ (abs)"
MCNEMAR, RIGHT_TO_WRONG, WRONG_TO_RIGHT, RECOVERY = " McNemar p", " r→w", " w→r", " recovery"

LEGEND = (
    "benchmark rows: r→w counts the items the baseline got right and this variant wrong, w→r the "
    "reverse; recovery = score / the baseline's (the baseline's / score where lower is better); "
    "Δ (abs) with its paired-bootstrap 95% interval over the items, paired by doc_id"
)


def tasks_of(result: Result | None) -> dict:
    """metrics.benchmarks' tasks, by name ({} without)."""
    if result is None:
        return {}
    return (result.metrics.value("benchmarks") or {}).get("tasks") or {}


def _items_of(result: Result, task: str) -> dict | None:
    """predictions.benchmarks' per-item record of one task (None without)."""
    kept = getattr(result.predictions, "benchmarks", None) if result.predictions else None
    return (kept or {}).get(task)


def _version_of(result: Result) -> str | None:
    return (result.metrics.value("benchmarks") or {}).get("lm_eval_version")


def _score(task: str, name: str, field: str):
    """A row's getter of one of lm-eval's numbers (value, stderr) of a task's metric."""

    def get(result: Result, stats: dict) -> float | None:
        record = (tasks_of(result).get(task) or {}).get("metrics") or {}
        value = (record.get(name) or {}).get(field)
        return value if isinstance(value, int | float) else None  # lm-eval writes "N/A"

    return get


def _stat(task: str, name: str, *path: str):
    """A row's getter of one of compare's numbers for a task's metric."""

    def get(result: Result, stats: dict) -> float | None:
        found = ((stats.get("benchmarks") or {}).get(task) or {}).get(name) or {}
        for step in path:
            found = found.get(step) if isinstance(found, dict) else None
        return found

    return get


def significance_key(task: str, name: str) -> str:
    return f"{task} {name}"


def measured(results: list[Result]) -> list[tuple[str, str, bool]]:
    """Every (task, metric, whether it is the task's primary metric) an ok result measured, in
    the first result's order (the baseline's first: the caller orders them)."""
    found: dict[tuple[str, str], bool] = {}
    for result in results:
        if result.status != "ok":
            continue
        for task, record in tasks_of(result).items():
            for name in record.get("metrics") or {}:
                primary = name == record.get("primary")
                found[(task, name)] = found.get((task, name), False) or primary
    return [(task, name, primary) for (task, name), primary in found.items()]


def rows(results: list[Result]) -> tuple[Row, ...]:
    """collect's rows for the benchmarks the results measured: seven for each task's primary
    metric (what recovery and min_recovery judge), the score alone for its others."""
    made = []
    for task, name, primary in measured(results):
        label, key = f"{task} {name}", significance_key(task, name)
        made.append(Row(label + SCORE, _score(task, name, "value"), 4, noise=key))
        if not primary:
            continue
        made += [
            Row(label + STDERR, _score(task, name, "stderr"), 4, delta=False),
            Row(label + DELTA, _stat(task, name, "bootstrap", "delta"), 4, False, True, key),
            Row(label + MCNEMAR, _stat(task, name, "mcnemar", "p_value"), None, delta=False),
            Row(label + RIGHT_TO_WRONG, _stat(task, name, "flips", "right_to_wrong"), 0, False),
            Row(label + WRONG_TO_RIGHT, _stat(task, name, "flips", "wrong_to_right"), 0, False),
            Row(label + RECOVERY, _stat(task, name, "recovery"), 4, delta=False),
        ]
    return tuple(made)


# ---------------------------------------------------------------------------------------------
# Statistics against the baseline: one plain dict per variant.


def compare(result: Result, baseline: Result) -> tuple[dict, list[str]]:
    """({benchmarks, min_recovery, significance, refused_deltas}, notes) of a result against the
    baseline ({} and no notes where neither ran a benchmark).

    benchmarks: per task, per metric: recovery, and from the paired items bootstrap (not in the
    baseline's own column), mcnemar and flips (0/1 items only); min_recovery: the lowest
    recovery over the baseline's tasks' primary metrics, None where one is not measured.
    """
    mine, theirs = tasks_of(result), tasks_of(baseline)
    if not mine and not theirs:
        return {}, []
    found, notes, refused, significance = {}, [], [], {}
    for task in dict.fromkeys([*theirs, *mine]):
        why = unpaired(task, result, baseline)
        if why:
            notes.append(f"benchmark {task}: {why}")
            names = {**(theirs.get(task) or {}).get("metrics", {}), **_metrics(mine.get(task))}
            refused += [f"{task} {name}{SCORE}" for name in names]
            continue
        per_metric, note = _paired_task(task, result, baseline)
        found[task] = per_metric
        notes += [f"benchmark {task}: {note}"] if note else []
        for name, entry in per_metric.items():
            if "bootstrap" in entry:
                significance[significance_key(task, name)] = entry["bootstrap"]
    if result is baseline:
        notes.append(LEGEND)
    stats = {"benchmarks": found, "min_recovery": lowest_recovery(theirs, found)}
    stats["significance"] = significance
    stats["refused_deltas"] = refused
    return stats, notes


def _metrics(record: dict | None) -> dict:
    return (record or {}).get("metrics") or {}


def unpaired(task: str, result: Result, baseline: Result) -> str | None:
    """Why a task's scores of the two results cannot be compared, or None when they can."""
    mine, theirs = tasks_of(result).get(task), tasks_of(baseline).get(task)
    if result is baseline:
        return f"failed: {mine['error']}" if mine.get("error") else None
    if theirs is None:
        return "not run by the baseline: no delta or recovery"
    if mine is None:
        return "not run by this variant: no delta or recovery"
    if mine.get("error"):
        return f"failed on this variant: {mine['error']}"
    if theirs.get("error"):
        return "failed on the baseline: no delta or recovery"
    differ = [
        f"{field} {_shown(mine.get(field))} here, {_shown(theirs.get(field))} on the baseline"
        for field in PAIRED_FIELDS
        if mine.get(field) != theirs.get(field)
    ]
    versions = _version_of(result), _version_of(baseline)
    if versions[0] != versions[1]:
        differ.append(f"lm-eval {versions[0]} here, {versions[1]} on the baseline")
    if not differ:
        return None
    return (
        f"{'; '.join(differ)}: not the same evaluation, so no delta, interval, McNemar, flips or "
        "recovery (their difference would not be the quantization's)"
    )


def _shown(value) -> str:
    """A field's value in a note: a hash cut to 12 characters."""
    return value[:12] if isinstance(value, str) and len(value) > 12 else str(value)


def _paired_task(task: str, result: Result, baseline: Result) -> tuple[dict, str | None]:
    """Per metric of a task both results ran alike: its recovery and, from the items paired by
    doc_id, the bootstrap, McNemar and flips; a note where the items cannot be paired."""
    mine, theirs = tasks_of(result)[task], tasks_of(baseline)[task]
    paired, note = _paired_items(_items_of(result, task), _items_of(baseline, task))
    found = {}
    for name, record in _metrics(mine).items():
        base = _metrics(theirs).get(name) or {}
        entry = {"recovery": recovery(record.get("value"), base.get("value"), record)}
        if paired is not None and name in paired:
            entry.update(_item_statistics(*paired[name], result is baseline))
        found[name] = entry
    return found, note


def recovery(value, base_value, record: dict) -> float | None:
    """The variant's score over the baseline's, inverted where lower is better; None where a
    score is missing or the denominator is 0."""
    if not isinstance(value, int | float) or not isinstance(base_value, int | float):
        return None
    higher = record.get("higher_is_better", True) is not False
    top, bottom = (value, base_value) if higher else (base_value, value)
    return top / bottom if bottom else None


def _paired_items(mine: dict | None, theirs: dict | None) -> tuple[dict | None, str | None]:
    """{metric: (baseline's values, variant's values)} in the baseline's doc_id order, for the
    metrics both sides kept per item; None and why where the items cannot be paired."""
    if mine is None or theirs is None:
        return None, "no per-item record: no interval, McNemar or flips"
    where = {doc: i for i, doc in enumerate(mine["doc_id"])}
    if sorted(where) != sorted(theirs["doc_id"]):
        return None, "its items are not the baseline's documents: no interval, McNemar or flips"
    order = [where[doc] for doc in theirs["doc_id"]]
    mine_items, their_items = mine.get("items") or {}, theirs.get("items") or {}
    return {
        name: (values, [mine_items[name][i] for i in order])
        for name, values in their_items.items()
        if name in mine_items
    }, None


def _item_statistics(base: list[float], variant: list[float], is_baseline: bool) -> dict:
    """The bootstrap of the delta (not against itself), and McNemar with the flips where every
    item is 0 or 1 (accuracy-type metrics)."""
    found = {}
    if not is_baseline:
        found["bootstrap"] = statistics.paired_bootstrap_mean(base, variant, **BOOTSTRAP)
    values = np.asarray([*base, *variant], dtype=np.float64)
    if np.all((values == 0.0) | (values == 1.0)):
        right = np.ones(len(base), dtype=np.int64)  # "gold" is 1: an item is right or wrong
        test = statistics.mcnemar_exact(right, np.asarray(base, int), np.asarray(variant, int))
        found["mcnemar"] = test
        found["flips"] = {"right_to_wrong": test["b"], "wrong_to_right": test["c"]}
    return found


def lowest_recovery(theirs: dict, found: dict) -> float | None:
    """The lowest recovery over the baseline's tasks' primary metrics; None where the baseline
    ran none, or one of them has no recovery here (failed, not run, not paired)."""
    recoveries = []
    for task, record in theirs.items():
        if record.get("error"):
            return None
        primary = record.get("primary")
        value = ((found.get(task) or {}).get(primary) or {}).get("recovery")
        if value is None:
            return None
        recoveries.append(value)
    return min(recoveries) if recoveries else None
