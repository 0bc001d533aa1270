"""Causal-LM results built by hand for collect and report: three rolling windows of two documents,
small numbers whose agreement, perplexity and bootstrap interval a reader can check on paper.

The windows score [4, 2, 2] tokens (documents [0, 0, 1]). The baseline's NLL is 2.0 nats on every
token; each variant gives its own NLL per token on each window. Results are dicts in the shape a
worker writes (runner/results.py), so they go through write_result and load_result unchanged.
"""

from __future__ import annotations

import math

from conftest import ok_result_head

DOCUMENTS = [0, 0, 1]
TOKENS = [4, 2, 2]
N_BYTES = 40  # the documents' UTF-8 bytes: bits_per_byte's denominator
BASELINE_GREEDY = [[1, 2, 3, 4], [5, 6], [7, 8]]


def lm_result(
    variant: str,
    per_token_nll: list[float],
    greedy: list[list[int]],
    decode_tokens_per_s: float,
    size_mib: float,
    latency_median_ms: float = 10.0,
    tolerances: dict | None = None,
    fingerprint: str = "docs-3",
    task: str = "causal-lm",
) -> dict:
    """One ok causal-LM result; its metrics follow from the per-token NLL of each window."""
    head = ok_result_head("tiny-lm", variant)
    nll = [round(n * t, 6) for n, t in zip(per_token_nll, TOKENS)]
    mean_nll = sum(nll) / sum(TOKENS)
    spec = {"name": "tiny-lm", "task": task, "baseline": "fp32-cpu"}
    return {
        **head,
        "metrics": {
            "model_size_mib": size_mib,
            "perplexity": math.exp(mean_nll),
            "bits_per_byte": sum(nll) / (math.log(2) * N_BYTES),
            "mean_nll": mean_nll,
            "scored_tokens": sum(TOKENS),
            "kl_vs_fp32": 0.0 if head["precision"] == "fp32" else 0.01,
            "time_to_first_token_ms": 1000.0 / decode_tokens_per_s,
            "decode_tokens_per_s": decode_tokens_per_s,
            "generation": generation(decode_tokens_per_s),
            "latency_ms": {"mean": latency_median_ms, "median": latency_median_ms},
            "peak_rss_mib": 500.0,
            "load_s": 0.5,
            "quantize_s": 0.1,
        },
        "settings": {},
        "environment": {"host": "box", "cpu": {"model": "test cpu"}},
        "spec_hash": "lm",
        "spec": {**spec, **({"tolerances": tolerances} if tolerances else {})},
        "sample": {"fingerprint": fingerprint},
        "predictions": {
            "windows": {"document": list(DOCUMENTS), "tokens": list(TOKENS), "nll": nll},
            "greedy": greedy,
        },
    }


def generation(decode_tokens_per_s: float) -> dict:
    """Batch sizes 1 and 8; the first is the one the table shows."""

    def at(batch_size: int) -> dict:
        speed = decode_tokens_per_s * batch_size
        return {
            "batch_size": batch_size,
            "time_to_first_token_ms": 1000.0 / decode_tokens_per_s,
            "decode_tokens_per_s": speed,
            "decode_ms_per_token": {"median": 1000.0 * batch_size / speed},
            "kv_cache_mib": 0.75 * batch_size,
        }

    return {
        "prompt_length": 32,
        "new_tokens": 32,
        "batch_sizes": [1, 8],
        "by_batch_size": {"1": at(1), "8": at(8)},
    }


def three_variants(tolerances: dict | None = None) -> list[dict]:
    """FP32 (the baseline), int8 (one window better, one worse: within noise) and nf4 (every
    window worse: beyond noise)."""
    return [
        lm_result("fp32-cpu", [2.0, 2.0, 2.0], BASELINE_GREEDY, 100.0, 400.0, 10.0, tolerances),
        lm_result(
            "int8-dynamic-cpu",
            [1.9, 2.0, 2.3],
            [[1, 2, 3, 9], [5, 6], [0, 8]],  # 6 of 8 positions as the baseline
            250.0,
            100.0,
            20.0,  # slower per window pass than FP32, faster to decode
            tolerances,
        ),
        lm_result(
            "bnb-nf4-cpu",
            [2.1, 2.2, 2.4],
            [[1, 2, 3, 4], [5, 6], [7, 0]],  # 7 of 8
            180.0,
            60.0,
            15.0,
            tolerances,
        ),
    ]
