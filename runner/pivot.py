"""The cross-hardware view: one job's results from several machines and devices, turned around so
that the same method reads across them.

collect's table has one column per variant. When a job's results ran on more than one machine or
device (the same job file run on a laptop's CPU and on a GPU server), this view follows the table:
one small table per metric, its rows the methods (a variant's id without its device: fp32,
int8-dynamic, fp32-compiled), its columns where they ran (the machine, then the device). Each cell
holds the metric, its delta against the job's baseline on the same machine ("Δ base": that
machine's own run of the baseline's method and device, else the baseline's column, so that a
machine's speed is not read as quantization's) and its delta against the same method in the first
column where that method has the metric ("Δ first"). Under the tables, what
each method is: its precision's declared `how` (runner/precisions/*/__init__.py), so that int8 on
the CPU (torch.ao's dynamic quantization) and int8 on a GPU (bitsandbytes' LLM.int8()) never read as
one algorithm.

The machine is named as collect's columns name where a result came from: its machine (the run's
--machine label, else its host), else its results folder (DIR of DIR/<job>/<variant>.json) where
two folders share a machine, with the machine added where one folder holds several. Only results
that ran to the end are placed; collect's table lists the others.

The metrics: the size, the task's quality rows (its declaration's quality_rows: runner/tasks), the
median latency, the throughput and the peak memory. Values and deltas against the baseline are
collect's cells, computed once; this module adds the delta across columns and the layout.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tabulate import tabulate

from runner.job import COMPILED_SUFFIX, MIXED
from runner.measure import hardware_label, machine_name
from runner.precisions import PRECISIONS
from runner.schema import Result
from runner.tasks.task import Row

if TYPE_CHECKING:  # collect calls this module: importing it here would be circular
    from runner.collect import JobTable

# collect's rows every task has that the view shows: the size before the task's quality rows, how
# it ran after them.
ROWS_BEFORE = ("size (MiB)",)
ROWS_AFTER = (
    "latency median (ms)",
    "throughput (samples/s)",
    "peak RSS (MiB)",
    "peak CUDA (MiB)",
)
RULE = (
    "Δ base = (value − the baseline's) / the baseline's; Δ first = (value − the same method's in "
    "the first column where it has one) / that"
)


@dataclass(frozen=True)
class Place:
    """Where a result ran: a machine and a device; `hardware` says what they are, in words."""

    machine: str  # its results folder, or its host
    device: str
    hardware: str = field(default="", compare=False)

    @property
    def label(self) -> str:
        return f"{self.machine} {self.device}"


@dataclass(frozen=True)
class PivotCell:
    value: float | None
    against_baseline: float | None  # None in the baseline's own cell
    against_first: float | None  # None in the method's first column
    is_baseline: bool = False


@dataclass
class View:
    """One metric: collect's row (its label and digits) and its cells by (method, place label)."""

    row: Row
    cells: dict[tuple[str, str], PivotCell]


@dataclass
class Pivot:
    job: str
    baseline: str | None  # the baseline's column in collect's table
    places: list[Place]  # the columns, the baseline's first
    methods: list[str]  # the rows, the baseline's first
    implementations: dict[str, str]  # method -> what runs it, with the devices it ran on
    views: list[View]
    notes: list[str]


# ---------------------------------------------------------------------------------------------
# Building the view from collect's table.


def build(table: JobTable) -> Pivot | None:
    """The view of one of collect's tables; None when its results ran on one machine and device."""
    placed, notes = _placed(table)
    places = _place_order(table, placed)
    if len(places) < 2:
        return None
    methods = _method_order(table, placed)
    views = [_view(table, row, placed, places) for row in _rows(table)]
    return Pivot(
        table.job,
        table.baseline,
        places,
        methods,
        _implementations(table, placed, methods),
        [view for view in views if any(c.value is not None for c in view.cells.values())],
        notes,
    )


def method_of(result: Result) -> str:
    """The variant's id without its device: fp32, int8-dynamic-mixed, fp32-compiled."""
    words = result.variant.split("-")
    if result.device in words:
        del words[len(words) - 1 - words[::-1].index(result.device)]
    return "-".join(words)


def _machine(result: Result) -> str:
    """The machine's name as collect's columns say it: the run's label, else the host's."""
    return machine_name(result.environment or {}) or "?"


def _placed(table: JobTable) -> tuple[dict[str, tuple[str, Place]], list[str]]:
    """Each ok column's (method, place), and notes for the columns left out: a method placed
    twice (two runs in one folder) shows its first. A place's machine is named as collect's
    columns name where it came from (its machine, else its results folder), and by its machine
    too where one folder holds several."""
    machines: dict[str, set] = {}
    for key in table.ok_columns():
        machines.setdefault(table.sources.get(key, "?"), set()).add(_machine(table.results[key]))
    placed, notes, taken = {}, [], {}
    for key in table.ok_columns():
        result, source = table.results[key], table.sources.get(key, "?")
        machine = source if len(machines[source]) == 1 else f"{source}@{_machine(result)}"
        hardware = f"{hardware_label(result.environment or {}, result.device)} @ {_machine(result)}"
        spot = (method_of(result), Place(machine, result.device, hardware))
        if spot in taken:
            notes.append(f"{key}: {spot[0]} on {spot[1].label} again; the view shows {taken[spot]}")
            continue
        taken[spot] = key
        placed[key] = spot
    return placed, notes


def _place_order(table: JobTable, placed: dict[str, tuple[str, Place]]) -> list[Place]:
    """The baseline's place first, then the CPUs, then the GPUs, each by machine."""
    places = list(dict.fromkeys(place for _, place in placed.values()))
    first = placed[table.baseline][1] if table.baseline in placed else None
    return sorted(places, key=lambda p: (p != first, p.device != "cpu", p.machine))


def _method_order(table: JobTable, placed: dict[str, tuple[str, Place]]) -> list[str]:
    """The baseline's method first, then in the precisions' registry order."""
    precisions = list(PRECISIONS)
    first = placed[table.baseline][0] if table.baseline in placed else None
    ranks = {}
    for key, (method, _) in placed.items():
        precision = table.results[key].precision
        rank = precisions.index(precision) if precision in precisions else len(precisions)
        ranks.setdefault(method, (method != first, rank, method))
    return sorted(ranks, key=ranks.__getitem__)


def _rows(table: JobTable) -> list[Row]:
    """collect's rows the view shows: the size, the task's quality rows, how it ran."""
    wanted = (*ROWS_BEFORE, *table.declaration.quality_rows, *ROWS_AFTER)
    by_label = {row.label: row for row in table.rows}
    return [by_label[label] for label in wanted if label in by_label]


def _view(
    table: JobTable, row: Row, placed: dict[str, tuple[str, Place]], places: list[Place]
) -> View:
    """One metric's cells, column by column, so that a method's first value is known before the
    columns after it are compared with it."""
    cells, firsts = {}, {}
    references = _references(table, row, placed)
    for place in places:
        for key, (method, where) in placed.items():
            if where != place:
                continue
            value = table.cells[key][row.label].value
            first = firsts.get(method)  # None in the method's first column with a value
            if first is None and value is not None:
                firsts[method] = value
            reference_key = references.get(place.machine, table.baseline)
            is_baseline = key == reference_key
            against = None
            if row.delta and not is_baseline and reference_key in table.cells:
                against = _relative(value, table.cells[reference_key][row.label].value)
            cells[(method, place.label)] = PivotCell(
                value,
                against,
                _relative(value, first) if row.delta else None,
                is_baseline,
            )
    return View(row, cells)


def _references(table: JobTable, row: Row, placed: dict[str, tuple[str, Place]]) -> dict[str, str]:
    """Each machine's own baseline column: the baseline's method on the baseline's device there."""
    if table.baseline not in placed:
        return {}
    method, place = placed[table.baseline]
    return {
        where.machine: key
        for key, (other, where) in placed.items()
        if other == method and where.device == place.device
    }


def _relative(value: float | None, reference: float | None) -> float | None:
    if value is None or not reference:
        return None
    return (value - reference) / reference


def _implementations(
    table: JobTable, placed: dict[str, tuple[str, Place]], methods: list[str]
) -> dict[str, str]:
    """Each method's precision as declared (its `how`), with the devices it ran on here."""
    devices: dict[str, list[str]] = {}
    precision: dict[str, str] = {}
    for key, (method, place) in placed.items():
        precision.setdefault(method, table.results[key].precision)
        if place.device not in devices.setdefault(method, []):
            devices[method].append(place.device)
    texts = {}
    for method in methods:
        declared = PRECISIONS.get(precision[method])
        how = declared.how if declared else "a precision this quantbench does not know"
        if method.endswith(COMPILED_SUFFIX):
            how += "; compiled with torch.compile"
        if f"-{MIXED}" in method:
            how += "; some layers kept in FP32 (settings.kept_in_fp32)"
        texts[method] = f"({', '.join(devices[method])}) {how}"
    return texts


# ---------------------------------------------------------------------------------------------
# The view as text, as the report's tables and as JSON.


def about(pivot: Pivot) -> list[str]:
    """What the columns are and what the deltas compare."""
    baseline = (
        f"Δ base against {pivot.baseline} on the same machine" if pivot.baseline else "no baseline"
    )
    return [
        f"{pivot.job} across machines and devices ({baseline})",
        RULE,
        *(f"{place.label}: {place.hardware}" for place in pivot.places),
    ]


def metric_tables(pivot: Pivot) -> list[tuple[list[str], list[list[str]]]]:
    """(header, rows) per metric over every place; the header's first cell names the metric."""
    everywhere = list(range(len(pivot.places)))
    return [metric_table(pivot, view, everywhere) for view in pivot.views]


def metric_table(pivot: Pivot, view: View, places: list[int]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of one metric over some places (indexes into pivot.places). A metric
    without relative deltas (a KL, itself against FP32) has no Δ columns."""
    header = [view.row.label]
    for i in places:
        deltas = (["Δ base"] + (["Δ first"] if i else [])) if view.row.delta else []
        header += [pivot.places[i].label, *deltas]
    return header, [_text_row(pivot, view, method, places) for method in pivot.methods]


def _text_row(pivot: Pivot, view: View, method: str, places: list[int]) -> list[str]:
    texts = [method]
    for i in places:
        cell = view.cells.get((method, pivot.places[i].label), PivotCell(None, None, None))
        texts.append(_number(cell.value, view.row))
        if not view.row.delta:
            continue
        baseline = cell.is_baseline and cell.value is not None
        texts.append("baseline" if baseline else _percent(cell.against_baseline))
        if i:
            texts.append(_percent(cell.against_first))
    return texts


def _fitted(pivot: Pivot, view: View, width: int) -> list[str]:
    """One metric's text table, its places in as few blocks as fit the width (a place that does
    not fit alone gets a block of its own)."""
    blocks: list[list[int]] = [[]]
    for i in range(len(pivot.places)):
        trial = blocks[-1] + [i]
        if blocks[-1] and _widest(_tabulated(pivot, view, trial)) > width:
            blocks.append([i])
        else:
            blocks[-1] = trial
    return [_tabulated(pivot, view, block) for block in blocks]


def _tabulated(pivot: Pivot, view: View, places: list[int]) -> str:
    header, rows = metric_table(pivot, view, places)
    return tabulate(rows, header, tablefmt="simple", disable_numparse=True)


def _widest(text: str) -> int:
    return max(len(line) for line in text.splitlines())


def _number(value: float | None, row: Row) -> str:
    if value is None:
        return "–"
    if row.digits is None:
        return f"{value:.3g}"
    return f"{value:,.{row.digits}f}"


def _percent(relative: float | None) -> str:
    if relative is None:
        return ""
    return f"{relative if round(relative, 3) else 0.0:+.1%}"  # never "-0.0%"


def implementation_lines(pivot: Pivot) -> list[str]:
    return [f"{method}: {how}" for method, how in pivot.implementations.items()]


def text(pivot: Pivot, width: int) -> str:
    """The view as collect's text output prints it after the job's table, fitted to width."""
    lines = about(pivot)
    title = textwrap.fill(lines[0], width, subsequent_indent="  ", break_long_words=False)
    parts = [title + "\n" + "\n".join(_wrapped(line, width) for line in lines[1:])]
    for view in pivot.views:
        parts += _fitted(pivot, view, width)
    notes = implementation_lines(pivot) + pivot.notes
    parts.append("what ran:\n" + "\n".join(_wrapped(line, width) for line in notes))
    return "\n\n".join(parts) + "\n"


def _wrapped(line: str, width: int) -> str:
    """An indented line of the view, wrapped to width; a word longer than it is kept whole."""
    return textwrap.fill(
        line, width, initial_indent="  ", subsequent_indent="    ", break_long_words=False
    )


def as_json(pivot: Pivot) -> dict:
    """The view as `collect --format json` gives it, under each table's "cross_hardware"."""
    metrics = {}
    for view in pivot.views:
        metrics[view.row.label] = {
            method: {
                place: {
                    "value": cell.value,
                    "delta_vs_baseline": cell.against_baseline,
                    "delta_vs_first": cell.against_first,
                }
                for (shown, place), cell in view.cells.items()
                if shown == method
            }
            for method in pivot.methods
        }
    return {
        "columns": [
            {"column": p.label, "machine": p.machine, "device": p.device, "hardware": p.hardware}
            for p in pivot.places
        ],
        "methods": pivot.implementations,
        "metrics": metrics,
        "notes": pivot.notes,
    }


# ---------------------------------------------------------------------------------------------
# collect's output with the views: its text with each job's view after the job's table, its JSON
# with a "cross_hardware" key in each table (null for a job on one machine and device).


def text_with_views(
    tables: list[JobTable], render: Callable[[list[JobTable]], str], width: int
) -> str:
    """collect's text (render: tables -> text), each job's view after its table and verdict,
    fitted to width."""
    if not tables:
        return render(tables)
    parts = []
    for table in tables:
        found = build(table)
        parts.append(render([table]) + ("\n" + text(found, width) if found else ""))
    return "\n".join(parts)


def json_with_views(tables: list[JobTable], render: Callable[[list[JobTable]], str]) -> str:
    """collect's JSON (render: tables -> JSON text), each table given its view."""
    payload = json.loads(render(tables))
    for entry, table in zip(payload, tables):
        found = build(table)
        entry["cross_hardware"] = as_json(found) if found else None
    return json.dumps(payload, indent=2) + "\n"
