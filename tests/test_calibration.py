"""The calibration block: which jobs need it, which rows it draws (never the evaluation sample's),
what it refuses (exit 2, naming the field), and what a plan says of it."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import RT_POLARITY, check_refused, rt_job, run_cli, variant_json, write_job

from runner.calibration import texts_sha256
from runner.plan import plan_job

CALIBRATION = "calibration: {samples: 16, max_length: 24, seed: 0}"


def lm_job(model, calibration: str = CALIBRATION, variants: str = "[fp32-cpu, int8-static-cpu]"):
    return f"""
name: tiny-calibrated
task: causal-lm
model: {{path: {model}}}
dataset:
  format: lines
  path: {RT_POLARITY}
  files: {{pos: rt-polarity.pos, neg: rt-polarity.neg}}
  sample: {{n: 12, seed: 3}}
perplexity: {{context: 16, stride: 8}}
settings: {{torchao_int4_group_size: 32}}
variants: {variants}
{calibration}
"""


def sample_texts(plan) -> set[str]:
    return {e.text for e in plan.examples}


def test_the_default_rows_come_from_outside_the_evaluation_sample(tmp_path, llama):
    plan = plan_job(write_job(tmp_path, lm_job(llama)))
    rows = plan.calibration
    assert len(rows.texts) == 16 and rows.max_length == 24
    assert not set(rows.texts) & sample_texts(plan)
    assert rows.record["overlap_with_sample"] == 0
    assert rows.record["texts_sha256"] == texts_sha256(rows.texts)
    assert "outside the evaluation sample" in rows.record["source"]
    again = plan_job(write_job(tmp_path / "again", lm_job(llama)))
    assert again.calibration.texts == rows.texts  # seeded: every worker gets the same rows
    other = plan_job(write_job(tmp_path / "seed", lm_job(llama, CALIBRATION.replace("0}", "1}"))))
    assert other.calibration.texts != rows.texts


def test_validate_says_where_the_rows_come_from(capsys, tmp_path, llama):
    code, out, err = run_cli(capsys, "validate", write_job(tmp_path, lm_job(llama)))
    assert code == 0, err
    assert "calibration: 16 rows of the job's dataset, outside the evaluation sample" in out
    assert "up to 24 tokens each (seed 0); in the evaluation sample: none" in out


def test_a_calibrated_precision_without_a_calibration_block_is_refused(capsys, tmp_path, llama):
    job = lm_job(llama, calibration="", variants="[fp32-cpu, awq-int4-cpu, int8-static-cpu]")
    check_refused(capsys, tmp_path, job, "calibration", "awq-int4, int8-static calibrate on data")


def test_a_calibration_block_without_a_calibrated_precision_is_refused(capsys, tmp_path, llama):
    job = lm_job(llama, variants="[fp32-cpu, torchao-int4-weight-cpu]")
    check_refused(capsys, tmp_path, job, "calibration", "no precision of this job calibrates")


def test_a_study_of_a_calibrated_precision_needs_the_block_too(capsys, tmp_path, llama):
    study = "sensitivity: {precision: smoothquant-int8}"
    job = lm_job(llama, calibration=study, variants="[fp32-cpu]")
    check_refused(capsys, tmp_path, job, "calibration", "smoothquant-int8 calibrate on data")


def test_a_file_that_shares_rows_with_the_sample_is_refused_unless_allowed(capsys, tmp_path, llama):
    plan = plan_job(write_job(tmp_path / "plain", lm_job(llama)))
    shared = sorted(sample_texts(plan))[:3]
    calibration_file = tmp_path / "calib.txt"
    calibration_file.write_text("\n".join(shared + [f"a row of its own {i}" for i in range(5)]))
    block = f"calibration: {{dataset: {{format: text, path: {calibration_file}}}, samples: 8}}"
    check_refused(
        capsys,
        tmp_path,
        lm_job(llama, block),
        "calibration.dataset",
        "3 of its 8 rows are in the evaluation sample",
        "allow_overlap",
    )
    allowed = block.replace("samples: 8", "samples: 8, allow_overlap: true")
    plan = plan_job(write_job(tmp_path / "allowed", lm_job(llama, allowed)))
    assert plan.calibration.record["overlap_with_sample"] == 3
    assert plan.calibration.record["source"] == f"text:{calibration_file}"


@pytest.mark.parametrize(
    "block, words",
    [
        ("calibration: {samples: 0}", ("calibration.samples", "expected an integer >= 1")),
        ("calibration: {samples: 100000}", ("calibration.samples", "at most")),
        ("calibration: {max_length: 65}", ("calibration.max_length", "at most 64 tokens")),
        ("calibration: {shuffle: true}", ("calibration.shuffle", "unknown field")),
        ("calibration: {allow_overlap: 1}", ("calibration.allow_overlap", "true or false")),
        (
            "calibration: {samples: 4}\nsettings: {smoothquant_alpha: 1.5}",
            ("settings.smoothquant_alpha", "a number from 0 to 1"),
        ),
    ],
)
def test_bad_calibration_fields_are_refused(capsys, tmp_path, llama, block, words):
    job = lm_job(llama, block)
    if "settings:" in block:
        job = job.replace("settings: {torchao_int4_group_size: 32}\n", "")
    check_refused(capsys, tmp_path, job, *words)


@pytest.mark.parametrize(
    "content, words",
    [
        (None, ("calibration.dataset.path", "no such file")),
        (b"\n\n", ("calibration.dataset.path", "no rows")),
        (b"caf\xe9 au lait\n", ("calibration.dataset.path", "UnicodeDecodeError")),
    ],
)
def test_a_missing_empty_or_undecodable_calibration_file_is_refused(
    capsys, tmp_path, llama, content, words
):
    path = tmp_path / "calib.txt"
    if content is not None:
        path.write_bytes(content)
    block = f"calibration: {{dataset: {{format: text, path: {path}}}, samples: 1}}"
    check_refused(capsys, tmp_path, lm_job(llama, block), *words)


def test_a_classifier_calibrates_on_texts_without_labels(tmp_path, tiny_model):
    texts = tmp_path / "calib.txt"
    texts.write_text("\n".join(f"an unlabelled film review, number {i}" for i in range(20)))
    block = f"calibration: {{dataset: {{format: text, path: {texts}}}, samples: 20}}"
    job = rt_job(tiny_model, block, variants="[fp32-cpu, int8-static-cpu]")
    plan = plan_job(write_job(tmp_path, job))
    assert len(plan.calibration.texts) == 20
    assert plan.calibration.texts[0].startswith("an unlabelled film review")


# ---------------------------------------------------------------------------------------------
# A run with calibrated precisions, as a user runs it.

CALIBRATED = "[fp32-cpu, int8-static-cpu, smoothquant-int8-cpu, awq-int4-cpu, gptq-int4-cpu]"


def test_a_run_times_calibration_apart_and_records_its_rows(
    capsys, tmp_path, llama, ray_temp_dir, private_timing_lock
):
    job = write_job(tmp_path, lm_job(llama, variants=CALIBRATED))
    results = tmp_path / "results"
    code, out, err = run_cli(
        capsys, "run", job, "--results", results, "--ray-temp-dir", ray_temp_dir
    )
    assert code == 0, err
    planned = plan_job(job).calibration
    for variant in ("int8-static-cpu", "smoothquant-int8-cpu", "awq-int4-cpu", "gptq-int4-cpu"):
        result = json.loads((results / "tiny-calibrated" / f"{variant}.json").read_text())
        assert result["status"] == "ok", result["error"]
        metrics, settings = result["metrics"], result["settings"]
        assert metrics["calibrate_s"] > 0 and "calibrate" in metrics["memory_phases"]
        recorded = settings["calibration"]
        assert recorded["rows"] == 16 and recorded["texts_sha256"] == planned.record["texts_sha256"]
        assert 16 < recorded["tokens"] <= 16 * 24  # each row after its prefix, cut to 24
        assert settings["library"] in ("torchao", "neural-compressor-pt")
        assert settings["library_version"] and settings["config"]
        assert result["analysis"]["layers"]  # the weight analysis read its layers back
    fp32 = json.loads((results / "tiny-calibrated" / "fp32-cpu.json").read_text())
    assert "calibrate_s" not in fp32["metrics"] and "calibration" not in fp32["settings"]
    assert "calibrate (s)" in out

    code, out, err = run_cli(
        capsys, "run", job, "--results", results, "--resume", "--ray-temp-dir", ray_temp_dir
    )
    assert code == 0 and "[resume] tiny-calibrated awq-int4-cpu: kept" in out, err
    report = tmp_path / "report.html"
    assert run_cli(capsys, "report", results, "--out", report)[0] == 0
    assert "smoothquant-int8-cpu" in report.read_text()


def test_a_layer_its_library_cannot_quantize_fails_the_variant_naming_it(
    tmp_path, llama, private_timing_lock, monkeypatch
):
    from runner import models
    from runner.job import Variant
    from runner.precisions.calibrated import int8_static
    from runner.sweep import variant_work

    made = int8_static.static_int8_layer

    def refuse_the_mlp(layer, absmax, smoothing=None):
        if layer.in_features != layer.out_features:  # the MLP's layers and lm_head
            raise ValueError("shape not supported")
        return made(layer, absmax, smoothing)

    monkeypatch.setattr(int8_static, "static_int8_layer", refuse_the_mlp)
    plan = plan_job(write_job(tmp_path, lm_job(llama)))
    model_dir, info = models.prepare_model(plan.spec)
    variants = [Variant("int8-static", "cpu"), Variant("fp32", "cpu")]
    failed, ok = (variant_json(w) for w in variant_work(plan, model_dir, info, set(), variants))
    assert failed["status"] == "failed"
    assert "int8-static: torchao failed at layer 'model.layers.0.mlp." in failed["error"]
    assert "ValueError: shape not supported" in failed["error"]
    assert ok["status"] == "ok"


@pytest.mark.parametrize("precision", ["smoothquant-int8", "gptq-int4"])
def test_a_study_calibrates_once_on_the_whole_model_and_keeps_layers_fp32(
    tmp_path, llama, precision
):
    from dataclasses import replace

    from runner import models
    from runner.job import SensitivitySpec
    from runner.precisions import family_of
    from runner.study import steps
    from runner.work import StudyWork

    study = f"sensitivity: {{precision: {precision}, groups: type}}\n{CALIBRATION}"
    plan = plan_job(write_job(tmp_path, lm_job(llama, study, variants="[fp32-cpu]")))
    model_dir, _ = models.prepare_model(plan.spec)
    probe = StudyWork(
        kind="probe",
        study=SensitivitySpec(precision, "cpu", "type"),
        family=family_of(precision),
        model_dir=str(model_dir),
        **plan.worker_inputs(),
    )
    found = steps.run_step(probe)
    assert {"query", "mlp_down", "lm_head"} <= set(found["groups"])
    assert found["full"]["agreement"] < 1.0
    step = replace(probe, kind="groups", layers=tuple(found["layers"]), groups=found["groups"])
    loaded = steps.load(step)
    kept = frozenset(found["groups"]["mlp_down"])
    other = found["groups"]["query"][0]
    family = probe.family.family_worker()
    config = family_config(probe)
    with steps.mixed(loaded, kept) as mixed:
        for name in kept:
            layer = mixed.get_submodule(name)
            assert type(layer) is torch.nn.Linear and type(layer.weight) is torch.nn.Parameter
            assert torch.equal(layer.weight, loaded.fp32.get_submodule(name).weight)
        assert family.is_quantized(config, mixed.get_submodule(other))
    # Put back: the fully quantized model holds its own quantized layers again.
    assert all(family.is_quantized(config, loaded.full.get_submodule(name)) for name in kept)
    nothing = steps.study_of(loaded, step.layers)
    same = nothing.compare(nothing.evaluate(frozenset(step.layers)))  # every layer kept
    assert same["agreement"] == 1.0


def family_config(step):
    from runner.precisions import config_for

    return config_for(step.precision, step.settings)
