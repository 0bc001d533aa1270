"""The clock's arithmetic: the latency distribution, its interval, and when a machine is called noisy."""

from __future__ import annotations

import numpy as np
import pytest

from runner import measure


def test_latency_stats_match_numpy_in_milliseconds():
    rng = np.random.default_rng(0)
    seconds = list(rng.lognormal(mean=-4, sigma=0.3, size=501))
    stats = measure.latency_stats(seconds)
    ms = np.array(seconds) * 1000
    assert stats["n"] == 501
    for name, expected in [("mean", ms.mean()), ("median", np.median(ms)), ("std", ms.std(ddof=1)),
                           ("p90", np.percentile(ms, 90)), ("p99", np.percentile(ms, 99)),
                           ("min", ms.min()), ("max", ms.max())]:
        assert stats[name] == pytest.approx(expected, abs=1e-3), name
    low, high = stats["median_ci95"]
    assert low < stats["median"] < high
    # About 1.96 standard errors of the median either side: narrow for 501 samples.
    assert (high - low) / stats["median"] < 0.1


def test_identical_passes_are_not_noisy_and_scattered_ones_are():
    steady = [0.010, 0.0101, 0.0099, 0.0100, 0.0102]
    scattered = [0.010, 0.014, 0.009, 0.020, 0.011]
    assert measure.noisy_warning({"repeat_cv": measure.repeat_cv(steady)}) is None
    warning = measure.noisy_warning({"repeat_cv": measure.repeat_cv(scattered)})
    assert warning and "noisy" in warning


def test_different_lengths_alone_do_not_make_a_run_noisy():
    # Per-sample latencies spread by sentence length (cv well above 10%) while identical passes agree.
    stats = measure.latency_stats([0.005, 0.010, 0.020, 0.040])
    stats["repeat_cv"] = measure.repeat_cv([0.010, 0.0101, 0.0100])
    assert stats["cv"] > 0.5 and measure.noisy_warning(stats) is None
