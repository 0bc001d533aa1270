"""A job as plain dataclasses: what runner/spec.py reads from a job file, every path absolute.

A job names a model, a dataset, evaluation settings, the variants to run (precision x device) and
the baseline, and may fine-tune first and take a precision apart (a sensitivity study). No
reading and no checking here: runner/spec.py reads and checks, runner/plan.py checks against the
files. Plain Python.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class FileRef:
    """One file: a path, or a file shipped inside an installed package ("pkg/sub/file")."""

    path: Path | None = None
    package: str | None = None

    def describe(self) -> str:
        return f"package:{self.package}" if self.package else str(self.path)


@dataclass(frozen=True)
class FileSource:
    """A file given whole or in chunks that join into it (a registry's size limit splits large
    files), with the sha256 the joined file must have where the job gives one."""

    chunks: tuple[FileRef, ...]
    sha256: str | None = None

    def describe(self) -> str:
        if len(self.chunks) == 1:
            return self.chunks[0].describe()
        return f"{len(self.chunks)} chunks from {self.chunks[0].describe()}"


@dataclass(frozen=True)
class ModelSource:
    """Where weights (or a tokenizer) come from: exactly one of these is set."""

    hub: str | None = None  # a Hugging Face hub id, e.g. "bert-base-uncased"
    path: Path | None = None  # a local folder saved with save_pretrained
    package: str | None = (
        None  # "python_package/sub/folder": files shipped inside an installed package
    )
    config: dict | None = None  # an inline architecture: randomly initialised weights of this shape
    revision: str | None = None  # hub revision
    # A llama.cpp GGUF file: its weights dequantized to FP32, its tokenizer (runner/gguf_files.py)
    gguf: FileSource | None = None
    # A zip of a save_pretrained folder, unpacked once into the cache (runner/model_files.py)
    archive: FileSource | None = None

    def describe(self) -> str:
        if self.hub:
            return f"hub:{self.hub}" + (f"@{self.revision}" if self.revision else "")
        if self.path:
            return f"path:{self.path}"
        if self.package:
            return f"package:{self.package}"
        if self.gguf:
            return f"gguf:{self.gguf.describe()}"
        if self.archive:
            return f"archive:{self.archive.describe()}"
        return f"inline {self.config.get('model_type')} config"


@dataclass(frozen=True)
class SampleSpec:
    n: int | None = None
    fraction: float | None = None
    seed: int = 0


@dataclass(frozen=True)
class DatasetSpec:
    format: str
    path: Path | None  # the file (csv, tsv, jsonl, parquet)
    files: dict[str, Path] | None  # format "lines": label value -> file with one text per line
    header: bool
    text_column: str | int
    label_column: str | int | None  # None: a task whose answers are not labels reads text alone
    sample: SampleSpec
    max_length: int
    field: str = "dataset"  # where it is in the job file: dataset, or finetune.train
    # What the job's task read of its own fields of `dataset:` (Task.dataset_fields: a
    # classifier's label map); None for the training data and a task without any.
    task_fields: Any = None


@dataclass(frozen=True)
class EvaluationSpec:
    batch_size: int = 1
    warmup_passes: int = 5
    timed_passes: int = 50
    min_time_s: float = 0.0
    threads: int | None = None  # None: every CPU the variant's worker was given
    weight_analysis: bool = True  # per-layer weight error against FP32, computed after timing
    batch_order: str = (
        "sample"  # sample: batches in sample order; length: shortest sentences first, less padding
    )
    latency_mode: str = (
        "dataset"  # dataset: the sample's batches are timed; fixed: one batch of fixed_shape
    )
    fixed_shape: tuple[int, int] | None = (
        None  # (batch size, sequence length) for latency_mode fixed
    )
    repeats: int = 1  # runs of each variant, each in a fresh process
    # False: every variant eager; True: every variant through torch.compile; "both": each variant
    # twice, eager and compiled. Where it is false, a variant id may end in -compiled instead.
    compile: bool | str = False


@dataclass(frozen=True)
class FinetuneSpec:
    """Train a classification head and the encoder before anything is quantized."""

    train: DatasetSpec | None  # None: the job's dataset minus the evaluation sample
    epochs: float = 1.0
    learning_rate: float = 5e-5
    batch_size: int = 32
    max_samples: int | None = None
    seed: int = 0
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1


DEFAULT_CALIBRATION_TOKENS = 512


@dataclass(frozen=True)
class CalibrationSpec:
    """The rows a calibrated precision (static INT8, SmoothQuant, AWQ, GPTQ) observes before it
    quantizes: never rows of the evaluation sample, unless allow_overlap."""

    dataset: DatasetSpec | None = None  # None: the job's dataset, rows outside the sample
    samples: int = 128  # rows
    # Tokens per row, at most; None: DEFAULT_CALIBRATION_TOKENS or the model's position table,
    # whichever is shorter.
    max_length: int | None = None
    seed: int = 0
    allow_overlap: bool = False


# A variant id's tail when the variant runs through torch.compile.
COMPILED_SUFFIX = "-compiled"
# <precision>-mixed-<device>: a sensitivity study's recipe, some layers in FP32.
MIXED = "mixed"


@dataclass(frozen=True)
class Variant:
    precision: str
    device: str
    compiled: bool = False  # run through torch.compile (runner/worker.py compile_model)
    # Linear layers left in FP32 (module names): a sensitivity study's recipe, never a job's own
    keep: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        if self.keep:
            return mixed_id(self.precision, self.device)
        return f"{self.precision}-{self.device}" + (COMPILED_SUFFIX if self.compiled else "")


def mixed_id(precision: str, device: str) -> str:
    return f"{precision}-{MIXED}-{device}"


GROUPINGS = ("layer", "type", "depth")  # how a sensitivity study groups the linear layers


@dataclass(frozen=True)
class SensitivitySpec:
    """sensitivity: which precision's layers to take apart, on which device, grouped how."""

    precision: str
    device: str
    groups: str = "layer"

    @property
    def variant_id(self) -> str:
        """The fully quantized variant the study takes apart."""
        return Variant(self.precision, self.device).id

    @property
    def mixed_id(self) -> str:
        return mixed_id(self.precision, self.device)


@dataclass(frozen=True)
class JobSpec:
    file: Path
    name: str
    model: ModelSource
    tokenizer: ModelSource | None
    dataset: DatasetSpec
    evaluation: EvaluationSpec
    # Settings that change results; recorded in every result so runs can be compared: every
    # precision family's keys side by side, flat as a job writes them, in FAMILIES order
    # (runner/precisions/; a precision's config takes its own from them: config_for).
    settings: dict
    variants: tuple[Variant, ...]
    baseline: str
    seed: int
    finetune: FinetuneSpec | None = None
    calibration: CalibrationSpec | None = None
    tolerances: dict[str, float] = field(default_factory=dict)
    task: str = "classification"  # a name in runner.tasks.TASKS
    task_config: Any = None  # the task's own job fields, as it read them (Task.read_config)
    sensitivity: SensitivitySpec | None = None
    # The pairs of a precisions x devices product that cannot run, left out: (variant id, why).
    left_out: tuple[tuple[str, str], ...] = ()
    raw: dict = field(
        default_factory=dict, repr=False
    )  # the YAML as read, kept in every result as "the spec as run"
