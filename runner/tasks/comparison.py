"""What `collect` compares for a task: its metric rows, its statistics against the baseline, the
tolerances only it can check and how it picks the best variant.

A task hands collect one `Comparison` (`Task.comparison`). The rest of the table is every task's
and stays in collect: gathering results, the columns, the rows every result has (size, latency,
memory, load times), the verdict and the output formats. Plain functions of results and numpy; no
torch, so `collect` runs without it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from runner.schema import Result

# How a delta is called noise: a percentile interval of a paired bootstrap that contains 0 (and, for
# a classifier's accuracy, McNemar's exact test at ALPHA). Seeded, so the same results always give
# the same marks.
BOOTSTRAP = {"n_resamples": 2000, "confidence": 0.95, "seed": 0}
ALPHA = 0.05
NOISE_MARK = "≈"


@dataclass(frozen=True)
class Row:
    label: str
    get: Callable[[Result, dict], float | None]  # (result, its statistics from compare) -> value
    digits: int | None = 4  # None: three significant digits
    delta: bool = True  # whether a relative delta means anything for this metric
    signed: bool = False
    # A key of the statistics' "significance" (e.g. "accuracy"): the delta cell (or, in a row of
    # absolute deltas, the value cell with its bootstrap interval) carries the within-noise mark.
    noise: str | None = None
    # Whether the column's warnings are marked (⚠1,2) in this row's cells: the task's headline.
    carries_warnings: bool = False


def metric(name: str) -> Callable[[Result, dict], float | None]:
    """A row's getter for one of the result's metrics."""
    return lambda r, s: r.metrics.value(name)


def latency(name: str) -> Callable[[Result, dict], float | None]:
    """A row's getter for one statistic of the result's per-pass latency."""
    return lambda r, s: getattr(r.metrics.latency, name)


@dataclass
class Compared:
    """One column's statistics against the baseline, and what the table should say about them
    (each note is prefixed with the column's key)."""

    stats: dict
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Check:
    """How one tolerance measures a variant: `measure(result, its statistics, the baseline or
    None)` gives the value held against the limit (None: not measured); min_* tolerances are
    floors, max_* ceilings."""

    what: str  # said in a failure: "accuracy drop 0.0300 > max_accuracy_drop 0.01"
    measure: Callable[[Result, dict, Result | None], float | None]
    shown: str  # the value's format: "{:.4f}"
    against_baseline: bool = False  # measured against the baseline's predictions


def no_comparison(result: Result, baseline: Result | None) -> Compared:
    """A task with nothing of its own to compare: no statistics."""
    return Compared({})


def fastest_median_latency(result: Result) -> tuple:
    """Sort key of the verdict's pick: the fastest median latency, the smaller model on a tie."""
    metrics = result.metrics
    median = metrics.latency.median
    return (median is None, median or 0.0, metrics.model_size_mib or 0.0)


@dataclass(frozen=True)
class Comparison:
    """A task's part of collect's table and of the report's plots."""

    # The task's rows, between the size row and the rows every result has (latency, memory, ...).
    rows: tuple[Row, ...] = ()
    # (a column's result, the baseline's or None) -> Compared. The result may have failed; the
    # baseline is the result itself in the baseline's own column, None where the job has no ok
    # baseline.
    compare: Callable[[Result, Result | None], Compared] = no_comparison
    # The tolerances (spec.TOLERANCES) that only this task can measure; collect checks the others.
    checks: dict[str, Check] = field(default_factory=dict)
    # The verdict's pick among the variants that pass: the one first by best_key.
    best_rule: str = "fastest median latency among passing"
    best_key: Callable[[Result], tuple] = fastest_median_latency
    # What the within-noise mark means, under the table and in the JSON's significance_method.
    noise_rule: str = ""
    # The report's plots of this task, by name (report.PLOTS); the weight plots are every task's.
    plots: tuple[str, ...] = ()


def sample_note(result: Result, baseline: Result) -> str | None:
    """Why the result cannot be paired with the baseline's sample, or None when it can."""
    if result.fingerprint != baseline.fingerprint:
        return "evaluated on a different sample than the baseline; no agreement"
    return None
