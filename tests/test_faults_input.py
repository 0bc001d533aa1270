"""Hostile or unlucky input (issue 18): refused before anything runs, with exit 2 and the field or
line named, or read with a note; result folders with files that are not results are read around
them, each skipped file named. Every input is a real file written here; nothing is mocked but the
network's absence.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, RT_POLARITY, check_refused, rt_job, run_cli, write_job

from runner.cli import main

REFERENCE = REPO / "results" / "reference" / "cpu-2core-amd-epyc" / "demo"


def valid(capsys, tmp_path, job_text: str) -> str:
    code, out, err = run_cli(capsys, "validate", write_job(tmp_path / "jobs", job_text))
    assert code == 0, err
    return out


def inline_job(model: Path, config: str) -> str:
    """The tiny rt job with an inline architecture (random weights) and the tiny model's
    tokenizer."""
    return rt_job(model).replace(
        f"model: {{path: {model}}}",
        f"model: {{config: {{model_type: bert, {config}}}}}\ntokenizer: {{path: {model}}}",
    )


# ---------------------------------------------------------------------------------------------
# NaN and infinity: .inf in min_time_s never ended; .nan ran every variant, then no result could be
# written.


@pytest.mark.parametrize(
    "edit, field",
    [
        ("evaluation: {min_time_s: .inf, ", "evaluation.min_time_s"),
        ("evaluation: {min_time_s: .nan, ", "evaluation.min_time_s"),
        ("tolerances: {max_latency_ms: .nan}\nevaluation: {", "tolerances.max_latency_ms"),
        ("tolerances: {min_agreement: -.inf}\nevaluation: {", "tolerances.min_agreement"),
        ("settings: {llm_int8_threshold: .nan}\nevaluation: {", "settings.llm_int8_threshold"),
        ("finetune: {learning_rate: .NaN}\nevaluation: {", "finetune.learning_rate"),
    ],
)
def test_nan_and_infinity_are_refused_naming_the_field(capsys, tmp_path, tiny_model, edit, field):
    check_refused(
        capsys,
        tmp_path,
        rt_job(tiny_model).replace("evaluation: {", edit),
        f"{field}: found",
        "expected a finite number",
    )


def test_nan_in_an_inline_config_field_is_refused(capsys, tmp_path, tiny_model):
    text = inline_job(
        tiny_model,
        "hidden_size: 32, num_attention_heads: 2, num_hidden_layers: 1, "
        "intermediate_size: 37, layer_norm_eps: .nan, id2label: {0: negative, 1: positive}",
    )
    check_refused(
        capsys, tmp_path, text, "model.config.layer_norm_eps: found nan", "expected a finite number"
    )


# ---------------------------------------------------------------------------------------------
# YAML: bounded in aliases, depth and size; a key given twice is refused.


def alias_bomb() -> str:
    """Nine levels of nine aliases each: 9**9 strings once expanded, in a few hundred bytes."""
    levels = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    levels += [
        f"{chr(98 + i)}: &{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 9) + "]"
        for i in range(8)
    ]
    return "\n".join(levels)


def test_a_yaml_alias_bomb_is_refused_at_once(capsys, tmp_path, tiny_model):
    # Under an unknown field, so that the code before this check refused it too, without naming the
    # aliases.
    text = (
        rt_job(tiny_model)
        + "x-anchors:\n"
        + "".join(f"  {line}\n" for line in alias_bomb().splitlines())
    )
    assert len(text.encode()) < 2000
    # The bound is this machine's own speed now: the same refusal of a job with one alias, timed.
    one_alias = rt_job(tiny_model) + "x-anchors:\n  a: &a [lol]\n  b: *a\n"
    started = time.monotonic()
    code, _, _ = run_cli(capsys, "validate", write_job(tmp_path / "one", one_alias))
    assert code == 2
    usual_s = time.monotonic() - started
    started = time.monotonic()
    check_refused(
        capsys, tmp_path, text, "line 2", "aliases (*name) are expanded", "use fewer or no aliases"
    )
    # validate and run, each refusing at once (9**9 strings expanded would take minutes).
    assert time.monotonic() - started < 10 * usual_s + 2


@pytest.mark.parametrize("style", ["flow", "block"])
def test_yaml_nested_1000_deep_is_refused_without_a_traceback(capsys, tmp_path, tiny_model, style):
    deep = (
        "[" * 1000 + "]" * 1000
        if style == "flow"
        else "\n" + "".join(" " * (i + 1) + "a:\n" for i in range(1000))
    )
    check_refused(
        capsys, tmp_path, rt_job(tiny_model) + f"x-deep: {deep}\n", "nesting deeper than 64 levels"
    )


def test_a_job_file_over_the_size_limit_is_refused(capsys, tmp_path, tiny_model):
    from runner.spec import MAX_JOB_BYTES

    padding = "# padding\n" * (MAX_JOB_BYTES // 10 + 1)
    check_refused(
        capsys, tmp_path, rt_job(tiny_model) + padding, "bytes", f"at most {MAX_JOB_BYTES:,} bytes"
    )


def test_a_key_given_twice_is_refused_naming_the_key_and_both_lines(capsys, tmp_path, tiny_model):
    # The second pos would have remapped the class silently.
    text = rt_job(tiny_model).replace(
        "label_map: {pos: positive, neg: negative}",
        "label_map:\n    pos: positive\n    neg: negative\n    pos: negative",
    )
    line = text.splitlines().index("    pos: negative") + 1
    check_refused(
        capsys,
        tmp_path,
        text,
        f"line {line}, column 5",
        "the key 'pos' a second time",
        f"first at line {line - 2}",
        "each key may appear once",
    )
    # A merge key (<<) is no repeat: the mapping's own keys still override what it merges.
    text = rt_job(tiny_model).replace(
        "evaluation: {batch_size: 4, warmup_passes: 1, timed_passes: 8}",
        "evaluation: {<<: {batch_size: 2, warmup_passes: 1}, batch_size: 4, timed_passes: 8}",
    )
    assert "batch_size 4," in valid(capsys, tmp_path / "merged", text)


# ---------------------------------------------------------------------------------------------
# Job names: a plain folder name, and not the one collect hides.


@pytest.mark.parametrize(
    "name, says",
    [
        ('"pwn\\n"', "letters, digits, '.', '_' and '-'"),
        ("reference", "collect and report skip folders of this name"),
    ],
)
def test_a_job_name_that_is_no_plain_results_folder_is_refused(
    capsys, tmp_path, tiny_model, name, says
):
    check_refused(capsys, tmp_path, rt_job(tiny_model, name=name), "name: found", says)


# ---------------------------------------------------------------------------------------------
# Datasets.


def csv_job(tmp_path, model, contents: str, suffix: str = "csv") -> str:
    data = tmp_path / f"reviews.{suffix}"
    data.write_text(contents)
    return rt_job(model).replace(
        f"""  format: lines
  path: {RT_POLARITY}
  files: {{pos: rt-polarity.pos, neg: rt-polarity.neg}}""",
        f"  path: {data}",
    )


def test_a_stray_csv_quote_that_merges_rows_is_noted_with_its_lines(capsys, tmp_path, tiny_model):
    rows = [f"review {i},{'pos' if i % 2 else 'neg'}" for i in range(30)]
    rows[3] = '"review 3 opens a quote,pos'
    rows[7] = 'review 7 closes it",pos'
    text = csv_job(tmp_path, tiny_model, "text,label\n" + "\n".join(rows) + "\n")
    out = valid(capsys, tmp_path, text)
    assert "24 of 26 rows" in out  # 30 lines, 26 rows: what the note explains
    assert (
        "note: 1 row(s) of the dataset span several lines, 5 lines in all (first at lines 5-9 of "
        "reviews.csv)" in out
    ), out
    assert "stray quote" in out


def test_rows_after_a_quoted_line_break_are_named_by_their_own_line(capsys, tmp_path, tiny_model):
    text = csv_job(tmp_path, tiny_model, 'text,label\n"two\nlines",pos\nfine,neg\nsome text,\n')
    check_refused(capsys, tmp_path, text, "first line 5 of reviews.csv")


@pytest.mark.parametrize(
    "line, says",
    [
        (
            '{"text": null, "label": "pos"}',
            "dataset.text_column: found 'line 2 of reviews.jsonl: None'",
        ),
        (
            '{"text": ["a"], "label": "pos"}',
            "dataset.text_column: found \"line 2 of reviews.jsonl: ['a']\"",
        ),
        ('["a fine film", "pos"]', "line 2 of reviews.jsonl: ['a fine film', 'pos']"),
        ("42", "line 2 of reviews.jsonl: 42"),
        (
            '{"text": "a film", "label": {"x": 1}}',
            'dataset.label_column: found "line 2 of reviews.jsonl',
        ),
    ],
)
def test_a_jsonl_line_that_is_no_text_record_is_refused_by_its_line(
    capsys, tmp_path, tiny_model, line, says
):
    rows = [
        '{"text": "a fine film", "label": "pos"}',
        line,
        "",
        '{"text": "a dull film", "label": "neg"}',
    ]
    text = csv_job(tmp_path, tiny_model, "\n".join(rows) + "\n", suffix="jsonl")
    check_refused(capsys, tmp_path, text, says)


def test_a_whole_number_label_reads_alike_in_the_data_and_the_label_map(
    capsys, tmp_path, tiny_model
):
    # The jsonl's 2.0 was read as 2, the label_map's 2.0 key as "2.0": every row was "unmapped".
    rows = [json.dumps({"text": f"film {i}", "label": 2.0 if i % 2 else 1}) for i in range(8)]
    text = csv_job(tmp_path, tiny_model, "\n".join(rows) + "\n", suffix="jsonl").replace(
        "label_map: {pos: positive, neg: negative}", "label_map: {2.0: positive, 1: negative}"
    )
    out = valid(capsys, tmp_path, text)
    assert "label map: 1→negative, 2→positive" in out, out


def test_a_label_map_naming_one_label_twice_is_refused(capsys, tmp_path, tiny_model):
    text = rt_job(tiny_model).replace(
        "label_map: {pos: positive, neg: negative}", "label_map: {2: positive, '2.0': negative}"
    )
    check_refused(
        capsys,
        tmp_path,
        text,
        "dataset.label_map.2.0",
        "names the same dataset label as another key (2)",
    )


# ---------------------------------------------------------------------------------------------
# A model's config.json that transformers would refuse only after Ray started.


@pytest.mark.parametrize(
    "edit, says",
    [
        (lambda c: [c], "config.json: a JSON list"),
        (lambda c: {**c, "id2label": {"neg": "negative", "pos": "positive"}}, "id2label key 'neg'"),
        (lambda c: {**c, "id2label": None, "label2id": None, "num_labels": "2"}, "num_labels '2'"),
    ],
)
def test_a_config_json_of_the_wrong_shape_is_refused(capsys, tmp_path, tiny_model, edit, says):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(edit(config)))
    check_refused(capsys, tmp_path, rt_job(folder), "model: found", says)


# ---------------------------------------------------------------------------------------------
# Threads, and a hub tokenizer offline.


def test_more_threads_than_cpus_is_noted(capsys, tmp_path, tiny_model):
    from runner.measure import available_cpus

    out = valid(
        capsys,
        tmp_path,
        rt_job(tiny_model).replace("evaluation: {", "evaluation: {threads: 1000, "),
    )
    assert (
        f"note: evaluation.threads 1000 is more than this machine's {available_cpus()} CPUs" in out
    ), out
    assert "note:" not in valid(
        capsys,
        tmp_path / "fits",
        rt_job(tiny_model).replace("evaluation: {", "evaluation: {threads: 1, "),
    )


def test_a_hub_tokenizer_offline_is_refused_naming_the_tokenizer(tmp_path, tiny_model):
    # HF_HUB_OFFLINE is read when huggingface_hub is imported: a process of its own.
    job = write_job(
        tmp_path / "jobs", rt_job(tiny_model, extra="tokenizer: {hub: bert-base-uncased}")
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "PYTHONPATH": str(REPO),
    }
    done = subprocess.run(
        [sys.executable, "-m", "runner.cli", "validate", str(job)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    assert (
        "tokenizer.hub: found 'bert-base-uncased'" in done.stderr
        and "HF_HUB_OFFLINE" in done.stderr
    ), done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "results").exists()


# ---------------------------------------------------------------------------------------------
# The command line: cluster addresses, Ray's temp folder, report --out.


@pytest.mark.parametrize(
    "address, says",
    [
        ("foo", "'foo' (from RAY_ADDRESS) is not a cluster address"),
        ("head:http", "'head:http' (from RAY_ADDRESS) is not a cluster address"),
        (
            "127.0.0.1:99999",
            "127.0.0.1:99999 (from RAY_ADDRESS): 99999 is not a TCP port; a port is 1 to 65535",
        ),
        ("ray://127.0.0.1:0", "ray://127.0.0.1:0 (from RAY_ADDRESS): 0 is not a TCP port"),
    ],
)
def test_a_bad_ray_address_exits_2_saying_where_it_came_from(
    capsys, tmp_path, tiny_model, monkeypatch, address, says
):
    monkeypatch.setenv("RAY_ADDRESS", address)
    job = write_job(tmp_path / "jobs", rt_job(tiny_model, n=8))
    code, _, err = run_cli(capsys, "run", job, "--results", tmp_path / "results")
    assert code == 2 and says in err and "Traceback" not in err, err
    assert not list((tmp_path / "results").rglob("*"))


@pytest.mark.parametrize("kind", ["too long", "a file", "below a file"])
def test_a_ray_temp_dir_ray_cannot_use_is_refused(capsys, tmp_path, tiny_model, kind):
    job = write_job(tmp_path / "jobs", rt_job(tiny_model, n=8))
    (tmp_path / "file").write_text("")
    folder = {
        "too long": tmp_path / ("x" * 40),
        "a file": tmp_path / "file",
        "below a file": tmp_path / "file" / "ray",
    }
    with pytest.raises(SystemExit) as exit_:
        main(
            [
                "run",
                str(job),
                "--results",
                str(tmp_path / "results"),
                "--ray-temp-dir",
                str(folder[kind]),
            ]
        )
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--ray-temp-dir" in err, err
    assert ("107-byte limit" if kind == "too long" else "is a file, not a folder") in err, err
    assert not (tmp_path / "results").exists() and not (tmp_path / ("x" * 40)).exists()


def copied_results(folder: Path, names=("fp32-cpu", "int8-dynamic-cpu")) -> list[dict]:
    folder.mkdir(parents=True, exist_ok=True)
    loaded = []
    for name in names:
        (folder / f"{name}.json").write_bytes((REFERENCE / f"{name}.json").read_bytes())
        loaded.append(json.loads((REFERENCE / f"{name}.json").read_text()))
    return loaded


def test_report_out_naming_a_folder_is_refused(capsys, tmp_path):
    copied_results(tmp_path / "results")
    (tmp_path / "out").mkdir()
    code, _, err = run_cli(capsys, "report", tmp_path / "results", "--out", tmp_path / "out")
    assert code == 2 and f"--out: {tmp_path / 'out'} is a folder" in err and "report.html" in err, (
        err
    )
    assert not list((tmp_path / "out").iterdir()) and not list(tmp_path.glob("*_figures"))


def test_dollars_in_label_names_are_drawn_as_written(capsys, tmp_path):
    # As a formula, $\undefinedcommand$ stopped the report with a parse error.
    names = {"negative": r"$\undefinedcommand$", "positive": "costs $5"}
    for result in copied_results(tmp_path / "given"):
        preds = result["predictions"]
        for key in ("labels", "gold", "predicted"):
            preds[key] = [names[n] for n in preds[key]]
        (tmp_path / "results").mkdir(exist_ok=True)
        (tmp_path / "results" / f"{result['variant']}.json").write_text(json.dumps(result))
    code, out, err = run_cli(
        capsys, "report", tmp_path / "results", "--out", tmp_path / "report.html"
    )
    assert code == 0, err
    assert r"$\undefinedcommand$" in (tmp_path / "report.html").read_text()
    assert list((tmp_path / "report_figures").glob("*confusion*.png"))


# ---------------------------------------------------------------------------------------------
# Result folders holding files that are not results: each named with why, the rest read.


def damaged(field: str, value):
    def edit(result: dict) -> dict:
        out = copy.deepcopy(result)
        *path, last = field.split(".")
        target = out
        for key in path:
            target = target[key]
        target[last] = value
        return out

    return lambda: json.dumps(
        edit(json.loads((REFERENCE / "int8-dynamic-cpu.json").read_text()))
    ).encode()


MALFORMED = "a malformed result: "
WHOLE = (REFERENCE / "int8-dynamic-cpu.json").read_bytes
BAD_FILES = {
    "latin-1": (
        lambda: '{"job": "café"}'.encode("latin-1"),
        "not UTF-8 text (byte 0xe9 at offset 12)",
    ),
    "not json": (lambda: b"job: demo\n", "not JSON (Expecting value at line 1, column 1)"),
    "truncated": (lambda: WHOLE()[:5000], "truncated JSON"),
    "a list": (lambda: b"[1, 2]", "not a result: a JSON list"),
    "other json": (
        lambda: b'{"hello": 1}',
        "not a result: it has no schema_version, job, variant, status, device",
    ),
    "schema 99": (
        damaged("schema_version", 99),
        "schema_version 99: this quantbench reads schema_version 1",
    ),
    "metric text": (
        damaged("metrics.accuracy", "high"),
        MALFORMED + "metrics.accuracy: expected a number, found a JSON string",
    ),
    "no metrics": (
        lambda: json.dumps(
            {k: v for k, v in json.loads(WHOLE()).items() if k != "metrics"}
        ).encode(),
        MALFORMED + "metrics: missing",
    ),
    "job number": (damaged("job", 7), MALFORMED + "job: expected a string, found a JSON number"),
    "environment list": (
        damaged("environment", []),
        MALFORMED + "environment: expected an object, found a JSON list",
    ),
    "latency list": (
        damaged("metrics.latency_ms", [1]),
        MALFORMED + "metrics.latency_ms: expected an object",
    ),
    "tolerance text": (
        damaged("spec.tolerances", {"max_size_mib": "big"}),
        MALFORMED + "spec.tolerances.max_size_mib",
    ),
    "ragged probabilities": (
        damaged("predictions.probabilities", [[0.5]]),
        MALFORMED + "predictions.probabilities[0]",
    ),
    "gold numbers": (
        damaged("predictions.gold", [1, 2]),
        MALFORMED + "predictions.gold[0]: expected a string",
    ),
    "interval of one": (
        damaged("metrics.latency_ms.median_ci95", [1.0]),
        MALFORMED + "metrics.latency_ms.median_ci95",
    ),
    "layers without depth": (
        damaged("analysis.layers", [{"layer_type": "query"}]),
        MALFORMED + "analysis.layers[0].depth: missing",
    ),
}


# report draws every plot of the good result each time (seconds): the kinds of damage once each
# there.
CASES = [(case, "collect") for case in BAD_FILES] + [
    (case, "report")
    for case in ("latin-1", "truncated", "metric text", "interval of one", "layers without depth")
]


@pytest.mark.parametrize("case, command", CASES)
def test_a_file_that_is_no_result_is_skipped_and_named(capsys, tmp_path, command, case):
    contents, why = BAD_FILES[case]
    folder = tmp_path / "results" / "demo"
    copied_results(folder, names=("fp32-cpu",))
    (folder / "int8-dynamic-cpu.json").write_bytes(contents())
    args = [command, tmp_path / "results"] + (["--format", "json"] if command == "collect" else [])
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    assert f"quantbench {command}: skipped {folder / 'int8-dynamic-cpu.json'}: {why}" in err, err
    if command == "collect":
        assert list(json.loads(out)[0]["variants"]) == ["fp32-cpu"]


def test_the_schema_versions_read_include_the_one_written():
    from runner import schema, work

    assert work.SCHEMA_VERSION in schema.READABLE_SCHEMA_VERSIONS


def test_run_resume_names_the_files_it_skips(capsys, tmp_path, tiny_model):
    """Every variant's ok result is kept (so no cluster starts); a non-UTF-8 file beside them is
    named."""
    from runner import sweep, work
    from runner.plan import plan_job
    from runner.results import write_result

    job = write_job(tmp_path / "jobs", rt_job(tiny_model, n=8, variants="[fp32-cpu]"))
    plan = plan_job(job)
    task = sweep.variant_work(plan, tiny_model, {}, set())[0]
    result = work.base_result(task, "ok")
    result.ended_at = "now"
    write_result(tmp_path / "results", result)
    junk = tmp_path / "results" / "tiny-rt" / "copy.json"
    junk.write_bytes(b"\xff\xfe{}")
    code, out, err = run_cli(capsys, "run", job, "--results", tmp_path / "results", "--resume")
    assert code == 0, err
    assert f"skipped {junk}: not UTF-8 text (byte 0xff at offset 0)" in out, out
    assert "kept" in out and "nothing ran" in out


# A line of text holds what str.splitlines would split at: only \n and \r\n end a line.
INSIDE_A_LINE = ["\f", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]


def dataset_rows(job: Path) -> list[tuple[str, str, str]]:
    """(text, label, where) of every row the job's dataset reads."""
    from runner.data import read_examples
    from runner.spec import load_job

    return [(row.text, row.label, row.where) for row in read_examples(load_job(job).dataset, job)]


@pytest.mark.parametrize("inside", INSIDE_A_LINE, ids=ascii)
def test_a_lines_file_splits_only_at_newlines(tmp_path, tiny_model, inside):
    (tmp_path / "pos.txt").write_text(f"a fine{inside}film\r\nanother fine film\n", "utf-8")
    (tmp_path / "neg.txt").write_text(f"a dull film\n\nend{inside}\n", "utf-8")
    text = rt_job(tiny_model).replace(
        f"path: {RT_POLARITY}\n  files: {{pos: rt-polarity.pos, neg: rt-polarity.neg}}",
        f"path: {tmp_path}\n  files: {{pos: pos.txt, neg: neg.txt}}",
    )
    assert dataset_rows(write_job(tmp_path, text)) == [
        (f"a fine{inside}film", "pos", "line 1 of pos.txt"),
        ("another fine film", "pos", "line 2 of pos.txt"),
        ("a dull film", "neg", "line 1 of neg.txt"),
        (f"end{inside}".strip(), "neg", "line 3 of neg.txt"),  # ends stripped, as every line's
    ]


@pytest.mark.parametrize("inside", ["\x85", "\u2028", "\u2029"], ids=ascii)
def test_a_jsonl_text_holding_a_line_separator_is_one_record(tmp_path, tiny_model, inside):
    # JSON allows these raw inside a string (the others, control characters, only escaped):
    # str.splitlines cut the record in two, and the first half was "not JSON".
    rows = [
        {"text": f"a fine{inside}film", "label": "pos"},
        {"text": "a dull film", "label": "neg"},
    ]
    lines = [json.dumps(row, ensure_ascii=False) for row in rows]
    text = csv_job(tmp_path, tiny_model, "\r\n".join(lines) + "\n", suffix="jsonl")
    assert dataset_rows(write_job(tmp_path, text)) == [
        (f"a fine{inside}film", "pos", "line 1 of reviews.jsonl"),
        ("a dull film", "neg", "line 2 of reviews.jsonl"),
    ]
