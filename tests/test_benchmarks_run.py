"""A causal-LM job's `benchmarks:`: lm-eval tasks run by the variant on the model it built, after
its timed passes (the shipped rt-polarity and SmSA YAMLs over ../shared/data, and small YAMLs
written here), the per-task and per-item records the result keeps, a task that fails on one
variant, and every bad input validation refuses before any variant runs, naming the field."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import REPO, check_refused, run_cli, variant_json, write_job
from test_causal_lm import lm_job

from runner import models
from runner.job import Variant
from runner.plan import plan_job
from runner.sweep import variant_work

RT_YAML = REPO / "lm_eval_tasks" / "rt_polarity" / "rt_polarity.yaml"
SMSA_YAML = REPO / "lm_eval_tasks" / "smsa" / "smsa.yaml"
LIMIT = 8

pytestmark = pytest.mark.usefixtures("private_timing_lock")

# A three-document task of its own data; doc_to_text is filled in per test.
SMALL_TASK = """
task: {name}
dataset_path: json
dataset_kwargs:
  data_files: {{test: {data}}}
test_split: test
output_type: multiple_choice
doc_to_text: "{text}"
doc_to_choice: ["no", "yes"]
doc_to_target: label
metric_list: [{{metric: acc, aggregation: mean, higher_is_better: true}}]
"""


def small_task(folder, name="qb_small", text="{{text}}", data="../data/small.jsonl"):
    """A task YAML in folder/tasks whose data file (relative to the YAML) is folder/data."""
    (folder / "data").mkdir(parents=True, exist_ok=True)
    rows = [{"text": t, "label": i % 2} for i, t in enumerate(["good film", "bad film", "fine"])]
    (folder / "data" / "small.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return write_job(
        folder / "tasks", SMALL_TASK.format(name=name, data=data, text=text), f"{name}.yaml"
    )


def benchmarks_block(*entries: str) -> str:
    return "benchmarks:\n  batch_size: 4\n  tasks:\n" + "".join(f"    - {e}\n" for e in entries)


def run_fp32(folder, model, block: str) -> dict:
    """The fp32-cpu variant of a job with this benchmarks block, run by the worker here."""
    job = write_job(folder / "jobs", lm_job(model, block))
    plan = plan_job(job)
    model_dir, info = models.prepare_model(plan.spec)
    (work,) = variant_work(plan, model_dir, info, set(), [Variant("fp32", "cpu")])
    return variant_json(work)


@pytest.fixture(scope="module")
def shipped(tmp_path_factory, llama):
    """A run of both shipped tasks, and a task that fails on the variant's second document."""
    folder = tmp_path_factory.mktemp("shipped")
    failing = small_task(folder, "qb_fails", "{{text if label == 0 else nosuch.field}}")
    block = benchmarks_block(
        f"{{task: {RT_YAML}, limit: {LIMIT}}}",
        f"{{task: {SMSA_YAML}, limit: {LIMIT}, num_fewshot: 1}}",
        f"{{task: ../tasks/{failing.name}}}",
    )
    return run_fp32(folder, llama, block)


def test_each_task_keeps_its_scores_and_per_item_record(shipped):
    assert shipped["status"] == "ok", shipped.get("error")
    record = shipped["metrics"]["benchmarks"]
    assert record["lm_eval_version"] == "0.4.13"
    items = shipped["predictions"]["benchmarks"]
    for name, shots in (("qb_rt_polarity", 0), ("qb_smsa", 1)):
        task = record["tasks"][name]
        assert task["n_docs"]["effective"] == LIMIT and task["limit"] == LIMIT
        assert task["num_fewshot"] == shots and task["output_type"] == "multiple_choice"
        assert task["primary"] == "acc" and len(task["config_sha256"]) == 64
        per_item = items[name]
        assert per_item["doc_id"] == list(range(LIMIT))
        for metric in ("acc", "acc_norm"):
            values = per_item["items"][metric]
            assert sum(values) / LIMIT == pytest.approx(task["metrics"][metric]["value"])
        # acc is the argmax of the choices' log-likelihoods against the gold choice
        hits = [float(p == g) for p, g in zip(per_item["pred"], per_item["gold"], strict=True)]
        assert hits == per_item["items"]["acc"]
    # rt-polarity's rows alternate negative, positive; SmSA's labels are mapped by name
    assert items["qb_rt_polarity"]["gold"] == [0, 1] * (LIMIT // 2)
    # and its rows come one label at a time, in turn, so that a limit keeps all three
    assert items["qb_smsa"]["gold"] == [0, 1, 2] * (LIMIT // 3) + [0, 1, 2][: LIMIT % 3]


def test_a_task_that_fails_on_a_variant_keeps_its_other_measurements(shipped):
    failed = shipped["metrics"]["benchmarks"]["tasks"]["qb_fails"]
    assert "nosuch" in failed["error"] and failed["source"] == "../tasks/qb_fails.yaml"
    assert any("benchmark ../tasks/qb_fails.yaml failed" in w for w in shipped["warnings"])
    assert "qb_rt_polarity" in shipped["metrics"]["benchmarks"]["tasks"]
    assert shipped["metrics"]["perplexity"] > 1 and shipped["metrics"]["kl_vs_fp32"] is not None
    # after the timed passes, the KL and the generation: its own memory phase, last
    assert list(shipped["metrics"]["memory_phases"])[-1] == "benchmarks"


def test_validate_names_each_task_and_resolves_data_beside_the_yaml(
    capsys, tmp_path, llama, monkeypatch
):
    small_task(tmp_path)
    job = write_job(
        tmp_path / "jobs",
        lm_job(llama, benchmarks_block("{task: ../tasks/qb_small.yaml, limit: 2}")),
    )
    monkeypatch.chdir(tmp_path / "data")  # not where the YAML's ../data/small.jsonl points from
    code, out, err = run_cli(capsys, "validate", job)
    assert code == 0, err
    assert "benchmark qb_small (../tasks/qb_small.yaml): 3 docs, limit 2, 0-shot" in out


def test_a_plain_job_does_not_import_lm_eval(tmp_path, llama):
    job = write_job(tmp_path, lm_job(llama))
    check = (
        "import sys; from runner.plan import plan_job; "
        f"plan_job({str(job)!r}); assert 'lm_eval' not in sys.modules, 'imported'"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# ---------------------------------------------------------------------------------------------
# Bad input: exit 2 at validate and run, before any variant, naming the file and the field.


@pytest.mark.parametrize(
    ("entry", "field", "words"),
    [
        ("{task: X, limit: 0}", "benchmarks.tasks[0].limit", "1 or more"),
        ("{task: X, limit: -3}", "benchmarks.tasks[0].limit", "1 or more"),
        ("{task: X, num_fewshot: 3}", "benchmarks.tasks[0].num_fewshot", "3 few-shot examples"),
        ("{task: X, shots: 3}", "benchmarks.tasks[0].shots", "unknown field"),
    ],
)
def test_limits_and_shots_out_of_range_are_refused(capsys, tmp_path, llama, entry, field, words):
    small_task(tmp_path)
    block = benchmarks_block(entry.replace("X", "../tasks/qb_small.yaml"))
    check_refused(capsys, tmp_path, lm_job(llama, block), field, words)


def test_a_missing_task_yaml_or_data_file_is_refused_naming_it(capsys, tmp_path, llama):
    block = benchmarks_block("{task: ../tasks/nowhere.yaml}")
    check_refused(
        capsys, tmp_path, lm_job(llama, block), "benchmarks.tasks[0].task", "nowhere.yaml"
    )
    small_task(tmp_path, data="../data/gone.jsonl")
    block = benchmarks_block("{task: ../tasks/qb_small.yaml}")
    check_refused(capsys, tmp_path, lm_job(llama, block), "qb_small.yaml", "gone.jsonl")


@pytest.mark.parametrize(
    ("yaml_text", "words"),
    [
        ("task: qb_broken\ndoc_to_text: [unclosed\n", "line 2, column 14"),
        (SMALL_TASK.replace("multiple_choice", "multiple_choise"), "invalid output_type"),
    ],
)
def test_a_task_yaml_lm_eval_cannot_load_is_refused_naming_it(
    capsys, tmp_path, llama, yaml_text, words
):
    small_task(tmp_path)
    text = yaml_text.format(name="qb_bad", data="../data/small.jsonl", text="{{text}}")
    write_job(tmp_path / "tasks", text, "bad.yaml")
    block = benchmarks_block("{task: ../tasks/bad.yaml}")
    err = check_refused(capsys, tmp_path, lm_job(llama, block), "bad.yaml", words)
    assert "benchmarks.tasks[0].task" in err


@pytest.mark.parametrize(
    ("name", "words"),
    [("hellasawg", "no lm-eval task of that name"), ("hellaswag", "hub, which is unreachable")],
)
def test_a_hub_task_while_offline_is_refused_in_seconds(
    capsys, tmp_path, llama, monkeypatch, name, words
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    clock = time.monotonic()
    block = benchmarks_block(f"{{task: {name}, limit: 5}}")
    err = check_refused(capsys, tmp_path, lm_job(llama, block), "benchmarks.tasks[0].task", words)
    assert name in err
    assert time.monotonic() - clock < 30  # lm-eval's index once, no retries of the hub


@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory):
    """A tiny Llama whose output layer is tied to its embedding, as SmolLM2's and Gemma's are."""
    from lm_models import build_tiny_llama

    folder = build_tiny_llama(tmp_path_factory.mktemp("tied") / "model")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    return folder


def test_benchmarks_score_the_variant_as_built_without_re_tying_it(tmp_path, tied_llama):
    """lm-eval's HFLM re-ties the output layer to the embedding: on torch.ao's dynamic INT8 that
    failed the whole variant (its Linear's weight is a method), and on a variant whose quantized
    output layer is untied it would score the embedding's FP32 weights instead."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from runner.tasks.causal_lm.benchmarks import BenchmarkSettings, BenchmarkTask, run_benchmarks

    yaml_path = small_task(tmp_path)
    settings = BenchmarkSettings((BenchmarkTask(str(yaml_path), str(yaml_path)),))
    tokenizer = AutoTokenizer.from_pretrained(tied_llama)
    dynamic = torch.ao.quantization.quantize_dynamic(
        AutoModelForCausalLM.from_pretrained(tied_llama).eval(), {torch.nn.Linear}
    )
    found, items, warnings = run_benchmarks(settings, dynamic, tokenizer, 4)
    assert warnings == [] and "error" not in found["tasks"]["qb_small"]
    assert len(items["qb_small"]["doc_id"]) == 3

    untied = AutoModelForCausalLM.from_pretrained(tied_llama).eval()
    own = torch.nn.Parameter(untied.model.embed_tokens.weight.detach() * 2)
    untied.lm_head.weight = own  # what quantizing the output layer alone does to the tie
    run_benchmarks(settings, untied, tokenizer, 4)
    assert untied.lm_head.weight is own and "tie_weights" not in untied.__dict__


def test_a_task_with_functions_hashes_the_same_in_every_process(tmp_path):
    """SmSA's process_docs is a `!function`, which lm-eval's config writes with its address in
    memory: the config hash must not change from one variant's process to the next (it did, and
    collect refused to pair SmSA across variants), but must change with the function's file."""
    script = (
        "import sys\nfrom pathlib import Path\n"
        "from runner.tasks.causal_lm.benchmarks import BenchmarkTask, config_sha256, load_task\n"
        "p = sys.argv[1]\n"
        "task = load_task(BenchmarkTask(p, p), Path(p), 'benchmarks.tasks[0]')\n"
        "print(config_sha256(task.dump_config(), p))\n"
    )

    def hashed(yaml_path) -> str:
        done = subprocess.run(
            [sys.executable, "-c", script, str(yaml_path)], capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout.strip().splitlines()[-1]

    first, second = hashed(SMSA_YAML), hashed(SMSA_YAML)
    assert first == second and len(first) == 64
    copy = tmp_path / "smsa"
    copy.mkdir()
    for name in ("smsa.yaml", "smsa_data.py"):
        text = (SMSA_YAML.parent / name).read_text()
        (copy / name).write_text(text.replace("../../../shared", str(REPO.parent / "shared")))
    assert hashed(copy / "smsa.yaml") == first  # where the checkout lies does not count
    with (copy / "smsa_data.py").open("a") as code:
        code.write("\n# the function's file changed\n")
    assert hashed(copy / "smsa.yaml") != first
