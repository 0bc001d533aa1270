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

Runs where the fine-tune runs (resolved through the task's worker): transformers is imported here.
"""

from __future__ import annotations

import copy

from transformers import AutoTokenizer, DataCollatorForLanguageModeling

from runner.tasks.causal_lm import perplexity


def token_stream(tokenizer, documents: list[str]) -> list[int]:
    """Every document's tokens (no special tokens), each after the prefix token, end to end."""
    return perplexity.document_stream(tokenizer, documents, perplexity.prefix_token_id(tokenizer))


def cut_blocks(stream: list[int], block_tokens: int) -> list[list[int]]:
    """The stream in consecutive blocks of block_tokens tokens; a shorter tail is dropped."""
    whole = len(stream) // block_tokens * block_tokens
    return [stream[start : start + block_tokens] for start in range(0, whole, block_tokens)]


def block_tokens(config) -> int:
    """The length of a training block: the tokens a perplexity window reads."""
    return config.perplexity.context


def training_blocks(tokenizer, work) -> list[list[int]]:
    """work: the fine-tune's work item. Its documents as blocks; raises ValueError, saying why,
    when they do not fill one."""
    length = block_tokens(work.task_config)
    stream = token_stream(tokenizer, work.texts)
    blocks = cut_blocks(stream, length)
    if not blocks:
        raise ValueError(
            f"the {len(work.texts)} training documents hold {len(stream)} tokens with their "
            f"prefixes, fewer than one training block of {length} tokens (perplexity.context); "
            "allowed: training data of at least one block (more documents, or a shorter context)"
        )
    return blocks


def training_rows(tokenizer, work) -> list[dict]:
    return [{"input_ids": block} for block in training_blocks(tokenizer, work)]


def data_collator(tokenizer):
    """Blocks batched as they are, each its own labels. The collator pads (nothing, as every
    block is as long) and needs a pad token for it: a tokenizer without one gets its EOS, on a
    copy, as the saved tokenizer must stay as it was. Labels equal to the pad id are not trained:
    where the pad is also the prefix token (GPT-2's, Qwen's EOS) the prefix goes unpredicted,
    which perplexity never scores either."""
    if tokenizer.pad_token is None:
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.bos_token
    return DataCollatorForLanguageModeling(tokenizer, mlm=False)


def describe_training(work) -> str:
    """work: the fine-tune's work item. "9662 documents, 1234 blocks of 64 tokens" (its tokenizer
    is read from the base model's folder; tokenizing a few thousand documents takes well under a
    second)."""
    tokenizer = AutoTokenizer.from_pretrained(work.model_dir)
    blocks = cut_blocks(token_stream(tokenizer, work.texts), block_tokens(work.task_config))
    return (
        f"{len(work.texts)} documents, {len(blocks)} blocks of "
        f"{block_tokens(work.task_config)} tokens"
    )
