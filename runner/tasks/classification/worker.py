"""A classifier on the model: what a forward pass answers (one row of label probabilities per
text), how the answers are scored, the sensitivity study's view, and the fine-tune's head and rows.

Runs in the variant's own process (resolved by runner/tasks/classification's declaration): torch
and transformers are imported here, at the top.
"""

from __future__ import annotations

import time
from functools import partial

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

from runner import evaluate
from runner.study import ranking
from runner.tasks import statistics
from runner.tasks.classification import effects
from runner.tasks.classification.compare import one_class
from runner.tasks.task import Scored, TaskWorker

# The label guard speaks when a relabelling of the predictions beats the job's map by this much.
RELABEL_MARGIN = 0.10


class ClassificationWorker(TaskWorker):
    """work.task_config: the plan's labels.Labels (the model's label names, the gold labels)."""

    def batches(self, work) -> tuple[list[dict], list[int], dict | None]:
        """Each text is one sample: the texts tokenized into batches in the evaluation's order,
        that order, and the fixed-shape batch of latency_mode fixed."""
        return evaluate.tokenized_sample(
            work.model_dir, work.texts, work.evaluation, work.max_length, work.variant.device
        )

    def calibration_rows(self, work) -> list[list[int]]:
        """Each text as the sample's are tokenized (with the encoder's special tokens), cut."""
        tokenizer = AutoTokenizer.from_pretrained(work.model_dir)
        rows = work.calibration
        return tokenizer(list(rows.texts), truncation=True, max_length=rows.max_length)["input_ids"]

    def read_output(self, output, batch: dict) -> list[np.ndarray]:
        """One row of label probabilities per sample, in float32 (the batch is not needed: the
        head answers per sample)."""
        return list(class_probabilities(output).numpy())

    def non_finite(self, answers: list[np.ndarray]) -> int:
        return sum(not np.isfinite(row).all() for row in answers)

    def score(self, work, answers: list[np.ndarray]) -> Scored:
        """answers: each sample's label probabilities, in sample order."""
        labels = work.task_config
        probabilities = np.stack(answers)
        index = {name: i for i, name in enumerate(labels.names)}
        gold_ids = np.array([index[name] for name in labels.gold])
        predicted = probabilities.argmax(axis=1)
        predictions = {
            "labels": labels.names,
            "gold": labels.gold,
            "predicted": [labels.names[i] for i in predicted],
            "confidence": [round(float(c), 6) for c in probabilities.max(axis=1)],
            "probabilities": [[round(float(p), 6) for p in row] for row in probabilities],
        }
        return Scored(
            metrics=prediction_metrics(probabilities, gold_ids, labels.names),
            warnings=label_guard(gold_ids, predicted, labels.names),
            predictions=predictions,
        )

    def study_view(self, step, fp32) -> ranking.StudyView:
        """Class probabilities, compared with FP32's by label. FP32's probabilities are the
        probe's (computed and timed here) or the ones it handed on."""
        batches, order, _ = evaluate.tokenized_sample(
            step.model_dir, step.texts, step.evaluation, step.max_length, step.study.device
        )

        def outputs(model) -> np.ndarray:
            return np.stack(evaluate.in_sample_order(list(probabilities(model, batches)), order))

        clock, fp32_pass_s = time.perf_counter(), None
        if step.reference is None:
            reference = outputs(fp32)
            fp32_pass_s = time.perf_counter() - clock
        else:
            reference = np.array(step.reference)
        labels = step.task_config
        gold = np.array([labels.names.index(label) for label in labels.gold])
        compare = partial(compare_labels, reference, gold, labels.names)
        return ranking.StudyView(batches, outputs, compare, reference.tolist(), fp32_pass_s)

    # Fine-tuning: the encoder with a new head, one output per label name.

    def finetune_model(self, base_dir: str, answer_names: list[str]):
        return AutoModelForSequenceClassification.from_pretrained(
            base_dir,
            num_labels=len(answer_names),
            id2label=dict(enumerate(answer_names)),
            label2id={name: i for i, name in enumerate(answer_names)},
            ignore_mismatched_sizes=True,
            dtype=torch.float32,
        )

    def training_rows(self, tokenizer, work) -> list[dict]:
        """The training texts tokenized, each with its answer's index among the head's
        outputs."""
        index = {name: i for i, name in enumerate(work.label_names)}
        encoded = tokenizer(work.texts, truncation=True, max_length=work.max_length)
        columns = [c for c in ("input_ids", "attention_mask", "token_type_ids") if c in encoded]
        return [
            {**{c: encoded[c][i] for c in columns}, "labels": index[label]}
            for i, label in enumerate(work.labels)
        ]

    def data_collator(self, tokenizer):
        """Each batch padded to its longest text."""
        return DataCollatorWithPadding(tokenizer)


WORKER = ClassificationWorker()


def class_probabilities(output) -> torch.Tensor:
    """[samples, labels] label probabilities of one forward pass, float32 on the CPU."""
    return torch.softmax(output.logits.float(), dim=-1).cpu()


def probabilities(model, batches: list[dict]) -> np.ndarray:
    """The classifier's class probabilities [samples, labels] over tokenized batches, in order:
    what a sensitivity study's evaluate answers."""
    with torch.inference_mode():
        rows = [class_probabilities(model(**batch)) for batch in batches]
    return torch.cat(rows).numpy()


def prediction_metrics(
    probabilities: np.ndarray, gold_ids: np.ndarray, label_names: list[str]
) -> dict:
    predicted = probabilities.argmax(axis=1)
    confidence = probabilities.max(axis=1)
    return {
        "accuracy": float((predicted == gold_ids).mean()),
        "macro_f1": statistics.macro_f1(gold_ids, predicted, len(label_names)),
        "avg_confidence": float(confidence.mean()),
    }


def label_guard(gold_ids: np.ndarray, predicted: np.ndarray, label_names: list[str]) -> list[str]:
    """Warnings when the accuracy says more about the label map than about the model."""
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
    only = one_class(predicted)
    if only is not None:
        warnings.append(
            f"every prediction is {label_names[only]}: the model answers one class whatever it "
            f"reads (its accuracy {accuracy:.2%} is that class's share of the gold labels)"
        )
    return warnings


def compare_labels(
    reference: np.ndarray, gold: np.ndarray, label_names: list[str], probabilities: np.ndarray
) -> dict:
    """A model's probabilities against FP32's (reference) on the same samples: accuracy (and
    FP32's), agreement, mean KL(FP32 || model) in nats, flips (samples whose label changed), the
    paired bootstrap of the accuracy delta and exact McNemar."""
    found = effects.prediction_effects(gold, reference, probabilities, label_names)
    base_pred, var_pred = reference.argmax(axis=1), probabilities.argmax(axis=1)
    return {
        "accuracy": found["accuracy_variant"],
        "accuracy_fp32": found["accuracy_baseline"],
        "agreement": found["agreement"],
        "mean_kl": found["mean_kl_baseline_variant"],
        "flips": int(np.sum(base_pred != var_pred)),
        "bootstrap_accuracy_delta": statistics.paired_bootstrap_delta(
            gold, base_pred, var_pred, n_resamples=ranking.BOOTSTRAP_RESAMPLES
        ),
        "mcnemar": statistics.mcnemar_exact(gold, base_pred, var_pred),
    }


def label_study(evaluate_keep, reference, gold, label_names, layers) -> ranking.Study:
    """A classifier's study: its outputs are class probabilities, compared with FP32's
    (reference) on the gold label indices."""
    return ranking.Study(
        evaluate_keep, partial(compare_labels, reference, gold, label_names), layers
    )
