"""Work items: what a worker is asked to do, as plain values that travel to a node.

Every piece of work for a job has one shape (`Work`): the job's inputs (its sample's texts, its
task and the task's configuration from the plan, its evaluation and precision settings) and the
prepared model it starts from; and what is asked: one variant measured (VariantWork), the model
fine-tuned (FinetuneWork) or one step of a sensitivity study (StudyWork). runner/dispatch.py ships
any of them, with its model, to a node that can run it; the node runs it in a process of its own
with the function its class names (`runs`). Plain dataclasses: no torch, no Ray.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from runner import measure
from runner.calibration import CalibrationSet
from runner.job import EvaluationSpec, FinetuneSpec, SensitivitySpec, Variant
from runner.precisions import Family, Precision
from runner.schema import SCHEMA_VERSION, Result
from runner.tasks import Task


@dataclass(kw_only=True)
class Work:
    """What every piece of work for a job carries, with no file to read but the model folder."""

    job: str
    model_dir: str  # the prepared model it starts from (on the node: the node's copy)
    texts: list[str]  # the evaluation sample's texts (a fine-tune: its training texts)
    evaluation: EvaluationSpec
    settings: dict  # every precision family's settings, flat (JobSpec.settings)
    max_length: int
    task: Task  # the job's task: in the process that runs the work, it resolves its worker
    task_config: Any = None  # the task's configuration from its plan (a classifier's labels)
    calibration: CalibrationSet | None = None  # the rows a calibrated precision observes

    # "module:function" that runs it on the node, in a process of its own.
    runs: ClassVar[str] = ""


@dataclass(kw_only=True)
class VariantWork(Work):
    """One variant measured: one run of it (of the evaluation's repeats)."""

    variant: Variant
    family: Family  # the family of the variant's precision: its process resolves the worker
    spec_hash: str
    spec_as_run: dict = field(default_factory=dict)
    sample: dict = field(default_factory=dict)  # where the sample came from, for the record
    model_info: dict = field(default_factory=dict)
    repeat: int = 0  # which of the evaluation's repeats this run is
    # The FP32 reference file's bytes for the job and device (runner/fp32_reference.py), when the
    # task computes one: the variant reads it instead of computing FP32's side itself.
    reference: bytes | None = None

    runs: ClassVar[str] = "runner.worker:run_variant_in_own_process"

    @property
    def device(self) -> str:
        return self.variant.device

    @property
    def precision(self) -> Precision:
        return self.family.precision(self.variant.precision)


@dataclass(kw_only=True)
class ReferenceWork(VariantWork):
    """The FP32 reference of a job on one device, computed once before its variants: a variant's
    inputs (variant: the FP32 variant on that device) and the file stored for it, if any."""

    stored: bytes | None = None

    runs: ClassVar[str] = "runner.tasks.causal_lm.reference:run_reference"


@dataclass(kw_only=True)
class FinetuneWork(Work):
    """The job's model trained before anything is quantized, into the model cache under `key`."""

    key: str  # the cache key of the fine-tuned model
    base_key: str
    labels: list[str]  # each text's answer (a classifier's label name); [] for a causal LM
    label_names: list[str]  # the fine-tuned head's id2label, in id order
    finetune: FinetuneSpec
    device: str = "cpu"  # where dispatch places it: a GPU node where the cluster has one
    send_back: bool = False  # the trained folder comes back: the driver may not share the disk

    runs: ClassVar[str] = "runner.finetune.train:run_finetune"


@dataclass(kw_only=True)
class StudyWork(Work):
    """One step of a sensitivity study (runner/study/steps.py): probe, groups or recipe."""

    kind: str  # probe | groups | recipe
    study: SensitivitySpec
    family: Family  # the family of the study's precision: the step resolves its worker
    # FP32's outputs as the probe hands them on (a classifier's probabilities [samples][labels]);
    # None in the probe, and for a task whose view computes them in every step.
    reference: list | None = None
    layers: tuple[str, ...] = ()  # the linear layers the precision quantizes (the probe's)
    groups: dict[str, list[str]] = field(default_factory=dict)  # kind "groups": this share
    ranking: list[dict] = field(default_factory=list)  # kind "recipe"
    full: dict | None = None  # kind "recipe": the fully quantized model's measure
    tolerance: dict | None = None  # kind "recipe": study.ranking.Tolerance's fields

    runs: ClassVar[str] = "runner.study.steps:run_step"

    @property
    def device(self) -> str:
        return self.study.device

    @property
    def precision(self) -> Precision:
        return self.family.precision(self.study.precision)


def base_result(work: VariantWork, status: str, error: str | None = None) -> Result:
    """The fields every result has, whatever became of the variant."""
    return Result(
        schema_version=SCHEMA_VERSION,
        job=work.job,
        variant=work.variant.id,
        precision=work.variant.precision,
        device=work.variant.device,
        status=status,
        error=error,
        spec_hash=work.spec_hash,
        spec=work.spec_as_run,
        sample=work.sample,
        model=work.model_info,
        repeat=work.repeat,
        started_at=measure.now(),
    )
