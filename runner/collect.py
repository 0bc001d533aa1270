"""Collect: results from any number of runs and machines, merged into one comparison table per job.

Rows are metrics, columns are variants (each naming the hardware it ran on) with a delta column
against the baseline: (variant - baseline) / baseline, so a smaller model shows a negative size
delta and a slower one a positive latency delta. The job's task decides the rows between the size
and the latency rows and what is computed against the baseline from the per-sample predictions
each result keeps (its declaration: runner/tasks/task.py; a classifier's agreement, flips,
calibration and significance are in runner/tasks/classification/compare.py). A job's tolerances
give each variant a deployment verdict. Output formats are a registry: table, markdown, csv, json.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from tabulate import tabulate

from runner import pivot
from runner.gguf_files import types_by_kind
from runner.measure import hardware_label, machine_name
from runner.precisions import PRECISIONS
from runner.results import StudyFile, walk
from runner.schema import Result
from runner.spec import RESERVED_NAMES
from runner.tasks import DEFAULT_TASK, TASKS, Task, tolerances
from runner.tasks.task import ALPHA, BOOTSTRAP, NOISE_MARK, Check, Row, latency, metric

PRECISION_ORDER = list(PRECISIONS)  # the table's columns in the registry's order

# The rows every result has: the size first, then the task's rows, then how it ran.
FIRST_ROWS = (Row("size (MiB)", metric("model_size_mib"), 2),)
LAST_ROWS = (
    Row("latency mean (ms)", latency("mean"), 2),
    Row("latency median (ms)", latency("median"), 2),
    Row("latency std (ms)", latency("std"), 2),
    Row("latency p90 (ms)", latency("p90"), 2),
    Row("latency p99 (ms)", latency("p99"), 2),
    Row("throughput (samples/s)", metric("throughput_sps"), 1),
    Row("peak RSS (MiB)", metric("peak_rss_mib"), 0),
    Row("peak CUDA (MiB)", metric("peak_cuda_mib"), 0),
    Row("load (s)", metric("load_s"), 2),
    Row("calibrate (s)", metric("calibrate_s"), 2),
    Row("quantize (s)", metric("quantize_s"), 2),
    Row("compile (s)", metric("compile_s"), 2),
)


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
    task: str = DEFAULT_TASK  # what the job's task: says
    # The task's declaration (runner/tasks): its rows, statistics against the baseline, the
    # tolerances it is judged by and the verdict's pick.
    declaration: Task = field(default_factory=Task)
    # column key -> the name of the machine or results folder it came from (_source_names)
    sources: dict[str, str] = field(default_factory=dict)
    shown_rows: tuple[str, ...] | None = None  # --metrics: the labels of the rows shown; None: all
    # The task's rows that depend on what its results measured (Task.more_rows).
    more_rows: tuple[Row, ...] = ()

    @property
    def rows(self) -> tuple[Row, ...]:
        """The table's metric rows: the size, the task's own, then how the variant ran."""
        rows = FIRST_ROWS + self.declaration.rows + self.more_rows + LAST_ROWS
        if self.shown_rows is None:
            return rows
        return tuple(row for row in rows if row.label in self.shown_rows)

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
    within_noise: bool | None = None  # the rows with a noise call (Row.noise)


def _order(result: Result, source: str) -> tuple:
    """Where a column goes: CPU first, by precision, then variant; the same variant by the name
    of where it came from (_source_names)."""
    precision = result.precision
    rank = (
        PRECISION_ORDER.index(precision) if precision in PRECISION_ORDER else len(PRECISION_ORDER)
    )
    return (result.device != "cpu", rank, result.variant, source)


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


def gather_studies(folders: list[Path]) -> list[StudyFile]:
    """The sensitivity studies under the folders (results.load_study), the reference folders
    skipped as gather skips them."""
    return walk(folders, skip=SKIPPED_FOLDER).studies


class UnknownBaseline(ValueError):
    pass


def check_baseline(results: list[Result], baseline: str | None) -> None:
    """Raises UnknownBaseline when `baseline` names no column of any job in the results."""
    if baseline is None:
        return
    known = {job: list(_columns(results, job)) for job in sorted({r.job for r in results})}
    if not any(baseline in keys for keys in known.values()):
        allowed = "; ".join(
            (f"for {job}: " if len(known) > 1 else "") + ", ".join(keys)
            for job, keys in known.items()
        )
        raise UnknownBaseline(f"--baseline: found {baseline!r}; allowed: {allowed}")


def _host(result: Result) -> str:
    """The machine a result ran on as a column name says it: the user's label, else the host."""
    return machine_name(result.environment or {}) or "?"


def _columns(results: list[Result], job: str) -> dict[str, Result]:
    """A job's results by column key, in table order. Each results folder (DIR of DIR/<job>/...)
    is named by the machine its results ran on where no other folder of the job shares it, else
    by the folder's name. A variant's first result (by that name) is named by the variant; the
    same variant again by variant@name; a number where even that is the same. So every column of
    one folder is named alike, whatever its status: a skipped result ran on no machine, yet it
    came from the folder."""
    mine = [r for r in results if r.job == job]
    names = _source_names(mine)
    ordered = sorted(mine, key=lambda result: _order(result, names[_source(result)]))
    columns: dict[str, Result] = {}
    for result in ordered:
        key = result.variant
        if key in columns:
            key = f"{key}@{names[_source(result)]}"
        candidate, number = key, 2
        while candidate in columns:
            candidate, number = f"{key}#{number}", number + 1
        columns[candidate] = result
    return columns


def _source(result: Result) -> Path | str:
    """Where a result came from: its results folder, or for one read from no file its machine."""
    return result.file.parent.parent if result.file else _host(result)


def _source_names(results: list[Result]) -> dict[Path | str, str]:
    """Each source's name: the one machine its results ran on, where no other source shares it,
    else the folder's name."""
    machines: dict[Path | str, set[str]] = {}
    for result in results:
        machines.setdefault(_source(result), set())
        if result.environment:
            machines[_source(result)].add(_host(result))
    only = {source: next(iter(found)) for source, found in machines.items() if len(found) == 1}
    taken = list(only.values())
    return {
        source: only[source]
        if source in only and taken.count(only[source]) == 1
        else (source.name if isinstance(source, Path) else source)
        for source in machines
    }


def build_tables(results: list[Result], baseline: str | None = None) -> list[JobTable]:
    """One table per job, every statistic and cell computed."""
    tables = []
    for job in sorted({r.job for r in results}):
        columns = _columns(results, job)
        recorded = (r.job_record.baseline for r in columns.values())
        wanted = baseline or next((name for name in recorded if name), "fp32-cpu")
        chosen = wanted if wanted in columns and columns[wanted].status == "ok" else None
        order = ([chosen] if chosen else []) + [k for k in columns if k != chosen]
        table = JobTable(
            job, chosen, order, columns, _baseline_notes(columns, order, wanted, chosen)
        )
        names = _source_names(list(columns.values()))
        table.sources = {key: names[_source(result)] for key, result in columns.items()}
        table.task, table.declaration = _task(table)
        table.more_rows = table.declaration.more_rows([columns[k] for k in order])
        table.tolerances = _tolerances(table)
        table.stats = compare(table)
        table.best = best_passing(table)
        table.cells = compute_cells(table)
        tables.append(table)
    return tables


def _task(table: JobTable) -> tuple[str, Task]:
    """The job's task (results older than tasks are classification's) and its declaration; the
    baseline's decides when results merged here disagree."""
    named = {key: r.job_record.task or DEFAULT_TASK for key, r in table.results.items()}
    name = named[table.baseline or table.columns[0]]
    if len(set(named.values())) > 1:
        table.notes.append(
            f"results of different tasks ({', '.join(sorted(set(named.values())))}): "
            f"compared as {name}"
        )
    if name not in TASKS:
        table.notes.append(
            f"task {name!r} is not known to this quantbench (known: {', '.join(TASKS)}): "
            "only the rows every task has"
        )
        return name, Task()
    return name, TASKS[name]


def dequantized_note(key: str, baseline: Result) -> list[str]:
    """A baseline whose FP32 weights were dequantized from a GGUF already carries that file's
    rounding: the note says so, and how coarse it was."""
    gguf = (baseline.model or {}).get("gguf") or {}
    if not gguf.get("dequantized"):
        return []
    types = types_by_kind(gguf.get("types") or {})
    return [
        f"baseline {key}: its FP32 weights are dequantized from a {gguf.get('lowest_bits')}-bit "
        f"GGUF ({gguf.get('file')}: {types}): an error below that rounding cannot be told from "
        "the original model's"
    ]


def _baseline_notes(
    columns: dict[str, Result], order: list[str], wanted: str, chosen: str | None
) -> list[str]:
    """What the deltas against the baseline compare besides precisions."""
    if chosen is None:
        return [f"baseline {wanted} has no ok result here: no deltas or agreement"]
    notes, base = dequantized_note(chosen, columns[chosen]), columns[chosen]
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
    found = {key: dict(r.job_record.tolerances) for key, r in table.results.items()}
    chosen = found.get(table.baseline) if table.baseline else None
    if chosen is None:
        chosen = next((t for t in found.values() if t), {})
    if any(t != chosen for t in found.values() if t):
        table.notes.append(
            "results carry different tolerances; the verdict uses "
            + ("the baseline's" if table.baseline else "the first found")
        )
    known = tolerances()
    unknown = sorted(set(chosen) - set(known))
    if unknown:
        table.notes.append(
            f"unknown tolerances ignored: {', '.join(unknown)}; known: {', '.join(known)}"
        )
    checked = applicable_tolerances(table)
    other_task = [k for k in known if k in chosen and k not in checked]
    if other_task:
        table.notes.append(
            f"tolerances that do not apply to a {table.task} job ignored: {', '.join(other_task)}"
        )
    return {k: float(v) for k, v in chosen.items() if v is not None and k in checked}


def applicable_tolerances(table: JobTable) -> list[str]:
    """The tolerances the table's task can be judged by, in the order it names them."""
    return [tolerance.name for tolerance in table.declaration.tolerances]


# ---------------------------------------------------------------------------------------------
# Statistics: one plain dict per variant; rendering reads these and computes nothing.


def compare(table: JobTable) -> dict[str, dict]:
    """Per column: the task's statistics against the baseline (Comparison.compare), then the
    verdict. The task's notes (why a column cannot be paired) go under the table."""
    base = table.results.get(table.baseline) if table.baseline else None
    stats = {}
    for key in table.columns:
        result = table.results[key]
        compared = table.declaration.compare(result, base)
        table.notes += [f"{key}: {note}" for note in compared.notes]
        verdict = _judge(result, compared.stats, base, table)
        stats[key] = {**compared.stats, "verdict": verdict}
    return stats


_SLACK = 1e-9  # a value equal to its limit passes, whatever the float rounding


def _judge(result: Result, stats: dict, base: Result | None, table: JobTable) -> dict | None:
    """pass | fail (with every tolerance it breaks) | cannot judge | no result; None when the job
    states no tolerances. A broken tolerance fails whatever else is true; a variant that keeps
    every tolerance passes only when it can be judged (_unjudged: the reason says why not)."""
    if not table.tolerances:
        return None
    if result.status != "ok":
        return {"status": "no result", "failures": [], "reason": result.status}
    checks = {tolerance.name: tolerance.check for tolerance in table.declaration.tolerances}
    failures = []
    for name, limit in table.tolerances.items():
        failure = _failure(name, limit, checks[name], checks[name].measure(result, stats, base))
        if failure:
            failures.append(failure)
    unjudged = _unjudged(result, base, table)
    status = "fail" if failures else "cannot judge" if unjudged else "pass"
    return {"status": status, "failures": failures, "reason": "; ".join(unjudged) or None}


def _unjudged(result: Result, base: Result | None, table: JobTable) -> list[str]:
    """Why the verdict cannot call the result a pass: its own answers or the baseline's say
    nothing (the task's rule, Task.degenerate), or its latency cannot be told from the
    baseline's."""
    reasons = [table.declaration.degenerate(result)]
    if base is not None and result is not base:
        theirs = table.declaration.degenerate(base)
        if theirs:
            reasons.append(f"the baseline {table.baseline} cannot be judged: {theirs}")
        reasons.append(_latency_overlap(result, base))
    return [reason for reason in reasons if reason]


def _latency_overlap(result: Result, base: Result) -> str | None:
    """Said when the 95% intervals of the two median latencies overlap: the variant is not
    measurably faster or slower than the baseline. None when they are apart, or when a result
    has no interval (older results)."""
    mine, theirs = result.metrics.latency.median_ci95, base.metrics.latency.median_ci95
    if not mine or not theirs or mine[0] > theirs[1] or mine[1] < theirs[0]:
        return None
    return (
        f"its latency median's 95% interval [{mine[0]:.2f}, {mine[1]:.2f}] ms overlaps the "
        f"baseline's [{theirs[0]:.2f}, {theirs[1]:.2f}] ms: not measurably faster or slower"
    )


def _failure(name: str, limit: float, check: Check, value: float | None) -> dict | None:
    """The tolerance broken, or not measured; None when the value keeps within it."""
    if value is None:
        where = " against a baseline on the same sample" if check.against_baseline else ""
        reason = f"{check.what} not measured{where}"
        return {"tolerance": name, "limit": limit, "value": None, "reason": reason}
    floor = name.startswith("min_")
    if not (value < limit - _SLACK if floor else value > limit + _SLACK):
        return None
    reason = f"{check.what} {check.shown.format(value)} {'<' if floor else '>'} {name} {limit:g}"
    return {"tolerance": name, "limit": limit, "value": value, "reason": reason}


def best_passing(table: JobTable) -> str | None:
    """The first variant that passes by the task's best_key (Task.best_rule); a variant the
    verdict cannot judge is never picked."""
    passing = [k for k in table.columns if _status(table, k) == "pass"]
    key = table.declaration.best_key
    return min(passing, key=lambda k: key(table.results[k])) if passing else None


def _status(table: JobTable, key: str) -> str | None:
    return (table.stats[key].get("verdict") or {}).get("status")


# ---------------------------------------------------------------------------------------------
# The cells: each metric of each column and its delta, computed once for every output format.


def compute_cells(table: JobTable) -> dict[str, dict[str, Cell]]:
    """Column key -> row label -> cell, for every row of the table."""
    base = table.results.get(table.baseline) if table.baseline else None
    base_stats = table.stats.get(table.baseline, {}) if table.baseline else {}
    return {
        key: {
            row.label: _compute_cell(row, table.results[key], table.stats[key], base, base_stats)
            for row in table.rows
        }
        for key in table.columns
    }


def _compute_cell(
    row: Row, result: Result, stats: dict, base: Result | None, base_stats: dict
) -> Cell:
    value = row.get(result, stats) if result.status == "ok" else None
    base_value = row.get(base, base_stats) if base is not None else None
    # A task's compare may refuse a row's delta (a causal LM's, across perplexity conventions).
    refused = row.label in stats.get("refused_deltas", ())
    delta = (
        (value - base_value) / base_value
        if row.delta and value is not None and base_value and not refused
        else None
    )
    significance = stats.get("significance") or {}
    # The interval belongs to the rows of absolute deltas; the noise call to them and to the
    # relative delta of accuracy and macro-F1.
    interval = (significance.get(row.noise) or {}) if row.noise and not row.delta else {}
    noise = (significance.get("within_noise") or {}).get(row.noise) if row.noise else None
    return Cell(value, delta, interval.get("ci_low"), interval.get("ci_high"), noise)


# ---------------------------------------------------------------------------------------------
# Rendering the cells as text.


# Below this, a negative value of a row shown to three significant digits (a KL divergence, a
# p-value: never negative) is float rounding: it prints as 0, not -1.2e-08.
ROUNDING = 1e-6


def _value_text(value, row: Row) -> str:
    if value is None:
        return "–"
    if row.digits is None:
        return "0" if -ROUNDING < value < 0 else f"{value:.3g}"
    return _signed(value, row.digits) if row.signed else f"{value:,.{row.digits}f}"


def _signed(value: float, digits: int) -> str:
    return f"{value if round(value, digits) else 0.0:+,.{digits}f}"  # never "-0.0000"


def _delta(relative: float | None) -> str:
    if relative is None:
        return ""
    return f"{relative if round(relative, 3) else 0.0:+.1%}"  # never "-0.0%"


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
    for row in table.rows:
        texts, marked = _metric_row(table, row, marks)
        rows.append(texts)
        noise_marked = noise_marked or marked
    if noise_marked:
        footnotes.append(table.declaration.noise_rule)
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
        if row.carries_warnings and key in marks:
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
    """The deployment verdict as lines of text: one per variant, then the best that passes (and
    which variants it could not consider)."""
    if not table.tolerances:
        return []
    limits = ", ".join(f"{name} {value:g}" for name, value in table.tolerances.items())
    lines = [f"verdict against the job's tolerances ({limits}):"]
    lines += [f"{key}: {verdict_text(table.stats[key]['verdict'])}" for key in table.columns]
    unjudged = [k for k in table.columns if _status(table, k) == "cannot judge"]
    not_considered = f"; cannot judge {', '.join(unjudged)}" if unjudged else ""
    lines.append(
        f"best variant that passes: {table.best} ({table.declaration.best_rule}{not_considered})"
        if table.best
        else f"best variant that passes: none passes{not_considered}"
    )
    return lines


def verdict_text(verdict: dict) -> str:
    if verdict["status"] == "no result":
        return f"no verdict ({verdict['reason']})"
    if verdict["status"] == "pass":
        return "pass"
    if verdict["status"] == "cannot judge":
        return f"cannot judge: {verdict['reason']}"
    failed = "fail: " + "; ".join(f["reason"] for f in verdict["failures"])
    return failed + (f" (and cannot be judged: {verdict['reason']})" if verdict["reason"] else "")


def _hardware(result: Result) -> str:
    env = result.environment or {}
    if not env:
        return "–"
    return f"{hardware_label(env, result.device)} @ {machine_name(env) or '?'}"


def _text_row(label: str, table: JobTable, get) -> list[str]:
    row = [label]
    for key in table.columns:
        row.append(get(table.results[key]))
        if _has_delta(table, key):
            row.append("")
    return row


# ---------------------------------------------------------------------------------------------
# Choosing what is shown: --variants and --metrics.


class UnknownChoice(ValueError):
    pass


def choose(
    tables: list[JobTable], variants: list[str] | None, metrics: list[str] | None
) -> list[JobTable]:
    """The tables narrowed to the variants (a column's name, or a variant's for all its columns;
    the baseline's column stays: the deltas are against it) and the metric rows (a row's label or
    a unique start of one, in any case); a job with none of them is left out. Raises UnknownChoice
    for a name that matches nothing, or several rows."""
    if variants:
        names = _variant_names(tables, variants)
        tables = [t for t in (_with_variants(t, names) for t in tables) if t]
    if metrics:
        labels = _metric_labels(tables, metrics)
        tables = [t for t in (_with_metrics(t, labels) for t in tables) if t]
    return tables


def _variant_names(tables: list[JobTable], names: list[str]) -> set[str]:
    keys = {key: table.results[key].variant for table in tables for key in table.columns}
    known = set(keys) | set(keys.values())
    unknown = [name for name in names if name not in known]
    if unknown:
        raise UnknownChoice(
            f"--variants: found {', '.join(map(repr, unknown))}; allowed: {', '.join(keys)}"
        )
    return set(names)


def _with_variants(table: JobTable, names: set[str]) -> JobTable | None:
    chosen = [k for k in table.columns if k in names or table.results[k].variant in names]
    if not chosen:
        return None
    table.columns = [k for k in table.columns if k == table.baseline or k in chosen]
    return table


def _metric_labels(tables: list[JobTable], names: list[str]) -> list[str]:
    """The row labels the names choose."""
    labels = list(dict.fromkeys(row.label for table in tables for row in table.rows))
    chosen = []
    for name in names:
        exact = [label for label in labels if label.lower() == name.lower()]
        starts = exact or [label for label in labels if label.lower().startswith(name.lower())]
        if len(starts) != 1:
            found = f"{name!r} starts {len(starts)} rows" if starts else f"found {name!r}"
            raise UnknownChoice(f"--metrics: {found}; allowed: {'; '.join(starts or labels)}")
        chosen.append(starts[0])
    return chosen


def _with_metrics(table: JobTable, labels: list[str]) -> JobTable | None:
    shown = [row.label for row in table.rows if row.label in labels]
    if not shown:
        return None
    table.shown_rows = tuple(shown)
    for cells in table.cells.values():
        for label in [label for label in cells if label not in shown]:
            del cells[label]
    return table


# ---------------------------------------------------------------------------------------------
# The text table, fitted to a width: metrics as rows, the variants' columns in blocks side by side.

MIN_WIDTH = 40  # narrower, not even one variant beside the metric names fits
GAP = 2  # tabulate's "simple" format puts two spaces between columns
TABULATE_PADDING = 2  # tabulate makes a column 2 wider than its header (its MIN_PADDING)
MIN_CELL = 20  # a hardware cell is wrapped to its column's width, or to this at the least


def terminal_width() -> int:
    """The width to fit: COLUMNS, else the terminal's, else 80 (output to a file or a pipe)."""
    return shutil.get_terminal_size().columns


def _as_table(tables: list[JobTable], width: int) -> str:
    return "\n\n".join(_table_text(table, width) for table in tables) + "\n"


def _table_text(table: JobTable, width: int) -> str:
    """One job's table as blocks that fit the width, then what is not in it, the notes and the
    verdict, each wrapped to the width."""
    header, rows, footnotes = table_rows(table)
    rows = [row for row in rows if row[0] != "status"]  # every column shown ran: "ok"
    hardware = _shared_hardware(rows)
    if hardware:  # said once above the table, it leaves the columns their numbers' width
        rows = [row for row in rows if row[0] != "hardware"]
    groups = _column_groups(table, header, rows)
    metric = [header[0], *(row[0] for row in rows)]
    room = width - _text_width(metric)
    blocks = _pack(groups, room, bool(table.baseline))
    if len(blocks) > 1:  # it does not fit as it is: narrower columns, in fewer blocks
        blocks = _pack([_narrowed(group) for group in groups], room, bool(table.baseline))
    title = (
        f"{table.job} (baseline: {table.baseline or 'none'}; Δ = (variant − baseline) / baseline)"
    )
    parts = [
        _wrap(title, width) + (f"\n{_wrap(f'hardware: {hardware}', width)}" if hardware else "")
    ]
    for number, block in enumerate(blocks, 1):
        if number > 1:
            parts.append(_wrap(f"{table.job}, continued ({number} of {len(blocks)})", width))
        parts.append(_render_block(metric, [column for group in block for column in group]))
    if not blocks:
        parts.append("no variant of this job has a result")
    lines = _not_shown(table) + [note for note in footnotes if not _is_status_note(table, note)]
    if len(blocks) > 1:
        lines.append(
            f"cut into {len(blocks)} blocks to fit {width} columns; "
            "the whole table: --format markdown|csv"
        )
    if lines:
        parts.append("\n".join(_wrap(line, width, "  ") for line in lines))
    verdict = verdict_lines(table)
    if verdict:
        parts.append(
            "\n".join([_wrap(verdict[0], width)] + [_wrap(v, width, "  ") for v in verdict[1:]])
        )
    return "\n\n".join(parts)


def _shared_hardware(rows: list[list[str]]) -> str | None:
    """The hardware every column shown ran on, where it is one; else None."""
    # "–": a variant that did not run, listed under the table, not in it
    cells = {cell for row in rows if row[0] == "hardware" for cell in row[1:] if cell not in "–"}
    return cells.pop() if len(cells) == 1 else None


def _column_groups(table: JobTable, header: list[str], rows: list[list[str]]) -> list[list]:
    """Per column that ran, its cells (the header first) and its Δ column's beside it; a group
    is one variant's columns, which stay together."""
    groups, index = [], 1
    for key in table.columns:
        width = 2 if _has_delta(table, key) else 1
        cells = [[header[i], *(row[i] for row in rows)] for i in range(index, index + width)]
        index += width
        if table.results[key].status == "ok":
            groups.append(cells)
    return groups


def _narrowed(group: list[list[str]]) -> list[list[str]]:
    """A variant's columns, its own narrowed to the width of its numbers: its long name cut
    before the @, its hardware cell (the first row) before the @ and then wrapped."""
    cells, *delta = group
    numbers = max((len(cell) for cell in cells[2:]), default=0)
    name, hardware = cells[0], cells[1]
    if len(name) > numbers and "@" in name:
        name = name.replace("@", "\n@", 1)
    width = max(numbers, MIN_CELL, *(len(line) for line in name.splitlines()))
    if len(hardware) > width:
        label, at, machine = hardware.rpartition(" @ ")
        lines = [label, f"@ {machine}"] if at else [hardware]
        hardware = "\n".join(textwrap.fill(line, width, break_long_words=False) for line in lines)
    return [[name, hardware, *cells[2:]], *delta]


def _text_width(column: list[str]) -> int:
    """A column's width as tabulate draws it: its widest line, and its header's and 2 more."""
    widest = max(len(line) for cell in column[1:] for line in cell.splitlines() or [""])
    return max(widest, max(map(len, column[0].splitlines())) + TABULATE_PADDING)


def _group_width(group: list) -> int:
    return sum(_text_width(column) + GAP for column in group)


def _pack(groups: list[list], room: int, has_baseline: bool) -> list[list[list]]:
    """The groups in blocks, in order, as many to a block as fit in room (the width less the
    metric names'); at least one to a block. The baseline's group (the first) opens the first
    block and is repeated in the others where it fits."""
    blocks: list[list[list]] = []
    for group in groups:
        if blocks and sum(map(_group_width, blocks[-1])) + _group_width(group) <= room:
            blocks[-1].append(group)
        else:
            blocks.append([group])
    if has_baseline and groups:
        base = groups[0]
        for block in blocks[1:]:
            if sum(map(_group_width, block)) + _group_width(base) <= room:
                block.insert(0, base)
    return blocks


def _render_block(metric: list[str], columns: list[list[str]]) -> str:
    header = [metric[0], *(column[0] for column in columns)]
    rows = [[label, *(column[i] for column in columns)] for i, label in enumerate(metric[1:], 1)]
    text = tabulate(rows, header, tablefmt="simple", disable_numparse=True)
    return "\n".join(line.rstrip() for line in text.splitlines())


def _not_shown(table: JobTable) -> list[str]:
    """The columns without a result, each with why: they take no column of the text table."""
    return [
        f"{key}: {result.status}" + (f": {result.error}" if result.error else "")
        for key, result in table.results.items()
        if key in table.columns and result.status != "ok"
    ]


def _is_status_note(table: JobTable, note: str) -> bool:
    """Whether a footnote is a column's error, which _not_shown already says."""
    return any(note == line for line in _not_shown(table))


def _wrap(text: str, width: int, indent: str = "") -> str:
    """A line of prose wrapped to the width; a path or a command longer than it is kept whole."""
    return textwrap.fill(
        text,
        width,
        initial_indent=indent,
        subsequent_indent=indent + "  ",
        break_long_words=False,
        break_on_hyphens=False,
    )


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
    for row in table.rows:
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
        "significance_method": {**BOOTSTRAP, "alpha": ALPHA, "rule": table.declaration.noise_rule},
        "verdict": {
            "tolerances": table.tolerances,
            "best": table.best,
            "rule": table.declaration.best_rule,
            "cannot_judge": {
                key: table.stats[key]["verdict"]["reason"]
                for key in table.columns
                if _status(table, key) == "cannot judge"
            },
        },
    }


FORMATS: dict[str, Callable[[list[JobTable]], str]] = {
    "table": lambda tables: _as_table(tables, terminal_width()),
    "markdown": lambda tables: _as_text(tables, "github"),
    "csv": _as_csv,
    "json": _as_json,
}


def render(
    results: list[Result],
    fmt: str = "table",
    baseline: str | None = None,
    width: int | None = None,
    variants: list[str] | None = None,
    metrics: list[str] | None = None,
) -> str:
    """The tables in a format, each job's cross-hardware view (runner/pivot.py) after its table
    in text and JSON; the text fits width (default: the terminal's). variants and metrics choose
    what is shown (choose()); UnknownChoice names what is allowed."""
    tables = choose(build_tables(results, baseline), variants, metrics)
    if fmt == "table":
        width = width or terminal_width()
        return pivot.text_with_views(tables, partial(_as_table, width=width), width)
    if fmt == "json":
        return pivot.json_with_views(tables, FORMATS["json"])
    return FORMATS[fmt](tables)
