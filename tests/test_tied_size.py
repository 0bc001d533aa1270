"""A tied embedding in a variant's size: a Llama whose output layer shares its input embedding's
weight (tie_word_embeddings, as SmolLM2 and Gemma 3) counts that weight once; where quantizing
gives the output layer a copy of its own (torch.ao's int8-dynamic, torchao), the result says so in
its warnings and in metrics.untied_output_mib, and collect's table shows the warning under it."""

from __future__ import annotations

import pytest
from conftest import RT_POLARITY, run_cli, variant_json, write_job
from lm_models import build_tied_llama, build_tiny_llama
from transformers import AutoModelForCausalLM

from runner import locks, machine, models, precisions
from runner.plan import plan_job
from runner.precisions.worker import quantized_model
from runner.results import write_result
from runner.schema import Result
from runner.sweep import variant_work

UNTIED = "quantization untied the output layer from the embedding"


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    return build_tied_llama(tmp_path_factory.mktemp("tied"))


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("untied"))


@pytest.fixture(autouse=True)
def private_timing_lock(tmp_path, monkeypatch):
    monkeypatch.setenv(locks.TIMING_LOCK_VARIABLE, str(tmp_path / "timing.lock"))


def quantized(folder, name: str):
    precision = precisions.precision_of(name)
    config = precisions.config_for(precision, precisions.default_settings())
    family = precisions.worker_of(precision)
    return quantized_model(precision, config, family, AutoModelForCausalLM, folder, "cpu").model


def embedding_mib(model) -> float:
    weight = model.get_input_embeddings().weight
    return weight.numel() * weight.element_size() / 2**20


def test_a_tied_embedding_counts_once(tied, untied):
    tied_model, untied_model = quantized(tied, "fp32"), quantized(untied, "fp32")
    assert tied_model.lm_head.weight is tied_model.model.embed_tokens.weight
    gap = machine.model_size_mib(untied_model) - machine.model_size_mib(tied_model)
    # The untied checkpoint holds the [vocab, hidden] matrix twice, the tied one once.
    assert gap == pytest.approx(embedding_mib(tied_model), rel=0.02)
    assert machine.untied_output(tied_model) is None
    assert machine.untied_output(untied_model) is None  # never tied: nothing was untied


@pytest.mark.parametrize("name", ["fp16", "bf16", "bnb-int8", "bnb-nf4"])
def test_casts_and_bitsandbytes_keep_the_tie(tied, name):
    """The casts convert the shared weight in place; bitsandbytes leaves lm_head out."""
    model = quantized(tied, name)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert machine.untied_output(model) is None


@pytest.mark.parametrize("name", ["int8-dynamic", "torchao-int8-dynamic", "torchao-int8-weight"])
def test_quantizing_the_output_layer_unties_it(tied, name):
    model = quantized(tied, name)
    found = machine.untied_output(model)
    assert found is not None
    assert (found.output_layer, found.embedding) == ("lm_head", "model.embed_tokens")
    # The copy is the [vocab, hidden] matrix in INT8 (1 byte a weight, 4 in FP32), and scales.
    fp32_copy = embedding_mib(model)
    assert fp32_copy / 4 <= found.mib < fp32_copy / 2
    # It is in the size: the embedding stays FP32 beside it.
    without_copy = machine.model_size_mib(model) - found.mib
    assert without_copy > fp32_copy
    assert f"{UNTIED} (+{found.mib:.4g} MiB)" in found.warning()


def lm_job(model) -> str:
    return f"""
name: tied-lm
task: causal-lm
model: {{path: {model}}}
dataset:
  format: lines
  path: {RT_POLARITY}
  files: {{pos: rt-polarity.pos, neg: rt-polarity.neg}}
  sample: {{n: 4, seed: 3}}
perplexity: {{context: 16, kl_top_k: 0}}
generation: false
evaluation: {{batch_size: 4, warmup_passes: 0, timed_passes: 1}}
variants: [fp32-cpu, int8-dynamic-cpu]
"""


def test_a_result_says_when_quantization_untied_the_output_layer(capsys, tmp_path, tied):
    plan = plan_job(write_job(tmp_path, lm_job(tied)))
    model_dir, info = models.prepare_model(plan.spec)
    works = variant_work(plan, model_dir, info, set(), plan.spec.variants)
    results = {work.variant.id: variant_json(work) for work in works}
    fp32, int8 = results["fp32-cpu"], results["int8-dynamic-cpu"]
    assert fp32["status"] == int8["status"] == "ok", int8.get("error")
    assert "untied_output_mib" not in fp32["metrics"]
    assert not any(UNTIED in warning for warning in fp32["warnings"])
    untied_mib = int8["metrics"]["untied_output_mib"]
    assert 0 < untied_mib < int8["metrics"]["model_size_mib"]
    assert any(f"{UNTIED} (+{untied_mib:.4g} MiB)" in warning for warning in int8["warnings"])
    for result in results.values():
        write_result(tmp_path / "results", Result.from_json(result))
    code, out, err = run_cli(capsys, "collect", tmp_path / "results")
    assert code == 0, err
    footnotes = " ".join(out.split())  # the table wraps them at 80 columns
    assert f"int8-dynamic-cpu: {UNTIED} (+{untied_mib:.4g} MiB)" in footnotes
