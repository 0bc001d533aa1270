"""Evaluation: forward passes over the sample, timed one by one, and what the predictions say.

The sample is tokenized before the clock starts. Warm-up passes are not timed. Every pass of the
evaluation is timed (the per-sample latency the published study measured); timing goes on over the
sample again until both the job's minimum pass count and minimum duration are reached. Labels are
compared by name, and a guard checks whether another reading of the same predictions would fit the
gold labels far better: that is a mapping mistake, not a quantization effect.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from runner import measure

# The label guard speaks when a relabelling of the predictions beats the job's map by this much.
RELABEL_MARGIN = 0.10


def tokenize_batches(tokenizer, texts: list[str], batch_size: int, max_length: int, device: str) -> list[dict]:
    batches = []
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(texts[start:start + batch_size], padding=True, truncation=True,
                            max_length=max_length, return_tensors="pt")
        batches.append({k: v.to(device) for k, v in encoded.items()})
    return batches


@dataclass
class PassTimings:
    seconds: list[float]
    samples: int  # samples processed in timed passes


def run_passes(model, batches: list[dict], device: str, warmup_passes: int, timed_passes: int,
               min_time_s: float) -> tuple[np.ndarray, PassTimings]:
    """Class probabilities for every sample (first pass over the sample) and the timed passes."""
    import torch

    sync = measure.synchronizer(device)
    probabilities, seconds, samples = [], [], 0
    with torch.inference_mode():
        for i in range(warmup_passes):
            model(**batches[i % len(batches)])
        sync()
        total_passes = max(len(batches), timed_passes)
        clock_started = time.perf_counter()
        i = 0
        while i < total_passes or time.perf_counter() - clock_started < min_time_s:
            batch = batches[i % len(batches)]
            sync()
            start = time.perf_counter()
            logits = model(**batch).logits
            sync()
            seconds.append(time.perf_counter() - start)
            samples += batch["input_ids"].shape[0]
            if i < len(batches):
                probabilities.append(torch.softmax(logits.float(), dim=-1).cpu())
            i += 1
    return torch.cat(probabilities).numpy(), PassTimings(seconds, samples)


def prediction_metrics(probabilities: np.ndarray, gold_ids: np.ndarray, label_names: list[str]) -> dict:
    predicted = probabilities.argmax(axis=1)
    confidence = probabilities.max(axis=1)
    return {
        "accuracy": float((predicted == gold_ids).mean()),
        "macro_f1": macro_f1(gold_ids, predicted, len(label_names)),
        "avg_confidence": float(confidence.mean()),
    }


def macro_f1(gold: np.ndarray, predicted: np.ndarray, n_classes: int) -> float:
    """Mean F1 over the classes that occur in the gold labels or the predictions."""
    scores = []
    for c in range(n_classes):
        tp = int(((predicted == c) & (gold == c)).sum())
        fp = int(((predicted == c) & (gold != c)).sum())
        fn = int(((predicted != c) & (gold == c)).sum())
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else 0.0


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
    if best - accuracy >= RELABEL_MARGIN:
        reading = ", ".join(f"{label_names[r]}→{label_names[c]}" for r, c in zip(rows, cols) if r != c)
        warnings.append(f"label mapping suspect: accuracy {accuracy:.2%} under the job's label map, but reading "
                        f"the predictions as {reading} gives {best:.2%}; check dataset.label_map")
    majority = np.bincount(gold_ids, minlength=k).max() / len(gold_ids)
    if accuracy < majority:
        warnings.append(f"accuracy {accuracy:.2%} is below always guessing the majority class ({majority:.2%})")
    return warnings
