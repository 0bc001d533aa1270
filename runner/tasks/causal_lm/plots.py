"""A causal LM's figures in the report: perplexity against decode speed, how each window's NLL
moved against the baseline, and each variant's per-token KL from FP32. Each is a function of a
JobTable that returns a Figure, or None when the results hold nothing to draw."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from runner import collect
from runner.report_figures import (
    MachineStyle,
    Plot,
    TaskPlots,
    label_points,
    log_scale,
    log_scale_if_wide,
    machine_legend,
    machine_styles,
    panels,
)


def _decode_points(table: collect.JobTable) -> list[tuple[str, float, float, float, MachineStyle]]:
    """(key, decode tokens/s, perplexity, size MiB, machine) of each ok variant that has both."""
    machines = machine_styles(table.results)
    points = []
    for key in table.ok_columns():
        metrics = table.results[key].metrics
        if metrics.value("perplexity") is not None and metrics.value("decode_tokens_per_s"):
            speed, perplexity = metrics.value("decode_tokens_per_s"), metrics.value("perplexity")
            points.append((key, speed, perplexity, metrics.model_size_mib or 0.0, machines[key]))
    return points


def plot_perplexity_decode(table: collect.JobTable) -> Figure | None:
    """Perplexity against decode tokens/s per variant; marker area follows the model size."""
    points = _decode_points(table)
    if not points:
        return None
    figure = Figure(figsize=(8.0, 6.0), layout="constrained")
    ax = figure.subplots()
    largest = max(p[3] for p in points) or 1.0
    areas = [60 + 900 * size / largest for _, _, _, size, _ in points]
    for (key, speed, perplexity, _, machine), area in zip(points, areas):
        ax.scatter(
            speed,
            perplexity,
            s=area,
            color=machine.colour,
            marker=machine.marker,
            alpha=0.55,
            edgecolors="black",
            linewidths=2 if key == table.best else 0.6,
        )
    log_scale_if_wide(ax, "x", [p[1] for p in points])
    _draw_perplexity_limit(ax, table)
    ax.margins(x=0.15, y=0.2)  # room for the labels
    machine_legend(figure, ax, [p[4] for p in points])
    ax.set_xlabel("decode tokens/s at the first generation batch size (higher is faster)")
    ax.set_ylabel("perplexity (lower is better)")
    ax.grid(True, alpha=0.3)
    ax.set_title(f"{table.job}: perplexity vs decode speed (marker area ∝ model size)")
    labels = [
        f"{key}\n{size:.1f} MiB" + ("  ★ best" if key == table.best else "")
        for key, _, _, size, _ in points
    ]
    label_points(ax, [(p[1], p[2]) for p in points], labels, areas)
    return figure


def _draw_perplexity_limit(ax, table: collect.JobTable) -> None:
    """The job's max_perplexity_increase above the baseline's perplexity, as a line."""
    limit = table.tolerances.get("max_perplexity_increase")
    base = table.results.get(table.baseline) if table.baseline else None
    if limit is None or base is None or base.metrics.value("perplexity") is None:
        return
    ax.axhline(
        base.metrics.value("perplexity") * (1 + limit),
        color="#d62728",
        linestyle=":",
        linewidth=1,
        label=f"baseline perplexity × (1 + max_perplexity_increase {limit:g})",
    )


def plot_nll_delta(table: collect.JobTable) -> Figure | None:
    """Per variant, a histogram of its windows' NLL minus the baseline's, nats per scored token."""
    shown = [k for k in table.ok_columns() if table.stats[k].get("window_nll_delta")]
    if not shown:
        return None
    figure, axes = panels(
        len(shown), f"{table.job}: per-window NLL change against {table.baseline} (nats/token)"
    )
    for ax, key in zip(axes, shown):
        deltas = np.asarray(table.stats[key]["window_nll_delta"])
        ax.hist(deltas, bins=min(40, max(5, len(deltas) // 5)), color="#1f77b4", alpha=0.7)
        ax.axvline(0.0, color="black", linewidth=0.8)
        ax.axvline(deltas.mean(), color="#d62728", linestyle="--", linewidth=1)
        worse = float(np.mean(deltas > 0))
        ax.set_title(f"{key}\nmean {deltas.mean():+.4f}, {worse:.0%} of windows worse", fontsize=9)
        ax.set_xlabel("variant NLL − baseline NLL (nats/token)")
        ax.set_ylabel("windows")
    return figure


def plot_kl_distribution(table: collect.JobTable) -> Figure | None:
    """Per variant, its per-token KL from FP32 as metrics.kl_stats' histogram keeps it, on a log
    axis, with its median and 99th percentile marked."""
    shown = [k for k in table.ok_columns() if _kl_stats(table, k).get("kl_histogram")]
    if not shown:
        return None
    figure, axes = panels(len(shown), f"{table.job}: per-token KL(FP32 ‖ variant) (nats)")
    for ax, key in zip(axes, shown):
        stats = _kl_stats(table, key)
        histogram, kl = stats["kl_histogram"], stats["kl"]
        ax.stairs(histogram["counts"], histogram["edges"], fill=True, color="#1f77b4", alpha=0.7)
        log_scale(ax, "x")
        for value, style in ((kl["median"], "--"), (kl["percentiles"]["99"], ":")):
            if value > histogram["edges"][0]:  # a log axis has no 0
                ax.axvline(value, color="#d62728", linestyle=style, linewidth=1)
        ax.set_title(
            f"{key}\nmedian {kl['median']:.3g}, 99% {kl['percentiles']['99']:.3g}; "
            f"{histogram['below']} tokens < {histogram['edges'][0]:g}",
            fontsize=9,
        )
        if not any(histogram["counts"]):  # FP32 against itself: nothing to draw on a log axis
            ax.text(0.5, 0.5, "no token in range", transform=ax.transAxes, ha="center")
            ax.set_yticks([])
        ax.set_xlabel("KL per token (nats)")
        ax.set_ylabel("tokens")
    return figure


def _kl_stats(table: collect.JobTable, key: str) -> dict:
    return table.results[key].metrics.value("kl_stats") or {}


PLOTS = TaskPlots(
    first=(
        Plot(
            "perplexity-decode",
            "Perplexity vs decode speed",
            "Each variant at its decode tokens/s (greedy decoding with the KV cache, at the job's "
            "first generation batch size) and its perplexity on the evaluation documents; marker "
            "area follows the model size, the thick outline is the best variant that passes. "
            "Dotted line: the baseline's perplexity raised by the job's max_perplexity_increase.",
            plot_perplexity_decode,
            "no ok result with perplexity and decode speed",
        ),
    ),
    last=(
        Plot(
            "nll-delta",
            "Per-window NLL change against the baseline",
            "For each variant, its rolling windows binned by how much its NLL per scored token "
            "moved against the baseline's on the same window (nats/token): right of 0 the variant "
            "predicts that window's tokens worse. Dashed line: the mean over windows (not "
            "token-weighted).",
            plot_nll_delta,
            "no per-window predictions paired with the baseline's",
        ),
        Plot(
            "kl-distribution",
            "Per-token KL from FP32",
            "For each variant, its scored tokens binned by KL(FP32 ‖ variant) of the next-token "
            "distribution (nats, over FP32's top-k tokens and one bin for the rest: a lower bound "
            "of the full KL), four bins a decade; the title counts the tokens below the first "
            "bin (0 included), which a log axis cannot draw. Dashed line: the median; dotted: "
            "the 99th percentile, llama.cpp's headline numbers.",
            plot_kl_distribution,
            "no result with KL statistics (perplexity.kl_top_k 0, or results from before them)",
        ),
    ),
)
