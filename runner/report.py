"""Report: one self-contained HTML file of the results under folders, with every plot as a PNG
beside it.

The HTML holds the comparison table and the verdict (from `collect`), the plots embedded as base64
data URIs and per-variant details; it loads nothing from anywhere, so it opens offline and survives
being mailed. The same plots are written as PNG files into `<report name>_figures/` for papers.
Plots are drawn with matplotlib's Agg canvas (no display, no pyplot state); each plot is one
function of a JobTable that returns a Figure, or None when the results hold nothing to draw (older
results without the per-layer analysis, failed variants). A sensitivity study's figure is drawn
from the study file's dict instead, in the section of the study's job.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import jinja2
from markupsafe import Markup
from matplotlib import rc_context
from matplotlib.figure import Figure

from runner import collect, pivot, progress
from runner.job import COMPILED_SUFFIX
from runner.layers import LAYER_TYPES
from runner.references import resolve
from runner.report_figures import (
    PANEL_IN,
    TYPE_COLOURS,
    FigureFiles,
    Plot,
    Shown,
    TaskPlots,
    label_points,
    log_scale,
    log_scale_if_wide,
    number,
    panels,
    shared_legend,
)
from runner.schema import Result
from runner.study import report as report_study

# ---------------------------------------------------------------------------------------------
# Plots: one function each, JobTable -> Figure | None.


def _own_weights(table: collect.JobTable) -> list[str]:
    """The ok columns less each compiled variant whose eager twin (same host) is among them:
    compiling changes no weight, so its weight plots would repeat the twin's."""
    ran = {(table.results[k].variant, table.results[k].host) for k in table.ok_columns()}

    def twin(result) -> tuple[str, str | None]:
        return result.variant.removesuffix(COMPILED_SUFFIX), result.host

    return [
        k
        for k in table.ok_columns()
        if not table.results[k].variant.endswith(COMPILED_SUFFIX)
        or twin(table.results[k]) not in ran
    ]


def _analysis(table: collect.JobTable, key: str) -> dict:
    analysis = table.results[key].analysis
    return analysis if isinstance(analysis, dict) else {}


def plot_sqnr_by_depth(table: collect.JobTable) -> Figure | None:
    """Per-layer SQNR (dB) against encoder depth, one panel per variant whose weights changed."""
    shown = [
        k
        for k in _own_weights(table)
        if any(row.get("sqnr_db") is not None for row in _analysis(table, k).get("layers") or [])
    ]
    if not shown:
        return None
    figure, axes = panels(
        len(shown), f"{table.job}: weight SQNR per layer by depth (higher is closer to FP32)"
    )
    depths = [
        row["depth"]
        for k in shown
        for row in _analysis(table, k)["layers"]
        if row["depth"] is not None
    ]
    head = (
        (max(depths) + 1) if depths else 0
    )  # layers outside the encoder stack (pooler, classifier)
    has_head = any(row["depth"] is None for k in shown for row in _analysis(table, k)["layers"])
    present = {row["layer_type"] for k in shown for row in _analysis(table, k)["layers"]}
    types = [t for t in LAYER_TYPES if t in present]
    offsets = {t: (i - (len(types) - 1) / 2) * 0.06 for i, t in enumerate(types)}
    for ax, key in zip(axes, shown):
        _draw_sqnr_panel(ax, key, _analysis(table, key), offsets, head, has_head)
    shared_legend(figure, axes)
    return figure


def _draw_sqnr_panel(
    ax, key: str, analysis: dict, offsets: dict[str, float], head: int, has_head: bool
) -> None:
    """One variant's layers (coloured by type, types side by side) and their mean per depth."""
    for layer_type, offset in offsets.items():
        rows = [
            r
            for r in analysis["layers"]
            if r["layer_type"] == layer_type and r["sqnr_db"] is not None
        ]
        if rows:
            ax.scatter(
                [(head if r["depth"] is None else r["depth"]) + offset for r in rows],
                [r["sqnr_db"] for r in rows],
                s=18,
                color=TYPE_COLOURS[layer_type],
                label=layer_type,
            )
    groups = [
        g
        for g in (analysis.get("summary") or {}).get("by_depth", [])
        if g.get("mean_sqnr_db") is not None
    ]
    if groups:
        ax.plot(
            [head if g["depth"] is None else g["depth"] for g in groups],
            [g["mean_sqnr_db"] for g in groups],
            color="black",
            linewidth=1,
            marker="_",
            label="mean",
        )
    overall = ((analysis.get("summary") or {}).get("overall") or {}).get("mean_sqnr_db")
    ax.set_title(
        f"{key}" + (f" (mean {overall:.1f} dB)" if overall is not None else ""), fontsize=10
    )
    _depth_axis(ax, head, has_head)
    ax.set_xlabel("layer of the encoder or decoder stack")
    ax.set_ylabel("SQNR (dB)")
    ax.grid(True, alpha=0.3)


DEPTH_LABELS = 7  # at most this many numbered layers on a depth axis: more collide


def _depth_axis(ax, head: int, has_head: bool) -> None:
    """Every layer a tick; every k-th numbered, so that at most DEPTH_LABELS numbers show and
    none runs into 'head', which a dotted line sets apart from the stack."""
    step = max(1, -(-head // DEPTH_LABELS))
    numbered = list(range(0, head, step))
    ax.set_xticks(numbered + [head] * has_head, [str(d) for d in numbered] + ["head"] * has_head)
    ax.set_xticks(range(head), minor=True)
    if has_head and head:
        ax.axvline(head - 0.5, color="#999999", linestyle=":", linewidth=0.8)


def plot_output_against_weight_sqnr(table: collect.JobTable) -> Figure | None:
    """Each layer's output SQNR against its weight SQNR, one panel per variant that has both."""

    def measured(row) -> bool:
        return row.get("sqnr_db") is not None and row.get("output_sqnr_db") is not None

    shown = [
        k
        for k in _own_weights(table)
        if any(measured(row) for row in _analysis(table, k).get("layers") or [])
    ]
    if not shown:
        return None
    figure, axes = panels(
        len(shown), f"{table.job}: per-layer output SQNR against weight SQNR (dB)"
    )
    for ax, key in zip(axes, shown):
        rows = [r for r in _analysis(table, key)["layers"] if measured(r)]
        for layer_type in LAYER_TYPES:
            typed = [r for r in rows if r["layer_type"] == layer_type]
            if typed:
                ax.scatter(
                    [r["sqnr_db"] for r in typed],
                    [r["output_sqnr_db"] for r in typed],
                    s=18,
                    color=TYPE_COLOURS[layer_type],
                    label=layer_type,
                )
        low = min(min(r["sqnr_db"], r["output_sqnr_db"]) for r in rows)
        high = max(max(r["sqnr_db"], r["output_sqnr_db"]) for r in rows)
        ax.plot([low, high], [low, high], color="grey", linewidth=0.8, linestyle="--")
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("weight SQNR (dB)")
        ax.set_ylabel("output SQNR (dB)")
        ax.grid(True, alpha=0.3)
    shared_legend(figure, axes)
    return figure


def _output_rows(table: collect.JobTable, key: str) -> list[dict]:
    """key's layers with an output SQNR: those the variant changed, in a result that measured it."""
    layers = _analysis(table, key).get("layers") or []
    return [row for row in layers if row.get("output_sqnr_db") is not None]


def plot_output_sqnr_by_depth(table: collect.JobTable) -> Figure | None:
    """Per-layer output SQNR against depth, one line per layer type, one panel per variant."""
    shown = [k for k in _own_weights(table) if _output_rows(table, k)]
    if not shown:
        return None
    # Wide panels, two to a row: a line per type over a deep stack needs the room.
    figure, axes = panels(
        len(shown),
        f"{table.job}: output SQNR per layer by type and depth",
        max_columns=2,
        width=2 * PANEL_IN,
    )
    measured = [row for k in shown for row in _output_rows(table, k)]
    depths = [row["depth"] for row in measured if row["depth"] is not None]
    head = (max(depths) + 1) if depths else 0
    has_head = any(row["depth"] is None for row in measured)
    for ax, key in zip(axes, shown):
        rows = _output_rows(table, key)
        for layer_type in LAYER_TYPES:
            typed = sorted(
                (head if r["depth"] is None else r["depth"], r["output_sqnr_db"])
                for r in rows
                if r["layer_type"] == layer_type
            )
            if typed:
                ax.plot(
                    *zip(*typed),
                    color=TYPE_COLOURS[layer_type],
                    marker="o",
                    markersize=3,
                    linewidth=1,
                    label=layer_type,
                )
        lowest = min(r["output_sqnr_db"] for r in rows)
        ax.set_title(f"{key} (lowest {lowest:.1f} dB)", fontsize=10)
        _depth_axis(ax, head, has_head)
        ax.set_xlabel("layer of the encoder or decoder stack")
        ax.set_ylabel("output SQNR (dB)")
        ax.grid(True, alpha=0.3)
    shared_legend(figure, axes)
    return figure


WORST_LAYERS = 8  # the layers named in the outlier figure and listed in a variant's details


def worst_layers(analysis: dict, n: int = WORST_LAYERS) -> list[dict]:
    """The n layers with the lowest output SQNR, lowest first."""
    rows = [r for r in analysis.get("layers") or [] if r.get("output_sqnr_db") is not None]
    return sorted(rows, key=lambda r: r["output_sqnr_db"])[:n]


def _short_layer(row: dict) -> str:
    """A layer named as a point's label: its type and, inside the stack, its depth (module names
    repeat across types: BERT's three `dense`)."""
    return row["layer_type"] + ("" if row["depth"] is None else f" {row['depth']}")


# What a layer's input did to its output SQNR, one panel each: (row field, axis label, title).
INPUT_AXES = (
    (
        "input_outlier_ratio",
        "input outlier ratio (largest column max |x| / median's)",
        "against the input's outlier ratio",
    ),
    (
        "input_rounding_sqnr_db",
        "output SQNR with only the input rounded to int8 (dB)",
        "against the input's rounding alone",
    ),
)


def plot_output_sqnr_against_outliers(table: collect.JobTable) -> Figure | None:
    """Each layer's output SQNR against its FP32 input's outlier ratio (left) and against the
    output SQNR its input's int8 rounding alone gives (right), a row of two panels per variant
    whose rows hold them; the WORST_LAYERS lowest are named in both."""

    def measured(key, field) -> list[dict]:
        return [r for r in _output_rows(table, key) if r.get(field) is not None]

    shown = [k for k in _own_weights(table) if measured(k, INPUT_AXES[0][0])]
    if not shown:
        return None
    figure = Figure(figsize=(PANEL_IN * 2.2, PANEL_IN * len(shown) + 0.6), layout="constrained")
    grid = figure.subplots(len(shown), 2, squeeze=False, sharey="row")
    figure.suptitle(f"{table.job}: why layers lose output SQNR: their FP32 input")
    for row, key in zip(grid, shown):
        for ax, (field, label, title) in zip(row, INPUT_AXES):
            _draw_input_panel(ax, measured(key, field), field, label, f"{key}\n{title}")
    shared_legend(figure, list(grid.ravel()))
    for row, key in zip(grid, shown):  # last: labels are placed in the settled layout
        for ax, (field, _, _) in zip(row, INPUT_AXES):
            worst = worst_layers({"layers": measured(key, field)})
            points = [(r[field], r["output_sqnr_db"]) for r in worst]
            label_points(ax, points, [_short_layer(r) for r in worst], [18] * len(worst))
    return figure


def _draw_input_panel(ax, rows: list[dict], field: str, label: str, title: str) -> None:
    """The layers at x = their `field`, y = their output SQNR, coloured by type, with Spearman's
    rho in the title; the rounding panel gets the diagonal (the rounding is all the error)."""
    for layer_type in LAYER_TYPES:
        typed = [r for r in rows if r["layer_type"] == layer_type]
        if typed:
            ax.scatter(
                [r[field] for r in typed],
                [r["output_sqnr_db"] for r in typed],
                s=18,
                color=TYPE_COLOURS[layer_type],
                label=layer_type,
            )
    xs = [r[field] for r in rows]
    if field == "input_outlier_ratio":
        log_scale_if_wide(ax, "x", xs)
    elif xs:
        low = min(min(xs), min(r["output_sqnr_db"] for r in rows))
        ax.plot([low, max(xs)], [low, max(xs)], color="grey", linewidth=0.8, linestyle="--")
    rho = report_study.spearman(xs, [r["output_sqnr_db"] for r in rows]) if rows else None
    ax.set_title(title + ("" if rho is None else f" (ρ {rho:+.2f})"), fontsize=9)
    ax.set_xlabel(label, fontsize=9)
    ax.set_ylabel("output SQNR (dB)")
    ax.grid(True, alpha=0.3)


def plot_weight_histograms(table: collect.JobTable, key: str) -> Figure | None:
    """FP32 weights pooled by layer type, with the values `key`'s precision can represent drawn over
    them.

    Without a grid (fp16, bf16, fp32, or results without one) the plain histograms are drawn.
    """
    analysis = _analysis(table, key)
    by_type = (analysis.get("histograms") or {}).get("by_layer_type") or {}
    if not by_type:
        return None
    grids = analysis.get("grids") or {}
    precision = table.results[key].precision
    title = (
        f"{table.job}: FP32 weights by layer type, with the {precision} grid of each type's first "
        "layer"
        if any(grids.values())
        else f"{table.job}: FP32 weights by layer type"
    )
    figure, axes = panels(len(by_type), title)
    for ax, (layer_type, hist) in zip(axes, by_type.items()):
        edges, counts = hist["edges"], hist["counts"]
        ax.stairs(
            counts, edges, fill=True, color=TYPE_COLOURS.get(layer_type, "#7f7f7f"), alpha=0.6
        )
        log_scale(ax, "y")
        grid = grids.get(layer_type)
        layers = f"{hist['n_layers']} layer" + ("s" if hist["n_layers"] != 1 else "")
        subtitle = f"{layer_type} ({layers}, {hist['n_weights']:,} weights)"
        if grid:
            inside = [v for v in grid["values"] if hist["min"] <= v <= hist["max"]]
            drawn = _rug(inside)
            # A rug along the bottom: full-height lines would hide the histogram.
            ax.vlines(
                drawn, 0, 0.08, transform=ax.get_xaxis_transform(), color="black", linewidth=0.6
            )
            levels = f"{len(inside)} of {len(grid['values'])} levels in range"
            subtitle += f"\n{levels}, per {grid['granularity']}"
            if len(drawn) < len(inside):
                subtitle += f"\n(1 level in {_every(len(inside))} drawn along the bottom)"
        ax.set_title(subtitle, fontsize=9)
        ax.set_xlim(hist["min"], hist["max"])
        ax.set_xlabel("weight")
        ax.set_ylabel("count (log)")
    return figure


RUG_TICKS = 32  # at most this many grid levels along a histogram's bottom: more read as one band


def _every(levels: int) -> int:
    return -(-levels // RUG_TICKS)


def _rug(values: list[float]) -> list[float]:
    """The grid levels drawn along a histogram's bottom: all of a 4-bit grid; of int8's 256, every
    k-th, and the outermost, so that the grid's extent still shows."""
    values = sorted(values)
    if len(values) <= RUG_TICKS:
        return values
    return sorted({*values[:: _every(len(values))], values[-1]})


# The figures every task has: what quantization did to the weights, layer by layer.
EVERY_TASK_PLOTS = (
    Plot(
        "sqnr-by-depth",
        "Per-layer weight SQNR by depth",
        "SQNR = 10·log10(Σw² / Σ(w − w_q)²) of each linear layer's weights against FP32, in dB; "
        "every 6 dB is "
        "about one bit of precision. Points are layers (coloured by type), the line their mean at "
        "each depth; "
        "'head' is the pooler and classifier, or the lm_head. Unchanged layers (FP32) have no SQNR "
        "and are left "
        "out.",
        plot_sqnr_by_depth,
        "no per-layer weight analysis in these results",
    ),
    Plot(
        "output-vs-weight-sqnr",
        "Per-layer output SQNR against weight SQNR",
        "Each point is a linear layer: x its weight SQNR, y the SQNR of its output against the "
        "FP32 layer's output, both layers given the FP32 layer's input (the first 64 samples). "
        "Below the dashed diagonal the output lost more than the weights: the input's "
        "quantization, or a weight error the inputs amplify. Weight error alone can mislead; the "
        "output error is what reaches the next layer.",
        plot_output_against_weight_sqnr,
        "no per-layer output errors in these results",
    ),
    Plot(
        "output-sqnr-by-depth",
        "Per-layer output SQNR by layer type and depth",
        "The output SQNR of each linear layer (its output against the FP32 layer's, both given "
        "the FP32 layer's input), one line per layer type along the stack; 'head' is the pooler "
        "and classifier, or the lm_head. A type that dips at some depths is where the precision "
        "breaks; the title gives the lowest layer.",
        plot_output_sqnr_by_depth,
        "no per-layer output errors in these results",
    ),
    Plot(
        "output-sqnr-vs-outliers",
        "Per-layer output SQNR against input outlier columns",
        "Each point is a linear layer, y its output SQNR; the "
        f"{WORST_LAYERS} lowest are named. Left, x is how far its FP32 input's largest column "
        "sticks out (that column's max |x| over the median column's): a per-tensor activation "
        "scale (int8-dynamic) is set by the largest column, so at a ratio r the median column "
        "keeps about 1/r of the grid, the activation-outlier case of LLM.int8() and "
        "SmoothQuant. Right, x is the output SQNR of the FP32 layer given its input rounded to "
        "int8 with one scale per call (max |x| / 127) and FP32 weights: points along the "
        "dashed diagonal lose their output to the input's rounding, points far below it to "
        "their weights. ρ is Spearman's: near −1 on the left, or +1 on the right, the input "
        "explains the ranking.",
        plot_output_sqnr_against_outliers,
        "no per-layer input outliers in these results (written before they were measured)",
    ),
)


# ---------------------------------------------------------------------------------------------
# The HTML file and the PNGs beside it. The page is templates/report.html.j2; here are the values it
# shows, computed in the order the figures are drawn.

TEMPLATES = Path(__file__).parent / "templates"


@dataclass
class Rendered:
    path: Path
    figures: list[Path]


HISTOGRAM_CAPTION = (
    "Histograms (log counts) of the FP32 weights pooled by layer type. The ticks along the bottom "
    "are the values "
    "the precision can represent at the scale of that type's first layer (for per-row or "
    "per-block schemes, the "
    "row or block holding the largest |w|; the others use the same codes at smaller scales)."
)


def _histograms(table: collect.JobTable, figures: FigureFiles) -> list[Shown]:
    """One figure per variant with a quantization grid; else the FP32 weights once, from any
    variant; none when no result holds histograms."""
    drawn = [
        k for k in _own_weights(table) if any((_analysis(table, k).get("grids") or {}).values())
    ]
    if not drawn:
        drawn = [k for k in table.ok_columns() if _analysis(table, k).get("histograms")][:1]
    return [
        figures.show(
            plot_weight_histograms(table, key),
            f"{table.job}-histograms-{key}",
            f"{table.job}: weight histograms, {key}",
            HISTOGRAM_CAPTION,
            "",
        )
        for key in drawn
    ]


@dataclass(frozen=True)
class VariantDetails:
    """Per-class scores, flips against the baseline and LLM.int8() outlier columns of a variant."""

    key: str
    per_class: list[dict] | None
    effects: dict | None
    flips: str | None  # None for the baseline and for variants not paired with it
    outliers: str | None  # None where the precision keeps no outlier columns
    # The weight analysis's summary by layer type, where a layer changed: weight and output SQNR
    layer_types: list[dict] | None = None
    # The layers with the lowest output SQNR, beside their FP32 input's outliers
    worst_layers: list[dict] | None = None


def _details(table: collect.JobTable) -> list[VariantDetails]:
    """The ok variants that have any details."""
    details = []
    for key in table.ok_columns():
        stats = table.stats[key]
        effects = stats.get("effects") if key != table.baseline else None
        flips = None
        if effects:
            flips = ", ".join(f"{f['from']} → {f['to']}: {f['count']}" for f in effects["flips"])
        outliers = _analysis(table, key).get("outlier_columns")
        shown = VariantDetails(
            key,
            stats.get("per_class") or None,
            effects or None,
            None if not effects else flips or "none",
            None if outliers is None else _outliers_text(outliers),
            _changed_layer_types(_analysis(table, key)),
            worst_layers(_analysis(table, key)) or None,
        )
        if (
            shown.per_class
            or shown.flips is not None
            or shown.outliers is not None
            or shown.worst_layers
        ):
            details.append(shown)
    return details


def _changed_layer_types(analysis: dict) -> list[dict] | None:
    groups = (analysis.get("summary") or {}).get("by_layer_type") or []
    changed = [g for g in groups if g.get("mean_sqnr_db") is not None]
    return changed or None


def _outliers_text(outliers: dict[str, list]) -> str:
    return (
        "; ".join(
            f"{layer}: {len(cols)} ({', '.join(map(str, cols[:12]))}{', …' * (len(cols) > 12)})"
            for layer, cols in outliers.items()
        )
        or "none"
    )


def plots_of(table: collect.JobTable) -> list[Plot]:
    """The table's task's first plots, the weight plots every task has, then the task's others."""
    own = resolve(table.declaration.plots) if table.declaration.plots else TaskPlots()
    return [*own.first, *EVERY_TASK_PLOTS, *own.last]


def _section(table: collect.JobTable, figures: FigureFiles, studies=()) -> dict:
    """What the page shows of one job; draws and writes its figures. studies: every study read;
    those of this job are shown after the per-layer figures."""
    header, rows, footnotes = collect.table_rows(table)
    verdict_lines = collect.verdict_lines(table)
    plots, histograms, shown_studies = [], [], []
    for plot in plots_of(table):
        shown = figures.show(
            plot.draw(table),
            f"{table.job}-{plot.name}",
            f"{table.job}: {plot.heading}",
            plot.caption,
            plot.missing,
        )
        plots.append((plot, shown))
        if plot.name == "sqnr-by-depth":  # drawn after it, and shown after it
            histograms = _histograms(table, figures)
        if plot.name == "output-vs-weight-sqnr":  # the last per-layer figure
            shown_studies = report_study.studies_shown(table, studies, figures)
    verdicts = [table.stats[key]["verdict"] for key in table.columns] if verdict_lines else []
    verdicts = [
        (key, verdict["status"], collect.verdict_text(verdict))
        for key, verdict in zip(table.columns, verdicts)
    ]
    return {
        "job": table.job,
        "baseline": table.baseline,
        **{"header": header, "rows": rows, "footnotes": footnotes},
        **{"verdict_lines": verdict_lines, "verdicts": verdicts},
        "tolerance_names": collect.applicable_tolerances(table),
        **{"plots": plots, "histograms": histograms, "details": _details(table)},
        "studies": shown_studies,
        "cross_hardware": _cross_hardware(table),
    }


def _cross_hardware(table: collect.JobTable) -> dict | None:
    """The job's view across machines and devices (runner/pivot.py); None where it ran in one."""
    found = pivot.build(table)
    if found is None:
        return None
    return {
        "about": pivot.about(found),
        "tables": pivot.metric_tables(found),
        "notes": pivot.implementation_lines(found) + found.notes,
    }


def _named_first(tables: list[collect.JobTable], results: list[Result]) -> list[collect.JobTable]:
    """The jobs in the order their results were read: those of the folder named first come first
    (collect orders them by name)."""
    first: dict[str, int] = {}
    for index, result in enumerate(results):
        first.setdefault(result.job, index)
    return sorted(tables, key=lambda table: first[table.job])


def _anchor(text: str, taken: set[str]) -> str:
    """An id for a heading: the text's letters and digits, another on the page not taken."""
    base = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "section"
    anchor, number = base, 2
    while anchor in taken:
        anchor, number = f"{base}-{number}", number + 1
    taken.add(anchor)
    return anchor


def _contents(section: dict, taken: set[str]) -> dict:
    """The section with its anchors: the job's ("anchor") and one per part ("ids", by name), and
    the parts' (anchor, heading) in page order for the table of contents ("contents")."""
    ids, contents = {}, []

    def part(name: str, heading: str) -> None:
        ids[name] = _anchor(f"{section['job']}-{name}", taken)
        contents.append((ids[name], heading))

    anchor = _anchor(section["job"], taken)
    part("table", "Table")
    part("verdict", "Deployment verdict")
    if section["cross_hardware"]:
        part("cross-hardware", "Across machines and devices")
    for plot, _ in section["plots"]:
        part(plot.name, plot.heading)
        if plot.name == "sqnr-by-depth":  # the template shows the histograms after it
            part("histograms", "Weight histograms and quantization grids")
        if plot.name == "output-vs-weight-sqnr":  # and the studies after this one
            for shown in section["studies"]:
                part(f"study-{shown.variant}", f"Sensitivity study: {shown.variant}")
    part("details", "Per variant")
    return {**section, "anchor": anchor, "ids": ids, "contents": contents}


def _escaped(value) -> Markup:
    """Autoescape as html.escape writes it (&#x27;, as the report always has); markup passes."""
    return value if isinstance(value, Markup) else Markup(html.escape(str(value)))


def _template() -> jinja2.Template:
    environment = jinja2.Environment(
        autoescape=True, finalize=_escaped, undefined=jinja2.StrictUndefined
    )
    environment.filters["number"] = number
    source = (TEMPLATES / "report.html.j2").read_text(encoding="utf-8")
    # The template's line breaks and indentation are for reading; the page has none.
    return environment.from_string(re.sub(r"\n\s*", "", source))


def write_report(
    results: list[Result], out: Path, baseline: str | None = None, studies=()
) -> Rendered:
    """Write `out` (HTML) and its PNGs into `<out stem>_figures/`; returns both paths. studies:
    sensitivity studies (collect.gather_studies), each shown in its job's section."""
    out = Path(out)
    figures = FigureFiles(out.parent / f"{out.stem}_figures")
    # Names (a job, a variant, a label) are drawn as written: matplotlib would read $...$ as a
    # formula and stop the report at one it cannot parse.
    tables = _named_first(collect.build_tables(results, baseline), results)
    with (
        rc_context({"text.parse_math": False}),
        progress.phase("jobs drawn", len(tables), "jobs") as step,
    ):
        sections = []
        for table in tables:
            sections.append(_section(table, figures, studies))
            step.advance()
    taken: set[str] = set()
    sections = [_contents(section, taken) for section in sections]
    page = _template().render(
        style=(TEMPLATES / "report.css").read_text(encoding="utf-8"),
        n_results=len(results),
        stamp=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        figures_folder=figures.folder.name,
        sections=sections,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return Rendered(out, figures.written)
