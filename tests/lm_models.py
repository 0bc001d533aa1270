"""Tiny causal LMs built offline for the tests: a random GPT-2 and a random Llama, saved with
save_pretrained beside a byte-level BPE tokenizer trained on the rt-polarity sentences.

Nothing is downloaded. The tokenizer adds its BOS itself, as Llama's does, so that a test can see
that perplexity tokenizes without special tokens.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from conftest import REPO, RT_POLARITY, corpus_lines


def load_script(path: Path):
    """A script of the repository as a module (tokenizers/ is no package: the name is the
    tokenizers library's)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BPE_SCRIPT = load_script(REPO / "tokenizers" / "build_rt_polarity_bpe.py")
BOS, EOS, PAD = BPE_SCRIPT.BOS, BPE_SCRIPT.EOS, BPE_SCRIPT.PAD
# Larger than transformers' 0.02: a random model then prefers some tokens and reads its context,
# so a window's context changes its losses by more than rounding.
INITIALIZER_RANGE = 0.3


def rt_sentences() -> list[str]:
    return corpus_lines([RT_POLARITY / "rt-polarity.pos", RT_POLARITY / "rt-polarity.neg"])


def build_bpe_tokenizer(
    folder: Path, vocab_size: int = 500, bos: bool = True, eos: bool = True, pad: bool = True
):
    """A byte-level BPE trained on rt-polarity, as a PreTrainedTokenizerFast saved in folder: the
    shipped tokenizer's recipe (tokenizers/build_rt_polarity_bpe.py), smaller."""
    tokenizer = BPE_SCRIPT.build_tokenizer(rt_sentences(), vocab_size, bos, eos, pad)
    assert len(tokenizer) > 300, "the BPE did not learn its merges"
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    return tokenizer


def special_ids(tokenizer) -> dict:
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def build_tiny_gpt2(folder: Path, seed: int = 0) -> Path:
    """A random-initialised 2-layer GPT-2 (32 wide, 64 positions) and its tokenizer, in folder."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = build_bpe_tokenizer(folder)
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_layer=2,
        n_embd=32,
        n_head=2,
        n_positions=64,
        initializer_range=INITIALIZER_RANGE,
        **special_ids(tokenizer),
    )
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def build_tiny_llama(
    folder: Path,
    seed: int = 0,
    hidden: int = 32,
    intermediate: int = 64,
    heads: tuple[int, int] = (2, 2),
    positions: int = 64,
    initializer_range: float = INITIALIZER_RANGE,
) -> Path:
    """A random-initialised 2-layer Llama (32 wide, 64 positions unless told; heads: attention
    and key-value heads) and its tokenizer, in folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_bpe_tokenizer(folder)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=heads[0],
        num_key_value_heads=heads[1],
        intermediate_size=intermediate,
        max_position_embeddings=positions,
        initializer_range=initializer_range,
        **special_ids(tokenizer),
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def build_tied_llama(folder: Path, seed: int = 0) -> Path:
    """build_tiny_llama's Llama with its output layer tied to its input embedding
    (tie_word_embeddings), as SmolLM2 and Gemma 3 ship theirs."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    build_tiny_llama(folder, seed)
    config = LlamaConfig.from_pretrained(folder)
    config.tie_word_embeddings = True
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def load(folder: Path):
    """(model in eval mode, float32, on the CPU; its tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder)


# Hand computations: each token's log-probability from its own forward pass over its own context.


def next_token_log_probs(model, input_ids: list[int]):
    """log-softmax over the vocabulary at every position of one unpadded sequence, by hand."""
    import torch

    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([input_ids])).logits[0]
    return torch.log_softmax(logits.double(), dim=-1)


def conditioning(token_ids: list[int], prefix_id: int, i: int, context: int, stride: int):
    """What token i is predicted from, straight from the convention: the prefix and everything
    before it in the first window; later, the `context` tokens before its window's last target."""
    if i < context:
        return [prefix_id] + token_ids[:i]
    window = -(-(i - context + 1) // stride)  # the later window that scores token i, from 1
    end = min(context + window * stride, len(token_ids))
    return token_ids[end - context - 1 : i]


def nll_token_by_token(model, token_ids, prefix_id, context, stride) -> list[float]:
    """Each token's NLL from its own forward pass over its own context."""
    nlls = []
    for i, token in enumerate(token_ids):
        before = conditioning(token_ids, prefix_id, i, context, stride)
        assert 1 <= len(before) <= context
        nlls.append(-float(next_token_log_probs(model, before)[-1, token]))
    return nlls
