"""perplexity.convention: rolling (lm-eval's, the default), chunks (GPTQ-style papers') and
llama.cpp (its perplexity tool's). Each convention's perplexity against a hand computation on the
tiny Llama: every scored token's log-probability from its own forward pass over exactly the
context the convention gives it. Then what a user sees: the field checked at validation, the
convention recorded and printed, and collect refusing a delta between two conventions."""

from __future__ import annotations

import json
import math

import pytest
from conftest import check_refused, run_cli, typed, variant_json, write_job
from lm_models import load, next_token_log_probs, rt_sentences
from lm_results import three_variants
from test_causal_lm import CONTEXT, STRIDE, lm_job

from runner import collect, models
from runner.job import Variant
from runner.plan import plan_job
from runner.sweep import variant_work
from runner.tasks import TASKS
from runner.tasks.causal_lm import perplexity as ppl

REL = 1e-5  # float32 logits, summed in float64
# Enough documents for several windows of CONTEXT tokens, and one empty one.
DOCUMENTS = rt_sentences()[:6] + ["", rt_sentences()[6]]


pytestmark = pytest.mark.usefixtures("private_timing_lock")


def token_nll(model, before: list[int], token: int) -> float:
    return -float(next_token_log_probs(model, before)[-1, token])


def stream_of(tokenizer, documents) -> list[int]:
    """The documents' tokens joined, each after BOS, written out here from the convention."""
    stream = []
    for text in documents:
        stream += [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
    return stream


def chunks_by_hand(model, stream: list[int], context: int) -> list[float]:
    """Token i of the stream (i >= 1) from the tokens before it in its chunk: the chunk that
    starts at the largest multiple of `context` below i."""
    return [
        token_nll(model, stream[(i - 1) // context * context : i], stream[i])
        for i in range(1, len(stream))
    ]


def llama_cpp_by_hand(model, stream: list[int], context: int, bos: int) -> list[float]:
    """In each full window of `context` tokens (its first replaced by BOS), the tokens at
    positions context // 2 + 1 to context - 1, each from every window token before it."""
    nlls = []
    for start in range(0, len(stream) - context + 1, context):
        window = [bos] + stream[start + 1 : start + context]
        for j in range(context // 2 + 1, context):
            nlls.append(token_nll(model, window[:j], window[j]))
    return nlls


def losses_of(model, tokenizer, convention: str, context: int = CONTEXT, stride: int = CONTEXT):
    windows = ppl.document_windows(tokenizer, DOCUMENTS, context, stride, None, convention)
    return windows, ppl.window_losses(model, windows, "cpu", 4, tokenizer.pad_token_id)


# ---------------------------------------------------------------------------------------------
# Each convention by hand.


def test_chunks_score_every_token_of_the_stream_but_its_first(llama):
    model, tokenizer = load(llama)
    stream = stream_of(tokenizer, DOCUMENTS)
    assert len(stream) > 3 * CONTEXT  # several chunks, the last one partial
    hand = chunks_by_hand(model, stream, CONTEXT)
    windows, losses = losses_of(model, tokenizer, "chunks")
    assert [t for w in windows for t in w.targets] == stream[1:]
    assert len(windows) == -(-(len(stream) - 1) // CONTEXT)
    assert all(len(w.input_ids) <= CONTEXT for w in windows)
    assert ppl.scored_tokens(losses) == len(stream) - 1
    assert ppl.perplexity(losses) == pytest.approx(math.exp(sum(hand) / len(hand)), rel=REL)
    done = 0
    for loss in losses:  # window by window, not only in total
        assert loss.nll == pytest.approx(sum(hand[done : done + loss.tokens]), rel=REL)
        done += loss.tokens


def test_llama_cpp_scores_the_second_half_of_full_windows(llama):
    model, tokenizer = load(llama)
    stream = stream_of(tokenizer, DOCUMENTS)
    full = len(stream) // CONTEXT
    assert len(stream) % CONTEXT  # a partial last window, dropped
    hand = llama_cpp_by_hand(model, stream, CONTEXT, tokenizer.bos_token_id)
    windows, losses = losses_of(model, tokenizer, "llama.cpp")
    assert len(windows) == full
    assert all(w.scored == CONTEXT - CONTEXT // 2 - 1 for w in windows)
    assert ppl.scored_tokens(losses) == len(hand) == full * (CONTEXT - CONTEXT // 2 - 1)
    assert ppl.perplexity(losses) == pytest.approx(math.exp(sum(hand) / len(hand)), rel=REL)


def test_rolling_stays_the_default_and_scores_each_document_on_its_own(llama):
    model, tokenizer = load(llama)
    default = ppl.document_windows(tokenizer, DOCUMENTS, CONTEXT, STRIDE)
    assert default == ppl.document_windows(tokenizer, DOCUMENTS, CONTEXT, STRIDE, None, "rolling")
    # The three disagree on the same text: they score other tokens from other context.
    values = {c: ppl.perplexity(losses_of(model, tokenizer, c)[1]) for c in ppl.CONVENTIONS}
    assert len({round(v, 6) for v in values.values()}) == 3


def test_llama_cpp_needs_one_full_window():
    with pytest.raises(ValueError, match="at least one window long; found a context of 64 and 5"):
        ppl.stream_windows([[1, 2], [3]], 0, 64, "llama.cpp")


# ---------------------------------------------------------------------------------------------
# A run: recorded, printed.


def run_variant(tmp_path, model, perplexity: str) -> dict:
    """The fp32 variant's result of the test job with its perplexity: line replaced."""
    job = lm_job(model).replace(f"perplexity: {{context: {CONTEXT}, stride: {STRIDE}", perplexity)
    plan = plan_job(write_job(tmp_path, job))
    model_dir, info = models.prepare_model(plan.spec)
    (task,) = variant_work(plan, model_dir, info, set(), [Variant("fp32", "cpu")])
    return variant_json(task), plan


def test_a_chunks_run_records_and_prints_its_convention(tmp_path, llama):
    result, plan = run_variant(
        tmp_path, llama, f"perplexity: {{context: {CONTEXT}, convention: chunks"
    )
    assert result["status"] == "ok", result.get("error")
    assert result["settings"]["perplexity"]["convention"] == "chunks"
    assert result["settings"]["perplexity"]["stride"] == CONTEXT
    model, tokenizer = load(llama)
    hand = chunks_by_hand(model, stream_of(tokenizer, [e.text for e in plan.examples]), CONTEXT)
    metrics = result["metrics"]
    assert metrics["perplexity_convention"] == "chunks"
    assert metrics["perplexity"] == pytest.approx(math.exp(sum(hand) / len(hand)), rel=REL)
    n_bytes = sum(len(e.text.encode()) for e in plan.examples)
    assert metrics["bits_per_byte"] == pytest.approx(sum(hand) / math.log(2) / n_bytes, rel=REL)
    headline = TASKS["causal-lm"].headline(typed([result])[0].metrics)
    assert headline.startswith(f"perplexity {metrics['perplexity']:.4g} (chunks)")
    assert any("convention chunks, windows of 16 tokens" in note for note in plan.notes)


def test_a_llama_cpp_run_has_no_bits_per_byte(tmp_path, llama):
    result, _ = run_variant(tmp_path, llama, "perplexity: {context: 8, convention: llama.cpp")
    assert result["status"] == "ok", result.get("error")
    assert result["metrics"]["perplexity_convention"] == "llama.cpp"
    assert result["metrics"]["bits_per_byte"] is None  # half the documents' bytes unscored
    assert result["metrics"]["scored_tokens"] == len(result["predictions"]["greedy"]) * 3


# ---------------------------------------------------------------------------------------------
# Mistakes, refused at validation with the field named.


@pytest.mark.parametrize(
    "perplexity, words",
    [
        (
            "convention: wikitext",
            ["perplexity.convention", "wikitext", "rolling", "chunks", "llama.cpp"],
        ),
        (
            f"stride: {STRIDE}, convention: chunks",
            ["perplexity.stride", "no stride with convention chunks"],
        ),
        ("context: 2, convention: llama.cpp", ["perplexity.context", "3 or more"]),
    ],
)
def test_a_bad_convention_is_refused(capsys, tmp_path, llama, perplexity, words):
    job = lm_job(llama).replace(f"context: {CONTEXT}, stride: {STRIDE}", perplexity)
    check_refused(capsys, tmp_path, job, *words)


# ---------------------------------------------------------------------------------------------
# collect.


def with_convention(result: dict, convention: str) -> dict:
    result["settings"] = {"perplexity": {"context": 4, "stride": 4, "convention": convention}}
    return result


def test_collect_refuses_a_delta_between_two_conventions(capsys, tmp_path):
    fp32, int8, nf4 = three_variants()
    results = [with_convention(fp32, "rolling"), with_convention(int8, "chunks"), nf4]
    (table,) = collect.build_tables(typed(results))
    assert "fp32-cpu: perplexity in the rolling convention (docs/causal-lm.md)" in table.notes
    said = [note for note in table.notes if note.startswith("int8-dynamic-cpu: perplexity in")]
    assert said == [
        "int8-dynamic-cpu: perplexity in the chunks convention, the baseline's in rolling: no "
        "delta of perplexity, bits per byte or NLL, no perplexity increase or agreement (the two "
        "score other tokens from other context: their difference is not the quantization's)"
    ]
    int8_stats = table.stats["int8-dynamic-cpu"]
    assert int8_stats["significance"] is None and int8_stats["perplexity_increase"] is None
    assert int8_stats["agreement"] is None
    _, rows, _ = collect.table_rows(table)
    for label in ("perplexity", "bits per byte", "mean NLL (nats/token)"):
        row = next(row for row in rows if row[0] == label)
        assert row[3] == "", label  # int8's Δ cell: empty
        assert row[5].endswith("%"), label  # nf4 has none recorded: rolling, as before the field
    folder = tmp_path / "results" / "tiny-lm"
    folder.mkdir(parents=True)
    for result in results:
        (folder / f"{result['variant']}.json").write_text(json.dumps(result))
    code, out, err = run_cli(capsys, "collect", tmp_path / "results")
    assert code == 0, err
    assert "int8-dynamic-cpu: perplexity in the chunks convention" in out
