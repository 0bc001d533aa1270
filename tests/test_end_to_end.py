"""The whole path through an embedded local Ray cluster, the way a user runs it."""

from __future__ import annotations

import json
import os

import pytest
from conftest import rt_job, write_job

from runner.cli import main


def run_cli(capsys, *args):
    code = main(list(map(str, args)))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_run_writes_results_prints_the_table_and_collect_repeats_it(
    capsys, tmp_path, tiny_model, ray_temp_dir, monkeypatch
):
    monkeypatch.setenv("QUANTBENCH_FAULT_INJECT", "bf16-cpu=exit,fp16-cpu=raise")
    monkeypatch.setenv(
        "CUDA_VISIBLE_DEVICES", ""
    )  # a cluster with no GPU, also on a machine that has one
    variants = "[fp32-cpu, int8-dynamic-cpu, fp16-cpu, bf16-cpu, fp16-cuda]"
    job = write_job(tmp_path / "jobs", rt_job(tiny_model, variants=variants))
    results = tmp_path / "results"

    code, out, err = run_cli(
        capsys,
        "run",
        job,
        "--results",
        results,
        "--ray-temp-dir",
        ray_temp_dir,
        "--machine",
        "tiny-box",
    )

    # A variant that raised and one whose worker died are failed; the others ran and were written.
    assert code == 1, out + err
    files = {p.stem: json.loads(p.read_text()) for p in (results / "tiny-rt").glob("*.json")}
    assert set(files) == {"fp32-cpu", "int8-dynamic-cpu", "fp16-cpu", "bf16-cpu", "fp16-cuda"}
    assert files["fp32-cpu"]["status"] == "ok" and files["int8-dynamic-cpu"]["status"] == "ok"
    assert (
        files["fp16-cpu"]["status"] == "failed" and "fault injected" in files["fp16-cpu"]["error"]
    )
    assert files["bf16-cpu"]["status"] == "failed" and files["bf16-cpu"]["error"]
    # No GPU in this cluster: the CUDA variant is skipped with the reason, at once, never pending.
    assert files["fp16-cuda"]["status"] == "skipped"
    assert "no node in the cluster can run cuda variants" in files["fp16-cuda"]["error"]
    assert not list((results / "tiny-rt").glob(".*"))  # no temporary files left behind

    fp32 = files["fp32-cpu"]
    # --machine reached the variant's process, which names its kernels' instruction set too.
    assert fp32["environment"]["machine"] == "tiny-box" and fp32["environment"]["cpu_capability"]
    assert "QUANTBENCH_MACHINE" not in os.environ  # the run's label is not left behind
    for key in (
        "schema_version",
        "job",
        "variant",
        "precision",
        "device",
        "status",
        "error",
        "metrics",
        "environment",
        "spec",
        "started_at",
        "ended_at",
        "predictions",
    ):
        assert key in fp32
    assert fp32["environment"]["ray"]["node_id"] and fp32["environment"]["cpu"]["model"]
    # The niceness the run started with, not Ray's 15 more for workers: a timed variant yields to
    # nobody the run itself would not (the suite may run under nice).
    assert fp32["environment"]["niceness"] == os.nice(0)
    assert fp32["spec"]["name"] == "tiny-rt"
    # When the clock ran, in the variant's own span (ISO 8601 UTC strings of one format sort as
    # times).
    assert fp32["started_at"] < fp32["metrics"]["latency_ms"]["clock_started_at"] < fp32["ended_at"]
    assert len(fp32["predictions"]["gold"]) == 24

    assert "int8-dynamic-cpu" in out and "size (MiB)" in out and "agreement with baseline" in out
    assert "variants' own work" in out and "overhead" in out

    code, collected, _ = run_cli(capsys, "collect", results / "tiny-rt")
    assert code == 0
    table = out[out.index("tiny-rt (baseline") : out.index("wall ")].strip()
    assert collected.strip() == table

    # The delta is (variant - baseline) / baseline, from the numbers in the files.
    code, as_json, _ = run_cli(capsys, "collect", results, "--format", "json")
    variants = json.loads(as_json)[0]["variants"]
    size8, size32 = (
        files[v]["metrics"]["model_size_mib"] for v in ("int8-dynamic-cpu", "fp32-cpu")
    )
    assert variants["int8-dynamic-cpu"]["deltas"]["size (MiB)"] == pytest.approx(
        (size8 - size32) / size32
    )
    assert variants["int8-dynamic-cpu"]["deltas"]["size (MiB)"] < 0
    same = sum(
        a == b
        for a, b in zip(
            files["int8-dynamic-cpu"]["predictions"]["predicted"], fp32["predictions"]["predicted"]
        )
    )
    assert variants["int8-dynamic-cpu"]["metrics"]["agreement with baseline"] == pytest.approx(
        same / 24
    )

    # Another spec into the same folder is refused before anything runs ...
    changed = write_job(
        tmp_path / "jobs", rt_job(tiny_model, variants=variants_list(), n=30), "changed.yaml"
    )
    before = {p: p.stat().st_mtime_ns for p in (results / "tiny-rt").glob("*.json")}
    code, _, err = run_cli(
        capsys, "run", changed, "--results", results, "--ray-temp-dir", ray_temp_dir
    )
    assert code == 2 and "different job spec" in err and "--resume" in err
    assert before == {p: p.stat().st_mtime_ns for p in (results / "tiny-rt").glob("*.json")}

    # ... and --resume on the same spec reruns only what is not done.
    monkeypatch.delenv("QUANTBENCH_FAULT_INJECT")
    code, out, err = run_cli(
        capsys, "run", job, "--results", results, "--resume", "--ray-temp-dir", ray_temp_dir
    )
    assert code == 0, out + err
    assert (
        "[resume] tiny-rt fp32-cpu: kept" in out
        and "[resume] tiny-rt int8-dynamic-cpu: kept" in out
    )
    assert (
        "[resume] tiny-rt fp16-cpu: runs again and replaces" in out
        and "(its result is failed)" in out
    )
    assert (
        json.loads((results / "tiny-rt" / "fp32-cpu.json").read_text())["started_at"]
        == fp32["started_at"]
    )
    assert json.loads((results / "tiny-rt" / "fp16-cpu.json").read_text())["status"] == "ok"


def variants_list() -> str:
    return "[fp32-cpu, int8-dynamic-cpu]"


@pytest.mark.parametrize("fmt, marker", [("markdown", "| metric"), ("csv", "job,variant,status")])
def test_collect_formats(capsys, tmp_path, fmt, marker):
    folder = tmp_path / "r" / "j"
    folder.mkdir(parents=True)
    result = {
        "schema_version": 1,
        "job": "j",
        "variant": "fp32-cpu",
        "precision": "fp32",
        "device": "cpu",
        "status": "ok",
        "error": None,
        "metrics": {"model_size_mib": 10.0, "accuracy": 0.9},
        "environment": {},
    }
    (folder / "fp32-cpu.json").write_text(json.dumps(result))
    code, out, _ = run_cli(capsys, "collect", tmp_path / "r", "--format", fmt)
    assert code == 0 and marker in out and "10" in out


def test_collect_of_an_empty_folder_says_so(capsys, tmp_path):
    code, _, err = run_cli(capsys, "collect", tmp_path)
    assert code == 2 and "no result files" in err


def test_repeats_run_in_fresh_processes_and_fixed_shape_timing(
    capsys, tmp_path, tiny_model, ray_temp_dir
):
    text = rt_job(tiny_model, variants="[fp32-cpu, fp16-cuda]").replace(
        "evaluation: {batch_size: 4, warmup_passes: 1, timed_passes: 8}",
        "evaluation: {batch_size: 4, warmup_passes: 1, timed_passes: 12, repeats: 3, "
        "latency_mode: fixed, "
        "fixed_shape: [2, 16]}",
    )
    job = write_job(tmp_path, text)
    code, out, err = run_cli(
        capsys, "run", job, "--results", tmp_path / "r", "--ray-temp-dir", ray_temp_dir
    )
    assert code == 0, out + err
    result = json.loads((tmp_path / "r" / "tiny-rt" / "fp32-cpu.json").read_text())
    repeats = result["repeats"]
    assert repeats["n"] == 3 and len(repeats["median_ms"]) == 3
    assert result["metrics"]["latency_ms"]["median"] == sorted(repeats["median_ms"])[1]
    assert "3 runs, medians spread" in out
    assert (
        len(set(repeats["variant_pid"])) == 3 and None not in repeats["variant_pid"]
    )  # a process each
    # Fixed shape: every timed pass is the same [2, 16] batch; all 24 samples are still evaluated.
    assert result["settings"]["latency_mode"] == "fixed" and result["settings"]["fixed_shape"] == [
        2,
        16,
    ]
    assert result["metrics"]["latency_ms"]["n"] == 12 and result["metrics"]["throughput_sps"] > 0
    assert len(result["predictions"]["predicted"]) == 24
    skipped = json.loads((tmp_path / "r" / "tiny-rt" / "fp16-cuda.json").read_text())
    assert skipped["status"] == "skipped"
    assert sum(line.startswith("[") and "fp16-cuda" in line for line in out.splitlines()) == 1


def fork_server_of_a_fresh_process() -> int:
    """Runs on a Ray worker: forks a process as a CPU variant's is forked, and asks it where it came
    from."""
    from test_isolation import server_pid

    from runner import isolation

    return isolation.run_in_fresh_process(server_pid)


def test_the_embedded_cluster_forks_cpu_work_from_a_server_started_before_ray(ray_temp_dir):
    # Its imports (torch, transformers: 6-9 s on 2 cores) run while Ray starts.
    import os

    import ray

    from runner import cluster, dispatch, isolation

    def workers_beside_this_one() -> list[str]:
        """The other Ray workers of this node (the raylet's children, without its agents)."""
        import psutil

        workers = []
        for child in psutil.Process(os.getppid()).children():
            try:
                command = " ".join(child.cmdline())
            except psutil.NoSuchProcess:
                continue
            # A worker is titled ray::IDLE or ray::<task> once it runs, default_worker.py before.
            if child.pid != os.getpid() and (
                "default_worker.py" in command
                or (command.startswith("ray::") and "Agent" not in command)
            ):
                workers.append(command)
        return workers

    cluster.connect(None, temp_dir=ray_temp_dir, cpu_precisions=["fp32", "int8-dynamic"])
    try:
        # A variant's worker is alone: an idle one beside it would wake 100 times a second.
        assert (
            ray.get(
                ray.remote(workers_beside_this_one).options(**dispatch.ray_options("cpu")).remote()
            )
            == []
        )
        server = cluster._fork_server
        tests = os.path.dirname(os.path.abspath(__file__))  # where the worker finds this module
        on_a_worker = ray.remote(
            num_cpus=1, max_retries=0, runtime_env={"env_vars": {"PYTHONPATH": tests}}
        )(fork_server_of_a_fresh_process)
        assert ray.get(on_a_worker.remote()) == server.process.pid
        # And its workers run at the driver's niceness, not Ray's 15 more: a CUDA variant runs in
        # its worker.
        assert ray.get(ray.remote(num_cpus=1)(lambda: os.nice(0)).remote()) == os.nice(0)
    finally:
        cluster.shutdown()
    assert server.process.poll() is not None and isolation.ADDRESS_VARIABLE not in os.environ


def test_resume_of_a_finished_sweep_prints_the_table_without_starting_ray(
    capsys, tmp_path, tiny_model, ray_temp_dir, monkeypatch
):
    job = write_job(tmp_path, rt_job(tiny_model, variants="[fp32-cpu, int8-dynamic-cpu]"))
    results = tmp_path / "results"
    code, first, err = run_cli(
        capsys, "run", job, "--results", results, "--ray-temp-dir", ray_temp_dir
    )
    assert code == 0, first + err

    from runner import cluster, models

    def refuse(*args, **kwargs):
        raise AssertionError("nothing is left to run, yet it started Ray or loaded the model")

    monkeypatch.setattr(cluster, "connect", refuse)
    monkeypatch.setattr(models, "prepare_model", refuse)
    code, out, err = run_cli(
        capsys, "run", job, "--results", results, "--resume", "--ray-temp-dir", ray_temp_dir
    )
    assert code == 0, out + err
    assert "cluster: not started" in out and "nothing ran, every result was kept" in out
    assert (
        "[resume] tiny-rt fp32-cpu: kept" in out
        and "[resume] tiny-rt int8-dynamic-cpu: kept" in out
    )
    table = first[first.index("tiny-rt (baseline") : first.index("wall ")]
    assert table in out  # the same table, from the same files


def test_a_second_job_whose_model_cannot_load_stops_the_run_before_any_variant(
    capsys, tmp_path, tiny_model, ray_temp_dir, monkeypatch
):
    # What validation cannot see (a pickled .bin that torch cannot read, say): exit 2, nothing
    # written.
    from runner import models

    prepare = models.prepare_model

    def second_job_fails(spec, say):
        if spec.name == "second":
            raise OSError("pytorch_model.bin: invalid load key")
        return prepare(spec, say)

    monkeypatch.setattr(models, "prepare_model", second_job_fails)
    first = write_job(tmp_path / "a", rt_job(tiny_model, variants="[fp32-cpu]"))
    second = write_job(tmp_path / "b", rt_job(tiny_model, name="second", variants="[fp32-cpu]"))
    results = tmp_path / "results"
    code, out, err = run_cli(
        capsys, "run", first, second, "--results", results, "--ray-temp-dir", ray_temp_dir
    )
    assert code == 2 and "second" in err and "invalid load key" in err, out + err
    assert not list(results.rglob("*.json")) and "[1/1]" not in out


def test_the_wall_time_split_of_variants_run_on_several_nodes_at_once_has_no_negative_overhead():
    from runner.sweep import SweepReport

    parallel = SweepReport(
        wall_s=101.8, cluster_start_s=0.1, prepare_s=9.8, variants_s=150.3
    ).split()
    sequential = SweepReport(
        wall_s=44.0, cluster_start_s=0.1, prepare_s=11.0, variants_s=19.6
    ).split()

    assert (
        "-" not in parallel and "ran on several nodes at once" in parallel and "150.3 s" in parallel
    )
    assert (
        sequential.startswith("wall 44.0 s = variants' own work 19.6 s")
        and "overhead 13.4 s (30%" in sequential
    )


def test_address_local_is_the_embedded_cluster(
    capsys, tmp_path, tiny_model, ray_temp_dir, monkeypatch
):
    """Ray's "local" started a plain Ray cluster without quantbench's resources: every variant
    waited 30 s, ended skipped, and the run exited 0 having run nothing."""
    monkeypatch.setenv("RAY_ADDRESS", "local")
    job = write_job(tmp_path / "jobs", rt_job(tiny_model, variants="[fp32-cpu]", n=8))

    code, out, err = run_cli(
        capsys, "run", job, "--results", tmp_path / "results", "--ray-temp-dir", ray_temp_dir
    )

    assert code == 0, out + err
    assert "cluster: embedded local cluster: 1 node(s): 127.0.0.1 (cpu)" in out
    result = json.loads((tmp_path / "results" / "tiny-rt" / "fp32-cpu.json").read_text())
    assert result["status"] == "ok"
