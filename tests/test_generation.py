"""Generation speed (runner/tasks/causal_lm/generation.py) on tiny random GPT-2 and Llama models:
the explicit greedy loop against model.generate, the KV cache's bytes against a hand computation,
the prompts, the settings' checks; the timings for their structure only, never a speed."""

from __future__ import annotations

import pytest
import torch
from lm_models import (
    INITIALIZER_RANGE,
    build_bpe_tokenizer,
    build_tiny_gpt2,
    build_tiny_llama,
    load,
    rt_sentences,
    special_ids,
)

from runner import locks, machine
from runner.tasks.causal_lm import generation as gen


def build_tiny_gqa_llama(folder):
    """lm_models' tiny Llama with 4 query heads sharing 1 KV head (grouped-query attention):
    the cache holds the KV heads, which the other two models cannot tell from the query heads."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_bpe_tokenizer(folder)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        intermediate_size=64,
        max_position_embeddings=64,
        initializer_range=INITIALIZER_RANGE,
        **special_ids(tokenizer),
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


# name: (builder, layers, KV heads, head size), from the builders' configs, by hand.
MODELS = {
    "gpt2": (build_tiny_gpt2, 2, 2, 32 // 2),
    "llama": (build_tiny_llama, 2, 2, 32 // 2),
    "llama-gqa": (build_tiny_gqa_llama, 2, 1, 32 // 4),
}
FLOAT32_BYTES = 4


@pytest.fixture(scope="module", params=list(MODELS))
def lm(request, tmp_path_factory):
    """(name, model, tokenizer) of a tiny random causal LM, float32 on the CPU."""
    build = MODELS[request.param][0]
    return (request.param, *load(build(tmp_path_factory.mktemp(request.param))))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_bpe_tokenizer(tmp_path_factory.mktemp("bpe"))


@pytest.fixture(autouse=True)
def private_timing_lock(tmp_path, monkeypatch):
    """A timing lock of the tests' own: another quantbench run timing on this machine must not
    hold them up."""
    monkeypatch.setenv(locks.TIMING_LOCK_VARIABLE, str(tmp_path / "timing.lock"))


def documents() -> list[str]:
    return rt_sentences()[:300]


def prompts_for(tokenizer, prompt_length: int, count: int, seed: int = 0) -> list[list[int]]:
    return gen.prompt_token_ids(tokenizer, documents(), prompt_length, count, seed)


def hand_kv_bytes(name: str, batch: int, tokens: int) -> int:
    """layers x (key and value) x batch x KV heads x tokens x head size x bytes per element."""
    _, layers, kv_heads, head_size = MODELS[name]
    return layers * 2 * batch * kv_heads * tokens * head_size * FLOAT32_BYTES


def settings(**changes) -> gen.GenerationSettings:
    values = dict(
        prompt_length=8, new_tokens=5, batch_sizes=(1, 3), warmup_runs=1, timed_runs=3, seed=0
    )
    return gen.GenerationSettings(**{**values, **changes})


# ---------------------------------------------------------------------------------------------
# Prompts.


def token_stream(tokenizer) -> list[int]:
    """The documents' tokens joined, each after BOS, by hand."""
    stream = []
    for text in documents():
        stream += [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
    return stream


def test_prompts_are_seeded_runs_of_the_documents_tokens(tokenizer):
    stream = token_stream(tokenizer)
    prompts = prompts_for(tokenizer, 12, 6, seed=3)
    assert prompts == prompts_for(tokenizer, 12, 6, seed=3)  # every variant, the same prompts
    assert prompts != prompts_for(tokenizer, 12, 6, seed=4)
    assert prompts[:2] == prompts_for(tokenizer, 12, 2, seed=3)  # a smaller batch: the first ones
    starts = set()
    for prompt in prompts:
        assert len(prompt) == 12
        # A run of the joined tokens, starting at a multiple of the prompt length.
        start = next(s for s in range(0, len(stream), 12) if stream[s : s + 12] == prompt)
        starts.add(start)
    assert len(starts) == 6  # no run twice while there are enough


def test_prompts_repeat_only_when_the_documents_run_out(tokenizer):
    text = documents()[0]
    runs = (1 + len(tokenizer(text, add_special_tokens=False)["input_ids"])) // 4
    prompts = gen.prompt_token_ids(tokenizer, [text], 4, runs + 2, seed=0)
    assert len({tuple(p) for p in prompts[:runs]}) == runs
    assert prompts[runs:] == prompts[:2]
    with pytest.raises(ValueError, match="too few for one prompt of 400"):
        gen.prompt_token_ids(tokenizer, [text], 400, 1, seed=0)


# ---------------------------------------------------------------------------------------------
# The loop.


def generate_greedy(model, input_ids, new_tokens: int):
    """model.generate's greedy tokens and its returned cache, never stopped by EOS: the loop
    decodes new_tokens tokens whatever they are."""
    import torch

    eos = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None
    try:
        with torch.inference_mode():
            output = model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                do_sample=False,
                max_new_tokens=new_tokens,
                return_dict_in_generate=True,
            )
    finally:
        model.generation_config.eos_token_id = eos
    return output.sequences[:, input_ids.shape[1] :].tolist(), gen.returned_cache(output)


def test_the_loop_gives_generates_greedy_tokens(lm):
    name, model, tokenizer = lm
    prompts = prompts_for(tokenizer, 9, 4)
    input_ids = gen.prompt_batch(prompts, 4, "cpu")
    run = gen.greedy_generate(model, input_ids, 20)
    expected, cache = generate_greedy(model, input_ids, 20)
    assert run.token_ids == expected
    assert len({tuple(row) for row in run.token_ids}) > 1  # the prompts matter
    # generate's cache too ends one token short of the sequence: the last token is never fed.
    assert gen.cache_length(cache) == run.cache_length == 9 + 20 - 1
    assert gen.cache_bytes(cache) == run.cache_bytes


def test_every_step_is_timed(lm):
    _, model, tokenizer = lm
    input_ids = gen.prompt_batch(prompts_for(tokenizer, 6, 2), 2, "cpu")
    run = gen.greedy_generate(model, input_ids, 7)
    assert [len(row) for row in run.token_ids] == [7, 7]
    assert len(run.decode_s) == 6
    assert run.prefill_s > 0 and min(run.decode_s) > 0
    assert run.end_to_end_s == pytest.approx(run.prefill_s + sum(run.decode_s), abs=1e-6)
    one = gen.greedy_generate(model, input_ids, 1)
    assert one.decode_s == [] and one.end_to_end_s == one.prefill_s
    assert [row[0] for row in one.token_ids] == [row[0] for row in run.token_ids]


# ---------------------------------------------------------------------------------------------
# The KV cache.


@pytest.mark.parametrize("batch, prompt_length, new_tokens", [(1, 5, 1), (3, 7, 5), (2, 16, 9)])
def test_kv_cache_bytes_by_hand(lm, batch, prompt_length, new_tokens):
    name, model, tokenizer = lm
    input_ids = gen.prompt_batch(prompts_for(tokenizer, prompt_length, batch), batch, "cpu")
    run = gen.greedy_generate(model, input_ids, new_tokens)
    assert run.cache_length == prompt_length + new_tokens - 1
    assert run.cache_bytes == hand_kv_bytes(name, batch, prompt_length + new_tokens - 1)


def test_cache_bytes_of_the_legacy_tuple_and_a_dynamic_cache():
    import torch
    from transformers import DynamicCache

    key = torch.zeros(2, 3, 5, 4, dtype=torch.float16)
    legacy = tuple((key.clone(), key.clone()) for _ in range(3))
    assert gen.cache_bytes(legacy) == 3 * 2 * (2 * 3 * 5 * 4) * 2
    assert gen.cache_length(legacy) == 5
    cache = DynamicCache()
    for layer in range(3):
        cache.update(key.clone(), key.clone(), layer)
    assert gen.cache_bytes(cache) == gen.cache_bytes(legacy)
    assert gen.cache_length(cache) == 5


# ---------------------------------------------------------------------------------------------
# Timing every batch size: structure and positivity, never a speed.


def test_every_batch_size_generates_new_tokens(lm):
    name, model, tokenizer = lm
    chosen = settings(batch_sizes=(1, 3, 4), timed_runs=3, new_tokens=5)
    timings = gen.time_generation(model, prompts_for(tokenizer, 8, 4), chosen, "cpu")
    assert list(timings.by_batch_size) == [1, 3, 4]
    assert timings.timing_lock_wait_s >= 0 and timings.timing_lock_warning is None
    for batch, result in timings.by_batch_size.items():
        assert result["batch_size"] == batch
        assert result["new_tokens"] == 5
        assert result["prefill_ms"]["n"] == 3 and result["prefill_ms"]["min"] > 0
        assert result["time_to_first_token_ms"] == result["prefill_ms"]["median"]
        decode = result["decode_ms_per_token"]
        assert decode["n"] == 3 * 4 and decode["min"] > 0
        # batch x decoded tokens / decode time: every sequence gains a token per step.
        per_s = batch * 1000 / decode["mean"]
        assert result["decode_tokens_per_s"] == pytest.approx(per_s, rel=1e-2)
        assert result["end_to_end_ms"]["n"] == 3
        assert result["end_to_end_ms"]["min"] > result["prefill_ms"]["min"]
        assert result["kv_cache_bytes"] == hand_kv_bytes(name, batch, 8 + 5 - 1)
        assert result["kv_cache_mib"] == round(result["kv_cache_bytes"] / 2**20, 4)
        assert result["cuda_peak_beyond_model_mib"] is None  # on the CPU


def test_page_faults_count_the_memory_each_step_first_touches(lm):
    """A step that makes a fresh 64 MiB temporary (as torchao's weight-only layers dequantize a
    weight on the CPU) faults its pages in on every step; the plain model's steps hardly fault."""
    _, model, tokenizer = lm
    chosen = settings(batch_sizes=(1,), timed_runs=2, new_tokens=4)
    prompts = prompts_for(tokenizer, 8, 1)
    plain = gen.time_generation(model, prompts, chosen, "cpu").by_batch_size[1]
    temporary = 16 * 2**20  # float32 elements: 64 MiB, above glibc's largest mmap threshold
    hook = model.register_forward_hook(lambda *_: None if torch.ones(temporary).sum() else None)
    try:
        touching = gen.time_generation(model, prompts, chosen, "cpu").by_batch_size[1]
    finally:
        hook.remove()
    pages = temporary * FLOAT32_BYTES // 4096
    assert touching["minor_page_faults_per_step"] >= 0.9 * pages
    assert plain["minor_page_faults_per_step"] < 0.1 * pages


def test_one_new_token_has_no_decode_steps(lm):
    name, model, tokenizer = lm
    chosen = settings(new_tokens=1, batch_sizes=(2,), timed_runs=2)
    timings = gen.time_generation(model, prompts_for(tokenizer, 8, 2), chosen, "cpu")
    result = timings.by_batch_size[2]
    assert result["new_tokens"] == 1
    assert result["decode_ms_per_token"] == {"n": 0}
    assert result["decode_tokens_per_s"] is None
    assert result["kv_cache_bytes"] == hand_kv_bytes(name, 2, 8)


def test_the_kv_cache_phase(lm):
    name, model, tokenizer = lm
    memory = machine.MemoryPhases("cpu")
    chosen = settings(batch_sizes=(3, 1), timed_runs=1, warmup_runs=0)
    timings = gen.kv_cache_phase(memory, model, prompts_for(tokenizer, 8, 3), chosen, "cpu")
    record = memory.phases["kv_cache"]
    assert record["kv_cache_batch_size"] == 3  # the largest, not the last
    assert record["kv_cache_mib"] == timings.by_batch_size[3]["kv_cache_mib"]
    assert record["kv_cache_mib"] == round(hand_kv_bytes(name, 3, 12) / 2**20, 4)
    assert record["peak_rss_mib"] > 0
    assert "peak_cuda_allocated_mib" not in record
    assert memory.peak_rss_mib() is None  # not one of the measured phases (MemoryPhases.MEASURED)


# ---------------------------------------------------------------------------------------------
# Settings, for people.


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"prompt_length": 0}, "prompt_length is 0: allowed an integer of 1 or more"),
        ({"prompt_length": 2.5}, "prompt_length is 2.5: allowed an integer of 1 or more"),
        ({"new_tokens": 0}, "new_tokens is 0: allowed an integer of 1 or more"),
        ({"new_tokens": True}, "new_tokens is True"),
        ({"batch_sizes": ()}, "batch_sizes is (): allowed a non-empty list"),
        ({"batch_sizes": (2, 0)}, "a batch size is 0: allowed an integer of 1 or more"),
        ({"batch_sizes": (2, 2)}, "a batch size is listed twice"),
        ({"timed_runs": 0}, "timed_runs is 0: allowed an integer of 1 or more"),
        ({"warmup_runs": -1}, "warmup_runs is -1: allowed an integer of 0 or more"),
    ],
)
def test_settings_are_checked(changes, words):
    with pytest.raises(ValueError, match="allowed") as raised:
        settings(**changes).check()
    assert words in str(raised.value)
    settings().check()  # and the defaults pass


def test_prompt_and_new_tokens_fit_the_models_positions(lm):
    _, model, tokenizer = lm
    assert gen.model_max_positions(model) == 64  # GPT-2's n_positions, Llama's own
    settings(prompt_length=60, new_tokens=4).check(64)
    with pytest.raises(ValueError, match=r"60 \+ 5 = 65: the model takes at most 64 tokens"):
        gen.time_generation(
            model, prompts_for(tokenizer, 60, 1), settings(prompt_length=60, new_tokens=5), "cpu"
        )
