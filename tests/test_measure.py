"""The clock's arithmetic: the latency distribution, its interval, and when a machine is called
noisy."""

from __future__ import annotations

import weakref

import numpy as np
import pytest

from runner import measure
from runner.tasks.classification.worker import ClassificationWorker


def test_latency_stats_match_numpy_in_milliseconds():
    rng = np.random.default_rng(0)
    seconds = list(rng.lognormal(mean=-4, sigma=0.3, size=501))
    stats = measure.latency_stats(seconds)
    ms = np.array(seconds) * 1000
    assert stats["n"] == 501
    for name, expected in [
        ("mean", ms.mean()),
        ("median", np.median(ms)),
        ("std", ms.std(ddof=1)),
        ("p90", np.percentile(ms, 90)),
        ("p99", np.percentile(ms, 99)),
        ("min", ms.min()),
        ("max", ms.max()),
    ]:
        assert stats[name] == pytest.approx(expected, abs=1e-3), name
    low, high = stats["median_ci95"]
    assert low < stats["median"] < high
    # About 1.96 standard errors of the median either side: narrow for 501 samples.
    assert (high - low) / stats["median"] < 0.1


def test_the_median_interval_of_a_few_values_is_their_range_and_narrows_with_more():
    # The benchmark's few paired ratios rely on this: with 7 or fewer, nothing narrower is 95% sure.
    assert measure.median_ci95([0.91, 0.97, 1.0, 1.02, 1.2]) == [0.91, 1.2]
    many = sorted(np.random.default_rng(1).normal(1.0, 0.1, size=400))
    low, high = measure.median_ci95(many)
    assert many[0] < low < np.median(many) < high < many[-1] and high - low < 0.04


def test_identical_passes_are_not_noisy_and_scattered_ones_are():
    steady = [0.010, 0.0101, 0.0099, 0.0100, 0.0102]
    scattered = [0.010, 0.014, 0.009, 0.020, 0.011]
    cv, repeated = measure.same_shape_cv(steady, [(1, 8)] * 5)
    assert repeated == 4 and measure.noisy_warning({"repeat_cv": cv}) is None
    warning = measure.noisy_warning(
        {"repeat_cv": measure.same_shape_cv(scattered, [(1, 8)] * 5)[0]}
    )
    assert warning and "noisy" in warning
    # Just above the line, the warning does not read as if the spread were on it.
    assert "vary by 10.0%" in measure.noisy_warning({"repeat_cv": 0.1004})


def test_different_lengths_alone_do_not_make_a_run_noisy():
    # Per-sample latencies spread by sentence length (cv well above 10%) while passes of one shape
    # agree.
    seconds = [0.005, 0.010, 0.020, 0.040, 0.0051, 0.0099, 0.0202, 0.0400]
    shapes = [(1, 4), (1, 9), (1, 20), (1, 41)] * 2
    stats = measure.latency_stats(seconds)
    stats["repeat_cv"], repeated = measure.same_shape_cv(seconds, shapes)
    assert stats["cv"] > 0.5 and repeated == 4 and stats["repeat_cv"] < 0.02
    assert measure.noisy_warning(stats) is None
    assert measure.same_shape_cv(seconds[:4], shapes[:4]) == (
        None,
        0,
    )  # no shape timed twice: cannot tell


def no_answer(output, batch: dict) -> list:
    """A read_output for a test that times passes and reads no answer."""
    return []


class RecordingModel:
    """Stands in for a classifier: records the shape of every forward pass it is asked for."""

    def __init__(self):
        self.shapes = []

    def __call__(self, input_ids, attention_mask):
        import torch

        self.shapes.append(tuple(input_ids.shape))
        return type("Output", (), {"logits": torch.zeros(input_ids.shape[0], 2)})()


def test_no_timed_pass_is_the_first_of_its_shape():
    import torch

    from runner.evaluate import run_passes

    lengths = [5, 9, 5, 12, 9, 7, 12, 5]  # 4 distinct shapes; 2 warm-up passes meet only 5 and 9
    batches = [
        {"input_ids": torch.ones(2, n, dtype=torch.long), "attention_mask": torch.ones(2, n)}
        for n in lengths
    ]
    model = RecordingModel()

    probabilities, timings = run_passes(
        model,
        batches,
        "cpu",
        warmup_passes=2,
        timed_passes=8,
        min_time_s=0.0,
        read_output=ClassificationWorker().read_output,
    )

    timed = len(timings.seconds)
    untimed, timed_shapes = model.shapes[:-timed], model.shapes[-timed:]
    assert timed_shapes == [(2, n) for n in lengths]  # one whole timed pass, in order
    assert set(timed_shapes) <= set(untimed)  # every shape met before the clock ran
    warm_up = untimed[: len(untimed) - len(timings.repeats)]
    assert warm_up == [(2, 5), (2, 9), (2, 12), (2, 7)]  # the new shapes once each, nothing more
    assert np.stack(probabilities).shape == (16, 2)
    # 8 timed passes of 4 shapes repeat too few to tell the noise: the first batch was timed again.
    assert (
        len(timings.repeats) == 10 and timings.noise_cv()[1] == 4 + 10
    )  # the first shape was timed already


class OutputCountingModel:
    """Counts, at each forward pass, how many of its earlier outputs are still alive."""

    def __init__(self):
        self.alive, self.alive_at_each_pass = 0, []

    def __call__(self, input_ids, attention_mask):
        import torch

        self.alive_at_each_pass.append(self.alive)
        output = type("Output", (), {"logits": torch.zeros(input_ids.shape[0], 2)})()
        self.alive += 1
        weakref.finalize(output, self._freed)
        return output

    def _freed(self):
        self.alive -= 1


def test_a_timed_pass_runs_with_no_earlier_output_alive():
    """A causal LM's logits are [batch, length, vocabulary]: a pass that ran beside the previous
    pass's output would hold two of them (512 MiB on Gemma-3-270M's evaluation batch)."""
    import torch

    from runner.evaluate import run_passes

    batch = {"input_ids": torch.ones(2, 5, dtype=torch.long), "attention_mask": torch.ones(2, 5)}
    model = OutputCountingModel()

    _, timings = run_passes(
        model, [batch], "cpu", 1, 12, 0.0, fixed_batch=batch, read_output=no_answer
    )

    assert len(timings.seconds) == 12
    assert model.alive_at_each_pass == [0] * len(model.alive_at_each_pass)


def test_timed_passes_that_repeat_their_shapes_measure_the_noise_without_extra_passes():
    import torch

    from runner.evaluate import run_passes

    batches = [
        {"input_ids": torch.ones(1, n, dtype=torch.long), "attention_mask": torch.ones(1, n)}
        for n in [6, 8] * 8
    ]
    model = RecordingModel()

    _, timings = run_passes(
        model,
        batches,
        "cpu",
        warmup_passes=2,
        timed_passes=16,
        min_time_s=0.0,
        read_output=no_answer,
    )

    assert (
        timings.repeats == [] and len(model.shapes) == 2 + 16
    )  # warm-up and timed passes, nothing else
    assert timings.shapes == [(1, 6), (1, 8)] * 8
    cv, repeated = timings.noise_cv()
    assert repeated == 14 and cv is not None


def test_the_timings_say_when_the_clock_ran_and_for_how_long():
    from datetime import datetime

    import torch

    from runner.evaluate import run_passes

    batches = [
        {"input_ids": torch.ones(1, 4, dtype=torch.long), "attention_mask": torch.ones(1, 4)}
    ]
    before = datetime.now().astimezone()
    _, timings = run_passes(
        SpinningModel(),
        batches,
        "cpu",
        warmup_passes=1,
        timed_passes=1,
        min_time_s=0.3,
        read_output=no_answer,
    )
    after = datetime.now().astimezone()

    started = datetime.fromisoformat(timings.clock_started_at)
    assert started.utcoffset().total_seconds() == 0  # UTC, whatever the machine's zone
    assert before <= started <= after
    assert timings.clock_s >= 0.3  # min_time_s kept it running
    # clock_s is recorded to the millisecond: compare the passes' sum at that precision.
    assert round(sum(timings.seconds), 3) <= timings.clock_s <= (after - started).total_seconds()


class SpinningModel(RecordingModel):
    """A forward pass that computes for a millisecond on the calling thread, as a CPU-bound model
    does."""

    def __call__(self, input_ids, attention_mask):
        import time

        end = time.perf_counter() + 0.001
        while time.perf_counter() < end:
            pass
        return super().__call__(input_ids, attention_mask)


def test_the_timed_passes_count_how_often_another_process_took_the_cpu():
    import os
    import subprocess
    import sys

    import torch

    from runner.evaluate import run_passes

    batches = [
        {"input_ids": torch.ones(1, 4, dtype=torch.long), "attention_mask": torch.ones(1, 4)}
    ]
    allowed = os.sched_getaffinity(0)
    cpu = min(allowed)
    os.sched_setaffinity(0, {cpu})  # this thread, on one CPU
    try:
        alone = run_passes(SpinningModel(), batches, "cpu", 0, 1, 0.5, read_output=no_answer)[
            1
        ].preemptions_per_s
        # Another process spinning on the same CPU: the scheduler shares it, taking it from the
        # timed
        # passes every few milliseconds.
        spinner = subprocess.Popen(
            [
                sys.executable,
                "-c",
                f"import os; os.sched_setaffinity(0, {{{cpu}}}); "
                "print('spinning', flush=True)\nwhile True: pass",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert spinner.stdout.readline() == "spinning\n"
            shared = run_passes(SpinningModel(), batches, "cpu", 0, 1, 0.5, read_output=no_answer)[
                1
            ].preemptions_per_s
        finally:
            spinner.kill()
            spinner.wait()
        # Alone again: on a machine busy with other work, the quieter of the two is the baseline.
        alone = min(
            alone,
            run_passes(SpinningModel(), batches, "cpu", 0, 1, 0.5, read_output=no_answer)[
                1
            ].preemptions_per_s,
        )
    finally:
        os.sched_setaffinity(0, allowed)
    if (
        alone > 50
    ):  # other work already takes this CPU as often as a spinner would: nothing to tell apart
        pytest.skip(
            f"CPU {cpu} is busy with other work ({alone:.0f} preemptions a second with no spinner)"
        )
    assert shared > 50 and shared > 2 * alone, (alone, shared)
    warning = measure.noisy_warning({"repeat_cv": 0.2, "preemptions_per_s": shared})
    assert f"lost the CPU {shared:.0f} times a second" in warning


def test_a_variant_that_ran_at_a_raised_niceness_says_so():
    assert measure.niceness_warning({"niceness": 0}) is None
    warning = measure.niceness_warning({"niceness": 15})
    assert "niceness 15" in warning and "RAY_worker_niceness=0" in warning


def test_percentiles_interpolate_between_the_closest_ranks():
    # At (n - 1) * q / 100 of the sorted values: p90 of 11 values is the 10th (0-based 9th) exactly,
    # p99 of them lies 0.9 of the way from the 10th to the 11th.
    seconds = [0.001 * v for v in (5, 1, 2, 3, 4, 6, 7, 8, 9, 10, 20)]
    stats = measure.latency_stats(seconds)
    assert stats["p90"] == 10.0 and stats["p99"] == pytest.approx(10 + 0.9 * 10, abs=1e-4)


def test_the_environment_names_the_kernels_instruction_set_and_the_users_machine(monkeypatch):
    import torch

    from runner import machine

    monkeypatch.setenv(measure.MACHINE_VARIABLE, "epyc-avx2")
    env = machine.environment()
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert env["machine"] == "epyc-avx2"
    label = measure.hardware_label(env, "cpu")
    assert f"({env['cpu_capability']}) x{env['torch_threads']} threads" in label
    monkeypatch.delenv(measure.MACHINE_VARIABLE)
    assert machine.environment()["machine"] is None  # columns are named by the host then
