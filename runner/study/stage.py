"""The sensitivity study as a stage of `quantbench run`: after a job's variants, its `sensitivity:`
block takes one precision apart, group by group, and runs the recipe as a variant.

1. A probe step (one call on a node) computes the FP32 reference, measures the fully quantized
   model, the per-layer SQNR and the groups, and times one load and one accuracy pass: the cost of
   the rest is predicted from them and printed before it starts.
2. The groups, split over the nodes that can run the study's device (all in one call on one
   node: a call pays one model load), each measured "only" and "all_but".
3. The ranking, then a recipe step: the smallest prefix of it kept in FP32 that meets the job's
   tolerances (ranking.Tolerance's default without them: runner/study/ranking.py).
4. The study file, DIR/<job>/sensitivity-<variant>.json; then the recipe as the variant
   <precision>-mixed-<device>, measured like every variant (runner/sweep.py runs it).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from runner import dispatch, measure, results
from runner.cluster import Cluster, alive_nodes
from runner.job import Variant
from runner.placement import capable_nodes
from runner.plan import JobPlan
from runner.precisions import family_of
from runner.study import cost, partial
from runner.study.ranking import rank, tolerance, tolerance_text
from runner.work import StudyWork

SCHEMA_VERSION = 1
# A group step's share of the groups is predicted to take at most about this long, so that a study
# killed halfway loses little: `run --resume` keeps the steps that returned (study/partial.py).
SHARE_S = 150.0


@dataclass
class StudyRun:
    """What a stage needs from the sweep."""

    plan: JobPlan
    model_dir: Path
    cluster: Cluster
    results_dir: Path
    say: Callable[[str], None]
    placement_timeout_s: float | None = None
    resume: bool = False  # go on from the steps a killed run of the same study kept


def kept_study(results_dir: Path, plan: JobPlan, say=lambda line: None) -> results.StudyFile | None:
    """The job's study file when --resume may keep it: ok, of this spec and this sensitivity. A
    file there that holds no study it can read is said, and the study runs again."""
    spec = plan.spec
    path = results.study_path(results_dir, spec.name, spec.sensitivity.variant_id)
    if not path.exists():
        return None
    try:
        study = results.load_study(path)
    except results.UnusableFile as why:
        say(f"[resume] {spec.name}: runs the sensitivity study again: {path}: {why}")
        return None
    same = study.get("sensitivity") == asdict(spec.sensitivity)
    ok = study["status"] == "ok" and study.get("spec_hash") == plan.spec_hash
    ok = ok and study["schema_version"] == SCHEMA_VERSION
    return results.StudyFile(path, study) if same and ok else None


def run(stage: StudyRun) -> tuple[dict, Variant | None]:
    """The study, written; and the mixed variant to run (None where the recipe keeps nothing, or
    the study failed: its file says why)."""
    spec = stage.plan.spec
    study = new_study(stage.plan)
    started = time.perf_counter()
    try:
        measure_study(stage, study)
    except dispatch.NoCapableNode as error:  # as its variant is on a machine without the device
        study.update(status="skipped", error=str(error))
    except Exception as error:  # the study failed; the variants' results stand
        study.update(status="failed", error=f"{type(error).__name__}: {error}")
    study["ended_at"], study["wall_s"] = measure.now(), round(time.perf_counter() - started, 3)
    wrote = write_study(stage, study)
    if study["status"] == "ok" and "unwritten" not in study:
        path = partial.partial_path(stage.results_dir, spec.name, spec.sensitivity.variant_id)
        path.unlink(missing_ok=True)
    if study["status"] != "ok":
        stage.say(f"sensitivity: {spec.name}: {study['status']}: {study['error']} ({wrote})")
        return study, None
    for line in summary_lines(study):
        stage.say(f"sensitivity: {spec.name}: {line}")
    stage.say(f"sensitivity: {spec.name}: {wrote}")
    kept = study["recipe"]["kept"]
    mixed = Variant(spec.sensitivity.precision, spec.sensitivity.device, keep=tuple(kept))
    return study, mixed if kept else None


def write_study(stage: StudyRun, study: dict) -> str:
    """Says "wrote FILE", or "cannot write FILE: REASON" (a disk that filled during the run), which
    the study then carries as `unwritten`: its lines above are its only record, the mixed variant
    still runs, and the run's exit code says a result was lost."""
    spec = stage.plan.spec
    path = results.study_path(stage.results_dir, spec.name, spec.sensitivity.variant_id)
    try:
        results.write_json(path, study)
    except OSError as error:
        study["unwritten"] = f"cannot write {path}: {error.strerror or error}"
        return study["unwritten"]
    return f"wrote {path}"


def new_study(plan: JobPlan) -> dict:
    spec = plan.spec
    return {
        "kind": results.STUDY_KIND,
        "schema_version": SCHEMA_VERSION,
        "job": spec.name,
        "status": "ok",
        "error": None,
        "spec_hash": plan.spec_hash,
        "sensitivity": asdict(spec.sensitivity),
        "variant": spec.sensitivity.variant_id,
        "mixed_variant": spec.sensitivity.mixed_id,
        "samples": len(plan.examples),
        "started_at": measure.now(),
    }


def first_step(stage: StudyRun) -> StudyWork:
    plan = stage.plan
    return StudyWork(
        kind="probe",
        study=plan.spec.sensitivity,
        family=family_of(plan.spec.sensitivity.precision),
        model_dir=str(stage.model_dir),
        **plan.worker_inputs(),
    )


def measure_study(stage: StudyRun, study: dict) -> None:
    """Probe, groups, ranking and recipe, into the study."""
    say, name = stage.say, stage.plan.spec.name
    run_steps = _runner(stage)
    probe_step = first_step(stage)
    probe, done, kept = probed(stage, probe_step, run_steps)
    groups = probe["groups"]
    if not groups:
        raise ValueError(nothing_quantized(probe_step, probe))
    finished = {entry["group"] for entry in done}
    nodes = capable_nodes(alive_nodes(), probe_step.study.device)
    shares = split(
        {group: layers for group, layers in groups.items() if group not in finished},
        nodes,
        lambda layers: cost.group_s(probe, layers),
    )
    study.update(layers=len(probe["layers"]), full=probe["full"])
    say(f"sensitivity: {name}: {cost.predicted_text(probe, shares, nodes)}")
    shared = replace(probe_step, reference=probe["reference"], layers=tuple(probe["layers"]))
    measured = run_steps(
        [replace(shared, kind="groups", groups=share) for share in shares],
        lambda outcome: kept(outcome["groups"]),
    )
    ranked = with_sqnr(
        rank(done + [group for outcome in measured for group in outcome["groups"]]),
        probe["layer_sqnr"],
    )
    chosen = tolerance(stage.plan.spec)
    recipe_step = replace(
        shared, kind="recipe", ranking=ranked, full=probe["full"], tolerance=asdict(chosen)
    )
    (found,) = run_steps([recipe_step])
    study.update(ranking=ranked, recipe=found["recipe"])
    study["cost"] = cost.cost(probe, shares, measured, found)
    study["steps"] = [_step_record(o) for o in [probe, *measured, found]]


def probed(stage: StudyRun, probe_step: StudyWork, run_steps) -> tuple[dict, list, Callable]:
    """(the probe, the groups already measured, what keeps a step's groups as it returns): with
    --resume, those a killed run of the same study kept; else the probe run now."""
    spec = stage.plan.spec
    path = partial.partial_path(stage.results_dir, spec.name, spec.sensitivity.variant_id)
    header = {
        "spec_hash": stage.plan.spec_hash,
        "sensitivity": asdict(spec.sensitivity),
        "schema_version": SCHEMA_VERSION,
    }
    found = partial.read(path, header) if stage.resume and path.exists() else None
    if isinstance(found, tuple):
        probe, done = found
        stage.say(
            f"[resume] {spec.name}: the sensitivity study goes on from {path}: "
            f"{len(done)} of {len(probe['groups'])} groups measured"
        )
    else:
        if found:
            stage.say(f"[resume] {spec.name}: {path}: not used: {found}")
        (probe,), done = run_steps([probe_step]), []
        _kept_or_said(stage, lambda: partial.start(path, header, probe))
    return probe, done, lambda groups: _kept_or_said(stage, lambda: partial.add(path, groups))


def _kept_or_said(stage: StudyRun, write: Callable[[], None]) -> None:
    """A step kept for --resume; a disk that cannot take it only costs that, and is said."""
    try:
        write()
    except OSError as error:
        stage.say(f"sensitivity: cannot keep the study's progress: {error.strerror or error}")


def nothing_quantized(step: StudyWork, probe: dict) -> str:
    """Why a study has no layer to rank: its precision left every layer of the model in FP32."""
    linear = probe.get("linear_layers")
    counted = f"the model's {linear} nn.Linear layers" if linear else "the model's layers"
    return (
        f"{step.study.precision} on {step.study.device} quantizes none of {counted}, so no "
        "layer can be ranked (GPT-2's blocks, for one, are transformers' Conv1D, which "
        "bitsandbytes leaves in FP32); study a precision that quantizes this model's layers"
    )


def _runner(stage: StudyRun) -> Callable[..., list[dict]]:
    def run_steps(steps: list[StudyWork], on_done=None) -> list[dict]:
        return dispatch.run_study_steps(
            steps, stage.cluster, stage.model_dir, stage.placement_timeout_s, on_done
        )

    return run_steps


def split(
    groups: dict[str, list[str]], nodes: int, seconds: Callable[[list[str]], float]
) -> list[dict[str, list[str]]]:
    """The groups in contiguous shares of near-equal predicted seconds: at least one per node,
    more where a share would take over SHARE_S (each at least one group)."""
    names = list(groups)
    if not names:
        return []
    each = [seconds(groups[name]) for name in names]
    total = sum(each) or 1.0
    parts = max(1, min(max(nodes, math.ceil(total / SHARE_S)), len(names)))
    shares: list[dict[str, list[str]]] = [{} for _ in range(parts)]
    before = 0.0
    for name, spent in zip(names, each, strict=True):
        # A group goes to the share its predicted midpoint falls in.
        index = min(int((before + spent / 2) / total * parts), parts - 1)
        shares[index][name] = groups[name]
        before += spent
    return [share for share in shares if share]


def with_sqnr(ranking: list[dict], layer_sqnr: dict[str, dict]) -> list[dict]:
    """Each ranked group with its layers' mean weight and output SQNR in the fully quantized
    model (dB; None where no layer of it has one)."""
    for entry in ranking:
        for key in ("weight_sqnr_db", "output_sqnr_db"):
            values = [layer_sqnr.get(layer, {}).get(key) for layer in entry["layers"]]
            values = [v for v in values if v is not None]
            entry[key] = round(sum(values) / len(values), 3) if values else None
    return ranking


def _step_record(outcome: dict) -> dict:
    return {key: outcome[key] for key in ("wall_s", "load_s", "host", "pid")}


def summary_lines(study: dict) -> list[str]:
    """What the run prints of a study: the top of the ranking, the recipe, the cost."""
    lines = [f"most harmful {study['sensitivity']['groups']} groups, quantized alone:"]
    for entry in study["ranking"][:5]:
        only = entry["only"]
        lines.append(
            f"  {entry['rank']}. {entry['group']}: agreement {only['agreement']:.4f}, "
            f"{only['flips']} flips, KL {only['mean_kl']:.4g}"
        )
    recipe, full, spent = study["recipe"], study["full"], study["cost"]
    verdict = "meets" if recipe["met"] else "does not meet"
    lines.append(
        f"recipe: keep {len(recipe['groups'])} group(s), {len(recipe['kept'])} layer(s), in FP32: "
        f"agreement {full['agreement']:.4f} -> {recipe['result']['agreement']:.4f}, "
        f"{verdict} {tolerance_text(recipe['tolerance'])}"
    )
    lines.append(
        f"cost: {spent['measurements']} measurements in {spent['measured_s']:.1f} s "
        f"(predicted {spent['predicted_s']:.1f} s, bound {spent['bound_s']:.1f} s)"
    )
    return lines
