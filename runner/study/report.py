"""A sensitivity study in the report (runner/study/stage.py writes it): the harm of each group of
linear layers quantized alone against the groups' weight and output SQNR, the ranking's top, and
the recipe, predicted and as its mixed variant measured. Drawn from the study file's dict, in the
section of the study's job."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from runner import collect
from runner.layers import LAYER_TYPES, classify_layer
from runner.report_figures import TYPE_COLOURS, FigureFiles, Shown, number, panels, shared_legend
from runner.results import StudyFile
from runner.study.ranking import tolerance_text

# the top of the ranking in FP32. Drawn from the study's dict, not from a JobTable.

STUDY_SCHEMA = 1  # the study file's schema_version this report reads
RANKING_ROWS = 10  # the ranking table's rows; the rest are in the study file
LABELLED_POINTS = 3  # the top-ranked groups named in the figure
LABEL_CHARS = 28  # a longer group name loses its leading dotted parts in the figure
SQNR_AXES = (("weight_sqnr_db", "weight SQNR (dB)"), ("output_sqnr_db", "output SQNR (dB)"))
HARM_LABEL = "flips vs FP32, group alone quantized"
SEVERAL_TYPES = "several types"


def spearman(x, y) -> float | None:
    """Spearman's rank correlation: Pearson's of the ranks, ties given their average rank. None
    where it says nothing: fewer than 3 points, or one side all equal."""
    if len(x) != len(y):
        raise ValueError(f"spearman needs pairs: {len(x)} x values, {len(y)} y values")
    if len(x) < 3:
        return None
    x_ranks, y_ranks = _average_ranks(x), _average_ranks(y)
    if x_ranks.std() == 0 or y_ranks.std() == 0:
        return None
    return float(np.corrcoef(x_ranks, y_ranks)[0, 1])


def _average_ranks(values) -> np.ndarray:
    """1-based ranks; equal values share the mean of the ranks they span."""
    values = np.asarray(values, dtype=float)
    order = np.argsort(values, kind="stable")
    _, first, counts = np.unique(values[order], return_index=True, return_counts=True)
    ranks = np.empty(len(values))
    ranks[order] = np.repeat(first + (counts + 1) / 2, counts)
    return ranks


def _group_type(entry: dict) -> str:
    """The layer type of a ranked group's layers, or SEVERAL_TYPES (a depth group)."""
    types = {classify_layer(name)[0] for name in entry.get("layers") or [entry["group"]]}
    return types.pop() if len(types) == 1 else SEVERAL_TYPES


def _short_group(group: str) -> str:
    """The group's name, less leading dotted parts while it is too long to label a point."""
    parts = group.split(".")
    while len(parts) > 1 and len(".".join(parts)) > LABEL_CHARS:
        parts = parts[1:]
    return ("…" if len(parts) < group.count(".") + 1 else "") + ".".join(parts)


def plot_sensitivity(study: dict) -> Figure | None:
    """Does weight error predict behaviour? Each ranked group's flips with only it quantized,
    against its weight SQNR and its output SQNR (one panel each, the y axis shared)."""
    ranking = study.get("ranking") or []
    if not any(entry.get(field) is not None for entry in ranking for field, _ in SQNR_AXES):
        return None
    figure, axes = panels(
        len(SQNR_AXES),
        f"{study['job']}: {study['variant']}, each group quantized alone",
    )
    axes[1].sharey(axes[0])
    for ax, (field, label) in zip(axes, SQNR_AXES):
        _draw_sensitivity_panel(ax, ranking, field, label)
    axes[0].set_ylabel(HARM_LABEL)
    axes[0].yaxis.set_major_locator(MaxNLocator(integer=True))  # flips are counts
    shared_legend(figure, axes)
    return figure


def _draw_sensitivity_panel(ax, ranking: list[dict], field: str, label: str) -> None:
    """The groups that have `field`, coloured by layer type, the top-ranked named; ρ in the
    title."""
    drawn = [entry for entry in ranking if entry.get(field) is not None]
    order = [*LAYER_TYPES, SEVERAL_TYPES]
    by_type: dict[str, list[dict]] = {}
    for entry in drawn:
        by_type.setdefault(_group_type(entry), []).append(entry)
    for layer_type in sorted(by_type, key=lambda t: order.index(t) if t in order else len(order)):
        entries = by_type[layer_type]
        ax.scatter(
            [entry[field] for entry in entries],
            [entry["only"]["flips"] for entry in entries],
            s=18,
            color=TYPE_COLOURS.get(layer_type, "#7f7f7f"),
            label=layer_type,
        )
    for entry in drawn:
        if entry["rank"] <= LABELLED_POINTS:
            ax.annotate(
                f"#{entry['rank']} {_short_group(entry['group'])}",
                (entry[field], entry["only"]["flips"]),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
            )
    rho = spearman([entry[field] for entry in drawn], [entry["only"]["flips"] for entry in drawn])
    said = "undefined" if rho is None else f"{rho:+.2f}"
    ax.set_title(f"Spearman ρ = {said} ({len(drawn)} groups)", fontsize=10)
    ax.set_xlabel(label)
    ax.grid(True, alpha=0.3)


def _sensitivity_caption(study: dict) -> str:
    ranking = study.get("ranking") or []
    caption = (
        f"Each point is a group of linear layers ({study['sensitivity']['groups']} grouping), "
        f"coloured by layer type: x the mean weight SQNR (left) and output SQNR (right) of its "
        f"layers in the fully quantized {study['variant']}; y its flips against FP32 on the "
        f"{study['samples']} evaluation samples when only that group is quantized. #n: rank, "
        "most harmful first. ρ is Spearman's rank correlation of SQNR and flips: near −1, the "
        "groups with the largest error (lowest SQNR) are the harmful ones, so that error predicts "
        "the ranking; near 0, it does not, and only measuring the groups finds them."
    )
    for (field, _), panel in zip(SQNR_AXES, ("left", "right")):
        missing = sum(entry.get(field) is None for entry in ranking)
        if missing:
            what = field.removesuffix("_sqnr_db")
            caption += (
                f" {missing} group{'s' * (missing != 1)} without {what} SQNR "
                f"left out of the {panel} panel."
            )
    return caption


RANKING_HEADER = [
    "rank",
    "group",
    "layers",
    "only: agreement",
    "only: flips",
    "only: mean KL (nats)",
    "all but: agreement",
    "weight SQNR (dB)",
    "output SQNR (dB)",
]


def _significant(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}g}"


@dataclass(frozen=True)
class StudyShown:
    """A sensitivity study as the page shows it; `notice` alone for one that cannot be shown."""

    variant: str
    file: str
    notice: str | None = None  # why nothing else is shown: the study failed, or is unreadable
    about: str = ""  # what was measured, in one sentence
    figure: Shown | None = None
    header: list[str] | None = None
    rows: list[list[str]] | None = None
    more: str | None = None  # the ranking's rows not in the table
    recipe: list[str] | None = None


def _study(found: StudyFile, table: collect.JobTable, figures: FigureFiles) -> StudyShown:
    study = found.study
    variant = study.get("variant") or found.file.stem
    file = found.file.name
    notice = _study_notice(study, variant)
    if notice:
        return StudyShown(variant, file, notice)
    ranking = study.get("ranking") or []
    more = len(ranking) - RANKING_ROWS
    return StudyShown(
        variant,
        file,
        about=_study_about(study),
        figure=figures.show(
            plot_sensitivity(study),
            f"{table.job}-sensitivity-{variant}",
            f"{table.job}: sensitivity of {variant}'s groups against their SQNR",
            _sensitivity_caption(study),
            "no group in this study has a weight or output SQNR",
        ),
        header=RANKING_HEADER,
        rows=[_ranking_row(entry) for entry in ranking[:RANKING_ROWS]],
        more=f"… and {more} more group{'s' * (more != 1)} in {file}." if more > 0 else None,
        recipe=_recipe_lines(study) + [_measured_line(study, table)],
    )


def _study_notice(study: dict, variant: str) -> str | None:
    if study.get("schema_version") != STUDY_SCHEMA:
        return (
            f"The sensitivity study of {variant} has schema_version "
            f"{study.get('schema_version')}; this quantbench reads {STUDY_SCHEMA}: not shown."
        )
    if study.get("status") != "ok":
        said = study.get("status") if study.get("status") == "skipped" else "failed"
        return f"The sensitivity study of {variant} {said}: {study.get('error') or 'no reason'}."
    if not study.get("ranking") or not study.get("recipe") or not study.get("full"):
        return f"The sensitivity study of {variant} holds no ranking, recipe or full measure."
    return None


def _study_about(study: dict) -> str:
    about = study["sensitivity"]
    return (
        f"{about['precision']} on {about['device']}, the {study['layers']} linear layers it "
        f"quantizes grouped by {about['groups']} ({len(study['ranking'])} groups), each measured "
        f"against FP32's predictions on {study['samples']} samples: only that group quantized, "
        "and all but that group. Ranked most harmful first (only: lowest agreement, then highest "
        "mean KL)."
    )


def _ranking_row(entry: dict) -> list[str]:
    only, all_but = entry["only"], entry["all_but"]
    return [
        str(entry["rank"]),
        entry["group"],
        str(len(entry["layers"])),
        number(only["agreement"], 4),
        str(only["flips"]),
        _significant(only["mean_kl"]),
        number(all_but["agreement"], 4),
        number(entry.get("weight_sqnr_db"), 1),
        number(entry.get("output_sqnr_db"), 1),
    ]


def _recipe_lines(study: dict) -> list[str]:
    """Which groups the recipe keeps in FP32, whether it meets its tolerance, and what the study
    measured of it and of the fully quantized model."""
    recipe, full = study["recipe"], study["full"]
    groups, kept = recipe["groups"], recipe["kept"]
    tolerance = tolerance_text(recipe.get("tolerance") or {})
    if groups:
        names = ", ".join(groups)
        kept_line = (
            f"Kept in FP32: {len(groups)} group{'s' * (len(groups) != 1)} ({len(kept)} of "
            f"{study['layers']} layers): {names}."
        )
    else:
        kept_line = "Kept in FP32: nothing; the fully quantized model is the recipe."
    met = "met" if recipe["met"] else "NOT met"
    result = recipe["result"]
    return [
        kept_line,
        f"Tolerance ({tolerance}): {met}.",
        f"Predicted by the study for {study['mixed_variant']}: agreement "
        f"{result['agreement']:.4f}, accuracy {result['accuracy']:.4f} (FP32 "
        f"{result['accuracy_fp32']:.4f}), {result['flips']} flips; fully quantized "
        f"{study['variant']}: agreement {full['agreement']:.4f}, accuracy "
        f"{full['accuracy']:.4f}, {full['flips']} flips.",
    ]


def _ok_result(table: collect.JobTable, variant: str | None):
    """The first ok column of that variant id in the table (a variant may have run on hosts)."""
    return next(
        (
            table.results[key]
            for key in table.ok_columns()
            if variant is not None and table.results[key].variant == variant
        ),
        None,
    )


def _measured_line(study: dict, table: collect.JobTable) -> str:
    """The mixed variant as run, beside the fully quantized one and FP32, from the results."""
    mixed_id = study["mixed_variant"]
    mixed = _ok_result(table, mixed_id)
    if mixed is None:
        return f"Measured: no ok result of {mixed_id} in this job's results: run it to measure it."
    shown = [
        (mixed_id, mixed),
        (study["variant"], _ok_result(table, study["variant"])),
        (f"fp32-{mixed.device}", _ok_result(table, f"fp32-{mixed.device}")),
    ]
    line = "Measured: " + "; ".join(
        _measured(name, result, table.declaration) for name, result in shown if result
    )
    if sorted(mixed.settings.get("kept_in_fp32") or []) != sorted(study["recipe"]["kept"]):
        line += f". Note: {mixed_id} ran with other layers kept in FP32 than this recipe keeps"
    return line + "."


def _measured(name: str, result, task) -> str:
    """A variant's key metric (its task's), median latency and size."""
    metrics = result.metrics
    metric, value, digits = task.key_metric(metrics)
    return (
        f"{name} {metric} {number(value, digits)}, median latency "
        f"{number(metrics.latency.median, 2)} ms, {number(metrics.model_size_mib, 1)} MiB"
    )


def studies_shown(
    table: collect.JobTable, studies: list[StudyFile], figures: FigureFiles
) -> list[StudyShown]:
    mine = [found for found in studies if found.study.get("job") == table.job]
    return [_study(found, table, figures) for found in sorted(mine, key=lambda s: str(s.file))]
