"""Perplexity by rolling windows (runner/tasks/causal_lm/perplexity.py) against hand computations
on tiny random GPT-2 and Llama models: each token's log-probability is computed on its own, from
exactly the context the convention gives it, and the windows must add up to the same."""

from __future__ import annotations

import math

import numpy as np
import pytest
from lm_models import (
    build_bpe_tokenizer,
    build_tiny_gpt2,
    build_tiny_llama,
    load,
    next_token_log_probs,
    nll_token_by_token,
    rt_sentences,
)

from runner.tasks.causal_lm import perplexity as ppl

CONTEXT = 16
REL = 1e-5  # float32 logits, summed in float64


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def lm(request, tmp_path_factory):
    """(model, tokenizer) of a tiny random causal LM."""
    build = {"gpt2": build_tiny_gpt2, "llama": build_tiny_llama}[request.param]
    return load(build(tmp_path_factory.mktemp(request.param)))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """The tests' tokenizer, for those that need no model."""
    return build_bpe_tokenizer(tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return load(build_tiny_gpt2(tmp_path_factory.mktemp("gpt2-kl")))


def long_document(tokenizer, tokens: int) -> str:
    """rt-polarity sentences joined until the text is at least `tokens` tokens long."""
    text = ""
    for sentence in rt_sentences():
        text = f"{text} {sentence}" if text else sentence
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) >= tokens:
            return text
    raise AssertionError("the corpus is too short")


# ---------------------------------------------------------------------------------------------
# The windows.


def test_windows_are_lm_evals_rolling_windows():
    """Worked by hand from lm-eval's get_rolling_token_windows + make_disjoint_window with
    max_seq_len=3 and context_len = 3 - stride + 1 (input, then targets)."""
    tokens = [10, 11, 12, 13, 14, 15, 16]
    expected = {
        3: [([0, 10, 11], [10, 11, 12]), ([12, 13, 14], [13, 14, 15]), ([13, 14, 15], [16])],
        2: [([0, 10, 11], [10, 11, 12]), ([11, 12, 13], [13, 14]), ([13, 14, 15], [15, 16])],
        1: [([0, 10, 11], [10, 11, 12])]
        + [(tokens[i - 3 : i], [tokens[i]]) for i in range(3, len(tokens))],
    }
    for stride, pairs in expected.items():
        windows = ppl.rolling_windows(tokens, 0, context=3, stride=stride, document=4)
        assert [(w.input_ids, w.targets) for w in windows] == pairs, stride
        assert {w.document for w in windows} == {4}
    # The example in lm-eval's LM.loglikelihood_rolling docstring: tokens 0-9, max length 4.
    windows = ppl.rolling_windows(list(range(10)), -1, context=4, stride=4)
    assert [(w.input_ids, w.targets) for w in windows] == [
        ([-1, 0, 1, 2], [0, 1, 2, 3]),
        ([3, 4, 5, 6], [4, 5, 6, 7]),
        ([5, 6, 7, 8], [8, 9]),
    ]


@pytest.mark.parametrize("stride", [1, 3, 7, 8])
def test_every_token_is_scored_exactly_once(stride, tokenizer):
    documents = rt_sentences()[:40] + [long_document(tokenizer, 5 * 8 + 3), "a", ""]
    windows = ppl.document_windows(tokenizer, documents, context=8, stride=stride)
    encoded = tokenizer(documents, add_special_tokens=False)["input_ids"]
    for index, token_ids in enumerate(encoded):
        own = [w for w in windows if w.document == index]
        assert [t for w in own for t in w.targets] == token_ids  # in order, once each
        if own:
            assert own[0].input_ids[0] == tokenizer.bos_token_id
            assert all(w.input_ids[0] != tokenizer.bos_token_id for w in own[1:])
        for window in own:
            assert 1 <= window.scored <= len(window.input_ids) <= 8
            # A window's targets are its inputs shifted by one: each predicts the next token.
            assert (
                window.input_ids[len(window.input_ids) - window.scored + 1 :]
                == (window.targets[:-1])
            )
    assert sum(w.scored for w in windows) == sum(map(len, encoded)) + 0  # the prefix: unscored


def test_documents_are_tokenized_without_special_tokens(tokenizer):
    """The tokenizer adds BOS itself (as Llama's does); the windows must not score it."""
    text = rt_sentences()[0]
    assert tokenizer(text)["input_ids"][0] == tokenizer.bos_token_id  # the tokenizer would add it
    (window,) = ppl.document_windows(tokenizer, [text[:20]], context=64, stride=64)
    assert window.input_ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.bos_token_id not in window.targets


def test_document_shorter_than_one_window(tokenizer):
    token_ids = tokenizer("bad", add_special_tokens=False)["input_ids"]
    (window,) = ppl.document_windows(tokenizer, ["bad"], context=CONTEXT, stride=4)
    assert window.input_ids == [tokenizer.bos_token_id] + token_ids[:-1]
    assert window.targets == token_ids
    assert ppl.rolling_windows([], 0, CONTEXT, 4) == []


# ---------------------------------------------------------------------------------------------
# The losses, by hand.


def test_one_window_is_the_full_sequence_by_hand(lm):
    model, tokenizer = lm
    text = long_document(tokenizer, 20)
    token_ids = tokenizer(text, add_special_tokens=False)["input_ids"][:CONTEXT]
    text = tokenizer.decode(token_ids)
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == token_ids
    sequence = [tokenizer.bos_token_id] + token_ids
    log_probs = next_token_log_probs(model, sequence)[:-1]  # position p predicts sequence[p + 1]
    hand_nll = -float(log_probs[range(len(token_ids)), token_ids].sum())
    windows = ppl.document_windows(tokenizer, [text], context=CONTEXT, stride=CONTEXT)
    (loss,) = ppl.window_losses(model, windows, "cpu", 4, tokenizer.pad_token_id)
    assert loss.tokens == len(token_ids) == CONTEXT
    assert loss.nll == pytest.approx(hand_nll, rel=REL)
    assert loss.greedy_ids == log_probs.argmax(dim=-1).tolist()
    assert ppl.perplexity([loss]) == pytest.approx(math.exp(hand_nll / CONTEXT), rel=REL)


@pytest.mark.parametrize("stride", [CONTEXT, 5, 1])
def test_document_longer_than_the_context_token_by_token(lm, stride):
    model, tokenizer = lm
    text = long_document(tokenizer, 3 * CONTEXT + 5)
    token_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    prefix = tokenizer.bos_token_id
    hand = nll_token_by_token(model, token_ids, prefix, CONTEXT, stride)
    windows = ppl.document_windows(tokenizer, [text], context=CONTEXT, stride=stride)
    losses = ppl.window_losses(model, windows, "cpu", 4, tokenizer.pad_token_id)
    done = 0
    for loss in losses:
        assert loss.nll == pytest.approx(math.fsum(hand[done : done + loss.tokens]), rel=REL)
        done += loss.tokens
    assert done == len(token_ids)
    assert ppl.mean_nll(losses) == pytest.approx(math.fsum(hand) / len(hand), rel=REL)


def test_a_smaller_stride_gives_every_token_more_context(lm):
    model, tokenizer = lm
    text = long_document(tokenizer, 4 * CONTEXT)
    for stride in [CONTEXT, 5, 1]:
        windows = ppl.document_windows(tokenizer, [text], context=CONTEXT, stride=stride)
        for window in windows[1:]:
            # The first target of a later window reads the tokens before it in the window.
            assert len(window.input_ids) - window.scored + 1 >= CONTEXT - stride + 1
    disjoint, strided = (
        ppl.mean_nll(
            ppl.window_losses(
                model,
                ppl.document_windows(tokenizer, [text], context=CONTEXT, stride=stride),
                "cpu",
                8,
                tokenizer.pad_token_id,
            )
        )
        for stride in [CONTEXT, 4]
    )
    assert abs(disjoint - strided) > 1e-3, "the stride changed nothing: is it used?"


def test_padding_does_not_change_the_losses(lm):
    model, tokenizer = lm
    # Sentences cut to 1-9 words, and one long document: windows of many lengths.
    short = [" ".join(text.split()[:words]) for words, text in enumerate(rt_sentences()[:9], 1)]
    documents = short + [long_document(tokenizer, 2 * CONTEXT + 3)]
    windows = ppl.document_windows(tokenizer, documents, context=CONTEXT, stride=6)
    assert len({len(w.input_ids) for w in windows}) > 3  # batches of 4 are padded
    alone = ppl.window_losses(model, windows, "cpu", 1, tokenizer.pad_token_id)
    padded = ppl.window_losses(model, windows, "cpu", 4, tokenizer.pad_token_id)
    for one, four in zip(alone, padded, strict=True):
        assert (one.document, one.tokens) == (four.document, four.tokens)
        assert four.nll == pytest.approx(one.nll, rel=REL)
        assert four.greedy_ids == one.greedy_ids


def test_bits_per_byte_and_perplexity_by_hand(lm):
    model, tokenizer = lm
    documents = ["a fine film , naïve but warm", "café au lait — très bien", "dull ."]
    assert [len(d.encode("utf-8")) for d in documents] == [29, 28, 6]  # é ï: 2 bytes, —: 3
    hand_nll, hand_tokens = 0.0, 0
    for text in documents:
        token_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        log_probs = next_token_log_probs(model, [tokenizer.bos_token_id] + token_ids)[:-1]
        hand_nll -= float(log_probs[range(len(token_ids)), token_ids].sum())
        hand_tokens += len(token_ids)
    windows = ppl.document_windows(tokenizer, documents, context=64, stride=64)
    assert len(windows) == len(documents)  # one window each, as by hand
    losses = ppl.window_losses(model, windows, "cpu", 2, tokenizer.pad_token_id)
    assert ppl.document_bytes(documents) == 63
    assert ppl.bits_per_byte(losses, 63) == pytest.approx(hand_nll / (math.log(2) * 63), rel=REL)
    # Token-weighted over all documents, not a mean of the documents' perplexities.
    assert ppl.perplexity(losses) == pytest.approx(math.exp(hand_nll / hand_tokens), rel=REL)


# ---------------------------------------------------------------------------------------------
# The KL between two variants, from the reference's top-k.


def test_kl_over_the_whole_vocabulary_is_the_full_kl(gpt2):
    import copy

    import torch

    model, tokenizer = gpt2
    variant = copy.deepcopy(model)
    with torch.no_grad():
        variant.lm_head.weight.mul_(1.5)  # tied to the embeddings: the whole model changes
    windows = ppl.document_windows(tokenizer, rt_sentences()[:6], context=CONTEXT, stride=8)
    vocab = model.config.vocab_size
    hand = []
    for window in windows:
        p = next_token_log_probs(model, window.input_ids)[-window.scored :]
        q = next_token_log_probs(variant, window.input_ids)[-window.scored :]
        hand += (p.exp() * (p - q)).sum(dim=-1).tolist()

    def kl(k):
        reference = ppl.window_losses(model, windows, "cpu", 4, tokenizer.pad_token_id, top_k=k)
        at = [loss.top_ids for loss in reference]
        other = ppl.window_losses(
            variant, windows, "cpu", 4, tokenizer.pad_token_id, log_probs_at=at
        )
        if k == vocab:  # no rest: its mass is exactly 0, not 1 - (a sum close to 1)
            assert all(np.isneginf(loss.rest_log_prob).all() for loss in reference + other)
        return ppl.kl_divergence(reference, other), ppl.kl_divergence(reference, reference)

    full, itself = kl(vocab)
    assert itself == 0.0
    assert full == pytest.approx(float(np.mean(hand)), rel=1e-4)
    top5, _ = kl(5)
    assert 0 < top5 <= full  # a lower bound: the rest of the vocabulary is one bin


# ---------------------------------------------------------------------------------------------
# Errors for people.


@pytest.mark.parametrize(
    "context, stride, words",
    [
        (1, 1, "context is 1"),
        (0, 1, "context is 0"),
        (8, 0, "stride is 0: allowed an integer from 1 to the context (8)"),
        (8, 9, "stride is 9: allowed an integer from 1 to the context (8)"),
        (8, 2.5, "stride is 2.5"),
    ],
)
def test_window_settings_are_checked(context, stride, words, tokenizer):
    with pytest.raises(ValueError, match="allowed") as raised:
        ppl.document_windows(tokenizer, ["a film"], context=context, stride=stride)
    assert words in str(raised.value)


def test_an_empty_document_list_is_refused(tokenizer):
    with pytest.raises(ValueError, match="no documents to score: the list is empty"):
        ppl.document_windows(tokenizer, [], context=8, stride=8)
    with pytest.raises(ValueError, match="none of the 2 documents has a token"):
        ppl.document_windows(tokenizer, ["", ""], context=8, stride=8)
    with pytest.raises(ValueError, match="no scored tokens"):
        ppl.perplexity([])


def test_the_prefix_is_bos_else_eos_else_refused(tmp_path):
    with_eos = build_bpe_tokenizer(tmp_path / "eos", bos=False)
    (window,) = ppl.document_windows(with_eos, ["a film"], context=8, stride=8)
    assert window.input_ids[0] == with_eos.eos_token_id
    neither = build_bpe_tokenizer(tmp_path / "none", bos=False, eos=False)
    with pytest.raises(ValueError, match="has neither a BOS nor an EOS token") as raised:
        ppl.document_windows(neither, ["a film"], context=8, stride=8)
    assert "PreTrainedTokenizerFast" in str(raised.value) or "Tokenizer" in str(raised.value)
