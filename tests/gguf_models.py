"""Tiny GGUF files written in the tests with the `gguf` package, as llama.cpp's converter writes
them: a random 2-block Llama whose matrices are Q4_0 and Q8_0, with the repository's byte-level
BPE tokenizer (tokenizers/rt-polarity-bpe) in the file.

Nothing is downloaded. transformers reads these files as it reads SmolLM2's GGUF: the config from
the `llama.*` fields, the tokenizer from the `tokenizer.ggml.*` fields, the weights by llama.cpp's
tensor names (token_embd.weight, blk.N.attn_q.weight, ..., output_norm.weight; no output.weight:
the embedding is tied, as SmolLM2's is).
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
from conftest import REPO

TOKENIZER = REPO / "tokenizers" / "rt-polarity-bpe" / "tokenizer.json"
HIDDEN, BLOCKS, HEADS, FFN, CONTEXT = 32, 2, 2, 64, 64
# The types the tiny file gives each tensor kind: 4-bit attention, 8-bit the rest.
ATTENTION = ("attn_q", "attn_k", "attn_v", "attn_output")
FEED_FORWARD = ("ffn_gate", "ffn_up", "ffn_down")
TYPES = {**dict.fromkeys(ATTENTION, "Q4_0"), **dict.fromkeys(FEED_FORWARD, "Q8_0")}
TYPES["token_embd"] = "Q8_0"
# Wider than transformers' 0.02, as tests/lm_models.py's: a random model then reads its context.
SCALE = 0.3


def bpe_tokenizer() -> dict:
    """The shipped tokenizer's vocabulary (tokens by id), merges and special tokens."""
    shipped = json.loads(TOKENIZER.read_text(encoding="utf-8"))
    vocab = shipped["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens))), "the vocabulary has gaps"
    merges = [" ".join(pair) for pair in shipped["model"]["merges"]]
    specials = {t["content"]: t["id"] for t in shipped["added_tokens"]}
    return {"tokens": tokens, "merges": merges, "specials": specials}


def write_tiny_gguf(path: Path, seed: int = 0, architecture: str = "llama") -> Path:
    """A random 2-block Llama of the shipped BPE's vocabulary as a GGUF file at path (0.3 MB,
    half a second); architecture: the general.architecture it states, its fields named so."""
    tokenizer = bpe_tokenizer()
    writer = gguf.GGUFWriter(path, architecture)
    writer.add_name("quantbench-tiny-llama")
    writer.add_license("apache-2.0")
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(BLOCKS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(HEADS)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    _add_tokenizer(writer, tokenizer)
    _add_tensors(writer, len(tokenizer["tokens"]), np.random.default_rng(seed))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_tokenizer(writer, tokenizer: dict) -> None:
    specials = tokenizer["specials"]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokenizer["tokens"])
    writer.add_token_types(
        [
            gguf.TokenType.CONTROL if token in specials else gguf.TokenType.NORMAL
            for token in tokenizer["tokens"]
        ]
    )
    writer.add_token_merges(tokenizer["merges"])
    writer.add_bos_token_id(specials["<s>"])
    writer.add_eos_token_id(specials["</s>"])
    writer.add_pad_token_id(specials["<pad>"])
    writer.add_add_bos_token(False)  # perplexity puts the BOS itself, as for SmolLM2


def _add_tensors(writer, vocabulary: int, rng) -> None:
    """llama.cpp's names and layout: a matrix of `rows` outputs and `cols` inputs as (rows, cols),
    quantized per row in blocks of 32; norms stay F32."""
    shapes = {
        "attn_q": (HIDDEN, HIDDEN),
        "attn_k": (HIDDEN, HIDDEN),
        "attn_v": (HIDDEN, HIDDEN),
        "attn_output": (HIDDEN, HIDDEN),
        "ffn_gate": (FFN, HIDDEN),
        "ffn_up": (FFN, HIDDEN),
        "ffn_down": (HIDDEN, FFN),
    }
    _add_matrix(writer, "token_embd.weight", rng.normal(0, SCALE, (vocabulary, HIDDEN)))
    for block in range(BLOCKS):
        for norm in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{block}.{norm}.weight", np.ones(HIDDEN, dtype=np.float32))
        for kind, shape in shapes.items():
            _add_matrix(writer, f"blk.{block}.{kind}.weight", rng.normal(0, SCALE, shape))
    writer.add_tensor("output_norm.weight", np.ones(HIDDEN, dtype=np.float32))


def _add_matrix(writer, name: str, weights: np.ndarray) -> None:
    qtype = gguf.GGMLQuantizationType[TYPES[name.split(".")[-2]]]
    data = gguf.quants.quantize(weights.astype(np.float32), qtype)
    writer.add_tensor(name, data, raw_dtype=qtype)
