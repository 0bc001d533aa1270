"""Training a causal LM through the job's fine-tune stage: the blocks it cuts, that it learns, that
it is cached, and the demo's tokenizer that its script builds."""

from __future__ import annotations

import json
import math
import re
from types import SimpleNamespace

import pytest
from conftest import REPO, RT_POLARITY, write_job
from lm_models import BOS, BPE_SCRIPT, EOS, build_tiny_llama, load

from runner import models
from runner.cli import main
from runner.finetune import stage
from runner.finetune import train as finetune
from runner.finetune.stage import fine_tuned_model, finetune_work
from runner.plan import plan_job
from runner.spec import load_job
from runner.tasks import TASKS
from runner.tasks.causal_lm import perplexity
from runner.tasks.causal_lm import training as lm_training


class WordTokenizer:
    """Each word is one token, its id fixed by a table: blocks checked by hand."""

    def __init__(self, bos_token_id: int | None, eos_token_id: int | None):
        self.bos_token_id, self.eos_token_id = bos_token_id, eos_token_id
        self.ids = {word: 10 + i for i, word in enumerate("a b c d e f g h i".split())}

    def __call__(self, texts, add_special_tokens=True):
        assert add_special_tokens is False, "documents are tokenized without special tokens"
        return {"input_ids": [[self.ids[word] for word in text.split()] for text in texts]}


def lm_task(texts: list[str], context: int):
    settings = SimpleNamespace(perplexity=SimpleNamespace(context=context))
    return SimpleNamespace(texts=texts, task_config=settings)


DOCUMENTS = ["a b c", "d e", "f g h i"]  # ids 10 11 12, 13 14, 15 16 17 18


def test_documents_are_joined_each_after_the_bos_and_cut_into_blocks_the_tail_dropped():
    tokenizer = WordTokenizer(bos_token_id=1, eos_token_id=2)
    assert lm_training.token_stream(tokenizer, DOCUMENTS) == [
        *(1, 10, 11, 12),
        *(1, 13, 14),
        *(1, 15, 16, 17, 18),
    ]
    blocks = lm_training.training_blocks(tokenizer, lm_task(DOCUMENTS, context=5))
    # 12 tokens in blocks of 5: two blocks, the last two tokens (17 18) dropped.
    assert blocks == [[1, 10, 11, 12, 1], [13, 14, 1, 15, 16]]
    assert lm_training.training_rows(tokenizer, lm_task(DOCUMENTS, context=4)) == [
        {"input_ids": [1, 10, 11, 12]},
        {"input_ids": [1, 13, 14, 1]},
        {"input_ids": [15, 16, 17, 18]},
    ]


def test_without_a_bos_the_eos_stands_before_each_document():
    tokenizer = WordTokenizer(bos_token_id=None, eos_token_id=2)
    assert lm_training.token_stream(tokenizer, DOCUMENTS[:2]) == [2, 10, 11, 12, 2, 13, 14]


def test_documents_too_short_for_one_block_are_refused_saying_why():
    with pytest.raises(ValueError, match=r"the 3 training documents hold 12 tokens.*block of 13"):
        lm_training.training_blocks(WordTokenizer(1, 2), lm_task(DOCUMENTS, context=13))


def test_the_collator_makes_each_block_its_own_labels(tmp_path):
    tokenizer = BPE_SCRIPT.build_tokenizer(["a b c d e f"] * 50, vocab_size=300)
    batch = lm_training.data_collator(tokenizer)([{"input_ids": [0, 5, 6, 7]}] * 2)
    assert batch["labels"].tolist() == batch["input_ids"].tolist() == [[0, 5, 6, 7]] * 2
    assert "token_type_ids" not in batch


def lm_job(model, train_rows: int = 300) -> str:
    return f"""
name: lm-tiny
task: causal-lm
model: {{path: {model}}}
dataset:
  format: lines
  path: {RT_POLARITY}
  files: {{pos: rt-polarity.pos, neg: rt-polarity.neg}}
  sample: {{n: 40, seed: 0}}
finetune: {{epochs: 1, learning_rate: 1.0e-2, batch_size: 8, max_samples: {train_rows}, seed: 0}}
perplexity: {{context: 32, kl_top_k: 0}}
generation: false
variants: [fp32-cpu]
"""


def held_out_perplexity(folder, texts: list[str]) -> float:
    model, tokenizer = load(folder)
    windows = perplexity.document_windows(tokenizer, texts, 32, 32)
    pad = perplexity.prefix_token_id(tokenizer)
    return perplexity.perplexity(perplexity.window_losses(model, windows, "cpu", 8, pad))


def test_training_a_tiny_llama_lowers_held_out_perplexity_and_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path / "cache"))
    plan = plan_job(write_job(tmp_path, lm_job(build_tiny_llama(tmp_path / "llama"))))
    base_dir, base_info = models.prepare_model(plan.spec)
    task = finetune_work(plan, base_dir, base_info)
    assert task.labels == [] and task.task_config.perplexity.context == 32

    info = finetune.run_finetune(task)
    assert not info["cached"] and info["task_settings"] == {"block_tokens": 32}
    assert info["trained_on"].startswith("300 documents, ")
    held_out = [e.text for e in plan.examples]  # the evaluation sample: never trained on
    assert not set(held_out) & set(task.texts)
    before = held_out_perplexity(base_dir, held_out)
    after = held_out_perplexity(info["folder"], held_out)
    assert after < 0.5 * before, (before, after)
    assert load(info["folder"])[0].config.use_cache  # the Trainer turned it off while training

    # The second time: the cache entry, not a second training (no cluster is there to run one).
    said = []
    folder, reused = fine_tuned_model(plan, base_dir, base_info, cluster=None, say=said.append)
    assert str(folder) == info["folder"] and reused["cached"]
    assert reused["train_loss"] == info["train_loss"]
    assert said == [
        f"fine-tune: reusing the cached fine-tuned model {folder} (trained on "
        f"{info['trained_on']}, train loss {info['train_loss']})"
    ]


def test_quantbench_run_trains_the_model_as_a_ray_task_and_its_variants_score_it(
    capsys, tmp_path, ray_temp_dir
):
    job = write_job(tmp_path, lm_job(build_tiny_llama(tmp_path / "llama")))
    arguments = ["run", job, "--results", tmp_path / "results", "--ray-temp-dir", ray_temp_dir]
    code = main([str(a) for a in arguments])
    out = capsys.readouterr().out
    assert code == 0, out
    assert re.search(r"fine-tune: training on 300 documents, \d+ blocks of 32 tokens", out), out
    result = json.loads((tmp_path / "results" / "lm-tiny" / "fp32-cpu.json").read_text())
    assert result["status"] == "ok", result.get("error")
    assert result["model"]["source"].startswith("fine-tuned ")
    assert result["model"]["task_settings"] == {"block_tokens": 32}
    assert result["metrics"]["perplexity"] < 0.5 * len(load(tmp_path / "llama")[1])


def test_the_block_length_is_part_of_the_cache_key(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path / "cache"))
    model = build_tiny_llama(tmp_path / "llama")
    keys = []
    for context, stride in [(32, 32), (32, 8), (16, 16)]:
        text = lm_job(model).replace("{context: 32,", f"{{context: {context}, stride: {stride},")
        plan = plan_job(write_job(tmp_path, text, f"job-{context}-{stride}.yaml"))
        base_dir, base_info = models.prepare_model(plan.spec)
        keys.append(finetune_work(plan, base_dir, base_info).key)
    assert keys[0] == keys[1] != keys[2]  # the stride changes no weight; the block length does


def test_the_chance_loss_of_a_language_model_is_ln_of_its_vocabulary(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 4096}))
    loss, written = TASKS["causal-lm"].chance_loss(SimpleNamespace(model_dir=str(tmp_path)))
    assert loss == pytest.approx(math.log(4096)) and written.startswith("ln 4096")
    assert "ln 4096" in stage.chance_note(8.30, (loss, written))
    assert stage.chance_note(4.5, (loss, written)) == ""


def test_the_tokenizer_script_builds_a_folder_that_loads_with_its_bos_and_eos(tmp_path):
    from transformers import AutoTokenizer

    sentences = BPE_SCRIPT.rt_polarity_sentences(RT_POLARITY)
    assert len(sentences) == 10662  # every sentence, evaluation samples included
    folder = BPE_SCRIPT.write_folder(
        BPE_SCRIPT.build_tokenizer(sentences[:3000], vocab_size=600), tmp_path / "bpe"
    )
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in folder.iterdir()}
    assert {p.name for p in folder.iterdir()} <= set(BPE_SCRIPT.FILES)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert (tokenizer.bos_token, tokenizer.eos_token) == (BOS, EOS) and len(tokenizer) == 600
    encoded = tokenizer("a gripping , funny film .")
    assert encoded["input_ids"][0] == tokenizer.bos_token_id and "token_type_ids" not in encoded
    assert tokenizer.decode(encoded["input_ids"], skip_special_tokens=True) == (
        "a gripping , funny film ."
    )


def test_the_shipped_tokenizer_is_what_its_script_builds():
    from transformers import AutoTokenizer

    shipped = AutoTokenizer.from_pretrained(BPE_SCRIPT.FOLDER)
    assert len(shipped) == BPE_SCRIPT.VOCAB_SIZE
    assert [shipped.bos_token_id, shipped.eos_token_id, shipped.pad_token_id] == [0, 1, 2]
    built = BPE_SCRIPT.build_tokenizer(BPE_SCRIPT.rt_polarity_sentences(RT_POLARITY))
    assert built.get_vocab() == shipped.get_vocab()


def test_the_demo_job_plans_offline_with_its_shipped_tokenizer():
    plan = plan_job(REPO / "jobs" / "toy-lm.yaml")  # the tokenizer's vocabulary fits the model's
    assert plan.spec.model.config["vocab_size"] == BPE_SCRIPT.VOCAB_SIZE
    assert len(plan.examples) == 800 and len(plan.train_examples) == 10662 - 800
    assert plan.targets.config.perplexity.context == 64


def test_the_hub_job_is_only_read_never_planned(monkeypatch):
    # Planning it would download Qwen2.5-0.5B; reading the file must not touch the network.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = load_job(REPO / "jobs" / "qwen2.5-0.5b.yaml")
    assert spec.model.hub and spec.task == "causal-lm" and spec.finetune is None
