"""A classifier's figures in the report: accuracy against latency, reliability diagrams and
confusion matrices. Each is a function of a collect.JobTable that returns a Figure, or None when the
results hold nothing to draw."""

from __future__ import annotations

from dataclasses import dataclass

from matplotlib.figure import Figure

from runner import collect
from runner.report_figures import (
    MachineStyle,
    Plot,
    TaskPlots,
    label_points,
    log_scale_if_wide,
    machine_legend,
    machine_styles,
    panels,
)
from runner.schema import Latency


@dataclass(frozen=True)
class _Point:
    """One variant in the accuracy-latency plot."""

    key: str
    latency: Latency
    accuracy: float
    size: float  # MiB
    machine: MachineStyle


def _accuracy_latency_points(table: collect.JobTable) -> list[_Point]:
    machines = machine_styles(table.results)
    points = []
    for key in table.ok_columns():
        result = table.results[key]
        metrics = result.metrics
        if metrics.value("accuracy") is not None and metrics.latency.median:
            points.append(
                _Point(
                    key,
                    metrics.latency,
                    metrics.value("accuracy"),
                    metrics.model_size_mib or 0.0,
                    machines[key],
                )
            )
    return points


def plot_accuracy_latency(table: collect.JobTable) -> Figure | None:
    """Accuracy against median latency per variant; marker area follows the model size."""
    points = _accuracy_latency_points(table)
    if not points:
        return None
    figure = Figure(figsize=(8.0, 6.0), layout="constrained")
    ax = figure.subplots()
    areas = _draw_points(ax, points, table.best)
    log_scale_if_wide(ax, "x", [p.latency.median for p in points])
    _draw_tolerances(ax, table)
    ax.margins(x=0.15, y=0.2)  # room for the labels
    machine_legend(figure, ax, [p.machine for p in points])
    ax.set_xlabel("median latency per forward pass (ms; bars: 95% interval of the median)")
    ax.set_ylabel("accuracy")
    ax.grid(True, alpha=0.3)
    ax.set_title(f"{table.job}: accuracy vs latency (marker area ∝ model size)")
    label_points(
        ax,
        [(p.latency.median, p.accuracy) for p in points],
        [_label(p, table.best) for p in points],
        areas,
    )
    return figure


def _label(point: _Point, best: str | None) -> str:
    return f"{point.key}\n{point.size:.1f} MiB" + ("  ★ best" if point.key == best else "")


def _draw_points(ax, points: list[_Point], best: str | None) -> list[float]:
    """Each variant with the interval of its median latency, in its machine's colour and marker;
    returns the marker areas."""
    largest = max(p.size for p in points) or 1.0
    areas = []
    for point in points:
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
        areas.append(60 + 900 * point.size / largest)
        ax.scatter(
            median,
            point.accuracy,
            s=areas[-1],
            color=point.machine.colour,
            marker=point.machine.marker,
            alpha=0.55,
            edgecolors="black",
            linewidths=2 if point.key == best else 0.6,
        )
    return areas


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
        floor = base.metrics.value("accuracy") - tolerances["max_accuracy_drop"]
        ax.axhline(
            floor,
            color="#d62728",
            linestyle=":",
            linewidth=1,
            label=f"baseline accuracy − max_accuracy_drop {tolerances['max_accuracy_drop']:g}",
        )


def plot_reliability(table: collect.JobTable) -> Figure | None:
    """Reliability diagram per variant: accuracy against confidence in bins, the diagonal is
    calibrated."""
    shown = [k for k in table.ok_columns() if table.stats[k].get("calibration")]
    if not shown:
        return None
    figure, axes = panels(
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
    shown = [k for k in table.ok_columns() if table.stats[k].get("confusion_matrix")]
    if not shown:
        return None
    figure, axes = panels(
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


PLOTS = TaskPlots(
    first=(
        Plot(
            "accuracy-latency",
            "Accuracy vs latency",
            "Each variant at its median latency (bars: the 95% interval of the median) and "
            "accuracy; marker area follows the model size, the thick outline is the best variant "
            "that passes. Dashed lines: the job's latency and accuracy tolerances.",
            plot_accuracy_latency,
            "no ok result with accuracy and latency",
        ),
    ),
    last=(
        Plot(
            "reliability",
            "Reliability diagrams",
            "Samples binned by confidence (the top class probability); a bar's height is the "
            "accuracy in its bin, the dot the bin's mean confidence, the number its sample count. "
            "Bars under the diagonal: overconfident. ECE is the sample-weighted mean gap.",
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
    ),
)
