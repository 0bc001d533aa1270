"""CUDA: how a GPU is found, and, on a machine with an NVIDIA GPU, every CUDA precision run for
real.

The detection tests run everywhere. The others are skipped without a CUDA device;
`benchmarks/gpu.sh` runs them on a GPU machine, and the results it produced are under
results/reference/.
"""

from __future__ import annotations

import json
import stat

import numpy as np
import pytest
import torch
from conftest import rt_job, variant_json, write_job
from test_end_to_end import run_cli
from test_worker import make_task

from runner import cluster

CUDA_PRECISIONS = ["fp32", "fp16", "bf16", "bnb-int8", "bnb-nf4", "bnb-fp4"]
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs an NVIDIA GPU and a CUDA build of torch"
)


def fake_nvidia_smi(folder, listing: str, code: int = 0):
    script = folder / "nvidia-smi"
    script.write_text(
        f"#!/bin/sh\n[ \"$1\" = -L ] || exit 9\nprintf '%s' '{listing}'\nexit {code}\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return folder


TWO_GPUS = (
    "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-1)\nGPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-2)\n"
)


def test_gpus_are_counted_by_nvidia_smi_where_the_driver_has_no_proc_entry(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(fake_nvidia_smi(tmp_path, TWO_GPUS)))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    missing = tmp_path / "no-proc"
    assert cluster.local_gpu_count(missing) == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert cluster.local_gpu_count(missing) == 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert cluster.local_gpu_count(missing) == 0


def test_no_gpu_when_nvidia_smi_is_missing_or_fails(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert cluster.local_gpu_count(tmp_path / "no-proc") == 0
    monkeypatch.setenv("PATH", str(fake_nvidia_smi(tmp_path, "NVIDIA-SMI has failed", code=9)))
    assert cluster.local_gpu_count(tmp_path / "no-proc") == 0


def test_the_driver_proc_entry_counts_gpus_first(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi: the proc entry alone decides
    proc = tmp_path / "gpus"
    for bus in ("0000:01:00.0", "0000:02:00.0", "0000:03:00.0"):
        (proc / bus).mkdir(parents=True)
    assert cluster.local_gpu_count(proc) == 3


@pytest.fixture(scope="module")
def cuda_results(tiny_model):
    return {p: variant_json(make_task(tiny_model, p, device="cuda")) for p in CUDA_PRECISIONS}


@needs_cuda
def test_every_cuda_precision_runs_on_the_gpu_with_its_memory_measured(cuda_results):
    for precision, result in cuda_results.items():
        assert result["status"] == "ok", (precision, result["error"], result.get("traceback"))
        metrics = result["metrics"]
        assert metrics["peak_cuda_mib"] > 0, precision
        for phase in ("load", "evaluate"):
            assert metrics["memory_phases"][phase]["peak_cuda_allocated_mib"] > 0, (
                precision,
                phase,
            )
            assert (
                metrics["memory_phases"][phase]["peak_cuda_reserved_mib"]
                >= metrics["memory_phases"][phase]["peak_cuda_allocated_mib"]
            )
        assert result["environment"]["gpu"]["name"], precision
        assert result["metrics"]["latency_ms"]["n"] >= 5


@needs_cuda
def test_cuda_precisions_store_their_weights_as_named(cuda_results):
    kinds = {
        p: {name.rsplit(".", 1)[-1] for name in r["settings"]["linear_layers"]}
        for p, r in cuda_results.items()
    }
    assert kinds["fp16"] == {"Linear"} and kinds["bnb-int8"] == {"Linear8bitLt"}
    assert kinds["bnb-nf4"] == kinds["bnb-fp4"] == {"Linear4bit"}
    size = {p: r["metrics"]["model_size_mib"] for p, r in cuda_results.items()}
    assert size["fp16"] == pytest.approx(size["fp32"] / 2, rel=0.05)
    assert size["bf16"] == pytest.approx(size["fp16"], rel=0.01)
    # The tiny model's embeddings stay unquantized, so the 4-bit saving shows on the linear layers
    # only.
    assert size["bnb-nf4"] < size["bnb-int8"] < size["fp32"]


@needs_cuda
def test_cuda_outputs_stay_close_to_fp32(cuda_results):
    fp32 = np.array(cuda_results["fp32"]["predictions"]["probabilities"])
    for precision in ("fp16", "bf16", "bnb-int8"):
        other = np.array(cuda_results[precision]["predictions"]["probabilities"])
        assert np.abs(other - fp32).max() < 0.05, precision


@needs_cuda
def test_a_sweep_places_cuda_variants_on_the_gpu_and_cpu_variants_beside_them(
    capsys, tmp_path, tiny_model, ray_temp_dir
):
    variants = "[fp32-cpu, fp16-cuda, bnb-int8-cuda]"
    job = write_job(tmp_path / "jobs", rt_job(tiny_model, variants=variants, name="tiny-gpu"))
    code, out, err = run_cli(
        capsys, "run", job, "--results", tmp_path / "results", "--ray-temp-dir", ray_temp_dir
    )
    assert code == 0, out + err
    files = {
        p.stem: json.loads(p.read_text())
        for p in (tmp_path / "results" / "tiny-gpu").glob("*.json")
    }
    assert {v: r["status"] for v, r in files.items()} == {
        "fp32-cpu": "ok",
        "fp16-cuda": "ok",
        "bnb-int8-cuda": "ok",
    }
    assert (
        files["fp16-cuda"]["environment"]["gpu"]["name"] in out
    )  # the table names the GPU per column
