"""llama.cpp's KL statistics in the causal-LM task: the formulas on values worked out by hand, the
top-k KL against a full-vocabulary KL on the tiny Llama, what a variant's result keeps, the rows
collect shows and the report's per-token KL figure."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from conftest import typed
from lm_models import load, next_token_log_probs, rt_sentences
from lm_results import three_variants
from test_causal_lm import run_one

from runner import collect
from runner.tasks.causal_lm import kl_stats, perplexity
from runner.tasks.causal_lm import plots as report_causal_lm

TOP_K = 8


pytestmark = pytest.mark.usefixtures("private_timing_lock")


def values(n: int, kl=None, nll=None, nll_fp32=None, same_top=None) -> kl_stats.TokenValues:
    """n tokens: FP32 gives every correct token p = 0.5, the variant too, unless told."""
    half = np.full(n, math.log(2.0))
    return kl_stats.TokenValues(
        kl=np.zeros(n) if kl is None else np.asarray(kl, dtype=float),
        nll=half if nll is None else np.asarray(nll, dtype=float),
        nll_fp32=half if nll_fp32 is None else np.asarray(nll_fp32, dtype=float),
        same_top=np.ones(n, dtype=bool) if same_top is None else np.asarray(same_top),
        rest_mass=np.full(n, 0.25),
    )


# ---------------------------------------------------------------------------------------------
# llama.cpp's formulas, on numbers a reader can check.


def test_kl_percentiles_interpolate_between_sorted_tokens_as_llama_cpp_does():
    kl = np.arange(1001)[::-1] / 1000.0  # 0, 0.001, ..., 1 in any order
    stats = kl_stats.kl_statistics(values(1001, kl=kl))["kl"]
    assert stats["max"] == 1.0 and stats["min"] == 0.0 and stats["median"] == 0.5
    expected = {"99.9": 0.999, "99": 0.99, "95": 0.95, "90": 0.9, "50": 0.5}
    expected |= {"10": 0.1, "5": 0.05, "1": 0.01, "0.1": 0.001}
    assert stats["percentiles"] == pytest.approx(expected)
    # Its standard error: sqrt(population variance / (n - 1)).
    assert stats["mean_uncertainty"] == pytest.approx(np.std(kl) / math.sqrt(1000))
    # Between two tokens: 99% of 0..10 (n = 11) lies at 0.99 * 10 = 9.9.
    small = kl_stats.kl_statistics(values(11, kl=np.arange(11.0)))["kl"]
    assert small["percentiles"]["99"] == pytest.approx(9.9)


def test_delta_p_is_the_change_in_the_correct_tokens_probability():
    # FP32 gives 0.5 everywhere; the variant 0.6 on half the tokens and 0.4 on the rest.
    nll = -np.log(np.array([0.6, 0.4] * 50))
    stats = kl_stats.kl_statistics(values(100, nll=nll))["delta_p"]
    assert stats["mean"] == pytest.approx(0.0, abs=1e-12)
    assert stats["mean_uncertainty"] == pytest.approx(0.1 / math.sqrt(99))
    assert stats["rms"] == pytest.approx(0.1)
    assert stats["rms_uncertainty"] == pytest.approx(0.0, abs=1e-9)  # every Δp² is 0.01
    assert stats["max"] == pytest.approx(0.1) and stats["min"] == pytest.approx(-0.1)
    assert stats["percentiles"]["75"] == pytest.approx(0.1)


def test_same_top_rate_has_the_binomial_uncertainty():
    same = np.array([True] * 90 + [False] * 10)
    stats = kl_stats.kl_statistics(values(100, same_top=same))["same_top"]
    assert stats == pytest.approx({"rate": 0.9, "uncertainty": math.sqrt(0.9 * 0.1 / 99)})


def test_ln_ppl_ratio_uncertainty_uses_the_correlation_of_the_two_nlls():
    rng = np.random.default_rng(0)
    nll_fp32 = rng.gamma(2.0, 1.0, size=400)  # some tokens hard for both models
    nll = nll_fp32 + 0.05 + rng.normal(0.0, 0.1, size=400)
    ratio = kl_stats.ln_ppl_ratio(nll, nll_fp32)
    assert ratio["value"] == pytest.approx(np.mean(nll) - np.mean(nll_fp32))
    # Correlated NLLs: the uncertainty is the paired difference's standard error, far below
    # the one of two independent means.
    difference = nll - nll_fp32
    assert ratio["uncertainty"] == pytest.approx(np.std(difference) / math.sqrt(399))
    independent = math.sqrt(np.var(nll) / 399 + np.var(nll_fp32) / 399)
    assert ratio["uncertainty"] < independent / 5
    assert 0.95 < ratio["correlation"] <= 1.0
    assert math.exp(ratio["value"]) == pytest.approx(
        math.exp(np.mean(nll)) / math.exp(np.mean(nll_fp32))
    )


def test_ten_tokens_or_fewer_give_no_uncertainty():
    stats = kl_stats.kl_statistics(values(10, kl=np.arange(10.0)))
    assert stats["kl"]["mean_uncertainty"] is None
    assert stats["ln_ppl_ratio"]["uncertainty"] is None
    assert stats["kl"]["mean"] == 4.5


def test_the_histogram_counts_every_token_once():
    kl = np.array([0.0, 1e-9, 1e-6, 2e-3, 0.5, 0.5, 100.0, 250.0])
    histogram = kl_stats.kl_statistics(values(8, kl=kl))["kl_histogram"]
    assert histogram["below"] == 2 and histogram["above"] == 1
    assert sum(histogram["counts"]) + histogram["below"] + histogram["above"] == 8
    assert len(histogram["counts"]) == len(histogram["edges"]) - 1 == 32
    assert histogram["edges"][0] == 1e-6 and histogram["edges"][-1] == 100.0


# ---------------------------------------------------------------------------------------------
# The top-k KL against the full vocabulary's, on the tiny Llama.


def perturbed(model, seed: int = 1, scale: float = 0.05):
    """A copy of the model with noise on every weight: a variant that moves every distribution."""
    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in other.parameters():
            parameter += scale * torch.randn(parameter.shape, generator=generator)
    return other


def full_kls(reference, variant, windows) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per scored token, from each window's own unpadded forward passes over the whole vocabulary
    in float64: KL(reference || variant), and both log-softmaxes."""
    kls, p_logs, q_logs = [], [], []
    for window in windows:
        p_log = next_token_log_probs(reference, window.input_ids)[-window.scored :]
        q_log = next_token_log_probs(variant, window.input_ids)[-window.scored :]
        kls.append((p_log.exp() * (p_log - q_log)).sum(-1).numpy())
        p_logs.append(p_log.numpy())
        q_logs.append(q_log.numpy())
    return np.concatenate(kls), np.concatenate(p_logs), np.concatenate(q_logs)


def test_a_top_k_kl_bounds_the_full_vocabulary_kl_from_below(llama):
    fp32, tokenizer = load(llama)
    variant = perturbed(fp32).eval()
    windows = perplexity.document_windows(tokenizer, rt_sentences()[:6], 16, 8)
    reference = perplexity.window_losses(fp32, windows, "cpu", 4, tokenizer.pad_token_id, TOP_K)
    at = [loss.top_ids for loss in reference]
    moved = perplexity.window_losses(variant, windows, "cpu", 4, tokenizer.pad_token_id, 0, at)
    top_k = kl_stats.token_values(reference, moved)
    full, p_log, q_log = full_kls(fp32, variant, windows)
    assert len(full) == len(top_k.kl) > 50
    assert np.all(top_k.kl <= full + 1e-5)
    assert np.mean(top_k.kl) < np.mean(full)  # strictly below: the rest holds mass
    # The gap is the rest's mass times the KL of the two distributions within the rest
    # (the chain rule of KL): small when FP32 puts little mass outside its top-k.
    rest = np.ones_like(p_log, dtype=bool)
    np.put_along_axis(rest, np.concatenate(at), False, axis=-1)
    p_rest, q_rest = np.where(rest, np.exp(p_log), 0.0), np.where(rest, np.exp(q_log), 0.0)
    p_in, q_in = p_rest / p_rest.sum(-1, keepdims=True), q_rest / q_rest.sum(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        within = np.where(p_in > 0, p_in * np.log(p_in / q_in), 0.0).sum(-1)
    np.testing.assert_allclose(full - top_k.kl, top_k.rest_mass * within, atol=2e-5)


def test_a_top_k_over_the_whole_vocabulary_is_the_full_kl(llama):
    fp32, tokenizer = load(llama)
    variant = perturbed(fp32).eval()
    windows = perplexity.document_windows(tokenizer, rt_sentences()[:2], 16, 8)
    reference = perplexity.window_losses(fp32, windows, "cpu", 4, None, len(tokenizer))
    at = [loss.top_ids for loss in reference]
    moved = perplexity.window_losses(variant, windows, "cpu", 4, None, 0, at)
    full, _, _ = full_kls(fp32, variant, windows)
    np.testing.assert_allclose(kl_stats.token_values(reference, moved).kl, full, atol=2e-5)


# ---------------------------------------------------------------------------------------------
# What a variant's result keeps.


def test_a_variant_keeps_llama_cpps_statistics_and_fp32_agrees_with_itself(tmp_path, llama):
    fp32, _ = run_one(tmp_path / "fp32", llama, "fp32")
    int8, _ = run_one(tmp_path / "int8", llama, "int8-dynamic")
    same, moved = fp32["metrics"]["kl_stats"], int8["metrics"]["kl_stats"]
    tokens = int8["metrics"]["scored_tokens"]
    assert same["tokens"] == moved["tokens"] == tokens
    assert same["same_top"] == {"rate": 1.0, "uncertainty": 0.0}
    assert same["kl"]["max"] < 1e-6 and same["delta_p"]["rms"] < 1e-6
    assert same["ln_ppl_ratio"]["value"] == pytest.approx(0.0, abs=1e-6)
    assert moved["kl"]["mean"] == pytest.approx(int8["metrics"]["kl_vs_fp32"], rel=1e-5)
    assert moved["kl"]["max"] >= moved["kl"]["percentiles"]["99"] >= moved["kl"]["median"] > 0
    assert 0 < moved["same_top"]["rate"] < 1 and moved["delta_p"]["rms"] > 0
    ratio = math.log(int8["metrics"]["perplexity"] / fp32["metrics"]["perplexity"])
    assert moved["ln_ppl_ratio"]["value"] == pytest.approx(ratio, abs=1e-4)
    histogram = moved["kl_histogram"]
    assert sum(histogram["counts"]) + histogram["below"] + histogram["above"] == tokens
    assert 0 < moved["rest_mass"]["mean"] <= moved["rest_mass"]["max"] < 1
    assert len(json.dumps(moved)) < 3000  # statistics, not per-token arrays


# ---------------------------------------------------------------------------------------------
# collect's rows and the report's figure.


KL_ROWS = [
    "token KL median (nats)",
    "token KL p99 (nats)",
    "Δp RMS, correct token",
    "same top token as FP32",
    "same top token ± s.e.",
]


def with_kl_stats() -> list[dict]:
    """three_variants, the int8 one with statistics from 100 hand-made tokens (KL 0 .. 0.99,
    90 of them with FP32's top token); the others without (results from before them)."""
    results = three_variants()
    made = values(100, kl=np.arange(100) / 100.0, same_top=np.arange(100) >= 10)
    results[1]["metrics"]["kl_stats"] = kl_stats.kl_statistics(made)
    return results


def test_collect_shows_the_headline_kl_statistics():
    (table,) = collect.build_tables(typed(with_kl_stats()))
    assert [row.label for row in table.rows if row.label in KL_ROWS] == KL_ROWS
    _, rows, _ = collect.table_rows(table)
    by_label = {row[0]: row for row in rows}
    # Columns: fp32-cpu, then int8-dynamic-cpu and its Δ, then bnb-nf4-cpu and its Δ.
    assert by_label["token KL median (nats)"][1:4] == ["–", "0.495", ""]
    assert by_label["token KL p99 (nats)"][2] == "0.98"
    assert by_label["Δp RMS, correct token"][2] == "0.0000"
    assert by_label["same top token as FP32"][2] == "0.9000"
    assert by_label["same top token ± s.e."][2] == f"{math.sqrt(0.09 / 99):.4f}"
    assert by_label["same top token as FP32"][4] == "–"


def test_the_report_draws_each_variants_kl_distribution():
    (table,) = collect.build_tables(typed(with_kl_stats()))
    figure = report_causal_lm.plot_kl_distribution(table)
    (ax,) = [ax for ax in figure.axes if ax.get_visible()]
    assert ax.get_title() == "int8-dynamic-cpu\nmedian 0.495, 99% 0.98; 1 tokens < 1e-06"
    (stairs,) = ax.patches
    assert stairs.get_data().values.sum() == 99  # every token but the one at 0
    assert ax.get_xscale() == "log"
    (older,) = collect.build_tables(typed(three_variants()))
    assert report_causal_lm.plot_kl_distribution(older) is None
