"""Sequence classification: a text in, one of the model's labels out.

What a prediction is here: the softmax over the classification head's logits, one probability per
label; the predicted label is the most probable one. Labels are matched by name, never by position:
the plan ties the dataset's values to the model's id2label names through the job's label map
(labels.py), and the label guard warns when another reading of the same predictions would fit the
gold labels far better (a mapping mistake, not a quantization effect). Fine-tuning gives the
encoder a new head whose labels are the names the job maps to.

This module is the declaration, torch-free; worker.py runs on the model, compare.py is collect's
part and plots.py the report's.
"""

from __future__ import annotations

from runner.schema import Metrics
from runner.tasks.classification import compare, labels
from runner.tasks.task import EVERY_TASK_TOLERANCES, Metric, Targets, Task, ln


class Classification(Task):
    name = "classification"
    model_class = "AutoModelForSequenceClassification"
    model_words = "a classifier"
    dataset_fields = ("label_map",)
    metrics = (
        Metric("accuracy", float, higher_is_better=True),
        Metric("macro_f1", float, higher_is_better=True),
        Metric("avg_confidence", float),
    )
    predictions = compare.LabelPredictions
    tolerances = (compare.MAX_ACCURACY_DROP, compare.MIN_AGREEMENT, *EVERY_TASK_TOLERANCES)
    rows = compare.ROWS
    quality_rows = ("accuracy", "macro-F1")
    noise_rule = compare.NOISE_RULE
    untrained = "accuracy is chance until the model is fine-tuned"
    worker_side = "runner.tasks.classification.worker:WORKER"
    plots = "runner.tasks.classification.plots:PLOTS"

    def read_dataset_fields(self, reader) -> dict[str, str] | None:
        """`dataset.label_map`: dataset label value -> the model's label name."""
        return labels.read_label_map(reader)

    def plan(self, spec, job, config: dict, rows, examples, train) -> Targets:
        return labels.plan_targets(spec, job, config, rows, examples, train)

    def describe_answers(self, targets: Targets) -> str:
        return f"labels: {', '.join(targets.config.names)}"

    def describe_dataset(self, targets: Targets) -> str:
        label_map = ", ".join(f"{k}→{v}" for k, v in sorted(targets.config.label_map.items()))
        return f"; label map: {label_map}" if label_map else ""

    def headline(self, metrics: Metrics) -> str:
        return f"accuracy {metrics.value('accuracy') or 0:.4f}"

    def key_metric(self, metrics: Metrics) -> tuple[str, float | None, int]:
        return "accuracy", metrics.value("accuracy"), 4

    def compare(self, result, baseline):
        return compare.compare(result, baseline)

    def degenerate(self, result) -> str | None:
        """One class predicted for every sample, or a macro-F1 at chance."""
        return compare.degenerate(result)

    def study_tolerance(self, tolerances: dict[str, float]) -> dict[str, float | None]:
        return {key: tolerances.get(key) for key in ("min_agreement", "max_accuracy_drop")}

    def training_labels(self, config: labels.Labels, train: list) -> tuple[list[str], list[str]]:
        """Each training row's label name (through the job's map), and the head's label names."""
        return [config.label_map[e.label] for e in train], config.names

    def chance_loss(self, work) -> tuple[float, str]:
        """Cross-entropy's loss for guessing among the head's labels: ln of their count."""
        count = len(work.label_names)
        return ln(count), f"ln {count}"


TASK = Classification()
