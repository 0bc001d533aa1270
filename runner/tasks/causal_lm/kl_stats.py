"""llama.cpp's `--kl-divergence` statistics of a variant against FP32, from per-token values.

llama.cpp's perplexity tool (tools/perplexity/perplexity.cpp, kl_divergence) reports, over every
scored token: KL(base || quantized) percentiles, the change Δp in the probability of the correct
(next) token, how often both models' most probable token is the same, and ln(PPL(Q)/PPL(base))
with an uncertainty that uses the correlation of the two models' NLLs. The same numbers here, by
the same formulas, with one difference: the KL is over FP32's top-k tokens and one bin for the rest
of the vocabulary (runner/tasks/causal_lm/perplexity.py), a lower bound of the full KL; see
docs/causal-lm.md. Per-token arrays live only while the statistics are computed: a result keeps
the statistics and a histogram of the per-token KL with fixed edges, for the report's figure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from runner.tasks.causal_lm.perplexity import WindowLoss

# llama.cpp's rows, highest first; 50 is the median.
KL_PERCENTILES = (99.9, 99.0, 95.0, 90.0, 50.0, 10.0, 5.0, 1.0, 0.1)
DELTA_P_PERCENTILES = (99.9, 99.0, 95.0, 90.0, 75.0, 50.0, 25.0, 10.0, 5.0, 1.0, 0.1)
# llama.cpp reports no uncertainty from 10 tokens or fewer.
FEWEST_FOR_UNCERTAINTY = 11
# The histogram's edges, nats: 4 bins a decade from 1e-6 to 100. A KL spans decades, so the bins
# are even on a log axis; the counts below the first edge (0 included) and above the last are
# kept apart. Fixed edges let two variants' histograms be read on one axis.
HISTOGRAM_EDGES = tuple(float(f"{10.0 ** (e / 4):.6g}") for e in range(-24, 9))


@dataclass
class TokenValues:
    """Per scored token, in window order: what the statistics are computed from."""

    kl: np.ndarray  # KL(FP32 || variant), nats, binned over FP32's top-k and the rest
    nll: np.ndarray  # the variant's NLL of the correct token, nats
    nll_fp32: np.ndarray  # FP32's
    same_top: np.ndarray  # bool: both models' most probable token is the same
    rest_mass: np.ndarray  # FP32's probability outside its top-k (the KL's one bin)


def token_values(reference: Sequence[WindowLoss], variant: Sequence[WindowLoss]) -> TokenValues:
    """reference: FP32's losses with top_k; variant: the variant's at the reference's top_ids
    (perplexity.window_losses with log_probs_at), window for window."""
    pairs = list(zip(reference, variant, strict=True))
    return TokenValues(
        kl=np.concatenate([token_kls(ref, var) for ref, var in pairs]),
        nll=-np.concatenate([var.target_log_probs for _, var in pairs]).astype(np.float64),
        nll_fp32=-np.concatenate([ref.target_log_probs for ref, _ in pairs]).astype(np.float64),
        same_top=np.concatenate(
            [np.asarray(ref.greedy_ids) == np.asarray(var.greedy_ids) for ref, var in pairs]
        ),
        rest_mass=np.exp(np.concatenate([ref.rest_log_prob for ref, _ in pairs]).astype(float)),
    )


def token_kls(ref: WindowLoss, var: WindowLoss) -> np.ndarray:
    """[tokens] KL(reference || variant) of each scored token, over the reference's top-k and one
    bin for the rest; 0 log 0 = 0, and the few 1e-9 below 0 that float32 leaves read as 0."""
    p_log = np.concatenate([ref.top_log_probs, ref.rest_log_prob[:, None]], axis=-1)
    q_log = np.concatenate([var.top_log_probs, var.rest_log_prob[:, None]], axis=-1)
    p_log, q_log = p_log.astype(np.float64), q_log.astype(np.float64)
    p = np.exp(p_log)
    with np.errstate(invalid="ignore"):
        terms = np.where(p > 0, p * (p_log - q_log), 0.0)
    return np.maximum(terms.sum(axis=-1), 0.0)


def mean_and_uncertainty(values: np.ndarray) -> tuple[float, float | None]:
    """The mean and its standard error, as llama.cpp's mean_and_uncertainty: sqrt(population
    variance / (n - 1)); None from 10 values or fewer."""
    mean = float(np.mean(values))
    if len(values) < FEWEST_FOR_UNCERTAINTY:
        return mean, None
    variance = float(np.mean(values * values)) - mean * mean
    return mean, float(np.sqrt(max(variance, 0.0) / (len(values) - 1)))


def percentiles(values: np.ndarray, which: Sequence[float]) -> dict[str, float]:
    """{"99.9": ..., "50": ...}: linear interpolation between the sorted values at
    fraction * (n - 1), llama.cpp's rule and numpy's default."""
    found = np.percentile(values, which)
    return {f"{q:g}": float(v) for q, v in zip(which, found)}


def kl_statistics(values: TokenValues) -> dict:
    """The statistics a result keeps (metrics.kl_stats; docs/results.md names every field)."""
    if len(values.kl) == 0:
        raise ValueError("no scored tokens: the KL statistics need at least one")
    return {
        "tokens": len(values.kl),
        "kl": _kl_summary(values.kl),
        "delta_p": _delta_p_summary(np.exp(-values.nll) - np.exp(-values.nll_fp32)),
        "same_top": _same_top(values.same_top),
        "ln_ppl_ratio": ln_ppl_ratio(values.nll, values.nll_fp32),
        "rest_mass": {
            "mean": float(np.mean(values.rest_mass)),
            "max": float(np.max(values.rest_mass)),
        },
        "kl_histogram": kl_histogram(values.kl),
    }


def _kl_summary(kl: np.ndarray) -> dict:
    mean, uncertainty = mean_and_uncertainty(kl)
    return {
        "mean": mean,
        "mean_uncertainty": uncertainty,
        "median": float(np.median(kl)),
        "max": float(np.max(kl)),
        "min": float(np.min(kl)),
        "percentiles": percentiles(kl, KL_PERCENTILES),
    }


def _delta_p_summary(delta_p: np.ndarray) -> dict:
    """Δp = p_variant(correct token) - p_FP32(correct token). The RMS's uncertainty is the mean
    square's, carried through the square root: d sqrt(x) = dx / (2 sqrt(x))."""
    mean, uncertainty = mean_and_uncertainty(delta_p)
    mean_square, square_uncertainty = mean_and_uncertainty(delta_p * delta_p)
    rms = float(np.sqrt(mean_square))
    rms_uncertainty = None
    if square_uncertainty is not None and rms > 0:
        rms_uncertainty = 0.5 / rms * square_uncertainty
    return {
        "mean": mean,
        "mean_uncertainty": uncertainty,
        "rms": rms,
        "rms_uncertainty": rms_uncertainty,
        "max": float(np.max(delta_p)),
        "min": float(np.min(delta_p)),
        "percentiles": percentiles(delta_p, DELTA_P_PERCENTILES),
    }


def _same_top(same: np.ndarray) -> dict:
    """The share of tokens whose most probable next token is FP32's, with the binomial standard
    error sqrt(p (1 - p) / (n - 1)), as llama.cpp gives it."""
    rate, n = float(np.mean(same)), len(same)
    uncertainty = float(np.sqrt(rate * (1 - rate) / (n - 1))) if n > 1 else None
    return {"rate": rate, "uncertainty": uncertainty}


def ln_ppl_ratio(nll: np.ndarray, nll_fp32: np.ndarray) -> dict:
    """ln(PPL(variant) / PPL(FP32)) = mean NLL - FP32's mean NLL, over the same tokens. The two
    means are correlated (the same text is hard for both), so the uncertainty subtracts their
    covariance: sqrt(se² + se_fp32² - 2 cov), which is the standard error of the per-token
    difference; correlation is cov / (se se_fp32), as llama.cpp prints it."""
    mean, se = mean_and_uncertainty(nll)
    mean_fp32, se_fp32 = mean_and_uncertainty(nll_fp32)
    out = {"value": mean - mean_fp32, "uncertainty": None, "correlation": None}
    if se is None or se_fp32 is None:
        return out
    n = len(nll)
    covariance = (float(np.mean(nll * nll_fp32)) - mean * mean_fp32) / (n - 1)
    out["uncertainty"] = float(np.sqrt(max(se * se + se_fp32 * se_fp32 - 2 * covariance, 0.0)))
    if se > 0 and se_fp32 > 0:
        out["correlation"] = covariance / (se * se_fp32)
    return out


def kl_histogram(kl: np.ndarray) -> dict:
    """Counts of the per-token KL between HISTOGRAM_EDGES, and those below and above them."""
    edges = np.asarray(HISTOGRAM_EDGES)
    counts, _ = np.histogram(kl, bins=edges)
    return {
        "edges": list(HISTOGRAM_EDGES),
        "counts": [int(c) for c in counts],
        "below": int(np.sum(kl < edges[0])),
        "above": int(np.sum(kl > edges[-1])),  # the last bin holds its right edge
    }
