"""Training a causal LM: the fine-tune stage's functions for `task: causal-lm`.

What is trained is the whole model, every weight, at next-token prediction: a hub or folder model
goes on from its weights, an inline `model: config:` (random weights) is trained from scratch.

What it reads: the training documents (the dataset minus the evaluation sample, or
`finetune.train`), each tokenized without special tokens and put after the prefix token, the
tokenizer's BOS, else its EOS, as perplexity and generation's prompts read a document
(runner/tasks/perplexity.py). The documents are joined end to end into one stream of tokens,
`[prefix] doc0 [prefix] doc1 ...`, cut into blocks of `perplexity.context` tokens, the length a
perplexity window reads; the tail shorter than a block is dropped (as transformers' run_clm example
does). A block may hold the end of one document and the start of the next: the prefix between
them says where a document starts. DataCollatorForLanguageModeling (mlm=False) makes each block's
labels its own tokens, shifted by one inside the model: a block of C tokens trains C - 1
predictions. The fine-tuned model is cached by finetune.py like a classification model; the block
length is part of its key.

torch and transformers are imported inside the functions: the driver imports this module without
them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from runner.tasks import perplexity


def token_stream(tokenizer, documents: list[str]) -> list[int]:
    """Every document's tokens (no special tokens), each after the prefix token, end to end."""
    return perplexity.document_stream(tokenizer, documents, perplexity.prefix_token_id(tokenizer))


def cut_blocks(stream: list[int], block_tokens: int) -> list[list[int]]:
    """The stream in consecutive blocks of block_tokens tokens; a shorter tail is dropped."""
    whole = len(stream) // block_tokens * block_tokens
    return [stream[start : start + block_tokens] for start in range(0, whole, block_tokens)]


def block_tokens(task_settings) -> int:
    """The length of a training block: the tokens a perplexity window reads."""
    return task_settings.perplexity.context


def training_blocks(tokenizer, task) -> list[list[int]]:
    """task: the FinetuneTask. Its documents as blocks; raises ValueError, saying why, when they
    do not fill one."""
    length = block_tokens(task.task_settings)
    stream = token_stream(tokenizer, task.texts)
    blocks = cut_blocks(stream, length)
    if not blocks:
        raise ValueError(
            f"the {len(task.texts)} training documents hold {len(stream)} tokens with their "
            f"prefixes, fewer than one training block of {length} tokens (perplexity.context); "
            "allowed: training data of at least one block (more documents, or a shorter context)"
        )
    return blocks


def training_rows(tokenizer, task) -> list[dict]:
    return [{"input_ids": block} for block in training_blocks(tokenizer, task)]


def data_collator(tokenizer):
    """Blocks batched as they are, each its own labels. The collator pads (nothing, as every
    block is as long) and needs a pad token for it: a tokenizer without one gets its EOS, on a
    copy, as the saved tokenizer must stay as it was. Labels equal to the pad id are not trained:
    where the pad is also the prefix token (GPT-2's, Qwen's EOS) the prefix goes unpredicted,
    which perplexity never scores either."""
    import copy

    from transformers import DataCollatorForLanguageModeling

    if tokenizer.pad_token is None:
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.bos_token
    return DataCollatorForLanguageModeling(tokenizer, mlm=False)


def finetune_model(base_dir: str, label_names: list[str]):
    """The prepared model as it is, in FP32: a causal LM has no head to add (label_names is
    empty)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)


def describe_training(task) -> str:
    """task: the FinetuneTask. "9662 documents, 1234 blocks of 64 tokens" (its tokenizer is read
    from the base model's folder; tokenizing a few thousand documents takes well under a second)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(task.base_dir)
    blocks = cut_blocks(token_stream(tokenizer, task.texts), block_tokens(task.task_settings))
    return (
        f"{len(task.texts)} documents, {len(blocks)} blocks of "
        f"{block_tokens(task.task_settings)} tokens"
    )


def chance_loss(task) -> tuple[float, str]:
    """A uniform guess over the vocabulary: ln of its size (the model's config.json)."""
    config = json.loads((Path(task.base_dir) / "config.json").read_text(encoding="utf-8"))
    size = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    if not isinstance(size, int) or size < 2:
        return 0.0, "ln 1"
    return math.log(size), f"ln {size} (the vocabulary)"


def training_settings(task_settings) -> dict:
    """What of the task's settings the training depends on: the block length (the stride, the KL
    and generation settings change no weight)."""
    return {"block_tokens": block_tokens(task_settings)}
