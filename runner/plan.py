"""Planning: a job spec checked against the world, before anything runs.

`plan_job` reads the dataset, draws the evaluation sample, reads the model's label names and ties the
dataset's labels to them by name through the job's label map. Any mismatch is a SpecError naming the
file and field; nothing has been started or written when it is raised.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from runner import data, models
from runner.spec import JobSpec, SpecError, load_job


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


def plan_job(path: str | Path) -> JobPlan:
    spec = load_job(path)
    shown = Path(path)
    rows = data.read_examples(spec.dataset, shown)
    sample_rows = data.sample_indices(len(rows), spec.dataset.sample)
    examples = [rows[i] for i in sample_rows]

    config = models.read_config(spec.model, shown)
    if spec.tokenizer is not None:
        models.check_source(spec.tokenizer, shown, "tokenizer")
    model_labels = models.label_names(config)
    label_map = check_labels(spec, shown, {e.label for e in examples}, model_labels)

    return JobPlan(spec=spec, examples=examples, sample_rows=sample_rows, dataset_rows=len(rows),
                   label_map=label_map, model_labels=model_labels,
                   sample_fingerprint=data.fingerprint(examples), spec_hash=_spec_hash(spec, examples))


def check_labels(spec: JobSpec, shown: Path, dataset_labels: set[str], model_labels: list[str]) -> dict[str, str]:
    """The dataset -> model label map, checked by name in both directions. Never by position."""
    label_map = spec.dataset.label_map
    if label_map is None:
        # Without a map the dataset's values must be the model's label names themselves.
        label_map = {label: label for label in dataset_labels}
        field = "dataset.label_map"
        unknown = sorted(label for label in dataset_labels if label not in model_labels)
        if unknown:
            raise SpecError(shown, field, unknown,
                            f"the dataset's labels are not the model's label names ({', '.join(model_labels)}); "
                            "add a label_map from dataset value to model label name")
        return label_map
    for value, name in label_map.items():
        if name not in model_labels:
            raise SpecError(shown, f"dataset.label_map.{value}", name,
                            f"the model's label names are: {', '.join(model_labels)}")
    unmapped = sorted(label for label in dataset_labels if label not in label_map)
    if unmapped:
        raise SpecError(shown, "dataset.label_map", unmapped,
                        f"these dataset labels have no model label; the map covers: {', '.join(label_map)}")
    return label_map


def _spec_hash(spec: JobSpec, examples: list[data.Example]) -> str:
    """What makes two results comparable: everything in the job but the list of variants and the baseline."""
    raw = {k: v for k, v in spec.raw.items() if k not in ("variants", "precisions", "devices", "baseline")}
    digest = hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode())
    digest.update(data.fingerprint(examples).encode())
    digest.update(models.model_key(spec).encode())
    return digest.hexdigest()[:16]
