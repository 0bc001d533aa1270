"""Progress on long work: phase lines with counts and times, at a bounded rate, relayed from a
variant's process to `quantbench run`; a failed variant told whole, and the --resume command."""

from __future__ import annotations

import ray

from runner import dispatch

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
