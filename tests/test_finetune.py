"""The fine-tune stage: trained once as a Ray task, cached by content, deterministic, and a label
guard that catches the published mistake on real SmSA rows."""

from __future__ import annotations

import json
import math
import os
import re
import stat

import pytest
from conftest import SMSA, build_tiny_bert, corpus_lines, smsa_job, variant_json, write_job

from runner import model_cache, models
from runner.cli import main
from runner.finetune import stage
from runner.finetune import train as finetune
from runner.finetune.stage import finetune_work
from runner.job import FinetuneSpec
from runner.plan import plan_job
from runner.sweep import variant_work
from runner.work import FinetuneWork

LABELS = "{positive: LABEL_0, neutral: LABEL_1, negative: LABEL_2}"  # the published model's order


@pytest.fixture(scope="module")
def smsa_base(tmp_path_factory):
    """A tiny BERT whose vocabulary comes from the SmSA training texts (Indonesian)."""
    corpus = corpus_lines([SMSA / "train_preprocess.tsv"], per_file=4000)
    return build_tiny_bert(
        tmp_path_factory.mktemp("smsa-base"),
        ["LABEL_0", "LABEL_1", "LABEL_2"],
        hidden=64,
        corpus=corpus,
    )


EVALUATION = "evaluation: {batch_size: 16, warmup_passes: 1, timed_passes: 4}"


def finetune_job(
    model, label_map=LABELS, train_path=SMSA / "train_preprocess.tsv", finetune_extra=""
) -> str:
    return smsa_job(
        model,
        label_map,
        n=120,
        dataset_extra="max_length: 64",
        rest=f"""finetune:
  train: {{format: tsv, path: {train_path}, header: false}}
  epochs: 2
  learning_rate: 2.0e-3
  batch_size: 32
  max_samples: 1200
  seed: 0
  {finetune_extra}
{EVALUATION}
variants: [fp32-cpu, int8-dynamic-cpu]""",
    )


def run_cli(capsys, *args):
    code = main(list(map(str, args)))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_finetune_runs_as_a_ray_task_then_is_reused(
    capsys, tmp_path, smsa_base, ray_temp_dir, monkeypatch
):
    monkeypatch.setenv("QUANTBENCH_PROGRESS_QUIET_S", "0")  # every phase said, however quick
    job = write_job(tmp_path, finetune_job(smsa_base))
    code, out, err = run_cli(
        capsys, "run", job, "--results", tmp_path / "first", "--ray-temp-dir", ray_temp_dir
    )
    assert code == 0, out + err
    assert "fine-tune: training on 1200 rows" in out and "fine-tune: done in" in out
    # The training's progress, relayed from its process: counted steps, all of them at the end.
    assert re.search(r"\[fine-tune smsa-tiny\] training: done, (\d+)/\1 steps in", err), err
    first = json.loads((tmp_path / "first" / "smsa-tiny" / "fp32-cpu.json").read_text())
    assert first["model"]["train_rows"] == 1200 and first["model"]["label_names"] == [
        "LABEL_0",
        "LABEL_1",
        "LABEL_2",
    ]
    assert (
        first["model"]["train_loss"] < 1.0986
    )  # below ln(3), the loss of knowing nothing: it learned
    # Trained on the CPU worker that then ran the variant, both forked from the same warm fork
    # server.
    assert first["model"]["worker_pid"] == first["environment"]["ray"]["worker_pid"]

    code, out, err = run_cli(
        capsys, "run", job, "--results", tmp_path / "second", "--ray-temp-dir", ray_temp_dir
    )
    assert code == 0, out + err
    assert "reusing the cached fine-tuned model" in out and "training on" not in out
    second = json.loads((tmp_path / "second" / "smsa-tiny" / "fp32-cpu.json").read_text())
    assert second["metrics"]["accuracy"] == first["metrics"]["accuracy"]


def train_directly(job_path, cache, monkeypatch):
    """Plan and fine-tune without Ray, into the given cache; returns (plan, fine-tuned folder)."""
    monkeypatch.setenv("QUANTBENCH_CACHE", str(cache))
    plan = plan_job(job_path)
    base_dir, base_info = models.prepare_model(plan.spec)
    task = finetune_work(plan, base_dir, base_info)
    return plan, task, finetune.run_finetune(task)


def accuracy_of(plan, folder, info) -> tuple[float, list[str]]:
    task = variant_work(plan, folder, info, skip=set())[0]
    result = variant_json(task)
    assert result["status"] == "ok", result["error"]
    return result["metrics"]["accuracy"], result["warnings"]


def test_finetune_is_deterministic(tmp_path, smsa_base, monkeypatch):
    job = write_job(
        tmp_path, finetune_job(smsa_base).replace("max_samples: 1200", "max_samples: 300")
    )
    plan, _, one = train_directly(job, tmp_path / "cache-one", monkeypatch)
    _, _, two = train_directly(job, tmp_path / "cache-two", monkeypatch)
    assert one["key"] == two["key"] and one["train_loss"] == two["train_loss"]
    first, _ = accuracy_of(plan, one["folder"], one)
    second, _ = accuracy_of(plan, two["folder"], two)
    assert first == second  # to the last digit


def test_the_label_guard_catches_the_published_mistake(tmp_path, smsa_base, monkeypatch):
    """Real SmSA rows and a model that knows them (fine-tuned on exactly these rows, to stand in for
    a well trained model), read once with the right map and once with positive and negative
    swapped."""
    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path / "cache"))
    plan = plan_job(write_job(tmp_path, finetune_job(smsa_base)))
    texts, gold = (
        [e.text for e in plan.examples],
        [plan.targets.config.label_map[e.label] for e in plan.examples],
    )
    settings = FinetuneSpec(
        train=None, epochs=15, learning_rate=2e-3, batch_size=16, seed=0, warmup_ratio=0.0
    )
    knows = finetune.run_finetune(
        FinetuneWork(
            **{**plan.worker_inputs(), "texts": texts, "max_length": 64},
            model_dir=str(smsa_base),
            key="knows-the-rows",
            base_key="base",
            labels=gold,
            label_names=plan.targets.config.names,
            finetune=settings,
        )
    )["folder"]
    right, warnings = accuracy_of(plan, knows, {})
    assert right > 0.9 and not [w for w in warnings if "label mapping" in w]

    wrong_map = "{positive: LABEL_2, neutral: LABEL_1, negative: LABEL_0}"
    wrong = write_job(
        tmp_path,
        smsa_job(
            knows,
            wrong_map,
            f"{EVALUATION}\nvariants: [fp32-cpu]",
            name="smsa-wrong-map",
            n=120,
            dataset_extra="max_length: 64",
        ),
        "wrong.yaml",
    )
    wrong_plan = plan_job(wrong)
    assert wrong_plan.examples == plan.examples
    accuracy, warnings = accuracy_of(wrong_plan, knows, {})
    assert accuracy < right - 0.3
    guard = [w for w in warnings if "label mapping suspect" in w]
    assert guard, warnings
    assert (
        "LABEL_0→LABEL_2" in guard[0]
        and "LABEL_2→LABEL_0" in guard[0]
        and f"{right:.2%}" in guard[0]
    )


def test_the_label_guard_does_not_blame_the_map_for_a_model_that_predicts_one_class(
    tmp_path, tiny_model_3
):
    """An untrained or collapsed model predicts one class whatever it reads. Some relabelling then
    scores the majority share, which says nothing about the map: the guard says the accuracy is
    below guessing."""
    import numpy as np

    from runner.tasks.classification import worker

    plan = plan_job(
        write_job(
            tmp_path,
            smsa_job(
                tiny_model_3, "{positive: LABEL_0, neutral: LABEL_1, negative: LABEL_2}", n=200
            ),
        )
    )
    gold = np.array(
        [
            plan.targets.config.names.index(plan.targets.config.label_map[e.label])
            for e in plan.examples
        ]
    )
    rarest = int(np.bincount(gold, minlength=3).argmin())
    warnings = worker.label_guard(gold, np.full_like(gold, rarest), plan.targets.config.names)
    assert not [w for w in warnings if "label mapping" in w], warnings
    assert [w for w in warnings if "below always guessing the majority class" in w], warnings


def test_a_failed_finetune_leaves_no_cache_entry(tmp_path, smsa_base, monkeypatch):
    import transformers

    def broken_train(self, *args, **kwargs):
        raise RuntimeError("power cut halfway through training")

    monkeypatch.setattr(transformers.Trainer, "train", broken_train)
    job = write_job(tmp_path, finetune_job(smsa_base, finetune_extra="weight_decay: 0.02"))
    with pytest.raises(RuntimeError, match="power cut"):
        train_directly(job, tmp_path / "cache", monkeypatch)
    entries = sorted(p.name for p in (tmp_path / "cache" / "models").iterdir())
    assert (
        len(entries) == 1
    )  # the prepared base model only: no fine-tuned entry, no temporary folder


def test_save_folder_is_all_or_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path))

    def half_then_crash(folder):
        (folder / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        model_cache.save_folder("abc", {}, half_then_crash)
    assert list((tmp_path / "models").iterdir()) == []


def test_results_and_cache_entries_are_readable_by_other_users(tmp_path, monkeypatch):
    # Containers write as uid 1000 into the host's results/ and cache; the host user must read them.
    from runner.results import write_result
    from runner.schema import Result

    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path / "cache"))
    old = os.umask(0o022)
    try:
        written = write_result(
            tmp_path / "results", Result(job="j", variant="fp32-cpu", status="ok")
        )
        entry = model_cache.save_folder(
            "abc", {}, lambda folder: (folder / "config.json").write_text("{}")
        )
    finally:
        os.umask(old)
    assert stat.S_IMODE(written.stat().st_mode) == 0o644
    assert stat.S_IMODE(entry.stat().st_mode) == 0o755


def refused(capsys, tmp_path, text, *words):
    job = write_job(tmp_path / "jobs", text)
    code, _, err = run_cli(capsys, "run", job, "--results", tmp_path / "results")
    assert code == 2, err
    for w in words:
        assert w in err, err
    assert not (tmp_path / "results").exists()


def test_a_training_split_that_overlaps_the_evaluation_sample_is_refused(
    capsys, tmp_path, smsa_base
):
    refused(
        capsys,
        tmp_path,
        finetune_job(smsa_base, train_path=SMSA / "test_preprocess.tsv"),
        "finetune.train",
        "must not overlap the evaluation sample",
    )


def test_a_training_label_the_model_does_not_know_is_refused(capsys, tmp_path, smsa_base):
    train = tmp_path / "train.tsv"
    train.write_text("bagus sekali\tpositive\nbiasa saja\tmixed\n")
    refused(
        capsys,
        tmp_path,
        finetune_job(smsa_base, train_path=train),
        "finetune.train",
        "'mixed'",
        "does not know",
        "line 2 of train.tsv",
    )


def test_a_training_file_of_the_datasets_format_takes_its_header_and_columns(tmp_path, smsa_base):
    # The other split of the same data: the dataset's `header: false` and column numbers hold for it
    # too.
    text = finetune_job(smsa_base).replace(
        f"train: {{format: tsv, path: {SMSA / 'train_preprocess.tsv'}, header: false}}",
        f"train: {{path: {SMSA / 'train_preprocess.tsv'}}}",
    )
    plan = plan_job(write_job(tmp_path, text))
    assert len(plan.train_examples) == 1200
    assert {e.label for e in plan.train_examples} == {"positive", "neutral", "negative"}


def test_a_mistake_in_the_training_file_is_named_in_finetune_train(capsys, tmp_path, smsa_base):
    train = tmp_path / "train.jsonl"
    train.write_text('{"body": "bagus sekali", "tag": "positive"}\n')
    text = finetune_job(smsa_base).replace(
        f"train: {{format: tsv, path: {SMSA / 'train_preprocess.tsv'}, header: false}}",
        f"train: {{path: {train}, label_column: tag}}",
    )
    refused(
        capsys,
        tmp_path,
        text,
        "finetune.train.text_column: found 'text'",
        "line 1 of train.jsonl has fields: body, tag",
    )


def test_an_empty_training_split_is_refused(capsys, tmp_path, smsa_base):
    text = finetune_job(smsa_base).replace(
        f"  train: {{format: tsv, path: {SMSA / 'train_preprocess.tsv'}, header: false}}\n", ""
    )
    text = text.replace("sample: {n: 120, seed: 0}", "sample: {fraction: 1.0}")
    refused(capsys, tmp_path, text, "finetune", "training split is empty")


def test_a_fine_tune_whose_loss_stayed_at_chance_says_the_model_learned_little():
    # 0.6937 was a real MiniLM fine-tune on 300 rows: it predicted one class everywhere afterwards.
    two, three = (math.log(2), "ln 2"), (math.log(3), "ln 3")
    assert "ln 2 = 0.693" in stage.chance_note(0.6937, two)
    assert "learned little" in stage.chance_note(0.6937, two)
    assert "ln 3 = 1.099" in stage.chance_note(1.08, three)
    assert stage.chance_note(0.546075, two) == ""  # the demo's fine-tune learned
    assert stage.chance_note(None, two) == ""
    assert stage.chance_note(0.5, (0.0, "ln 1")) == ""  # one label: nothing to guess


def test_rows_left_out_of_the_training_split_for_sharing_a_text_are_counted(
    capsys, tmp_path, tiny_model_3
):
    # Each text twice: the copies of the evaluated texts must not be trained on, and the user hears
    # so.
    rows = [f"kalimat nomor {i},{['positive', 'neutral', 'negative'][i % 3]}" for i in range(10)]
    data = tmp_path / "twice.csv"
    data.write_text("text,label\n" + "\n".join(rows + rows) + "\n")
    job = write_job(
        tmp_path,
        f"""
name: twice
model: {{path: {tiny_model_3}}}
dataset: {{path: {data}, label_map: {{positive: LABEL_0, neutral: LABEL_1, negative: LABEL_2}},
          sample: {{n: 4, seed: 0}}}}
finetune: {{epochs: 1}}
variants: [fp32-cpu]
""",
    )
    plan = plan_job(job)
    assert (
        len(plan.train_examples) == 12
    )  # 16 rows outside the sample, 4 of them copies of evaluated texts
    code, out, err = run_cli(capsys, "validate", job)
    assert code == 0, err
    assert "note: 4 row(s) outside the evaluation sample are left out of the training split" in out
