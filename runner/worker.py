"""One variant, start to finish: load, quantize, measure size, evaluate and time, and return a
result.

`run_variant` is a plain function of a plain value: tests call it directly, and the dispatcher calls
it on a Ray worker: a CPU variant in a process of its own forked for it (runner/isolation.py), a
CUDA variant in a fresh worker process of its own. It never raises for a variant's own failure: the
result says `failed` with the error, so one broken precision never stops a sweep.
"""

from __future__ import annotations

import os
import signal
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from runner import evaluate, measure, models, precisions
from runner.precisions import PRECISIONS, linear_layer_kinds
from runner.spec import EvaluationSpec, QuantSettings, Variant

SCHEMA_VERSION = 1


@dataclass
class VariantTask:
    """Everything a worker needs, with no file to read but the prepared model folder."""

    job: str
    variant: Variant
    model_dir: str
    texts: list[str]
    gold_labels: list[str]  # model label names, already mapped from the dataset's values
    model_labels: list[str]  # id2label in id order
    evaluation: EvaluationSpec
    settings: QuantSettings
    max_length: int
    spec_hash: str
    spec_as_run: dict = field(default_factory=dict)
    sample: dict = field(default_factory=dict)  # where the sample came from, for the record
    model_info: dict = field(default_factory=dict)
    repeat: int = 0  # which of the evaluation's repeats this run is


class NoCudaDevice(RuntimeError):
    pass


def base_result(task: VariantTask, status: str, error: str | None = None) -> dict:
    """The fields every result has, whatever became of the variant."""
    return {
        "schema_version": SCHEMA_VERSION,
        "job": task.job,
        "variant": task.variant.id,
        "precision": task.variant.precision,
        "device": task.variant.device,
        "status": status,
        "error": error,
        "warnings": [],
        "metrics": {},
        "settings": {},
        "environment": {},
        "spec_hash": task.spec_hash,
        "spec": task.spec_as_run,
        "sample": task.sample,
        "model": task.model_info,
        "repeat": task.repeat,
        "started_at": measure.now(),
        "ended_at": None,
    }


def run_variant(task: VariantTask) -> dict:
    import torch

    result = base_result(task, "ok")
    watch = measure.Stopwatch()
    try:
        _run(task, result, torch)
    except Exception as error:  # the variant failed; the sweep goes on
        result["status"] = "failed"
        result["error"] = f"{type(error).__name__}: {error}"
        result["traceback"] = traceback.format_exc(limit=8)
    result["ended_at"] = measure.now()
    result["wall_s"] = watch.seconds()
    try:
        result["environment"] = {**measure.environment(), **result["environment"]}
    except Exception as error:  # never lose a result for want of a version string
        result["environment"]["error"] = repr(error)
    niceness = measure.niceness_warning(result["environment"])
    if niceness and result["status"] == "ok":
        result["warnings"].append(niceness)
    return result


def run_variant_in_own_process(task: VariantTask) -> dict:
    """run_variant as the dispatcher runs it, in the variant's own process. This module imports no
    Ray: a process forked to run a variant starts without importing it (0.3-0.5 s each on 2
    cores)."""
    fault = _injected_fault(task.variant.id)
    if fault == "exit":
        os._exit(3)  # the process dies as in a segfault or an OOM kill
    if fault == "raise":
        raise RuntimeError(f"fault injected into {task.variant.id}")
    if (
        fault == "hold"
    ):  # a variant that hangs until killed; its pid in QUANTBENCH_FAULT_DIR says it began
        if os.environ.get("QUANTBENCH_FAULT_DIR"):
            Path(os.environ["QUANTBENCH_FAULT_DIR"], f"{task.variant.id}.pid").write_text(
                str(os.getpid())
            )
        while True:
            signal.pause()
    models.quiet_libraries()
    result = run_variant(task)
    result["environment"]["variant_pid"] = os.getpid()
    return result


def _injected_fault(variant_id: str) -> str | None:
    """QUANTBENCH_FAULT_INJECT="fp16-cpu=exit,bf16-cpu=raise,fp32-cpu=hold": how tests make a worker
    die, a variant raise or hang."""
    for item in os.environ.get("QUANTBENCH_FAULT_INJECT", "").split(","):
        name, _, fault = item.partition("=")
        if name.strip() == variant_id:
            return fault.strip()
    return None


def analyse_weights(model, task: VariantTask, batches: list[dict]) -> dict:
    """Per-layer error of the weights this variant computes with, against the FP32 weights they came
    from."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from runner import analysis

    started = time.perf_counter()
    reference_model = AutoModelForSequenceClassification.from_pretrained(
        task.model_dir, dtype=torch.float32
    ).eval()
    reference = analysis.dequantized_linear_weights(reference_model)
    variant = analysis.dequantized_linear_weights(model)
    rows = analysis.layer_weight_errors(reference, variant)
    grids = {}
    for name, weight in reference.items():  # one representative layer per type: the first one met
        layer_type, _ = analysis.classify_layer(name)
        if layer_type not in grids:
            grids[layer_type] = analysis.quantization_grid(task.variant.precision, weight)
    outcome = {
        "layers": rows,
        "summary": analysis.summarise_layer_errors(rows),
        "histograms": analysis.weight_histograms(reference),
        "grids": grids,
    }
    outcome.update(
        precisions.extra_analysis(task.variant.precision, reference_model, batches, task.settings)
    )
    del reference_model
    outcome["analysis_s"] = round(time.perf_counter() - started, 3)
    return outcome


def _run(task: VariantTask, result: dict, torch) -> None:
    variant, device = task.variant, task.variant.device
    precision = PRECISIONS[variant.precision]
    if device == "cuda" and not torch.cuda.is_available():
        raise NoCudaDevice(
            f"no CUDA device on this node (torch {torch.__version__}, "
            f"built with CUDA {torch.version.cuda}); {variant.id} needs an NVIDIA GPU"
        )
    threads = task.evaluation.threads or measure.available_cpus()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    memory = measure.MemoryPhases(device)
    settings: dict = {"threads": threads}

    with memory.phase("load"):
        started = time.perf_counter()
        model, loaded = precision.load(task.model_dir, device, task.settings)
        load_s = time.perf_counter() - started
    settings.update(loaded)
    with memory.phase("quantize"):
        started = time.perf_counter()
        if precision.quantize is not None:
            model, quantized = precision.quantize(model, task.settings)
            settings.update(quantized)
        quantize_s = time.perf_counter() - started
    settings["linear_layers"] = linear_layer_kinds(model)
    size_mib = measure.model_size_mib(model)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(task.model_dir)
    order = evaluate.batch_order(
        tokenizer, task.texts, task.max_length, task.evaluation.batch_order
    )
    batches = evaluate.tokenize_batches(
        tokenizer,
        [task.texts[i] for i in order],
        task.evaluation.batch_size,
        task.max_length,
        device,
    )
    fixed = None
    if task.evaluation.latency_mode == "fixed":
        fixed = evaluate.fixed_shape_batch(tokenizer, *task.evaluation.fixed_shape, device)
    with memory.phase("evaluate"):
        probabilities, timings = evaluate.run_passes(
            model,
            batches,
            device,
            task.evaluation.warmup_passes,
            task.evaluation.timed_passes,
            task.evaluation.min_time_s,
            fixed,
            holder=f"timing {task.job} {variant.id}",
        )
    probabilities = evaluate.in_sample_order(probabilities, order)
    if not np.isfinite(probabilities).all():
        raise FloatingPointError(
            f"{variant.id} produced non-finite outputs (NaN or inf) for "
            f"{int((~np.isfinite(probabilities)).any(axis=1).sum())} of {len(task.texts)} samples"
        )

    analysis_warning = None
    if task.evaluation.weight_analysis:
        # After the clock has stopped: no timed pass runs while this computes. It is optional: its
        # failure is a warning, never the loss of a measured variant.
        with memory.phase("analysis"):
            try:
                result["analysis"] = analyse_weights(model, task, batches)
            except Exception as error:
                result["analysis"] = {"error": f"{type(error).__name__}: {error}"}
                analysis_warning = f"weight analysis failed: {type(error).__name__}: {error}"

    index = {name: i for i, name in enumerate(task.model_labels)}
    gold_ids = np.array([index[name] for name in task.gold_labels])
    predicted = probabilities.argmax(axis=1)
    noise_cv, repeated = timings.noise_cv()
    latency = {
        **measure.latency_stats(timings.seconds),
        "repeat_cv": noise_cv,
        "repeat_n": repeated,
        "preemptions_per_s": timings.preemptions_per_s,
        "clock_started_at": timings.clock_started_at,
        "clock_s": timings.clock_s,
        "timing_lock_wait_s": timings.timing_lock_wait_s,
    }
    timed_total = sum(timings.seconds)
    result["metrics"] = {
        "model_size_mib": size_mib,
        **evaluate.prediction_metrics(probabilities, gold_ids, task.model_labels),
        "latency_ms": latency,
        "throughput_sps": round(timings.samples / timed_total, 3) if timed_total else None,
        "peak_rss_mib": memory.peak_rss_mib(),
        "peak_cuda_mib": memory.peak_cuda_mib(),
        "memory_phases": memory.phases,
        # false: each phase's peak includes the ones before
        "memory_phases_reset": memory.resettable,
        "load_s": round(load_s, 4),
        "quantize_s": round(quantize_s, 4),
    }
    result["warnings"] = evaluate.label_guard(gold_ids, predicted, task.model_labels)
    if analysis_warning:
        result["warnings"].append(analysis_warning)
    if timings.timing_lock_warning:
        result["warnings"].append(timings.timing_lock_warning)
    noisy = measure.noisy_warning(latency)
    if noisy:
        result["warnings"].append(noisy)
    result["settings"] = {
        **settings,
        "batch_size": task.evaluation.batch_size,
        "batch_order": task.evaluation.batch_order,
        "max_length": task.max_length,
        "warmup_passes": task.evaluation.warmup_passes,
        "timed_passes": task.evaluation.timed_passes,
        "min_time_s": task.evaluation.min_time_s,
        "latency_mode": task.evaluation.latency_mode,
        "fixed_shape": task.evaluation.fixed_shape,
        "quantization": asdict(task.settings),
    }
    result["predictions"] = {
        "labels": task.model_labels,
        "gold": task.gold_labels,
        "predicted": [task.model_labels[i] for i in predicted],
        "confidence": [round(float(c), 6) for c in probabilities.max(axis=1)],
        "probabilities": [[round(float(p), 6) for p in row] for row in probabilities],
    }
