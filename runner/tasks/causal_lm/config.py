"""A causal-LM job's own fields, `perplexity:`, `generation:` and `benchmarks:`, read and checked
as the job is read, then resolved against the model's config as it is planned; and the checks a
job's tokenizer must pass. Torch-free: the spec and `quantbench validate` read them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from runner import model_checks
from runner.fields import SpecError
from runner.job import ModelSource
from runner.tasks.causal_lm.benchmarks import BenchmarkSettings, read_benchmarks

# The context a job gets when it names none: the model's position table, at most this (as
# lm-evaluation-harness's default max_length).
DEFAULT_MAX_CONTEXT = 2048


@dataclass(frozen=True)
class GenerationSettings:
    prompt_length: int  # tokens per prompt, no padding
    new_tokens: int  # tokens generated per sequence, the first one from the prefill
    batch_sizes: tuple[int, ...]  # timed one after the other, in this order
    warmup_runs: int = 2  # untimed whole generations per batch size before the timed ones
    timed_runs: int = 10  # timed whole generations per batch size
    seed: int = 0  # chooses the prompts

    def check(self, max_positions: int | None = None) -> None:
        """max_positions: the model's position table (model_max_positions), None if it has none."""
        check_count("prompt_length", self.prompt_length, 1)
        check_count("new_tokens", self.new_tokens, 1)
        check_count("warmup_runs", self.warmup_runs, 0)
        check_count("timed_runs", self.timed_runs, 1)
        check_count("seed", self.seed, 0)
        if not isinstance(self.batch_sizes, tuple | list) or not self.batch_sizes:
            raise ValueError(
                f"batch_sizes is {self.batch_sizes!r}: allowed a non-empty list of integers of 1 "
                "or more"
            )
        for batch_size in self.batch_sizes:
            check_count("a batch size", batch_size, 1)
        if len(set(self.batch_sizes)) != len(self.batch_sizes):
            raise ValueError(
                f"batch_sizes is {list(self.batch_sizes)!r}: a batch size is listed twice; "
                "allowed: each batch size once"
            )
        total = self.prompt_length + self.new_tokens
        if max_positions is not None and total > max_positions:
            raise ValueError(
                f"prompt_length + new_tokens is {self.prompt_length} + {self.new_tokens} = "
                f"{total}: the model takes at most {max_positions} tokens (max_position_embeddings "
                f"in its config); allowed: a sum of at most {max_positions}"
            )


def check_count(name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} is {value!r}: allowed an integer of {minimum} or more")


@dataclass(frozen=True)
class PerplexitySettings:
    context: int | None = None  # tokens a window reads; None: the model's, at most 2048
    stride: int | None = None  # tokens each later window scores; None: the context
    kl_top_k: int = 32  # FP32's most probable tokens the KL keeps apart; 0: no KL
    # The token put before each document so that its first token is scored, as the vocabulary
    # writes it; None: the tokenizer's BOS, else its EOS (resolved by the plan or the worker).
    prefix: str | None = None
    # Which tokens are scored from which context: one of CONVENTIONS (docs/causal-lm.md).
    convention: str = "rolling"


# perplexity.convention's values, the default first (perplexity.py cuts the windows of each).
CONVENTIONS = ("rolling", "chunks", "llama.cpp")


@dataclass(frozen=True)
class CausalLMSettings:
    perplexity: PerplexitySettings
    generation: GenerationSettings | None  # None: `generation: false`, no generation timing
    benchmarks: BenchmarkSettings | None = None  # None: no lm-eval task (benchmarks.py)


GENERATION_DEFAULTS = GenerationSettings(prompt_length=32, new_tokens=32, batch_sizes=(1,))


def read_settings(top) -> CausalLMSettings:
    """`perplexity:`, `generation:` and `benchmarks:` from the job's top-level _Reader, each
    checked as read."""
    reader = top.sub("perplexity")
    found = {} if reader is None else reader.data
    if reader is not None:
        reader.check_keys(("context", "stride", "kl_top_k", "prefix", "convention"))
        reader.positive_int("context", None, minimum=2)
        reader.positive_int("stride", None)
        reader.positive_int("kl_top_k", 32, minimum=0)
        read_prefix(reader)
        read_convention(reader)
    window = PerplexitySettings(**found)
    if window.context is not None and window.stride is not None and window.stride > window.context:
        allowed = f"at most the context ({window.context}): 1 to {window.context}"
        raise reader.error("stride", window.stride, allowed)
    return CausalLMSettings(window, read_generation(top), read_benchmarks(top))


def read_convention(reader) -> None:
    """One of CONVENTIONS; a stride only with `rolling`: the others step by the context."""
    convention = reader.get("convention", str, "rolling")
    if convention not in CONVENTIONS:
        raise reader.error(
            "convention",
            convention,
            "one of rolling (lm-eval's rolling windows per document, the default), chunks "
            "(GPTQ-style papers: the documents joined, cut into windows of the context, every "
            "token scored) or llama.cpp (its perplexity tool: the second half of each window "
            "scored)",
        )
    if convention != "rolling" and reader.data.get("stride") is not None:
        raise reader.error(
            "stride",
            reader.data["stride"],
            f"no stride with convention {convention}: its windows step by the context; leave "
            "stride out, or use convention rolling",
        )


def read_prefix(reader) -> None:
    """A named prefix is one token, as a string; null (no prefix) is refused: the document's first
    token would go unscored, and bits_per_byte would still count its bytes."""
    if "prefix" not in reader.data:
        return
    prefix = reader.data["prefix"]
    if prefix is None or (isinstance(prefix, str) and not prefix):
        raise reader.error(
            "prefix",
            prefix,
            'a token of the tokenizer, as its vocabulary writes it (e.g. "<|endoftext|>"), or '
            "the field left out for the tokenizer's BOS, else its EOS; null (no prefix) is "
            "refused: every document's first token is scored",
        )
    reader.get("prefix", str)


def read_generation(top) -> GenerationSettings | None:
    if top.data.get("generation") is False:
        return None
    reader = top.sub("generation")
    if reader is None:
        return GENERATION_DEFAULTS
    keys = ("prompt_length", "new_tokens", "batch_sizes", "warmup_runs", "timed_runs", "seed")
    reader.check_keys(keys)
    values = {}
    for key, minimum in zip(keys, (1, 1, None, 0, 1, 0)):
        if minimum is not None:
            values[key] = reader.positive_int(key, getattr(GENERATION_DEFAULTS, key), minimum)
    sizes = reader.get("batch_sizes", list, list(GENERATION_DEFAULTS.batch_sizes))
    if (
        not sizes
        or len(set(map(repr, sizes))) != len(sizes)
        or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in sizes)
    ):
        raise reader.error("batch_sizes", sizes, "a list of distinct integers of 1 or more")
    return GenerationSettings(**values, batch_sizes=tuple(sizes))


def model_positions(config: dict) -> int | None:
    """The model's position table (GPT-2 calls it n_positions); None without one."""
    for key in ("max_position_embeddings", "n_positions"):
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def resolved(
    settings: CausalLMSettings, config: dict, shown: Path, prefix: str | None = None
) -> CausalLMSettings:
    """The settings with the context and stride filled in, checked against the model; prefix: the
    one check_prefix_token resolved (None: the worker resolves it)."""
    positions = model_positions(config)
    window = settings.perplexity
    context = window.context or min(positions or DEFAULT_MAX_CONTEXT, DEFAULT_MAX_CONTEXT)
    allowed = f"the model takes at most {positions} tokens (its position table)"
    if positions is not None and context > positions:
        raise SpecError(shown, "perplexity.context", context, f"{allowed}: 2 to {positions}")
    if window.convention == "llama.cpp" and context < 3:
        allowed = "3 or more with convention llama.cpp: a window of 2 has no second half to score"
        raise SpecError(shown, "perplexity.context", context, allowed)
    stride = window.stride or context
    if stride > context:
        raise SpecError(shown, "perplexity.stride", stride, f"at most the context ({context})")
    generation = settings.generation
    if generation is not None and positions is not None:
        total = generation.prompt_length + generation.new_tokens
        if total > positions:
            raise SpecError(
                shown,
                "generation.new_tokens",
                generation.new_tokens,
                f"prompt_length + new_tokens is {total}: {allowed}",
            )
    perplexity = PerplexitySettings(
        context, stride, window.kl_top_k, prefix or window.prefix, window.convention
    )
    return CausalLMSettings(perplexity, generation, settings.benchmarks)


def check_prefix_token(
    source: ModelSource, job: Path, field: str, prefix: str | None
) -> str | None:
    """The token perplexity puts before each document so that its first token is scored: the
    job's perplexity.prefix, else the tokenizer's BOS, else its EOS. A local tokenizer must have
    it as one token of its vocabulary. None where the tokenizer's files are not read here (the
    hub): the worker resolves and checks it as it loads the tokenizer."""
    files = model_checks.tokenizer_json_files(source, job, field)
    if not files:
        return prefix
    if prefix is None:
        found = [model_checks.special_token(files, t) for t in ("bos_token", "eos_token")]
        prefix = next((token for token in found if token), None)
        if prefix is None:
            raise SpecError(
                job,
                field,
                source.describe(),
                "the tokenizer has neither a BOS nor an EOS token (bos_token, eos_token in "
                "tokenizer_config.json): perplexity puts one before each document so that its "
                "first token is scored; name one of its tokens in perplexity.prefix, or a "
                "tokenizer that has one",
            )
        return prefix
    tokens = vocabulary_tokens(files.get("tokenizer.json"))
    if tokens is not None and prefix not in tokens:
        raise SpecError(
            job,
            "perplexity.prefix",
            prefix,
            f"the tokenizer of {source.describe()} has no such token; allowed: one token of its "
            f"vocabulary, as the vocabulary writes it, e.g. its special tokens: "
            f"{', '.join(special_tokens(files.get('tokenizer.json')))}",
        )
    return prefix


def vocabulary_tokens(tokenizer) -> set[str] | None:
    """Every token string of a tokenizer.json (its model's vocabulary and its added tokens); None
    where the file is not there or not of a shape read here."""
    if not isinstance(tokenizer, dict) or not isinstance(tokenizer.get("model"), dict):
        return None
    vocab = tokenizer["model"].get("vocab")
    if isinstance(vocab, dict):  # BPE, WordPiece, WordLevel: token -> id
        tokens = set(vocab)
    elif isinstance(vocab, list):  # Unigram: [token, score] pairs
        tokens = {entry[0] for entry in vocab if isinstance(entry, list) and entry}
    else:
        return None
    added = tokenizer.get("added_tokens") or []
    return tokens | {t.get("content") for t in added if isinstance(t, dict)}


def special_tokens(tokenizer) -> list[str]:
    """A tokenizer.json's special added tokens, in id order, at most 12 of them."""
    added = (tokenizer.get("added_tokens") if isinstance(tokenizer, dict) else None) or []
    tokens = [t["content"] for t in added if isinstance(t, dict) and t.get("special")]
    if not tokens:
        return ["(none)"]
    return tokens[:12] + (["..."] if len(tokens) > 12 else [])


def check_vocabulary_fits(config: dict, source: ModelSource, job: Path, field: str) -> None:
    """Every id the tokenizer gives must be a row of the model's embeddings."""
    vocab = config.get("vocab_size")
    if not isinstance(vocab, int):
        return
    size = model_checks.tokenizer_size(source, job, field)
    if size is not None and size > vocab:
        raise SpecError(
            job,
            "model.config.vocab_size" if config.get("architectures") is None else field,
            vocab,
            f"the tokenizer gives ids up to {size - 1}: the model's vocab_size must be at least "
            f"{size}",
        )
