"""Tiny causal LMs built offline for the tests: a random GPT-2 and a random Llama, saved with
save_pretrained beside a byte-level BPE tokenizer trained on the rt-polarity sentences.

Nothing is downloaded. The tokenizer adds its BOS itself, as Llama's does, so that a test can see
that perplexity tokenizes without special tokens.
"""

from __future__ import annotations

from pathlib import Path

from conftest import RT_POLARITY, corpus_lines

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
# Larger than transformers' 0.02: a random model then prefers some tokens and reads its context,
# so a window's context changes its losses by more than rounding.
INITIALIZER_RANGE = 0.3


def rt_sentences() -> list[str]:
    return corpus_lines([RT_POLARITY / "rt-polarity.pos", RT_POLARITY / "rt-polarity.neg"])


def build_bpe_tokenizer(
    folder: Path, vocab_size: int = 500, bos: bool = True, eos: bool = True, pad: bool = True
):
    """A byte-level BPE trained on rt-polarity, as a PreTrainedTokenizerFast saved in folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [token for token, wanted in [(BOS, bos), (EOS, eos), (PAD, pad)] if wanted]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(rt_sentences(), trainer)
    if bos:
        # Like Llama's tokenizer: BOS added to every text unless add_special_tokens=False.
        backend.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", special_tokens=[(BOS, backend.token_to_id(BOS))]
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS if bos else None,
        eos_token=EOS if eos else None,
        pad_token=PAD if pad else None,
    )
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


def build_tiny_llama(folder: Path, seed: int = 0) -> Path:
    """A random-initialised 2-layer Llama (32 wide, 64 positions) and its tokenizer, in folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_bpe_tokenizer(folder)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        initializer_range=INITIALIZER_RANGE,
        **special_ids(tokenizer),
    )
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
