"""Causal language modelling: documents in, the next token's distribution out, at every position.

What a sample is here: one rolling window of a document (runner/tasks/perplexity.py has the
convention, lm-evaluation-harness's `loglikelihood_rolling`). One forward pass reads a batch of
windows; what it answers, per window, is the summed negative log-likelihood of the window's
scored tokens and the most probable next token at each of them. The metrics are token-weighted
over every document: perplexity, bits per byte, the mean NLL. After the timed passes, outside
their clocks, the model is measured twice more: the KL of its next-token distributions from the
FP32 model's, per window, and greedy generation with the KV cache at the job's batch sizes
(runner/tasks/generation.py), the cache as its own memory phase.

The job's own fields are `perplexity:` (context, stride, kl_top_k) and `generation:`; the plan
resolves the context against the model's position table. torch and transformers are imported
inside the functions: the driver imports this module without them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from runner import data, model_checks
from runner.spec import JobSpec, SpecError
from runner.tasks import causal_lm_collect, lm_training, perplexity
from runner.tasks.generation import GenerationSettings
from runner.tasks.task import Metric, Scored, Targets, Task

# The context a job gets when it names none: the model's position table, at most this (as
# lm-evaluation-harness's default max_length).
DEFAULT_MAX_CONTEXT = 2048
# A window's row from read_output: document, summed NLL, scored tokens, then one greedy token per
# scored position (-1 past the last).
ROW_HEAD = 3


# ---------------------------------------------------------------------------------------------
# The job's fields.


@dataclass(frozen=True)
class PerplexitySettings:
    context: int | None = None  # tokens a window reads; None: the model's, at most 2048
    stride: int | None = None  # tokens each later window scores; None: the context
    kl_top_k: int = 32  # FP32's most probable tokens the KL keeps apart; 0: no KL


@dataclass(frozen=True)
class CausalLMSettings:
    perplexity: PerplexitySettings
    generation: GenerationSettings | None  # None: `generation: false`, no generation timing


GENERATION_DEFAULTS = GenerationSettings(prompt_length=32, new_tokens=32, batch_sizes=(1,))


def read_settings(top) -> CausalLMSettings:
    """`perplexity:` and `generation:` from the job's top-level _Reader, each checked as read."""
    reader = top.sub("perplexity")
    found = {} if reader is None else reader.data
    if reader is not None:
        reader.check_keys(("context", "stride", "kl_top_k"))
        reader.positive_int("context", None, minimum=2)
        reader.positive_int("stride", None)
        reader.positive_int("kl_top_k", 32, minimum=0)
    window = PerplexitySettings(**found)
    if window.context is not None and window.stride is not None and window.stride > window.context:
        allowed = f"at most the context ({window.context}): 1 to {window.context}"
        raise reader.error("stride", window.stride, allowed)
    return CausalLMSettings(window, read_generation(top))


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


# ---------------------------------------------------------------------------------------------
# Planning: the model is a causal LM, its tokenizer can prefix a document, the windows fit.


def plan_targets(
    spec: JobSpec,
    shown: Path,
    config: dict,
    rows: list[data.Example],
    examples: list[data.Example],
    train: list[data.Example] | None,
) -> Targets:
    model_checks.check_causal_lm(config, shown, spec.model)
    tokenizer_source = spec.tokenizer or spec.model
    field = "tokenizer" if spec.tokenizer else "model"
    model_checks.check_prefix_token(tokenizer_source, shown, field)
    model_checks.check_vocabulary_fits(config, tokenizer_source, shown, field)
    if not any(e.text.strip() for e in examples):
        raise SpecError(
            shown,
            f"{spec.dataset.field}.text_column",
            spec.dataset.text_column,
            f"every one of the {len(examples)} documents of the evaluation sample is empty: "
            "there is no token to score; name the column that holds the text",
        )
    settings = resolved(spec.task_settings, config, shown)
    window, generation = settings.perplexity, settings.generation
    kl = f"from FP32 over its top {window.kl_top_k} tokens" if window.kl_top_k else "not measured"
    rolling = f"rolling windows of {window.context} tokens, stride {window.stride}"
    notes = [f"perplexity: {rolling}; KL {kl}"]
    if generation is not None:
        notes.append(
            f"generation: {generation.new_tokens} new tokens after prompts of "
            f"{generation.prompt_length}, batch sizes {', '.join(map(str, generation.batch_sizes))}"
        )
    return Targets(label_map={}, model_labels=[], notes=notes, task_settings=settings)


def model_positions(config: dict) -> int | None:
    """The model's position table (GPT-2 calls it n_positions); None without one."""
    for key in ("max_position_embeddings", "n_positions"):
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def resolved(settings: CausalLMSettings, config: dict, shown: Path) -> CausalLMSettings:
    """The settings with the context and stride filled in, checked against the model."""
    positions = model_positions(config)
    window = settings.perplexity
    context = window.context or min(positions or DEFAULT_MAX_CONTEXT, DEFAULT_MAX_CONTEXT)
    allowed = f"the model takes at most {positions} tokens (its position table)"
    if positions is not None and context > positions:
        raise SpecError(shown, "perplexity.context", context, f"{allowed}: 2 to {positions}")
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
    return CausalLMSettings(PerplexitySettings(context, stride, window.kl_top_k), generation)


# ---------------------------------------------------------------------------------------------
# Batches of windows, and what a forward pass says of each.


class WindowBatch(dict):
    """A forward pass's inputs (the dict the model is called with) that also carries its windows
    and the width of a row, for read_output."""

    windows: list[perplexity.Window]
    width: int
    padding: int  # the id the shorter windows are padded with


def load_tokenizer(task):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(task.model_dir)


def pad_id(tokenizer) -> int:
    """Any id pads (pads follow the real tokens, masked): the tokenizer's, else the prefix."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return perplexity.prefix_token_id(tokenizer)


def window_batches(tokenizer, texts, settings: PerplexitySettings, size: int, device):
    """Every document's rolling windows, `size` windows to a forward pass, in window order."""
    windows = perplexity.document_windows(tokenizer, texts, settings.context, settings.stride)
    batches, padding = [], pad_id(tokenizer)
    for start in range(0, len(windows), size):
        some = windows[start : start + size]
        batch = WindowBatch(perplexity.window_inputs(some, padding, device))
        batch.windows, batch.width, batch.padding = some, ROW_HEAD + settings.context, padding
        batches.append(batch)
    return batches


def batch_windows(batches: list[WindowBatch]) -> list[perplexity.Window]:
    return [window for batch in batches for window in batch.windows]


def prepare_batches(task) -> tuple[list[dict], list[int], dict | None]:
    """task: the worker's VariantTask. The sample's window_batches; the fixed-shape batch of
    latency_mode fixed."""
    from runner import evaluate

    tokenizer = load_tokenizer(task)
    size, device = task.evaluation.batch_size, task.variant.device
    batches = window_batches(tokenizer, task.texts, task.task_settings.perplexity, size, device)
    fixed = None
    if task.evaluation.latency_mode == "fixed":
        fixed = evaluate.fixed_shape_batch(tokenizer, *task.evaluation.fixed_shape, device)
        fixed.pop("token_type_ids", None)  # a decoder takes none
    return batches, list(range(len(batch_windows(batches)))), fixed


def window_rows(output, batch: WindowBatch):
    """One float64 row per window: document, summed NLL, scored tokens, the greedy tokens."""
    import torch

    rows = torch.full((len(batch.windows), batch.width), -1.0, dtype=torch.float64)
    for row, window in enumerate(batch.windows):
        loss = perplexity.score_window(output.logits[row], window, 0, None)
        rows[row, :ROW_HEAD] = torch.tensor([loss.document, loss.nll, loss.tokens])
        rows[row, ROW_HEAD : ROW_HEAD + loss.tokens] = torch.tensor(loss.greedy_ids)
    return rows


def losses_of(rows: np.ndarray) -> list[perplexity.WindowLoss]:
    return [
        perplexity.WindowLoss(
            document=int(row[0]),
            nll=float(row[1]),
            tokens=int(row[2]),
            greedy_ids=row[ROW_HEAD : ROW_HEAD + int(row[2])].astype(np.int64).tolist(),
        )
        for row in rows
    ]


def score(task, rows: np.ndarray) -> Scored:
    """task: the worker's VariantTask; rows: window_rows' rows in window order."""
    losses = losses_of(rows)
    metrics = {
        "perplexity": perplexity.perplexity(losses),
        "bits_per_byte": perplexity.bits_per_byte(losses, perplexity.document_bytes(task.texts)),
        "mean_nll": perplexity.mean_nll(losses),
        "scored_tokens": perplexity.scored_tokens(losses),
    }
    predictions = {
        "windows": {
            "document": [loss.document for loss in losses],
            "tokens": [loss.tokens for loss in losses],
            "nll": [round(loss.nll, 6) for loss in losses],
        },
        "greedy": [loss.greedy_ids for loss in losses],
    }
    return Scored(metrics=metrics, warnings=[], predictions=predictions)


# ---------------------------------------------------------------------------------------------
# After the clock: the KL from FP32, and generation speed.


def measure_more(task, model, batches: list[WindowBatch], memory, scored: Scored) -> Scored:
    """The scored outputs with the KL from FP32 (per window and its mean per token) and the
    generation timings added."""
    settings = task.task_settings
    metrics, predictions, warnings = dict(scored.metrics), dict(scored.predictions), []
    if settings.perplexity.kl_top_k:
        with memory.phase("kl"):
            kls = window_kls(task, model, batches)
        predictions["windows"] = {**predictions["windows"], "kl": [round(k, 8) for k in kls]}
        metrics["kl_vs_fp32"] = math.fsum(kls) / metrics["scored_tokens"]
    if settings.generation is not None:
        timed, warning = generation_metrics(task, model, memory)
        metrics.update(timed)
        warnings += [warning] if warning else []
    return Scored(metrics, scored.warnings + warnings, predictions)


def window_kls(task, model, batches: list[WindowBatch]) -> list[float]:
    """KL(FP32 || variant) summed over each window's scored tokens, over FP32's top-k tokens and
    one bin for the rest: the FP32 model is loaded on the variant's device, its top-k taken, then
    the variant's log-probabilities read at those ids."""
    import torch

    from runner.tasks import TASKS

    device, size = task.variant.device, task.evaluation.batch_size
    windows, padding = batch_windows(batches), batches[0].padding
    reference_model = (
        TASKS[task.task_name].auto_model().from_pretrained(task.model_dir, dtype=torch.float32)
    )
    reference_model = reference_model.to(device).eval()
    top_k = task.task_settings.perplexity.kl_top_k
    reference = perplexity.window_losses(reference_model, windows, device, size, padding, top_k)
    del reference_model
    at = [loss.top_ids for loss in reference]
    variant = perplexity.window_losses(model, windows, device, size, padding, log_probs_at=at)
    return [perplexity.window_kl(ref, var) for ref, var in zip(reference, variant, strict=True)]


def generation_metrics(task, model, memory) -> tuple[dict, str | None]:
    """Greedy generation at every batch size, inside the kv_cache memory phase: the first batch
    size's time to first token and decode tokens/s, and every batch size's record."""
    from runner.tasks import generation

    settings = task.task_settings.generation
    prompts = generation.prompt_token_ids(
        load_tokenizer(task),
        task.texts,
        settings.prompt_length,
        max(settings.batch_sizes),
        settings.seed,
    )
    holder = f"generating {task.job} {task.variant.id}"
    device = task.variant.device
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


# ---------------------------------------------------------------------------------------------
# The sensitivity study's view: next-token predictions, compared with FP32's position by position.

# FP32's most probable tokens the study's KL keeps apart when the job's kl_top_k is 0.
STUDY_TOP_K = 32


def study_view(step, fp32):
    """step: a study_worker.StudyStep; fp32: the FP32 model on the study's device. A sample is a
    scored position: its answer is the greedy next token. FP32's top-k (for the KL) is computed
    in every step, not handed on: it is [positions, k] ids and log-probabilities."""
    import time

    from runner import sensitivity as S

    settings, device = step.task_settings.perplexity, step.study.device
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
    return S.StudyView(batches, outputs, compare, None, fp32_pass_s)


def compare_tokens(windows, reference, losses) -> dict:
    """A model's next-token predictions against FP32's over every scored position, as
    sensitivity.compare_labels says them for labels: accuracy is next-token accuracy against the
    text's own next token; agreement, flips, McNemar and the bootstrap are by position; mean_kl is
    the binned KL per position (nats); with the perplexities beside them."""
    from runner import effects
    from runner import sensitivity as S

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
        "bootstrap_accuracy_delta": effects.paired_bootstrap_delta(
            gold, base, variant, n_resamples=S.BOOTSTRAP_RESAMPLES
        ),
        "mcnemar": effects.mcnemar_exact(gold, base, variant),
    }


TASK = Task(
    name="causal-lm",
    model_class="AutoModelForCausalLM",
    plan_targets=plan_targets,
    prepare_batches=prepare_batches,
    read_output=window_rows,
    score=score,
    labelled=False,
    job_fields=("perplexity", "generation"),
    read_settings=read_settings,
    measure_more=measure_more,
    study_view=study_view,
    metrics=(
        Metric("perplexity", float, higher_is_better=False),
        Metric("bits_per_byte", float, higher_is_better=False),
        Metric("mean_nll", float, higher_is_better=False),  # nats per scored token
        Metric("scored_tokens", int),
        # Mean KL(FP32 || variant) per scored token, nats, over FP32's top-k tokens and one bin
        # for the rest of the vocabulary (a lower bound of the full KL).
        Metric("kl_vs_fp32", float, higher_is_better=False),
        # Greedy generation with the KV cache, at the first of the job's batch sizes; generation
        # holds every batch size (runner/tasks/generation.py).
        Metric("time_to_first_token_ms", float, higher_is_better=False),
        Metric("decode_tokens_per_s", float, higher_is_better=True),
        Metric("generation", dict),
    ),
    predictions=causal_lm_collect.WindowPredictions,
    comparison=causal_lm_collect.COMPARISON,
    finetune_model=lm_training.finetune_model,
    training_rows=lm_training.training_rows,
    data_collator=lm_training.data_collator,
    describe_training=lm_training.describe_training,
    chance_loss=lm_training.chance_loss,
    training_settings=lm_training.training_settings,
)
