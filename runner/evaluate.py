"""Evaluation: forward passes over the sample, timed one by one; what a pass answers is the task's.

The sample is tokenized before the clock starts. Warm-up passes are not timed, nor is one more pass
of every distinct batch shape. In latency mode `dataset` every batch of the sample is timed (the
per-sample latency the published study measured), in whole passes over the sample until both the
job's minimum pass count and minimum duration are reached, and the first pass gives the outputs; in
mode `fixed` one batch of the fixed shape is timed instead, and the sample is evaluated once,
untimed. The task (runner/tasks/) reads each pass's output after the clock has stopped.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import AutoTokenizer

from runner import locks, machine, measure, progress
from runner.job import EvaluationSpec


def tokenize_batches(
    tokenizer, texts: list[str], batch_size: int, max_length: int, device: str
) -> list[dict]:
    batches = []
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(
            texts[start : start + batch_size],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        batches.append({k: v.to(device) for k, v in encoded.items()})
    return batches


def calibration_batches(work, device: str) -> list[dict]:
    """The job's calibration rows (work.calibration), tokenized as its task feeds a text, one
    unpadded row per batch, on the device."""
    if work.calibration is None:
        raise ValueError(
            f"{work.precision.name} calibrates on data, and the job gave no calibration rows"
        )
    return row_batches(work.task.worker().calibration_rows(work), device)


def row_batches(rows: list[list[int]], device: str) -> list[dict]:
    """One batch per row of token ids, unpadded: what a calibrated precision observes (a pad
    would enter its statistics: no attention mask reaches a layer's input)."""
    return [
        {
            "input_ids": torch.tensor([ids], device=device),
            "attention_mask": torch.ones(1, len(ids), dtype=torch.long, device=device),
        }
        for ids in rows
        if ids
    ]


def batch_order(tokenizer, texts: list[str], max_length: int, how: str) -> list[int]:
    """The order in which the sample is batched. "length": by token count, shortest first (a stable
    sort), so each batch pads to nearly its own length; at batch size 1 the order changes
    nothing."""
    if how == "sample":
        return list(range(len(texts)))
    lengths = [
        len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    ]
    return sorted(range(len(texts)), key=lengths.__getitem__)


def in_sample_order(answers: list, order: list[int]) -> list:
    """answers[i] belongs to sample order[i]; back to the sample's own order."""
    restored = [None] * len(answers)
    for answer, row in zip(answers, order, strict=True):
        restored[row] = answer
    return restored


# The machine's noise is the spread of passes of one shape, which do the same work, apart from the
# spread that different sentence lengths give the per-sample latencies. The timed passes usually
# repeat shapes often enough to tell it; where they hold fewer than MIN_SAME_SHAPE_PASSES passes
# beyond the first of each shape, the first batch is timed REPEATS_FOR_NOISE times more.
MIN_SAME_SHAPE_PASSES = 10
REPEATS_FOR_NOISE = 10


@dataclass
class PassTimings:
    seconds: list[float]
    samples: int  # samples processed in timed passes
    shapes: list[tuple[int, ...]]  # each timed pass's input shape
    repeats: list[
        float
    ]  # the first batch timed again, only where the timed passes repeat too few shapes
    # How often another thread took a CPU from this process while the clock ran, per second: what
    # else
    # ran beside the timed passes. Brief wake-ups cost little (a process waking 250 times a second
    # did
    # not slow a MiniLM loop measurably on 2 cores); a high rate beside noisy passes points at a
    # neighbour.
    preemptions_per_s: float | None = None
    # When the clock ran (UTC, ISO 8601) and for how long: lines the timings up with what else the
    # machine did then (another job's log, a monitor, the benchmark's plain loop taking turns).
    clock_started_at: str | None = None
    clock_s: float | None = None
    # How long the passes waited for another quantbench run's clock on this machine
    # (locks.timing_lock),
    # and a warning when they could not wait for it (they timed beside it).
    timing_lock_wait_s: float | None = None
    timing_lock_warning: str | None = None
    # A compiled model's graph count (count_graphs) when the clock started, and how many graphs it
    # compiled while the clock ran: a recompile in a timed pass would time the compiler, and
    # warm_up's pass of every shape is there to prevent it. None for an eager model.
    graphs_at_clock: int | None = None
    graphs_while_timed: int | None = None

    def noise_cv(self) -> tuple[float | None, int]:
        """The spread of passes of one shape, timed passes and repeats together; and how many passes
        beyond the first of each shape it rests on. The repeats have the first timed pass's
        shape."""
        return measure.same_shape_cv(
            self.seconds + self.repeats, self.shapes + self.shapes[:1] * len(self.repeats)
        )


def fixed_shape_batch(tokenizer, batch_size: int, sequence_length: int, device: str) -> dict:
    """A batch of the same shape on every run and dataset: seeded random token ids, no padding."""
    generator = torch.Generator().manual_seed(0)
    low = min(1000, len(tokenizer) // 2)  # past the special tokens of a BERT vocabulary
    ids = torch.randint(low, len(tokenizer), (batch_size, sequence_length), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if "token_type_ids" in tokenizer.model_input_names:
        batch["token_type_ids"] = torch.zeros_like(ids)
    return {k: v.to(device) for k, v in batch.items()}


def tokenized_sample(
    model_dir: str, texts: list[str], evaluation: EvaluationSpec, max_length: int, device: str
) -> tuple[list[dict], list[int], dict | None]:
    """The texts tokenized into batches in the evaluation's order (before any clock starts), that
    order, and the fixed-shape batch when latency is timed on one (else None)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    order = batch_order(tokenizer, texts, max_length, evaluation.batch_order)
    batches = tokenize_batches(
        tokenizer, [texts[i] for i in order], evaluation.batch_size, max_length, device
    )
    fixed = None
    if evaluation.latency_mode == "fixed":
        fixed = fixed_shape_batch(tokenizer, *evaluation.fixed_shape, device)
    return batches, order, fixed


def batch_shape(batch: dict) -> tuple[int, ...]:
    return tuple(batch["input_ids"].shape)


def run_passes(
    model,
    batches: list[dict],
    device: str,
    warmup_passes: int,
    timed_passes: int,
    min_time_s: float,
    fixed_batch: dict | None = None,
    holder: str = "a quantbench variant",
    *,
    read_output: Callable[[object, dict], list],
    count_graphs: Callable[[], int] | None = None,
) -> tuple[list, PassTimings]:
    """The task's answer for every sample, in batch order, and the timed passes.

    Dataset mode (fixed_batch None): the passes over the sample are the timed passes, and the first
    of them gives the outputs. Fixed mode: the sample is evaluated untimed, and the timed passes all
    run on fixed_batch. holder: who times, in words, for whoever waits for the machine's timing
    lock meanwhile. read_output: (a forward pass's output, its batch) -> one answer per sample
    (TaskWorker.read_output).
    count_graphs: for a compiled model, the graphs torch.compile has compiled so far; in fixed mode
    its untimed passes over the sample then hold the timing lock too, as they may recompile.
    """
    outputs = []
    clock = (device, warmup_passes, timed_passes, min_time_s, holder)
    with torch.inference_mode():
        if fixed_batch is None:

            def keep(index: int, output) -> None:
                if index < len(batches):
                    outputs.extend(read_output(output, batches[index]))

            timings = timed_passes_of(model, batches, *clock, keep, count_graphs)
        else:
            with (
                locks.timing_lock(holder) if count_graphs else contextlib.nullcontext(),
                progress.phase("outputs over the sample", len(batches), "batches") as step,
            ):
                for batch in batches:
                    outputs.extend(read_output(model(**batch), batch))
                    step.advance()
            timings = timed_passes_of(model, [fixed_batch], *clock, None, count_graphs)
    return outputs, timings


def timed_passes_of(
    model,
    timed_batches: list[dict],
    device: str,
    warmup_passes: int,
    timed_passes: int,
    min_time_s: float,
    holder: str,
    on_output: Callable[[int, object], None] | None = None,
    count_graphs: Callable[[], int] | None = None,
) -> PassTimings:
    """Warm up, then time whole passes over timed_batches; on_output(i, output) sees each timed
    pass's output after its clock stopped; count_graphs (a compiled model's) is read when the clock
    starts and when it stops."""
    sync = machine.synchronizer(device)
    # No other quantbench run on this machine times while this one warms up and times: they would
    # share the cores (and the GPU). Warm-up is inside, so the clock starts on a warm machine.
    with locks.timing_lock(holder) as lock:
        seen = warm_up(model, timed_batches, warmup_passes)
        sync()
        # Whole passes over the sample only: every batch is timed equally often, whatever the
        # lengths.
        per_pass = len(timed_batches)
        total_passes = -(-max(per_pass, timed_passes) // per_pass) * per_pass
        repeated = total_passes - len(seen)  # at least; min_time_s may add passes
        graphs_at_clock = count_graphs() if count_graphs else None
        repeats = noise_repeats(model, timed_batches[0], sync, repeated)
        # Its start and end are said outside the clock, its count between passes (clock_passes).
        with progress.phase("timed passes", total_passes, "passes") as step:
            timings = clock_passes(
                model, timed_batches, sync, total_passes, min_time_s, on_output, step
            )
    if count_graphs:
        timings.graphs_at_clock = graphs_at_clock
        timings.graphs_while_timed = count_graphs() - graphs_at_clock
    timings.repeats = repeats
    timings.timing_lock_wait_s = round(lock.waited_s, 3)
    timings.timing_lock_warning = lock.warning
    return timings


def warm_up(model, timed_batches: list[dict], warmup_passes: int) -> set[tuple[int, ...]]:
    """The warm-up passes, then every batch shape not met yet, once: the first pass of a new shape
    pays one-time costs (CUDA loads kernels lazily and picks them per shape; oneDNN builds
    primitives per shape), and a timed pass must not. Returns the shapes met."""
    seen = {batch_shape(b) for b in timed_batches[:warmup_passes]}
    new_shapes = {batch_shape(b) for b in timed_batches} - seen
    with progress.phase("warm-up", warmup_passes + len(new_shapes), "passes") as step:
        for i in range(warmup_passes):
            model(**timed_batches[i % len(timed_batches)])
            step.advance()
        for batch in timed_batches:
            if batch_shape(batch) not in seen:
                seen.add(batch_shape(batch))
                model(**batch)
                step.advance()
    return seen


def noise_repeats(model, batch: dict, sync, repeated: int) -> list[float]:
    """The first batch timed REPEATS_FOR_NOISE times more, where the timed passes repeat too few
    shapes to tell the machine's noise."""
    repeats = []
    for _ in range(REPEATS_FOR_NOISE if repeated < MIN_SAME_SHAPE_PASSES else 0):
        start = time.perf_counter()
        model(**batch)
        sync()
        repeats.append(time.perf_counter() - start)
    return repeats


def clock_passes(
    model,
    timed_batches: list[dict],
    sync,
    total_passes: int,
    min_time_s: float,
    on_output,
    step: progress.Phase | None = None,
) -> PassTimings:
    """The timed passes, one forward pass per clock reading, until both the pass count and
    min_time_s are reached, in whole passes. step counts them between passes, after a pass's clock
    has stopped (a clock reading; a short write at most once a second)."""
    per_pass = len(timed_batches)
    seconds, samples = [], 0
    preempted_before = measure.preemptions()
    clock_started_at = measure.now()
    clock_started = time.perf_counter()
    i = 0
    while i < total_passes or i % per_pass or time.perf_counter() - clock_started < min_time_s:
        batch = timed_batches[i % per_pass]
        sync()
        start = time.perf_counter()
        output = model(**batch)
        sync()
        seconds.append(time.perf_counter() - start)
        samples += batch["input_ids"].shape[0]
        if on_output is not None:
            on_output(i, output)
        # Before the next pass, not when it rebinds `output`: a causal LM's logits are [batch,
        # length, vocabulary] (Gemma-3's: 256 MiB a batch), and two of them would be alive at once.
        del output
        i += 1
        if step is not None:
            step.set(i)
    clock_s = time.perf_counter() - clock_started
    preempted = measure.preemptions()
    rate = (
        round((preempted - preempted_before) / clock_s, 1)
        if preempted is not None and clock_s > 0
        else None
    )
    shapes = [batch_shape(timed_batches[k % per_pass]) for k in range(len(seconds))]
    return PassTimings(seconds, samples, shapes, [], rate, clock_started_at, round(clock_s, 3))
