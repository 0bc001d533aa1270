"""Causal language modelling: documents in, the next token's distribution out, at every position.

A sample is one rolling window of a document; the metrics are token-weighted over every document:
perplexity, bits per byte, the mean NLL. After the timed passes, outside their clocks, the model is
measured twice more: the KL of its next-token distributions from the FP32 model's, per window, and
greedy generation with the KV cache at the job's batch sizes, the cache as its own memory phase.

The job's own fields are `perplexity:` (context, stride, kl_top_k) and `generation:`
(config.py); the plan resolves the context against the model's position table. This module is the
declaration, torch-free; worker.py runs on the model, compare.py is collect's part and plots.py
the report's.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, replace
from pathlib import Path

from runner.fields import SpecError
from runner.schema import Metrics
from runner.tasks.causal_lm import (
    benchmark_compare,
    benchmarks,
    compare,
    config,
    generation_memory,
    sample_checks,
)
from runner.tasks.task import EVERY_TASK_TOLERANCES, Metric, Targets, Task


class CausalLM(Task):
    name = "causal-lm"
    model_class = "AutoModelForCausalLM"
    architectures = ("ForCausalLM", "LMHeadModel")  # LlamaForCausalLM, GPT2LMHeadModel
    model_words = "a causal language model"
    no_model_class = (
        "transformers has no causal-LM class for this model type; e.g. llama, gpt2, qwen2, mistral"
    )
    labelled = False
    job_fields = ("perplexity", "generation", "benchmarks")
    metrics = (
        Metric("perplexity", float, higher_is_better=False),
        # Which tokens it scored from which context (config.CONVENTIONS), beside every perplexity.
        Metric("perplexity_convention", str),
        Metric("bits_per_byte", float, higher_is_better=False),
        Metric("mean_nll", float, higher_is_better=False),  # nats per scored token
        Metric("scored_tokens", int),
        # Mean KL(FP32 || variant) per scored token, nats, over FP32's top-k tokens and one bin
        # for the rest of the vocabulary (a lower bound of the full KL).
        Metric("kl_vs_fp32", float, higher_is_better=False),
        # llama.cpp's KL statistics against FP32 (runner/tasks/causal_lm/kl_stats.py).
        Metric("kl_stats", dict),
        # Greedy generation with the KV cache, at the first of the job's batch sizes; generation
        # holds every batch size (runner/tasks/causal_lm/generation.py).
        Metric("time_to_first_token_ms", float, higher_is_better=False),
        Metric("decode_tokens_per_s", float, higher_is_better=True),
        Metric("generation", dict),
        # lm-eval's tasks of the job's `benchmarks:` (runner/tasks/causal_lm/benchmarks.py).
        Metric("benchmarks", dict),
    )
    predictions = compare.WindowPredictions
    tolerances = (
        compare.MIN_GREEDY_AGREEMENT,
        *EVERY_TASK_TOLERANCES,
        compare.MAX_PERPLEXITY_INCREASE,
        compare.MIN_RECOVERY,
    )
    rows = compare.ROWS
    quality_rows = ("perplexity", "KL vs FP32 (nats/token)")
    best_rule = "fastest decode among passing: most decode tokens/s at the first batch size"
    noise_rule = compare.NOISE_RULE
    untrained = "its perplexity is an untrained model's"
    worker_side = "runner.tasks.causal_lm.worker:WORKER"
    plots = "runner.tasks.causal_lm.plots:PLOTS"

    def read_config(self, top) -> config.CausalLMSettings:
        return config.read_settings(top)

    def plan(self, spec, job, model_config: dict, rows, examples, train) -> Targets:
        """Its tokenizer can prefix a document, the vocabulary fits, the sample has text, the
        windows fit the model."""
        tokenizer_source = spec.tokenizer or spec.model
        field = "tokenizer" if spec.tokenizer else "model"
        named = spec.task_config.perplexity.prefix
        prefix = config.check_prefix_token(tokenizer_source, job, field, named)
        config.check_vocabulary_fits(model_config, tokenizer_source, job, field)
        if not any(e.text.strip() for e in examples):
            raise SpecError(
                job,
                f"{spec.dataset.field}.text_column",
                spec.dataset.text_column,
                f"every one of the {len(examples)} documents of the evaluation sample is empty: "
                "there is no token to score; name the column that holds the text",
            )
        settings = config.resolved(spec.task_config, model_config, job, prefix)
        sample_checks.check_sample_tokens(spec, job, settings, examples, train)
        notes = plan_notes(settings, model_config)
        if settings.benchmarks is not None:  # every task loads, before any variant
            checked, more = benchmarks.check_benchmarks(settings.benchmarks, job)
            settings, notes = replace(settings, benchmarks=checked), notes + more
        return Targets(settings, notes)

    def recorded(self, settings: config.CausalLMSettings) -> dict:
        return asdict(settings)

    def headline(self, metrics: Metrics) -> str:
        """A causal LM's perplexity, decode speed and each benchmark's primary score."""
        decode = metrics.value("decode_tokens_per_s")
        speed = f"  decode {decode:.1f} tokens/s" if decode is not None else ""
        convention = metrics.value("perplexity_convention") or "rolling"  # before it was chosen
        value = metrics.value("perplexity")
        shown = "beyond a float" if value is None else f"{value:.4g}"  # a warning says why
        scores = benchmarks.headline(metrics.value("benchmarks"))
        scores = f"  {scores}" if scores else ""
        return f"perplexity {shown} ({convention}){speed}{scores}"

    def key_metric(self, metrics: Metrics) -> tuple[str, float | None, int]:
        return "perplexity", metrics.value("perplexity"), 2

    def compare(self, result, baseline):
        return compare.compare(result, baseline)

    def more_rows(self, results) -> tuple:
        """A row per statistic of each benchmark task and metric the results measured."""
        return benchmark_compare.rows(results)

    def best_key(self, result) -> tuple:
        return compare.fastest_decode(result)

    def study_tolerance(self, tolerances: dict[str, float]) -> dict[str, float | None]:
        """Greedy agreement with FP32: a causal LM's verdict judges no accuracy."""
        return {"min_agreement": tolerances.get("min_agreement")}

    def training_settings(self, settings: config.CausalLMSettings) -> dict:
        """The block length (the stride, the KL and generation settings change no weight)."""
        return {"block_tokens": settings.perplexity.context}

    def refuse_model(self, model) -> str | None:
        from runner.tasks.causal_lm import causal_probe  # torch: only where a model is loaded

        return causal_probe.refusal(model)

    def chance_loss(self, work) -> tuple[float, str]:
        """A uniform guess over the vocabulary: ln of its size (the model's config.json)."""
        saved = json.loads((Path(work.model_dir) / "config.json").read_text(encoding="utf-8"))
        size = saved.get("vocab_size") or saved.get("text_config", {}).get("vocab_size")
        if not isinstance(size, int) or size < 2:
            return 0.0, "ln 1"
        return math.log(size), f"ln {size} (the vocabulary)"


def plan_notes(settings: config.CausalLMSettings, model_config: dict) -> list[str]:
    window, generation = settings.perplexity, settings.generation
    kl = f"from FP32 over its top {window.kl_top_k} tokens" if window.kl_top_k else "not measured"
    if window.convention == "rolling":
        rolling = f"rolling windows of {window.context} tokens, stride {window.stride}"
    else:
        rolling = f"convention {window.convention}, windows of {window.context} tokens"
    if window.prefix is not None:
        rolling += f", each document after {window.prefix}"
    notes = [f"perplexity: {rolling}; KL {kl}"]
    if generation is not None:
        notes.append(
            f"generation: {generation.new_tokens} new tokens after prompts of "
            f"{generation.prompt_length}, batch sizes {', '.join(map(str, generation.batch_sizes))}"
        )
        memory = generation_memory.memory_note(generation, model_config)
        notes += [memory] if memory else []
    return notes


TASK = CausalLM()
