"""A sensitivity study: which groups of linear layers hurt the predictions when quantized.

Each group of a model's linear layers is measured twice on the evaluation sample against the FP32
outputs: that group ONLY quantized (every other layer kept in FP32) and everything BUT that group
quantized (the group kept). The groups are ranked most harmful first, and a recipe keeps the
smallest prefix of the ranking in FP32 that meets a tolerance. Plain functions: the evaluation is
a callback (keep set -> the task's outputs, a classifier's class probabilities) and so is the
comparison with FP32, so no model is loaded here (see docs/sensitivity.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from runner.job import GROUPINGS, JobSpec
from runner.layers import classify_layer
from runner.tasks import TASKS

# Resamples of the paired bootstrap of the accuracy delta: as many as the variants' comparison.
BOOTSTRAP_RESAMPLES = 2000


@dataclass(frozen=True)
class Study:
    """What every measurement of one study shares. evaluate(keep) answers the task's outputs on
    the evaluation sample (a classifier's class probabilities) of the model quantized all but the
    layers in keep; compare(outputs) says what they are against FP32's (the task's worker says
    how: a classifier's compare_labels)."""

    evaluate: Callable[[frozenset[str]], Any]
    compare: Callable[[Any], dict]
    layers: tuple[str, ...]  # every linear layer the precision quantizes


@dataclass
class StudyView:
    """What a task gives a study step (runner/study/steps.py): the sample's batches (for the
    per-layer output SQNR), a model's outputs on the sample, and compare (outputs against FP32's).
    reference_json: FP32's outputs as the probe hands them to later steps (None: each step
    computes them again); fp32_pass_s: how long computing them took here (None: handed in)."""

    batches: list[dict]
    outputs: Callable[[Any], Any]
    compare: Callable[[Any], dict]
    reference_json: Any = None
    fp32_pass_s: float | None = None


@dataclass(frozen=True)
class Tolerance:
    """What a mixed model must meet; None turns a bound off. Default: agreement with FP32 >= 0.99
    (at most 1 flip in 100 samples), no bound on the accuracy drop."""

    min_agreement: float | None = 0.99
    max_accuracy_drop: float | None = None  # FP32 accuracy - mixed accuracy, in [0, 1]

    def __post_init__(self):
        for name in ("min_agreement", "max_accuracy_drop"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"tolerance {name} must be between 0 and 1 or None, got {value}")
        if self.min_agreement is None and self.max_accuracy_drop is None:
            raise ValueError("a tolerance needs min_agreement or max_accuracy_drop; both are None")

    def met_by(self, measured: dict) -> bool:
        if self.min_agreement is not None and measured["agreement"] < self.min_agreement:
            return False
        drop = measured["accuracy_fp32"] - measured["accuracy"]
        return self.max_accuracy_drop is None or drop <= self.max_accuracy_drop


def tolerance_text(tolerance: dict) -> str:
    """A Tolerance's fields (asdict) in words, as the run and the report say them."""
    bounds = []
    if tolerance.get("min_agreement") is not None:
        bounds.append(f"agreement with FP32 ≥ {tolerance['min_agreement']:g}")
    if tolerance.get("max_accuracy_drop") is not None:
        bounds.append(f"accuracy drop from FP32 ≤ {tolerance['max_accuracy_drop']:g}")
    return " and ".join(bounds) or "none stated"


def tolerance(spec: JobSpec) -> Tolerance:
    """The job's tolerances where its task judges the study by them (a classifier's agreement and
    accuracy drop, a causal LM's greedy agreement), else the study's default."""
    chosen = TASKS[spec.task].study_tolerance(spec.tolerances)
    return Tolerance(**chosen) if any(v is not None for v in chosen.values()) else Tolerance()


def plan_text(spec: JobSpec) -> str:
    """What `quantbench validate` says of the job's study."""
    study = spec.sensitivity
    return (
        f"  sensitivity: {study.variant_id} taken apart by {study.groups}, after the variants; "
        f"its recipe keeps layers in FP32 until {tolerance_text(asdict(tolerance(spec)))}, and "
        f"runs as {study.mixed_id}"
    )


# --------------------------------------------------------------------------------------------------
# Groups
# --------------------------------------------------------------------------------------------------


def group_layers(layers: list[str], how: str) -> dict[str, list[str]]:
    """Group name -> linear layer names (a model's, in module order: steps.study_groups). how:
    "layer" (one group per layer, named
    by it), "type" (layers.classify_layer's type: query, output, classifier, ...) or "depth"
    ("depth 3": the encoder layer's linear layers; a layer of no depth, such as the pooler and the
    classifier head, forms a group of its own type). Raises ValueError for another how."""
    if how not in GROUPINGS:
        raise ValueError(f"unknown grouping {how!r}; allowed: {', '.join(GROUPINGS)}")
    groups: dict[str, list[str]] = {}
    for name in layers:
        groups.setdefault(_group_of(name, how), []).append(name)
    return groups


def _group_of(name: str, how: str) -> str:
    if how == "layer":
        return name
    layer_type, depth = classify_layer(name)
    if how == "type" or depth is None:
        return layer_type
    return f"depth {depth}"


# --------------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------------


def measure(study: Study, keep: frozenset[str]) -> dict:
    """The model quantized all but keep, compared with FP32; keep recorded beside it."""
    unknown = sorted(set(keep) - set(study.layers))
    if unknown:
        raise ValueError(f"cannot keep {unknown}: not among the study's {len(study.layers)} layers")
    return {"kept": len(keep), **study.compare(study.evaluate(frozenset(keep)))}


def run_group(study: Study, group: str, layers: list[str]) -> dict:
    """One group measured twice: "only" (the group alone quantized, every other layer kept) and
    "all_but" (every layer but the group quantized, the group kept)."""
    if not layers:
        raise ValueError(f"group {group!r} has no layers")
    members = frozenset(layers)
    return {
        "group": group,
        "layers": list(layers),
        "only": measure(study, frozenset(study.layers) - members),
        "all_but": measure(study, members),
    }


def run_study(study: Study, groups: dict[str, list[str]]) -> list[dict]:
    """run_group for every group, ranked (see rank)."""
    return rank([run_group(study, group, layers) for group, layers in groups.items()])


# --------------------------------------------------------------------------------------------------
# Ranking and the recipe
# --------------------------------------------------------------------------------------------------


def ranking_key(result: dict) -> tuple:
    """Most harmful first: the "only this group quantized" agreement with FP32 ascending, then its
    mean KL descending, then the group name (a stable order for ties)."""
    only = result["only"]
    return (only["agreement"], -only["mean_kl"], result["group"])


def rank(group_results: list[dict]) -> list[dict]:
    """The ranking: run_group's results, most harmful first (ranking_key), each with its rank
    (1 = most harmful), group, layers and both measurements."""
    ordered = sorted(group_results, key=ranking_key)
    return [{"rank": i + 1, **result} for i, result in enumerate(ordered)]


def recipe(
    ranking: list[dict],
    full_result: dict,
    measure_keep: Callable[[frozenset[str]], dict],
    tolerance: Tolerance | None = None,
) -> dict:
    """The shortest prefix of the ranking to keep in FP32 for the mixed model to meet the
    tolerance (default Tolerance(): agreement with FP32 >= 0.99). full_result: the fully quantized
    model's measure (keep nothing when it meets the tolerance already); measure_keep(keep): the
    model quantized all but keep, measured (measure's dict). Prefixes of 1, 2, 4, ... groups are
    measured until one meets it, then the bisection between the last that did not and it: about
    2 log2(groups) measurements, not one per group, and the same prefix as trying them one by one
    wherever keeping more groups never makes the model worse. Never every group: that is the FP32
    model, not a mixed one, so a tolerance only it meets ends with met false. Returns kept (module
    names), groups, result (the chosen prefix's measure), met, tolerance and tried [{groups, kept,
    agreement, accuracy, mean_kl}], in the order measured."""
    tolerance = tolerance or Tolerance()
    longest = len(ranking) - 1
    measured = {0: full_result}
    tried = []

    def meets(count: int) -> bool:
        if count not in measured:
            keep = frozenset(name for entry in ranking[:count] for name in entry["layers"])
            measured[count] = measure_keep(keep)
            tried.append(_tried(ranking[:count], keep, measured[count]))
        return tolerance.met_by(measured[count])

    failing, count = 0, 1
    while count < longest and not meets(count):  # doubling: 1, 2, 4, ...
        failing, count = count, 2 * count
    count = min(count, longest)
    if count > 0 and meets(count):
        while count - failing > 1:  # bisection: failing does not meet, count does
            middle = (failing + count) // 2
            failing, count = (failing, middle) if meets(middle) else (middle, count)
    return _chosen(ranking[:count], measured[count], tolerance, tried)


def _chosen(entries: list[dict], result: dict, tolerance: Tolerance, tried: list) -> dict:
    return {
        "kept": sorted(name for entry in entries for name in entry["layers"]),
        "groups": [entry["group"] for entry in entries],
        "result": result,
        "met": tolerance.met_by(result),
        "tolerance": asdict(tolerance),
        "tried": tried,
    }


def _tried(entries: list[dict], keep: frozenset[str], result: dict) -> dict:
    return {
        "groups": len(entries),
        "kept": len(keep),
        "agreement": result["agreement"],
        "accuracy": result["accuracy"],
        "mean_kl": result["mean_kl"],
    }
