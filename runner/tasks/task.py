"""The task seam: what a task declares, and what its worker does.

A task says what a model is asked and how its answers are scored, in the manner of
lm-evaluation-harness: what one forward pass answers decides the metrics. It has two halves:

- `Task`, its declaration, torch-free: its job fields and how they are read, the kind of model it
  takes, its metrics and per-sample predictions as results hold them, the tolerances it can be
  judged by, the rows and statistics of collect's table, the words of the progress line and the
  references (`"module:attribute"`) to its other halves. The spec, the plan, collect and the driver
  read it; none of them names a task.
- `TaskWorker`, what runs on the model, in the variant's process: the sample's batches, what a
  forward pass answers, the scoring, what it measures after the clock, the sensitivity study's
  view and the fine-tune's rows. It is resolved by name where it runs (`Task.worker_side`), so
  nothing that only reads jobs or results imports torch.

Every hook has a default a task overrides only where it differs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from runner.records import Record
from runner.references import resolve
from runner.schema import Metrics, Result

# How a delta is called noise: a percentile interval of a paired bootstrap that contains 0 (and, for
# a classifier's accuracy, McNemar's exact test at ALPHA). Seeded, so the same results always give
# the same marks.
BOOTSTRAP = {"n_resamples": 2000, "confidence": 0.95, "seed": 0}
ALPHA = 0.05
NOISE_MARK = "≈"


@dataclass(frozen=True)
class Metric:
    """One of a task's metrics, as a result's metrics name it: its JSON type (a type hint:
    float, int, dict) and which way is better (None: neither, a count or a record)."""

    name: str
    kind: Any = float
    higher_is_better: bool | None = None


# ---------------------------------------------------------------------------------------------
# collect's table: rows, statistics against the baseline, tolerances.


@dataclass(frozen=True)
class Row:
    label: str
    get: Callable[[Result, dict], float | None]  # (result, its statistics from compare) -> value
    digits: int | None = 4  # None: three significant digits
    delta: bool = True  # whether a relative delta means anything for this metric
    signed: bool = False
    # A key of the statistics' "significance" (e.g. "accuracy"): the delta cell (or, in a row of
    # absolute deltas, the value cell with its bootstrap interval) carries the within-noise mark.
    noise: str | None = None
    # Whether the column's warnings are marked (⚠1,2) in this row's cells: the task's headline.
    carries_warnings: bool = False


def metric(name: str) -> Callable[[Result, dict], float | None]:
    """A row's getter for one of the result's metrics."""
    return lambda r, s: r.metrics.value(name)


def latency(name: str) -> Callable[[Result, dict], float | None]:
    """A row's getter for one statistic of the result's per-pass latency."""
    return lambda r, s: getattr(r.metrics.latency, name)


@dataclass
class Compared:
    """One column's statistics against the baseline, and what the table should say about them
    (each note is prefixed with the column's key)."""

    stats: dict
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Check:
    """How one tolerance measures a variant: `measure(result, its statistics, the baseline or
    None)` gives the value held against the limit (None: not measured); min_* tolerances are
    floors, max_* ceilings."""

    what: str  # said in a failure: "accuracy drop 0.0300 > max_accuracy_drop 0.01"
    measure: Callable[[Result, dict, Result | None], float | None]
    shown: str  # the value's format: "{:.4f}"
    against_baseline: bool = False  # measured against the baseline's predictions


@dataclass(frozen=True)
class Tolerance:
    """One of a job's `tolerances:`: what it bounds, in words (for the job file's errors), the
    largest value it takes (None: any number >= 0) and how collect checks a variant against it."""

    name: str
    means: str
    check: Check
    at_most: float | None = None


# The tolerances every task can be judged by.
MAX_LATENCY_MS = Tolerance(
    "max_latency_ms",
    "median latency per forward pass, in milliseconds",
    Check("latency median", lambda r, s, b: r.metrics.latency.median, "{:.2f} ms"),
)
MAX_SIZE_MIB = Tolerance(
    "max_size_mib",
    "model size in MiB",
    Check("size", lambda r, s, b: r.metrics.model_size_mib, "{:.2f} MiB"),
)
MAX_PEAK_RSS_MIB = Tolerance(
    "max_peak_rss_mib",
    "peak resident memory in MiB",
    Check("peak RSS", lambda r, s, b: r.metrics.peak_rss_mib, "{:.0f} MiB"),
)
EVERY_TASK_TOLERANCES = (MAX_LATENCY_MS, MAX_SIZE_MIB, MAX_PEAK_RSS_MIB)


def fastest_median_latency(result: Result) -> tuple:
    """Sort key of the verdict's pick: the fastest median latency, the smaller model on a tie."""
    metrics = result.metrics
    median = metrics.latency.median
    return (median is None, median or 0.0, metrics.model_size_mib or 0.0)


def sample_note(result: Result, baseline: Result) -> str | None:
    """Why the result cannot be paired with the baseline's sample, or None when it can."""
    if result.fingerprint != baseline.fingerprint:
        return "evaluated on a different sample than the baseline; no agreement"
    return None


# ---------------------------------------------------------------------------------------------
# The plan's and the worker's records.


@dataclass
class Targets:
    """What the task's plan learned: its configuration, as every worker of the job gets it (a
    classifier's label names and the sample's gold labels, a causal LM's windows resolved against
    the model), and notes worth saying before anything runs."""

    config: Any
    notes: list[str] = field(default_factory=list)


@dataclass
class Scored:
    """A variant's answers scored: metrics, warnings and the per-sample record collect pairs."""

    metrics: dict[str, Any]
    warnings: list[str]
    predictions: dict[str, Any]


# ---------------------------------------------------------------------------------------------
# The declaration.


class Task:
    """A task's declaration. The class attributes are data; the methods have a default each
    (a task without rows of its own, without job fields, judged only by what every variant
    measures). A task this quantbench does not know reads as this base."""

    name: ClassVar[str] = ""
    model_class: ClassVar[str] = ""  # the transformers Auto class its checkpoints load as
    # The endings of the saved architectures of the models it takes ("ForCausalLM"; none: any),
    # and such a model in words ("a causal language model").
    architectures: ClassVar[tuple[str, ...]] = ()
    model_words: ClassVar[str] = "a model"
    # Whether its answers are labels: a dataset's label column, a label map, gold labels. False:
    # the dataset is text alone, and a labelled format's label column is not read.
    labelled: ClassVar[bool] = True
    job_fields: ClassVar[tuple[str, ...]] = ()  # its own top-level fields of a job
    dataset_fields: ClassVar[tuple[str, ...]] = ()  # its own fields of a job's `dataset:`
    metrics: ClassVar[tuple[Metric, ...]] = ()
    predictions: ClassVar[type[Record] | None] = None  # its per-sample record in a result
    # The tolerances it can be judged by, in the order the report names them.
    tolerances: ClassVar[tuple[Tolerance, ...]] = EVERY_TASK_TOLERANCES
    # collect's rows of its own, between the size row and the rows every result has.
    rows: ClassVar[tuple[Row, ...]] = ()
    # The labels of its rows that say how good the answers are: the quality views of the
    # cross-hardware comparison (runner/pivot.py).
    quality_rows: ClassVar[tuple[str, ...]] = ()
    best_rule: ClassVar[str] = "fastest median latency among passing"
    noise_rule: ClassVar[str] = ""  # what the within-noise mark means
    # Said of a model whose weights are random and that the job does not fine-tune.
    untrained: ClassVar[str] = "its metrics are an untrained model's"
    # An inline config of a model type without a class of model_class: what to say (None: no
    # such check; runner/plan.py asks transformers).
    no_model_class: ClassVar[str | None] = None
    # "module:attribute" of its TaskWorker (runs on the model), and of its report's plots.
    worker_side: ClassVar[str] = ""
    plots: ClassVar[str] = ""

    # The job ---------------------------------------------------------------------------------

    def read_config(self, top) -> Any:
        """Its own top-level job fields (job_fields), read and checked from the job's top-level
        fields.Reader; None for a task without any."""
        return None

    def read_dataset_fields(self, reader) -> Any:
        """Its own fields of the job's `dataset:` (dataset_fields), read and checked."""
        return None

    def plan(self, spec, job, config: dict, rows: list, examples: list, train) -> Targets:
        """Before anything runs: the task's configuration for every worker and its notes, given
        the spec, the job file, the model's config, the dataset's rows, the evaluation sample
        and the training rows (None without a fine-tune); raises SpecError for answers the model
        cannot give."""
        return Targets(None)

    def describe_answers(self, targets: Targets) -> str:
        """What `quantbench validate` says of the model's answers."""
        return f"task: {self.name}"

    def describe_dataset(self, targets: Targets) -> str:
        """What `quantbench validate` adds to its dataset line ("; label map: …")."""
        return ""

    def recorded(self, config: Any) -> dict:
        """What of its configuration a result's settings record."""
        return {}

    # Results and the progress line -----------------------------------------------------------

    def metric_hints(self) -> dict[str, Any]:
        """Each metric's name and the type hint a result's value of it is checked against."""
        return {metric.name: metric.kind | None for metric in self.metrics}

    def headline(self, metrics: Metrics) -> str:
        """What a progress line says of a variant's answers."""
        return ""

    def key_metric(self, metrics: Metrics) -> tuple[str, float | None, int]:
        """The metric the sensitivity study's report names beside a measured variant's speed:
        (its name, its value, the digits it is shown with)."""
        return "", None, 0

    # collect --------------------------------------------------------------------------------

    def compare(self, result: Result, baseline: Result | None) -> Compared:
        """The column's statistics against the baseline (the result may have failed; the
        baseline is the result itself in the baseline's column, None without an ok baseline)."""
        return Compared({})

    def more_rows(self, results: list[Result]) -> tuple[Row, ...]:
        """Rows that depend on what the job's results measured (a causal LM's benchmark tasks),
        after its own rows; the results are in table order, the baseline's first."""
        return ()

    def best_key(self, result: Result) -> tuple:
        """The verdict's pick among the variants that pass: the first by this key."""
        return fastest_median_latency(result)

    def degenerate(self, result: Result) -> str | None:
        """Why an ok result's answers say nothing a verdict could judge (a classifier that
        predicts one class whatever it reads), None when they can be judged or the task has no
        such rule. Such a result never passes, and when it is the baseline no variant does."""
        return None

    # The sensitivity study ------------------------------------------------------------------

    def study_tolerance(self, tolerances: dict[str, float]) -> dict[str, float | None]:
        """The bounds a study's recipe must meet (study.ranking.Tolerance's fields), from the job's
        tolerances where this task is judged by them; {} for the study's default."""
        return {}

    # Fine-tuning ----------------------------------------------------------------------------

    def training_labels(self, config: Any, train: list) -> tuple[list[str], list[str]]:
        """(each training row's answer, the names of the fine-tuned model's answers)."""
        return [], []

    def training_settings(self, config: Any) -> dict:
        """The part of its configuration the training depends on, hashed into the fine-tuned
        model's cache key ({}: none)."""
        return {}

    def chance_loss(self, work) -> tuple[float, str]:
        """The training loss of a model that learned nothing, and how it is written ("ln 2")."""
        return 0.0, "ln 1"

    def refuse_model(self, model) -> str | None:
        """Why the task cannot take the loaded FP32 model (a sentence for the user), or None:
        asked once where the job's model is prepared, before any variant."""
        return None

    # Its other halves ------------------------------------------------------------------------

    def worker(self) -> TaskWorker:
        """Its TaskWorker: imported here, where it runs (torch and transformers with it)."""
        return resolve(self.worker_side)


class TaskWorker:
    """What a task does on the model, in a variant's (or a fine-tune's, or a study step's)
    process. `work` is the work item (runner/work.py): the job's inputs, its task's
    configuration and what is asked."""

    def batches(self, work) -> tuple[list[dict], list[int], dict | None]:
        """Before any clock starts: the sample's batches in the evaluation's order, that order
        (answers are put back in sample order) and the fixed-shape batch of `latency_mode: fixed`
        (else None)."""
        raise NotImplementedError

    def read_output(self, output, batch: dict) -> list:
        """One forward pass's output and the batch it was given -> one answer per sample, in the
        task's own type, computed after the clock has stopped."""
        raise NotImplementedError

    def non_finite(self, answers: list) -> int:
        """How many of the answers hold NaN or infinity."""
        return 0

    def score(self, work, answers: list) -> Scored:
        """The answers in sample order -> metrics, warnings, the per-sample record."""
        raise NotImplementedError

    def calibration_rows(self, work) -> list[list[int]]:
        """The calibration set's texts (work.calibration) as token ids, as the task feeds a text
        to the model, each cut to the calibration's max_length."""
        raise NotImplementedError

    def measure_more(self, work, model, batches: list, memory, scored: Scored, fp32) -> Scored:
        """Measurements after the timed passes and the weight analysis, on the eager model,
        outside every clock (a causal LM's KL from FP32, its generation speed). fp32: the FP32
        reference (runner.worker.Fp32Reference), loaded on first use; release it when done."""
        return scored

    def study_view(self, step, fp32):
        """What a sensitivity study measures a model by (study.ranking.StudyView), given the step
        and the FP32 model on the study's device."""
        raise NotImplementedError

    # Fine-tuning: the model it trains, the Trainer's rows and their collator, in words.

    def finetune_model(self, base_dir: str, answer_names: list[str]):
        raise NotImplementedError

    def training_rows(self, tokenizer, work) -> list[dict]:
        raise NotImplementedError

    def data_collator(self, tokenizer):
        raise NotImplementedError

    def describe_training(self, work) -> str:
        return f"{len(work.texts)} rows"


def ln(count: int) -> float:
    return math.log(count) if count > 1 else 0.0
