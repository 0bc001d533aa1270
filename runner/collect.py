"""Collect: results from any number of runs and machines, merged into one comparison table per job.

Rows are metrics, columns are variants (each naming the hardware it ran on) with a delta column
against the baseline: (variant - baseline) / baseline, so a smaller model shows a negative size
delta and a slower one a positive latency delta. What the predictions say is computed here, from the
per-sample predictions each result keeps: agreement and flips against the baseline, KL divergence,
calibration, and whether the accuracy and macro-F1 deltas are beyond noise. A job's tolerances give
each variant a deployment verdict. Output formats are a registry: table, markdown, csv, json.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tabulate import tabulate

from runner import effects
from runner.measure import hardware_label
from runner.precisions import PRECISIONS
from runner.results import Predictions, Result, as_result, walk
from runner.spec import RESERVED_NAMES, TOLERANCES

PRECISION_ORDER = list(PRECISIONS)  # the table's columns in the registry's order

# How a delta is called noise: a percentile interval of a paired bootstrap that contains 0 and, for
# accuracy, McNemar's exact test at ALPHA. Seeded, so the same results always give the same marks.
BOOTSTRAP = {"n_resamples": 2000, "confidence": 0.95, "seed": 0}
ALPHA = 0.05
NOISE_MARK = "≈"
# The verdict's pick among variants that pass.
BEST_RULE = "fastest median latency among passing"


@dataclass(frozen=True)
class Row:
    label: str
    get: Callable[[Result, dict], float | None]  # (result, its statistics from compare()) -> value
    digits: int | None = 4  # None: three significant digits
    delta: bool = True  # whether a relative delta means anything for this metric
    signed: bool = False
    # "accuracy" | "macro_f1": the delta cell (or, in a row of absolute deltas, the value cell with
    # its
    # bootstrap interval) carries the within-noise mark.
    noise: str | None = None


def _metric(name: str):
    return lambda r, s: getattr(r.metrics, name)


def _latency(name: str):
    return lambda r, s: getattr(r.metrics.latency, name)


def _effect(name: str):
    return lambda r, s: (s.get("effects") or {}).get(name)


def _delta_of(metric: str):
    return lambda r, s: ((s.get("significance") or {}).get(metric) or {}).get("delta")


def _mcnemar(name: str):
    return lambda r, s: ((s.get("significance") or {}).get("mcnemar") or {}).get(name)


ROWS = [
    Row("size (MiB)", _metric("model_size_mib"), 2),
    Row("accuracy", _metric("accuracy"), 4, noise="accuracy"),
    Row("avg confidence", _metric("avg_confidence"), 4),
    Row("macro-F1", _metric("macro_f1"), 4, noise="macro_f1"),
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
    Row("latency mean (ms)", _latency("mean"), 2),
    Row("latency median (ms)", _latency("median"), 2),
    Row("latency std (ms)", _latency("std"), 2),
    Row("latency p90 (ms)", _latency("p90"), 2),
    Row("latency p99 (ms)", _latency("p99"), 2),
    Row("throughput (samples/s)", _metric("throughput_sps"), 1),
    Row("peak RSS (MiB)", _metric("peak_rss_mib"), 0),
    Row("peak CUDA (MiB)", _metric("peak_cuda_mib"), 0),
    Row("load (s)", _metric("load_s"), 2),
    Row("quantize (s)", _metric("quantize_s"), 2),
    Row("compile (s)", _metric("compile_s"), 2),
]


@dataclass
class JobTable:
    job: str
    baseline: str | None
    columns: list[str]  # column keys, baseline first
    results: dict[str, Result]  # column key -> result
    notes: list[str] = field(default_factory=list)
    tolerances: dict[str, float] = field(default_factory=dict)
    stats: dict[str, dict] = field(default_factory=dict)  # column key -> compare()'s plain dict
    best: str | None = None  # the best variant that passes the tolerances
    # column key -> row label -> its cell, computed once; every output format renders these.
    cells: dict[str, dict[str, Cell]] = field(default_factory=dict)

    def ok_columns(self) -> list[str]:
        """The columns whose variant ran to the end, in table order."""
        return [k for k in self.columns if self.results[k].status == "ok"]


@dataclass(frozen=True)
class Cell:
    """One metric of one column."""

    value: float | None
    delta: float | None = None  # (value - baseline's) / baseline's, where a delta means something
    ci_low: float | None = None  # in the rows of absolute deltas: the bootstrap interval
    ci_high: float | None = None
    within_noise: bool | None = None  # the rows of accuracy and macro-F1 (Row.noise)


def _order(result: Result) -> tuple:
    precision = result.precision
    rank = (
        PRECISION_ORDER.index(precision) if precision in PRECISION_ORDER else len(PRECISION_ORDER)
    )
    return (result.device != "cpu", rank, result.variant, result.host or "")


# ---------------------------------------------------------------------------------------------
# Which results: the walk that collect and report share.

# The repository ships its own measured results under results/reference/, inside `quantbench run`'s
# default output folder: walking results/ must not merge them with the user's runs. A folder named
# reference below a folder given on the command line is skipped; naming it (or one inside it)
# includes it.
SKIPPED_FOLDER = RESERVED_NAMES[0]  # a job may not take this name


def gather(folders: list[Path]) -> tuple[list[Result], list[Path], list[tuple[Path, str]]]:
    """The results under the folders (or the files themselves), the reference folders skipped, and
    the files that hold no result, as (file, why)."""
    found = walk(folders, skip=SKIPPED_FOLDER)
    return found.results, found.skipped_folders, found.unusable


def gather_studies(folders: list[Path]) -> list[dict]:
    """The sensitivity studies under the folders (results.load_study), the reference folders
    skipped as gather skips them."""
    return walk(folders, skip=SKIPPED_FOLDER).studies


class UnknownBaseline(ValueError):
    pass


def check_baseline(results: list[Result | dict], baseline: str | None) -> None:
    """Raises UnknownBaseline when `baseline` names no column of any job in the results."""
    if baseline is None:
        return
    results = [as_result(r) for r in results]
    known = {job: list(_columns(results, job)) for job in sorted({r.job for r in results})}
    if not any(baseline in keys for keys in known.values()):
        allowed = "; ".join(
            (f"for {job}: " if len(known) > 1 else "") + ", ".join(keys)
            for job, keys in known.items()
        )
        raise UnknownBaseline(f"--baseline: found {baseline!r}; allowed: {allowed}")


def _columns(results: list[Result], job: str) -> dict[str, Result]:
    """A job's results by column key, in table order."""
    columns: dict[str, Result] = {}
    for result in sorted((r for r in results if r.job == job), key=_order):
        columns[_column_key(result, columns)] = result
    return columns


def _host(result: Result) -> str:
    return result.host or "?"


def _column_key(result: Result, columns: dict[str, Result]) -> str:
    """The variant's id; the same variant again is named by what tells it apart: the host it ran on,
    or, for another run on a host already shown, the results folder it came from (DIR of
    DIR/<job>/...); a number where even that is the same."""
    variant = result.variant
    if variant not in columns:
        return variant
    hosts = {_host(r) for r in columns.values() if r.variant == variant}
    folder = result.file.parent.parent.name if result.file else ""
    key = (
        f"{variant}@{_host(result)}"
        if _host(result) not in hosts or not folder
        else f"{variant}@{folder}"
    )
    candidate, number = key, 2
    while candidate in columns:
        candidate, number = f"{key}#{number}", number + 1
    return candidate


def build_tables(results: list[Result | dict], baseline: str | None = None) -> list[JobTable]:
    """One table per job, every statistic and cell computed."""
    results = [as_result(r) for r in results]
    tables = []
    for job in sorted({r.job for r in results}):
        columns = _columns(results, job)
        wanted = baseline or next((r.baseline for r in columns.values() if r.baseline), "fp32-cpu")
        chosen = wanted if wanted in columns and columns[wanted].status == "ok" else None
        order = ([chosen] if chosen else []) + [k for k in columns if k != chosen]
        table = JobTable(
            job, chosen, order, columns, _baseline_notes(columns, order, wanted, chosen)
        )
        table.tolerances = _tolerances(table)
        table.stats = compare(table)
        table.best = best_passing(table)
        table.cells = compute_cells(table)
        tables.append(table)
    return tables


def _baseline_notes(
    columns: dict[str, Result], order: list[str], wanted: str, chosen: str | None
) -> list[str]:
    """What the deltas against the baseline compare besides precisions."""
    if chosen is None:
        return [f"baseline {wanted} has no ok result here: no deltas or agreement"]
    notes, base = [], columns[chosen]
    other_spec = [k for k in order if columns[k].spec_hash not in (None, base.spec_hash)]
    if other_spec:
        notes.append(
            f"{', '.join(other_spec)}: run from a different job spec than the baseline "
            "(model, data or settings differ): deltas compare more than precision"
        )
    elsewhere = [k for k in order if columns[k].host and columns[k].host != base.host]
    if elsewhere:
        notes.append(
            f"{', '.join(elsewhere)}: ran on another host than the baseline: latency, "
            "throughput "
            "and memory deltas compare machines as well as precisions"
        )
    return notes


def _tolerances(table: JobTable) -> dict[str, float]:
    """The job's tolerances: the baseline's spec decides when runs merged here disagree."""
    found = {key: dict(r.tolerances) for key, r in table.results.items()}
    chosen = found.get(table.baseline) if table.baseline else None
    if chosen is None:
        chosen = next((t for t in found.values() if t), {})
    if any(t != chosen for t in found.values() if t):
        table.notes.append(
            "results carry different tolerances; the verdict uses "
            + ("the baseline's" if table.baseline else "the first found")
        )
    unknown = sorted(set(chosen) - set(TOLERANCES))
    if unknown:
        table.notes.append(
            f"unknown tolerances ignored: {', '.join(unknown)}; known: {', '.join(TOLERANCES)}"
        )
    return {k: float(v) for k, v in chosen.items() if v is not None and k in TOLERANCES}


# ---------------------------------------------------------------------------------------------
# Statistics: one plain dict per variant; rendering reads these and computes nothing.


def compare(table: JobTable) -> dict[str, dict]:
    """Per column: {agreement, effects, significance, calibration, confusion_matrix, per_class,
    verdict}.

    effects: effects.prediction_effects against the baseline, plus flipped_samples [{index, gold,
    from, to}]; significance: paired bootstrap intervals of the accuracy and macro-F1 deltas,
    McNemar's exact test and within_noise per metric. Both are None for the baseline's own
    significance, for results without predictions and for results on another sample than the
    baseline's. calibration (ECE and its bins), confusion_matrix and per_class describe the variant
    on its own, baseline or not.
    """
    base = table.results.get(table.baseline) if table.baseline else None
    stats = {}
    for key in table.columns:
        result = table.results[key]
        entry = {
            "agreement": None,
            "effects": None,
            "significance": None,
            "calibration": None,
            "confusion_matrix": None,
            "per_class": None,
            "verdict": None,
        }
        own = _encoded(result, result) if result.status == "ok" else None
        if own is not None and own["probs"] is not None:
            alone = effects.prediction_effects(
                own["gold"], own["probs"], own["probs"], own["labels"]
            )
            entry.update(
                calibration=alone["calibration_variant"],
                confusion_matrix=alone["confusion_matrix"],
                per_class=alone["per_class"],
            )
        paired = _paired(table, key, base) if own is not None and base is not None else None
        if paired is not None:
            entry.update(_against_baseline(paired, key == table.baseline))
        entry["verdict"] = _judge(result, entry, base, table.tolerances)
        stats[key] = entry
    return stats


def _encoded(result: Result, reference: Result) -> dict | None:
    """A result's predictions as class indices in `reference`'s label order (None when they cannot
    be)."""
    preds = result.predictions or Predictions()
    labels = (reference.predictions or Predictions()).labels
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


def _paired(table: JobTable, key: str, base: Result) -> dict | None:
    result = table.results[key]
    if result.fingerprint != base.fingerprint:
        table.notes.append(
            f"{key}: evaluated on a different sample than the baseline; no agreement"
        )
        return None
    mine, theirs = _encoded(result, base), _encoded(base, base)
    if mine is None or theirs is None or not np.array_equal(mine["gold"], theirs["gold"]):
        table.notes.append(
            f"{key}: its predictions cannot be paired with the baseline's (other labels or gold)"
        )
        return None
    return {"variant": mine, "baseline": theirs}


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
        accuracy = effects.paired_bootstrap_delta(
            gold, base["predicted"], var["predicted"], "accuracy", **BOOTSTRAP
        )
        f1 = effects.paired_bootstrap_delta(
            gold, base["predicted"], var["predicted"], "macro_f1", **BOOTSTRAP
        )
        mcnemar = effects.mcnemar_exact(gold, base["predicted"], var["predicted"], ALPHA)
        out["significance"] = {
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
    return out


# What each tolerance measures and how its value is shown; min_* limits are floors, max_* ceilings.
_CHECKS = {
    "max_accuracy_drop": (
        "accuracy drop",
        lambda r, s, b: None if s["agreement"] is None else b.metrics.accuracy - r.metrics.accuracy,
        "{:.4f}",
    ),
    "min_agreement": ("agreement", lambda r, s, b: s["agreement"], "{:.4f}"),
    "max_latency_ms": (
        "latency median",
        lambda r, s, b: r.metrics.latency.median,
        "{:.2f} ms",
    ),
    "max_size_mib": ("size", lambda r, s, b: r.metrics.model_size_mib, "{:.2f} MiB"),
    "max_peak_rss_mib": ("peak RSS", lambda r, s, b: r.metrics.peak_rss_mib, "{:.0f} MiB"),
}
_SLACK = 1e-9  # a value equal to its limit passes, whatever the float rounding


def _judge(
    result: Result, entry: dict, base: Result | None, tolerances: dict[str, float]
) -> dict | None:
    """pass | fail (with every tolerance it breaks) | no result; None when the job states no
    tolerances."""
    if not tolerances:
        return None
    if result.status != "ok":
        return {"status": "no result", "failures": [], "reason": result.status}
    failures = []
    for name, limit in tolerances.items():
        what, measure, shown = _CHECKS[name]
        value = measure(result, entry, base)
        if value is None:
            failures.append(
                {
                    "tolerance": name,
                    "limit": limit,
                    "value": None,
                    "reason": f"{what} not measured against a baseline on the same sample"
                    if name in ("max_accuracy_drop", "min_agreement")
                    else f"{what} not measured",
                }
            )
            continue
        broken = value < limit - _SLACK if name.startswith("min_") else value > limit + _SLACK
        if broken:
            sign = "<" if name.startswith("min_") else ">"
            failures.append(
                {
                    "tolerance": name,
                    "limit": limit,
                    "value": value,
                    "reason": f"{what} {shown.format(value)} {sign} {name} {limit:g}",
                }
            )
    return {"status": "fail" if failures else "pass", "failures": failures, "reason": None}


def best_passing(table: JobTable) -> str | None:
    """The fastest (median latency) variant that passes; the smaller one on a tie."""
    passing = [
        k for k in table.columns if (table.stats[k].get("verdict") or {}).get("status") == "pass"
    ]

    def speed(key):
        metrics = table.results[key].metrics
        median = metrics.latency.median
        return (median is None, median or 0.0, metrics.model_size_mib or 0.0)

    return min(passing, key=speed) if passing else None


# ---------------------------------------------------------------------------------------------
# The cells: each metric of each column and its delta, computed once for every output format.


def compute_cells(table: JobTable) -> dict[str, dict[str, Cell]]:
    """Column key -> row label -> cell, for every row of ROWS."""
    base = table.results.get(table.baseline) if table.baseline else None
    base_stats = table.stats.get(table.baseline, {}) if table.baseline else {}
    return {
        key: {
            row.label: _compute_cell(row, table.results[key], table.stats[key], base, base_stats)
            for row in ROWS
        }
        for key in table.columns
    }


def _compute_cell(
    row: Row, result: Result, stats: dict, base: Result | None, base_stats: dict
) -> Cell:
    value = row.get(result, stats) if result.status == "ok" else None
    base_value = row.get(base, base_stats) if base is not None else None
    delta = (
        (value - base_value) / base_value
        if row.delta and value is not None and base_value
        else None
    )
    significance = stats["significance"] or {}
    # The interval belongs to the rows of absolute deltas; the noise call to them and to the
    # relative delta of accuracy and macro-F1.
    interval = (significance.get(row.noise) or {}) if row.noise and not row.delta else {}
    noise = (significance.get("within_noise") or {}).get(row.noise) if row.noise else None
    return Cell(value, delta, interval.get("ci_low"), interval.get("ci_high"), noise)


# ---------------------------------------------------------------------------------------------
# Rendering the cells as text.


def _value_text(value, row: Row) -> str:
    if value is None:
        return "–"
    if row.digits is None:
        return f"{value:.3g}"
    return _signed(value, row.digits) if row.signed else f"{value:,.{row.digits}f}"


def _signed(value: float, digits: int) -> str:
    return f"{value if round(value, digits) else 0.0:+,.{digits}f}"  # never "-0.0000"


def _delta(relative: float | None) -> str:
    if relative is None:
        return ""
    return f"{relative if round(relative, 3) else 0.0:+.1%}"  # never "-0.0%"


def _noise_footnote() -> str:
    return (
        f"{NOISE_MARK} within noise: the {BOOTSTRAP['confidence']:.0%} paired-bootstrap interval "
        "of the "
        f"delta ({BOOTSTRAP['n_resamples']} resamples of the samples) contains 0 and, for "
        "accuracy, McNemar's "
        f"exact test on the paired predictions gives p ≥ {ALPHA:g}; a delta without the mark is "
        "beyond noise"
    )


def _has_delta(table: JobTable, key: str) -> bool:
    """Whether the column has a Δ column beside it: every one but the baseline's, if any."""
    return bool(key != table.baseline and table.baseline)


def table_rows(table: JobTable) -> tuple[list[str], list[list[str]], list[str]]:
    """Header, rows and footnotes (warnings, errors), as text."""
    header = ["metric"]
    for key in table.columns:
        header += [key, "Δ"] if _has_delta(table, key) else [key]
    footnotes, marks = _footnotes(table)
    rows = [
        _text_row("hardware", table, _hardware),
        _text_row("status", table, lambda r: r.status),
    ]
    noise_marked = False
    for row in ROWS:
        texts, marked = _metric_row(table, row, marks)
        rows.append(texts)
        noise_marked = noise_marked or marked
    if noise_marked:
        footnotes.append(_noise_footnote())
    return header, rows, table.notes + footnotes


def _footnotes(table: JobTable) -> tuple[list[str], dict[str, list[int]]]:
    """The errors and numbered warnings of the columns, and each column's warning numbers."""
    footnotes, marks = [], {}
    for key in table.columns:
        result = table.results[key]
        if result.error:
            footnotes.append(f"{key}: {result.status}: {result.error}")
        for warning in result.warnings or []:
            marks.setdefault(key, []).append(len(footnotes) + 1)
            footnotes.append(f"[{len(footnotes) + 1}] {key}: {warning}")
    return footnotes, marks


def _metric_row(table: JobTable, row: Row, marks: dict[str, list[int]]) -> tuple[list[str], bool]:
    """One metric's row of text, and whether a cell of it carries the within-noise mark."""
    texts, noise_marked = [row.label], False
    for key in table.columns:
        cell = table.cells[key][row.label]
        text = _value_text(cell.value, row)
        if row.label == "accuracy" and key in marks:
            text += " ⚠" + ",".join(map(str, marks[key]))
        if row.noise and not row.delta and cell.value is not None:
            text += f" [{_signed(cell.ci_low, row.digits)}, {_signed(cell.ci_high, row.digits)}]"
            if cell.within_noise:
                text += " " + NOISE_MARK
                noise_marked = True
        texts.append(text)
        if _has_delta(table, key):
            delta = _delta(cell.delta)
            if delta and cell.within_noise:
                delta += " " + NOISE_MARK
                noise_marked = True
            texts.append(delta)
    return texts, noise_marked


def verdict_lines(table: JobTable) -> list[str]:
    """The deployment verdict as lines of text: one per variant, then the best that passes."""
    if not table.tolerances:
        return []
    limits = ", ".join(f"{name} {value:g}" for name, value in table.tolerances.items())
    lines = [f"verdict against the job's tolerances ({limits}):"]
    lines += [f"{key}: {verdict_text(table.stats[key]['verdict'])}" for key in table.columns]
    lines.append(
        f"best variant that passes: {table.best} ({BEST_RULE})"
        if table.best
        else "best variant that passes: none passes"
    )
    return lines


def verdict_text(verdict: dict) -> str:
    if verdict["status"] == "no result":
        return f"no verdict ({verdict['reason']})"
    if verdict["status"] == "pass":
        return "pass"
    return "fail: " + "; ".join(f["reason"] for f in verdict["failures"])


def _hardware(result: Result) -> str:
    env = result.environment or {}
    if not env:
        return "–"
    return f"{hardware_label(env, result.device)} @ {env.get('host', '?')}"


def _text_row(label: str, table: JobTable, get) -> list[str]:
    row = [label]
    for key in table.columns:
        row.append(get(table.results[key]))
        if _has_delta(table, key):
            row.append("")
    return row


# ---------------------------------------------------------------------------------------------
# Output formats.


def _as_text(tables: list[JobTable], style: str) -> str:
    parts = []
    for table in tables:
        header, rows, footnotes = table_rows(table)
        title = (
            f"{table.job} (baseline: {table.baseline or 'none'}; "
            "Δ = (variant − baseline) / baseline)"
        )
        parts.append(
            ("## " if style == "github" else "")
            + title
            + "\n\n"
            + tabulate(rows, header, tablefmt=style, disable_numparse=True)
        )
        if footnotes:
            parts.append(
                "\n".join(("- " if style == "github" else "  ") + note for note in footnotes)
            )
        verdict = verdict_lines(table)
        if verdict:
            if style == "github":
                parts.append(
                    "### "
                    + verdict[0].rstrip(":")
                    + "\n\n"
                    + "\n".join(f"- {line}" for line in verdict[1:])
                )
            else:
                parts.append(verdict[0] + "\n" + "\n".join(f"  {line}" for line in verdict[1:]))
    return "\n\n".join(parts) + "\n"


CSV_COLUMNS = [
    *("job", "variant", "status", "device", "hardware", "metric", "value", "baseline", "delta"),
    *("ci_low", "ci_high", "within_noise", "verdict", "failed_tolerances", "best"),
]


def _as_csv(tables: list[JobTable]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(CSV_COLUMNS)
    for table in tables:
        for key in table.columns:
            writer.writerows(_csv_rows(table, key))
    return out.getvalue()


def _csv_rows(table: JobTable, key: str) -> list[list]:
    """One column's rows: one per metric."""
    result, verdict = table.results[key], table.stats[key]["verdict"] or {}
    failed = ";".join(f["tolerance"] for f in verdict.get("failures", []))
    hardware = _hardware(result)
    rows = []
    for row in ROWS:
        cell = table.cells[key][row.label]
        rows.append(
            [
                *(table.job, key, result.status, result.device, hardware, row.label),
                "" if cell.value is None else cell.value,
                table.baseline or "",
                "" if cell.delta is None else round(cell.delta, 6),
                "" if cell.ci_low is None else cell.ci_low,
                "" if cell.ci_high is None else cell.ci_high,
                "" if cell.within_noise is None else str(cell.within_noise).lower(),
                verdict.get("status", ""),
                failed,
                "yes" if key == table.best else "",
            ]
        )
    return rows


def _as_json(tables: list[JobTable]) -> str:
    return json.dumps([_json_table(table) for table in tables], indent=2) + "\n"


def _json_table(table: JobTable) -> dict:
    variants = {}
    for key in table.columns:
        result, cells = table.results[key], table.cells[key]
        variants[key] = {
            "variant": result.variant,
            "status": result.status,
            "error": result.error,
            "device": result.device,
            "hardware": _hardware(result),
            "warnings": result.warnings,
            "metrics": {label: cell.value for label, cell in cells.items()},
            "deltas": {
                label: cell.delta for label, cell in cells.items() if cell.delta is not None
            },
            **table.stats[key],
        }
    return {
        "job": table.job,
        "baseline": table.baseline,
        "notes": table.notes,
        "variants": variants,
        "significance_method": {**BOOTSTRAP, "alpha": ALPHA, "rule": _noise_footnote()},
        "verdict": {"tolerances": table.tolerances, "best": table.best, "rule": BEST_RULE},
    }


FORMATS: dict[str, Callable[[list[JobTable]], str]] = {
    "table": lambda tables: _as_text(tables, "simple"),
    "markdown": lambda tables: _as_text(tables, "github"),
    "csv": _as_csv,
    "json": _as_json,
}


def render(results: list[Result | dict], fmt: str = "table", baseline: str | None = None) -> str:
    return FORMATS[fmt](build_tables(results, baseline))
