"""A causal LM on the model: rolling windows in, each window's losses out; after the clock, the KL
of its next-token distributions from the FP32 model's and greedy generation with the KV cache; the
sensitivity study's view; the fine-tune's blocks.

What a sample is here: one rolling window of a document (runner/tasks/causal_lm/perplexity.py has
the convention, lm-evaluation-harness's `loglikelihood_rolling`). One forward pass reads a batch of
windows; what it answers, per window, is a WindowLoss: the summed negative log-likelihood of its
scored tokens and the most probable next token at each of them. Runs in the variant's own process:
torch and transformers are imported here, at the top.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from functools import partial

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from runner import evaluate, progress
from runner.study import ranking
from runner.tasks import statistics
from runner.tasks.causal_lm import benchmarks, generation, kl_stats, perplexity, training
from runner.tasks.causal_lm.reference import stored_losses
from runner.tasks.task import Scored, TaskWorker

# FP32's most probable tokens the study's KL keeps apart when the job's kl_top_k is 0.
STUDY_TOP_K = 32


class WindowBatch(dict):
    """A forward pass's inputs (the dict the model is called with) that also carries its windows
    and the id the shorter ones are padded with, for read_output."""

    windows: list[perplexity.Window]
    padding: int


class CausalLMWorker(TaskWorker):
    """work.task_config: the plan's config.CausalLMSettings, resolved against the model."""

    def batches(self, work) -> tuple[list[dict], list[int], dict | None]:
        """The sample's window_batches; the fixed-shape batch of latency_mode fixed. The prefix
        token is resolved here, where the tokenizer is loaded, and the result records it."""
        tokenizer = load_tokenizer(work)
        work.task_config = with_prefix_resolved(work.task_config, tokenizer)
        size, device = work.evaluation.batch_size, work.variant.device
        batches = window_batches(tokenizer, work.texts, work.task_config.perplexity, size, device)
        fixed = None
        if work.evaluation.latency_mode == "fixed":
            fixed = evaluate.fixed_shape_batch(tokenizer, *work.evaluation.fixed_shape, device)
            fixed.pop("token_type_ids", None)  # a decoder takes none
        return batches, list(range(len(batch_windows(batches)))), fixed

    def calibration_rows(self, work) -> list[list[int]]:
        """Each text after the prefix token, as perplexity reads a document, cut."""
        tokenizer = load_tokenizer(work)
        prefix_id = perplexity.prefix_token_id(tokenizer, work.task_config.perplexity.prefix)
        rows = work.calibration
        encoded = tokenizer(list(rows.texts), add_special_tokens=False)["input_ids"]
        return [([prefix_id] + ids)[: rows.max_length] for ids in encoded]

    def read_output(self, output, batch: WindowBatch) -> list[perplexity.WindowLoss]:
        """Each window's summed NLL, scored tokens and greedy tokens."""
        return [
            perplexity.score_window(output.logits[row], window, 0, None)
            for row, window in enumerate(batch.windows)
        ]

    def non_finite(self, answers: list[perplexity.WindowLoss]) -> int:
        return sum(not math.isfinite(loss.nll) for loss in answers)

    def score(self, work, answers: list[perplexity.WindowLoss]) -> Scored:
        """answers: each window's loss, in window order."""
        convention = work.task_config.perplexity.convention
        n_bytes = perplexity.document_bytes(work.texts)
        metrics = {
            "perplexity": perplexity.perplexity(answers),
            "perplexity_convention": convention,
            # llama.cpp's windows leave half the tokens unscored: the documents' bytes are not
            # the scored tokens' bytes.
            "bits_per_byte": None
            if convention == "llama.cpp"
            else perplexity.bits_per_byte(answers, n_bytes),
            "mean_nll": perplexity.mean_nll(answers),
            "scored_tokens": perplexity.scored_tokens(answers),
        }
        predictions = {
            "windows": {
                "document": [loss.document for loss in answers],
                "tokens": [loss.tokens for loss in answers],
                "nll": [round(loss.nll, 6) for loss in answers],
            },
            "greedy": [loss.greedy_ids for loss in answers],
        }
        return Scored(metrics, perplexity.beyond_float_range(answers), predictions)

    def measure_more(self, work, model, batches: list, memory, scored: Scored, fp32) -> Scored:
        """The scored answers with the KL from FP32 (per window and its mean per token), the
        generation timings and the job's lm-eval benchmarks added. fp32: the worker's
        Fp32Reference, released once the KL has read it (generation never holds it)."""
        settings = work.task_config
        metrics, predictions, warnings = dict(scored.metrics), dict(scored.predictions), []
        if settings.perplexity.kl_top_k:
            with memory.phase("kl"):
                reference, variant = kl_losses(work, model, batches, fp32)
            kls = [perplexity.window_kl(r, v) for r, v in zip(reference, variant, strict=True)]
            predictions["windows"] = {**predictions["windows"], "kl": [round(k, 8) for k in kls]}
            metrics["kl_vs_fp32"] = math.fsum(kls) / metrics["scored_tokens"]
            # llama.cpp's statistics from per-token values; only the statistics are kept.
            metrics["kl_stats"] = kl_stats.kl_statistics(kl_stats.token_values(reference, variant))
        fp32.release()
        if settings.generation is not None:
            timed, warning = generation_metrics(work, model, memory)
            metrics.update(timed)
            warnings += [warning] if warning else []
        if settings.benchmarks is not None:  # last: nothing timed includes lm-eval
            with memory.phase("benchmarks"):
                record, items, failed = benchmarks.run_benchmarks(
                    settings.benchmarks, model, load_tokenizer(work), work.evaluation.batch_size
                )
            metrics["benchmarks"], predictions["benchmarks"] = record, items
            warnings += failed
        return Scored(metrics, scored.warnings + warnings, predictions)

    def study_view(self, step, fp32) -> ranking.StudyView:
        """A sample is a scored position: its answer is the greedy next token. FP32's top-k (for
        the KL) is computed in every step, not handed on: it is [positions, k] ids and
        log-probabilities."""
        settings, device = step.task_config.perplexity, step.study.device
        size = step.evaluation.batch_size
        batches = window_batches(load_tokenizer(step), step.texts, settings, size, device)
        windows, padding = batch_windows(batches), batches[0].padding
        clock = time.perf_counter()
        top_k = settings.kl_top_k or STUDY_TOP_K
        reference = perplexity.window_losses(fp32, windows, device, size, padding, top_k=top_k)
        fp32_pass_s = time.perf_counter() - clock
        at = [loss.top_ids for loss in reference]

        def outputs(model) -> list[perplexity.WindowLoss]:
            return perplexity.window_losses(model, windows, device, size, padding, log_probs_at=at)

        compare = partial(compare_tokens, windows, reference)
        return ranking.StudyView(batches, outputs, compare, None, fp32_pass_s)

    # Fine-tuning: every weight, at next-token prediction (runner/tasks/causal_lm/training.py).

    def finetune_model(self, base_dir: str, answer_names: list[str]):
        """The prepared model as it is, in FP32: a causal LM has no head to add."""
        return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)

    def training_rows(self, tokenizer, work) -> list[dict]:
        return training.training_rows(tokenizer, work)

    def data_collator(self, tokenizer):
        return training.data_collator(tokenizer)

    def describe_training(self, work) -> str:
        return training.describe_training(work)


WORKER = CausalLMWorker()


def load_tokenizer(work):
    return AutoTokenizer.from_pretrained(work.model_dir)


def with_prefix_resolved(settings, tokenizer):
    """The settings with perplexity.prefix the token really put before each document: the job's
    (checked to be one token of this tokenizer), else its BOS, else its EOS. A hub tokenizer's
    files are first read here: a prefix it lacks fails the variant, saying so."""
    prefix_id = perplexity.prefix_token_id(tokenizer, settings.perplexity.prefix)
    prefix = tokenizer.convert_ids_to_tokens(prefix_id)
    return replace(settings, perplexity=replace(settings.perplexity, prefix=prefix))


def pad_id(tokenizer) -> int:
    """Any id pads (pads follow the real tokens, masked): the tokenizer's, else the prefix."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return perplexity.prefix_token_id(tokenizer)


def window_batches(tokenizer, texts, settings, size: int, device) -> list[WindowBatch]:
    """Every document's windows in the job's convention, `size` windows to a forward pass, in
    window order."""
    windows = perplexity.document_windows(
        tokenizer, texts, settings.context, settings.stride, settings.prefix, settings.convention
    )
    batches, padding = [], pad_id(tokenizer)
    for start in range(0, len(windows), size):
        some = windows[start : start + size]
        batch = WindowBatch(perplexity.window_inputs(some, padding, device))
        batch.windows, batch.padding = some, padding
        batches.append(batch)
    return batches


def batch_windows(batches: list[WindowBatch]) -> list[perplexity.Window]:
    return [window for batch in batches for window in batch.windows]


def kl_losses(work, model, batches: list[WindowBatch], fp32) -> tuple[list, list]:
    """(FP32's window losses with its top-k, the variant's at those ids), for KL(FP32 || variant)
    over FP32's top-k tokens and one bin for the rest: the FP32 model (fp32, the worker's
    Fp32Reference: the one the weight analysis read, moved to the variant's device) gives its
    top-k and is released, then the variant's log-probabilities are read at those ids."""
    device, size = work.variant.device, work.evaluation.batch_size
    windows, padding = batch_windows(batches), batches[0].padding
    stored = stored_losses(work, windows)  # the job's, computed once on this device
    if stored is not None:
        fp32.release()  # the analysis may have loaded it; the KL needs it no more
        return stored, variant_at_top_k(model, windows, stored, device, size, padding)
    reference_model = fp32.model(device)
    top_k = work.task_config.perplexity.kl_top_k
    reference = []
    with progress.phase("KL: FP32 top-k", len(windows), "windows") as step:
        for start in range(0, len(windows), size):  # a batch at a time, to count them
            part = windows[start : start + size]
            reference += perplexity.window_losses(
                reference_model, part, device, size, padding, top_k
            )
            step.advance(len(part))
    del reference_model
    fp32.release()  # the variant's pass needs FP32's top-k ids, not its model
    return reference, variant_at_top_k(model, windows, reference, device, size, padding)


def variant_at_top_k(model, windows, reference, device, size: int, padding: int) -> list:
    """The variant's window losses at FP32's top-k ids, a batch at a time."""
    variant = []
    with progress.phase("KL: variant at FP32's top-k", len(windows), "windows") as step:
        for start in range(0, len(windows), size):
            part, at = windows[start : start + size], reference[start : start + size]
            at = [loss.top_ids for loss in at]
            variant += perplexity.window_losses(model, part, device, size, padding, log_probs_at=at)
            step.advance(len(part))
    return variant


def generation_metrics(work, model, memory) -> tuple[dict, str | None]:
    """Greedy generation at every batch size, inside the kv_cache memory phase: the first batch
    size's time to first token and decode tokens/s, and every batch size's record."""
    settings = work.task_config.generation
    prompts = generation.prompt_token_ids(
        load_tokenizer(work),
        work.texts,
        settings.prompt_length,
        max(settings.batch_sizes),
        settings.seed,
    )
    holder = f"generating {work.job} {work.variant.id}"
    device = work.variant.device
    timings = generation.kv_cache_phase(memory, model, prompts, settings, device, holder)
    first = timings.by_batch_size[settings.batch_sizes[0]]
    record = {
        "prompt_length": settings.prompt_length,
        "new_tokens": settings.new_tokens,
        "batch_sizes": list(settings.batch_sizes),
        "warmup_runs": settings.warmup_runs,
        "timed_runs": settings.timed_runs,
        "seed": settings.seed,
        "timing_lock_wait_s": timings.timing_lock_wait_s,
        "by_batch_size": {str(b): result for b, result in timings.by_batch_size.items()},
    }
    metrics = {
        "time_to_first_token_ms": first["time_to_first_token_ms"],
        "decode_tokens_per_s": first["decode_tokens_per_s"],
        "generation": record,
    }
    return metrics, timings.timing_lock_warning


def compare_tokens(windows, reference, losses) -> dict:
    """A model's next-token predictions against FP32's over every scored position, as a
    classifier's study says them for labels: accuracy is next-token accuracy against the text's
    own next token; agreement, flips, McNemar and the bootstrap are by position; mean_kl is the
    binned KL per position (nats); with the perplexities beside them."""
    gold = np.concatenate([window.targets for window in windows])
    base = np.concatenate([loss.greedy_ids for loss in reference])
    variant = np.concatenate([loss.greedy_ids for loss in losses])
    kl = math.fsum(perplexity.window_kl(r, v) for r, v in zip(reference, losses, strict=True))
    return {
        "accuracy": float(np.mean(variant == gold)),
        "accuracy_fp32": float(np.mean(base == gold)),
        "agreement": float(np.mean(variant == base)),
        "mean_kl": kl / len(gold),
        "flips": int(np.sum(variant != base)),
        "perplexity": perplexity.perplexity(losses),
        "perplexity_fp32": perplexity.perplexity(reference),
        "bootstrap_accuracy_delta": statistics.paired_bootstrap_delta(
            gold, base, variant, n_resamples=ranking.BOOTSTRAP_RESAMPLES
        ),
        "mcnemar": statistics.mcnemar_exact(gold, base, variant),
    }
