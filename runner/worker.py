"""One variant, start to finish: load, quantize, measure size, evaluate and time, and return a
result.

`run_variant` is a plain function of a plain value: tests call it directly, and the dispatcher calls
it on a Ray worker: a CPU variant in a process of its own forked for it (runner/isolation.py), a
CUDA variant in a fresh worker process of its own. It never raises for a variant's own failure: the
result says `failed` with the error, so one broken precision never stops a sweep.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from torch._dynamo.utils import counters

from runner import (
    analysis,
    evaluate,
    folders,
    fp32_layers,
    locks,
    machine,
    measure,
    models,
    progress,
)
from runner.layers import classify_layer
from runner.precisions import config_for
from runner.precisions.worker import REFERENCE, quantized_model
from runner.schema import Metrics, Result
from runner.work import VariantWork, base_result


def model_class(work: VariantWork) -> type:
    """The transformers Auto class the job's task loads its checkpoints as."""
    return getattr(transformers, work.task.model_class)


class NoCudaDevice(RuntimeError):
    pass


def run_variant(work: VariantWork) -> Result:
    """The variant's result (what travels back from a worker and is written)."""
    result = base_result(work, "ok")
    progress.start(progress_name(work))
    watch = measure.Stopwatch()
    try:
        _run(work, result, torch)
    except Exception as error:  # the variant failed; the sweep goes on
        result.status = "failed"
        result.error = f"{type(error).__name__}: {error}"
        result.traceback = traceback.format_exc(limit=8)
    result.ended_at = measure.now()
    result.wall_s = watch.seconds()
    try:
        result.environment = {**machine.environment(), **result.environment}
    except Exception as error:  # never lose a result for want of a version string
        result.environment["error"] = repr(error)
    niceness = measure.niceness_warning(result.environment)
    if niceness and result.status == "ok":
        result.warnings.append(niceness)
    return result


def progress_name(work: VariantWork) -> str:
    """How the variant's progress lines name it: "demo fp16-cpu" (and "run 2/3" when repeated)."""
    name = f"{work.job} {work.variant.id}"
    repeats = work.evaluation.repeats
    return f"{name} run {work.repeat + 1}/{repeats}" if repeats > 1 else name


# How a memory phase is named in the progress lines, where its own name is not the words.
PHASE_WORDS = {"kv_cache": "generation", "kl": "KL against FP32"}


class ReportedPhases(machine.MemoryPhases):
    """The variant's memory phases, each also a progress phase: its start, its end and its time
    are said (outside any clock: a phase holds whole steps, never a part of a timed pass)."""

    @contextlib.contextmanager
    def phase(self, name: str):
        with progress.phase(PHASE_WORDS.get(name, name)), super().phase(name):
            yield


def run_variant_in_own_process(work: VariantWork) -> Result:
    """run_variant as the dispatcher runs it, in the variant's own process. This module imports no
    Ray: a process forked to run a variant starts without importing it (0.3-0.5 s each on 2
    cores)."""
    fault = _injected_fault(work.variant.id)
    if fault == "exit":
        os._exit(3)  # the process dies as in a segfault or an OOM kill
    if fault == "raise":
        raise RuntimeError(f"fault injected into {work.variant.id}")
    if (
        fault == "hold"
    ):  # a variant that hangs until killed; its pid in QUANTBENCH_FAULT_DIR says it began
        if os.environ.get("QUANTBENCH_FAULT_DIR"):
            Path(os.environ["QUANTBENCH_FAULT_DIR"], f"{work.variant.id}.pid").write_text(
                str(os.getpid())
            )
        while True:
            signal.pause()
    models.quiet_libraries()
    result = run_variant(work)
    result.environment["variant_pid"] = os.getpid()
    return result


def _injected_fault(variant_id: str) -> str | None:
    """QUANTBENCH_FAULT_INJECT="fp16-cpu=exit,bf16-cpu=raise,fp32-cpu=hold": how tests make a worker
    die, a variant raise or hang."""
    for item in os.environ.get("QUANTBENCH_FAULT_INJECT", "").split(","):
        name, _, fault = item.partition("=")
        if name.strip() == variant_id:
            return fault.strip()
    return None


class Fp32Reference:
    """The FP32 checkpoint a variant is compared against after its timed passes. The weight
    analysis reads it a linear layer at a time (`layers`: runner/fp32_layers.py), never as a
    second whole model; a causal LM's KL without the job's stored reference loads it whole on the
    variant's device (`model`), at most once. Whoever reads it last calls release(), which frees
    it at once: no later phase holds it."""

    def __init__(self, work: VariantWork):
        self.work = work
        self._model = None

    def layers(self, variant=None):
        """(the FP32 model to run, its linear layers' weights by name): read a layer at a time
        from a safetensors checkpoint; from the whole model where the checkpoint is no such file
        or names its tensors otherwise."""
        streamed = fp32_layers.streamed_fp32(model_class(self.work), self.work.model_dir, variant)
        if streamed is not None:
            return streamed.model, streamed.weights()
        reference_model = self.model("cpu")
        return reference_model, analysis.dequantized_linear_weights(reference_model, REFERENCE)

    def model(self, device: str = "cpu"):
        if self._model is None:
            loaded = model_class(self.work).from_pretrained(
                self.work.model_dir, dtype=torch.float32
            )
            self._model = loaded.eval()
        self._model = self._model.to(device)
        return self._model

    def release(self) -> None:
        self._model = None
        machine.release_freed_memory()


def analyse_weights(model, work: VariantWork, batches: list[dict], fp32: Fp32Reference) -> dict:
    """Per-layer error of the weights this variant computes with, against the FP32 weights they came
    from, and of each layer's output given the FP32 layer's input. The FP32 weights are read a
    layer at a time (Fp32Reference.layers); the variant's are dequantized one layer at a time."""

    started = time.perf_counter()
    precision = work.precision
    config = config_for(precision, work.settings)
    family = work.family.family_worker()  # its layers; the FP32 reference's are plain (REFERENCE)
    reference_model, reference = fp32.layers(model)
    rows = analysis.layer_weight_errors_by_layer(reference, model, family)
    outputs = analysis.layer_output_errors(reference_model, model, batches)
    for row in rows:  # a layer the hooks never reached (unused by the forward) has no output
        row.update(outputs.get(row["layer"], {"output_sqnr_db": None, "output_rel_l2": None}))
    grids = {}
    for name in reference:  # one representative layer per type: the first one met
        layer_type, _ = classify_layer(name)
        if layer_type not in grids:
            grids[layer_type] = family.grid(precision, config, reference[name])
    outcome = {
        "layers": rows,
        "summary": analysis.summarise_layer_errors(rows),
        "histograms": analysis.weight_histograms(reference),
        "grids": grids,
    }
    outcome.update(family.extra_analysis(config, reference_model, batches))
    outcome["analysis_s"] = round(time.perf_counter() - started, 3)
    return outcome


def _run(work: VariantWork, result: Result, torch) -> None:
    """The variant's steps, in the order they run; each writes its part of the result."""
    kind = work.task.worker()
    check_device(work, torch)
    threads = work.evaluation.threads or measure.available_cpus()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    memory = ReportedPhases(work.variant.device)
    loaded = load_variant(work, memory, threads)
    machine.release_freed_memory()  # what quantizing freed (FP32 layers) leaves before timing
    size_mib = machine.model_size_mib(loaded.model)
    untied = machine.untied_output(loaded.model)  # None: no tie, or the tie holds
    batches, order, fixed = kind.batches(work)
    compiled = compile_model(work, loaded.model, batches, fixed, memory)
    with memory.phase("evaluate"):
        outputs, timings = evaluate.run_passes(
            compiled.model if compiled else loaded.model,
            batches,
            work.variant.device,
            work.evaluation.warmup_passes,
            work.evaluation.timed_passes,
            work.evaluation.min_time_s,
            fixed,
            holder=f"timing {work.job} {work.variant.id}",
            read_output=kind.read_output,
            count_graphs=compiled.count_graphs if compiled else None,
        )
    answers = evaluate.in_sample_order(outputs, order)
    check_finite(work, kind.non_finite(answers))
    fp32 = Fp32Reference(work)  # loaded by the first phase that reads it, at most once
    analysis_warning = weight_analysis(loaded.model, work, batches, memory, result, fp32)
    scored = kind.score(work, answers)
    # On the eager model; a causal LM's KL reads the FP32 reference, then releases it.
    scored = kind.measure_more(work, loaded.model, batches, memory, scored, fp32)
    fp32.release()
    result.metrics = Metrics.from_json(
        measured_metrics(size_mib, scored.metrics, timings, memory, loaded, compiled, untied),
        tuple(work.task.metric_hints()),
    )
    extra = [untied.warning() if untied else None, analysis_warning, timings.timing_lock_warning]
    extra += compile_warnings(compiled, timings)
    extra.append(measure.noisy_warning(result.metrics.latency.to_json()))
    result.warnings = scored.warnings + [warning for warning in extra if warning]
    result.settings = recorded_settings(work, loaded.settings, compiled)
    result.predictions = work.task.predictions.from_json(scored.predictions)


def check_device(work: VariantWork, torch) -> None:
    if work.variant.device == "cuda" and not torch.cuda.is_available():
        raise NoCudaDevice(
            f"no CUDA device on this node (torch {torch.__version__}, "
            f"built with CUDA {torch.version.cuda}); {work.variant.id} needs an NVIDIA GPU"
        )


@dataclass
class LoadedVariant:
    """The model as the variant computes with it, and what loading and quantizing recorded."""

    model: object
    settings: dict
    load_s: float
    quantize_s: float
    calibrate_s: float | None = None  # None: the precision does not calibrate


def load_variant(work: VariantWork, memory: machine.MemoryPhases, threads: int) -> LoadedVariant:
    """The model loaded, calibrated where its precision calibrates, and quantized, in the memory
    phases "load", "calibrate" and "quantize"; its settings: threads, what loading and quantizing
    recorded (and the calibration set), and the classes of its linear layers."""
    precision, family = work.precision, work.family.family_worker()
    calibrated = precision.calibrated
    batches = evaluate.calibration_batches(work, work.variant.device) if calibrated else None
    quantized = quantized_model(
        precision,
        config_for(precision, work.settings),
        family,
        model_class(work),
        work.model_dir,
        work.variant.device,
        keep=frozenset(work.variant.keep),  # a study's mixed variant: these layers stay FP32
        calibration=batches,
        phase=memory.phase,
    )
    settings = {
        "threads": threads,
        **quantized.recorded,
        **({"calibration": calibration_record(work, batches)} if batches else {}),
        "linear_layers": family.linear_layer_kinds(quantized.model),
    }
    return LoadedVariant(
        quantized.model, settings, quantized.load_s, quantized.quantize_s, quantized.calibrate_s
    )


def calibration_record(work, batches: list[dict]) -> dict:
    """result.settings.calibration: where the rows came from, how many, their tokens and hash."""
    tokens = sum(batch["input_ids"].shape[1] for batch in batches)
    return {**work.calibration.record, "rows": len(batches), "tokens": tokens}


# How a compiled variant runs torch.compile. dynamic None is torch's own default: a shape compiles
# static unless marked dynamic, and the first new shape recompiles with dynamic sizes (dynamic
# False: one compile per shape, up to torch's recompile limit). A sample of many sequence lengths
# has its length marked dynamic on the first batch (mark_length_dynamic), so it compiles once.
COMPILE = {"mode": "default", "backend": "inductor", "dynamic": None}
RECOMPILE_LIMIT_HIT = "Dynamo recompile limit exceeded"  # how dynamo's counters name it
# Inductor's caches on disk (compiled FX graphs, AOT autograd's, the built C++ kernels) go in one
# folder per node, shared by every compiled variant there: each variant runs in a process of its
# own, and without a shared folder on disk each would compile cold.
INDUCTOR_CACHE_VARIABLE = "TORCHINDUCTOR_CACHE_DIR"


class CompileFailed(RuntimeError):
    """torch.compile could not compile the model: the variant fails, the sweep goes on."""


def compile_counts() -> dict[str, int]:
    """What torch.compile has done in this process so far, from dynamo's and inductor's counters.
    Past the recompile limit a function runs eager from then on: the model is only partly
    compiled, as it is where a graph breaks."""
    unsupported = counters["unimplemented"]
    return {
        "graphs": counters["stats"]["unique_graphs"],
        "graph_breaks": sum(counters["graph_break"].values()),
        "recompile_limit_hits": sum(
            n for why, n in unsupported.items() if why.startswith(RECOMPILE_LIMIT_HIT)
        ),
        "fx_graph_cache_hits": counters["inductor"]["fxgraph_cache_hit"],
        "fx_graph_cache_misses": counters["inductor"]["fxgraph_cache_miss"],
    }


def shared_inductor_cache() -> Path:
    """The node's inductor cache, which this process's compiles read and write: the folder
    TORCHINDUCTOR_CACHE_DIR names where it is set, else `inductor` in quantbench's cache
    (QUANTBENCH_CACHE). Inductor reads the variable whenever it opens its cache."""
    default = folders.cache_root() / "inductor"
    return Path(os.environ.setdefault(INDUCTOR_CACHE_VARIABLE, str(default))).resolve()


class ToyModel(torch.nn.Module):
    """What warm_up_compiler compiles: the kinds of step a transformer's layer takes."""

    def __init__(self):
        super().__init__()
        self.linear, self.norm = torch.nn.Linear(8, 8), torch.nn.LayerNorm(8)

    def forward(self, x):
        return torch.softmax(self.norm(torch.nn.functional.gelu(self.linear(x))), dim=-1)


def warm_up_compiler() -> None:
    """Run by the fork server of a job with compiled CPU variants, before it forks any: a toy
    model compiled once, with the sequence length dynamic, so that every forked variant finds
    what a process's first compile sets up done (isolation.COMPILE_PRELOAD). One compile thread:
    a pool of compile workers would not survive a fork. It counts in no variant's compile_s."""
    from torch._inductor import config as inductor_config  # here: an eager job never imports it

    shared_inductor_cache()
    toy_input = torch.randn(1, 5, 8)
    torch._dynamo.maybe_mark_dynamic(toy_input, 1)
    with inductor_config.patch(compile_threads=1), torch.inference_mode():
        torch.compile(ToyModel(), **COMPILE)(toy_input)
    torch._dynamo.reset()


@dataclass
class CompiledModel:
    """What torch.compile gave, and what compiling it on the first batch took."""

    model: object  # the compiled module the passes run; weight analysis reads the eager one
    compile_s: float
    started: dict[str, int]  # compile_counts() before compiling
    first_pass: dict[str, int]  # what the first pass compiled
    timing_lock_warning: str | None
    cache_dir: Path  # the node's inductor cache it read and wrote
    dynamic_length: bool  # compiled for any sequence length from the first pass

    def counts(self) -> dict[str, int]:
        """compile_counts() since compiling began."""
        return {key: n - self.started[key] for key, n in compile_counts().items()}

    def count_graphs(self) -> int:
        return self.counts()["graphs"]


def compile_model(
    work: VariantWork, model, batches: list[dict], fixed: dict | None, memory
) -> CompiledModel | None:
    """torch.compile(model) and the first forward pass (on the fixed batch in latency_mode fixed),
    which compiles it, timed as compile_s. It holds the machine's timing lock: compiling takes
    every core, and no other run's clock may run beside it. None for an eager variant."""
    if not work.variant.compiled:
        return None
    torch._dynamo.reset()  # an earlier variant's graphs in this process count towards the limit
    cache = shared_inductor_cache()
    first_batch = batches[0] if fixed is None else fixed
    dynamic_length = mark_length_dynamic(first_batch, batches + ([fixed] if fixed else []))
    started = compile_counts()
    sync = machine.synchronizer(work.variant.device)
    holder = f"compiling {work.job} {work.variant.id}"
    with memory.phase("compile"), locks.timing_lock(holder) as lock:
        clock = time.perf_counter()
        compiled = torch.compile(model, **COMPILE)
        try:
            with torch.inference_mode():
                compiled(**first_batch)
            sync()
        except Exception as error:
            raise CompileFailed(
                f"torch.compile ({COMPILE['backend']}, mode {COMPILE['mode']}) failed on the first "
                f"batch of {work.variant.id}: {type(error).__name__}: {error}"
            ) from error
        compile_s = time.perf_counter() - clock
    first_pass = {key: n - started[key] for key, n in compile_counts().items()}
    return CompiledModel(
        compiled, compile_s, started, first_pass, lock.warning, cache, dynamic_length
    )


def mark_length_dynamic(first_batch: dict, batches: list[dict]) -> bool:
    """Marks the first batch's sequence dimension (dim 1 of its tensors) dynamic when the batches'
    lengths differ; whether it did. Left to torch, the first pass compiles its length static and
    warm-up's second length compiles the whole model again, dynamic: two full compiles in every
    variant's process. Marked, the first pass compiles once for every length, and every timed pass
    runs that one graph. maybe_mark_dynamic: a model that needs a fixed length stays static."""
    if len({batch["input_ids"].shape[-1] for batch in batches}) < 2:
        return False  # one length: its static graph is the one to time
    for value in first_batch.values():
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            torch._dynamo.maybe_mark_dynamic(value, 1)
    return True


def compilation_record(compiled: CompiledModel, timings) -> dict:
    """metrics["compilation"]: graphs compiled in the first pass, in warm-up and while the clock
    ran (0 where warm-up met every shape), graph breaks, recompile-limit hits, and the inductor
    cache's hits and misses (a hit makes compile_s much shorter) in the whole run, with the
    node's cache folder they were looked up in."""
    total = compiled.counts()
    first = compiled.first_pass["graphs"]
    return {
        "graphs_first_pass": first,
        "graphs_warm_up": timings.graphs_at_clock - first,
        "graphs_timed": timings.graphs_while_timed,
        "graph_breaks": total["graph_breaks"],
        "recompile_limit_hits": total["recompile_limit_hits"],
        "fx_graph_cache_hits": total["fx_graph_cache_hits"],
        "fx_graph_cache_misses": total["fx_graph_cache_misses"],
        "cache_dir": str(compiled.cache_dir),
        "dynamic_length": compiled.dynamic_length,
    }


def compile_warnings(compiled: CompiledModel | None, timings) -> list[str]:
    if compiled is None:
        return []
    warnings = [compiled.timing_lock_warning]
    if timings.graphs_while_timed:
        warnings.append(
            f"torch.compile compiled {timings.graphs_while_timed} graph(s) while the clock ran: "
            "some timed passes include compiling"
        )
    counts = compiled.counts()
    if counts["recompile_limit_hits"]:
        warnings.append(
            f"torch.compile reached its recompile limit {counts['recompile_limit_hits']} time(s) "
            f"and broke the graph {counts['graph_breaks']} time(s): parts of the model run eager, "
            "so this variant is only partly compiled"
        )
    return [warning for warning in warnings if warning]


def check_finite(work: VariantWork, non_finite: int) -> None:
    """non_finite: how many of the samples' answers hold NaN or infinity."""
    if non_finite:
        raise FloatingPointError(
            f"{work.variant.id} produced non-finite outputs (NaN or inf) for "
            f"{non_finite} of {len(work.texts)} samples"
        )


def weight_analysis(
    model, work: VariantWork, batches, memory, result: Result, fp32: Fp32Reference
) -> str | None:
    """result.analysis, after the clock has stopped: no timed pass runs while this computes. It
    is optional: its failure is a warning (returned), never the loss of a measured variant."""
    if not work.evaluation.weight_analysis:
        return None
    with memory.phase("analysis"):
        try:
            result.analysis = analyse_weights(model, work, batches, fp32)
        except Exception as error:
            result.analysis = {"error": f"{type(error).__name__}: {error}"}
            return f"weight analysis failed: {type(error).__name__}: {error}"
        finally:
            # What it read of FP32 and its logits, handed back before the next phase's peak.
            machine.release_freed_memory()
    return None


def measured_metrics(
    size_mib, task_metrics: dict, timings, memory, loaded: LoadedVariant, compiled=None, untied=None
) -> dict:
    """result["metrics"]: size (and what an untied output layer's copy adds to it), the task's
    metrics, latency, throughput, memory, load times (and a compiled variant's compile time and
    graphs)."""
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
    metrics = {
        "model_size_mib": size_mib,
        **({"untied_output_mib": untied.mib} if untied else {}),
        **task_metrics,
        "latency_ms": latency,
        "throughput_sps": round(timings.samples / timed_total, 3) if timed_total else None,
        "peak_rss_mib": memory.peak_rss_mib(),
        "peak_cuda_mib": memory.peak_cuda_mib(),
        "memory_phases": memory.phases,
        # false: each phase's peak includes the ones before
        "memory_phases_reset": memory.resettable,
        "load_s": round(loaded.load_s, 4),
        "quantize_s": round(loaded.quantize_s, 4),
    }
    if loaded.calibrate_s is not None:
        metrics["calibrate_s"] = round(loaded.calibrate_s, 4)
    if compiled is not None:
        metrics["compile_s"] = round(compiled.compile_s, 4)
        metrics["compilation"] = compilation_record(compiled, timings)
    return metrics


def recorded_settings(work: VariantWork, loaded_settings: dict, compiled=None) -> dict:
    """result["settings"]: what loading recorded, then every evaluation setting that changes
    results; "compile" (torch.compile's arguments) only for a compiled variant."""
    evaluation = work.evaluation
    return {
        **loaded_settings,
        **({"compile": dict(COMPILE)} if compiled is not None else {}),
        "batch_size": evaluation.batch_size,
        "batch_order": evaluation.batch_order,
        "max_length": work.max_length,
        "warmup_passes": evaluation.warmup_passes,
        "timed_passes": evaluation.timed_passes,
        "min_time_s": evaluation.min_time_s,
        "latency_mode": evaluation.latency_mode,
        "fixed_shape": evaluation.fixed_shape,
        "quantization": dict(work.settings),
        **work.task.recorded(work.task_config),
    }
