"""A causal LM's part of `collect`: its metric rows, and what its per-window predictions say against
the baseline's: greedy agreement (the share of scored positions whose most probable next token is
the baseline's) and the perplexity delta with a paired bootstrap over the rolling windows.

Windows pair one to one when both results scored the same sample (its fingerprint) cut into the
same windows (each window's document and scored tokens). Perplexity is token-weighted, as
runner/tasks/perplexity.py computes it: exp(sum nll / sum tokens) over the windows. KL vs FP32 is
the worker's, measured against the FP32 model whatever the baseline is; the generation numbers are
those of the job's first generation batch size (metrics.generation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Required, TypedDict

import numpy as np

from runner.records import Record
from runner.schema import Result
from runner.tasks import statistics
from runner.tasks.causal_lm import benchmark_compare
from runner.tasks.task import (
    BOOTSTRAP,
    NOISE_MARK,
    Check,
    Compared,
    Row,
    Tolerance,
    metric,
    sample_note,
)


class Windows(TypedDict, total=False):
    """Per rolling window, in window order: its document, its scored tokens, its summed NLL and
    its summed KL(FP32 || variant), nats."""

    document: Required[list[int]]
    tokens: Required[list[int]]
    nll: Required[list[float]]
    kl: list[float] | None


@dataclass
class WindowPredictions(Record):
    """A causal LM's per-window record (result.predictions): the windows' scores, and per window
    the most probable next token at each scored position."""

    windows: Windows | None = None
    greedy: list[list[int]] | None = None
    benchmarks: dict | None = None  # per lm-eval task, per item (docs/benchmarks.md)

    @classmethod
    def invariant(cls, data: dict, where: str) -> str | None:
        """One entry per window in every list, one greedy token per scored one."""
        windows = data.get("windows")
        if windows is None:
            return None
        count = len(windows["nll"])
        for key in ("document", "tokens", "kl"):
            if windows.get(key) is not None and len(windows[key]) != count:
                return f"{where}.windows.{key}: {len(windows[key])} values for {count} windows"
        greedy = data.get("greedy")
        if greedy is not None:
            if len(greedy) != count:
                return f"{where}.greedy: {len(greedy)} windows where windows.nll has {count}"
            for i, (ids, tokens) in enumerate(zip(greedy, windows["tokens"])):
                if len(ids) != tokens:
                    return f"{where}.greedy[{i}]: {len(ids)} tokens for {tokens} scored"
        return None


def first_batch_size(result: Result) -> dict:
    """metrics.generation's numbers at the job's first batch size ({} where there are none)."""
    generation = result.metrics.value("generation") or {}
    sizes = generation.get("batch_sizes") or []
    by_size = generation.get("by_batch_size") or {}
    if not sizes:
        return {}
    # JSON keys are strings; a result built in memory may still hold ints.
    return by_size.get(str(sizes[0])) or by_size.get(sizes[0]) or {}


def _generation(name: str):
    return lambda r, s: first_batch_size(r).get(name)


def _kl_stat(group: str, name: str):
    """One of metrics.kl_stats' numbers (runner/tasks/causal_lm/kl_stats.py), None without."""
    return lambda r, s: ((r.metrics.value("kl_stats") or {}).get(group) or {}).get(name)


def _kl_percentile(which: str):
    return lambda r, s: (_kl_stat("kl", "percentiles")(r, s) or {}).get(which)


def _decode_ms_per_token(result: Result, stats: dict) -> float | None:
    return (first_batch_size(result).get("decode_ms_per_token") or {}).get("median")


def _perplexity_delta(result: Result, stats: dict) -> float | None:
    return ((stats.get("significance") or {}).get("perplexity") or {}).get("delta")


ROWS = (
    Row("perplexity", metric("perplexity"), 4, noise="perplexity", carries_warnings=True),
    Row(
        "perplexity Δ vs baseline (abs)",
        _perplexity_delta,
        4,
        delta=False,
        signed=True,
        noise="perplexity",
    ),
    Row("bits per byte", metric("bits_per_byte"), 4),
    Row("mean NLL (nats/token)", metric("mean_nll"), 4),
    Row("scored tokens", metric("scored_tokens"), 0, delta=False),
    Row("greedy agreement with baseline", lambda r, s: s.get("agreement"), 4, delta=False),
    Row("KL vs FP32 (nats/token)", metric("kl_vs_fp32"), None, delta=False),
    Row("generation batch size", _generation("batch_size"), 0, delta=False),
    Row("time to first token (ms)", metric("time_to_first_token_ms"), 2),
    Row("decode tokens/s", metric("decode_tokens_per_s"), 1),
    Row("decode ms/token median", _decode_ms_per_token, 3),
    Row("KV cache (MiB)", _generation("kv_cache_mib"), 2),
    Row("token KL median (nats)", _kl_stat("kl", "median"), None, delta=False),
    Row("token KL p99 (nats)", _kl_percentile("99"), None, delta=False),
    Row("Δp RMS, correct token", _kl_stat("delta_p", "rms"), 4, delta=False),
    Row("same top token as FP32", _kl_stat("same_top", "rate"), 4, delta=False),
    Row("same top token ± s.e.", _kl_stat("same_top", "uncertainty"), 4, delta=False),
)


# ---------------------------------------------------------------------------------------------
# Statistics: one plain dict per variant.


def compare(result: Result, baseline: Result | None) -> Compared:
    """The windows' statistics (_compare_windows) and the benchmarks' (benchmark_compare.py:
    benchmarks, min_recovery, and their intervals in significance); benchmarks pair whatever
    the perplexity sample or convention."""
    compared = _compare_windows(result, baseline)
    if result.status != "ok" or baseline is None:
        return compared
    found, notes = benchmark_compare.compare(result, baseline)
    if not found:
        return compared
    stats = compared.stats
    significance = dict(stats.get("significance") or {})
    within = dict(significance.get("within_noise") or {})
    for key, interval in found.pop("significance").items():
        significance[key], within[key] = interval, interval["within_noise"]
    stats["significance"] = {**significance, "within_noise": within} if within else None
    refused = found.pop("refused_deltas")
    if refused:
        stats["refused_deltas"] = [*stats.get("refused_deltas", []), *refused]
    stats.update(found)
    return Compared(stats, compared.notes + notes)


def _compare_windows(result: Result, baseline: Result | None) -> Compared:
    """{agreement, perplexity_increase, significance, window_nll_delta}.

    agreement: greedy agreement with the baseline (1.0 in the baseline's own column);
    perplexity_increase: (perplexity - the baseline's) / the baseline's, on the same sample;
    significance: {"perplexity": effects.paired_bootstrap_perplexity, "within_noise":
    {"perplexity": ...}}; window_nll_delta: per window, the variant's NLL minus the baseline's in
    nats per scored token. None where they cannot be computed; the notes say why.
    """
    stats = {
        "agreement": None,
        "perplexity_increase": None,
        "significance": None,
        "window_nll_delta": None,
    }
    if result.status != "ok" or baseline is None:
        return Compared(stats)
    other_sample = sample_note(result, baseline)
    if other_sample:
        return Compared(stats, [other_sample])
    convention = convention_note(result, baseline)
    if convention and result is not baseline:
        # Every number that depends on which tokens were scored from which context.
        stats["refused_deltas"] = ["perplexity", "bits per byte", "mean NLL (nats/token)"]
        return Compared(stats, [convention])
    compared = _paired(result, baseline, stats)
    compared.notes[:0] = [convention] if convention else []
    return compared


def _paired(result: Result, baseline: Result, stats: dict) -> Compared:
    """compare's statistics for a result of the baseline's sample and convention."""
    stats["perplexity_increase"] = _relative_increase(result, baseline)
    mine, theirs = _windows(result), _windows(baseline)
    if theirs is None or mine is None:
        # Said once, in the baseline's column, when the baseline is what lacks them.
        said = result is baseline or theirs is not None
        note = "no per-window predictions: no greedy agreement or perplexity interval"
        return Compared(stats, [note] if said else [])
    if mine["document"] != theirs["document"] or mine["tokens"] != theirs["tokens"]:
        note = (
            "its windows are not the baseline's (other documents or scored tokens per window): "
            "no greedy agreement or perplexity interval"
        )
        return Compared(stats, [note])
    stats["agreement"] = greedy_agreement(result.predictions.greedy, baseline.predictions.greedy)
    if result is not baseline:
        stats.update(_against_baseline(mine, theirs))
    return Compared(stats)


def convention_of(result: Result) -> str:
    """settings.perplexity.convention; results from before it could be chosen are rolling."""
    return (result.settings.get("perplexity") or {}).get("convention") or "rolling"


def convention_note(result: Result, baseline: Result) -> str | None:
    """The perplexity convention, said in the baseline's column; why there is no delta, in a
    column whose convention is not the baseline's; None otherwise."""
    mine, theirs = convention_of(result), convention_of(baseline)
    if result is baseline:
        return f"perplexity in the {mine} convention (docs/causal-lm.md)"
    if mine == theirs:
        return None
    return (
        f"perplexity in the {mine} convention, the baseline's in {theirs}: no delta of perplexity, "
        "bits per byte or NLL, no perplexity increase or agreement (the two score other tokens "
        "from other context: their difference is not the quantization's)"
    )


def _windows(result: Result) -> dict | None:
    return (result.predictions.windows if result.predictions else None) or None


def _relative_increase(result: Result, baseline: Result) -> float | None:
    mine, theirs = result.metrics.value("perplexity"), baseline.metrics.value("perplexity")
    if mine is None or not theirs:
        return None
    return (mine - theirs) / theirs


def greedy_agreement(variant: list[list[int]] | None, baseline: list[list[int]] | None):
    """The share of scored positions, over all windows, where the two greedy next tokens are the
    same; None when either result kept none."""
    if not variant or not baseline:
        return None
    same = sum(int(np.sum(np.asarray(v) == np.asarray(b))) for v, b in zip(variant, baseline))
    total = sum(len(b) for b in baseline)
    return same / total if total else None


def _against_baseline(mine: dict, theirs: dict) -> dict:
    tokens = np.asarray(theirs["tokens"], dtype=np.float64)
    perplexity = statistics.paired_bootstrap_perplexity(
        tokens, theirs["nll"], mine["nll"], **BOOTSTRAP
    )
    per_token = (np.asarray(mine["nll"]) - np.asarray(theirs["nll"])) / tokens
    return {
        "significance": {
            "perplexity": perplexity,
            "within_noise": {"perplexity": perplexity["within_noise"]},
        },
        "window_nll_delta": [round(float(d), 6) for d in per_token],
    }


# ---------------------------------------------------------------------------------------------
# The tolerances only a causal LM measures, the verdict's pick, and the within-noise mark.


MIN_GREEDY_AGREEMENT = Tolerance(
    "min_agreement",
    "share of samples predicted as the baseline predicts them",
    Check("greedy agreement", lambda r, s, b: s["agreement"], "{:.4f}", against_baseline=True),
    at_most=1.0,
)
MAX_PERPLEXITY_INCREASE = Tolerance(
    "max_perplexity_increase",
    "perplexity above the baseline's, as a fraction (0.05 = 5% higher)",
    Check(
        "perplexity increase",
        lambda r, s, b: s["perplexity_increase"],
        "{:.4f}",
        against_baseline=True,
    ),
)

MIN_RECOVERY = Tolerance(
    "min_recovery",
    "lowest benchmark recovery, score / the baseline's over the tasks' primary metrics (0.99)",
    Check(
        "benchmark recovery",
        lambda r, s, b: s.get("min_recovery"),
        "{:.4f}",
    ),  # not measured: no benchmark, or one not paired with the baseline's (the notes say why)
    at_most=1.0,
)


def fastest_decode(result: Result) -> tuple:
    """Sort key of the verdict's pick: the most decode tokens/s, the smaller model on a tie."""
    metrics = result.metrics
    speed = metrics.value("decode_tokens_per_s")
    return (speed is None, -(speed or 0.0), metrics.model_size_mib or 0.0)


NOISE_RULE = (
    f"{NOISE_MARK} within noise: the {BOOTSTRAP['confidence']:.0%} paired-bootstrap interval of "
    f"the perplexity delta ({BOOTSTRAP['n_resamples']} resamples of the windows, each side's "
    "perplexity recomputed token-weighted) contains 0, and for a benchmark's score that of its "
    "delta over the items; a delta without the mark is beyond noise"
)
