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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tabulate import tabulate

from runner import pivot
from runner.measure import hardware_label
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

    @property
    def rows(self) -> tuple[Row, ...]:
        """The table's metric rows: the size, the task's own, then how the variant ran."""
        return FIRST_ROWS + self.declaration.rows + LAST_ROWS

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
        table.task, table.declaration = _task(table)
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
    delta = (
        (value - base_value) / base_value
        if row.delta and value is not None and base_value
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
    "table": lambda tables: _as_text(tables, "simple"),
    "markdown": lambda tables: _as_text(tables, "github"),
    "csv": _as_csv,
    "json": _as_json,
}


def render(results: list[Result], fmt: str = "table", baseline: str | None = None) -> str:
    tables = build_tables(results, baseline)
    if fmt in pivot.WITH_VIEWS:  # the cross-hardware view of each job that ran in several places
        return pivot.WITH_VIEWS[fmt](tables, FORMATS[fmt])
    return FORMATS[fmt](tables)
