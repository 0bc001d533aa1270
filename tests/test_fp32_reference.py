"""The FP32 reference computed once per job and device: a variant that reads it reports every
figure it reports when it computes FP32's side itself, to the last digit; a stored file is kept
only when it was computed for the same model, windows, settings and machine, and a run writes it
beside the results and keeps it when run again elsewhere."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from conftest import rt_job, run_cli, variant_json, write_job
from test_causal_lm import lm_job

from runner import fp32_reference, models
from runner.job import Variant
from runner.plan import plan_job
from runner.sweep import variant_work
from runner.tasks.causal_lm import reference

pytestmark = pytest.mark.usefixtures("private_timing_lock")

# What a variant reports that FP32's side shapes.
KL_METRICS = ("kl_vs_fp32", "kl_stats", "perplexity", "mean_nll", "scored_tokens")


def lm_task(tmp_path, llama, precision="int8-dynamic", extra_job="", device="cpu"):
    """One variant's work, planned from the tiny Llama's job file, as the driver makes it."""
    text = lm_job(llama, variants=f"[{precision}-{device}]")
    job = write_job(tmp_path, text.replace("kl_top_k: 8", extra_job or "kl_top_k: 8"))
    plan = plan_job(job)
    model_dir, info = models.prepare_model(plan.spec)
    (task,) = variant_work(plan, model_dir, info, set(), [Variant(precision, device)])
    return task


def computed_reference(task, stored: bytes | None = None) -> dict:
    """The reference task run in this process, as a node runs it."""
    return reference.run_reference(fp32_reference.reference_work(task, stored))


def arrays_of(data: bytes) -> dict:
    with np.load(io.BytesIO(data)) as stored:
        return {name: stored[name] for name in stored.files}


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


@pytest.mark.parametrize(
    ("precision", "device"),
    [
        ("int8-dynamic", "cpu"),
        ("fp32", "cpu"),
        ("bnb-nf4", "cpu"),
        ("torchao-int8-weight", "cpu"),
        pytest.param("fp16", "cuda", marks=needs_cuda),
        pytest.param("bnb-int8", "cuda", marks=needs_cuda),
    ],
)
def test_a_variant_reading_the_reference_reports_what_it_computes_alone(
    tmp_path, llama, precision, device
):
    task = lm_task(tmp_path, llama, precision, device=device)
    alone = variant_json(task)
    task.reference = computed_reference(task)["data"]
    read = variant_json(task)
    assert alone["status"] == read["status"] == "ok", (alone.get("error"), read.get("error"))
    for name in KL_METRICS:
        assert read["metrics"][name] == alone["metrics"][name], name
    assert read["predictions"]["windows"] == alone["predictions"]["windows"]
    assert read["predictions"]["greedy"] == alone["predictions"]["greedy"]


def test_the_variant_reads_the_reference_it_is_handed(tmp_path, llama):
    """A reference whose FP32 log-probabilities were moved moves the KL: the variant read it,
    and computed no FP32 side of its own."""
    task = lm_task(tmp_path, llama)
    data = computed_reference(task)["data"]
    task.reference = data
    honest = variant_json(task)["metrics"]["kl_vs_fp32"]
    arrays = arrays_of(data)
    arrays["top_log_probs"] = arrays["top_log_probs"] - np.float32(0.01)
    moved = io.BytesIO()
    np.savez_compressed(moved, **arrays)
    task.reference = moved.getvalue()
    assert variant_json(task)["metrics"]["kl_vs_fp32"] != honest


def test_a_stored_reference_of_this_run_is_kept(tmp_path, llama):
    task = lm_task(tmp_path, llama)
    first = computed_reference(task)
    assert first["unused"] is None
    assert computed_reference(task, first["data"]) == {"data": None, "unused": None}
    header = json.loads(arrays_of(first["data"])["header"].tobytes())
    assert header["kl_top_k"] == 8 and header["device"] == "cpu" and header["format"] == 1
    assert {"model", "windows", "torch", "device_kind", "batch_size", "threads"} <= set(header)


def test_a_truncated_reference_is_recomputed(tmp_path, llama):
    task = lm_task(tmp_path, llama)
    whole = computed_reference(task)["data"]
    again = computed_reference(task, whole[: len(whole) // 2])
    assert again["unused"].startswith("it cannot be read whole")
    for name, array in arrays_of(whole).items():
        np.testing.assert_array_equal(arrays_of(again["data"])[name], array)


def test_a_reference_of_another_spec_is_recomputed(tmp_path, llama):
    other = computed_reference(lm_task(tmp_path / "k4", llama, extra_job="kl_top_k: 4"))["data"]
    again = computed_reference(lm_task(tmp_path / "k8", llama), other)
    assert "another spec, model or machine: kl_top_k 4, this run 8" in again["unused"]
    assert arrays_of(again["data"])["top_ids"].shape[1] == 8


def test_a_reference_of_another_model_is_recomputed(tmp_path, llama):
    task = lm_task(tmp_path, llama)
    data = computed_reference(task)["data"]
    task.model_info = {**task.model_info, "key": "another-model"}
    again = computed_reference(task, data)
    assert "model '" in again["unused"] and "this run 'another-model'" in again["unused"]
    assert again["data"] is not None


def test_a_classifier_has_no_reference_to_compute(tmp_path, tiny_model):

    plan = plan_job(write_job(tmp_path, rt_job(tiny_model)))
    tasks = variant_work(plan, tmp_path, {}, set())
    assert tasks and not any(fp32_reference.wanted(task) for task in tasks)


def test_a_run_writes_the_reference_and_a_run_elsewhere_keeps_it(
    capsys, tmp_path, llama, ray_temp_dir
):
    job = write_job(tmp_path, lm_job(llama, variants="[fp32-cpu, int8-dynamic-cpu]"))
    first, elsewhere = tmp_path / "first", tmp_path / "elsewhere"
    code, out, err = run_cli(capsys, "run", job, "--results", first, "--ray-temp-dir", ray_temp_dir)
    assert code == 0, err
    stored = first / "tiny-lm" / "fp32-reference-cpu.npz"
    assert "tiny-lm: FP32 reference on cpu: computed, " in out and str(stored) in out
    # Another machine of the same spec: only the reference file copied there.
    (elsewhere / "tiny-lm").mkdir(parents=True)
    (elsewhere / "tiny-lm" / stored.name).write_bytes(stored.read_bytes())
    code, out, err = run_cli(
        capsys, "run", job, "--results", elsewhere, "--ray-temp-dir", ray_temp_dir
    )
    assert code == 0, err
    assert "tiny-lm: FP32 reference on cpu: kept" in out
    for variant in ("fp32-cpu", "int8-dynamic-cpu"):
        a = json.loads((first / "tiny-lm" / f"{variant}.json").read_text())["metrics"]
        b = json.loads((elsewhere / "tiny-lm" / f"{variant}.json").read_text())["metrics"]
        assert a["kl_vs_fp32"] == b["kl_vs_fp32"] and a["kl_stats"] == b["kl_stats"]


def test_a_run_says_why_a_stored_reference_is_not_used_and_rewrites_it(
    capsys, tmp_path, llama, ray_temp_dir
):
    job = write_job(tmp_path, lm_job(llama, variants="[int8-dynamic-cpu]"))
    stored = tmp_path / "results" / "tiny-lm" / "fp32-reference-cpu.npz"
    stored.parent.mkdir(parents=True)
    stored.write_bytes(b"PK\x03\x04 half a file")
    code, out, err = run_cli(
        capsys, "run", job, "--results", tmp_path / "results", "--ray-temp-dir", ray_temp_dir
    )
    assert code == 0, err
    assert f"note: tiny-lm: {stored} was not used: it cannot be read whole" in out
    assert "computed again" in out and stored.stat().st_size > 1000
