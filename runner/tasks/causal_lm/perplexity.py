"""Perplexity in one of three conventions (CONVENTIONS; docs/causal-lm.md says which paper or tool
uses which): `rolling`, the way lm-evaluation-harness's `loglikelihood_rolling` scores each document
on its own (below); `chunks` and `llama.cpp`, which cut the documents joined into one stream
(stream_windows).

A document is tokenized without special tokens and a prefix token (the job's perplexity.prefix,
else the tokenizer's BOS, else its EOS) is put before it, so that its first token is predicted too.
It is cut into windows of at most `context` input tokens. The first window scores the first
min(context, n) tokens; every later window scores the next `stride` tokens (fewer at the end) and
reads the `context` tokens before its last one, so each token is scored exactly once. In lm-eval's
terms (`get_rolling_token_windows` and `make_disjoint_window`): max_seq_len = context and
context_len = context - stride + 1, the tokens the first scored token of a later window is
conditioned on. stride == context is lm-eval's own choice (context_len=1): windows that score
disjoint runs of tokens and overlap by one input token; a smaller stride gives every token of a
later window at least context - stride + 1 tokens of context, at the price of context / stride
forward passes per `context` tokens.

`chunks` (GPTQ-style papers' wikitext number): the stream cut into non-overlapping windows of
`context` tokens, each predicting the tokens one ahead of its own, so every token of the stream but
its first is scored once, from the tokens before it in its window. `llama.cpp` (its `perplexity`
tool): full windows of `context` tokens stepping by `context`, each window's first token replaced
by the prefix token (llama.cpp puts BOS there), and only its second half scored: the tokens at
positions context // 2 + 1 to context - 1, each from at least context // 2 tokens before it; a
last partial window is dropped. A window of the stream carries the document its first target is
in.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from runner.tasks.causal_lm.config import CONVENTIONS


@dataclass(frozen=True)
class Window:
    """One forward pass's worth of a document: the model reads `input_ids`; its predictions at the
    last len(targets) positions are scored against `targets`, the tokens that follow them."""

    document: int  # index of the document in the list it came from
    input_ids: list[int]  # at most `context` tokens
    targets: list[int]  # the tokens the last len(targets) positions predict

    @property
    def scored(self) -> int:
        return len(self.targets)


@dataclass
class WindowLoss:
    """What one window's scored positions said."""

    document: int
    nll: float  # summed negative log-likelihood of the targets, nats
    tokens: int  # how many targets were scored
    greedy_ids: list[int]  # the most probable next token at each scored position
    # Only when asked (see window_losses): [tokens, k] token ids and their log-probabilities,
    # normalised over the whole vocabulary, and [tokens] the log of the mass on every other token.
    top_ids: np.ndarray | None = None
    top_log_probs: np.ndarray | None = None
    rest_log_prob: np.ndarray | None = None
    # With them: [tokens] each target's log-probability, for the per-token KL statistics.
    target_log_probs: np.ndarray | None = None


# ---------------------------------------------------------------------------------------------
# Checks, for people: each names what it found and what is allowed.


def check_window_settings(context: int, stride: int) -> None:
    if not isinstance(context, int) or isinstance(context, bool) or context < 2:
        raise ValueError(
            f"context is {context!r}: a window must hold at least 2 tokens (with 1, every token "
            "would be predicted from the one before it alone); allowed: an integer of 2 or more"
        )
    if not isinstance(stride, int) or isinstance(stride, bool) or not 1 <= stride <= context:
        raise ValueError(
            f"stride is {stride!r}: allowed an integer from 1 to the context ({context}); "
            "stride == context scores disjoint windows, a smaller stride gives each scored token "
            "more context"
        )


def prefix_token_id(tokenizer, prefix: str | None = None) -> int:
    """The token put before each document so that its first token is scored: prefix (a token of
    the vocabulary, as it writes it: a job's perplexity.prefix), else BOS, else EOS."""
    if prefix is not None:
        return named_token_id(tokenizer, prefix)
    for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    raise ValueError(
        f"the tokenizer ({type(tokenizer).__name__}, {getattr(tokenizer, 'name_or_path', '')!r}) "
        "has neither a BOS nor an EOS token: nothing can stand before a document so that its "
        "first token is scored; allowed: a tokenizer with bos_token or eos_token set, or a "
        "token of it named in perplexity.prefix"
    )


def named_token_id(tokenizer, token: str) -> int:
    """The id of one token of the vocabulary (added tokens included), named as it writes it."""
    vocabulary = tokenizer.get_vocab()
    if token in vocabulary:
        return vocabulary[token]
    specials = ", ".join(tokenizer.all_special_tokens) or "(none)"
    raise ValueError(
        f"perplexity.prefix is {token!r}: the tokenizer ({type(tokenizer).__name__}, "
        f"{getattr(tokenizer, 'name_or_path', '')!r}) has no such token; allowed: one token "
        f"of its vocabulary, as the vocabulary writes it, e.g. its special tokens: {specials}"
    )


# ---------------------------------------------------------------------------------------------
# Windows.


def rolling_windows(
    token_ids: list[int], prefix_id: int, context: int, stride: int, document: int = 0
) -> list[Window]:
    """One document's windows; every token in token_ids is a target of exactly one of them."""
    check_window_settings(context, stride)
    if not token_ids:
        return []  # lm-eval too: an empty document scores nothing
    first = min(context, len(token_ids))
    windows = [Window(document, [prefix_id] + token_ids[: first - 1], token_ids[:first])]
    done = first
    while done < len(token_ids):
        end = min(done + stride, len(token_ids))
        # The `context` tokens before the last target: the first target reads
        # context - (end - done) + 1 >= context - stride + 1 of them.
        windows.append(
            Window(document, token_ids[end - context - 1 : end - 1], token_ids[done:end])
        )
        done = end
    return windows


def document_windows(
    tokenizer,
    documents: Sequence[str],
    context: int,
    stride: int,
    prefix: str | None = None,
    convention: str = "rolling",
) -> list[Window]:
    """Every document's windows in the convention (CONVENTIONS), in document order, each document
    after the prefix token (prefix_token_id); stride is the rolling convention's alone. Rolling
    windows hold about n * context / stride token ids in all for n document tokens: keep the
    stride near the context for long corpora."""
    check_window_settings(context, stride)
    if convention not in CONVENTIONS:
        raise ValueError(
            f"perplexity.convention is {convention!r}: allowed one of {', '.join(CONVENTIONS)}"
        )
    if len(documents) == 0:
        raise ValueError("no documents to score: the list is empty; allowed: one or more texts")
    prefix_id = prefix_token_id(tokenizer, prefix)
    # Without special tokens: the prefix token is the only one added, as in lm-eval.
    encoded = tokenizer(list(documents), add_special_tokens=False)["input_ids"]
    if convention == "rolling":
        windows = [
            window
            for index, token_ids in enumerate(encoded)
            for window in rolling_windows(token_ids, prefix_id, context, stride, index)
        ]
    else:
        windows = stream_windows(encoded, prefix_id, context, convention)
    if not windows:
        raise ValueError(
            f"none of the {len(documents)} documents has a token to score: they are all empty"
        )
    return windows


def stream_windows(
    encoded: list[list[int]], prefix_id: int, context: int, convention: str
) -> list[Window]:
    """The `chunks` or `llama.cpp` windows (see the module's docstring) of the documents' tokens
    joined, each document after the prefix token, as document_stream joins them."""
    stream = [token for token_ids in encoded for token in [prefix_id] + token_ids]
    # The document each position of the stream belongs to, for each window's `document`.
    owner = [index for index, token_ids in enumerate(encoded) for _ in range(len(token_ids) + 1)]
    if convention == "chunks":
        windows = []
        for start in range(0, len(stream) - 1, context):
            end = min(start + context, len(stream) - 1)  # the last window may be shorter
            windows.append(Window(owner[start + 1], stream[start:end], stream[start + 1 : end + 1]))
        return windows
    first = context // 2  # llama.cpp's n_ctx / 2: positions read, never scored
    if first + 1 >= context or len(stream) < context:
        raise ValueError(
            f"perplexity.convention llama.cpp scores the second half of full windows of "
            f"{context} tokens: the context must be 3 or more and the sample at least one window "
            f"long; found a context of {context} and {len(stream)} tokens (prefix tokens "
            "included); allowed: a smaller perplexity.context or a larger sample"
        )
    windows = []
    for start in range(0, len(stream) - context + 1, context):
        tokens = [prefix_id] + stream[start + 1 : start + context]
        windows.append(Window(owner[start + first + 1], tokens[:-1], tokens[first + 1 :]))
    return windows


def document_stream(tokenizer, documents: Sequence[str], separator: int | None) -> list[int]:
    """Every document's tokens (without special tokens), each after the separator token (none
    when it is None), joined end to end: what training blocks and generation prompts are cut
    from."""
    stream: list[int] = []
    for token_ids in tokenizer(list(documents), add_special_tokens=False)["input_ids"]:
        stream += ([] if separator is None else [separator]) + token_ids
    return stream


def document_bytes(documents: Sequence[str]) -> int:
    """The documents' UTF-8 bytes, bits_per_byte's denominator (lm-eval's count_bytes)."""
    return sum(len(text.encode("utf-8")) for text in documents)


# ---------------------------------------------------------------------------------------------
# The model's losses on the windows.


def window_losses(
    model,
    windows: Sequence[Window],
    device,
    batch_size: int,
    pad_id: int | None,
    top_k: int = 0,
    log_probs_at: Sequence[np.ndarray] | None = None,
) -> list[WindowLoss]:
    """Each window's summed NLL of its targets, their count and the greedy next tokens.

    Nothing vocabulary-sized is kept unless asked, because [tokens, vocab] log-probabilities of a
    corpus run to gigabytes (100k tokens x 128k vocab x 4 bytes = 51 GB). For a KL between two
    variants, ask the reference for its top_k most probable tokens per position (top_ids and their
    log-probabilities, [tokens, k]); then ask the variant for its log-probabilities at those same
    ids by passing the reference's top_ids, window by window, as log_probs_at. kl_divergence
    compares the two. model: a causal LM in eval mode on `device`; its logits are
    [batch_size, context, vocab] per forward pass. pad_id: any id (pads are masked and follow the
    real tokens); None, for a tokenizer without one, pads with 0.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size is {batch_size!r}: allowed an integer of 1 or more")
    if top_k and log_probs_at is not None:
        raise ValueError("ask for top_k or for log_probs_at, not both")
    if log_probs_at is not None and len(log_probs_at) != len(windows):
        raise ValueError(f"log_probs_at has {len(log_probs_at)} entries for {len(windows)} windows")
    losses = []
    with torch.inference_mode():
        for start in range(0, len(windows), batch_size):
            batch = windows[start : start + batch_size]
            at = None if log_probs_at is None else log_probs_at[start : start + batch_size]
            losses += batch_losses(model, batch, device, pad_id or 0, top_k, at)
    return losses


def window_inputs(windows: Sequence[Window], pad_id: int, device) -> dict:
    """The windows' input_ids and attention_mask, right-padded to the longest, on device."""
    longest = max(len(window.input_ids) for window in windows)
    input_ids = torch.full((len(windows), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(windows), longest), dtype=torch.long)
    for row, window in enumerate(windows):
        # Right padding: a causal model's real positions never see the pads after them.
        input_ids[row, : len(window.input_ids)] = torch.tensor(window.input_ids)
        attention_mask[row, : len(window.input_ids)] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}


def batch_losses(model, batch, device, pad_id: int, top_k: int, at) -> list[WindowLoss]:
    logits = model(**window_inputs(batch, pad_id, device), use_cache=False).logits
    return [
        score_window(logits[row], window, top_k, None if at is None else at[row])
        for row, window in enumerate(batch)
    ]


def score_window(logits, window: Window, top_k: int, ids_at: np.ndarray | None) -> WindowLoss:
    """logits: [padded length, vocab] for one window."""
    length = len(window.input_ids)
    # Only the scored positions go to float32: the log-softmax is [scored, vocab], not more.
    log_probs = logits[length - window.scored : length].float().log_softmax(dim=-1)
    targets = torch.tensor(window.targets, device=log_probs.device)
    target_log_probs = log_probs.gather(-1, targets[:, None])[:, 0]
    loss = WindowLoss(
        document=window.document,
        nll=-float(target_log_probs.double().sum()),  # float64 from here on
        tokens=window.scored,
        greedy_ids=log_probs.argmax(dim=-1).tolist(),
    )
    if top_k:
        ids = log_probs.topk(min(top_k, log_probs.shape[-1]), dim=-1).indices
    elif ids_at is not None:
        ids = torch.as_tensor(ids_at, dtype=torch.long, device=log_probs.device)
    else:
        return loss
    loss.top_ids = ids.cpu().numpy()
    loss.top_log_probs = log_probs.gather(-1, ids).cpu().numpy()
    # The rest's mass summed from its own tokens, not 1 - sum(top): no cancellation, and exactly
    # 0 (log -inf) when the ids cover the vocabulary.
    rest = log_probs.scatter(-1, ids, float("-inf")).logsumexp(dim=-1)
    loss.rest_log_prob = rest.cpu().numpy()
    loss.target_log_probs = target_log_probs.cpu().numpy()
    return loss


# ---------------------------------------------------------------------------------------------
# Metrics over all documents: token-weighted, never a mean of per-document means.


def scored_tokens(losses: Sequence[WindowLoss]) -> int:
    tokens = sum(loss.tokens for loss in losses)
    if tokens == 0:
        raise ValueError("no scored tokens: the losses are empty")
    return tokens


def mean_nll(losses: Sequence[WindowLoss]) -> float:
    """Nats per token over all documents."""
    return math.fsum(loss.nll for loss in losses) / scored_tokens(losses)


# The largest mean NLL whose exp is a float (ln of the largest double, about 709.78 nats).
MAX_EXP_NLL = math.log(sys.float_info.max)


def perplexity(losses: Sequence[WindowLoss]) -> float | None:
    """exp(sum nll / sum tokens): token-level, so it depends on the tokenizer. None beyond a
    float's range (beyond_float_range says why): the mean NLL and bits per byte still measure it."""
    nll = mean_nll(losses)
    return math.exp(nll) if nll <= MAX_EXP_NLL else None


def beyond_float_range(losses: Sequence[WindowLoss]) -> list[str]:
    """The warning a perplexity of None carries; none for one that is a float."""
    nll = mean_nll(losses)
    if nll <= MAX_EXP_NLL:
        return []
    return [
        f"perplexity is beyond a float's range: the mean NLL is {nll:.1f} nats/token and exp of "
        f"more than {MAX_EXP_NLL:.2f} overflows; the mean NLL and bits per byte measure it"
    ]


def bits_per_byte(losses: Sequence[WindowLoss], n_bytes: int) -> float:
    """sum nll / (ln 2 * UTF-8 bytes of the documents): comparable across tokenizers."""
    if n_bytes <= 0:
        raise ValueError(f"n_bytes is {n_bytes}: allowed the documents' UTF-8 bytes, 1 or more")
    scored_tokens(losses)
    return math.fsum(loss.nll for loss in losses) / (math.log(2) * n_bytes)


def kl_divergence(reference: Sequence[WindowLoss], variant: Sequence[WindowLoss]) -> float:
    """Mean KL(reference || variant) per scored token, nats, over the reference's top-k tokens
    plus one bin for the rest of the vocabulary: a lower bound of the full KL (merging tokens
    never raises it), the full KL when k is the vocabulary's size."""
    total = math.fsum(window_kl(ref, var) for ref, var in zip(reference, variant, strict=True))
    return total / scored_tokens(reference)


def window_kl(ref: WindowLoss, var: WindowLoss) -> float:
    """KL(reference || variant) summed over one window's scored tokens, nats, binned as
    kl_divergence says."""
    if ref.top_ids is None or var.top_ids is None or not np.array_equal(ref.top_ids, var.top_ids):
        raise ValueError(
            "kl_divergence needs the reference's top_ids and the variant's log-probabilities "
            "at the same ids (window_losses with top_k, then with log_probs_at)"
        )
    p_log = np.concatenate([ref.top_log_probs, ref.rest_log_prob[:, None]], axis=-1)
    q_log = np.concatenate([var.top_log_probs, var.rest_log_prob[:, None]], axis=-1)
    return binned_kl(p_log.astype(np.float64), q_log.astype(np.float64))


def binned_kl(p_log: np.ndarray, q_log: np.ndarray) -> float:
    """sum p (log p - log q) over every entry of two arrays of log-probabilities; 0 log 0 = 0.
    A KL is never negative: the few 1e-9 below 0 that float32 normalisation leaves when the two
    distributions are nearly equal read as 0."""
    p = np.exp(p_log)
    with np.errstate(invalid="ignore"):
        terms = np.where(p > 0, p * (p_log - q_log), 0.0)
    return max(0.0, float(terms.sum()))
