"""Generation speed: greedy decoding with the KV cache, timed step by step; see docs/generation.md.

The loop is written out rather than left to `model.generate`, so that each forward pass has its
own clock reading with the device synchronised: one prefill pass over the prompt (its end is the
time to first token), then one pass per further token, fed the argmax and the cache. It always
decodes `new_tokens` tokens, EOS or not: every variant and batch size does the same work. The
prompts are cut from the evaluation documents' tokens with a seed, so every variant times the same
prompts. The KV cache is measured as its own number: the bytes of the tensors the cache holds after
the last step and, on CUDA, the peak allocated during a generation beyond what was allocated before
it (the model and the prompts).
"""

from __future__ import annotations

import inspect
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from runner import locks, machine, measure, progress
from runner.tasks.causal_lm import perplexity
from runner.tasks.causal_lm.config import GenerationSettings, check_count

# ---------------------------------------------------------------------------------------------
# Settings, checked for people: each message names what it found and what is allowed.


def model_max_positions(model) -> int | None:
    """The length of the model's position table; None for a model without one."""
    config = model.config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    positions = getattr(config, "max_position_embeddings", None)  # GPT-2 maps it to n_positions
    return positions if isinstance(positions, int) and not isinstance(positions, bool) else None


# ---------------------------------------------------------------------------------------------
# Prompts.


def prompt_token_ids(
    tokenizer, documents: Sequence[str], prompt_length: int, count: int, seed: int
) -> list[list[int]]:
    """`count` prompts of exactly `prompt_length` tokens, cut from real text: the documents'
    tokens (without special tokens, each document after the BOS, else EOS, token as perplexity
    reads it) joined end to end and cut into consecutive runs of prompt_length, which the seed
    shuffles. With more prompts asked than runs, the shuffled runs repeat in the same order. A
    batch of b prompts takes the first b, so a larger batch holds every smaller one's prompts."""
    check_count("prompt_length", prompt_length, 1)
    check_count("count", count, 1)
    separator = next(
        (t for t in (tokenizer.bos_token_id, tokenizer.eos_token_id) if t is not None), None
    )
    stream = perplexity.document_stream(tokenizer, documents, separator)
    runs = len(stream) // prompt_length
    if runs == 0:
        raise ValueError(
            f"the {len(documents)} documents hold {len(stream)} tokens: too few for one prompt "
            f"of {prompt_length}; allowed: documents of at least prompt_length tokens in all"
        )
    order = np.random.default_rng(seed).permutation(runs)
    starts = [int(order[i % runs]) * prompt_length for i in range(count)]
    return [stream[start : start + prompt_length] for start in starts]


def prompt_batch(prompts: Sequence[Sequence[int]], batch_size: int, device):
    """The first batch_size prompts as one [batch_size, prompt_length] tensor on device."""
    if len(prompts) < batch_size:
        raise ValueError(f"{len(prompts)} prompts for a batch of {batch_size}: too few")
    return torch.tensor([list(p) for p in prompts[:batch_size]], dtype=torch.long).to(device)


# ---------------------------------------------------------------------------------------------
# The KV cache: how a model takes and returns it, and what it holds.


def forward_options(model) -> tuple[str, dict]:
    """(the keyword the forward pass takes the cache by, the options of every pass).

    transformers 5.x calls it `cache` (`past_key_values` is deprecated there, removed in 5.40);
    4.x `past_key_values`. logits_to_keep=1, where the model takes it, computes the logits of the
    last position only, as model.generate does: the prefill then skips [batch, prompt, vocab]
    logits that greedy decoding never reads."""
    parameters = inspect.signature(model.forward).parameters
    keyword = "cache" if "cache" in parameters else "past_key_values"
    options = {"use_cache": True}
    if "logits_to_keep" in parameters:
        options["logits_to_keep"] = 1
    return keyword, options


def returned_cache(output):
    """The KV cache a forward pass returned (a ModelOutput holds only the fields that are set)."""
    for name in ("cache", "past_key_values"):
        if name in output:
            return output[name]
    raise ValueError(
        f"the model returned no KV cache (its output has {list(output.keys())}): generation "
        "speed needs a causal LM that takes use_cache=True"
    )


def cache_tensors(cache) -> list:
    """Every tensor a KV cache holds, once each: a transformers Cache (its layers' keys and
    values, and whatever else its layers keep, such as a quantized layer's tensors) or the legacy
    tuple of (key, value) per layer."""
    found, seen, pending = [], set(), [cache]
    while pending:
        value = pending.pop()
        if value is None or id(value) in seen:
            continue
        seen.add(id(value))
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, tuple | list):
            pending.extend(value)
        elif isinstance(value, dict):
            pending.extend(value.values())
        elif is_cache_object(value):
            pending.extend(vars(value).values())
    return found


def is_cache_object(value) -> bool:
    # Only caches and cache layers are walked, not a config, class or stream one points to.
    return not isinstance(value, type) and any(
        klass.__module__ == "transformers.cache_utils" for klass in type(value).__mro__
    )


def cache_bytes(cache) -> int:
    """The bytes of the tensors the cache holds (elements x element size)."""
    return sum(tensor.numel() * tensor.element_size() for tensor in cache_tensors(cache))


def cache_length(cache) -> int:
    """The tokens per sequence the cache holds."""
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return int(cache[0][0].shape[-2])  # legacy: [batch, kv_heads, tokens, head_dim]


# ---------------------------------------------------------------------------------------------
# One greedy generation, timed step by step.


@dataclass
class GenerationRun:
    token_ids: list[list[int]]  # [batch][new_tokens]: the generated tokens, not the prompt
    prefill_s: float  # the prefill pass and the first token's argmax: the time to first token
    decode_s: list[float]  # each later step: one forward pass and its argmax, new_tokens - 1
    end_to_end_s: float  # prefill_s + sum(decode_s): the first clock reading to the last
    cache_bytes: int  # the KV cache after the last step
    cache_length: int  # its tokens per sequence: prompt_length + new_tokens - 1


def no_sync() -> None:
    return None


def greedy_generate(model, input_ids, new_tokens: int, sync: Callable = no_sync) -> GenerationRun:
    """Greedy decoding with the KV cache, one forward pass per clock reading. The clock reads
    after sync() (machine.synchronizer), so each reading follows the device's work. Each step's
    clock starts where the one before stopped: nothing between the steps goes untimed. The last
    token is chosen, never fed: the cache ends at prompt + new_tokens - 1 tokens."""
    keyword, options = forward_options(model)
    with torch.inference_mode():
        sync()
        started = time.perf_counter()
        output = model(input_ids=input_ids, **options)
        next_ids = output.logits[:, -1].argmax(dim=-1, keepdim=True)
        cache = returned_cache(output)
        del output  # without logits_to_keep the prefill's logits are large: not kept meanwhile
        sync()
        step_ended = time.perf_counter()
        prefill_s, chosen, decode_s = step_ended - started, [next_ids], []
        for _ in range(new_tokens - 1):
            output = model(input_ids=next_ids, **options, **{keyword: cache})
            next_ids = output.logits[:, -1].argmax(dim=-1, keepdim=True)
            cache = returned_cache(output)
            del output
            chosen.append(next_ids)
            sync()
            now = time.perf_counter()
            decode_s.append(now - step_ended)
            step_ended = now
    return GenerationRun(
        token_ids=torch.cat(chosen, dim=1).tolist(),
        prefill_s=prefill_s,
        decode_s=decode_s,
        end_to_end_s=step_ended - started,
        cache_bytes=cache_bytes(cache),
        cache_length=cache_length(cache),
    )


# ---------------------------------------------------------------------------------------------
# Timing every batch size.


@dataclass
class CudaPeak:
    """One generation's CUDA peak: allocated beyond what was allocated before it, and the
    absolute peaks (model included)."""

    beyond_before: int
    allocated: int
    reserved: int


def run_with_cuda_peak(model, input_ids, new_tokens: int, sync, cuda: bool):
    """(the run, its CudaPeak or None). Resets CUDA's peak statistics: see kv_cache_phase."""
    if not cuda:
        return greedy_generate(model, input_ids, new_tokens, sync), None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()  # the model, the prompts, whatever else is alive
    run = greedy_generate(model, input_ids, new_tokens, sync)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return run, CudaPeak(peak - before, peak, torch.cuda.max_memory_reserved())


def time_batch_size(model, input_ids, settings: GenerationSettings, sync, cuda: bool) -> dict:
    """Warm-up generations, then the timed ones, of one batch: the first generation of a batch
    pays one-time costs (kernels loaded and chosen per shape, and every decode step has a shape of
    its own), so the timed ones follow warm-up runs of the same prompts."""
    for _ in range(settings.warmup_runs):
        greedy_generate(model, input_ids, settings.new_tokens, sync)
    runs, peaks = [], []
    faults_before = minor_page_faults()  # read between runs: outside every clock
    for _ in range(settings.timed_runs):
        run, peak = run_with_cuda_peak(model, input_ids, settings.new_tokens, sync, cuda)
        runs.append(run)
        peaks.append(peak)
    faults = minor_page_faults() - faults_before
    result = summarise(runs, int(input_ids.shape[0]), [p for p in peaks if p is not None])
    result["minor_page_faults_per_step"] = round(faults / (len(runs) * settings.new_tokens))
    return result


def minor_page_faults() -> int:
    """The process's minor page faults so far: memory it touched for the first time since the
    system handed it out. On the CPU a step that allocates and frees large temporaries (a
    weight dequantized on every call) pays for them here, as much as the allocator's state
    decides."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def summarise(runs: list[GenerationRun], batch_size: int, peaks: list[CudaPeak]) -> dict:
    """One batch size's numbers over its timed runs."""
    prefill = measure.latency_stats([run.prefill_s for run in runs])
    decode_s = [step for run in runs for step in run.decode_s]
    decode_time = sum(decode_s)
    counted = {len(row) for run in runs for row in run.token_ids}
    last = runs[-1]
    return {
        "batch_size": batch_size,
        "new_tokens": counted.pop() if len(counted) == 1 else sorted(counted),
        "prefill_ms": prefill,
        "time_to_first_token_ms": prefill["median"],
        "decode_ms_per_token": measure.latency_stats(decode_s),
        # Tokens of the decode steps only: the first token of each sequence is the prefill's.
        "decode_tokens_per_s": (
            round(batch_size * len(decode_s) / decode_time, 2) if decode_time > 0 else None
        ),
        "end_to_end_ms": measure.latency_stats([run.end_to_end_s for run in runs]),
        "kv_cache_bytes": last.cache_bytes,
        "kv_cache_mib": round(last.cache_bytes / 2**20, 4),
        "kv_cache_tokens": last.cache_length,
        "cuda_peak_beyond_model_mib": (
            round(max(p.beyond_before for p in peaks) / 2**20, 1) if peaks else None
        ),
        "cuda_peak_allocated_bytes": max((p.allocated for p in peaks), default=None),
        "cuda_peak_reserved_bytes": max((p.reserved for p in peaks), default=None),
    }


@dataclass
class GenerationTimings:
    by_batch_size: dict[int, dict]  # summarise's dict per batch size, in the settings' order
    timing_lock_wait_s: float | None = None
    timing_lock_warning: str | None = None


def time_generation(
    model,
    prompts: Sequence[Sequence[int]],
    settings: GenerationSettings,
    device: str,
    holder: str = "a quantbench variant",
) -> GenerationTimings:
    """Every batch size's generation speed, under the machine's timing lock (warm-up included,
    as in evaluate.timed_passes_of). prompts: prompt_token_ids's, at least the largest batch."""
    settings.check(model_max_positions(model))
    if any(len(prompt) != settings.prompt_length for prompt in prompts):
        raise ValueError(f"every prompt must hold prompt_length ({settings.prompt_length}) tokens")
    sync = machine.synchronizer(device)
    cuda = device == "cuda" and torch.cuda.is_available()
    by_batch_size = {}
    sizes = settings.batch_sizes
    with (
        locks.timing_lock(holder) as lock,
        progress.phase("generation by batch size", len(sizes), "batch sizes") as step,
    ):
        for batch_size in sizes:
            input_ids = prompt_batch(prompts, batch_size, device)
            by_batch_size[batch_size] = time_batch_size(model, input_ids, settings, sync, cuda)
            step.advance()  # between batch sizes: no run is timed now
    return GenerationTimings(by_batch_size, round(lock.waited_s, 3), lock.warning)


# ---------------------------------------------------------------------------------------------
# The KV cache as a memory phase.


def kv_cache_phase(
    memory: machine.MemoryPhases,
    model,
    prompts: Sequence[Sequence[int]],
    settings: GenerationSettings,
    device: str,
    holder: str = "a quantbench variant",
) -> GenerationTimings:
    """time_generation inside memory.phase("kv_cache"), whose record then holds the KV cache's
    figures at the largest batch size beside the phase's peaks.

    The runs reset CUDA's peak statistics (each run's peak beyond the model needs it), so the
    peaks MemoryPhases reads at the phase's end cover the last run only: they are replaced by the
    largest peaks over all timed runs. For the same reason this must not run inside another
    phase. The resident-memory peak (VmHWM) is not reset and stays the phase's own."""
    with memory.phase("kv_cache"):
        timings = time_generation(model, prompts, settings, device, holder)
    results = list(timings.by_batch_size.values())
    largest = max(results, key=lambda result: result["batch_size"])
    record = memory.phases["kv_cache"]
    record["kv_cache_batch_size"] = largest["batch_size"]
    record["kv_cache_mib"] = largest["kv_cache_mib"]
    if "peak_cuda_allocated_mib" in record:
        for name in ("allocated", "reserved"):
            peak = max(result[f"cuda_peak_{name}_bytes"] or 0 for result in results)
            record[f"peak_cuda_{name}_mib"] = round(peak / 2**20, 1)
        record["cuda_peak_beyond_model_mib"] = largest["cuda_peak_beyond_model_mib"]
    return timings
