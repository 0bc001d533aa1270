"""The perplexity prefix token as the job's choice (`perplexity: {prefix: ...}`): the token put
before every document is the one named, else the tokenizer's BOS, else its EOS; every result
records the one it used; validation refuses a prefix the tokenizer does not have as one token,
and no prefix at all."""

from __future__ import annotations

import math

import pytest
from conftest import RT_POLARITY, check_refused, run_cli, variant_json, write_job
from lm_models import BOS, EOS, PAD, build_bpe_tokenizer, load, nll_token_by_token

from runner import models
from runner.job import Variant
from runner.plan import plan_job
from runner.sweep import variant_work
from runner.tasks.causal_lm import perplexity as ppl

CONTEXT, STRIDE = 16, 8


pytestmark = pytest.mark.usefixtures("private_timing_lock")


def prefix_job(model, prefix: str = "", tokenizer: str = "") -> str:
    """A job of four rt-polarity documents, no KL and no generation: only perplexity runs."""
    named = f", prefix: {prefix}" if prefix else ""
    return f"""
name: prefix-lm
task: causal-lm
model: {{path: {model}}}
{tokenizer}
dataset:
  format: lines
  path: {RT_POLARITY}
  files: {{pos: rt-polarity.pos, neg: rt-polarity.neg}}
  sample: {{n: 4, seed: 3}}
perplexity: {{context: {CONTEXT}, stride: {STRIDE}, kl_top_k: 0{named}}}
generation: false
evaluation: {{batch_size: 4, warmup_passes: 0, timed_passes: 1}}
variants: [fp32-cpu]
"""


def run_fp32(tmp_path, job_text: str) -> tuple[dict, object]:
    """(the fp32 variant's result as JSON, its plan), run by the worker in this process."""
    plan = plan_job(write_job(tmp_path, job_text))
    model_dir, info = models.prepare_model(plan.spec)
    (work,) = variant_work(plan, model_dir, info, set(), [Variant("fp32", "cpu")])
    return variant_json(work), plan


def hand_perplexity(model_dir, plan, prefix_id: int) -> float:
    model, tokenizer = load(model_dir)
    nlls = []
    for example in plan.examples:
        ids = tokenizer(example.text, add_special_tokens=False)["input_ids"]
        nlls += nll_token_by_token(model, ids, prefix_id, CONTEXT, STRIDE)
    return math.exp(sum(nlls) / len(nlls))


def test_the_named_prefix_is_used_and_recorded(tmp_path, llama):
    named, plan = run_fp32(tmp_path, prefix_job(llama, prefix=f'"{EOS}"'))
    default, _ = run_fp32(tmp_path / "default", prefix_job(llama))
    assert named["status"] == default["status"] == "ok", named.get("error")
    assert named["settings"]["perplexity"]["prefix"] == EOS
    assert default["settings"]["perplexity"]["prefix"] == BOS  # the resolved default
    _, tokenizer = load(llama)
    expected = hand_perplexity(llama, plan, tokenizer.eos_token_id)
    assert named["metrics"]["perplexity"] == pytest.approx(expected, rel=1e-5)
    assert named["metrics"]["perplexity"] != pytest.approx(default["metrics"]["perplexity"])
    # The job field is part of the spec: two prefixes are two specs.
    assert named["spec_hash"] != default["spec_hash"]


def test_the_plan_says_which_prefix_it_puts_first(capsys, tmp_path, llama):
    code, out, err = run_cli(capsys, "validate", write_job(tmp_path, prefix_job(llama)))
    assert code == 0, err
    assert f"each document after {BOS}" in out


@pytest.mark.parametrize(
    "prefix, words",
    [
        ('"<|im_start|>"', ["perplexity.prefix", "'<|im_start|>'", "no such token", BOS, PAD]),
        # Text that the tokenizer cuts into several tokens is no token of its vocabulary.
        ('"a dull film"', ["perplexity.prefix", "'a dull film'", "one token of its vocabulary"]),
        ("null", ["perplexity.prefix", "null (no prefix) is refused"]),
        ('""', ["perplexity.prefix", "the field left out"]),
        ("7", ["perplexity.prefix", "expected a string"]),
    ],
)
def test_a_prefix_that_is_not_one_token_is_refused(capsys, tmp_path, llama, prefix, words):
    job = prefix_job(llama).replace("kl_top_k: 0", f"kl_top_k: 0, prefix: {prefix}")
    check_refused(capsys, tmp_path, job, *words)


def test_a_tokenizer_without_bos_or_eos_runs_with_a_named_prefix(capsys, tmp_path, llama):
    bare = tmp_path / "bare"
    build_bpe_tokenizer(bare, bos=False, eos=False)
    tokenizer = f"tokenizer: {{path: {bare}}}"
    check_refused(capsys, tmp_path, prefix_job(llama, tokenizer=tokenizer), "neither a BOS")
    job = write_job(tmp_path, prefix_job(llama, prefix=PAD, tokenizer=tokenizer))
    code, out, err = run_cli(capsys, "validate", job)
    assert code == 0, err
    assert f"each document after {PAD}" in out


def test_a_tokenizer_without_the_prefix_fails_where_it_is_loaded(tmp_path):
    """A hub tokenizer is first read by the worker: its refusal must say what to do there too."""
    tokenizer = build_bpe_tokenizer(tmp_path / "bpe")
    (window,) = ppl.document_windows(tokenizer, ["a film"], 8, 8, prefix=PAD)
    assert window.input_ids[0] == tokenizer.pad_token_id
    with pytest.raises(ValueError) as raised:
        ppl.document_windows(tokenizer, ["a film"], 8, 8, prefix="<|endoftext|>")
    message = str(raised.value)
    assert "perplexity.prefix is '<|endoftext|>'" in message and "no such token" in message
    assert f"its special tokens: {BOS}, {EOS}, {PAD}" in message
