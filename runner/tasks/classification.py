"""Sequence classification: a text in, one of the model's labels out.

What a prediction is here: the softmax over the classification head's logits, one probability per
label; the predicted label is the most probable one. Labels are matched by name, never by position:
the plan ties the dataset's values to the model's id2label names through the job's label map, and
the label guard warns when another reading of the same predictions would fit the gold labels far
better (a mapping mistake, not a quantization effect). Fine-tuning gives the encoder a new head
whose labels are the names the job maps to.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import numpy as np

from runner import data, effects, model_checks
from runner.spec import JobSpec, SpecError
from runner.tasks import classification_collect
from runner.tasks.task import Metric, Scored, Targets, Task

# The label guard speaks when a relabelling of the predictions beats the job's map by this much.
RELABEL_MARGIN = 0.10


# ---------------------------------------------------------------------------------------------
# Planning: the model's labels and the dataset's, tied by name.


def plan_targets(
    spec: JobSpec,
    shown: Path,
    config: dict,
    rows: list[data.Example],
    examples: list[data.Example],
    train: list[data.Example] | None,
) -> Targets:
    model_checks.check_not_causal_lm(config, shown, spec.model, spec.task)
    labels_of_model = model_checks.config_labels(config, shown, spec.model)
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
    label_map = check_labels(spec, shown, examples, model_labels)
    if train is not None:
        check_training_labels(shown, train, label_map)
    notes = []
    if len({e.label for e in examples}) == 1:
        notes.append(
            f"every row of the evaluation sample has the label {examples[0].label!r}: accuracy "
            "cannot tell the model from one that always answers it"
        )
    return Targets(label_map=label_map, model_labels=model_labels, notes=notes)


def check_labels(
    spec: JobSpec, shown: Path, examples: list[data.Example], model_labels: list[str]
) -> dict[str, str]:
    """The dataset -> model label map, checked by name in both directions. Never by position."""
    dataset_labels = {e.label for e in examples}
    label_map = spec.dataset.label_map
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
            f"{data.first_rows_with(examples, unmapped)}); "
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
    first = (
        f" (first at {data.first_rows_with(examples, unknown[:1])})" if len(unknown) <= 10 else ""
    )
    return SpecError(
        shown,
        "dataset.label_map",
        unknown,
        f"the dataset's labels are not the model's label names "
        f"({', '.join(model_labels)}){first}; {advice}",
    )


def check_training_labels(
    shown: Path, train: list[data.Example], label_map: dict[str, str]
) -> None:
    unknown = sorted({e.label for e in train} - set(label_map))
    if unknown:
        raise SpecError(
            shown,
            "finetune.train",
            unknown,
            f"labels in the training data that the model does not know (first at "
            f"{data.first_rows_with(train, unknown)}); it knows: {', '.join(label_map)}",
        )


# ---------------------------------------------------------------------------------------------
# A forward pass's answer, and the answers scored.


def prepare_batches(task) -> tuple[list[dict], list[int], dict | None]:
    """task: the worker's VariantTask. Each text is one sample: the texts tokenized into batches in
    the evaluation's order, that order, and the fixed-shape batch of latency_mode fixed."""
    from runner import evaluate  # evaluate reads class probabilities by default: it imports this

    return evaluate.tokenized_sample(
        task.model_dir, task.texts, task.evaluation, task.max_length, task.variant.device
    )


def class_probabilities(output, batch: dict | None = None):
    """One row of label probabilities per sample, in float32 on the CPU (the batch is not
    needed: the head answers per sample)."""
    import torch

    return torch.softmax(output.logits.float(), dim=-1).cpu()


def score(task, probabilities: np.ndarray) -> Scored:
    """task: the worker's VariantTask; probabilities: [samples, labels] in sample order."""
    index = {name: i for i, name in enumerate(task.model_labels)}
    gold_ids = np.array([index[name] for name in task.gold_labels])
    predicted = probabilities.argmax(axis=1)
    predictions = {
        "labels": task.model_labels,
        "gold": task.gold_labels,
        "predicted": [task.model_labels[i] for i in predicted],
        "confidence": [round(float(c), 6) for c in probabilities.max(axis=1)],
        "probabilities": [[round(float(p), 6) for p in row] for row in probabilities],
    }
    return Scored(
        metrics=prediction_metrics(probabilities, gold_ids, task.model_labels),
        warnings=label_guard(gold_ids, predicted, task.model_labels),
        predictions=predictions,
    )


def prediction_metrics(
    probabilities: np.ndarray, gold_ids: np.ndarray, label_names: list[str]
) -> dict:
    predicted = probabilities.argmax(axis=1)
    confidence = probabilities.max(axis=1)
    return {
        "accuracy": float((predicted == gold_ids).mean()),
        "macro_f1": effects.macro_f1(gold_ids, predicted, len(label_names)),
        "avg_confidence": float(confidence.mean()),
    }


def label_guard(gold_ids: np.ndarray, predicted: np.ndarray, label_names: list[str]) -> list[str]:
    """Warnings when the accuracy says more about the label map than about the model."""
    from scipy.optimize import linear_sum_assignment

    warnings = []
    k = len(label_names)
    accuracy = float((predicted == gold_ids).mean())
    counts = np.zeros((k, k), dtype=np.int64)  # rows: predicted id, columns: gold id
    np.add.at(counts, (predicted, gold_ids), 1)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    best = counts[rows, cols].sum() / len(gold_ids)
    majority = np.bincount(gold_ids, minlength=k).max() / len(gold_ids)
    # A model that predicts one class whatever it reads (untrained, collapsed) scores the majority
    # share under some relabelling: that says nothing about the map. Only a relabelling that beats
    # guessing does.
    if best - accuracy >= RELABEL_MARGIN and best - majority >= RELABEL_MARGIN:
        reading = ", ".join(
            f"{label_names[r]}→{label_names[c]}" for r, c in zip(rows, cols) if r != c
        )
        warnings.append(
            f"label mapping suspect: accuracy {accuracy:.2%} under the job's label map, but "
            f"reading the predictions as {reading} gives {best:.2%}; check dataset.label_map"
        )
    if accuracy < majority:
        warnings.append(
            f"accuracy {accuracy:.2%} is below always guessing the majority class ({majority:.2%})"
        )
    return warnings


# ---------------------------------------------------------------------------------------------
# The sensitivity study's view: class probabilities, compared with FP32's by label.


def study_view(step, fp32):
    """step: a study_worker.StudyStep; fp32: the FP32 model on the study's device. FP32's
    probabilities are the probe's (computed and timed here) or the ones it handed on."""
    import time

    from runner import evaluate
    from runner import sensitivity as S

    batches, order, _ = evaluate.tokenized_sample(
        step.model_dir, step.texts, step.evaluation, step.max_length, step.study.device
    )

    def outputs(model) -> np.ndarray:
        return evaluate.in_sample_order(S.probabilities(model, batches), order)

    clock, fp32_pass_s = time.perf_counter(), None
    if step.reference is None:
        reference = outputs(fp32)
        fp32_pass_s = time.perf_counter() - clock
    else:
        reference = np.array(step.reference)
    gold = np.array([step.model_labels.index(label) for label in step.gold_labels])
    compare = partial(S.compare_labels, reference, gold, step.model_labels)
    return S.StudyView(batches, outputs, compare, reference.tolist(), fp32_pass_s)


# ---------------------------------------------------------------------------------------------
# Fine-tuning: the encoder with a new head, one output per label name.


def finetune_model(base_dir: str, label_names: list[str]):
    import torch
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(
        base_dir,
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={name: i for i, name in enumerate(label_names)},
        ignore_mismatched_sizes=True,
        dtype=torch.float32,
    )


def training_rows(tokenizer, task) -> list[dict]:
    """task: the FinetuneTask. The training texts tokenized, each with its answer's index among the
    head's outputs."""
    index = {name: i for i, name in enumerate(task.label_names)}
    encoded = tokenizer(task.texts, truncation=True, max_length=task.max_length)
    columns = [c for c in ("input_ids", "attention_mask", "token_type_ids") if c in encoded]
    return [
        {**{c: encoded[c][i] for c in columns}, "labels": index[label]}
        for i, label in enumerate(task.labels)
    ]


def data_collator(tokenizer):
    """Each batch padded to its longest text."""
    from transformers import DataCollatorWithPadding

    return DataCollatorWithPadding(tokenizer)


def describe_training(task) -> str:
    return f"{len(task.texts)} rows"


def chance_loss(task) -> tuple[float, str]:
    """Cross-entropy's loss for guessing among the head's labels: ln of their count."""
    count = len(task.label_names)
    return (math.log(count) if count > 1 else 0.0), f"ln {count}"


TASK = Task(
    name="classification",
    model_class="AutoModelForSequenceClassification",
    plan_targets=plan_targets,
    prepare_batches=prepare_batches,
    read_output=class_probabilities,
    score=score,
    finetune_model=finetune_model,
    study_view=study_view,
    metrics=(
        Metric("accuracy", float, higher_is_better=True),
        Metric("macro_f1", float, higher_is_better=True),
        Metric("avg_confidence", float),
    ),
    predictions=classification_collect.LabelPredictions,
    comparison=classification_collect.COMPARISON,
    training_rows=training_rows,
    data_collator=data_collator,
    describe_training=describe_training,
    chance_loss=chance_loss,
)
