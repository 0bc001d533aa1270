"""The causal-LM task through the job file: a tiny random Llama (and GPT-2) planned from a job,
run by the worker under every precision that runs on the CPU, its perplexity against a
token-by-token hand computation, its KL from FP32, its generation and KV-cache phase; and the job
mistakes validation refuses, naming the field."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import RT_POLARITY, check_refused, run_cli, variant_json, write_job
from lm_models import (
    build_bpe_tokenizer,
    build_tiny_gpt2,
    load,
    nll_token_by_token,
)

from runner import models
from runner.job import Variant
from runner.plan import plan_job
from runner.precisions import PRECISIONS, family_of
from runner.sweep import variant_work

CONTEXT, STRIDE = 16, 8
PROMPT, NEW_TOKENS, BATCH_SIZES = 8, 5, (1, 3)
DOCUMENTS = 6


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return build_tiny_gpt2(tmp_path_factory.mktemp("gpt2"))


pytestmark = pytest.mark.usefixtures("private_timing_lock")


def lm_job(model, extra: str = "", variants: str = "[fp32-cpu]", dataset: str = "") -> str:
    dataset = (
        dataset
        or f"""
  format: lines
  path: {RT_POLARITY}
  files: {{pos: rt-polarity.pos, neg: rt-polarity.neg}}
  sample: {{n: {DOCUMENTS}, seed: 3}}"""
    )
    return f"""
name: tiny-lm
task: causal-lm
model: {{path: {model}}}
dataset:{dataset}
perplexity: {{context: {CONTEXT}, stride: {STRIDE}, kl_top_k: 8}}
generation:
  prompt_length: {PROMPT}
  new_tokens: {NEW_TOKENS}
  batch_sizes: {list(BATCH_SIZES)}
  warmup_runs: 1
  timed_runs: 2
evaluation: {{batch_size: 4, warmup_passes: 1, timed_passes: 2}}
settings: {{torchao_int4_group_size: 32}}  # the tiny model's layers are 32 wide
variants: {variants}
{extra}
"""


def run_one(tmp_path, model, precision: str, device: str = "cpu") -> tuple[dict, object]:
    """(the variant's result as JSON, its plan): planned from a job file, run by the worker in
    this process, as a Ray worker would."""
    calibration = "calibration: {samples: 8}" if PRECISIONS[precision].calibrated else ""
    job = write_job(tmp_path, lm_job(model, calibration, variants=f"[{precision}-{device}]"))
    plan = plan_job(job)
    model_dir, info = models.prepare_model(plan.spec)
    (task,) = variant_work(plan, model_dir, info, set(), [Variant(precision, device)])
    return variant_json(task), plan


# ---------------------------------------------------------------------------------------------
# What a variant measures.


def test_perplexity_is_the_token_by_token_hand_computation(tmp_path, llama):
    result, plan = run_one(tmp_path, llama, "fp32")
    assert result["status"] == "ok", result.get("error")
    model, tokenizer = load(llama)
    nlls, windows = [], 0
    for example in plan.examples:
        ids = tokenizer(example.text, add_special_tokens=False)["input_ids"]
        nlls += nll_token_by_token(model, ids, tokenizer.bos_token_id, CONTEXT, STRIDE)
        windows += 1 + max(0, -(-(len(ids) - CONTEXT) // STRIDE))
    metrics = result["metrics"]
    assert metrics["scored_tokens"] == len(nlls)
    assert metrics["perplexity"] == pytest.approx(math.exp(sum(nlls) / len(nlls)), rel=1e-5)
    n_bytes = sum(len(e.text.encode()) for e in plan.examples)
    assert metrics["bits_per_byte"] == pytest.approx(sum(nlls) / math.log(2) / n_bytes, rel=1e-5)
    per_window = result["predictions"]["windows"]
    assert len(per_window["nll"]) == windows and sum(per_window["tokens"]) == len(nlls)
    assert [len(g) for g in result["predictions"]["greedy"]] == per_window["tokens"]


def test_generation_and_its_kv_cache_phase(tmp_path, llama):
    result, _ = run_one(tmp_path, llama, "fp32")
    generation = result["metrics"]["generation"]
    assert generation["batch_sizes"] == list(BATCH_SIZES)
    for size in BATCH_SIZES:
        timed = generation["by_batch_size"][str(size)]
        assert timed["new_tokens"] == NEW_TOKENS and timed["decode_tokens_per_s"] > 0
        assert timed["kv_cache_tokens"] == PROMPT + NEW_TOKENS - 1
    first = generation["by_batch_size"]["1"]
    assert result["metrics"]["time_to_first_token_ms"] == first["time_to_first_token_ms"]
    assert result["metrics"]["decode_tokens_per_s"] == first["decode_tokens_per_s"]
    # 2 layers x key and value x batch 3 x 2 KV heads x tokens x head size 16 x 4 bytes
    hand = 2 * 2 * 3 * 2 * (PROMPT + NEW_TOKENS - 1) * 16 * 4
    phase = result["metrics"]["memory_phases"]["kv_cache"]
    assert phase["kv_cache_batch_size"] == 3 and phase["kv_cache_mib"] == round(hand / 2**20, 4)
    assert list(result["metrics"]["memory_phases"])[-2:] == ["kl", "kv_cache"]


def test_fp32_is_its_own_kl_reference_and_int8_is_not(tmp_path, llama):
    fp32, _ = run_one(tmp_path / "fp32", llama, "fp32")
    int8, _ = run_one(tmp_path / "int8", llama, "int8-dynamic")
    assert fp32["metrics"]["kl_vs_fp32"] == pytest.approx(0.0, abs=1e-9)
    assert int8["metrics"]["kl_vs_fp32"] > 1e-4
    kl = int8["predictions"]["windows"]["kl"]
    tokens = sum(int8["predictions"]["windows"]["tokens"])
    assert sum(kl) / tokens == pytest.approx(int8["metrics"]["kl_vs_fp32"], rel=1e-5)
    assert int8["metrics"]["perplexity"] != fp32["metrics"]["perplexity"]


CPU_PRECISIONS = [name for name, p in PRECISIONS.items() if "cpu" in p.devices]


@pytest.mark.parametrize("precision", CPU_PRECISIONS)
def test_every_cpu_precision_runs_a_causal_lm(tmp_path, llama, precision):
    result, _ = run_one(tmp_path, llama, precision)
    assert result["status"] == "ok", result.get("error")
    assert math.isfinite(result["metrics"]["perplexity"])
    assert result["metrics"]["kl_vs_fp32"] >= 0
    # Its decoder layers are named by type in the weight analysis.
    types = {layer["layer_type"] for layer in result["analysis"]["layers"]}
    assert {"query", "mlp_gate", "mlp_up", "mlp_down", "lm_head"} <= types


CUDA_PRECISIONS = [name for name, p in PRECISIONS.items() if "cuda" in p.devices]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU and CUDA torch")
@pytest.mark.parametrize("precision", CUDA_PRECISIONS)
def test_every_cuda_precision_runs_a_causal_lm(tmp_path, llama, precision):
    result, _ = run_one(tmp_path, llama, precision, "cuda")
    assert result["status"] == "ok", result.get("error")
    assert math.isfinite(result["metrics"]["perplexity"])
    assert result["metrics"]["kl_vs_fp32"] >= 0 and result["metrics"]["decode_tokens_per_s"] > 0
    phase = result["metrics"]["memory_phases"]["kv_cache"]
    assert phase["peak_cuda_allocated_mib"] > 0 and phase["cuda_peak_beyond_model_mib"] >= 0


def test_a_gpt2_runs_too(tmp_path, gpt2):
    result, _ = run_one(tmp_path, gpt2, "bnb-int8")
    assert result["status"] == "ok", result.get("error")
    types = {layer["layer_type"] for layer in result["analysis"]["layers"]}
    assert {"query_key_value", "attention_output", "mlp_up", "mlp_down"} <= types


def test_a_text_file_is_one_document_per_line(tmp_path, llama):
    text = tmp_path / "docs.txt"
    text.write_text("the film is a joy .\n\n  a dull , lifeless mess .  \nwarm and wise .\n")
    dataset = f"\n  format: text\n  path: {text}"
    plan = plan_job(write_job(tmp_path, lm_job(llama, dataset=dataset)))
    assert [e.text for e in plan.examples] == [
        "the film is a joy .",
        "a dull , lifeless mess .",
        "warm and wise .",
    ]


def test_a_jsonl_without_labels_reads_its_text_column(tmp_path, llama):
    rows = tmp_path / "docs.jsonl"
    rows.write_text("".join(json.dumps({"body": t}) + "\n" for t in ["one doc .", "two ."]))
    dataset = f"\n  format: jsonl\n  path: {rows}\n  text_column: body"
    plan = plan_job(write_job(tmp_path, lm_job(llama, dataset=dataset)))
    assert [e.text for e in plan.examples] == ["one doc .", "two ."]


def test_a_run_writes_the_causal_lm_results(capsys, tmp_path, llama, ray_temp_dir):
    job = write_job(tmp_path, lm_job(llama, variants="[fp32-cpu, int8-dynamic-cpu]"))
    results = tmp_path / "results"
    code, out, err = run_cli(
        capsys, "run", job, "--results", results, "--ray-temp-dir", ray_temp_dir
    )
    assert code == 0, err
    assert "fp32-cpu               ok       perplexity " in out and "decode " in out
    assert "greedy agreement with baseline" in out and "KL vs FP32 (nats/token)" in out
    for variant in ("fp32-cpu", "int8-dynamic-cpu"):
        written = json.loads((results / "tiny-lm" / f"{variant}.json").read_text())
        assert written["status"] == "ok" and written["spec"]["task"] == "causal-lm"
        assert written["settings"]["perplexity"] == {
            "context": 16,
            "stride": 8,
            "kl_top_k": 8,
            "prefix": "<s>",  # the tokenizer's BOS, resolved
            "convention": "rolling",
        }


# ---------------------------------------------------------------------------------------------
# Mistakes, refused at validation with the field named.


def test_a_causal_lm_job_naming_a_classifier_is_refused(capsys, tmp_path, tiny_model):
    check_refused(capsys, tmp_path, lm_job(tiny_model), "model", "BertForSequenceClassification")


def test_a_classification_job_naming_a_causal_lm_is_refused(capsys, tmp_path, llama):
    job = lm_job(llama).replace("task: causal-lm", "task: classification")
    job = job.split("perplexity:")[0] + "variants: [fp32-cpu]\n"
    check_refused(capsys, tmp_path, job, "task", "LlamaForCausalLM", "use task: causal-lm")


@pytest.mark.parametrize(
    "old, new, words",
    [
        (f"context: {CONTEXT}", "context: 65", ["perplexity.context", "65", "at most 64"]),
        (f"stride: {STRIDE}", "stride: 17", ["perplexity.stride", "17", "at most the context"]),
        (f"new_tokens: {NEW_TOKENS}", "new_tokens: 60", ["generation.new_tokens", "68"]),
        ("batch_sizes: [1, 3]", "batch_sizes: [2, 2]", ["generation.batch_sizes", "distinct"]),
        ("kl_top_k: 8", "kl_top_k: -1", ["perplexity.kl_top_k", ">= 0"]),
    ],
)
def test_windows_and_prompts_out_of_range_are_refused(capsys, tmp_path, llama, old, new, words):
    check_refused(capsys, tmp_path, lm_job(llama).replace(old, new), *words)


def test_an_empty_text_column_is_refused(capsys, tmp_path, llama):
    rows = tmp_path / "empty.jsonl"
    rows.write_text("".join(json.dumps({"text": "", "n": i}) + "\n" for i in range(3)))
    dataset = f"\n  format: jsonl\n  path: {rows}"
    check_refused(capsys, tmp_path, lm_job(llama, dataset=dataset), "dataset.text_column", "empty")


def test_a_tokenizer_without_bos_or_eos_is_refused(capsys, tmp_path, llama):
    bare = build_bpe_tokenizer(tmp_path / "bare", bos=False, eos=False)
    assert bare.bos_token_id is None and bare.eos_token_id is None
    job = lm_job(llama).replace("dataset:", f"tokenizer: {{path: {tmp_path / 'bare'}}}\ndataset:")
    check_refused(capsys, tmp_path, job, "tokenizer", "neither a BOS nor an EOS")


@pytest.mark.parametrize("field", ["label_map: {pos: positive}", "label_column: label"])
def test_label_fields_in_a_causal_lm_job_are_refused(capsys, tmp_path, llama, field):
    job = lm_job(llama).replace("  sample:", f"  {field}\n  sample:")
    check_refused(capsys, tmp_path, job, f"dataset.{field.split(':')[0]}", "text alone")


def test_a_classification_job_cannot_take_the_causal_lm_fields(capsys, tmp_path, tiny_model):
    from conftest import rt_job

    job = rt_job(tiny_model, "perplexity: {context: 16}")
    check_refused(capsys, tmp_path, job, "perplexity", "only a job of task: causal-lm")


def test_an_inline_model_type_without_a_causal_lm_class_is_refused(capsys, tmp_path, llama):
    job = lm_job(llama).replace(
        f"model: {{path: {llama}}}",
        f"model: {{config: {{model_type: distilbert}}}}\ntokenizer: {{path: {llama}}}",
    )
    check_refused(capsys, tmp_path, job, "model.config.model_type", "no causal-LM class")


def test_an_inline_vocabulary_smaller_than_the_tokenizer_is_refused(capsys, tmp_path, llama):
    inline = "{model_type: llama, vocab_size: 100, hidden_size: 32, num_hidden_layers: 1,"
    inline += " num_attention_heads: 2, intermediate_size: 64, max_position_embeddings: 64}"
    job = lm_job(llama).replace(
        f"model: {{path: {llama}}}", f"model: {{config: {inline}}}\ntokenizer: {{path: {llama}}}"
    )
    check_refused(capsys, tmp_path, job, "model.config.vocab_size", "at least")


BERT = "{model_type: bert, hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2,"
BERT += " intermediate_size: 64, vocab_size: 600, max_position_embeddings: 64"


def test_a_model_that_reads_later_tokens_is_refused_before_any_variant(capsys, tmp_path, llama):
    # BertLMHeadModel without is_decoder: position 0's logits change with the token at position 2.
    job = lm_job(llama).replace(
        f"model: {{path: {llama}}}", f"model: {{config: {BERT}}}}}\ntokenizer: {{path: {llama}}}"
    )
    results = tmp_path / "results"
    code, _, err = run_cli(capsys, "run", write_job(tmp_path, job), "--results", results)
    assert code == 2, err
    assert "BertLMHeadModel is not causal" in err and "set is_decoder: true" in err, err
    assert "Traceback" not in err and not list(results.rglob("*.json"))


def test_a_bert_made_a_decoder_is_taken(tmp_path, llama):
    job = lm_job(llama).replace(
        f"model: {{path: {llama}}}",
        f"model: {{config: {BERT}, is_decoder: true}}}}\ntokenizer: {{path: {llama}}}",
    )
    model_dir, _ = models.prepare_model(plan_job(write_job(tmp_path, job)).spec)
    assert json.loads((model_dir / "config.json").read_text())["is_decoder"] is True


# ---------------------------------------------------------------------------------------------
# The sensitivity study on a causal LM: a sample is a scored position.


def test_a_study_step_compares_next_tokens_position_by_position(tmp_path, llama):
    from dataclasses import replace

    from runner.job import SensitivitySpec
    from runner.study import steps as study_worker
    from runner.work import StudyWork

    job = lm_job(llama) + "sensitivity: {precision: int8-dynamic, groups: type}\n"
    plan = plan_job(write_job(tmp_path, job))
    model_dir, _ = models.prepare_model(plan.spec)
    probe = StudyWork(
        kind="probe",
        study=SensitivitySpec("int8-dynamic", "cpu", "type"),
        family=family_of("int8-dynamic"),
        model_dir=str(model_dir),
        **plan.worker_inputs(),
    )
    found = study_worker.run_step(probe)
    assert found["reference"] is None  # FP32's top-k is computed in every step, not handed on
    assert {"query", "mlp_gate", "mlp_up", "mlp_down", "lm_head"} <= set(found["groups"])
    full = found["full"]
    positions = sum(w.scored for w in study_worker.load(probe).view.compare.args[0])
    assert full["flips"] == round((1 - full["agreement"]) * positions)
    assert full["bootstrap_accuracy_delta"]["n"] == positions and full["mean_kl"] > 0
    assert full["perplexity_fp32"] != full["perplexity"]
    step = replace(probe, kind="groups", layers=tuple(found["layers"]), groups=found["groups"])
    kept_all = study_worker.study_of(study_worker.load(step), step.layers)
    same = kept_all.compare(kept_all.evaluate(frozenset(step.layers)))  # nothing quantized
    assert same["agreement"] == 1.0 and same["mean_kl"] == pytest.approx(0.0, abs=1e-12)
    assert same["accuracy"] == same["accuracy_fp32"]


def test_an_empty_text_file_is_refused_naming_it(capsys, tmp_path, llama):
    empty = tmp_path / "blank.txt"
    empty.write_text("\n   \n")
    dataset = f"\n  format: text\n  path: {empty}"
    check_refused(
        capsys, tmp_path, lm_job(llama, dataset=dataset), "dataset.path", "blank.txt", "no rows"
    )


def test_a_causal_lm_study_meets_the_tolerances_its_verdict_judges(tmp_path, llama):
    from runner.study import ranking as sensitivity

    job = lm_job(llama, "tolerances: {min_agreement: 0.9, max_accuracy_drop: 0.01}")
    spec = plan_job(write_job(tmp_path, job)).spec
    # collect judges a causal LM by greedy agreement, not by an accuracy it does not have
    chosen = sensitivity.tolerance(spec)
    assert (chosen.min_agreement, chosen.max_accuracy_drop) == (0.9, None)
