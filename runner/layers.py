"""Layer types: what a linear layer does in its model, read from its module name alone.

The weight analysis, the sensitivity study's groups and the report's figures name layers by type
(query, mlp_down, lm_head, ...) and by depth (the index of the block they sit in). Plain text
matching, no torch: the report reads the types without importing it.
"""

from __future__ import annotations

import re

LAYER_TYPES = (
    "query",
    "key",
    "value",
    "query_key_value",  # one fused projection: GPT-2's attn.c_attn
    "attention_output",
    "intermediate",
    "output",
    # A decoder's MLP: gate and up project into the MLP, down out of it (GPT-2: c_fc, c_proj).
    "mlp_gate",
    "mlp_up",
    "mlp_down",
    "classifier",
    "pooler",
    "lm_head",
    "other",
)

# First match wins; order matters where one name contains another (attention.output before output).
_LAYER_TYPE_PATTERNS = [
    ("query", re.compile(r"(^|\.)(query|q_proj|q_lin)$")),
    ("key", re.compile(r"(^|\.)(key|k_proj|k_lin)$")),
    ("value", re.compile(r"(^|\.)(value|v_proj|v_lin)$")),
    # Before attention_output: RoBERTa's head is classifier.out_proj.
    ("classifier", re.compile(r"(^|\.)(pre_classifier|classifier)(\.|$)")),
    (
        "attention_output",
        re.compile(r"(attention\.output\.dense|(^|\.)(o_proj|out_proj|out_lin))$"),
    ),
    ("intermediate", re.compile(r"(intermediate\.dense|ffn\.lin1)$")),
    ("output", re.compile(r"(output\.dense|ffn\.lin2)$")),
    ("pooler", re.compile(r"(^|\.)pooler(\.|$)")),
    ("query_key_value", re.compile(r"(^|\.)(c_attn|qkv_proj|query_key_value)$")),
    ("attention_output", re.compile(r"attn\.c_proj$")),
    ("mlp_gate", re.compile(r"(^|\.)gate_proj$")),
    ("mlp_up", re.compile(r"((^|\.)up_proj|mlp\.c_fc)$")),
    ("mlp_down", re.compile(r"((^|\.)down_proj|mlp\.c_proj)$")),
    ("lm_head", re.compile(r"(^|\.)lm_head$")),
]
_DEPTH_PATTERN = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)(?:\.|$)")


def classify_layer(name: str) -> tuple[str, int | None]:
    """(layer_type, depth) from a BERT-style module name; depth is the encoder layer index or
    None."""
    layer_type = next((t for t, pattern in _LAYER_TYPE_PATTERNS if pattern.search(name)), "other")
    match = _DEPTH_PATTERN.search(name)
    return layer_type, (int(match.group(1)) if match else None)


def block_of(name: str) -> str | None:
    """The module name of the repeated block a layer sits in ("model.layers.3" for
    "model.layers.3.mlp.down_proj"), or None for a layer of no block (a head)."""
    match = _DEPTH_PATTERN.search(name)
    return name[: match.end(1)] if match else None
