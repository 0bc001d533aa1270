"""Planning: a job spec checked against the world, before anything runs.

`plan_job` reads the dataset, draws the evaluation sample, reads the model's config and checks its
kind and its files, then asks the job's task for its plan (a classifier's labels tied to the
dataset's by name; a causal LM's windows fitted to the model). Any mismatch is a SpecError naming
the file and field; nothing has been started or written when it is raised.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from runner import data, gguf_files, measure, model_cache, model_checks, model_source
from runner.calibration import CalibrationSet, calibration_set
from runner.fields import SpecError
from runner.job import JobSpec, SampleSpec
from runner.placement import where_it_runs
from runner.spec import load_job
from runner.study.ranking import plan_text
from runner.tasks import DEFAULT_TASK, TASKS, Targets, Task, task_of_model


@dataclass
class JobPlan:
    spec: JobSpec
    task: Task  # the job's task: what it asks the model and how it scores the answers
    examples: list[data.Example]  # the evaluation sample
    sample_rows: list[int]  # their row numbers in the dataset (0-based)
    dataset_rows: int
    targets: Targets  # the task's configuration for every worker, from its plan
    sample_fingerprint: str
    spec_hash: str
    train_examples: list[data.Example] | None = None  # the fine-tune split, when the job fine-tunes
    calibration: CalibrationSet | None = None  # a calibrated precision's rows
    notes: list[str] = field(
        default_factory=list
    )  # what is allowed but worth saying before it runs

    def worker_inputs(self) -> dict:
        """What every piece of work a worker runs for this job gets of the job: its sample, its
        task and the task's configuration, its settings."""
        spec = self.spec
        return {
            "job": spec.name,
            "texts": [e.text for e in self.examples],
            "evaluation": spec.evaluation,
            "settings": spec.settings,
            "max_length": spec.dataset.max_length,
            "task": self.task,
            "task_config": self.targets.config,
            "calibration": self.calibration,
        }


def plan_job(path: str | Path) -> JobPlan:
    spec = load_job(path)
    shown = Path(path)
    task = TASKS[spec.task]
    rows = data.read_examples(spec.dataset, shown)
    sample_rows = data.sample_indices(len(rows), spec.dataset.sample)
    examples = [rows[i] for i in sample_rows]

    config = model_source.model_config(spec.model, shown)
    check_model_files(spec, shown, config)
    notes = [
        f"left out {pair}, not a variant of precisions × devices that can run: {why}"
        for pair, why in spec.left_out
    ] + gguf_notes(spec, shown)
    train = None
    if spec.finetune is not None:
        train = training_split(spec, shown, rows, sample_rows, notes)
    # The model's kind first: a model of the wrong kind is the first thing to say.
    check_model_kind(task, spec, shown, config)
    model_source.check_model_class(task, spec.model, config, shown)
    targets = task.plan(spec, shown, config, rows, examples, train)
    check_lengths(spec, shown, config)
    positions = (model_checks.position_table(config) or (None,))[0]
    calibration_rows = calibration_set(spec, shown, rows, sample_rows, train, positions)
    model_source.check_int4_group_size(task, spec, shown)

    notes += sample_notes(spec, rows, examples, train)
    notes.extend(targets.notes)
    return JobPlan(
        spec=spec,
        task=task,
        examples=examples,
        sample_rows=sample_rows,
        dataset_rows=len(rows),
        targets=targets,
        sample_fingerprint=data.fingerprint(examples),
        spec_hash=_spec_hash(spec, examples, train),
        train_examples=train,
        calibration=calibration_rows,
        notes=notes,
    )


def gguf_notes(spec: JobSpec, shown: Path) -> list[str]:
    """What a GGUF model is before it runs: its weights are already quantized."""
    if spec.model.gguf is None:
        return []
    gguf = gguf_files.read_gguf(spec.model, shown)
    return [
        f"model: a {gguf.architecture} GGUF ({gguf_files.types_by_kind(gguf.types)}), dequantized "
        f"to FP32 once: the baseline carries its {gguf.lowest_bits}-bit rounding"
    ]


def check_model_kind(task: Task, spec: JobSpec, shown: Path, config: dict) -> None:
    """The model's saved architectures are of the kind the task takes: a task that names its
    architectures takes no other, and a model whose every architecture another task claims is
    that task's."""
    saved = list(config.get("architectures") or [])
    if task.architectures and saved and not any(str(a).endswith(task.architectures) for a in saved):
        raise SpecError(
            shown,
            "model",
            f"{spec.model.describe()}: architectures {saved}",
            f"a {task.name} job needs {task.model_words} (an architecture ending in "
            f"{' or '.join(task.architectures)}); for this model use task: {DEFAULT_TASK}",
        )
    other = task_of_model(config)
    if other is not None and other is not task:
        raise SpecError(
            shown,
            "task",
            task.name,
            f"the model ({spec.model.describe()}) is {other.model_words} ({', '.join(saved)}): "
            f"use task: {other.name}",
        )


def check_model_files(spec: JobSpec, shown: Path, config: dict) -> None:
    """The tokenizer and weight files are there."""
    if spec.tokenizer is not None:
        model_source.check_tokenizer_files(spec.tokenizer, shown, "tokenizer")
    else:
        model_source.check_tokenizer_files(spec.model, shown, "model")
    model_checks.check_weight_files(spec.model, shown)
    model_source.check_gguf_tokenizer(spec, shown)


def sample_notes(
    spec: JobSpec,
    rows: list[data.Example],
    examples: list[data.Example],
    train: list[data.Example] | None,
) -> list[str]:
    """What is allowed in the data but worth saying before it runs."""
    notes: list[str] = []
    empty = [e for e in examples if not e.text.strip()]
    if empty:
        notes.append(
            f"{len(empty)} row(s) of the evaluation sample have an empty text (first at "
            f"{empty[0].where}); they are evaluated as they are"
        )
    repeated = len(examples) - len({e.text for e in examples})
    if repeated:
        notes.append(
            f"{repeated} row(s) of the evaluation sample repeat a text of another row; each is "
            "counted"
        )
    spanning(rows, "the dataset", notes)
    if train is not None and spec.finetune.train is not None:
        spanning(train, "the training data", notes)
    cpus = measure.available_cpus()
    if spec.evaluation.threads is not None and spec.evaluation.threads > cpus:
        notes.append(
            f"evaluation.threads {spec.evaluation.threads} is more than this machine's {cpus} "
            "CPUs: "
            "where a node has fewer CPUs than threads, the threads take turns and every timing is "
            "slower (leave threads out to use the CPUs a node has)"
        )
    return notes


def spanning(rows: list[data.Example], what: str, notes: list[str]) -> None:
    """A note on CSV rows that span several lines: a quoted cell may hold line breaks, but a stray
    quote makes one row of every line up to the next quote, and the rows it swallowed are gone."""
    merged = [e for e in rows if e.lines > 1]
    if merged:
        notes.append(
            f"{len(merged)} row(s) of {what} span several lines, {sum(e.lines for e in merged)} "
            "lines "
            f"in all (first at {merged[0].where}): a quoted cell holds line breaks; if each line "
            "is a row, "
            "a stray quote there merged them"
        )


def training_split(
    spec: JobSpec, shown: Path, rows: list[data.Example], sample_rows: list[int], notes: list[str]
) -> list[data.Example]:
    """The fine-tune's rows: a file of its own, or the dataset minus the evaluation sample. Never
    both. What the user may not expect goes into notes."""
    settings = spec.finetune
    evaluated = {rows[i].text for i in sample_rows}
    if settings.train is not None:
        train = data.read_examples(settings.train, shown)
        overlap = sum(e.text in evaluated for e in train)
        if overlap:
            raise SpecError(
                shown,
                "finetune.train",
                f"{overlap} of its texts are in the evaluation sample",
                "the training split must not overlap the evaluation sample",
            )
    else:
        held_out = set(sample_rows)
        train = [e for i, e in enumerate(rows) if i not in held_out and e.text not in evaluated]
        if len(rows) - len(held_out) > len(train):
            notes.append(
                f"{len(rows) - len(held_out) - len(train)} row(s) outside the evaluation sample "
                "are left "
                "out of the training split: their text is also in the evaluation sample"
            )
    if settings.max_samples is not None and settings.max_samples < len(train):
        keep = data.sample_indices(
            len(train), SampleSpec(n=settings.max_samples, seed=settings.seed)
        )
        train = [train[i] for i in keep]
    if not train:
        raise SpecError(
            shown,
            "finetune.train" if settings.train else "finetune",
            0,
            "the training split is empty: fine-tuning needs rows that are not in the evaluation "
            "sample",
        )
    return train


def check_lengths(spec: JobSpec, shown: Path, config: dict) -> None:
    """Sequences longer than the model's position table fail in every variant's forward pass: say so
    now."""
    table = model_checks.position_table(config)
    if table is None:
        return  # relative or rotary positions: no fixed table to outgrow
    positions, key = table
    allowed = f"the model takes at most {positions} tokens ({key} in its config)"
    # A task of text alone cuts its own windows (and checks them): max_length is not read.
    if TASKS[spec.task].labelled and spec.dataset.max_length > positions:
        raise SpecError(shown, "dataset.max_length", spec.dataset.max_length, allowed)
    calibration = spec.calibration
    if calibration is not None and (calibration.max_length or 0) > positions:
        raise SpecError(shown, "calibration.max_length", spec.calibration.max_length, allowed)
    shape = spec.evaluation.fixed_shape
    if shape is not None and shape[1] > positions:
        raise SpecError(
            shown,
            "evaluation.fixed_shape",
            list(shape),
            f"its sequence length is too long: {allowed}",
        )


def _spec_hash(
    spec: JobSpec, examples: list[data.Example], train: list[data.Example] | None
) -> str:
    """What makes two results comparable: everything in the job but the list of variants (and
    evaluation.compile, which only adds variants), the baseline and the sensitivity study (which
    only adds a study and its mixed variant)."""
    raw = {
        k: v
        for k, v in spec.raw.items()
        if k not in ("variants", "precisions", "devices", "baseline", "sensitivity")
    }
    if isinstance(raw.get("evaluation"), dict) and "compile" in raw["evaluation"]:
        raw["evaluation"] = {k: v for k, v in raw["evaluation"].items() if k != "compile"}
    digest = hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode())
    digest.update(data.fingerprint(examples).encode())
    digest.update(data.fingerprint(train or []).encode())
    digest.update(model_cache.model_key(spec).encode())
    return digest.hexdigest()[:16]


def calibration_line(rows: CalibrationSet) -> str:
    record = rows.record
    overlap = record["overlap_with_sample"]
    shared = f"{overlap} in the evaluation sample (allowed)" if overlap else "none"
    return (
        f"  calibration: {record['rows']} rows of {record['source']}, up to {rows.max_length} "
        f"tokens each (seed {record['seed']}); in the evaluation sample: {shared}"
    )


def describe_plan(plan: JobPlan) -> str:
    spec = plan.spec
    asked = spec.dataset.sample.n
    capped = (
        f"; sample.n asks for {asked}, all {plan.dataset_rows} are used"
        if asked and asked > plan.dataset_rows
        else ""
    )
    lines = [
        f"{spec.file}: job '{spec.name}' is valid",
        f"  model: {spec.model.describe()}  {plan.task.describe_answers(plan.targets)}",
        f"  dataset: {spec.dataset.format}, {len(plan.examples)} of {plan.dataset_rows} rows "
        f"(seed {spec.dataset.sample.seed}{capped})" + plan.task.describe_dataset(plan.targets),
        "  evaluation: "
        + ", ".join(f"{k} {v}" for k, v in asdict(spec.evaluation).items() if v is not None),
        *(
            [
                f"  fine-tune: {len(plan.train_examples)} training rows, none in the evaluation "
                "sample; "
                f"epochs {spec.finetune.epochs:g}, learning rate {spec.finetune.learning_rate:g}, "
                f"batch {spec.finetune.batch_size}, seed {spec.finetune.seed}"
            ]
            if plan.train_examples
            else []
        ),
        *([calibration_line(plan.calibration)] if plan.calibration else []),
        f"  baseline: {spec.baseline}",
        *(f"  note: {note}" for note in plan.notes),
        "  variants:",
    ]
    width = max(20, *(len(v.id) for v in spec.variants))  # compiled ids run longer
    for variant in spec.variants:
        lines.append(f"    {variant.id:<{width}} runs on {where_it_runs(variant.device)}")
    if spec.sensitivity is not None:
        lines.append(plan_text(spec))
    return "\n".join(lines)
