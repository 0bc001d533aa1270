"""A bad job file is refused before anything runs: exit 2, the file and field named, nothing
written."""

from __future__ import annotations

import pytest
from conftest import RT_POLARITY, SMSA, check_refused, rt_job, run_cli, smsa_job, write_job

from runner.cli import main


def test_a_valid_job_lists_its_variants_and_where_they_run(capsys, tmp_path, tiny_model):
    job = write_job(
        tmp_path, rt_job(tiny_model, variants="[fp32-cpu, int8-dynamic-cpu, bnb-int8-cuda]")
    )
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
    err = check_refused(
        capsys,
        tmp_path,
        rt_job(tiny_model, "baselin: fp32-cpu"),
        "baselin",
        "did you mean 'baseline'",
    )
    assert "allowed here" in err


def test_unknown_nested_field(capsys, tmp_path, tiny_model):
    check_refused(
        capsys,
        tmp_path,
        rt_job(tiny_model).replace("batch_size", "batchsize"),
        "evaluation.batchsize",
        "did you mean 'batch_size'",
    )


def test_mistyped_field(capsys, tmp_path, tiny_model):
    check_refused(
        capsys,
        tmp_path,
        rt_job(tiny_model).replace("batch_size: 4", "batch_size: four"),
        "evaluation.batch_size",
        "'four'",
        "expected an integer",
    )


def test_unknown_batch_order(capsys, tmp_path, tiny_model):
    check_refused(
        capsys,
        tmp_path,
        rt_job(tiny_model).replace("batch_size: 4", "batch_size: 4, batch_order: longest"),
        "evaluation.batch_order",
        "'longest'",
        "allowed: sample, length",
    )


def test_unknown_precision(capsys, tmp_path, tiny_model):
    check_refused(
        capsys,
        tmp_path,
        rt_job(tiny_model, variants="[fp32-cpu, int4-cpu]"),
        "variants[1]",
        "int4",
        "unknown precision",
        "bnb-nf4",
    )


def test_int8_dynamic_on_cuda(capsys, tmp_path, tiny_model):
    check_refused(
        capsys,
        tmp_path,
        rt_job(tiny_model, variants="[fp32-cpu, int8-dynamic-cuda]"),
        "variants[1]",
        "int8-dynamic-cuda",
        "runs on cpu only",
    )


def grid(model, precisions: str, devices: str) -> str:
    return rt_job(model).replace(
        "variants: [fp32-cpu, int8-dynamic-cpu]", f"precisions: {precisions}\ndevices: {devices}"
    )


def test_a_grid_leaves_out_the_pairs_that_cannot_run_and_says_why(capsys, tmp_path, tiny_model):
    from runner.spec import load_job

    job = write_job(tmp_path, grid(tiny_model, "[fp32, int8-dynamic]", "[cpu, cuda]"))
    assert [v.id for v in load_job(job).variants] == ["fp32-cpu", "fp32-cuda", "int8-dynamic-cpu"]
    code, out, err = run_cli(capsys, "validate", job)
    assert code == 0, err
    assert (
        "  note: left out int8-dynamic-cuda, not a variant of precisions × devices that can run: "
        "int8-dynamic runs on cpu only (" in out
    )
    listed = out[out.index("  variants:") :]
    assert "int8-dynamic-cpu" in listed and "int8-dynamic-cuda" not in listed


def test_a_grid_of_which_no_pair_can_run_is_refused(capsys, tmp_path, tiny_model):
    text = grid(tiny_model, "[int8-dynamic]", "[cuda]")
    check_refused(capsys, tmp_path, text, "devices", "no pair of them can run", "int8-dynamic-cuda")


def test_a_grid_still_refuses_an_unknown_precision(capsys, tmp_path, tiny_model):
    text = grid(tiny_model, "[fp32, int4]", "[cpu, cuda]")
    check_refused(capsys, tmp_path, text, "precisions[1]", "int4", "unknown precision")


def test_baseline_must_be_a_variant(capsys, tmp_path, tiny_model):
    check_refused(
        capsys,
        tmp_path,
        rt_job(tiny_model, "baseline: fp16-cpu"),
        "baseline",
        "fp16-cpu",
        "one of the job's variants",
    )


@pytest.mark.parametrize(
    "variants, baseline",
    [
        ("[int8-dynamic-cpu, fp32-cpu, fp32-cuda]", "fp32-cpu"),
        ("[fp16-cuda, fp32-cuda]", "fp32-cuda"),
        ("[fp16-cuda, bnb-int8-cuda]", "fp16-cuda"),
    ],
)
def test_the_default_baseline_is_fp32_on_the_cpu_else_on_cuda_else_the_first_variant(
    tmp_path, tiny_model, variants, baseline
):
    from runner.spec import load_job

    job = write_job(tmp_path / "jobs", rt_job(tiny_model, variants=variants))
    assert load_job(job).baseline == baseline


def test_missing_dataset_file(capsys, tmp_path, tiny_model):
    check_refused(
        capsys,
        tmp_path,
        rt_job(tiny_model).replace("rt-polarity.neg}", "rt-polarity.negative}"),
        "dataset.files.neg",
        "no such file",
    )


def test_missing_model_folder(capsys, tmp_path, tiny_model):
    check_refused(
        capsys,
        tmp_path,
        rt_job(tiny_model.parent / "no-such-model"),
        "model.path",
        "no such folder",
    )


@pytest.mark.parametrize(
    "make, says",
    [
        (
            lambda p: (p.symlink_to(p.parent / "loop-b"), (p.parent / "loop-b").symlink_to(p)),
            "a symlink loop",
        ),
        # As written: "a symlink to nothing (.../model -> .../gone)"; a relative path is
        # resolved first: "no such folder (.../gone)".
        (lambda p: p.symlink_to(p.parent / "gone"), "gone)"),
        (lambda p: p.write_text("weights?"), "a file, not a folder"),
    ],
    ids=["loop", "dangling", "file"],
)
def test_a_model_path_that_is_no_folder_says_what_it_is(capsys, tmp_path, make, says):
    make(tmp_path / "model")
    for path in (tmp_path / "model", "../model"):  # as written, and relative to the job's folder
        check_refused(capsys, tmp_path, rt_job(path), "model.path", says)


def test_missing_package(capsys, tmp_path):
    text = rt_job(RT_POLARITY).replace(
        f"{{path: {RT_POLARITY}}}", "{package: no_such_package/model}"
    )
    check_refused(capsys, tmp_path, text, "model.package", "no installed Python package")


def test_missing_column(capsys, tmp_path, tiny_model_3):
    check_refused(
        capsys,
        tmp_path,
        smsa_job(tiny_model_3, "{positive: LABEL_0}", dataset_extra="text_column: 5"),
        "dataset.text_column",
        "has 2 columns",
    )


def test_dataset_label_without_a_model_label(capsys, tmp_path, tiny_model_3):
    check_refused(
        capsys,
        tmp_path,
        smsa_job(tiny_model_3, "{positive: LABEL_0, neutral: LABEL_1}"),
        "dataset.label_map",
        "negative",
        "no model label",
    )


def test_label_map_names_a_label_the_model_does_not_have(capsys, tmp_path, tiny_model_3):
    check_refused(
        capsys,
        tmp_path,
        smsa_job(tiny_model_3, "{positive: positive, neutral: LABEL_1, negative: LABEL_2}"),
        "dataset.label_map.positive",
        "LABEL_0, LABEL_1, LABEL_2",
    )


def test_without_a_label_map_labels_must_be_model_label_names(capsys, tmp_path, tiny_model_3):
    text = smsa_job(tiny_model_3, "null")
    check_refused(capsys, tmp_path, text, "dataset.label_map", "not the model's label names")


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("sample: {n: 50, seed: 0}", "sample: {n: 50, fraction: 0.5}", "n or fraction"),
        ("sample: {n: 50, seed: 0}", "sample: {fraction: 1.5}", "(0, 1]"),
        ("format: tsv", "format: xlsx", "allowed: csv, tsv, jsonl, parquet, lines"),
    ],
)
def test_dataset_field_values(capsys, tmp_path, tiny_model_3, field, value, words):
    text = smsa_job(
        tiny_model_3, "{positive: LABEL_0, neutral: LABEL_1, negative: LABEL_2}"
    ).replace(field, value)
    check_refused(capsys, tmp_path, text, words)


def test_a_format_taken_from_the_files_suffix_says_so(capsys, tmp_path, tiny_model_3):
    text = smsa_job(tiny_model_3, "{positive: LABEL_0, neutral: LABEL_1, negative: LABEL_2}")
    text = text.replace("  format: tsv\n", "").replace("test_preprocess.tsv", "test_preprocess.txt")
    check_refused(
        capsys,
        tmp_path,
        text,
        "dataset.format: found 'txt'",
        "taken from the suffix of",
        "name one",
    )


@pytest.mark.parametrize("edit", ["as saved", "no id2label", "num_labels only"])
def test_a_local_models_label_names_are_read_as_transformers_reads_them(
    tmp_path, tiny_model_3, edit
):
    import json
    import shutil

    from transformers import AutoConfig

    from runner import models
    from runner.job import ModelSource

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


def test_a_model_folder_without_a_tokenizer_is_refused(capsys, tmp_path, tiny_model):
    """Saved without its tokenizer, transformers would build one of 5 special tokens: every word
    [UNK]."""
    import shutil

    bare = tmp_path / "model-only"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model / name, bare / name)
    check_refused(
        capsys,
        tmp_path,
        rt_job(bare),
        "model",
        "no tokenizer vocabulary",
        "tokenizer.save_pretrained",
    )
    # Naming a tokenizer that has a vocabulary makes the same folder usable.
    job = write_job(tmp_path / "ok", rt_job(bare, extra=f"tokenizer: {{path: {tiny_model}}}"))
    code, _, err = run_cli(capsys, "validate", job)
    assert code == 0, err


@pytest.mark.parametrize(
    "damage, expected",
    [
        ("cut short", "the weights file is damaged"),  # an interrupted copy
        ("removed", "the folder has no weights"),
        (
            "sharded, one shard missing",
            "shards the folder does not hold: model-00002-of-00002.safetensors",
        ),
    ],
)
def test_a_model_folder_without_whole_weights_is_refused(
    capsys, tmp_path, tiny_model, damage, expected
):
    import json
    import shutil

    folder = tmp_path / "copied-model"
    shutil.copytree(tiny_model, folder)
    weights = folder / "model.safetensors"
    if damage == "cut short":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "removed":
        weights.unlink()
    else:
        weights.rename(folder / "model-00001-of-00002.safetensors")
        index = {
            "metadata": {},
            "weight_map": {
                "bert.embeddings.word_embeddings.weight": "model-00001-of-00002.safetensors",
                "classifier.weight": "model-00002-of-00002.safetensors",
            },
        }
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    check_refused(capsys, tmp_path, rt_job(folder), "model", str(folder), expected)


@pytest.mark.parametrize(
    "edit, field",
    [
        ("max_length: 32", "dataset.max_length"),  # the tiny model has 128 positions
        ("evaluation: {", "evaluation.fixed_shape"),
    ],
)
def test_sequences_longer_than_the_model_takes_are_refused(
    capsys, tmp_path, tiny_model, edit, field
):
    text = rt_job(tiny_model)
    if field == "dataset.max_length":
        text = text.replace(edit, "max_length: 512")
    else:
        text = text.replace(edit, "evaluation: {latency_mode: fixed, fixed_shape: [1, 2048], ")
    check_refused(capsys, tmp_path, text, field, "at most 128 tokens", "max_position_embeddings")


def test_an_unknown_device_is_named_where_it_is_in_a_grid(capsys, tmp_path, tiny_model):
    text = rt_job(tiny_model, variants="null\nprecisions: [fp32]\ndevices: [cpu, tpu]")
    check_refused(capsys, tmp_path, text, "devices[1]", "'tpu'", "unknown device")


def test_a_text_column_read_as_labels_is_named_and_kept_short(capsys, tmp_path, tiny_model_3):
    text = smsa_job(tiny_model_3, "null", dataset_extra="label_column: 0")
    err = check_refused(
        capsys, tmp_path, text, "dataset.label_map", "(50 in all)", "dataset.label_column"
    )
    assert len(err) < 2000, len(err)


def test_an_unknown_inline_model_type_is_named_briefly(capsys, tmp_path, tiny_model):
    text = rt_job(tiny_model).replace(
        f"model: {{path: {tiny_model}}}",
        f"model: {{config: {{model_type: bret, hidden_size: 32}}}}\n"
        f"tokenizer: {{path: {tiny_model}}}",
    )
    err = check_refused(
        capsys, tmp_path, text, "model.config.model_type", "'bret'", "did you mean bert"
    )
    assert len(err) < 1000, len(err)


def test_a_sample_larger_than_the_dataset_is_said_to_use_every_row(capsys, tmp_path, tiny_model_3):
    job = write_job(
        tmp_path,
        smsa_job(
            tiny_model_3, "{positive: LABEL_0, neutral: LABEL_1, negative: LABEL_2}", n=100000
        ),
    )
    code, out, err = run_cli(capsys, "validate", job)
    assert code == 0, err
    rows = len((SMSA / "test_preprocess.tsv").read_text(encoding="utf-8").splitlines())
    assert (
        f"{rows} of {rows} rows" in out and f"sample.n asks for 100000, all {rows} are used" in out
    )
    assert "evaluation: batch_size 1," in out  # read as settings, not as a Python dict


def test_a_missing_section_is_called_missing(capsys, tmp_path, tiny_model):
    text = rt_job(tiny_model)
    without_dataset = text[: text.index("dataset:")] + text[text.index("evaluation:") :]
    check_refused(
        capsys, tmp_path, without_dataset, "dataset: found nothing; this field is required"
    )


def test_an_inline_architecture_whose_heads_do_not_divide_its_width_is_refused(
    capsys, tmp_path, tiny_model
):
    # BertConfig takes it; building the model would fail in every variant, after Ray started.
    text = rt_job(tiny_model).replace(
        f"model: {{path: {tiny_model}}}",
        "model: {config: {model_type: bert, hidden_size: 30, num_attention_heads: 4, "
        "num_hidden_layers: 1, intermediate_size: 37, id2label: {0: negative, 1: positive}}}\n"
        f"tokenizer: {{path: {tiny_model}}}",
    )
    check_refused(
        capsys,
        tmp_path,
        text,
        "model.config.hidden_size",
        "30",
        "multiple of num_attention_heads (4)",
    )
    job = write_job(tmp_path / "ok", text.replace("hidden_size: 30", "hidden_size: 32"))
    code, _, err = run_cli(capsys, "validate", job)
    assert code == 0, err


def csv_job(tmp_path, model, contents: str) -> str:
    """The tiny rt job, reading its rows from reviews.csv with these contents instead."""
    data = tmp_path / "reviews.csv"
    data.write_text(contents)
    return rt_job(model).replace(
        f"""  format: lines
  path: {RT_POLARITY}
  files: {{pos: rt-polarity.pos, neg: rt-polarity.neg}}""",
        f"  path: {data}",
    )


def test_a_row_without_a_label_is_named_by_its_line(capsys, tmp_path, tiny_model):
    text = csv_job(
        tmp_path, tiny_model, "text,label\na fine film,pos\nsome text,\na dull film,neg\n"
    )
    check_refused(
        capsys,
        tmp_path,
        text,
        "dataset.label_column",
        "1 row(s) have an empty label, first line 3 of reviews.csv",
    )


def test_a_label_the_map_does_not_cover_is_named_with_its_first_line(capsys, tmp_path, tiny_model):
    text = csv_job(
        tmp_path, tiny_model, "text,label\na fine film,pos\na dull film,neg\nso-so,mixed\n"
    )
    check_refused(capsys, tmp_path, text, "dataset.label_map", "line 4 of reviews.csv: 'mixed'")


def test_a_folder_above_the_model_is_refused_naming_the_folder_that_holds_it(
    capsys, tmp_path, tiny_model
):
    import shutil

    shutil.copytree(tiny_model, tmp_path / "models" / "tiny")
    check_refused(
        capsys,
        tmp_path,
        rt_job(tmp_path / "models"),
        "model",
        "has no config.json",
        "a folder below holds one: tiny",
    )


def test_an_evaluation_sample_of_one_label_is_pointed_out(capsys, tmp_path, tiny_model):
    text = csv_job(
        tmp_path, tiny_model, "text,label\na fine film,pos\na good film,pos\na great film,pos\n"
    )
    code, out, err = run_cli(capsys, "validate", write_job(tmp_path, text))
    assert code == 0, err
    assert "note: every row of the evaluation sample has the label 'pos'" in out
    code, out, err = run_cli(capsys, "validate", write_job(tmp_path / "two", rt_job(tiny_model)))
    assert code == 0 and "note:" not in out


def test_two_jobs_of_one_name_are_refused_naming_both_files(capsys, tmp_path, tiny_model):
    first = write_job(tmp_path / "a", rt_job(tiny_model))
    second = write_job(tmp_path / "b", rt_job(tiny_model))
    code, _, err = run_cli(capsys, "run", first, second, "--results", tmp_path / "results")
    assert code == 2 and "tiny-rt" in err and str(first) in err and str(second) in err, err
    assert not (tmp_path / "results").exists()


def test_empty_and_repeated_texts_in_the_evaluation_sample_are_pointed_out(
    capsys, tmp_path, tiny_model
):
    text = csv_job(
        tmp_path,
        tiny_model,
        "text,label\na fine film,pos\n,neg\na fine film,pos\na dull film,neg\n",
    )
    code, out, err = run_cli(capsys, "validate", write_job(tmp_path, text))
    assert code == 0, err
    assert (
        "note: 1 row(s) of the evaluation sample have an empty text (first at line 3 of "
        "reviews.csv)" in out
    )
    assert "note: 1 row(s) of the evaluation sample repeat a text of another row" in out


def test_inside_a_container_a_missing_file_names_the_folders_it_can_see(
    capsys, tmp_path, monkeypatch
):
    """compose.yaml sets QUANTBENCH_MOUNTS on the drivers; a job or data file outside them is named
    so."""
    monkeypatch.setenv("QUANTBENCH_MOUNTS", "./jobs as /workspace/main/jobs")
    job = write_job(tmp_path, "name: j\nmodel: {path: /nowhere}\n")

    assert main(["validate", str(tmp_path / "absent.yaml")]) == 2
    assert main(["validate", str(job)]) == 2

    err = capsys.readouterr().err.splitlines()
    assert err[0].endswith(
        "no such job file; this container sees only ./jobs as /workspace/main/jobs: "
        "put it there, or mount its folder"
    )
    assert (
        "model.path: found '/nowhere'; no such folder (/nowhere); this container sees only"
        in err[1]
    )


def test_a_folder_given_as_the_job_file_is_named_a_folder(capsys, tmp_path):
    assert main(["validate", str(tmp_path)]) == 2
    assert "this is a folder; name a job file (YAML) in it" in capsys.readouterr().err


def test_an_empty_ray_temp_dir_is_refused(capsys, tmp_path):
    with pytest.raises(SystemExit) as stopped:
        main(["run", str(tmp_path / "job.yaml"), "--ray-temp-dir", ""])
    assert stopped.value.code == 2
    assert "expected a folder, found an empty string" in capsys.readouterr().err


def test_a_closed_output_pipe_is_no_cluster_error(tmp_path, tiny_model):
    """`quantbench validate … | head -1` said 'cannot reach the Ray cluster: Broken pipe'."""
    import subprocess
    import sys

    job = write_job(tmp_path, rt_job(tiny_model), name="a.yaml")
    # true has exited long before validation prints: the first write meets a closed pipe.
    shell = f"{sys.executable} -m runner.cli validate {job} | true; echo ${{PIPESTATUS[0]}}"
    done = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "141", done.stdout + done.stderr
    assert done.stderr == "", done.stderr
