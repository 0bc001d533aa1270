"""Evaluation: forward passes over the sample, timed one by one, and what the predictions say.

The sample is tokenized before the clock starts. Warm-up passes are not timed, nor is one more pass
of every distinct batch shape. In latency mode `dataset` every batch of the sample is timed (the
per-sample latency the published study measured), in whole passes over the sample until both the
job's minimum pass count and minimum duration are reached; in mode `fixed` one batch of the fixed
shape is timed instead, and the sample is evaluated once, untimed. Labels are
compared by name, and a guard checks whether another reading of the same predictions would fit the
gold labels far better: that is a mapping mistake, not a quantization effect.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from runner import effects, locks, measure

# The label guard speaks when a relabelling of the predictions beats the job's map by this much.
RELABEL_MARGIN = 0.10


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


def in_sample_order(rows: np.ndarray, order: list[int]) -> np.ndarray:
    """rows[i] belongs to sample row order[i]; back to the sample's own order."""
    restored = np.empty_like(rows)
    restored[np.asarray(order)] = rows
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

    def noise_cv(self) -> tuple[float | None, int]:
        """The spread of passes of one shape, timed passes and repeats together; and how many passes
        beyond the first of each shape it rests on. The repeats have the first timed pass's
        shape."""
        return measure.same_shape_cv(
            self.seconds + self.repeats, self.shapes + self.shapes[:1] * len(self.repeats)
        )


def fixed_shape_batch(tokenizer, batch_size: int, sequence_length: int, device: str) -> dict:
    """A batch of the same shape on every run and dataset: seeded random token ids, no padding."""
    import torch

    generator = torch.Generator().manual_seed(0)
    low = min(1000, len(tokenizer) // 2)  # past the special tokens of a BERT vocabulary
    ids = torch.randint(low, len(tokenizer), (batch_size, sequence_length), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if "token_type_ids" in tokenizer.model_input_names:
        batch["token_type_ids"] = torch.zeros_like(ids)
    return {k: v.to(device) for k, v in batch.items()}


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
) -> tuple[np.ndarray, PassTimings]:
    """Class probabilities for every sample and the timed passes.

    Dataset mode (fixed_batch None): the passes over the sample are the timed passes. Fixed mode:
    the sample is evaluated untimed, and the timed passes all run on fixed_batch. holder: who times,
    in words, for whoever waits for the machine's timing lock meanwhile.
    """
    import torch

    sync = measure.synchronizer(device)
    timed_batches = [fixed_batch] if fixed_batch is not None else batches
    probabilities, seconds, samples = [], [], 0
    with torch.inference_mode():
        if fixed_batch is not None:
            probabilities = [
                torch.softmax(model(**b).logits.float(), dim=-1).cpu() for b in batches
            ]
        # No other quantbench run on this machine times while this one warms up and times: they
        # would
        # share the cores (and the GPU). Warm-up is inside, so the clock starts on a warm machine.
        with locks.timing_lock(holder) as lock:
            for i in range(warmup_passes):
                model(**timed_batches[i % len(timed_batches)])
            # Then every batch shape not met yet, once: the first pass of a new shape pays one-time
            # costs
            # (CUDA loads kernels lazily and picks them per shape; oneDNN builds primitives per
            # shape), and
            # a timed pass must not.
            shapes_per_pass = [batch_shape(b) for b in timed_batches]
            seen = set(shapes_per_pass[:warmup_passes])
            for batch, shape in zip(timed_batches, shapes_per_pass):
                if shape not in seen:
                    seen.add(shape)
                    model(**batch)
            sync()
            # Whole passes over the sample only: every batch is timed equally often, whatever the
            # lengths.
            per_pass = len(timed_batches)
            total_passes = -(-max(per_pass, timed_passes) // per_pass) * per_pass
            repeated = total_passes - len(seen)  # at least; min_time_s may add passes
            repeats = []
            for _ in range(REPEATS_FOR_NOISE if repeated < MIN_SAME_SHAPE_PASSES else 0):
                start = time.perf_counter()
                model(**timed_batches[0])
                sync()
                repeats.append(time.perf_counter() - start)
            preempted_before = measure.preemptions()
            clock_started_at = measure.now()
            clock_started = time.perf_counter()
            i = 0
            while (
                i < total_passes or i % per_pass or time.perf_counter() - clock_started < min_time_s
            ):
                batch = timed_batches[i % len(timed_batches)]
                sync()
                start = time.perf_counter()
                logits = model(**batch).logits
                sync()
                seconds.append(time.perf_counter() - start)
                samples += batch["input_ids"].shape[0]
                if fixed_batch is None and i < len(batches):
                    probabilities.append(torch.softmax(logits.float(), dim=-1).cpu())
                i += 1
            clock_s = time.perf_counter() - clock_started
            preempted = measure.preemptions()
    rate = (
        round((preempted - preempted_before) / clock_s, 1)
        if preempted is not None and clock_s > 0
        else None
    )
    timings = PassTimings(
        seconds,
        samples,
        [shapes_per_pass[k % per_pass] for k in range(len(seconds))],
        repeats,
        rate,
        clock_started_at,
        round(clock_s, 3),
        round(lock.waited_s, 3),
        lock.warning,
    )
    return torch.cat(probabilities).numpy(), timings


def prediction_metrics(
    probabilities: np.ndarray, gold_ids: np.ndarray, label_names: list[str]
) -> dict:
    predicted = probabilities.argmax(axis=1)
    confidence = probabilities.max(axis=1)
    return {
        "accuracy": float((predicted == gold_ids).mean()),
        "macro_f1": effects.macro_f1(gold_ids, predicted, len(label_names)),
        "avg_confidence": float(confidence.mean()),
    }


def label_guard(gold_ids: np.ndarray, predicted: np.ndarray, label_names: list[str]) -> list[str]:
    """Warnings when the accuracy says more about the label map than about the model."""
    from scipy.optimize import linear_sum_assignment

    warnings = []
    k = len(label_names)
    accuracy = float((predicted == gold_ids).mean())
    counts = np.zeros((k, k), dtype=np.int64)  # rows: predicted id, columns: gold id
    np.add.at(counts, (predicted, gold_ids), 1)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    best = counts[rows, cols].sum() / len(gold_ids)
    majority = np.bincount(gold_ids, minlength=k).max() / len(gold_ids)
    # A model that predicts one class whatever it reads (untrained, collapsed) scores the majority
    # share
    # under some relabelling: that says nothing about the map. Only a relabelling that beats
    # guessing does.
    if best - accuracy >= RELABEL_MARGIN and best - majority >= RELABEL_MARGIN:
        reading = ", ".join(
            f"{label_names[r]}→{label_names[c]}" for r, c in zip(rows, cols) if r != c
        )
        warnings.append(
            f"label mapping suspect: accuracy {accuracy:.2%} under the job's label map, but "
            "reading "
            f"the predictions as {reading} gives {best:.2%}; check dataset.label_map"
        )
    if accuracy < majority:
        warnings.append(
            f"accuracy {accuracy:.2%} is below always guessing the majority class ({majority:.2%})"
        )
    return warnings
