"""The calibration block: which jobs need it, which rows it draws (never the evaluation sample's),
what it refuses (exit 2, naming the field), and what a plan says of it."""

from __future__ import annotations

import pytest
from conftest import RT_POLARITY, check_refused, rt_job, run_cli, write_job
from lm_models import build_tiny_llama

from runner.calibration import texts_sha256
from runner.plan import plan_job

CALIBRATION = "calibration: {samples: 16, max_length: 24, seed: 0}"


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("llama"))


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
