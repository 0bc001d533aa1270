"""The result file's schema: one description, from which a reader checks a file and a writer builds
one.

A result is one variant's JSON object (docs/results.md). Its every-task part is described here as
records and TypedDicts (runner/records.py): what the worker fills in, what collect and report
read. Its task's part is described by the task (runner/tasks/): the metrics it declares, in the
open mapping `Metrics.task`, and the type of its per-sample predictions. `read_result` checks a
result's JSON against both and gives the typed `Result`; `Result.to_json()` gives the JSON back,
key for key and in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, NotRequired, Required, Self, TypedDict

from runner.measure import latency_stats
from runner.records import Fields, Record, bookkeeping, fields_of, json_kind, length, problem

# The version of the result format this code writes.
SCHEMA_VERSION = 1

# The schema versions this code reads: every SCHEMA_VERSION so far. A result of a newer one may
# mean other things by the same fields.
READABLE_SCHEMA_VERSIONS = (1,)

REQUIRED = ("schema_version", "job", "variant", "status", "device")


class UnusableFile(ValueError):
    """A *.json file that is not a result this code can read; str() says why, for the user."""


# ---------------------------------------------------------------------------------------------
# What a result keeps of the machine, the sample and the job spec, as far as collect reads it.


class Cpu(TypedDict, total=False):
    model: Any


class Gpu(TypedDict, total=False):
    name: Required[str]


class Environment(TypedDict, total=False):
    host: str
    cpu: Cpu
    gpu: Gpu | None


class Sample(TypedDict, total=False):
    fingerprint: Any  # results on the same sample (the same fingerprint) can be paired


class RecordedSpec(TypedDict, total=False):
    """The job spec as run, as far as collect reads it: which task, the baseline, the
    tolerances."""

    task: str
    baseline: str | None
    tolerances: dict[str, float | None] | None


@dataclass(frozen=True)
class JobRecord:
    """What collect takes from a result's recorded spec, checked as the result was read."""

    task: str | None  # None: a result older than tasks, a classifier's
    baseline: str | None
    tolerances: dict[str, float | None]


# ---------------------------------------------------------------------------------------------
# The weight analysis (runner/analysis.py), as far as the report reads it.


class LayerRow(TypedDict, total=False):
    layer: str
    layer_type: Required[str]
    depth: Required[int | None]
    sqnr_db: Required[float | None]
    output_sqnr_db: float | None
    # The FP32 input the output error was measured on (analysis.input_outliers); absent in
    # results written before it was measured, and where the forward never reached the layer.
    input_absmax: float | None
    input_outlier_ratio: float | None
    input_outlier_columns: int | None
    input_top_columns: list[int] | None
    input_rounding_sqnr_db: float | None


class DepthRow(TypedDict, total=False):
    depth: Required[int | None]
    mean_sqnr_db: float | None


class Overall(TypedDict, total=False):
    mean_sqnr_db: float | None


class Summary(TypedDict, total=False):
    by_depth: list[DepthRow] | None
    overall: Overall | None


def _edges_around_counts(histogram: dict) -> str | None:
    if len(histogram["edges"]) == len(histogram["counts"]) + 1:
        return None
    return "expected one edge more than counts"


class Histogram(TypedDict):
    edges: list[float]
    counts: list[float]
    n_layers: int
    n_weights: int
    min: float
    max: float


class Histograms(TypedDict, total=False):
    by_layer_type: dict[str, Annotated[Histogram, _edges_around_counts]] | None


class Grid(TypedDict, total=False):
    values: Required[list[float]]
    granularity: Required[str]


class Analysis(TypedDict, total=False):
    layers: list[LayerRow] | None
    summary: Summary | None
    histograms: Histograms | None
    grids: dict[str, Grid | None] | None
    outlier_columns: dict[str, list[Any]] | None
    error: NotRequired[str]  # the analysis failed: why


# ---------------------------------------------------------------------------------------------
# The records.


@dataclass
class Latency(Record):
    """metrics.latency_ms: the distribution of per-pass latencies (measure.latency_stats) and how
    the clock ran."""

    mean: float | None = None
    median: float | None = None
    std: float | None = None
    p90: float | None = None
    p99: float | None = None
    min: float | None = None
    max: float | None = None
    n: int | None = None
    cv: float | None = None
    median_ci95: Annotated[list[float], length(2, "an interval")] | None = None
    repeat_cv: float | None = None
    repeat_n: int | None = None
    preemptions_per_s: float | None = None
    clock_started_at: str | None = None
    clock_s: float | None = None
    timing_lock_wait_s: float | None = None

    @classmethod
    def from_values(cls, seconds: list[float]) -> Latency:
        """The statistics of per-pass latencies given in seconds."""
        return cls.from_json(latency_stats(seconds))


@dataclass
class Metrics(Record):
    """A result's metrics: what every variant measures, and in `task` what its task measured
    (empty when it did not run). In the JSON they are one object: the task's keys among the
    others, in the order they were measured."""

    model_size_mib: float | None = None
    # What an output layer's own copy adds to model_size_mib where quantization untied it from
    # the input embedding the checkpoint ties it to; absent otherwise (runner/machine.py).
    untied_output_mib: float | None = None
    latency_ms: Latency | None = None
    throughput_sps: float | None = None
    peak_rss_mib: float | None = None
    peak_cuda_mib: float | None = None
    memory_phases: dict | None = None
    memory_phases_reset: bool | None = None
    load_s: float | None = None
    quantize_s: float | None = None
    # A calibrated precision's pass over its calibration set, before it quantizes (never timed
    # in latency).
    calibrate_s: float | None = None
    compile_s: float | None = None  # a compiled variant's first pass, which compiles it
    # A compiled variant's graphs compiled in its first pass, in warm-up and while the clock ran
    # (0 where warm-up met every shape), graph breaks and cache hits (runner/worker.py).
    compilation: dict | None = None
    # The task's own metrics by name, as its declarations (Task.metrics) say them.
    task: dict[str, Any] = bookkeeping(default_factory=dict)

    NESTED: ClassVar[dict[str, type[Record]]] = {"latency_ms": Latency}

    @classmethod
    def from_json(cls, data: dict, task_metrics: tuple[str, ...] = ()) -> Self:
        """The record of a metrics object; the keys named in task_metrics go into `task`."""
        metrics = super().from_json({k: v for k, v in data.items() if k not in task_metrics})
        metrics.task = {k: v for k, v in data.items() if k in task_metrics}
        metrics.key_order = tuple(data)
        return metrics

    def keys(self) -> list[str]:
        return super().keys() + [key for key in self.task if key not in (self.key_order or ())]

    def json_value(self, key: str) -> Any:
        return self.task[key] if key in self.task else super().json_value(key)

    def value(self, name: str) -> Any:
        """A metric by name, every variant's or the task's (None where it was not measured)."""
        if name in self.task:
            return self.task[name]
        return getattr(self, name) if name in self.schema().hints else self.extra.get(name)

    @property
    def latency(self) -> Latency:
        """latency_ms, or a latency with nothing measured."""
        return self.latency_ms or Latency()


@dataclass
class Result(Record):
    """One variant's result. Read a file with results.load_result (a dict with read_result);
    write one with results.write_result. traceback, analysis, predictions and wall_s appear in a
    file only when present."""

    schema_version: int | None = None
    job: str = ""
    variant: str = ""
    precision: str = ""
    device: str = ""
    status: str = ""
    error: str | None = None
    warnings: list[Any] | None = field(default_factory=list)
    metrics: Metrics = field(default_factory=Metrics)
    settings: dict = field(default_factory=dict)
    environment: Environment = field(default_factory=dict)
    spec_hash: str | None = None
    spec: RecordedSpec | None = None
    sample: Sample | None = None
    model: dict | None = None
    repeat: int | None = None
    started_at: str | None = None
    ended_at: str | None = None
    analysis: Analysis | None = None
    # The task's per-sample record (Task.predictions), or the JSON object where the task is not
    # known here.
    predictions: Any = None
    traceback: str | None = None
    wall_s: float | None = None
    file: Path | None = bookkeeping(default=None)  # the file it was read from

    NESTED: ClassVar[dict[str, type[Record]]] = {"metrics": Metrics}
    ALWAYS: ClassVar[tuple[str, ...]] = (
        *("schema_version", "job", "variant", "precision", "device", "status", "error"),
        *("warnings", "metrics", "settings", "environment", "spec_hash", "spec", "sample"),
        *("model", "repeat", "started_at", "ended_at"),
    )

    @property
    def host(self) -> str | None:
        return (self.environment or {}).get("host")

    @property
    def fingerprint(self) -> str | None:
        """The evaluation sample's fingerprint: results on the same sample can be paired."""
        return (self.sample or {}).get("fingerprint")

    @property
    def job_record(self) -> JobRecord:
        """The task, baseline and tolerances of the job spec as run (checked as it was read)."""
        spec = self.spec if isinstance(self.spec, dict) else {}
        return JobRecord(spec.get("task"), spec.get("baseline"), spec.get("tolerances") or {})


def read_result(data: Any, task=None, file: Path | None = None) -> Result:
    """The typed result of a result's JSON, checked against the schema; task: the declaration of
    its job's task (runner/tasks: its metrics and predictions), None where it is not known here.
    Raises UnusableFile saying what is wrong."""
    check_result(data, task)
    result = Result.from_json(data)
    if task is not None:
        result.metrics = Metrics.from_json(data["metrics"], tuple(task.metric_hints()))
        if data.get("predictions") is not None:
            result.predictions = task.predictions.from_json(data["predictions"])
    result.file = file
    return result


def check_result(data: Any, task=None) -> None:
    """Raises UnusableFile saying why `data` is not a result this code reads."""
    if not isinstance(data, dict):
        raise UnusableFile(
            f"not a result: a JSON {json_kind(data)}, where a result is one JSON object"
        )
    missing = [key for key in REQUIRED if key not in data]
    if missing:
        raise UnusableFile(f"not a result: it has no {', '.join(missing)}")
    version = data["schema_version"]
    if version not in READABLE_SCHEMA_VERSIONS or isinstance(version, bool):
        raise UnusableFile(
            f"schema_version {version!r}: this quantbench reads schema_version "
            + ", ".join(map(str, READABLE_SCHEMA_VERSIONS))
            + " (a newer quantbench wrote it?)"
        )
    found = problem(data, result_fields(task))
    if found:
        raise UnusableFile(f"a malformed result: {found}")


def result_fields(task=None) -> Fields:
    """A result's schema, its task's part included where the task is known."""
    schema = fields_of(Result)
    metrics = fields_of(Metrics)
    if task is not None:
        metrics = metrics.with_hints(task.metric_hints())
    return Fields(
        {
            **schema.hints,
            "metrics": metrics,
            "predictions": (task.predictions if task is not None else Any) | None,
        },
        ("metrics",),
    )


# ---------------------------------------------------------------------------------------------
# The sensitivity study's file (runner/study/stage.py writes it, docs/sensitivity.md describes
# it): checked as a result is, by the same type hints, before `report` or `run --resume` reads it.

STUDY_SCHEMA_VERSION = 1
STUDY_STATUSES = ("ok", "failed", "skipped")


def _one_of(allowed: tuple[str, ...]):
    def rule(value: str) -> str | None:
        return None if value in allowed else f"{value!r} is none of {', '.join(allowed)}"

    return rule


class StudyMeasure(TypedDict, total=False):
    """A model measured against FP32's predictions (the groups' "only" and "all_but", the fully
    quantized model, the recipe's result): what report reads of it."""

    agreement: Required[float]
    flips: Required[int]
    mean_kl: Required[float | None]
    accuracy: float | None
    accuracy_fp32: float | None


class RankedGroup(TypedDict, total=False):
    rank: Required[int]
    group: Required[str]
    layers: Required[list[str]]
    only: Required[StudyMeasure]
    all_but: Required[StudyMeasure]
    weight_sqnr_db: float | None
    output_sqnr_db: float | None


class Recipe(TypedDict, total=False):
    kept: Required[list[str]]
    groups: Required[list[str]]
    met: Required[bool]
    result: Required[StudyMeasure]
    tolerance: dict | None


class StudySettings(TypedDict):
    precision: str
    device: str
    groups: str


class Study(TypedDict, total=False):
    kind: Required[str]
    schema_version: Required[int]
    job: Required[str]
    status: Required[Annotated[str, _one_of(STUDY_STATUSES)]]
    error: str | None
    spec_hash: str  # what --resume compares; a study without it is never kept
    sensitivity: Required[StudySettings]
    variant: Required[str]
    mixed_variant: Required[str]
    samples: int
    layers: int
    full: StudyMeasure
    ranking: list[RankedGroup]
    recipe: Recipe


# What an ok study holds beside the fields every study has: a failed one stops before them.
OK_STUDY_HOLDS = ("layers", "full", "ranking", "recipe")


def check_study(data: Any) -> None:
    """Raises UnusableFile saying why `data` is not a study this code reads. A study of another
    schema_version is only checked for its version: report says it is not shown."""
    if not isinstance(data, dict):
        raise UnusableFile(f"not a sensitivity study: a JSON {json_kind(data)}")
    if data.get("schema_version") != STUDY_SCHEMA_VERSION:
        return
    found = problem(data, Study)
    if found is None and data["status"] == "ok":
        missing = [key for key in OK_STUDY_HOLDS if data.get(key) is None]
        found = f"{missing[0]}: missing, in a study of status ok" if missing else None
    if found:
        raise UnusableFile(f"a malformed sensitivity study: {found}")
