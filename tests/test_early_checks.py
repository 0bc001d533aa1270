"""What validation can see, said by validation (exit 2, the field and the bound) before Ray
starts: a GPT-2's position table (n_positions), a config value transformers refuses, a causal-LM
job's generation and fine-tune lengths against the tokenized sample; and a perplexity beyond a
float's range, reported as such with its mean NLL and bits per byte kept."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import RT_POLARITY, check_refused, run_cli, variant_json, write_job
from lm_models import build_tiny_gpt2

from runner import models
from runner.job import Variant
from runner.plan import plan_job
from runner.sweep import variant_work

pytestmark = pytest.mark.usefixtures("private_timing_lock")

POSITIONS = 64  # build_tiny_gpt2's n_positions


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return build_tiny_gpt2(tmp_path_factory.mktemp("gpt2"))


def gpt2_job(model, extra: str = "", generation: str = "", model_line: str = "") -> str:
    generation = generation or "{prompt_length: 8, new_tokens: 4, batch_sizes: [1]}"
    return f"""
name: tiny-gpt2
task: causal-lm
model: {model_line or f"{{path: {model}}}"}
dataset:
  format: lines
  path: {RT_POLARITY}
  files: {{pos: rt-polarity.pos, neg: rt-polarity.neg}}
  sample: {{n: 4, seed: 3}}
perplexity: {{context: 16, stride: 8}}
generation: {generation}
evaluation: {{batch_size: 4, warmup_passes: 0, timed_passes: 1}}
variants: [fp32-cpu]
{extra}
"""


# ---------------------------------------------------------------------------------------------
# The position table: GPT-2 names it n_positions.


def test_a_fixed_shape_longer_than_gpt2s_n_positions_is_refused(capsys, tmp_path, gpt2):
    job = gpt2_job(gpt2).replace(
        "timed_passes: 1}", "timed_passes: 1, latency_mode: fixed, fixed_shape: [1, 500]}"
    )
    check_refused(
        capsys,
        tmp_path,
        job,
        "evaluation.fixed_shape",
        f"at most {POSITIONS} tokens",
        "n_positions",
    )


def test_a_calibration_longer_than_gpt2s_n_positions_is_refused(capsys, tmp_path, gpt2):
    job = gpt2_job(gpt2, "calibration: {samples: 4, max_length: 512}")
    job = job.replace("[fp32-cpu]", "[fp32-cpu, gptq-int4-cpu]")
    check_refused(capsys, tmp_path, job, "calibration.max_length", "512", "n_positions")


def test_a_classifier_max_length_beyond_gpt2s_n_positions_is_refused(capsys, tmp_path, gpt2):
    from conftest import rt_job
    from transformers import GPT2Config, GPT2ForSequenceClassification

    folder = tmp_path / "gpt2-classifier"
    config = GPT2Config.from_pretrained(gpt2, id2label={0: "negative", 1: "positive"})
    GPT2ForSequenceClassification(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (gpt2 / name).is_file():
            (folder / name).write_bytes((gpt2 / name).read_bytes())
    capsys.readouterr()  # save_pretrained's progress bar
    job = rt_job(folder, variants="[fp32-cpu]").replace("max_length: 32", "max_length: 512")
    check_refused(capsys, tmp_path, job, "dataset.max_length", "512", f"at most {POSITIONS}")


# ---------------------------------------------------------------------------------------------
# An inline config value transformers' typed config refuses.


def test_an_inline_value_transformers_refuses_is_one_paragraph(capsys, tmp_path, gpt2):
    inline = "{config: {model_type: gpt2, n_layer: 1, n_embd: 32, n_head: 2, vocab_size: 600,"
    inline += " initializer_range: 100}}"
    job = gpt2_job(gpt2, model_line=inline).replace(
        "dataset:", f"tokenizer: {{path: {gpt2}}}\ndataset:"
    )
    err = check_refused(
        capsys,
        tmp_path,
        job,
        "model.config.initializer_range",
        "100",
        "expected float",
        "100.0",
    )
    assert len(err.strip().splitlines()) <= 4, err


# ---------------------------------------------------------------------------------------------
# A perplexity beyond a float's range: the measurement is kept.


def test_a_perplexity_beyond_float_range_keeps_the_mean_nll(tmp_path, gpt2):
    loud = tmp_path / "loud"
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(gpt2)
    with torch.no_grad():  # logits thousands of nats apart: a wrong guess costs > 709 nats
        model.transformer.ln_f.weight.mul_(1e4)
    model.save_pretrained(loud)
    for name in gpt2.iterdir():
        if name.name.startswith(("tokenizer", "special")):
            (loud / name.name).write_bytes(name.read_bytes())
    job = write_job(tmp_path, gpt2_job(loud))
    plan = plan_job(job)
    model_dir, info = models.prepare_model(plan.spec)
    (task,) = variant_work(plan, model_dir, info, set(), [Variant("fp32", "cpu")])
    result = variant_json(task)
    assert result["status"] == "ok", json.dumps(result)[:2000]
    metrics = result["metrics"]
    assert metrics["perplexity"] is None
    assert metrics["mean_nll"] > 709 and metrics["bits_per_byte"] > 0
    assert any("beyond a float's range" in w for w in result["warnings"]), result["warnings"]


# ---------------------------------------------------------------------------------------------
# The tokenized sample: enough tokens for a prompt, and for one training block.


def test_a_prompt_longer_than_the_samples_tokens_is_refused(capsys, tmp_path, gpt2):
    texts = tmp_path / "short.txt"
    texts.write_text("a good film\nbad\n")  # a few tokens: 64 positions would allow 60
    job = gpt2_job(gpt2, generation="{prompt_length: 40, new_tokens: 4, batch_sizes: [1]}")
    job = job.replace(f"format: lines\n  path: {RT_POLARITY}", f"format: text\n  path: {texts}")
    job = job.replace(
        "  files: {pos: rt-polarity.pos, neg: rt-polarity.neg}\n  sample: {n: 4, seed: 3}\n", ""
    )
    check_refused(capsys, tmp_path, job, "generation.prompt_length", "40", "at most")


def test_finetune_text_shorter_than_one_block_is_refused(capsys, tmp_path, gpt2):
    train = tmp_path / "train.txt"
    train.write_text("tiny\ntext\n")
    finetune = f"finetune: {{train: {{format: text, path: {train}}}, epochs: 1}}"
    job = gpt2_job(gpt2, finetune).replace("context: 16", "context: 60")
    check_refused(capsys, tmp_path, job, "finetune.train", "perplexity.context (60)")


# ---------------------------------------------------------------------------------------------
# An int4 group size that does not divide a layer the precision quantizes.


@pytest.mark.parametrize("precision", ["torchao-int4-weight", "gptq-int4"])
def test_an_int4_group_size_that_does_not_divide_a_layer_is_refused(
    capsys, tmp_path, gpt2, precision
):
    # GPT-2's blocks are Conv1D; its one nn.Linear, lm_head, reads n_embd 32 inputs: 128 does not
    # divide it (the worker found it after the cluster started and FP32 was timed).
    calibration = "calibration: {samples: 4}" if precision == "gptq-int4" else ""
    job = gpt2_job(gpt2, calibration).replace("[fp32-cpu]", f"[fp32-cpu, {precision}-cpu]")
    check_refused(
        capsys,
        tmp_path,
        job,
        "settings.torchao_int4_group_size: found 128",
        f"{precision} quantizes layer 'lm_head', whose in_features 32 is not a multiple of it",
        "group sizes that divide every layer: 32",
    )
    ok = job.replace("variants:", "settings: {torchao_int4_group_size: 32}\nvariants:")
    code, out, err = run_cli(capsys, "validate", write_job(tmp_path / "ok", ok))
    assert code == 0, err


# ---------------------------------------------------------------------------------------------
# A generation batch too large for any machine: estimated at validation, not refused.


def test_validate_estimates_the_largest_generation_batchs_memory(capsys, tmp_path, gpt2):
    job = gpt2_job(gpt2, generation="{prompt_length: 8, new_tokens: 4, batch_sizes: [1, 10000000]}")
    code, out, err = run_cli(capsys, "validate", write_job(tmp_path, job))
    assert code == 0, err
    # GPT-2 of 2 layers, 32 wide, a vocabulary of the BPE's size: 10000000 x 12 tokens x 2 layers
    # x (K and V) x 32 x 4 bytes of KV cache, and 10000000 x vocab x 4 bytes of a step's logits.
    vocab = json.loads((gpt2 / "config.json").read_text())["vocab_size"]
    kv, logits = 10_000_000 * 12 * 2 * 2 * 32 * 4 / 2**30, 10_000_000 * vocab * 4 / 2**30
    assert (
        f"note: generation: batch size 10000000 holds about {kv + logits:.3g} GiB in FP32 "
        f"(KV cache {kv:.3g} GiB, a step's logits {logits:.3g} GiB)" in out
    ), out
