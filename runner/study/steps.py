"""A sensitivity study's steps, as a worker runs them: one model load per step, many measurements.

The driver (runner/study/stage.py) sends three kinds of step, each a plain StudyWork value:

- "probe": the FP32 reference probabilities, the fully quantized model measured against them, its
  per-layer weight and output SQNR, the groups, and what one load and one accuracy pass cost;
- "groups": a share of the groups, each measured "only" and "all_but" (runner/study/ranking.py);
- "recipe": the greedy recipe over the ranking.

The FP32 model is loaded once per step; each measurement quantizes a copy of it (bitsandbytes,
which quantizes while loading, loads again). Accuracy only: nothing here is a latency measurement.
Like runner/worker.py this module imports no Ray; it runs in the step's own process.
"""

from __future__ import annotations

import copy
import os
import time
import warnings
from dataclasses import dataclass

import torch
import transformers

from runner import analysis, evaluate, machine, measure, models, progress
from runner.precisions import config_for
from runner.precisions.worker import REFERENCE, linear_names, quantized_model
from runner.study import ranking
from runner.work import StudyWork


@dataclass
class Loaded:
    """What a step shares between its measurements."""

    step: StudyWork
    model_class: type
    fp32: object  # the FP32 model every measurement quantizes a copy of
    view: (
        ranking.StudyView
    )  # the task's: the sample's batches, a model's outputs, compare with FP32
    load_s: float
    # A calibrated precision's fully quantized model: it calibrates and quantizes once per step.
    calibrated: object = None


def run_step(step: StudyWork) -> dict:
    """The step's outcome as JSON, with its wall time and where it ran. Raises on failure: the
    driver turns it into the study's error."""
    started = time.perf_counter()
    models.quiet_libraries()
    progress.start(f"{step.job} sensitivity {step.kind}")
    torch.set_num_threads(step.evaluation.threads or measure.available_cpus())
    torch.manual_seed(0)
    with progress.phase("load FP32"):
        loaded = load(step)
    with progress.phase(STEP_WORDS[step.kind]):
        outcome = {"probe": probe, "groups": groups, "recipe": recipe}[step.kind](loaded)
    outcome.update(
        load_s=round(loaded.load_s, 3),
        wall_s=round(time.perf_counter() - started, 3),
        host=machine.environment().get("host"),
        pid=os.getpid(),
    )
    return outcome


# How each kind of step is named in the progress lines.
STEP_WORDS = {
    "probe": "FP32 against the fully quantized model, per-layer SQNR",
    "groups": "groups measured only and all but",
    "recipe": "the greedy recipe over the ranking",
}


def load(step: StudyWork) -> Loaded:
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
    if loaded.step.precision.calibrated:
        return with_kept(calibrated_once(loaded), loaded.fp32, keep)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notice, once per measurement
        return quantized_copy(loaded, keep)


def quantized_copy(loaded: Loaded, keep: frozenset[str], calibration: list | None = None):
    step = loaded.step
    return quantized_model(
        step.precision,
        config_for(step.precision, step.settings),
        step.family.family_worker(),
        loaded.model_class,
        step.model_dir,
        step.study.device,
        keep,
        calibration,
        fp32=loaded.fp32,
    ).model


def calibrated_once(loaded: Loaded):
    """The calibrated precision's fully quantized model, made on the step's first use: calibration
    sees the whole FP32 model, and each method quantizes a layer from what it saw (GPTQ also from
    the layers before it, quantized), so a kept layer is the FP32 one put back."""
    if loaded.calibrated is None:
        rows = evaluate.calibration_batches(loaded.step, loaded.step.study.device)
        loaded.calibrated = quantized_copy(loaded, frozenset(), rows)
    return loaded.calibrated


def with_kept(quantized_full, fp32, keep: frozenset[str]):
    """A copy of the fully quantized model with the layers in keep as the FP32 model has them."""
    model = copy.deepcopy(quantized_full)
    for name in keep:
        model.set_submodule(name, copy.deepcopy(fp32.get_submodule(name)))
    return model


def study_of(loaded: Loaded, layers: tuple[str, ...]) -> ranking.Study:
    def evaluate_keep(keep: frozenset[str]):
        return loaded.view.outputs(quantized(loaded, keep))

    return ranking.Study(evaluate_keep, loaded.view.compare, layers)


def probe(loaded: Loaded) -> dict:
    """FP32's outputs (the view computed them), the fully quantized model against them, its
    layers' SQNR, the groups, and the cost of one quantization and one accuracy pass."""
    clock = time.perf_counter()
    full_model = quantized(loaded, frozenset())
    quantize_s = time.perf_counter() - clock
    clock = time.perf_counter()
    full_outputs = loaded.view.outputs(full_model)
    pass_s = time.perf_counter() - clock
    config = config_for(loaded.step.precision, loaded.step.settings)
    family = loaded.step.family.family_worker()
    layers = tuple(
        name
        for name in linear_layers(loaded.fp32)
        if family.is_quantized(config, full_model.get_submodule(name))
    )
    groups = {
        group: [name for name in names if name in layers]
        for group, names in study_groups(loaded.fp32, loaded.step.study.groups).items()
    }
    return {
        "reference": loaded.view.reference_json,
        "layers": list(layers),
        "linear_layers": len(linear_layers(loaded.fp32)),
        "groups": {group: names for group, names in groups.items() if names},
        "full": {"kept": 0, **loaded.view.compare(full_outputs)},
        "layer_sqnr": layer_sqnr(loaded, full_model),
        "fp32_pass_s": round(loaded.view.fp32_pass_s, 3),
        "quantize_s": round(quantize_s, 3),
        "pass_s": round(pass_s, 3),
    }


def layer_sqnr(loaded: Loaded, full_model) -> dict[str, dict]:
    """Layer -> the fully quantized model's weight and output SQNR (dB; None where no error)."""

    family = loaded.step.family.family_worker()
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
    measured = []
    with progress.phase("groups", len(step.groups), "groups") as counted:
        for group, names in step.groups.items():
            measured.append(ranking.run_group(study, group, names))
            counted.advance()
    return {"groups": measured}


def recipe(loaded: Loaded) -> dict:
    step = loaded.step
    study = study_of(loaded, step.layers)
    tolerance = ranking.Tolerance(**step.tolerance) if step.tolerance else ranking.Tolerance()
    found = ranking.recipe(
        step.ranking, step.full, lambda keep: ranking.measure(study, keep), tolerance=tolerance
    )
    return {"recipe": found}


def linear_layers(model) -> list[str]:
    """The module names of the model's nn.Linear layers, in order: what a study quantizes."""
    return linear_names(model)


def study_groups(model, how: str) -> dict[str, list[str]]:
    """The model's linear layers grouped as ranking.group_layers says."""
    return ranking.group_layers(linear_layers(model), how)
