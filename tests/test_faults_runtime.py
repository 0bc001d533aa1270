"""Faults during a run that no pre-run check can see: a disk that fills while variants are measured,
a cluster address that names a session which has ended, another run holding the machine's timing
lock."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from types import SimpleNamespace

from conftest import rt_job, write_job
from test_faults_run import read_until, release, start

from runner import cluster as ray_cluster
from runner import folders, locks, progress, results, sweep
from runner.cli import main
from runner.study import stage


def full_disk_for(name: str, monkeypatch) -> None:
    """Writing a file called name fails as on a full disk; every other write goes through."""
    write_json = folders.write_json

    def writes_unless_full(path: Path, value: dict) -> Path:
        if Path(path).name == name:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return write_json(path, value)

    monkeypatch.setattr(results, "write_json", writes_unless_full)


def test_a_result_that_cannot_be_written_is_printed_and_the_exit_code_says_it_was_lost(
    capsys, tmp_path, tiny_model, ray_temp_dir, monkeypatch
):
    job = write_job(tmp_path, rt_job(tiny_model, variants="[int8-dynamic-cpu, fp32-cpu]"))
    out_dir = tmp_path / "results"
    full_disk_for("int8-dynamic-cpu.json", monkeypatch)

    code = main(["run", str(job), "--results", str(out_dir), "--ray-temp-dir", ray_temp_dir])
    out, err = capsys.readouterr()
    lost = out_dir / "tiny-rt" / "int8-dynamic-cpu.json"
    assert code == 3, out + err  # results lost
    assert f"cannot write {lost}: No space left on device" in out
    # The measurement is still on the screen: its progress line, with its accuracy and latency.
    line = next(row for row in out.splitlines() if "int8-dynamic-cpu" in row and "median" in row)
    assert " ok " in line, out
    # The sweep went on: the other variant ran and was written.
    assert not lost.exists() and (out_dir / "tiny-rt" / "fp32-cpu.json").is_file()
    assert "1 result file(s) could not be written" in err and "--resume" in err


def test_a_study_that_cannot_be_written_says_so_and_is_counted_as_lost(tmp_path, monkeypatch):
    sensitivity = SimpleNamespace(variant_id="int8-dynamic-cpu")
    plan = SimpleNamespace(spec=SimpleNamespace(name="tiny-rt", sensitivity=sensitivity))
    run = stage.StudyRun(plan, tmp_path, None, tmp_path / "results", print)
    full_disk_for("sensitivity-int8-dynamic-cpu.json", monkeypatch)
    study = {"kind": results.STUDY_KIND, "status": "ok"}

    said = stage.write_study(run, study)

    path = tmp_path / "results" / "tiny-rt" / "sensitivity-int8-dynamic-cpu.json"
    assert said == study["unwritten"] == f"cannot write {path}: No space left on device"
    from runner.sweep import SweepReport

    report = SweepReport(studies=[study])
    assert report.lost_any and report.lost_lines() == [said]


HOLD_TIMING = """
import sys
from runner import locks
with locks.timing_lock("another user's benchmark"):
    print("held", flush=True)
    sys.stdin.read()  # until the test closes it
"""


def test_run_says_as_it_starts_who_holds_the_timing_lock_and_how_long_it_waits(
    capsys, tmp_path, tiny_model, ray_temp_dir, monkeypatch
):
    lock = str(tmp_path / "timing.lock")  # this machine's lock, but the test's own
    monkeypatch.setenv(locks.TIMING_LOCK_VARIABLE, lock)
    assert locks.timing_lock_notice() is None  # no file yet: nobody holds it
    holder = start(["-c", HOLD_TIMING], QUANTBENCH_TIMING_LOCK=lock)
    try:
        read_until(holder, "held", 60)
        notice = locks.timing_lock_notice()
        # The run is stopped before any variant, as soon as it has said what it would wait for.
        monkeypatch.setattr(sweep.ray_cluster, "connect", stop_the_run)
        code = main(
            [
                "run",
                str(write_job(tmp_path, rt_job(tiny_model))),
                "--results",
                str(tmp_path / "results"),
                "--ray-temp-dir",
                ray_temp_dir,
            ]
        )
        out = capsys.readouterr().out
    finally:
        release(holder)
    assert code == 130
    assert notice in out and f"held by pid {holder.pid} on " in notice
    assert "another user's benchmark" in notice and "at most 900 s" in notice
    assert "user " in notice  # the pid's owner, as the kernel says
    assert locks.timing_lock_notice() is None  # let go: nothing to say


def stop_the_run(*args, **kwargs):
    raise KeyboardInterrupt


def test_a_variant_waiting_for_the_timing_lock_tells_run_through_its_progress(
    tmp_path, monkeypatch
):
    lock = str(tmp_path / "timing.lock")
    monkeypatch.setenv(locks.TIMING_LOCK_VARIABLE, lock)
    holder = start(["-c", HOLD_TIMING], QUANTBENCH_TIMING_LOCK=lock)
    events: list[progress.Event] = []
    progress.start("tiny-rt int8-dynamic-cpu", events.append)
    try:
        read_until(holder, "held", 60)
        with locks.timing_lock("tiny-rt int8-dynamic-cpu", timeout_s=0.3, say=lambda _: None):
            pass
    finally:
        release(holder)
        progress.start("quantbench", lambda event: None)
    started, ended = events  # what `run` shows: the wait's start, then its end with its time
    # about the 0.3 s it waited: the lock polls its deadline on another clock than progress times
    assert started.state == "start" and ended.state == "end" and ended.elapsed_s >= 0.25
    assert started.who == "tiny-rt int8-dynamic-cpu"
    assert f"pid {holder.pid}" in started.phase and "at most 0.3 s" in started.phase


def test_address_auto_of_a_session_that_ended_is_refused_in_seconds(
    capsys, tmp_path, tiny_model, monkeypatch
):
    from test_address import port_nobody_listens_on

    ray_temp = tmp_path / "ray"  # Ray's temp folder, as `ray start --head` left it
    ray_temp.mkdir()
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    def joins(*args, **kwargs):  # Ray would retry the ended session's address for minutes
        raise AssertionError(f"ray.init was asked to join an unchecked address: {kwargs}")

    monkeypatch.setattr(ray_cluster.ray, "init", joins)
    job = write_job(tmp_path, rt_job(tiny_model, variants="[fp32-cpu]"))
    with port_nobody_listens_on() as port:
        (ray_temp / "ray_current_cluster").write_text(f"127.0.0.1:{port}\n")
        code = main(["run", str(job), "--results", str(tmp_path / "results"), "--address", "auto"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"127.0.0.1:{port} (given by --address auto, as the latest Ray session in " in err
    assert "connection refused" in err and str(ray_temp / "ray_current_cluster") in err


def test_address_auto_with_no_session_says_what_to_do(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray_cluster.services, "find_gcs_addresses", lambda: frozenset())
    try:
        ray_cluster.resolve_auto("--address")
    except ConnectionError as error:
        said = str(error)
    assert "finds no Ray cluster on this machine" in said and "ray start --head" in said


def test_a_head_that_dies_mid_run_ends_it_with_what_was_kept_and_the_resume_command(
    tmp_path, tiny_model
):
    import shutil
    import subprocess
    import tempfile
    import time

    import psutil
    from test_faults_cluster import QUANTBENCH, REPO, FaultCluster, results_in

    root = Path(tempfile.mkdtemp(prefix="qbh-", dir="/tmp"))  # short: Ray's socket paths
    local = FaultCluster(root, faults="fp32-cpu=hold")  # fp32 runs until the test is done
    job = write_job(tmp_path, rt_job(tiny_model, variants="[int8-dynamic-cpu, fp32-cpu]", n=8))
    out_dir = tmp_path / "results"
    run = None
    try:
        local.start("head", "--num-cpus=0", "--num-gpus=0")
        local.wait_for_head()
        local.start_cpu_worker()
        local.wait_for_nodes({"cpu": True})
        command = [str(QUANTBENCH), "run", str(job), "--results", str(out_dir)]
        run = subprocess.Popen(
            [*command, "--address", local.address],
            env=local.user_env(),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        held, deadline = local.fault_dir / "fp32-cpu.pid", time.monotonic() + 240
        while not held.exists():  # int8 is written; fp32 runs, holding the node's slot
            assert run.poll() is None and time.monotonic() < deadline, run.communicate()[0]
            time.sleep(0.2)
        head = psutil.Process(local.nodes["head"].pid)
        (gcs,) = [p for p in head.children(recursive=True) if p.name() == "gcs_server"]
        killed_at = time.monotonic()
        gcs.kill()
        out, _ = run.communicate(timeout=120)
        ended_s = time.monotonic() - killed_at
    finally:
        if run is not None and run.poll() is None:
            os.killpg(run.pid, 9)  # our own child's group
            run.communicate()
        local.stop_all()
        shutil.rmtree(root, ignore_errors=True)
    assert run.returncode == 1, out
    said = f"stopped because the Ray cluster's head at {local.address} stopped answering"
    assert said in out, out
    assert "1 ok result(s) are kept" in out and "--resume" in out, out
    assert "Traceback" not in out, out
    assert ended_s < 50, f"{ended_s:.0f} s: Ray's own end comes after 60 s\n{out}"
    assert set(results_in(out_dir / "tiny-rt")) == {"int8-dynamic-cpu"}, out
