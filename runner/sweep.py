"""A sweep: planned jobs in, result files and a table out. The driver's side of `quantbench run`.

The driver validates everything first, prepares each job's FP32 checkpoint once, hands the variants
to the dispatcher, writes each result as it arrives and prints progress. It only waits while
variants run, so it never competes with a timed pass for the CPU.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from runner import cluster as ray_cluster
from runner import (
    collect,
    dispatch,
    folders,
    fp32_reference,
    interrupt,
    locks,
    measure,
    models,
    progress,
    results,
)
from runner.cluster import Cluster
from runner.fields import SpecError
from runner.finetune.stage import fine_tuned_model
from runner.job import Variant
from runner.plan import JobPlan
from runner.precisions import family_of
from runner.schema import Result
from runner.study import stage as study
from runner.tasks import DEFAULT_TASK, TASKS, Task
from runner.work import VariantWork, base_result


@dataclass
class SweepReport:
    results: list[Result] = field(default_factory=list)  # as read back from their files
    wall_s: float = 0.0
    cluster_start_s: float = 0.0
    prepare_s: float = 0.0
    variants_s: float = 0.0  # the sum of the variants' own work (run_variant, inside each worker)
    studies_s: float = 0.0  # the sensitivity studies' wall time, as the driver saw it
    nothing_ran: bool = False  # --resume kept every result
    studies: list[dict] = field(default_factory=list)  # the sensitivity studies run
    unreadable: list[Path] = field(default_factory=list)  # written, but not read back
    # "cannot write FILE: REASON" for each result measured but not written (a disk that filled
    # during the run): its progress line and the table are the only record left of it.
    lost: list[str] = field(default_factory=list)

    @property
    def lost_any(self) -> bool:
        return bool(self.lost) or any(study.get("unwritten") for study in self.studies)

    def lost_lines(self) -> list[str]:
        return self.lost + [study["unwritten"] for study in self.studies if study.get("unwritten")]

    @property
    def failed(self) -> bool:
        return (
            any(r.status == "failed" for r in self.results)
            or any(study["status"] == "failed" for study in self.studies)
            or bool(self.unreadable)
        )

    def split(self) -> str:
        if self.nothing_ran:
            return f"wall {self.wall_s:.1f} s: nothing ran, every result was kept"
        overhead = self.wall_s - self.variants_s - self.prepare_s - self.studies_s
        if overhead < 0:  # variants ran on several nodes at once: their work outlasts the wall time
            return (
                f"wall {self.wall_s:.1f} s, while the variants' own work added up to "
                f"{self.variants_s:.1f} s"
                " (they ran on several nodes at once) and model preparation took "
                f"{self.prepare_s:.1f} s"
                f" (cluster start {self.cluster_start_s:.1f} s)"
            )
        share = overhead / self.wall_s if self.wall_s else 0.0
        return (
            f"wall {self.wall_s:.1f} s = variants' own work {self.variants_s:.1f} s"
            f" + model preparation {self.prepare_s:.1f} s"
            + (f" + sensitivity study {self.studies_s:.1f} s" if self.studies_s else "")
            + f" + overhead {overhead:.1f} s ({share:.0%}: cluster start "
            f"{self.cluster_start_s:.1f} s,"
            " worker process start, transfers, writing)"
        )


def variant_work(
    plan: JobPlan,
    model_dir: Path,
    model_info: dict,
    skip: set[str],
    variants: list[Variant] | None = None,
) -> list[VariantWork]:
    """A work item per repeat of each variant (the job's, or those given) not in skip."""
    spec = plan.spec
    sample = {
        "rows": len(plan.examples),
        "of": plan.dataset_rows,
        "seed": spec.dataset.sample.seed,
        "fingerprint": plan.sample_fingerprint,
    }
    inputs = plan.worker_inputs()  # the sample's lists, built once for every variant
    return [
        VariantWork(
            **inputs,
            variant=variant,
            family=family_of(variant.precision),
            model_dir=str(model_dir),
            spec_hash=plan.spec_hash,
            spec_as_run=spec.raw,
            sample=sample,
            model_info=model_info,
            repeat=repeat,
        )
        for variant in (spec.variants if variants is None else variants)
        if variant.id not in skip
        for repeat in range(spec.evaluation.repeats)
    ]


def merge_repeats(runs: list[Result]) -> Result:
    """One result from a variant's repeated runs: the run with the median median latency stands for
    them, and every run is listed with the spread, so a difference can be told from noise."""
    runs = sorted(runs, key=lambda r: r.repeat or 0)
    if len(runs) == 1:
        return runs[0]
    failed = [r for r in runs if r.status != "ok"]
    if failed:
        merged = copy.copy(failed[0])
        merged.extra = {
            **failed[0].extra,
            "repeats": {"n": len(runs), "failed": len(failed), "errors": [r.error for r in failed]},
        }
        return merged
    medians = [r.metrics.latency.median for r in runs]
    middle = sorted(range(len(runs)), key=lambda i: medians[i])[len(runs) // 2]
    merged = copy.copy(runs[middle])
    center = sorted(medians)[len(medians) // 2]
    merged.extra = {
        **merged.extra,
        "repeats": {
            "n": len(runs),
            "representative": runs[middle].repeat if runs[middle].repeat is not None else middle,
            "median_ms": medians,
            "throughput_sps": [r.metrics.throughput_sps for r in runs],
            "peak_rss_mib": [r.metrics.peak_rss_mib for r in runs],
            "wall_s": [r.wall_s for r in runs],
            "variant_pid": [r.environment.get("variant_pid") for r in runs],
            "spread": round((max(medians) - min(medians)) / center, 4) if center else None,
        },
    }
    merged.warnings = list(dict.fromkeys(w for r in runs for w in r.warnings or []))
    merged.wall_s = sum(r.wall_s or 0.0 for r in runs)
    merged.started_at, merged.ended_at = runs[0].started_at, runs[-1].ended_at
    return merged


def task_of(result: Result) -> Task:
    """The task of the result's job (a task this quantbench does not know: the base's)."""
    return TASKS.get(result.job_record.task or DEFAULT_TASK) or Task()


def progress_line(done: int, total: int, result: Result) -> str:
    head = f"[{done}/{total}] {result.job} {result.variant:<22} {result.status:<8}"
    if result.status != "ok":
        return f"{head} {result.error}"
    metrics, latency = result.metrics, result.metrics.latency
    text = (
        f"{head} {task_of(result).headline(metrics)}  median {latency.median or 0:.2f} ms"
        f"  size {metrics.model_size_mib or 0:.1f} MiB  ({result.wall_s or 0:.1f} s)"
    )
    if latency.timing_lock_wait_s:  # another quantbench run on the machine was timing
        text += f"  waited {latency.timing_lock_wait_s:.1f} s for another run's timing"
    repeats = result.extra.get("repeats")
    if repeats:
        text += f"  {repeats['n']} runs, medians spread {repeats['spread']:.1%}"
    if result.warnings:
        text += f"  ⚠ {len(result.warnings)} warning(s)"
    return text


def run_sweep(
    plans: list[JobPlan],
    results_dir: Path,
    resume: bool,
    address: str | None,
    say: Callable[[str], None] = print,
    ray_temp_dir: str | None = None,
    placement_timeout_s: float | None = None,
    lock_wait_s: float | None = None,
    command: str = "quantbench run",
) -> SweepReport:
    """Run every planned job. Raises folders.ResultsError before starting anything: another spec's
    results, a folder this user cannot write, or (locks.ResultsLocked) another run writing a job's
    folder after lock_wait_s (None: not at all)."""
    # A folder that cannot be written cannot be locked either: say which and who, first.
    folders.check_writable(results_dir, [plan.spec.name for plan in plans])
    with locks.job_folders_locked(
        results_dir, [plan.spec.name for plan in plans], command, lock_wait_s, say
    ):
        # Under the lock: what the folder holds cannot change between reading it and writing to it.
        # The progress of the work on the cluster is relayed from before the cluster starts: its
        # processes inherit where to send it.
        with progress.relayed(say) as say_between_bars:
            return _run_sweep(
                plans,
                results_dir,
                resume,
                address,
                say_between_bars,
                ray_temp_dir,
                placement_timeout_s,
            )


@dataclass
class Sweep:
    """What a run's phases share: where results go, what each job's folder kept, what is left."""

    plans: list[JobPlan]
    results_dir: Path
    say: Callable[[str], None]
    placement_timeout_s: float | None
    resume: bool = False
    report: SweepReport = field(default_factory=SweepReport)
    kept: dict[str, dict[str, dict]] = field(default_factory=dict)  # job -> variant -> result
    replaced: dict[str, dict[str, str]] = field(default_factory=dict)  # job -> variant -> why
    to_run: dict[str, list[Variant]] = field(default_factory=dict)  # job -> variants left to run
    study_to_run: dict[str, bool] = field(default_factory=dict)  # job -> its study runs
    cluster: Cluster | None = None  # None when nothing is left to run


def _run_sweep(
    plans: list[JobPlan],
    results_dir: Path,
    resume: bool,
    address: str | None,
    say: Callable[[str], None],
    ray_temp_dir: str | None,
    placement_timeout_s: float | None,
) -> SweepReport:
    sweep = Sweep(plans, results_dir, say, placement_timeout_s, resume)
    read_job_folders(sweep, resume)
    started = time.perf_counter()
    start_cluster(sweep, address, ray_temp_dir, started)
    try:
        say_what_resume_keeps(sweep)
        # Every job's model before any variant: one that cannot be loaded stops the run with nothing
        # written.
        prepared_models = prepare_models(sweep)
        for plan in plans:
            if work_left(sweep, plan):
                run_job(sweep, plan, *prepared_models[plan.spec.name])
    except interrupt.HeadLost:
        ray_cluster.shutdown(head_lost=True)  # Ray's own shutdown would wait for the dead head
        raise
    except BaseException:
        if sweep.cluster is not None:
            ray_cluster.shutdown()
        raise
    if sweep.cluster is not None:
        ray_cluster.shutdown()
    sweep.report.wall_s = time.perf_counter() - started
    return sweep.report


def read_job_folders(sweep: Sweep, resume: bool) -> None:
    """What each job's results folder keeps (with --resume) and replaces; what is left to run."""
    unusable: list[tuple[Path, str]] = []
    for plan in sweep.plans:
        spec = plan.spec
        mixed = [spec.sensitivity.mixed_id] if spec.sensitivity else []
        sweep.kept[spec.name], sweep.replaced[spec.name] = results.plan_folder(
            sweep.results_dir,
            spec.name,
            plan.spec_hash,
            [v.id for v in spec.variants] + mixed,
            resume,
            unusable,
        )
    for file, why in unusable:  # a variant's own file among them is replaced when it runs
        sweep.say(f"skipped {file}: {why}")
    for plan in sweep.plans:
        kept = sweep.kept[plan.spec.name]
        sweep.to_run[plan.spec.name] = [v for v in plan.spec.variants if v.id not in kept]
        sweep.study_to_run[plan.spec.name] = study_left(sweep, plan, resume)


def study_left(sweep: Sweep, plan: JobPlan, resume: bool) -> bool:
    """Whether the job's study runs: it has one, and --resume keeps no study of this spec with its
    mixed variant (a kept mixed variant is rerun with the study that chooses its layers)."""
    spec = plan.spec
    if spec.sensitivity is None:
        return False
    found = study.kept_study(sweep.results_dir, plan, sweep.say) if resume else None
    kept = sweep.kept[spec.name]
    if found is not None and (
        not found.study["recipe"]["kept"] or spec.sensitivity.mixed_id in kept
    ):
        sweep.say(f"[resume] {spec.name}: kept the sensitivity study {found.file}")
        return False
    kept.pop(spec.sensitivity.mixed_id, None)
    return True


def work_left(sweep: Sweep, plan: JobPlan) -> bool:
    return bool(sweep.to_run[plan.spec.name]) or sweep.study_to_run[plan.spec.name]


def start_cluster(
    sweep: Sweep, address: str | None, ray_temp_dir: str | None, started: float
) -> None:
    """Join or start the cluster, unless --resume kept every result; started: the sweep's start."""
    say, report = sweep.say, sweep.report
    if not any(work_left(sweep, plan) for plan in sweep.plans):
        # A finished sweep run again with --resume: the table from the kept results, at once.
        report.nothing_ran = True
        say("cluster: not started: --resume kept every variant's result, nothing left to run")
        return
    notice = locks.timing_lock_notice()  # another run's timed passes: this run's would wait
    if notice:
        say(notice)
    variant_precisions, compiled = dispatch.cpu_needs(
        v for variants in sweep.to_run.values() for v in variants
    )
    cpu_precisions = variant_precisions + [
        plan.spec.sensitivity.precision
        for plan in sweep.plans
        if sweep.study_to_run[plan.spec.name] and plan.spec.sensitivity.device == "cpu"
    ]
    # A fine-tune is CPU work too where the cluster has no GPU.
    cpu_work = cpu_precisions or any(
        plan.train_examples is not None and sweep.to_run[plan.spec.name] for plan in sweep.plans
    )
    sweep.cluster = ray_cluster.connect(
        address,
        temp_dir=ray_temp_dir,
        cpu_precisions=cpu_precisions if cpu_work else None,
        compiled=compiled,
    )
    interrupt.install()  # ray.init replaced the SIGTERM handler
    report.cluster_start_s = time.perf_counter() - started
    say(f"cluster: {sweep.cluster.describe()}")
    for warning in sweep.cluster.warnings:
        say(f"warning: {warning}")


def say_what_resume_keeps(sweep: Sweep) -> None:
    for plan in sweep.plans:
        name = plan.spec.name
        for variant_id, result in sweep.kept[name].items():
            sweep.say(
                f"[resume] {name} {variant_id}: kept "
                f"{results.result_path(sweep.results_dir, name, variant_id)}"
            )
            sweep.report.results.append(result)
        for variant_id, why in sweep.replaced[name].items():
            sweep.say(
                f"[resume] {name} {variant_id}: runs again and replaces "
                f"{results.result_path(sweep.results_dir, name, variant_id)} ({why})"
            )


def prepare_models(sweep: Sweep) -> dict[str, tuple[Path, dict]]:
    """Each job's FP32 checkpoint, for the jobs with variants left to run: job -> (folder, info)."""
    prepared_models = {}
    for plan in sweep.plans:
        if work_left(sweep, plan):
            prepared = time.perf_counter()
            prepared_models[plan.spec.name] = prepared_model(plan, sweep.say)
            sweep.report.prepare_s += time.perf_counter() - prepared
    return prepared_models


def run_job(sweep: Sweep, plan: JobPlan, model_dir: Path, model_info: dict) -> None:
    """Fine-tune the job's model where it asks for it, then run its variants."""
    for note in plan.notes:
        sweep.say(f"note: {plan.spec.name}: {note}")
    if plan.train_examples is not None:
        prepared = time.perf_counter()
        try:
            model_dir, model_info = fine_tuned_model(
                plan, model_dir, model_info, sweep.cluster, sweep.say, sweep.placement_timeout_s
            )
        except Exception as error:  # every variant of this job needs the fine-tuned model
            sweep.report.prepare_s += time.perf_counter() - prepared
            write_fine_tune_failure(sweep, plan, model_dir, model_info, error)
            return
        sweep.report.prepare_s += time.perf_counter() - prepared
    run_variants(sweep, plan, model_dir, model_info, None)
    if sweep.study_to_run[plan.spec.name]:
        stage = study.StudyRun(
            plan,
            model_dir,
            sweep.cluster,
            sweep.results_dir,
            sweep.say,
            sweep.placement_timeout_s,
            sweep.resume,
        )
        found, mixed = study.run(stage)
        sweep.report.studies.append(found)
        sweep.report.studies_s += found["wall_s"]
        if mixed is not None:
            run_variants(sweep, plan, model_dir, model_info, [mixed])


def run_variants(
    sweep: Sweep, plan: JobPlan, model_dir: Path, model_info: dict, variants: list[Variant] | None
) -> None:
    """The job's variants left to run (or those given), their results written as they come."""
    items = variant_work(plan, model_dir, model_info, set(sweep.kept[plan.spec.name]), variants)
    if not items:
        return
    dispatch.warm_cpu_nodes(sweep.cluster, *dispatch.cpu_needs(t.variant for t in items))
    fp32_reference.hand_out(
        items, sweep.results_dir, sweep.cluster, model_dir, sweep.say, sweep.placement_timeout_s
    )
    progress = JobProgress(sweep, plan.spec.evaluation.repeats, len(items))
    job_results = dispatch.run_variants(
        items,
        sweep.cluster,
        progress.on_result,
        placement_timeout_s=sweep.placement_timeout_s,
        model_dir=model_dir,
        say=sweep.say,
    )
    sweep.report.variants_s += sum(r.wall_s or 0.0 for r in job_results)


def write_fine_tune_failure(
    sweep: Sweep, plan: JobPlan, model_dir: Path, model_info: dict, error: Exception
) -> None:
    """Every variant left to run ends `failed`, saying why the fine-tune failed."""
    why = f"fine-tune failed: {type(error).__name__}: {error}"
    items = variant_work(plan, model_dir, model_info, set(sweep.kept[plan.spec.name]))
    failed = [base_result(work, "failed", why) for work in items if work.repeat == 0]
    for number, result in enumerate(failed, start=1):
        result.ended_at = measure.now()
        sweep.say(progress_line(number, len(failed), write_and_read_back(sweep, result)))


@dataclass
class JobProgress:
    """A job's results as they arrive: a variant's repeats merged into one result once all have
    come (or one was skipped), written, and counted in the progress lines."""

    sweep: Sweep
    repeats: int
    items: int  # one per repeat of each variant
    runs: dict[str, list[Result]] = field(default_factory=dict)  # variant -> its results so far
    done: set[str] = field(default_factory=set)
    written: int = 0

    def on_result(self, result: Result) -> None:
        variant = result.variant
        if variant in self.done:  # the other repeats of a skipped variant
            return
        self.runs.setdefault(variant, []).append(result)
        if len(self.runs[variant]) < self.repeats and result.status != "skipped":
            return
        self.done.add(variant)
        merged = write_and_read_back(self.sweep, merge_repeats(self.runs[variant]))
        self.written += 1
        self.sweep.say(progress_line(self.written, self.items // self.repeats, merged))


def write_and_read_back(sweep: Sweep, result: Result) -> Result:
    """The result written, then read back through the check collect makes: run's table shows
    what collect will. One that cannot be read back is said, and the run fails. One that cannot
    be written (a disk that filled during the run) is said and kept for the table, and the sweep
    goes on: the variants left may still be written (space freed meanwhile, another folder), and
    each one's progress line records it either way."""
    path = results.result_path(sweep.results_dir, result.job, result.variant)
    try:
        results.write_result(sweep.results_dir, result)
    except OSError as error:
        lost = f"cannot write {path}: {error.strerror or error}"
        sweep.say(lost)
        sweep.report.lost.append(lost)
        # Read as if from its file, so the table puts it beside the written ones.
        with contextlib.suppress(results.UnusableFile):
            result = results.read_json_result(result.to_json(), path)
        sweep.report.results.append(result)
        return result
    try:
        result = results.load_result(path)
    except results.UnusableFile as why:
        sweep.say(f"skipped {path}: {why}")
        sweep.report.unreadable.append(path)
        return result
    sweep.report.results.append(result)
    return result


def stale_report_notes(results_dir: Path, jobs: list[str]) -> list[str]:
    """Notes on each report.html where `quantbench report` writes it by default (the folder it is
    given: DIR or DIR/<job>) that is older than a result of these jobs under that folder. Such a
    page shows what the folder held before; run leaves it, as it may be the only record of results
    it replaced."""
    notes = []
    for folder, covers in [
        (Path(results_dir), jobs),
        *((Path(results_dir) / job, [job]) for job in jobs),
    ]:
        page = folder / "report.html"
        results_in = [p for job in covers for p in (Path(results_dir) / job).glob("*.json")]
        if page.is_file() and any(p.stat().st_mtime > page.stat().st_mtime for p in results_in):
            notes.append(
                f"note: {page} is older than results under {folder}: it shows what was there "
                "before; "
                f"to update it: quantbench report {folder}"
            )
    return notes


def prepared_model(plan: JobPlan, say) -> tuple[Path, dict]:
    """The job's FP32 checkpoint, from the cache or made now; a model that cannot be loaded is the
    job's mistake (exit 2), as validation would have said if it could read weights."""
    try:
        model_dir, model_info = models.prepare_model(plan.spec, say)
    except SpecError:  # the task refused the loaded model, saying why
        raise
    except Exception as error:
        raise SpecError(
            plan.spec.file,
            "model",
            plan.spec.model.describe(),
            f"cannot load and save the model: {type(error).__name__}: {error}",
        ) from None
    say(
        f"model: {model_info['source']} -> {model_dir}"
        + (" (cached)" if model_info["cached"] else "")
    )
    random = model_info.get("newly_initialised")
    if random and plan.train_examples is None:
        what = (
            "every weight is random (an inline architecture)"
            if plan.spec.model.config is not None
            else f"{len(random)} weight tensor(s) were randomly initialised (no trained "
            "classification head)"
        )
        say(f"note: {what}: {plan.task.untrained}")
    return model_dir, model_info


def print_table(
    report: SweepReport, plans: list[JobPlan], say: Callable[[str], None] = print
) -> None:
    say("")
    for plan in plans:  # each job against its own baseline, whatever older kept results say
        say(
            collect.render(
                [r for r in report.results if r.job == plan.spec.name],
                "table",
                plan.spec.baseline,
            )
        )
