"""The seams, proved from outside runner/: a precision family and a task declared in this file,
registered through the registries, each run through `quantbench run` end to end (an embedded Ray
cluster, variants in processes of their own), then `collect` and `report`.

The family, "toy": every linear layer's weights rounded to 2^(bits-1) - 1 levels per tensor,
computed in float (fake quantization), `settings.toy_round_bits` its own setting. The task,
"toy-confidence": a classifier's texts read without labels, scored by the mean probability of its
top label. Nothing under runner/ names either: the work items carry their declarations, so the
variants' processes import this module (tests/ on their PYTHONPATH) and resolve the workers from
it by name.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from conftest import REPO, RT_POLARITY, run_cli, write_job
from matplotlib.figure import Figure

from runner import evaluate, precisions, tasks
from runner.analysis import layer_matrix, make_grid
from runner.precisions import Family, Precision
from runner.precisions.worker import FamilyWorker
from runner.records import Record
from runner.report_figures import Plot, TaskPlots
from runner.tasks.task import Compared, Metric, Row, Scored, Targets, Task, TaskWorker, metric

# ---------------------------------------------------------------------------------------------
# A precision family: its declaration (what a job says) and its worker (what a variant runs).


@dataclass(frozen=True)
class ToyRound:
    toy_round_bits: int = 4  # the job's settings.toy_round_bits


def read_toy_settings(reader) -> dict:
    bits = reader.get("toy_round_bits", int, 4)
    if not 2 <= bits <= 8:
        raise reader.error("toy_round_bits", bits, "allowed: 2 to 8")
    return {"toy_round_bits": bits}


class ToyRoundWorker(FamilyWorker):
    """Loads FP32 (the protocol's default), then rounds every linear layer's weight in place."""

    def quantize(self, model, precision, config, keep=frozenset(), calibration=None):
        levels = 2 ** (config.toy_round_bits - 1) - 1
        with torch.no_grad():
            for name, module in model.named_modules():
                if isinstance(module, torch.nn.Linear) and name not in keep:
                    scale = module.weight.abs().max() / levels
                    module.weight.copy_(torch.round(module.weight / scale) * scale)
                    module.toy_rounded = True
        return model, {"method": "toy round to nearest, per tensor", "bits": config.toy_round_bits}

    def is_quantized(self, config, module) -> bool:
        return getattr(module, "toy_rounded", False)

    def grid(self, precision, config, weight):
        levels = 2 ** (config.toy_round_bits - 1) - 1
        w = layer_matrix(weight)
        codes = [k / levels for k in range(-levels, levels + 1)]
        scheme = f"{config.toy_round_bits}-bit symmetric, per tensor"
        return make_grid(precision.name, scheme, "tensor", codes, w.abs().max().reshape(1))


TOY_WORKER = ToyRoundWorker()
TOY_FAMILY = Family(
    "toy",
    (
        Precision(
            "toy-round", "toy", ("cpu",), "weights rounded per tensor, float matmul", ToyRound
        ),
    ),
    read_toy_settings,
    worker=f"{__name__}:TOY_WORKER",
)


# ---------------------------------------------------------------------------------------------
# A task: its declaration, its worker and its plot.


@dataclass
class ConfidencePredictions(Record):
    confidence: list[float] | None = None  # each text's top-label probability, in sample order


def _confidence_change(result, stats: dict) -> float | None:
    return stats.get("confidence_change")


class ToyConfidence(Task):
    name = "toy-confidence"
    model_class = "AutoModelForSequenceClassification"
    labelled = False
    metrics = (Metric("mean_confidence", float, higher_is_better=True),)
    predictions = ConfidencePredictions
    rows = (
        Row("mean confidence", metric("mean_confidence"), 4, carries_warnings=True),
        Row("confidence change", _confidence_change, 4, delta=False, signed=True),
    )
    worker_side = f"{__name__}:TOY_TASK_WORKER"
    plots = f"{__name__}:TOY_PLOTS"

    def plan(self, spec, job, config, rows, examples, train) -> Targets:
        return Targets(None, [f"toy-confidence: {len(examples)} texts, read without labels"])

    def headline(self, metrics) -> str:
        return f"mean confidence {metrics.value('mean_confidence') or 0:.4f}"

    def compare(self, result, baseline) -> Compared:
        mine = result.metrics.value("mean_confidence")
        theirs = baseline.metrics.value("mean_confidence") if baseline else None
        change = None if mine is None or theirs is None else mine - theirs
        return Compared({"confidence_change": change})


class ToyConfidenceWorker(TaskWorker):
    def batches(self, work):
        return evaluate.tokenized_sample(
            work.model_dir, work.texts, work.evaluation, work.max_length, work.variant.device
        )

    def read_output(self, output, batch) -> list[float]:
        top = torch.softmax(output.logits.float(), dim=-1).max(dim=-1).values
        return top.cpu().tolist()

    def non_finite(self, answers) -> int:
        return sum(not np.isfinite(a) for a in answers)

    def score(self, work, answers) -> Scored:
        metrics = {"mean_confidence": float(np.mean(answers))}
        return Scored(metrics, [], {"confidence": [round(a, 6) for a in answers]})


def plot_confidence(table) -> Figure | None:
    keys = [k for k in table.ok_columns() if table.results[k].metrics.value("mean_confidence")]
    if not keys:
        return None
    figure = Figure(figsize=(6, 3))
    ax = figure.subplots()
    ax.bar(keys, [table.results[k].metrics.value("mean_confidence") for k in keys])
    ax.set_ylabel("mean confidence")
    return figure


TOY_TASK = ToyConfidence()
TOY_TASK_WORKER = ToyConfidenceWorker()
TOY_PLOTS = TaskPlots(
    first=(
        Plot(
            "toy-confidence",
            "Mean confidence",
            "Each variant's mean top-label probability.",
            plot_confidence,
            "no ok result with a mean confidence",
        ),
    )
)


# ---------------------------------------------------------------------------------------------
# The tests.


@pytest.fixture
def toys(monkeypatch):
    """The toy family and task registered for one test, the registries as they were after it. The
    variants' processes import this module by name: tests/ goes on their PYTHONPATH."""
    saved = (dict(precisions.FAMILIES), dict(precisions.PRECISIONS), dict(tasks.TASKS))
    tests = str(REPO / "tests")
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")]))
    )
    precisions.register(TOY_FAMILY)
    tasks.register(TOY_TASK)
    yield
    for registry, before in zip((precisions.FAMILIES, precisions.PRECISIONS, tasks.TASKS), saved):
        registry.clear()
        registry.update(before)


def toy_job(model, task: str = "", variants: str = "[fp32-cpu, toy-round-cpu]") -> str:
    return f"""
name: toys
{task}
model: {{path: {model}}}
dataset:
  format: lines
  path: {RT_POLARITY}
  files: {{pos: rt-polarity.pos, neg: rt-polarity.neg}}
  {"" if task else "label_map: {pos: positive, neg: negative}"}
  sample: {{n: 16, seed: 0}}
  max_length: 32
evaluation: {{batch_size: 4, warmup_passes: 1, timed_passes: 4}}
settings: {{toy_round_bits: 3}}
variants: {variants}
"""


def test_a_family_declared_outside_runner_runs_through_run_collect_and_report(
    toys, capsys, tmp_path, tiny_model, ray_temp_dir
):
    job = write_job(tmp_path / "jobs", toy_job(tiny_model))
    results = tmp_path / "results"
    code, out, err = run_cli(
        capsys, "run", job, "--results", results, "--ray-temp-dir", ray_temp_dir
    )
    assert code == 0, out + err
    assert "toys toy-round-cpu" in out and "ok" in out.split("toy-round-cpu", 1)[1].split("\n")[0]
    written = json.loads((results / "toys" / "toy-round-cpu.json").read_text())
    assert written["settings"]["quantization"]["toy_round_bits"] == 3
    assert written["settings"]["bits"] == 3  # what its quantize recorded
    # The weight analysis read the rounded weights and drew the family's grid: 7 levels.
    analysis = written["analysis"]
    assert all(row["sqnr_db"] is not None for row in analysis["layers"])
    assert {len(grid["codes"]) for grid in analysis["grids"].values()} == {7}
    code, table, err = run_cli(capsys, "collect", results, "--format", "json")
    assert code == 0, err
    (found,) = json.loads(table)
    assert list(found["variants"]) == ["fp32-cpu", "toy-round-cpu"]
    toy = found["variants"]["toy-round-cpu"]
    assert toy["status"] == "ok" and toy["metrics"]["accuracy"] is not None
    code, out, err = run_cli(capsys, "report", results, "--out", tmp_path / "report.html")
    assert code == 0, err
    assert "toy-round-cpu" in (tmp_path / "report.html").read_text()
    assert (tmp_path / "report_figures" / "toys-histograms-toy-round-cpu.png").is_file()


def test_a_task_declared_outside_runner_runs_through_run_collect_and_report(
    toys, capsys, tmp_path, tiny_model, ray_temp_dir
):
    job = write_job(
        tmp_path / "jobs",
        toy_job(tiny_model, "task: toy-confidence", "[fp32-cpu, int8-dynamic-cpu, toy-round-cpu]"),
    )
    results = tmp_path / "results"
    code, out, err = run_cli(
        capsys, "run", job, "--results", results, "--ray-temp-dir", ray_temp_dir
    )
    assert code == 0, out + err
    assert "toy-confidence: 16 texts, read without labels" in out
    assert out.count("mean confidence 0.") == 3  # the task's headline, in every progress line
    code, table, err = run_cli(capsys, "collect", results)
    assert code == 0, err
    rows = {line.split("  ")[0]: line for line in table.splitlines()}
    assert "mean confidence" in rows and "confidence change" in rows
    code, out, err = run_cli(capsys, "report", results, "--out", tmp_path / "report.html")
    assert code == 0, err
    page = (tmp_path / "report.html").read_text()
    assert "Mean confidence" in page and "mean top-label probability" in page
    assert (tmp_path / "report_figures" / "toys-toy-confidence.png").is_file()
