"""Faults around a run, with real processes and real signals: a results folder another run holds,
two runs timing on one machine, a run stopped by SIGINT or SIGTERM, files that a killed run left
behind."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import REPO, rt_job, write_job

from runner.cli import main

# The longest any wait for a process's line may take: imports and a Ray start on 2 busy cores.
DEADLINE_S = 180.0


def environment(**extra: str) -> dict:
    return {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "PYTHONUNBUFFERED": "1",
        "CUDA_VISIBLE_DEVICES": "",
        **extra,
    }


def start(args: list[str], **extra: str) -> subprocess.Popen:
    """A process of this checkout's Python, its output read line by line."""
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=REPO,
        env=environment(**extra),
        text=True,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def start_run(*args, **extra: str) -> subprocess.Popen:
    return start(["-m", "runner.cli", "run", *map(str, args)], **extra)


def read_until(
    process: subprocess.Popen, marker: str, deadline_s: float = DEADLINE_S, stream: str = "stdout"
) -> str:
    """The process's stdout (or stderr) up to the end of the first line that holds the marker; fails
    at the deadline or the stream's end. It reads the pipe itself: a Python file object would buffer
    lines past the one it returns, where select() no longer sees them. finish() gives what it read
    beyond."""
    fd, rest = (
        getattr(process, stream).fileno(),
        process.__dict__.setdefault("rest", {"stdout": b"", "stderr": b""}),
    )
    text, wanted, ends = rest[stream], marker.encode(), time.monotonic() + deadline_s
    while wanted not in text:
        left = ends - time.monotonic()
        chunk = os.read(fd, 65536) if left > 0 and select.select([fd], [], [], left)[0] else b""
        if not chunk:
            process.kill()
            out, err = finish(process)
            pytest.fail(
                f"no line with {marker!r} in its {stream} (exit {process.returncode}); "
                f"out:\n{out}\nerr:\n{err}"
            )
        text += chunk
    line_end = text.find(b"\n", text.index(wanted))
    cut = len(text) if line_end < 0 else line_end + 1
    rest[stream] = text[cut:]
    return text[:cut].decode(errors="replace")


def finish(process: subprocess.Popen, timeout_s: float = DEADLINE_S) -> tuple[str, str]:
    """(stdout, stderr) of the process once it ends, with what read_until had read beyond its
    line."""
    out, err = process.communicate(timeout=timeout_s)
    rest = getattr(process, "rest", {})
    return (
        rest.get("stdout", b"").decode(errors="replace") + out,
        rest.get("stderr", b"").decode(errors="replace") + err,
    )


HOLD = """
import sys
from pathlib import Path
from runner import locks
fd, _ = locks.lock_job_folder(Path(sys.argv[1]), "the test's holder", None, print)
print("held", flush=True)
sys.stdin.read()  # until the test closes it
"""


def hold_folder(folder: Path) -> subprocess.Popen:
    holder = start(["-c", HOLD, str(folder)])
    read_until(holder, "held", 60)
    return holder


def release(holder: subprocess.Popen) -> None:
    holder.stdin.close()
    assert holder.wait(timeout=60) == 0, holder.stderr.read()


def test_a_second_run_into_a_held_folder_is_refused_naming_the_holder(tmp_path, tiny_model):
    job = write_job(tmp_path, rt_job(tiny_model, variants="[fp32-cpu]"))
    results = tmp_path / "results"
    holder = hold_folder(results / "tiny-rt")
    try:
        before = sorted(p.name for p in results.rglob("*"))
        run = start_run(job, "--results", results)
        out, err = finish(run)
        assert run.returncode == 2, out + err
        assert (
            f"pid {holder.pid}" in err and os.uname().nodename in err and "the test's holder" in err
        )
        assert "--wait-for-lock" in err and "--results NEW_FOLDER" in err and "Traceback" not in err
        assert "cluster:" not in out  # refused before Ray started
        assert sorted(p.name for p in results.rglob("*")) == before  # nothing written
        # A bounded wait ends with the same refusal, saying how long it waited.
        run = start_run(job, "--results", results, "--wait-for-lock", "0.5")
        out, err = finish(run)
        assert run.returncode == 2 and "after 0.5 s" in err and f"pid {holder.pid}" in err, (
            out + err
        )
        assert "waiting for" in out
    finally:
        release(holder)


def seed_ok_result(job: Path, results: Path, variant: str = "fp32-cpu") -> Path:
    """An ok result of the job's own spec, so that --resume keeps it and runs nothing."""
    from runner.plan import plan_job

    plan = plan_job(job)
    result = {
        "schema_version": 1,
        "job": plan.spec.name,
        "variant": variant,
        "precision": "fp32",
        "device": "cpu",
        "status": "ok",
        "error": None,
        "warnings": [],
        "spec_hash": plan.spec_hash,
        "spec": plan.spec.raw,
        "metrics": {"model_size_mib": 1.0, "accuracy": 0.5},
        "environment": {},
    }
    path = results / plan.spec.name / f"{variant}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result))
    return path


def test_a_run_asked_to_wait_says_so_and_goes_on_when_the_holder_ends(tmp_path, tiny_model):
    job = write_job(tmp_path, rt_job(tiny_model, variants="[fp32-cpu]"))
    results = tmp_path / "results"
    seed_ok_result(job, results)
    holder = hold_folder(results / "tiny-rt")
    try:
        run = start_run(job, "--results", results, "--resume", "--wait-for-lock")
        waiting = read_until(run, "waiting for")
        assert f"pid {holder.pid}" in waiting and "until it ends" in waiting
        assert run.poll() is None  # still waiting
    finally:
        release(holder)
    out, err = finish(run)
    assert run.returncode == 0, out + err
    assert "[resume] tiny-rt fp32-cpu: kept" in out
    assert not (results / "tiny-rt" / ".quantbench.lock").exists()


def test_a_run_removes_the_partial_files_a_killed_run_left(capsys, tmp_path, tiny_model):
    job = write_job(tmp_path, rt_job(tiny_model, variants="[fp32-cpu]"))
    results = tmp_path / "results"
    kept = seed_ok_result(job, results)
    stale = (
        results / "tiny-rt" / ".fp32-cpu-k2_x9q0a.tmp"
    )  # write_result's name for a result being written
    stale.write_text('{"schema_version": 1, "job": "tin')
    mine = results / "tiny-rt" / ".notes.tmp"  # not one of quantbench's: left alone
    mine.write_text("keep")

    code = main(["run", str(job), "--results", str(results), "--resume"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert not stale.exists() and f"removed {stale}" in out
    assert mine.exists() and kept.exists()


HOLD_TIMING = """
import sys
from runner import locks
with locks.timing_lock("the test's timer"):
    print("held", flush=True)
    sys.stdin.read()  # until the test closes it
"""

TIME_A_VARIANT = """
import json, sys
sys.path.insert(0, "tests")
from test_worker import make_task
from runner.sweep import progress_line
from runner.worker import run_variant
typed = run_variant(make_task(sys.argv[1], min_time_s=0.5))
line, result = progress_line(1, 1, typed), typed.to_json()
print(json.dumps({**result["metrics"]["latency_ms"], "status": result["status"],
                  "error": result["error"], "warnings": result["warnings"], "line": line}))
"""


def test_variants_of_two_processes_time_one_after_the_other_and_say_they_waited(
    tmp_path, tiny_model, monkeypatch
):
    from datetime import datetime, timedelta

    from runner import locks, measure

    lock = str(tmp_path / "timing.lock")  # this machine's lock, but the test's own
    monkeypatch.setenv(locks.TIMING_LOCK_VARIABLE, lock)
    holder = start(["-c", HOLD_TIMING], QUANTBENCH_TIMING_LOCK=lock)
    read_until(holder, "held", 60)
    timers = [
        start(["-c", TIME_A_VARIANT, str(tiny_model)], QUANTBENCH_TIMING_LOCK=lock)
        for _ in range(2)
    ]
    try:
        for timer in timers:  # both variants wait, and say for whom
            waiting = read_until(timer, "waiting for the machine's timing lock", stream="stderr")
            assert f"pid {holder.pid}" in waiting and "the test's timer" in waiting
        # A wait has an end: past it, the clock runs anyway and the result says so.
        with locks.timing_lock("a third", timeout_s=0.3) as third:
            assert (
                third.waited_s == 0.3
                and f"still held after 0.3 s, by pid {holder.pid}" in third.warning
            )
        released = datetime.fromisoformat(measure.now())
    finally:
        release(holder)
    found = []
    for timer in timers:
        out, err = finish(timer)
        assert timer.returncode == 0, err
        found.append(json.loads(out.splitlines()[-1]))
    assert all(
        r["status"] == "ok" and not any("timing lock" in w for w in r["warnings"]) for r in found
    ), found
    first, second = sorted(found, key=lambda r: r["clock_started_at"])
    first_start, second_start = (
        datetime.fromisoformat(r["clock_started_at"]) for r in (first, second)
    )
    assert first_start >= released
    assert second_start >= first_start + timedelta(
        seconds=first["clock_s"]
    )  # the clocks never overlapped
    assert 0 < first["timing_lock_wait_s"] < second["timing_lock_wait_s"]
    assert all("for another run's timing" in r["line"] for r in found)


def end_all(processes: list[psutil.Process], timeout_s: float = 60) -> list[psutil.Process]:
    """The processes still running timeout_s after they were asked to end; the test kills them
    then."""
    _, alive = psutil.wait_procs(processes, timeout=timeout_s)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    return alive


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_the_run_keeping_what_finished_and_saying_how_to_resume(
    tmp_path, tiny_model, ray_temp_dir, signum, code
):
    job = write_job(tmp_path, rt_job(tiny_model, variants="[fp32-cpu, int8-dynamic-cpu]"))
    results = tmp_path / "results"
    run = start_run(
        job,
        "--results",
        results,
        "--ray-temp-dir",
        ray_temp_dir,
        QUANTBENCH_FAULT_INJECT="int8-dynamic-cpu=hold",
    )  # runs until it is stopped
    started = []
    try:
        read_until(run, "[1/2] tiny-rt fp32-cpu")
        started = psutil.Process(run.pid).children(
            recursive=True
        )  # the cluster, the fork server, the variant's
        assert len(started) >= 3
        run.send_signal(signum)
        out, err = finish(run)
    finally:
        run.kill()
        left = end_all(started)
    assert run.returncode == code, out + err
    assert "Traceback" not in err and 'File "' not in err, (
        err
    )  # neither Python's nor Ray's stack lines
    assert f"stopped by {signal.Signals(signum).name}" in err and "1 ok result(s) are kept" in err
    again = f"quantbench run {job} --results {results} --ray-temp-dir {ray_temp_dir} --resume"
    assert again in err.splitlines()[-1], err
    # The finished result is kept; the stopped variant has none, and nothing half-written or locked
    # is left.
    assert sorted(p.name for p in (results / "tiny-rt").iterdir()) == ["fp32-cpu.json"]
    assert json.loads((results / "tiny-rt" / "fp32-cpu.json").read_text())["status"] == "ok"
    assert not left, f"still running after the run ended: {left}"


def test_collect_names_two_runs_on_one_host_by_their_folders(capsys, tmp_path):
    def result_in(folder: str, host: str) -> None:
        result = {
            "schema_version": 1,
            "job": "j",
            "variant": "fp32-cpu",
            "precision": "fp32",
            "device": "cpu",
            "status": "ok",
            "error": None,
            "metrics": {"model_size_mib": 1.0, "accuracy": 0.5},
            "environment": {"host": host},
        }
        path = tmp_path / folder / "j" / "fp32-cpu.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(result))

    result_in("monday", "vm-a")
    result_in("tuesday", "vm-a")  # another run on the same host: named by its folder, not "@vm-a"
    result_in("other/tuesday", "vm-a")  # and a folder of the same name again: numbered
    result_in("elsewhere", "vm-b")  # another host: named by its host
    assert main(["collect", str(tmp_path), "--format", "json"]) == 0
    columns = json.loads(capsys.readouterr().out)[0]["variants"]
    assert set(columns) == {"fp32-cpu", "fp32-cpu@tuesday", "fp32-cpu@tuesday#2", "fp32-cpu@vm-b"}


def test_run_says_which_report_is_older_than_the_results(capsys, tmp_path, tiny_model):
    job = write_job(tmp_path, rt_job(tiny_model, variants="[fp32-cpu]"))
    results = tmp_path / "results"
    kept = seed_ok_result(job, results)
    old, fresh = results / "tiny-rt" / "report.html", results / "report.html"
    old.write_text("<html>before</html>")
    fresh.write_text("<html>after</html>")
    then = kept.stat().st_mtime
    os.utime(old, (then - 3600, then - 3600))  # made before the result it should show
    os.utime(fresh, (then + 1, then + 1))

    assert main(["run", str(job), "--results", str(results), "--resume"]) == 0
    out = capsys.readouterr().out
    assert f"note: {old} is older than results under {results / 'tiny-rt'}" in out
    assert f"quantbench report {results / 'tiny-rt'}" in out and f"note: {fresh}" not in out
    assert (
        old.read_text() == "<html>before</html>"
    )  # left as it was: it may be all that is left of older results


@pytest.mark.parametrize(
    "value, said",
    [
        ("job.yaml", "put --wait-for-lock after the job files"),
        ("nan", "finite number of seconds"),
        ("-1", "0 or more"),
    ],
)
def test_a_wait_for_lock_that_is_no_number_of_seconds_is_refused(capsys, value, said):
    with pytest.raises(SystemExit) as stop:
        main(["run", "--wait-for-lock", value, "job.yaml"])
    assert stop.value.code == 2 and said in capsys.readouterr().err


def test_a_lock_taken_and_let_go_leaves_no_folder_it_made(tmp_path):
    from runner import locks

    folder = tmp_path / "new" / "results" / "job"
    with locks.job_folders_locked(
        tmp_path / "new" / "results", ["job"], "quantbench run x", None, print
    ):
        assert (folder / locks.RESULTS_LOCK).is_file()
    assert (
        list(tmp_path.iterdir()) == []
    )  # a run refused after locking (another spec, a bad model) leaves nothing
    with locks.job_folders_locked(
        tmp_path / "new" / "results", ["job"], "quantbench run x", None, print
    ):
        (folder / "fp32-cpu.json").write_text("{}")
    assert [p.name for p in folder.iterdir()] == ["fp32-cpu.json"]
