"""Model checks: a job's model source read and checked before Ray starts, from its files alone.

Where the weights come from (a folder, an installed package), the model's label names, whether a
local folder holds a tokenizer's special tokens and whole weights. Each of these would otherwise
fail only while loading, in every variant, after Ray started. No transformers and no torch: the
tasks' declarations read a config's labels and a tokenizer's tokens with these;
runner/model_source.py reads what needs transformers (an inline or a hub config).
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError, safe_open

from runner.fields import SpecError
from runner.gguf_files import read_gguf
from runner.job import ModelSource
from runner.model_files import package_folder, unpacked_archive


def pretrained_name(source: ModelSource, job: Path = Path("the job")) -> str:
    """What to hand to from_pretrained for a source that has files (job: for the errors of a zip
    that validation has not unpacked)."""
    if source.path:
        return str(source.path)
    if source.package:
        return str(package_folder(source.package))
    if source.archive:
        return str(unpacked_archive(source.archive, job, "model"))
    return source.hub


# Where a config keeps its position table: max_position_embeddings, GPT-2 n_positions.
POSITION_KEYS = ("max_position_embeddings", "n_positions")


def position_table(config: dict) -> tuple[int, str] | None:
    """(the most tokens the model takes, the config key that says so); None for relative or rotary
    positions, which have no fixed table to outgrow."""
    for key in POSITION_KEYS:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value, key
    return None


def check_source(source: ModelSource, job: Path, field: str) -> None:
    if source.package:
        try:
            package_folder(source.package)
        except FileNotFoundError as error:
            raise SpecError(
                job, f"{field}.package", source.package, f"{error}; install it first"
            ) from None


def check_heads(config, job: Path, field: str) -> None:
    """The one rule of an inline architecture that its config accepts but building the model refuses
    (in every variant, after Ray started): each attention head takes hidden_size /
    num_attention_heads dimensions, unless the config names head_dim itself."""
    hidden, heads = (
        getattr(config, "hidden_size", None),
        getattr(config, "num_attention_heads", None),
    )
    if (
        getattr(config, "head_dim", None) is None
        and isinstance(hidden, int)
        and isinstance(heads, int)
        and heads > 0
        and hidden % heads
    ):
        raise SpecError(
            job,
            f"{field}.config.hidden_size",
            hidden,
            f"must be a multiple of num_attention_heads ({heads}): each head takes an equal share",
        )


def local_folder(source: ModelSource, job: Path, field: str) -> Path | None:
    """The folder of a path or package source, whose files can be checked here; None for the hub
    (its files cannot be listed offline), an inline config (it has none) or a path that is not a
    folder."""
    if not (source.path or source.package or source.archive):
        return None
    check_source(source, job, field)
    folder = Path(pretrained_name(source, job))
    return folder if folder.is_dir() else None


def config_labels(config: dict, job: Path, source: ModelSource, field: str = "model") -> list[str]:
    """labels_in_config, after checking the fields it reads: a hand-edited config.json can hold what
    transformers would refuse only while loading, after Ray started."""
    where = f"{source.describe()}: config.json"
    id2label, count = config.get("id2label"), config.get("num_labels", 2)
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise SpecError(
            job, field, f"{where}: num_labels {count!r}", "num_labels is a whole number, 1 or more"
        )
    if id2label:
        if not isinstance(id2label, dict):
            raise SpecError(
                job,
                field,
                f"{where}: id2label {id2label!r}",
                'id2label maps label ids to names: {"0": ...}',
            )
        bad = [key for key in id2label if not str(key).strip().lstrip("-").isdigit()]
        if bad:
            raise SpecError(
                job,
                field,
                f"{where}: id2label key {bad[0]!r}",
                'the keys of id2label are label ids, whole numbers ("0", "1", ...)',
            )
    return labels_in_config(config)


def labels_in_config(config: dict) -> list[str]:
    """The label names in id order, as transformers reads them from a config."""
    if config.get("id2label"):
        id2label = {int(i): name for i, name in config["id2label"].items()}
        return [id2label[i] for i in sorted(id2label)]
    return [f"LABEL_{i}" for i in range(int(config.get("num_labels", 2)))]  # transformers' defaults


# What a tokenizer's vocabulary is saved in, by kind: WordPiece, BPE, SentencePiece, or any fast
# tokenizer.
VOCABULARY_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)


# What a model's weights are saved in: one file, or shards listed in an index.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def check_weight_files(source: ModelSource, job: Path, field: str = "model") -> None:
    """A local folder must hold whole weights. Without them, or with a safetensors file cut short
    (an interrupted copy), the run would stop at loading, after starting Ray. safetensors checks
    each file's header against its size without reading the tensors (and without torch)."""
    folder = local_folder(source, job, field)
    if folder is None:
        return
    found = [name for name in WEIGHT_FILES if (folder / name).is_file()]
    if not found:
        raise SpecError(
            job,
            field,
            str(folder),
            f"the folder has no weights (none of {', '.join(WEIGHT_FILES)}); "
            "save them beside the config with model.save_pretrained",
        )
    files = [folder / name for name in found if not name.endswith(".index.json")]
    for index in (folder / name for name in found if name.endswith(".index.json")):
        files += shard_files(index, job, field)
    check_safetensors_headers(files, job, field)


def shard_files(index: Path, job: Path, field: str) -> list[Path]:
    """The shards a weights index names, each of which the folder must hold."""
    folder = index.parent
    try:
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    except (OSError, ValueError, KeyError, AttributeError) as error:
        raise SpecError(
            job,
            field,
            str(index),
            f"cannot read the shard index: {type(error).__name__}: {error}",
        ) from None
    missing = [name for name in shards if not (folder / name).is_file()]
    if missing:
        raise SpecError(
            job,
            field,
            str(index),
            f"the index names shards the folder does not hold: {', '.join(missing)}",
        )
    return [folder / name for name in shards]


def check_safetensors_headers(files: list[Path], job: Path, field: str) -> None:
    for path in files:
        if path.suffix != ".safetensors":
            continue  # a pickled .bin is only read by torch, at load time
        try:
            with safe_open(str(path), framework="numpy"):
                pass
        except (SafetensorError, OSError) as error:
            raise SpecError(
                job,
                field,
                str(path),
                f"the weights file is damaged ({error}); copy or save the model again",
            ) from None


def tokenizer_json_files(source: ModelSource, job: Path, field: str) -> dict[str, object]:
    """The tokenizer's JSON files of a local folder, by name (tokenizer_config.json,
    special_tokens_map.json, tokenizer.json), as read; {} for the hub or an unreadable file. A
    GGUF's tokenizer is in its header: its tokens and special tokens in the same shape."""
    if source.gguf is not None:
        return read_gguf(source, job, field).tokenizer_files()
    folder = local_folder(source, job, field)
    found = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"):
        try:
            found[name] = json.loads((folder / name).read_text(encoding="utf-8"))
        except (TypeError, OSError, ValueError):
            continue
    return found


def tokenizer_size(source: ModelSource, job: Path, field: str) -> int | None:
    """Tokens in a local tokenizer.json (its vocabulary and added tokens); None where there is no
    such file to read (the hub, a SentencePiece model alone)."""
    tokenizer = tokenizer_json_files(source, job, field).get("tokenizer.json")
    if not isinstance(tokenizer, dict):
        return None
    model = tokenizer.get("model") or {}
    vocab = model.get("vocab")
    ids = list(vocab.values()) if isinstance(vocab, dict) else []
    if isinstance(vocab, list):  # Unigram: [[piece, score], ...]
        ids = list(range(len(vocab)))
    ids += [t.get("id", 0) for t in tokenizer.get("added_tokens") or [] if isinstance(t, dict)]
    ids = [i for i in ids if isinstance(i, int)]
    return max(ids) + 1 if ids else None


def special_token(files: dict[str, object], name: str) -> str | None:
    for file in ("tokenizer_config.json", "special_tokens_map.json"):
        value = files.get(file, {}).get(name) if isinstance(files.get(file), dict) else None
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str) and value:
            return value
    return None
