"""Report: one self-contained HTML file of the results under folders, with every plot as a PNG
beside it.

The HTML holds the comparison table and the verdict (from `collect`), the plots embedded as base64
data URIs and per-variant details; it loads nothing from anywhere, so it opens offline and survives
being mailed. The same plots are written as PNG files into `<report name>_figures/` for papers.
Plots are drawn with matplotlib's Agg canvas (no display, no pyplot state); each plot is one
function of a JobTable that returns a Figure, or None when the results hold nothing to draw (older
results without the per-layer analysis, failed variants).
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from matplotlib import rc_context
from matplotlib.figure import Figure

from runner import collect
from runner.analysis import LAYER_TYPES
from runner.results import Latency

DPI = 120
PANEL_IN = 3.4  # width and height of one small-multiple panel, inches
MAX_COLUMNS = 3
# One colour per layer type, the same in every plot.
TYPE_COLOURS = dict(
    zip(
        LAYER_TYPES,
        [
            "#1f77b4",
            "#ff7f0e",
            "#2ca02c",
            "#d62728",
            "#9467bd",
            "#8c564b",
            "#e377c2",
            "#7f7f7f",
            "#bcbd22",
        ],
    )
)
DEVICE_COLOURS = {"cpu": "#1f77b4", "cuda": "#2ca02c"}


# ---------------------------------------------------------------------------------------------
# Plots: one function each, JobTable -> Figure | None.


def _ok(table: collect.JobTable) -> list[str]:
    return [k for k in table.columns if table.results[k].status == "ok"]


def _panels(n: int, title: str) -> tuple[Figure, list]:
    columns = min(n, MAX_COLUMNS)
    rows = math.ceil(n / columns)
    figure = Figure(figsize=(PANEL_IN * columns, PANEL_IN * rows + 0.4), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel().tolist()
    for unused in axes[n:]:
        unused.set_visible(False)
    figure.suptitle(title)
    return figure, axes[:n]


@dataclass(frozen=True)
class _Point:
    """One variant in the accuracy-latency plot."""

    key: str
    latency: Latency
    accuracy: float
    size: float  # MiB
    device: str


def _accuracy_latency_points(table: collect.JobTable) -> list[_Point]:
    points = []
    for key in _ok(table):
        result = table.results[key]
        metrics = result.metrics
        if metrics.accuracy is not None and metrics.latency.median:
            points.append(
                _Point(
                    key,
                    metrics.latency,
                    metrics.accuracy,
                    metrics.model_size_mib or 0.0,
                    result.device,
                )
            )
    return points


def plot_accuracy_latency(table: collect.JobTable) -> Figure | None:
    """Accuracy against median latency per variant; marker area follows the model size."""
    points = _accuracy_latency_points(table)
    if not points:
        return None
    figure = Figure(figsize=(7.5, 5.0), layout="constrained")
    ax = figure.subplots()
    _draw_points(ax, points, table.best)
    latencies = [p.latency.median for p in points]
    if max(latencies) / min(latencies) > 20:
        ax.set_xscale("log")
    _draw_tolerances(ax, table)
    for device, colour in DEVICE_COLOURS.items():
        if any(p.device == device for p in points):
            ax.scatter([], [], color=colour, alpha=0.55, label=device)
    ax.margins(x=0.12, y=0.15)  # room for the labels
    ax.legend(loc="best", fontsize=8)
    ax.set_xlabel("median latency per forward pass (ms; bars: 95% interval of the median)")
    ax.set_ylabel("accuracy")
    ax.grid(True, alpha=0.3)
    ax.set_title(f"{table.job}: accuracy vs latency (marker area ∝ model size)")
    return figure


def _draw_points(ax, points: list[_Point], best: str | None) -> None:
    """Each variant with the interval of its median latency and its label."""
    largest = max(p.size for p in points) or 1.0
    for i, point in enumerate(sorted(points, key=lambda p: p.latency.median)):
        median = point.latency.median
        low, high = point.latency.median_ci95 or (median, median)
        ax.errorbar(
            median,
            point.accuracy,
            xerr=[[max(median - low, 0)], [max(high - median, 0)]],
            fmt="none",
            ecolor="#999999",
            elinewidth=1,
            capsize=3,
        )
        ax.scatter(
            median,
            point.accuracy,
            s=60 + 900 * point.size / largest,
            color=DEVICE_COLOURS.get(point.device, "#7f7f7f"),
            alpha=0.55,
            edgecolors="black",
            linewidths=2 if point.key == best else 0.6,
        )
        label = f"{point.key}\n{point.size:.1f} MiB" + ("  ★ best" if point.key == best else "")
        # Neighbours along the latency axis take turns above and below their point.
        ax.annotate(
            label,
            (median, point.accuracy),
            textcoords="offset points",
            xytext=(8, 8 if i % 2 == 0 else -22),
            fontsize=8,
        )


def _draw_tolerances(ax, table: collect.JobTable) -> None:
    """The job's latency and accuracy limits, as lines."""
    tolerances = table.tolerances
    if "max_latency_ms" in tolerances:
        ax.axvline(
            tolerances["max_latency_ms"],
            color="#d62728",
            linestyle="--",
            linewidth=1,
            label=f"max_latency_ms {tolerances['max_latency_ms']:g}",
        )
    base = table.results.get(table.baseline) if table.baseline else None
    if "max_accuracy_drop" in tolerances and base is not None:
        floor = base.metrics.accuracy - tolerances["max_accuracy_drop"]
        ax.axhline(
            floor,
            color="#d62728",
            linestyle=":",
            linewidth=1,
            label=f"baseline accuracy − max_accuracy_drop {tolerances['max_accuracy_drop']:g}",
        )


def _analysis(table: collect.JobTable, key: str) -> dict:
    analysis = table.results[key].analysis
    return analysis if isinstance(analysis, dict) else {}


def plot_sqnr_by_depth(table: collect.JobTable) -> Figure | None:
    """Per-layer SQNR (dB) against encoder depth, one panel per variant whose weights changed."""
    shown = [
        k
        for k in _ok(table)
        if any(row.get("sqnr_db") is not None for row in _analysis(table, k).get("layers") or [])
    ]
    if not shown:
        return None
    figure, axes = _panels(
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
    legend = {}  # one entry per label over all panels: a type may be missing from one
    for ax in axes:
        legend.update(zip(*reversed(ax.get_legend_handles_labels())))
    figure.legend(
        list(legend.values()),
        list(legend),
        loc="outside lower center",
        ncols=min(len(legend), 5),
        fontsize=8,
    )
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
    ax.set_xticks(
        list(range(head)) + [head] * has_head,
        [str(d) for d in range(head)] + ["head"] * has_head,
    )
    ax.set_xlabel("encoder layer")
    ax.set_ylabel("SQNR (dB)")
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
    figure, axes = _panels(len(by_type), title)
    for ax, (layer_type, hist) in zip(axes, by_type.items()):
        edges, counts = hist["edges"], hist["counts"]
        ax.stairs(
            counts, edges, fill=True, color=TYPE_COLOURS.get(layer_type, "#7f7f7f"), alpha=0.6
        )
        ax.set_yscale("log")
        grid = grids.get(layer_type)
        layers = f"{hist['n_layers']} layer" + ("s" if hist["n_layers"] != 1 else "")
        subtitle = f"{layer_type} ({layers}, {hist['n_weights']:,} weights)"
        if grid:
            inside = [v for v in grid["values"] if hist["min"] <= v <= hist["max"]]
            # A rug along the bottom: 256 int8 levels would hide the histogram as full-height lines.
            ax.vlines(
                inside, 0, 0.12, transform=ax.get_xaxis_transform(), color="black", linewidth=0.6
            )
            levels = f"{len(inside)} of {len(grid['values'])} levels in range"
            subtitle += f"\n{levels}, per {grid['granularity']}"
        ax.set_title(subtitle, fontsize=9)
        ax.set_xlim(hist["min"], hist["max"])
        ax.set_xlabel("weight")
        ax.set_ylabel("count (log)")
    return figure


def plot_reliability(table: collect.JobTable) -> Figure | None:
    """Reliability diagram per variant: accuracy against confidence in bins, the diagonal is
    calibrated."""
    shown = [k for k in _ok(table) if table.stats[k].get("calibration")]
    if not shown:
        return None
    figure, axes = _panels(
        len(shown), f"{table.job}: reliability (bars: accuracy per confidence bin)"
    )
    for ax, key in zip(axes, shown):
        calibration = table.stats[key]["calibration"]
        bins = [b for b in calibration["bins"] if b["count"]]
        ax.bar(
            [b["lo"] for b in bins],
            [b["accuracy"] for b in bins],
            width=[b["hi"] - b["lo"] for b in bins],
            align="edge",
            color="#1f77b4",
            alpha=0.7,
            edgecolor="black",
            linewidth=0.5,
            label="accuracy",
        )
        ax.scatter(
            [b["mean_confidence"] for b in bins],
            [b["accuracy"] for b in bins],
            s=10,
            color="black",
            zorder=3,
            label="mean confidence",
        )
        ax.plot([0, 1], [0, 1], color="#d62728", linestyle="--", linewidth=1)
        for b in bins:
            ax.annotate(str(b["count"]), ((b["lo"] + b["hi"]) / 2, 0.02), ha="center", fontsize=6)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(f"{key} (ECE {calibration['ece']:.4f})", fontsize=10)
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
    axes[0].legend(fontsize=7, loc="upper left")
    return figure


def plot_confusion(table: collect.JobTable) -> Figure | None:
    """Confusion matrix per variant: rows are the gold labels, columns the predicted ones."""
    shown = [k for k in _ok(table) if table.stats[k].get("confusion_matrix")]
    if not shown:
        return None
    figure, axes = _panels(
        len(shown), f"{table.job}: confusion matrices (rows gold, columns predicted)"
    )
    for ax, key in zip(axes, shown):
        confusion = table.stats[key]["confusion_matrix"]
        matrix, labels = confusion["matrix"], confusion["labels"]
        ax.imshow(matrix, cmap="Blues", vmin=0)
        top = max(max(row) for row in matrix) or 1
        for i, row in enumerate(matrix):
            for j, count in enumerate(row):
                ax.text(
                    j,
                    i,
                    str(count),
                    ha="center",
                    va="center",
                    fontsize=9,
                    color="white" if count > top / 2 else "black",
                )
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("predicted")
        ax.set_ylabel("gold")
    return figure


@dataclass(frozen=True)
class Plot:
    name: str  # file name part
    heading: str
    caption: str
    draw: Callable[[collect.JobTable], Figure | None]
    missing: str  # said in place of the plot when there is nothing to draw


PLOTS = [
    Plot(
        "accuracy-latency",
        "Accuracy vs latency",
        "Each variant at its median latency (bars: the 95% interval of the median) and accuracy; "
        "marker area "
        "follows the model size, the thick outline is the best variant that passes. Dashed lines: "
        "the job's "
        "latency and accuracy tolerances.",
        plot_accuracy_latency,
        "no ok result with accuracy and latency",
    ),
    Plot(
        "sqnr-by-depth",
        "Per-layer weight SQNR by depth",
        "SQNR = 10·log10(Σw² / Σ(w − w_q)²) of each linear layer's weights against FP32, in dB; "
        "every 6 dB is "
        "about one bit of precision. Points are layers (coloured by type), the line their mean at "
        "each depth; "
        "'head' is the pooler and classifier. Unchanged layers (FP32) have no SQNR and are left "
        "out.",
        plot_sqnr_by_depth,
        "no per-layer weight analysis in these results",
    ),
    Plot(
        "reliability",
        "Reliability diagrams",
        "Samples binned by confidence (the top class probability); a bar's height is the accuracy "
        "in its bin, "
        "the dot the bin's mean confidence, the number its sample count. Bars under the diagonal: "
        "overconfident. ECE is the sample-weighted mean gap.",
        plot_reliability,
        "no class probabilities in these results",
    ),
    Plot(
        "confusion",
        "Confusion matrices",
        "Counts of samples by gold label (rows) and predicted label (columns).",
        plot_confusion,
        "no predictions in these results",
    ),
]


# ---------------------------------------------------------------------------------------------
# The HTML file and the PNGs beside it.


@dataclass
class Rendered:
    path: Path
    figures: list[Path]


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def _esc(value) -> str:
    return html.escape(str(value))


def _figure_html(png: bytes, alt: str, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{_esc(alt)}">'
        f"<figcaption>{_esc(caption)}</figcaption></figure>"
    )


def _table_html(table: collect.JobTable) -> str:
    header, rows, footnotes = collect.table_rows(table)
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(f"<td>{_esc(c)}</td>" if i else f"<th>{_esc(c)}</th>" for i, c in enumerate(row))
        + "</tr>"
        for row in rows
    )
    notes = "".join(f"<li>{_esc(n)}</li>" for n in footnotes)
    return f'<table class="metrics"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>' + (
        f'<ul class="notes">{notes}</ul>' if notes else ""
    )


def _verdict_html(table: collect.JobTable) -> str:
    lines = collect.verdict_lines(table)
    if not lines:
        return (
            "<p>The job states no tolerances: no verdict. Add <code>tolerances:</code> to the job "
            "file "
            "(max_accuracy_drop, min_agreement, max_latency_ms, max_size_mib, "
            "max_peak_rss_mib).</p>"
        )
    items = []
    for key in table.columns:
        verdict = table.stats[key]["verdict"]
        items.append(
            f'<li class="{verdict["status"].replace(" ", "-")}"><b>{_esc(key)}</b>: '
            f"{_esc(collect.verdict_text(verdict))}</li>"
        )
    return (
        f'<p>{_esc(lines[0])}</p><ul class="verdict">{"".join(items)}</ul>'
        f'<p class="best">{_esc(lines[-1])}</p>'
    )


def _number(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _details_html(table: collect.JobTable) -> str:
    """Per-class scores, flipped samples and LLM.int8() outlier columns, per variant."""
    parts = []
    for key in _ok(table):
        stats = table.stats[key]
        block = []
        if stats.get("per_class"):
            rows = "".join(
                f"<tr><th>{_esc(c['label'])}</th><td>{_number(c['precision'])}</td>"
                f"<td>{_number(c['recall'])}</td><td>{_number(c['f1'])}</td><td>{c['support']}</td></tr>"
                for c in stats["per_class"]
            )
            block.append(
                "<table><thead><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th>"
                f"<th>support</th></tr></thead><tbody>{rows}</tbody></table>"
            )
        effects = stats.get("effects")
        if effects and key != table.baseline:
            flips = (
                ", ".join(f"{f['from']} → {f['to']}: {f['count']}" for f in effects["flips"])
                or "none"
            )
            block.append(
                f"<p>Flips against {_esc(table.baseline)}: {_esc(flips)} (correct → wrong "
                f"{effects['correct_to_wrong']}, wrong → correct "
                f"{effects['wrong_to_correct']}).</p>"
            )
            if effects["flipped_samples"]:
                rows = "".join(
                    f"<tr><td>{s['index']}</td><td>{_esc(s['gold'])}</td><td>{_esc(s['from'])}</td>"
                    f"<td>{_esc(s['to'])}</td></tr>"
                    for s in effects["flipped_samples"]
                )
                block.append(
                    "<details><summary>flipped samples (index in the evaluation "
                    "sample)</summary><table>"
                    "<thead><tr><th>sample</th><th>gold</th><th>baseline</th><th>variant</th></tr></thead>"
                    f"<tbody>{rows}</tbody></table></details>"
                )
        outliers = _analysis(table, key).get("outlier_columns")
        if outliers is not None:
            text = (
                "; ".join(
                    f"{layer}: {len(cols)} "
                    f"({', '.join(map(str, cols[:12]))}{', …' * (len(cols) > 12)})"
                    for layer, cols in outliers.items()
                )
                or "none"
            )
            block.append(f"<p>LLM.int8() outlier input columns (kept in 16-bit): {_esc(text)}</p>")
        if block:
            parts.append(f"<h4>{_esc(key)}</h4>" + "".join(block))
    return "".join(parts)


HISTOGRAM_CAPTION = (
    "Histograms (log counts) of the FP32 weights pooled by layer type. The ticks along the bottom "
    "are the values "
    "the precision can represent at the scale of that type's first layer (for per-row or "
    "per-block schemes, the "
    "row or block holding the largest |w|; the others use the same codes at smaller scales)."
)


def _histograms_html(table: collect.JobTable, emit) -> str:
    """One figure per variant with a quantization grid; else the FP32 weights once, from any
    variant."""
    drawn = [k for k in _ok(table) if any((_analysis(table, k).get("grids") or {}).values())]
    if not drawn:
        drawn = [k for k in _ok(table) if _analysis(table, k).get("histograms")][:1]
    if not drawn:
        return '<p class="missing">– no weight histograms in these results</p>'
    return "".join(
        emit(
            plot_weight_histograms(table, key),
            f"{table.job}-histograms-{key}",
            f"{table.job}: weight histograms, {key}",
            HISTOGRAM_CAPTION,
            "",
        )
        for key in drawn
    )


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1400px; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: right; white-space: nowrap; }
thead th { background: #f0f0f0; }
tbody th { text-align: left; font-weight: normal; background: #fafafa; }
.scroll { overflow-x: auto; }
ul.notes { font-size: 12px; color: #555; }
ul.verdict li.pass { color: #1a7f37; }
ul.verdict li.fail { color: #b42318; }
ul.verdict li.no-result { color: #777; }
p.best { font-weight: bold; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 12px; color: #555; max-width: 900px; }
p.missing { color: #777; font-style: italic; }
"""


def write_report(results: list[dict], out: Path, baseline: str | None = None) -> Rendered:
    """Write `out` (HTML) and its PNGs into `<out stem>_figures/`; returns both paths."""
    out = Path(out)
    figures_dir = out.parent / f"{out.stem}_figures"
    written: list[Path] = []

    def emit(figure: Figure | None, name: str, alt: str, caption: str, missing: str) -> str:
        if figure is None:
            return f'<p class="missing">– {_esc(missing)}</p>'
        png = _png(figure)
        figures_dir.mkdir(parents=True, exist_ok=True)
        path = figures_dir / f"{_safe(name)}.png"
        path.write_bytes(png)
        written.append(path)
        return _figure_html(png, alt, caption)

    sections = []
    # Names (a job, a variant, a label) are drawn as written: matplotlib would read $...$ as a
    # formula
    # and stop the report at one it cannot parse.
    with rc_context({"text.parse_math": False}):
        for table in collect.build_tables(results, baseline):
            body = [
                f"<h2>{_esc(table.job)}</h2>",
                f"<p>Baseline: {_esc(table.baseline or 'none')}; Δ = (variant − baseline) / "
                "baseline.</p>",
                f'<div class="scroll">{_table_html(table)}</div>',
                "<h3>Deployment verdict</h3>",
                _verdict_html(table),
            ]
            for plot in PLOTS:
                body.append(f"<h3>{_esc(plot.heading)}</h3>")
                body.append(
                    emit(
                        plot.draw(table),
                        f"{table.job}-{plot.name}",
                        f"{table.job}: {plot.heading}",
                        plot.caption,
                        plot.missing,
                    )
                )
                if (
                    plot.name == "sqnr-by-depth"
                ):  # the weights' story together; histograms are one figure per variant
                    body.append(
                        "<h3>Weight histograms and quantization grids</h3>"
                        + _histograms_html(table, emit)
                    )
            body.append(
                "<h3>Per variant</h3>"
                + (_details_html(table) or '<p class="missing">– no ok results</p>')
            )
            sections.append("<section>" + "".join(body) + "</section>")

    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>quantbench '
        "report</title>"
        f"<style>{STYLE}</style></head><body><h1>quantbench report</h1>"
        f"<p>{len(results)} result{'s' * (len(results) != 1)}, written {stamp}. "
        f"Figures are also in {_esc(figures_dir.name)}/.</p>"
        + "".join(sections)
        + "</body></html>\n"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return Rendered(out, written)
