"""Planning: a job spec checked against the world, before anything runs.

`plan_job` reads the dataset, draws the evaluation sample, reads the model's label names and ties
the dataset's labels to them by name through the job's label map. Any mismatch is a SpecError naming
the file and field; nothing has been started or written when it is raised.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from runner import data, measure, model_checks, models
from runner.spec import JobSpec, SampleSpec, SpecError, load_job


@dataclass
class JobPlan:
    spec: JobSpec
    examples: list[data.Example]  # the evaluation sample
    sample_rows: list[int]  # their row numbers in the dataset (0-based)
    dataset_rows: int
    label_map: dict[str, str]  # dataset label value -> model label name
    model_labels: list[str]  # the model's id2label, in id order
    sample_fingerprint: str
    spec_hash: str
    train_examples: list[data.Example] | None = None  # the fine-tune split, when the job fine-tunes
    notes: list[str] = field(
        default_factory=list
    )  # what is allowed but worth saying before it runs


def plan_job(path: str | Path) -> JobPlan:
    spec = load_job(path)
    shown = Path(path)
    rows = data.read_examples(spec.dataset, shown)
    sample_rows = data.sample_indices(len(rows), spec.dataset.sample)
    examples = [rows[i] for i in sample_rows]

    config = model_checks.model_config(spec.model, shown)
    labels_of_model = model_checks.config_labels(config, shown, spec.model)
    if spec.tokenizer is not None:
        model_checks.check_tokenizer_files(spec.tokenizer, shown, "tokenizer")
    else:
        model_checks.check_tokenizer_files(spec.model, shown, "model")
    model_checks.check_weight_files(spec.model, shown)
    check_lengths(spec, shown, config)
    notes: list[str] = []
    train = None
    if spec.finetune is None:
        model_labels = labels_of_model
    else:
        # Fine-tuning gives the model a new head whose labels are the names the job maps to.
        labels = (
            spec.dataset.label_map.values()
            if spec.dataset.label_map
            else sorted({e.label for e in rows})
        )
        model_labels = list(dict.fromkeys(labels))
        train = training_split(spec, shown, rows, sample_rows, notes)
    label_map = check_labels(spec, shown, examples, model_labels)
    if train is not None:
        unknown = sorted({e.label for e in train} - set(label_map))
        if unknown:
            raise SpecError(
                shown,
                "finetune.train",
                unknown,
                f"labels in the training data that the model does not know (first at "
                f"{data.first_rows_with(train, unknown)}); it knows: {', '.join(label_map)}",
            )

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
    if len({e.label for e in examples}) == 1:
        notes.append(
            f"every row of the evaluation sample has the label {examples[0].label!r}: accuracy "
            "cannot "
            "tell the model from one that always answers it"
        )
    return JobPlan(
        spec=spec,
        examples=examples,
        sample_rows=sample_rows,
        dataset_rows=len(rows),
        label_map=label_map,
        model_labels=model_labels,
        sample_fingerprint=data.fingerprint(examples),
        spec_hash=_spec_hash(spec, examples, train),
        train_examples=train,
        notes=notes,
    )


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
    positions = config.get("max_position_embeddings")
    if not isinstance(positions, int):
        return  # relative or rotary positions: no fixed table to outgrow
    allowed = f"the model takes at most {positions} tokens (max_position_embeddings in its config)"
    if spec.dataset.max_length > positions:
        raise SpecError(shown, "dataset.max_length", spec.dataset.max_length, allowed)
    shape = spec.evaluation.fixed_shape
    if shape is not None and shape[1] > positions:
        raise SpecError(
            shown,
            "evaluation.fixed_shape",
            list(shape),
            f"its sequence length is too long: {allowed}",
        )


def check_labels(
    spec: JobSpec, shown: Path, examples: list[data.Example], model_labels: list[str]
) -> dict[str, str]:
    """The dataset -> model label map, checked by name in both directions. Never by position."""
    dataset_labels = {e.label for e in examples}
    label_map = spec.dataset.label_map
    if label_map is None:
        # Without a map the dataset's values must be the model's label names themselves.
        label_map = {
            label: label
            for label in dataset_labels | (set(model_labels) if spec.finetune else set())
        }
        field = "dataset.label_map"
        unknown = sorted(label for label in dataset_labels if label not in model_labels)
        if unknown:
            advice = (
                "add a label_map from dataset value to model label name"
                if len(dataset_labels) <= max(10, 3 * len(model_labels))
                else f"{len(dataset_labels)} different values look like text, not labels: check "
                "dataset.label_column and dataset.text_column"
            )
            first = (
                f" (first at {data.first_rows_with(examples, unknown[:1])})"
                if len(unknown) <= 10
                else ""
            )
            raise SpecError(
                shown,
                field,
                unknown,
                f"the dataset's labels are not the model's label names "
                f"({', '.join(model_labels)}){first}; {advice}",
            )
        return label_map
    for value, name in label_map.items():
        if name not in model_labels:
            raise SpecError(
                shown,
                f"dataset.label_map.{value}",
                name,
                f"the model's label names are: {', '.join(model_labels)}",
            )
    unmapped = sorted(label for label in dataset_labels if label not in label_map)
    if unmapped:
        raise SpecError(
            shown,
            "dataset.label_map",
            unmapped,
            "these dataset labels have no model label (first at "
            f"{data.first_rows_with(examples, unmapped)}); "
            f"the map covers: {', '.join(label_map)}",
        )
    return label_map


def _spec_hash(
    spec: JobSpec, examples: list[data.Example], train: list[data.Example] | None
) -> str:
    """What makes two results comparable: everything in the job but the list of variants and the
    baseline."""
    raw = {
        k: v
        for k, v in spec.raw.items()
        if k not in ("variants", "precisions", "devices", "baseline")
    }
    digest = hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode())
    digest.update(data.fingerprint(examples).encode())
    digest.update(data.fingerprint(train or []).encode())
    digest.update(models.model_key(spec).encode())
    return digest.hexdigest()[:16]
