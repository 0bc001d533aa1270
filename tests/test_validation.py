"""A bad job file is refused before anything runs: exit 2, the file and field named, nothing written."""

from __future__ import annotations

import pytest

from conftest import RT_POLARITY, rt_job, smsa_job, write_job
from runner.cli import main


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main(list(map(str, args)))
    out = capsys.readouterr()
    return code, out.out, out.err


def check_refused(capsys, tmp_path, job_text: str, *expected: str) -> str:
    """validate and run both exit 2 with the file and the expected words; run writes nothing."""
    job = write_job(tmp_path / "jobs", job_text)
    code, _, err = run_cli(capsys, "validate", job)
    assert code == 2, err
    assert str(job.name) in err and "Traceback" not in err
    for words in expected:
        assert words in err, f"{words!r} not in {err!r}"
    results = tmp_path / "results"
    code, _, err_run = run_cli(capsys, "run", job, "--results", results)
    assert code == 2 and err_run == err
    assert not results.exists()
    return err


def test_a_valid_job_lists_its_variants_and_where_they_run(capsys, tmp_path, tiny_model):
    job = write_job(tmp_path, rt_job(tiny_model, variants="[fp32-cpu, int8-dynamic-cpu, bnb-int8-cuda]"))
    code, out, err = run_cli(capsys, "validate", job)
    assert code == 0, err
    assert "fp32-cpu" in out and "int8-dynamic-cpu" in out and "bnb-int8-cuda" in out
    assert "GPU worker" in out and "quantbench_cuda=1" in out
    assert "24 of 10662 rows" in out


def test_not_yaml(capsys, tmp_path):
    check_refused(capsys, tmp_path, "name: [unclosed\n", "line", "valid YAML")


def test_not_a_mapping(capsys, tmp_path):
    check_refused(capsys, tmp_path, "- just\n- a list\n", "expected a mapping")


def test_unknown_field_suggests_the_right_one(capsys, tmp_path, tiny_model):
    err = check_refused(capsys, tmp_path, rt_job(tiny_model, "baselin: fp32-cpu"), "baselin", "did you mean 'baseline'")
    assert "allowed here" in err


def test_unknown_nested_field(capsys, tmp_path, tiny_model):
    check_refused(capsys, tmp_path, rt_job(tiny_model).replace("batch_size", "batchsize"),
                  "evaluation.batchsize", "did you mean 'batch_size'")


def test_mistyped_field(capsys, tmp_path, tiny_model):
    check_refused(capsys, tmp_path, rt_job(tiny_model).replace("batch_size: 4", "batch_size: four"),
                  "evaluation.batch_size", "'four'", "expected an integer")


def test_unknown_batch_order(capsys, tmp_path, tiny_model):
    check_refused(capsys, tmp_path, rt_job(tiny_model).replace("batch_size: 4", "batch_size: 4, batch_order: longest"),
                  "evaluation.batch_order", "'longest'", "allowed: sample, length")


def test_unknown_precision(capsys, tmp_path, tiny_model):
    check_refused(capsys, tmp_path, rt_job(tiny_model, variants="[fp32-cpu, int4-cpu]"),
                  "variants[1]", "int4", "unknown precision", "bnb-nf4")


def test_int8_dynamic_on_cuda(capsys, tmp_path, tiny_model):
    check_refused(capsys, tmp_path, rt_job(tiny_model, variants="[fp32-cpu, int8-dynamic-cuda]"),
                  "variants[1]", "int8-dynamic-cuda", "runs on cpu only")


def test_int8_dynamic_on_cuda_in_a_grid(capsys, tmp_path, tiny_model):
    text = rt_job(tiny_model).replace("variants: [fp32-cpu, int8-dynamic-cpu]",
                                      "precisions: [fp32, int8-dynamic]\ndevices: [cpu, cuda]")
    check_refused(capsys, tmp_path, text, "precisions[1]", "int8-dynamic-cuda", "runs on cpu only")


def test_baseline_must_be_a_variant(capsys, tmp_path, tiny_model):
    check_refused(capsys, tmp_path, rt_job(tiny_model, "baseline: fp16-cpu"), "baseline", "fp16-cpu", "one of the job's variants")


@pytest.mark.parametrize("variants, baseline", [("[int8-dynamic-cpu, fp32-cpu, fp32-cuda]", "fp32-cpu"),
                                                ("[fp16-cuda, fp32-cuda]", "fp32-cuda"),
                                                ("[fp16-cuda, bnb-int8-cuda]", "fp16-cuda")])
def test_the_default_baseline_is_fp32_on_the_cpu_else_on_cuda_else_the_first_variant(tmp_path, tiny_model,
                                                                                    variants, baseline):
    from runner.spec import load_job

    job = write_job(tmp_path / "jobs", rt_job(tiny_model, variants=variants))
    assert load_job(job).baseline == baseline


def test_missing_dataset_file(capsys, tmp_path, tiny_model):
    check_refused(capsys, tmp_path, rt_job(tiny_model).replace("rt-polarity.neg}", "rt-polarity.negative}"),
                  "dataset.files.neg", "no such file")


def test_missing_model_folder(capsys, tmp_path, tiny_model):
    check_refused(capsys, tmp_path, rt_job(tiny_model.parent / "no-such-model"), "model.path", "no such folder")


def test_missing_package(capsys, tmp_path):
    text = rt_job(RT_POLARITY).replace(f"{{path: {RT_POLARITY}}}", "{package: no_such_package/model}")
    check_refused(capsys, tmp_path, text, "model.package", "no installed Python package")


def test_missing_column(capsys, tmp_path, tiny_model_3):
    check_refused(capsys, tmp_path, smsa_job(tiny_model_3, "{positive: LABEL_0}", dataset_extra="text_column: 5"),
                  "dataset.text_column", "has 2 columns")


def test_dataset_label_without_a_model_label(capsys, tmp_path, tiny_model_3):
    check_refused(capsys, tmp_path, smsa_job(tiny_model_3, "{positive: LABEL_0, neutral: LABEL_1}"),
                  "dataset.label_map", "negative", "no model label")


def test_label_map_names_a_label_the_model_does_not_have(capsys, tmp_path, tiny_model_3):
    check_refused(capsys, tmp_path,
                  smsa_job(tiny_model_3, "{positive: positive, neutral: LABEL_1, negative: LABEL_2}"),
                  "dataset.label_map.positive", "LABEL_0, LABEL_1, LABEL_2")


def test_without_a_label_map_labels_must_be_model_label_names(capsys, tmp_path, tiny_model_3):
    text = smsa_job(tiny_model_3, "null")
    check_refused(capsys, tmp_path, text, "dataset.label_map", "not the model's label names")


@pytest.mark.parametrize("field, value, words", [
    ("sample: {n: 50, seed: 0}", "sample: {n: 50, fraction: 0.5}", "n or fraction"),
    ("sample: {n: 50, seed: 0}", "sample: {fraction: 1.5}", "(0, 1]"),
    ("format: tsv", "format: xlsx", "allowed: csv, tsv, jsonl, parquet, lines"),
])
def test_dataset_field_values(capsys, tmp_path, tiny_model_3, field, value, words):
    text = smsa_job(tiny_model_3, "{positive: LABEL_0, neutral: LABEL_1, negative: LABEL_2}").replace(field, value)
    check_refused(capsys, tmp_path, text, words)


@pytest.mark.parametrize("edit", ["as saved", "no id2label", "num_labels only"])
def test_a_local_models_label_names_are_read_as_transformers_reads_them(tmp_path, tiny_model_3, edit):
    import json
    import shutil

    from transformers import AutoConfig

    from runner import models
    from runner.spec import ModelSource

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_3, folder)
    config = json.loads((folder / "config.json").read_text())
    if edit != "as saved":
        config.pop("id2label"), config.pop("label2id")
    if edit == "num_labels only":
        config["num_labels"] = 3
    (folder / "config.json").write_text(json.dumps(config))

    expected = models.label_names(AutoConfig.from_pretrained(folder))
    assert models.model_label_names(ModelSource(path=folder), tmp_path / "job.yaml") == expected
    assert len(expected) == {"as saved": 3, "no id2label": 2, "num_labels only": 3}[edit]
