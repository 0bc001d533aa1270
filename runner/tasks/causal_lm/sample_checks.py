"""What a causal-LM job's tokenized sample must hold, checked at validation: enough tokens for one
generation prompt, and a fine-tune's training text for one block. The worker cuts both from the
documents' token stream (generation.prompt_token_ids, training.training_blocks) and refuses a
stream too short, but only after the cluster started and the variants before it were timed.

The documents are tokenized here with the `tokenizers` library from a local tokenizer.json (no
transformers, no torch). A hub tokenizer or one without a tokenizer.json is not read here: the
worker's own check stays the only one then.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from runner import model_checks
from runner.fields import SpecError


def check_sample_tokens(spec, job: Path, settings, examples, train) -> None:
    """generation.prompt_length against the evaluation sample's tokens, perplexity.context (a
    training block) against the fine-tune's; each document counts one prefix token before it,
    as the worker's stream does."""
    source, field = (spec.tokenizer, "tokenizer") if spec.tokenizer else (spec.model, "model")
    tokenizer = local_tokenizer(source, job, field)
    if tokenizer is None:
        return
    generation = settings.generation
    if generation is not None:
        tokens = stream_tokens(tokenizer, [e.text for e in examples])
        if tokens < generation.prompt_length:
            raise SpecError(
                job,
                "generation.prompt_length",
                generation.prompt_length,
                f"the {len(examples)} documents of the evaluation sample hold {tokens} tokens with "
                "their prefixes, too few for one prompt; allowed: a prompt_length of at most "
                f"{tokens}, or a larger dataset.sample",
            )
    if spec.finetune is not None and train:
        tokens, block = (
            stream_tokens(tokenizer, [e.text for e in train]),
            settings.perplexity.context,
        )
        if tokens < block:
            raise SpecError(
                job,
                "finetune.train" if spec.finetune.train else "finetune",
                f"{len(train)} training documents of {tokens} tokens with their prefixes",
                f"a training block is perplexity.context ({block}) tokens: allowed training text "
                "of at least one block (more documents, or a shorter perplexity.context)",
            )


def local_tokenizer(source, job: Path, field: str) -> Tokenizer | None:
    """The tokenizer.json of a local folder as a `tokenizers` Tokenizer; None where there is none
    to read here (the hub, a GGUF's own, a SentencePiece model alone)."""
    if source.gguf is not None:
        return None
    folder = model_checks.local_folder(source, job, field)
    if folder is None or not (folder / "tokenizer.json").is_file():
        return None
    try:
        return Tokenizer.from_file(str(folder / "tokenizer.json"))
    except Exception:  # a file the tokenizers library cannot read: loading it will say why
        return None


def stream_tokens(tokenizer: Tokenizer, texts: list[str]) -> int:
    """The tokens of the documents without special tokens, plus one prefix token each."""
    encoded = tokenizer.encode_batch(texts, add_special_tokens=False)
    return sum(len(e.ids) for e in encoded) + len(texts)
