"""A job's `sensitivity:` block through `quantbench run`: the study's file, its ranking and recipe,
the mixed variant measured beside the others, --resume, a failed study, and the block's mistakes."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    HARD,
    REPO,
    build_hard_bert,
    check_refused,
    labelled,
    rt_job,
    run_cli,
    write_job,
)

from runner import results
from runner.study import cost
from runner.study import stage as study

STUDY = "sensitivity: {precision: int8-dynamic, device: cpu, groups: layer}"


def _job(model, sensitivity: str = STUDY, extra: str = "") -> str:
    return rt_job(model, extra=f"{sensitivity}\n{extra}", n=160)


@pytest.fixture(scope="module")
def hard_bert(tmp_path_factory):
    return build_hard_bert(tmp_path_factory.mktemp("hard-bert"))


@pytest.fixture(scope="module")
def studied(hard_bert, tmp_path_factory):
    """(results folder, the run's stdout, its exit code): the job with its study, run once."""
    from runner.cli import main

    folder = tmp_path_factory.mktemp("study-run")
    job = write_job(folder / "jobs", _job(hard_bert))
    ray_temp = tempfile.mkdtemp(prefix="qbray-", dir="/tmp")  # Ray's socket paths are short
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            code = main(
                ["run", str(job), "--results", str(folder / "results"), "--ray-temp-dir", ray_temp]
            )
    finally:
        shutil.rmtree(ray_temp, ignore_errors=True)
    return folder / "results", out.getvalue(), code


def _agreement(a: dict, b: dict) -> float:
    return float(np.mean(np.array(a["predictions"]["predicted"]) == b["predictions"]["predicted"]))


def test_the_study_ranks_the_outlier_layer_first_and_keeps_it(studied):
    folder, out, code = studied
    assert code == 0, out
    found = results.load_study(results.study_path(folder, "tiny-rt", "int8-dynamic-cpu"))
    assert found["status"] == "ok" and found["samples"] == 160 and found["layers"] == 14
    ranking = found["ranking"]
    assert [e["rank"] for e in ranking] == list(range(1, 15))
    assert ranking[0]["group"] == HARD and ranking[0]["layers"] == [HARD]
    only = [e["only"]["agreement"] for e in ranking]
    assert only == sorted(only)  # most harmful first
    assert ranking[0]["only"]["agreement"] < 0.9 <= ranking[1]["only"]["agreement"]
    # The outlier layer's own SQNR is the worst of the model: the weights say it too.
    worst = min(ranking, key=lambda e: e["output_sqnr_db"])
    assert worst["group"] == HARD
    recipe = found["recipe"]
    assert recipe["groups"][0] == HARD and HARD in recipe["kept"] and recipe["met"]
    assert recipe["tolerance"] == {"min_agreement": 0.99, "max_accuracy_drop": None}
    assert recipe["result"]["agreement"] >= 0.99 > found["full"]["agreement"]


def test_the_mixed_variant_is_measured_and_agrees_with_fp32_more(studied):
    folder, out, _ = studied
    job = folder / "tiny-rt"
    fp32, full, mixed = (
        json.loads((job / f"{v}.json").read_text())
        for v in ("fp32-cpu", "int8-dynamic-cpu", "int8-dynamic-mixed-cpu")
    )
    found = results.load_study(results.study_path(folder, "tiny-rt", "int8-dynamic-cpu"))
    assert mixed["status"] == "ok" and mixed["precision"] == "int8-dynamic"
    assert mixed["settings"]["kept_in_fp32"] == found["recipe"]["kept"]
    assert mixed["metrics"]["latency_ms"]["median"] > 0
    assert fp32["metrics"]["model_size_mib"] > mixed["metrics"]["model_size_mib"]
    assert mixed["metrics"]["model_size_mib"] > full["metrics"]["model_size_mib"]
    assert _agreement(mixed, fp32) > _agreement(full, fp32)
    # The variant measures what the study predicted, on the same sample.
    assert _agreement(mixed, fp32) == pytest.approx(
        found["recipe"]["result"]["agreement"], abs=0.02
    )
    assert "int8-dynamic-mixed-cpu" in out.split("tiny-rt (baseline")[1]  # in the table


def test_the_run_prints_the_cost_before_the_groups_and_the_cost_after(studied):
    folder, out, _ = studied
    predicted = out.index("14 groups x 2 = 28 measurements in 1 Ray task(s)")
    assert predicted < out.index(f"1. {HARD}") < out.index("[1/1] tiny-rt int8-dynamic-mixed-cpu")
    found = results.load_study(results.study_path(folder, "tiny-rt", "int8-dynamic-cpu"))
    spent = found["cost"]
    assert spent["measurements"] == 28 + len(found["recipe"]["tried"])
    assert spent["tasks"] == 2 and len(found["steps"]) == 3  # probe, groups, recipe
    assert spent["bound_s"] == pytest.approx(
        cost.COST_BOUND * spent["measurements"] * spent["pass_s"] + 2 * spent["load_s"], abs=1e-2
    )


def test_resume_keeps_the_study_and_its_mixed_variant(studied, capsys, ray_temp_dir):
    folder, _, _ = studied
    job = folder.parent / "jobs" / "job.yaml"
    before = results.study_path(folder, "tiny-rt", "int8-dynamic-cpu").read_text()
    code, out, err = run_cli(
        capsys, "run", job, "--results", folder, "--resume", "--ray-temp-dir", ray_temp_dir
    )
    assert code == 0, err
    assert "kept the sensitivity study" in out and "nothing left to run" in out
    assert results.study_path(folder, "tiny-rt", "int8-dynamic-cpu").read_text() == before


def test_validate_says_what_the_study_will_do(hard_bert, capsys, tmp_path):
    job = write_job(tmp_path, _job(hard_bert, extra="tolerances: {max_accuracy_drop: 0.02}"))
    code, out, err = run_cli(capsys, "validate", job)
    assert code == 0, err
    assert "sensitivity: int8-dynamic-cpu taken apart by layer" in out
    assert "until accuracy drop from FP32 ≤ 0.02" in out and "int8-dynamic-mixed-cpu" in out


def test_a_failed_study_is_written_and_fails_the_run_but_not_the_variants(
    hard_bert, capsys, tmp_path, ray_temp_dir, monkeypatch
):
    from runner import dispatch

    def broken(*args, **kwargs):
        raise RuntimeError("no worker could load the model")

    monkeypatch.setattr(dispatch, "run_study_steps", broken)
    job = write_job(tmp_path, _job(hard_bert, "sensitivity: {precision: int8-dynamic}"))
    code, out, err = run_cli(
        capsys, "run", job, "--results", tmp_path / "r", "--ray-temp-dir", ray_temp_dir
    )
    assert code == 1, out + err
    found = results.load_study(results.study_path(tmp_path / "r", "tiny-rt", "int8-dynamic-cpu"))
    assert found["status"] == "failed" and "no worker could load the model" in found["error"]
    assert "sensitivity: tiny-rt: failed: RuntimeError: no worker could load" in out
    assert not (tmp_path / "r" / "tiny-rt" / "int8-dynamic-mixed-cpu.json").exists()
    for variant in ("fp32-cpu", "int8-dynamic-cpu"):
        assert (
            json.loads((tmp_path / "r" / "tiny-rt" / f"{variant}.json").read_text())["status"]
            == "ok"
        )


@pytest.mark.parametrize(
    "block, field, words",
    [
        ("{precision: int9}", "sensitivity.precision", "unknown precision; allowed: fp32"),
        ("{precision: fp16}", "sensitivity.precision", "a cast changes every layer at once"),
        ("{precision: int8-dynamic, device: tpu}", "sensitivity.device", "unknown device"),
        (
            "{precision: torchao-float8-dynamic, device: cpu}",
            "sensitivity.precision",
            "runs on cuda only",
        ),
        ("{precision: int8-dynamic, groups: head}", "sensitivity.groups", "layer, type, depth"),
        ("{precision: int8-dynamic, group: layer}", "sensitivity.group", "did you mean 'groups'"),
        ("{device: cpu}", "sensitivity.precision", "this field is required"),
        ("int8-dynamic", "sensitivity", "expected a mapping"),
    ],
)
def test_sensitivity_mistakes_exit_2_naming_the_field(
    capsys, tmp_path, block, field, words, tiny_model
):
    check_refused(capsys, tmp_path, _job(tiny_model, f"sensitivity: {block}"), field, words)


def _step(model_dir, precision: str, **fields):
    from conftest import hard_bert_sentences

    from runner.job import EvaluationSpec, SensitivitySpec
    from runner.precisions import default_settings, family_of
    from runner.work import StudyWork

    texts, gold = hard_bert_sentences()
    labels = ["negative", "positive"]
    return StudyWork(
        kind="probe",
        job="families",
        study=SensitivitySpec(precision, "cpu", "type"),
        family=family_of(precision),
        model_dir=str(model_dir),
        texts=texts[::4],
        **labelled([labels[g] for g in gold[::4]], labels),
        evaluation=EvaluationSpec(batch_size=8, threads=1),
        settings=default_settings(torchao_int4_group_size=32),
        max_length=32,
        **fields,
    )


@pytest.mark.parametrize("precision", ["bnb-int8", "torchao-int8-dynamic"])
def test_every_family_takes_part_in_a_study_its_own_way(hard_bert, precision):
    from dataclasses import replace

    from runner.study.steps import run_step

    probe = run_step(_step(hard_bert, precision))
    groups = probe["groups"]
    # Every linear layer of the tiny BERT is quantized by both (transformers' default skips for
    # bitsandbytes name nothing here), grouped by type.
    assert len(probe["layers"]) == 14 and "classifier" in groups
    assert sum(map(len, groups.values())) == len(probe["layers"])
    assert len(probe["reference"]) == 32 and probe["full"]["kept"] == 0
    shared = replace(
        _step(hard_bert, precision), reference=probe["reference"], layers=tuple(probe["layers"])
    )
    measured = run_step(replace(shared, kind="groups", groups={"output": groups["output"]}))
    (output,) = measured["groups"]
    # Keeping every "output" layer in FP32 (all_but) quantizes the rest; "only" quantizes them.
    assert output["all_but"]["kept"] == 2 and output["only"]["kept"] == len(probe["layers"]) - 2


def test_a_study_step_holds_its_fp32_model_without_mapping_the_checkpoint(hard_bert):
    # A mapped file's pages count in RSS while any tensor views them: the FP32 model read, not
    # mapped, holds the weights once.
    import gc

    from runner.study.steps import load

    loaded = load(_step(hard_bert, "int8-dynamic"))
    gc.collect()
    assert str(hard_bert / "model.safetensors") not in Path("/proc/self/maps").read_text()
    assert loaded.fp32.training is False and loaded.full is not loaded.fp32


def _stage(tmp_path, model, say: list):
    from runner.plan import plan_job

    plan = plan_job(write_job(tmp_path / "jobs", _job(model)))
    return study.StudyRun(plan, model, None, tmp_path / "results", say.append)


def test_a_precision_that_quantizes_no_layer_ends_the_study_saying_so(
    tmp_path, tiny_model, monkeypatch
):
    from runner import dispatch

    probe = {"layers": [], "linear_layers": 12, "groups": {}, "full": {}, "reference": []}
    monkeypatch.setattr(dispatch, "run_study_steps", lambda *args, **kwargs: [probe])
    said = []
    found, mixed = study.run(_stage(tmp_path, tiny_model, said))
    assert found["status"] == "failed" and mixed is None
    assert "quantizes none of the model's 12 nn.Linear layers" in found["error"], found["error"]
    assert "range()" not in found["error"] and "quantizes none" in said[-1]


def test_a_study_on_a_device_no_node_has_is_skipped_like_its_variant(
    tmp_path, tiny_model, monkeypatch
):
    from runner import dispatch

    def no_gpu(*args, **kwargs):
        raise dispatch.NoCapableNode("cannot run the sensitivity study: no node has a cuda GPU")

    monkeypatch.setattr(dispatch, "run_study_steps", no_gpu)
    said = []
    found, mixed = study.run(_stage(tmp_path, tiny_model, said))
    assert found["status"] == "skipped" and mixed is None
    assert "no node has a cuda GPU" in found["error"] and "skipped" in said[-1]


# ---------------------------------------------------------------------------------------------
# A study file read back (report, run --resume) through the shape check results go through.

REFERENCE = REPO / "results/reference/cpu-2core-amd-epyc/demo-sensitivity"
JUNK = [
    ("ranking", [1, 2], "ranking[0]: expected an object, found a JSON number"),
    ("sensitivity", None, "sensitivity: expected an object, found a JSON null"),
    ("status", ..., "status: missing"),
    ("recipe", None, "recipe: expected an object, found a JSON null"),
]


def _junk_study(folder, key, value) -> Path:
    """The reference study, copied into folder with one key replaced (... : removed)."""
    study_file = next(REFERENCE.glob("sensitivity-*.json"))
    found = json.loads(study_file.read_text())
    if value is ...:
        del found[key]
    else:
        found[key] = value
    path = folder / study_file.name
    path.write_text(json.dumps(found))
    return path


@pytest.mark.parametrize("key, value, said", JUNK)
def test_report_names_a_malformed_study_file_and_what_is_wrong(key, value, said, capsys, tmp_path):
    folder = tmp_path / "demo-sensitivity"
    shutil.copytree(REFERENCE, folder)
    path = _junk_study(folder, key, value)
    code, out, err = run_cli(capsys, "report", folder, "--out", tmp_path / "page.html")
    assert "Traceback" not in out + err
    assert f"{path}: a malformed sensitivity study: {said}" in out + err, out + err
    assert code == 0 and (tmp_path / "page.html").is_file()


def test_resume_runs_a_study_with_a_junk_ranking_again_saying_so(tmp_path, tiny_model):
    said = []
    plan = _stage(tmp_path, tiny_model, said).plan
    folder = results.study_path(tmp_path / "results", plan.spec.name, "x").parent
    folder.mkdir(parents=True)
    path = _junk_study(folder, "ranking", [1, 2])
    study_json = json.loads(path.read_text())
    study_json.update(spec_hash=plan.spec_hash, sensitivity=study.asdict(plan.spec.sensitivity))
    path.write_text(json.dumps(study_json))
    assert study.kept_study(tmp_path / "results", plan, said.append) is None
    assert said == [
        f"[resume] tiny-rt: runs the sensitivity study again: {path}: a malformed sensitivity "
        "study: ranking[0]: expected an object, found a JSON number"
    ]


def _in_process(ran: list, stop_after: int | None = None):
    """run_study_steps without Ray: each step in this process; KeyboardInterrupt (a kill) once
    stop_after group steps have returned."""
    from runner.study.steps import run_step

    def run_steps(steps, cluster, model_dir, timeout_s=None, on_done=None):
        outcomes = []
        for step in steps:
            if stop_after is not None and sum(k == "groups" for k, _ in ran) == stop_after:
                raise KeyboardInterrupt
            ran.append((step.kind, tuple(step.groups or ())))
            outcomes.append(run_step(step))
            if on_done is not None:
                on_done(outcomes[-1])
        return outcomes

    return run_steps


def test_a_study_killed_halfway_resumes_from_the_groups_it_finished(
    tmp_path, hard_bert, monkeypatch
):
    from runner import dispatch
    from runner.study import partial

    monkeypatch.setattr(study, "SHARE_S", 1e-6)  # one group per step: 14 steps
    monkeypatch.setattr(study, "capable_nodes", lambda nodes, device: 1)
    monkeypatch.setattr(study, "alive_nodes", lambda: [])
    killed = []
    monkeypatch.setattr(dispatch, "run_study_steps", _in_process(killed, stop_after=5))
    said = []
    with pytest.raises(KeyboardInterrupt):
        study.run(_stage(tmp_path, hard_bert, said))
    kept = partial.partial_path(tmp_path / "results", "tiny-rt", "int8-dynamic-cpu")
    assert kept.exists() and [kind for kind, _ in killed].count("groups") == 5

    resumed, said = [], []
    monkeypatch.setattr(dispatch, "run_study_steps", _in_process(resumed))
    stage = _stage(tmp_path, hard_bert, said)
    found, mixed = study.run(replace(stage, resume=True))
    assert "the sensitivity study goes on from" in said[0] and "5 of 14 groups measured" in said[0]
    done = {group for kind, groups in killed if kind == "groups" for group in groups}
    again = [group for kind, groups in resumed if kind == "groups" for group in groups]
    assert resumed[0][0] == "groups" and not done & set(again) and len(again) == 9
    assert found["status"] == "ok" and found["ranking"][0]["group"] == HARD
    assert HARD in found["recipe"]["kept"] and not kept.exists()  # gone once the study is written

    # The same study uninterrupted ranks the same groups the same way.
    monkeypatch.setattr(dispatch, "run_study_steps", _in_process([]))
    fresh, _ = study.run(_stage(tmp_path / "fresh", hard_bert, []))
    assert [e["group"] for e in fresh["ranking"]] == [e["group"] for e in found["ranking"]]


def test_a_kept_study_of_another_spec_is_not_resumed(tmp_path, hard_bert, monkeypatch):
    from runner import dispatch
    from runner.study import partial

    monkeypatch.setattr(study, "capable_nodes", lambda nodes, device: 1)
    monkeypatch.setattr(study, "alive_nodes", lambda: [])
    stage = _stage(tmp_path, hard_bert, said := [])
    path = partial.partial_path(tmp_path / "results", "tiny-rt", "int8-dynamic-cpu")
    partial.start(path, {"spec_hash": "another", "sensitivity": {}, "schema_version": 1}, {})
    ran = []
    monkeypatch.setattr(dispatch, "run_study_steps", _in_process(ran))
    found, _ = study.run(replace(stage, resume=True))
    assert "not used: a study of another spec hash" in said[0], said
    assert ran[0][0] == "probe" and found["status"] == "ok"
