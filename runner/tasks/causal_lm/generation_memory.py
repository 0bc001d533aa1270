"""What the largest generation batch holds in memory, estimated from the model's config at
validation: the KV cache after every new token and a step's logits (the last position's, as
generation.forward_options asks where the model takes logits_to_keep), in FP32.

An estimate, not a check: the node that runs a variant is known only at placement, its memory and
the precision's KV cache dtype with it (docs/generation.md says why). Validation prints it beside
this machine's memory, so a batch size that cannot fit anywhere is seen before the cluster starts.
Plain Python.
"""

from __future__ import annotations

import os

from runner.tasks.causal_lm.config import GenerationSettings

FP32_BYTES = 4
GIB = 1 << 30


def first_int(config: dict, *keys: str) -> int | None:
    value = next((config[k] for k in keys if isinstance(config.get(k), int)), None)
    return value if value and not isinstance(value, bool) else None


def batch_bytes(settings: GenerationSettings, config: dict) -> dict[str, int] | None:
    """{"kv_cache": bytes, "logits": bytes} of the largest batch size; None where the config
    does not say its shape (layers, heads, width, vocabulary)."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    layers = first_int(text, "num_hidden_layers", "n_layer")
    heads = first_int(text, "num_attention_heads", "n_head")
    width = first_int(text, "hidden_size", "n_embd")
    vocab = first_int(text, "vocab_size")
    if not (layers and heads and width and vocab):
        return None
    kv_heads = first_int(text, "num_key_value_heads") or heads
    head_dim = first_int(text, "head_dim") or width // heads
    batch = max(settings.batch_sizes)
    tokens = batch * (settings.prompt_length + settings.new_tokens)
    return {
        "kv_cache": tokens * layers * 2 * kv_heads * head_dim * FP32_BYTES,
        "logits": batch * vocab * FP32_BYTES,
    }


def machine_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def memory_note(settings: GenerationSettings, config: dict) -> str | None:
    """'generation: the largest batch, B, holds about ... in FP32' and, where it is more, this
    machine's memory."""
    found = batch_bytes(settings, config)
    if found is None:
        return None
    total = sum(found.values())
    note = (
        f"generation: batch size {max(settings.batch_sizes)} holds about {total / GIB:.3g} GiB in "
        f"FP32 (KV cache {found['kv_cache'] / GIB:.3g} GiB, a step's logits "
        f"{found['logits'] / GIB:.3g} GiB)"
    )
    memory = machine_memory_bytes()
    if memory is not None and total > memory:
        note += (
            f", more than this machine's {memory / GIB:.3g} GiB: a node that runs it needs more, "
            "or a smaller batch size"
        )
    return note
