"""GGUF files (llama.cpp's format) as a model source: checked and described from their header at
validation; runner/models.py dequantizes the weights to FP32 once, into the model cache.

A GGUF holds a model already quantized (SmolLM2-135M's as Q4_1, Gemma-3-270M's as Q4_K_M): the
FP32 baseline made from one carries that rounding. Every result records the file's types per
tensor kind, so collect and report can say that an error below that floor cannot be told from the
original model's. transformers reads the header (and later the weights) with the `gguf` package.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from gguf import GGUFReader

from runner.fields import SpecError
from runner.job import ModelSource
from runner.model_files import checked_sha256, joined_file

MAGIC = b"GGUF"


@dataclass(frozen=True)
class GgufFile:
    name: str  # as the job names it
    path: Path  # the whole file (chunks joined in the cache)
    sha256: str
    architecture: str  # llama.cpp's name: llama, gemma3, qwen2, ...
    config: dict  # the transformers config fields transformers reads from the header
    tokens: tuple[str, ...]  # the file's tokenizer's vocabulary, in id order
    special: dict[str, str]  # bos_token, eos_token: the tokens the header names
    control: tuple[int, ...]  # the ids of control tokens (<|im_start|>, <bos>, ...)
    types: dict[str, dict[str, int]]  # tensor kind (attn_q, ffn_down, token_embd) -> type -> count
    license: str | None

    @property
    def vocabulary(self) -> int:
        return len(self.tokens)

    def tokenizer_files(self) -> dict[str, object]:
        """The tokenizer as the JSON files of a saved one would say it (runner/model_checks.py
        tokenizer_json_files): the checks of a tokenizer's tokens read a GGUF's the same way."""
        vocab = {token: i for i, token in enumerate(self.tokens)}
        added = [{"id": i, "content": self.tokens[i], "special": True} for i in self.control]
        return {
            "tokenizer.json": {"model": {"vocab": vocab}, "added_tokens": added},
            "tokenizer_config.json": self.special,
        }

    @property
    def lowest_bits(self) -> int:
        """The fewest bits of any matrix's type: 4 for a Q4_1 or Q4_K_M file."""
        return min(type_bits(t) for kind in self.types.values() for t in kind)

    def record(self) -> dict:
        """What every result keeps of the file (its `model.gguf`)."""
        return {
            "file": self.name,
            "sha256": self.sha256,
            "architecture": self.architecture,
            "license": self.license,
            "types": self.types,
            "lowest_bits": self.lowest_bits,
            "dequantized": self.lowest_bits < 32,
        }


def types_by_kind(types: dict[str, dict[str, int]]) -> str:
    """{'attn_q': {'Q4_1': 30}, 'attn_k': ..., 'token_embd': {'Q8_0': 1}} -> 'Q4_1 attn_*,
    ffn_*; Q8_0 token_embd': each type and the tensor kinds that hold it, a family of kinds (attn_,
    ffn_) as one where it holds one type."""
    kinds_of: dict[str, list[str]] = {}
    for kind, found in sorted(types.items()):
        for name in found:
            kinds_of.setdefault(name, []).append(kind)
    family_types: dict[str, set[str]] = {}
    family_size: dict[str, int] = {}
    for kind, found in types.items():
        family_types.setdefault(kind.split("_")[0], set()).update(found)
        family_size[kind.split("_")[0]] = family_size.get(kind.split("_")[0], 0) + 1
    shown = []
    for name, kinds in kinds_of.items():
        family = [k.split("_")[0] for k in kinds]
        words = [
            f"{f}_*" if family_size[f] > 1 and family_types[f] == {name} else k
            for k, f in zip(kinds, family)
        ]
        shown.append(f"{name} {', '.join(dict.fromkeys(words))}")
    return "; ".join(shown)


def type_bits(name: str) -> int:
    """The nominal bits per weight of a GGML type's name: Q4_K 4, IQ2_XS 2, Q8_0 8, BF16 16."""
    found = re.match(r"^(?:I|T)?Q(\d)", name) or re.match(r"^B?F(\d+)", name)
    return int(found.group(1)) if found else 32


def tensor_kind(name: str) -> str:
    """'blk.3.ffn_down.weight' -> 'ffn_down'; 'token_embd.weight' -> 'token_embd'."""
    parts = name.split(".")
    return parts[2] if parts[0] == "blk" and len(parts) > 3 else parts[0]


_READ: dict[str, GgufFile] = {}


def read_gguf(source: ModelSource, job: Path, field: str = "model") -> GgufFile:
    """The checked GGUF of a source: the file is there (its chunks too, with their sha256), it is a
    whole GGUF, and transformers reads its architecture. Else the SpecError saying which."""
    where = f"{field}.gguf"
    sha256 = checked_sha256(source.gguf, job, where)
    if sha256 not in _READ:
        path = joined_file(source.gguf, job, where, ".gguf")
        reader = _open_joined(source, path, job, where)
        tokens = _strings(reader, "tokenizer.ggml.tokens")
        _READ[sha256] = GgufFile(
            name=source.gguf.describe(),
            path=path,
            sha256=sha256,
            architecture=_field(reader, "general.architecture") or "?",
            config=_config(path, job, where),
            tokens=tokens,
            special=_special_tokens(reader, tokens),
            control=_control_ids(reader),
            types=_types(reader),
            license=_field(reader, "general.license"),
        )
    return _READ[sha256]


def _open_joined(source: ModelSource, path: Path, job: Path, where: str) -> GGUFReader:
    """The GGUF reader; where the file was joined from chunks, a file that does not read is the
    chunks' fault (one missing or out of order): said of them, and the join is not kept."""
    try:
        return _open(path, job, where)
    except SpecError as error:
        if len(source.gguf.chunks) == 1:
            raise
        path.unlink(missing_ok=True)
        chunks = ", ".join(chunk.describe() for chunk in source.gguf.chunks)
        raise SpecError(
            job,
            f"{where}.chunks",
            chunks,
            f"the {len(source.gguf.chunks)} chunks joined in this order are not a whole GGUF "
            f"({error.allowed}): a chunk is missing, out of order or damaged; give the job the "
            "file's sha256 to have each join checked",
        ) from None


def _open(path: Path, job: Path, where: str) -> GGUFReader:
    with path.open("rb") as handle:
        start = handle.read(4)
    if start != MAGIC:
        raise SpecError(
            job, where, str(path), f"not a GGUF file: it starts with {start!r}, not {MAGIC!r}"
        )
    try:
        reader = GGUFReader(path)
    except (ValueError, IndexError, KeyError) as error:  # its header runs past the file's end
        raise SpecError(
            job,
            where,
            str(path),
            f"the GGUF is truncated or damaged ({path.stat().st_size:,} bytes; the reader said: "
            f"{error}); copy or download it again",
        ) from None
    end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    if end > path.stat().st_size:
        raise SpecError(
            job,
            where,
            str(path),
            f"the GGUF is truncated: its tensors end at byte {end:,}, the file has "
            f"{path.stat().st_size:,}; copy or download it again",
        )
    return reader


def _config(path: Path, job: Path, where: str) -> dict:
    """transformers' reading of the header: the model's config fields; refuses an architecture it
    cannot build."""
    # Imported here, as cli.py imports for start-up: this module imports torch, which validating
    # a job of any other model source does not need (a second).
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    try:
        return dict(load_gguf_checkpoint(str(path), return_tensors=False)["config"])
    except (ValueError, KeyError, NotImplementedError) as error:
        raise SpecError(
            job,
            where,
            str(path),
            f"transformers cannot read this GGUF: {str(error).splitlines()[0]}",
        ) from None


def _field(reader: GGUFReader, name: str) -> str | None:
    found = reader.fields.get(name)
    if found is None or not found.data:
        return None
    return bytes(found.parts[found.data[0]]).decode("utf-8", errors="replace")


def _strings(reader: GGUFReader, name: str) -> tuple[str, ...]:
    found = reader.fields.get(name)
    if found is None:
        return ()
    return tuple(bytes(found.parts[i]).decode("utf-8", errors="replace") for i in found.data)


def _special_tokens(reader: GGUFReader, tokens: tuple[str, ...]) -> dict[str, str]:
    special = {}
    for name in ("bos", "eos"):
        found = reader.fields.get(f"tokenizer.ggml.{name}_token_id")
        if found is not None and found.data and int(found.parts[found.data[0]][0]) < len(tokens):
            special[f"{name}_token"] = tokens[int(found.parts[found.data[0]][0])]
    return special


CONTROL = 3  # llama.cpp's token type of a special (control) token


def _control_ids(reader: GGUFReader) -> tuple[int, ...]:
    found = reader.fields.get("tokenizer.ggml.token_type")
    if found is None:
        return ()
    return tuple(n for n, i in enumerate(found.data) if int(found.parts[i][0]) == CONTROL)


def _types(reader: GGUFReader) -> dict[str, dict[str, int]]:
    """The quantization types of the matrices (one-dimensional norms and biases stay F32)."""
    counts: dict[str, Counter] = {}
    for tensor in reader.tensors:
        if len(tensor.shape) >= 2:
            counts.setdefault(tensor_kind(tensor.name), Counter())[tensor.tensor_type.name] += 1
    return {kind: dict(found.most_common()) for kind, found in counts.items()}
