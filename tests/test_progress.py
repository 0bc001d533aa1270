"""Progress on long work: phase lines with counts and times, at a bounded rate, relayed from a
variant's process to `quantbench run`; a failed variant told whole, and the --resume command."""

from __future__ import annotations

import io
import json
import re

import ray
import torch
from conftest import rt_job, write_job

from runner import dispatch, evaluate, progress
from runner.cli import main


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_run_off_a_terminal_says_each_phase_by_variant_and_ends_with_the_resume_command(
    capsys, tmp_path, tiny_model, ray_temp_dir, monkeypatch
):
    monkeypatch.setenv("QUANTBENCH_FAULT_INJECT", "fp16-cpu=raise")
    monkeypatch.setenv("QUANTBENCH_PROGRESS_QUIET_S", "0")  # every phase said, however quick
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    job = write_job(tmp_path / "jobs", rt_job(tiny_model, variants="[fp32-cpu, fp16-cpu]"))
    results = tmp_path / "results"
    args = ["run", str(job), "--results", str(results), "--ray-temp-dir", ray_temp_dir]

    code = main(args)
    out, err = capsys.readouterr()

    assert code == 1, out + err
    # The variant's own process said its phases; the driver relayed them, named by the variant.
    for line in (
        "[tiny-rt fp32-cpu] load: started",
        "[tiny-rt fp32-cpu] quantize: done in ",
        "[tiny-rt fp32-cpu] warm-up: started, ",
        "[tiny-rt fp32-cpu] evaluate: done in ",
    ):
        assert line in err, err
    timed = re.search(r"\[tiny-rt fp32-cpu\] timed passes: done, (\d+)/(\d+) passes in", err)
    assert timed and timed.group(1) == timed.group(2) and int(timed.group(1)) > 0, err
    assert "\r" not in err  # no bar off a terminal
    # A failed variant: the run ends with the command that reruns it, keeping the ok results.
    last = out.strip().splitlines()[-1]
    assert last.startswith("To rerun what failed") and last.endswith(
        f"quantbench {' '.join(args)} --resume"
    ), out


def test_plain_lines_come_at_most_once_every_ten_seconds_besides_start_and_end():
    clock, stream = FakeClock(), io.StringIO()
    display = progress.Display(stream, terminal=False, clock=clock)
    progress.start("job v", display.show).clock = clock

    with progress.phase("timed passes", 1000, "passes") as step:
        for _ in range(1000):  # a pass every 0.1 s: 100 s in all
            clock.now += 0.1
            step.advance()

    lines = stream.getvalue().splitlines()
    assert lines[0] == "[job v] timed passes: started, 1000 passes"  # said once it ran 5 s
    assert lines[-1] == "[job v] timed passes: done, 1000/1000 passes in 100.0 s"
    # Between them, counted lines from 5 s on, at least 10 s apart: 10 in 100 s, not 1000.
    times = [float(re.fullmatch(r".* passes, ([\d.]+) s", line)[1]) for line in lines[1:-1]]
    assert len(times) == 10, lines
    assert times[0] >= progress.QUIET_S
    assert all(later - earlier >= 10.0 for earlier, later in zip(times, times[1:])), times
    assert lines[1].startswith("[job v] timed passes 5")  # with its count: 5x/1000


def test_a_quick_phase_says_nothing_and_a_long_silent_one_says_it_started():
    clock, stream = FakeClock(), io.StringIO()
    display = progress.Display(stream, terminal=False, clock=clock)
    progress.start("job v", display.show).clock = clock

    with progress.phase("load"):
        clock.now += 1.0  # quick: the variant's own line will say it ended
    assert stream.getvalue() == ""

    with progress.phase("analysis"):  # uncounted: no update comes while it runs
        clock.now += progress.QUIET_S
        display.tick()  # as the driver does each time it wakes to look for results
        assert stream.getvalue() == "[job v] analysis: started\n"
        clock.now += 60.0
    assert stream.getvalue().splitlines()[-1] == "[job v] analysis: done in 65.0 s"


def test_a_terminal_gets_a_bar_redrawn_in_place():
    clock, stream = FakeClock(), io.StringIO()
    display = progress.Display(stream, terminal=True, clock=clock)
    progress.start("job v", display.show).clock = clock

    with progress.phase("warm-up", 4, "passes") as step:
        for _ in range(4):
            clock.now += 2.0
            step.advance()

    text = stream.getvalue()
    assert text.startswith("\r\x1b[K[job v] warm-up [........................] 0/4 passes 0 s\r")
    assert "\r\x1b[K[job v] warm-up [############............] 2/4 passes 4 s\r" in text
    assert text.endswith("\r\x1b[K[job v] warm-up: done, 4/4 passes in 8.0 s\n")

    with progress.phase("load"):  # quick: its bar is emptied, no line kept
        clock.now += 1.0
    assert stream.getvalue()[len(text) :] == "\r\x1b[K[job v] load: started\r\x1b[K"


def test_a_failed_phase_says_so_with_its_count():
    stream = io.StringIO()
    progress.start("job v", progress.Display(stream, terminal=False).show)
    try:
        with progress.phase("KL", 10, "windows") as step:
            step.advance(3)
            raise MemoryError
    except MemoryError:
        pass
    assert re.search(r"\[job v\] KL: failed after [\d.]+ s at 3/10 windows", stream.getvalue())


def test_the_timed_passes_are_counted_between_passes_never_inside_one():
    """Each pass's clock reading brackets the forward call only: the progress update comes after
    the clock stopped and before the next pass's clock starts."""
    order = []

    class Model:
        def __call__(self, **batch):
            order.append("pass")
            return batch

    progress.start("job v", lambda event: order.append(event.state)).every_s = 0.0
    batch = {"input_ids": torch.zeros(1, 4, dtype=torch.long)}
    with progress.phase("timed passes", 3, "passes") as step:
        timings = evaluate.clock_passes(Model(), [batch], lambda: None, 3, 0.0, None, step)

    assert len(timings.seconds) == 3
    assert order == ["start", "pass", "update", "pass", "update", "pass", "update", "end"]


def test_events_travel_through_the_file_the_driver_names(tmp_path, monkeypatch):
    path = tmp_path / "events.jsonl"
    monkeypatch.setenv(progress.FILE_VARIABLE, str(path))
    progress.start("demo fp16-cpu")  # as a variant's process does: the driver's file
    with progress.phase("load"):
        pass
    stream = io.StringIO()
    relay = progress.Relay(path, progress.Display(stream, terminal=False, quiet_s=0.0))

    relay.forward()
    relay.forward()  # nothing new: nothing said twice

    assert [json.loads(line)["state"] for line in path.read_text().splitlines()] == ["start", "end"]
    lines = stream.getvalue().splitlines()
    assert lines[0] == "[demo fp16-cpu] load: started"
    assert lines[1].startswith("[demo fp16-cpu] load: done in ") and len(lines) == 2


# What Ray 2.60 says when its memory monitor kills a worker: several lines.
RAY_OOM = (
    "Task was killed due to the node running low on memory.\n"
    "Memory on the node (IP: 10.0.0.5, ID: 8f2c) where the task (task ID: 1a, name=_on_node, "
    "pid=4242, memory used=6.10GB) was running was 7.52GB / 7.75GB (0.970), which exceeds the "
    "memory usage threshold of 0.95. Ray killed this worker (ID: 77ab) because it was the most "
    "recently scheduled task; to see more information about memory usage on this node, use "
    "`ray logs raylet.out -ip 10.0.0.5`.\n"
    "Top 10 memory users:\nPID\tMEM(GB)\tCOMMAND\n4242\t6.10\tray::_on_node\n"
    "Refer to the documentation on how to address the out of memory issue: "
    "https://docs.ray.io/en/latest/ray-core/scheduling/ray-oom-prevention.html."
)


def test_a_worker_killed_by_rays_memory_monitor_is_told_whole_and_not_blamed(monkeypatch):
    def killed(ref):
        raise ray.exceptions.OutOfMemoryError(RAY_OOM)

    monkeypatch.setattr(dispatch.ray, "get", killed)
    work = type("Work", (), {})()  # what base_result reads of a variant's work
    work.job, work.spec_hash, work.spec_as_run, work.sample, work.model_info = (
        "demo",
        "h",
        {},
        {},
        {},
    )
    work.variant, work.repeat = type("V", (), {"id": "fp32-cpu", "precision": "fp32"})(), 0
    work.variant.device = "cpu"

    result = dispatch._result_of(object(), work)

    assert result.status == "failed"
    assert result.error.startswith(
        "Ray's memory monitor killed the worker: memory pressure on the node, not necessarily "
        "this variant. OutOfMemoryError: Task was killed due to the node running low on memory."
    )
    assert result.error.endswith("ray-oom-prevention.html.")  # whole, to its last sentence
    assert "\n" not in result.error


def test_a_variants_own_error_is_told_whole_however_long():
    long = "shape mismatch " + "x" * 5000 + " at the end"
    error = ray.exceptions.RayTaskError("_on_node", "traceback", ValueError(long))

    assert dispatch.failure_text(error) == f"ValueError: {long}"


def test_a_line_for_a_closed_stream_is_dropped_and_the_work_goes_on():
    stream = io.StringIO()
    progress.start("job v", progress.Display(stream, terminal=False, quiet_s=0.0).show)
    stream.close()  # as pytest's capture, or a pipe whose reader left
    with progress.phase("load"):
        pass  # no ValueError: a progress line never stops the work
