"""The `Task` record: the functions a task gives the steps of the data flow that depend on it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from runner.tasks.comparison import Comparison


@dataclass
class Targets:
    """What the plan learned about the answers: the model's names for them and how the dataset's
    values map onto those names, with notes worth saying before anything runs."""

    label_map: dict[str, str]  # dataset label value -> model label name
    model_labels: list[str]  # the model's answers, in the order of its outputs
    notes: list[str] = field(default_factory=list)
    # The task's own job settings as the plan resolved them against the model (a causal LM's
    # context), handed to every worker; None for a task without any.
    task_settings: Any = None


@dataclass(frozen=True)
class Metric:
    """One of a task's metrics, as a result's metrics name it: its JSON type (a type hint:
    float, int, dict) and which way is better (None: neither, a count or a record)."""

    name: str
    kind: Any = float
    higher_is_better: bool | None = None


@dataclass
class Scored:
    """A variant's outputs scored: metrics, warnings and the per-sample record collect pairs."""

    metrics: dict[str, Any]
    warnings: list[str]
    predictions: dict[str, Any]


@dataclass(frozen=True)
class Task:
    name: str
    # The transformers Auto class its checkpoints load as.
    model_class: str
    # (spec, job file, model config, dataset rows, evaluation sample, training rows) -> Targets;
    # raises SpecError for answers the model cannot give.
    plan_targets: Callable[..., Targets]
    # (VariantTask) -> (the sample's batches in the evaluation's order, that order, the fixed-shape
    # batch or None): all before any clock starts.
    prepare_batches: Callable[..., tuple]
    # (a forward pass's output, the batch it was given) -> one float CPU tensor row per sample
    # (computed after the clock).
    read_output: Callable[[Any, dict], Any]
    # (VariantTask, outputs in sample order) -> Scored.
    score: Callable[..., Scored]
    # (base checkpoint folder, answer names) -> a model with a new head to fine-tune; None: the
    # task cannot be fine-tuned.
    finetune_model: Callable[..., Any] | None = None
    # Whether the task's answers are labels: a dataset's label column, a label map, gold labels.
    # False: the dataset is text alone, and a labelled format's label column is not read.
    labelled: bool = True
    # Top-level job fields only this task takes, and (the job's top-level _Reader) -> its settings.
    job_fields: tuple[str, ...] = ()
    read_settings: Callable[..., Any] | None = None
    # (VariantTask, the eager model, the batches, MemoryPhases, Scored) -> Scored: measurements
    # after the timed passes and the weight analysis, outside their clocks (a causal LM's KL against
    # FP32 and its generation speed).
    measure_more: Callable[..., Scored] | None = None
    # (StudyStep, the FP32 model on the study's device) -> sensitivity.StudyView: what a
    # sensitivity study measures a model by, and how it compares it with FP32.
    study_view: Callable[..., Any] | None = None
    # The task's metrics, as results hold them (schema.Metrics.task), and the record type of its
    # per-sample predictions (results' `predictions`).
    metrics: tuple[Metric, ...] = ()
    predictions: type | None = None
    # What collect's table shows of this task and what it computes against the baseline
    # (runner/tasks/comparison.py); the default: only the rows every result has.
    comparison: Comparison = field(default_factory=Comparison)
    # Fine-tuning (runner/finetune.py), each taking the FinetuneTask: (tokenizer, FinetuneTask) ->
    # the Trainer's rows; (tokenizer) -> the collator that batches them; (FinetuneTask) -> what is
    # trained on, in words ("4000 rows"); (FinetuneTask) -> (the training loss of a model that
    # learned nothing, how it is written, "ln 2"); (the task settings) -> the part of them the
    # training depends on, recorded and hashed into the fine-tuned model's cache key.
    training_rows: Callable[..., list[dict]] | None = None
    data_collator: Callable[..., Any] | None = None
    describe_training: Callable[..., str] | None = None
    chance_loss: Callable[..., tuple[float, str]] | None = None
    training_settings: Callable[..., dict] | None = None

    def metric_hints(self) -> dict[str, Any]:
        """Each metric's name and the type hint a result's value of it is checked against."""
        return {metric.name: metric.kind | None for metric in self.metrics}

    def auto_model(self):
        """The transformers class that loads this task's checkpoints."""
        import transformers

        return getattr(transformers, self.model_class)
