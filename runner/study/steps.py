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

import os
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import psutil
import torch
import transformers

from runner import analysis, evaluate, machine, measure, models, progress
from runner.precisions import config_for
from runner.precisions.worker import (
    REFERENCE,
    files_read_not_mapped,
    linear_names,
    quantized_model,
)
from runner.study import cost, ranking, replay
from runner.work import StudyWork


@dataclass
class Loaded:
    """What a step shares between its measurements: the FP32 model and the fully quantized one,
    each recorded block by block (runner/study/replay.py). A measurement swaps the few layers it
    differs in between the two, for one pass."""

    step: StudyWork
    model_class: type
    fp32: object
    view: ranking.StudyView  # the task's: the sample's batches, a model's outputs, compare
    load_s: float
    full: object = None  # the fully quantized model
    quantize_s: float = 0.0
    layers: tuple[str, ...] = ()  # the linear layers the precision quantizes
    recordings: dict = field(default_factory=dict)  # "fp32" | "full" -> replay.Recording
    pass_s: dict = field(default_factory=dict)  # "fp32" | "full" -> one whole pass, s


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
    """The FP32 model, the task's view, and the fully quantized model; in a group or recipe step
    (which knows the study's layers) both models recorded."""
    clock = time.perf_counter()
    model_class = getattr(transformers, step.task.model_class)
    with files_read_not_mapped():  # a mapped file's touched pages would count in RSS beside it
        fp32 = model_class.from_pretrained(step.model_dir, dtype=torch.float32)
    fp32 = fp32.to(step.study.device).eval()
    load_s = time.perf_counter() - clock
    view = step.task.worker().study_view(step, fp32)
    loaded = Loaded(step, model_class, fp32, view, load_s)
    clock = time.perf_counter()
    loaded.full = fully_quantized(loaded)
    loaded.quantize_s = time.perf_counter() - clock
    if step.layers:
        record(loaded, step.layers)
    return loaded


def fully_quantized(loaded: Loaded):
    """Every layer quantized as the precision does: a copy of the FP32 model quantized, or loaded
    again where the family quantizes while loading (bitsandbytes), or calibrated and quantized."""
    if loaded.step.precision.calibrated:
        rows = evaluate.calibration_batches(loaded.step, loaded.step.study.device)
        return quantized_copy(loaded, frozenset(), rows)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notice
        return quantized_copy(loaded, frozenset())


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


def record(loaded: Loaded, layers: tuple[str, ...]) -> dict:
    """Both models' passes recorded block by block, each timed; the fully quantized model's
    outputs (its pass is the probe's measurement of it)."""
    loaded.layers = tuple(layers)
    available = psutil.virtual_memory().available
    outputs = {}
    for which, model in (("fp32", loaded.fp32), ("full", loaded.full)):
        clock = time.perf_counter()
        loaded.recordings[which], outputs[which] = replay.record_blocks(
            model, layers, loaded.view.outputs, available
        )
        loaded.pass_s[which] = time.perf_counter() - clock
    return outputs["full"]


@contextmanager
def mixed(loaded: Loaded, keep: frozenset[str]):
    """The model quantized all but keep, for one pass: the FP32 model with the quantized layers
    swapped in, or the fully quantized one with the kept layers swapped back, whichever swaps
    fewer; the blocks before the first swapped layer replayed. Put back on leaving."""
    which, swapped = cost.swap(loaded.layers, keep)
    base, donor = (loaded.fp32, loaded.full) if which == "fp32" else (loaded.full, loaded.fp32)
    with replay.swapped_and_replayed(base, donor, swapped, loaded.recordings[which]) as model:
        yield model


def measured_outputs(loaded: Loaded, keep: frozenset[str]):
    with mixed(loaded, keep) as model:
        return loaded.view.outputs(model)


def study_of(loaded: Loaded, layers: tuple[str, ...]) -> ranking.Study:
    return ranking.Study(partial(measured_outputs, loaded), loaded.view.compare, layers)


def probe(loaded: Loaded) -> dict:
    """FP32's outputs (the view computed them), the fully quantized model against them, its
    layers' SQNR, the groups, and what the rest will cost (cost_model)."""
    config = config_for(loaded.step.precision, loaded.step.settings)
    family = loaded.step.family.family_worker()
    layers = tuple(
        name
        for name in linear_layers(loaded.fp32)
        if family.is_quantized(config, loaded.full.get_submodule(name))
    )
    full_outputs = record(loaded, layers)
    groups = {
        group: [name for name in names if name in layers]
        for group, names in study_groups(loaded.fp32, loaded.step.study.groups).items()
    }
    clock = time.perf_counter()
    full = {"kept": 0, **loaded.view.compare(full_outputs)}
    compare_s = time.perf_counter() - clock
    return {
        "reference": loaded.view.reference_json,
        "layers": list(layers),
        "linear_layers": len(linear_layers(loaded.fp32)),
        "groups": {group: names for group, names in groups.items() if names},
        "full": full,
        "layer_sqnr": layer_sqnr(loaded, loaded.full),
        "fp32_pass_s": round(loaded.view.fp32_pass_s, 3),
        "quantize_s": round(loaded.quantize_s, 3),
        "pass_s": round(loaded.pass_s["full"], 3),
        "cost_model": cost_model(loaded, compare_s),
    }


def cost_model(loaded: Loaded, compare_s: float) -> dict:
    """What predicting a measurement's time needs: each base model's whole pass and its pass with
    every block replayed (the head alone), s; the blocks; each layer's leading blocks a swap of it
    can replay; and one comparison with FP32."""
    heads = {}
    for which, base in (("fp32", loaded.fp32), ("full", loaded.full)):
        recording = loaded.recordings[which]
        clock = time.perf_counter()
        with replay.swapped_and_replayed(base, base, [], recording, start=len(recording.blocks)):
            loaded.view.outputs(base)
        heads[which] = round(time.perf_counter() - clock, 3)
    recording = loaded.recordings["fp32"]
    return {
        "pass_s": {which: round(seconds, 3) for which, seconds in loaded.pass_s.items()},
        "head_s": heads,
        "blocks": 0 if recording.dropped else len(recording.blocks),
        "starts": {name: recording.start([name]) for name in loaded.layers},
        "compare_s": round(compare_s, 3),
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
