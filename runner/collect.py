"""Collect: results from any number of runs and machines, merged into one comparison table per job.

Rows are metrics, columns are variants (each naming the hardware it ran on) with a delta column
against the baseline: (variant - baseline) / baseline, so a smaller model shows a negative size delta
and a slower one a positive latency delta. Agreement is computed here, from the per-sample
predictions each result keeps. Output formats are a registry: table, markdown, csv, json.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from typing import Callable

from tabulate import tabulate

from runner.measure import hardware_label

PRECISION_ORDER = ["fp32", "fp16", "bf16", "int8-dynamic", "bnb-int8", "bnb-nf4", "bnb-fp4"]


@dataclass(frozen=True)
class Row:
    label: str
    get: Callable[[dict], float | None]
    digits: int
    delta: bool = True  # whether a relative delta means anything for this metric


def _metric(name: str):
    return lambda r: r["metrics"].get(name)


def _latency(name: str):
    return lambda r: (r["metrics"].get("latency_ms") or {}).get(name)


ROWS = [
    Row("size (MiB)", _metric("model_size_mib"), 2),
    Row("accuracy", _metric("accuracy"), 4),
    Row("avg confidence", _metric("avg_confidence"), 4),
    Row("macro-F1", _metric("macro_f1"), 4),
    Row("agreement with baseline", lambda r: r.get("_agreement"), 4, delta=False),
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
]


@dataclass
class JobTable:
    job: str
    baseline: str | None
    columns: list[str]  # column keys, baseline first
    results: dict[str, dict]  # column key -> result
    notes: list[str] = field(default_factory=list)


def _order(result: dict) -> tuple:
    precision = result.get("precision", "")
    rank = PRECISION_ORDER.index(precision) if precision in PRECISION_ORDER else len(PRECISION_ORDER)
    return (result.get("device") != "cpu", rank, result.get("variant", ""), result.get("environment", {}).get("host", ""))


def build_tables(results: list[dict], baseline: str | None = None) -> list[JobTable]:
    tables = []
    for job in sorted({r["job"] for r in results}):
        mine = sorted((r for r in results if r["job"] == job), key=_order)
        columns: dict[str, dict] = {}
        for result in mine:
            key = result["variant"]
            if key in columns:  # the same variant from several machines: one column each, named by host
                key = f"{key}@{result.get('environment', {}).get('host', '?')}"
            columns[key] = result
        wanted = baseline or next((r.get("spec", {}).get("baseline") for r in mine if r.get("spec", {}).get("baseline")),
                                  "fp32-cpu")
        chosen = wanted if wanted in columns and columns[wanted]["status"] == "ok" else None
        notes = []
        if chosen is None:
            notes.append(f"baseline {wanted} has no ok result here: no deltas or agreement")
        order = ([chosen] if chosen else []) + [k for k in columns if k != chosen]
        table = JobTable(job, chosen, order, columns, notes)
        _add_agreement(table)
        tables.append(table)
    return tables


def _add_agreement(table: JobTable) -> None:
    base = table.results.get(table.baseline) if table.baseline else None
    base_preds = (base or {}).get("predictions") or {}
    for key in table.columns:
        result = table.results[key]
        preds = result.get("predictions") or {}
        if not base_preds or not preds:
            continue
        if (result.get("sample") or {}).get("fingerprint") != (base.get("sample") or {}).get("fingerprint"):
            table.notes.append(f"{key}: evaluated on a different sample than the baseline; no agreement")
            continue
        same = sum(a == b for a, b in zip(preds["predicted"], base_preds["predicted"]))
        result["_agreement"] = same / len(base_preds["predicted"])


def _cell(value, digits: int) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}"


def _delta(value, base) -> str:
    if value is None or base in (None, 0):
        return ""
    return f"{(value - base) / base:+.1%}"


def table_rows(table: JobTable) -> tuple[list[str], list[list[str]], list[str]]:
    """Header, rows and footnotes (warnings, errors), as text."""
    header = ["metric"]
    for key in table.columns:
        header.append(key)
        if key != table.baseline and table.baseline:
            header.append("Δ")
    footnotes, marks = [], {}
    for key in table.columns:
        result = table.results[key]
        if result.get("error"):
            footnotes.append(f"{key}: {result['status']}: {result['error']}")
        for warning in result.get("warnings") or []:
            marks.setdefault(key, []).append(len(footnotes) + 1)
            footnotes.append(f"[{len(footnotes) + 1}] {key}: {warning}")
    rows = [_text_row("hardware", table, lambda r: _hardware(r)),
            _text_row("status", table, lambda r: r["status"])]
    base = table.results.get(table.baseline) if table.baseline else None
    for spec in ROWS:
        row = [spec.label]
        for key in table.columns:
            result = table.results[key]
            value = spec.get(result) if result["status"] == "ok" else None
            text = _cell(value, spec.digits)
            if spec.label == "accuracy" and key in marks:
                text += " ⚠" + ",".join(map(str, marks[key]))
            row.append(text)
            if key != table.baseline and table.baseline:
                row.append(_delta(value, spec.get(base)) if spec.delta else "")
        rows.append(row)
    return header, rows, table.notes + footnotes


def _hardware(result: dict) -> str:
    env = result.get("environment") or {}
    if not env:
        return "–"
    host = env.get("host", "?")
    return f"{hardware_label(env, result['device'])} @ {host}"


def _text_row(label: str, table: JobTable, get) -> list[str]:
    row = [label]
    for key in table.columns:
        row.append(get(table.results[key]))
        if key != table.baseline and table.baseline:
            row.append("")
    return row


# ---------------------------------------------------------------------------------------------
# Output formats.


def _as_text(tables: list[JobTable], style: str) -> str:
    parts = []
    for table in tables:
        header, rows, footnotes = table_rows(table)
        title = f"{table.job} (baseline: {table.baseline or 'none'}; Δ = (variant − baseline) / baseline)"
        parts.append(("## " if style == "github" else "") + title + "\n\n" + tabulate(rows, header, tablefmt=style,
                                                                                   disable_numparse=True))
        if footnotes:
            parts.append("\n".join(("- " if style == "github" else "  ") + note for note in footnotes))
    return "\n\n".join(parts) + "\n"


def _as_csv(tables: list[JobTable]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["job", "variant", "status", "device", "hardware", "metric", "value", "baseline", "delta"])
    for table in tables:
        base = table.results.get(table.baseline) if table.baseline else None
        for key in table.columns:
            result = table.results[key]
            for spec in ROWS:
                value = spec.get(result) if result["status"] == "ok" else None
                base_value = spec.get(base) if base else None
                delta = (value - base_value) / base_value if spec.delta and value is not None and base_value else None
                writer.writerow([table.job, key, result["status"], result["device"], _hardware(result), spec.label,
                                 "" if value is None else value, table.baseline or "",
                                 "" if delta is None else round(delta, 6)])
    return out.getvalue()


def _as_json(tables: list[JobTable]) -> str:
    payload = []
    for table in tables:
        base = table.results.get(table.baseline) if table.baseline else None
        variants = {}
        for key in table.columns:
            result = table.results[key]
            values = {spec.label: spec.get(result) if result["status"] == "ok" else None for spec in ROWS}
            deltas = {spec.label: ((values[spec.label] - spec.get(base)) / spec.get(base))
                      for spec in ROWS if spec.delta and base and values[spec.label] is not None and spec.get(base)}
            variants[key] = {"variant": result["variant"], "status": result["status"], "error": result.get("error"),
                             "device": result["device"], "hardware": _hardware(result),
                             "warnings": result.get("warnings", []), "metrics": values, "deltas": deltas}
        payload.append({"job": table.job, "baseline": table.baseline, "notes": table.notes, "variants": variants})
    return json.dumps(payload, indent=2) + "\n"


FORMATS: dict[str, Callable[[list[JobTable]], str]] = {
    "table": lambda tables: _as_text(tables, "simple"),
    "markdown": lambda tables: _as_text(tables, "github"),
    "csv": _as_csv,
    "json": _as_json,
}


def render(results: list[dict], fmt: str = "table", baseline: str | None = None) -> str:
    return FORMATS[fmt](build_tables(results, baseline))
