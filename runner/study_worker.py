"""A sensitivity study's steps, as a worker runs them: one model load per step, many measurements.

The driver (runner/study.py) sends three kinds of step, each a plain StudyStep value:

- "probe": the FP32 reference probabilities, the fully quantized model measured against them, its
  per-layer weight and output SQNR, the groups, and what one load and one accuracy pass cost;
- "groups": a share of the groups, each measured "only" and "all_but" (runner/sensitivity.py);
- "recipe": the greedy recipe over the ranking.

The FP32 model is loaded once per step; each measurement quantizes a copy of it (bitsandbytes,
which quantizes while loading, loads again). Accuracy only: nothing here is a latency measurement.
Like runner/worker.py this module imports no Ray, and no torch until a step runs: the driver
imports it for StudyStep.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field

import transformers

from runner import measure, models
from runner import sensitivity as S
from runner.precisions import PRECISIONS, config_for, worker_of
from runner.spec import EvaluationSpec, SensitivitySpec
from runner.tasks import Task


@dataclass
class StudyStep:
    """Everything one step needs, with no file to read but the prepared model folder."""

    kind: str  # probe | groups | recipe
    job: str
    study: SensitivitySpec
    model_dir: str
    texts: list[str]
    evaluation: EvaluationSpec  # its batch size and order; no pass is timed
    settings: dict  # every precision family's settings, flat (JobSpec.settings)
    max_length: int
    task: Task  # the job's task: its worker says what the study measures a model by
    task_config: object = None  # the task's configuration from its plan
    # FP32's outputs as the probe hands them on (a classifier's probabilities [samples][labels]);
    # None in the probe, and for a task whose view computes them in every step.
    reference: list | None = None
    layers: tuple[str, ...] = ()  # the linear layers the precision quantizes (the probe's)
    groups: dict[str, list[str]] = field(default_factory=dict)  # kind "groups": this step's share
    ranking: list[dict] = field(default_factory=list)  # kind "recipe"
    full: dict | None = None  # kind "recipe": the fully quantized model's measure
    tolerance: dict | None = None  # kind "recipe": sensitivity.Tolerance's fields


@dataclass
class Loaded:
    """What a step shares between its measurements."""

    step: StudyStep
    model_class: type
    fp32: object  # the FP32 model every measurement quantizes a copy of
    view: S.StudyView  # the task's: the sample's batches, a model's outputs, compare with FP32
    load_s: float


def run_step(step: StudyStep) -> dict:
    """The step's outcome as JSON, with its wall time and where it ran. Raises on failure: the
    driver turns it into the study's error."""
    import torch

    started = time.perf_counter()
    models.quiet_libraries()
    torch.set_num_threads(step.evaluation.threads or measure.available_cpus())
    torch.manual_seed(0)
    loaded = load(step)
    outcome = {"probe": probe, "groups": groups, "recipe": recipe}[step.kind](loaded)
    outcome.update(
        load_s=round(loaded.load_s, 3),
        wall_s=round(time.perf_counter() - started, 3),
        host=measure.environment().get("host"),
        pid=os.getpid(),
    )
    return outcome


def load(step: StudyStep) -> Loaded:
    import torch

    clock = time.perf_counter()
    model_class = getattr(transformers, step.task.model_class)
    fp32 = model_class.from_pretrained(step.model_dir, dtype=torch.float32)
    fp32 = fp32.to(step.study.device).eval()
    load_s = time.perf_counter() - clock
    view = step.task.worker().study_view(step, fp32)
    return Loaded(step, model_class, fp32, view, load_s)


def quantized(loaded: Loaded, keep: frozenset[str]):
    """The model as the precision quantizes it, every linear layer but keep: a copy of the FP32
    model quantized, or loaded again where the family quantizes while loading (bitsandbytes)."""
    from runner.precisions.worker import quantized_model  # torch: not where the driver imports

    step = loaded.step
    precision = PRECISIONS[step.study.precision]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notice, once per measurement
        return quantized_model(
            precision,
            config_for(precision, step.settings),
            loaded.model_class,
            step.model_dir,
            step.study.device,
            keep,
            fp32=loaded.fp32,
        ).model


def study_of(loaded: Loaded, layers: tuple[str, ...]) -> S.Study:
    def evaluate_keep(keep: frozenset[str]):
        return loaded.view.outputs(quantized(loaded, keep))

    return S.Study(evaluate_keep, loaded.view.compare, layers)


def probe(loaded: Loaded) -> dict:
    """FP32's outputs (the view computed them), the fully quantized model against them, its
    layers' SQNR, the groups, and the cost of one quantization and one accuracy pass."""
    clock = time.perf_counter()
    full_model = quantized(loaded, frozenset())
    quantize_s = time.perf_counter() - clock
    clock = time.perf_counter()
    full_outputs = loaded.view.outputs(full_model)
    pass_s = time.perf_counter() - clock
    precision = PRECISIONS[loaded.step.study.precision]
    config = config_for(precision, loaded.step.settings)
    layers = tuple(
        name
        for name in S.linear_layers(loaded.fp32)
        if worker_of(precision).is_quantized(config, full_model.get_submodule(name))
    )
    groups = {
        group: [name for name in names if name in layers]
        for group, names in S.study_groups(loaded.fp32, loaded.step.study.groups).items()
    }
    return {
        "reference": loaded.view.reference_json,
        "layers": list(layers),
        "groups": {group: names for group, names in groups.items() if names},
        "full": {"kept": 0, **loaded.view.compare(full_outputs)},
        "layer_sqnr": layer_sqnr(loaded, full_model),
        "fp32_pass_s": round(loaded.view.fp32_pass_s, 3),
        "quantize_s": round(quantize_s, 3),
        "pass_s": round(pass_s, 3),
    }


def layer_sqnr(loaded: Loaded, full_model) -> dict[str, dict]:
    """Layer -> the fully quantized model's weight and output SQNR (dB; None where no error)."""
    from runner import analysis  # torch: not where the driver imports
    from runner.precisions.worker import REFERENCE

    family = worker_of(loaded.step.study.precision)
    weights = analysis.layer_weight_errors(
        analysis.dequantized_linear_weights(loaded.fp32, REFERENCE),
        analysis.dequantized_linear_weights(full_model, family),
    )
    outputs = analysis.layer_output_errors(loaded.fp32, full_model, loaded.view.batches)
    return {
        row["layer"]: {
            "weight_sqnr_db": row.get("sqnr_db"),
            "output_sqnr_db": outputs.get(row["layer"], {}).get("output_sqnr_db"),
        }
        for row in weights
    }


def groups(loaded: Loaded) -> dict:
    """This step's groups, each measured "only" and "all_but"."""
    step = loaded.step
    study = study_of(loaded, step.layers)
    return {"groups": [S.run_group(study, g, names) for g, names in step.groups.items()]}


def recipe(loaded: Loaded) -> dict:
    step = loaded.step
    study = study_of(loaded, step.layers)
    tolerance = S.Tolerance(**step.tolerance) if step.tolerance else S.Tolerance()
    found = S.recipe(
        step.ranking, step.full, lambda keep: S.measure(study, keep), tolerance=tolerance
    )
    return {"recipe": found}
