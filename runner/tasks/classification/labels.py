"""A classifier's labels at plan time: the model's label names and the dataset's values, tied by
name through the job's label map, never by position. Any mismatch is a SpecError naming the file
and the field; nothing has run when it is raised."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from runner import model_checks
from runner.fields import Reader, SpecError, label_name
from runner.tasks.task import Targets


@dataclass(frozen=True)
class Labels:
    """A classification job's configuration, as every worker gets it: the model's label names in
    the order of its outputs, the dataset value -> label name map, and the sample's gold label
    names in sample order."""

    names: list[str]
    label_map: dict[str, str]
    gold: list[str]


def read_label_map(reader: Reader) -> dict[str, str] | None:
    """dataset label value -> model label name, each dataset label once however it is written."""
    label_map_raw = reader.get("label_map", dict)
    if label_map_raw is None:
        return None
    label_map = {}
    for key, value in label_map_raw.items():
        if not isinstance(value, (str, int)) or isinstance(value, bool):
            raise reader.error(f"label_map.{key}", value, "expected a model label name")
        name = label_name(key)
        if name in label_map:
            raise reader.error(
                f"label_map.{key}",
                key,
                f"names the same dataset label as another key ({name}); give each label once",
            )
        label_map[name] = str(value)
    return label_map


def plan_targets(
    spec,
    shown: Path,
    config: dict,
    rows: list,
    examples: list,
    train: list | None,
) -> Targets:
    labels_of_model = model_checks.config_labels(config, shown, spec.model)
    if spec.finetune is None:
        model_labels = labels_of_model
    else:
        # Fine-tuning gives the model a new head whose labels are the names the job maps to.
        labels = (
            spec.dataset.task_fields.values()
            if spec.dataset.task_fields
            else sorted({e.label for e in rows})
        )
        model_labels = list(dict.fromkeys(labels))
    label_map = check_labels(spec, shown, examples, model_labels)
    if train is not None:
        check_training_labels(shown, train, label_map)
    notes = []
    if len({e.label for e in examples}) == 1:
        notes.append(
            f"every row of the evaluation sample has the label {examples[0].label!r}: accuracy "
            "cannot tell the model from one that always answers it"
        )
    gold = [label_map[e.label] for e in examples]
    return Targets(Labels(model_labels, label_map, gold), notes)


def check_labels(spec, shown: Path, examples: list, model_labels: list[str]) -> dict[str, str]:
    """The dataset -> model label map, checked by name in both directions. Never by position."""
    dataset_labels = {e.label for e in examples}
    label_map = spec.dataset.task_fields
    if label_map is None:
        # Without a map the dataset's values must be the model's label names themselves.
        unknown = sorted(label for label in dataset_labels if label not in model_labels)
        if unknown:
            raise unknown_labels(shown, examples, dataset_labels, unknown, model_labels)
        own = set(model_labels) if spec.finetune else set()
        return {label: label for label in dataset_labels | own}
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
            f"{first_rows_with(examples, unmapped)}); "
            f"the map covers: {', '.join(label_map)}",
        )
    return label_map


def unknown_labels(shown, examples, dataset_labels, unknown, model_labels) -> SpecError:
    """The dataset's values are not the model's label names, and the job has no label map."""
    advice = (
        "add a label_map from dataset value to model label name"
        if len(dataset_labels) <= max(10, 3 * len(model_labels))
        else f"{len(dataset_labels)} different values look like text, not labels: check "
        "dataset.label_column and dataset.text_column"
    )
    first = f" (first at {first_rows_with(examples, unknown[:1])})" if len(unknown) <= 10 else ""
    return SpecError(
        shown,
        "dataset.label_map",
        unknown,
        f"the dataset's labels are not the model's label names "
        f"({', '.join(model_labels)}){first}; {advice}",
    )


def check_training_labels(shown: Path, train: list, label_map: dict[str, str]) -> None:
    unknown = sorted({e.label for e in train} - set(label_map))
    if unknown:
        raise SpecError(
            shown,
            "finetune.train",
            unknown,
            f"labels in the training data that the model does not know (first at "
            f"{first_rows_with(train, unknown)}); it knows: {', '.join(label_map)}",
        )


def first_rows_with(examples: list, labels: list[str]) -> str:
    """Where each of the labels first appears, for an error message: 'line 4 of a.csv: ""'."""
    firsts = {}
    for example in examples:
        if example.label in labels and example.label not in firsts:
            firsts[example.label] = example.where
    return "; ".join(f"{firsts[label]}: {label!r}" for label in labels[:5] if firsts.get(label))
