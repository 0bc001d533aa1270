"""Models: where a job's weights come from, their label names, and the prepared FP32 checkpoint.

Every variant of a job quantizes the same saved FP32 checkpoint. `prepare_model` materialises it
once (a randomly initialised classification head or inline architecture gets its weights here, from
the job's seed) into a cache folder keyed by a content hash, so variants on any worker load
identical weights and a second run reuses the folder.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from runner import results
from runner.spec import JobSpec, ModelSource, SpecError

MARKER = "quantbench-model.json"


def cache_root() -> Path:
    return Path(os.environ.get("QUANTBENCH_CACHE", Path.home() / ".cache" / "quantbench"))


def package_folder(package: str) -> Path:
    """'pkg/sub/folder' -> the folder inside the installed package pkg."""
    name, _, rest = package.partition("/")
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"no installed Python package named {name!r}")
    folder = Path(list(spec.submodule_search_locations)[0]) / rest
    if not folder.is_dir():
        raise FileNotFoundError(f"package {name!r} has no folder {rest!r} ({folder})")
    return folder


def pretrained_name(source: ModelSource) -> str:
    """What to hand to from_pretrained for a source that has files."""
    if source.path:
        return str(source.path)
    if source.package:
        return str(package_folder(source.package))
    return source.hub


def check_source(source: ModelSource, job: Path, field: str) -> None:
    if source.package:
        try:
            package_folder(source.package)
        except FileNotFoundError as error:
            raise SpecError(
                job, f"{field}.package", source.package, f"{error}; install it first"
            ) from None


def read_config(source: ModelSource, job: Path, field: str = "model"):
    """The model's transformers config (config.json only: no weights are read)."""
    from transformers import AutoConfig

    if source.config is not None:
        from transformers import CONFIG_MAPPING

        config = dict(source.config)
        model_type = config.pop("model_type")
        if (
            model_type not in CONFIG_MAPPING
        ):  # transformers' own message lists every type it knows (12 KB)
            close = difflib.get_close_matches(str(model_type), list(CONFIG_MAPPING.keys()), n=3)
            raise SpecError(
                job,
                f"{field}.config.model_type",
                model_type,
                "not a model type transformers knows"
                + (f"; did you mean {', '.join(close)}?" if close else ""),
            )
        try:
            built = AutoConfig.for_model(model_type, **config)
        except (ValueError, TypeError) as error:
            raise SpecError(
                job, f"{field}.config", source.config, f"not a valid {model_type} config: {error}"
            ) from None
        check_heads(built, job, field)
        return built
    check_source(source, job, field)
    try:
        return AutoConfig.from_pretrained(pretrained_name(source), revision=source.revision)
    except (OSError, ValueError) as error:
        raise SpecError(
            job, field, source.describe(), f"cannot read the model's config: {error}"
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


def label_names(config) -> list[str]:
    return [config.id2label[i] for i in sorted(config.id2label)]


def local_folder(source: ModelSource, job: Path, field: str) -> Path | None:
    """The folder of a path or package source, whose files can be checked here; None for the hub
    (its files cannot be listed offline), an inline config (it has none) or a path that is not a
    folder."""
    if not (source.path or source.package):
        return None
    check_source(source, job, field)
    folder = Path(pretrained_name(source))
    return folder if folder.is_dir() else None


def model_config(source: ModelSource, job: Path, field: str = "model") -> dict:
    """The model's config as a dict. A local model's is its config.json, read without importing
    transformers (and torch): planning stays quick."""
    folder = local_folder(source, job, field)
    if folder is None:
        return read_config(source, job, field).to_dict()  # inline configs, the hub
    if not (folder / "config.json").is_file():
        below = sorted(str(c.parent.relative_to(folder)) for c in folder.glob("*/config.json"))
        hint = (
            f"; a folder below holds one: {', '.join(below)}"
            if below
            else "; name the folder that save_pretrained wrote"
        )
        raise SpecError(job, field, str(folder), f"the folder has no config.json{hint}")
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise SpecError(
            job, field, source.describe(), f"cannot read the model's config: {error}"
        ) from None
    if not isinstance(config, dict):
        raise SpecError(
            job,
            field,
            f"{folder / 'config.json'}: a JSON {type(config).__name__}",
            "a model's config.json is one JSON object of the model's settings",
        )
    return config


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


def model_label_names(source: ModelSource, job: Path, field: str = "model") -> list[str]:
    return labels_in_config(model_config(source, job, field))


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


def check_tokenizer_files(source: ModelSource, job: Path, field: str) -> None:
    """A local folder must hold a tokenizer's vocabulary. Without one, transformers builds a
    tokenizer of a handful of special tokens, every word becomes [UNK], and every variant runs 'ok'
    on nonsense."""
    if source.hub:
        check_hub_tokenizer(source, job, field)
    folder = local_folder(source, job, field)
    if folder is not None and not any((folder / name).is_file() for name in VOCABULARY_FILES):
        hint = (
            "save the tokenizer beside the model (tokenizer.save_pretrained) or name one with "
            "tokenizer:"
            if field == "model"
            else "name a folder that holds one"
        )
        raise SpecError(
            job,
            field,
            str(folder),
            f"the folder has no tokenizer vocabulary (none of {', '.join(VOCABULARY_FILES)}); "
            f"{hint}",
        )


def check_hub_tokenizer(source: ModelSource, job: Path, field: str) -> None:
    """A hub tokenizer is loaded now, as a hub model's config is: offline and not in the cache, it
    would fail only at model preparation, after Ray started (blaming the model). Online, this fills
    the cache that preparation then reads."""
    from transformers import AutoTokenizer

    try:
        AutoTokenizer.from_pretrained(source.hub, revision=source.revision)
    except (OSError, ValueError) as error:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        said = "HF_HUB_OFFLINE is set and it is not in the Hugging Face cache; " if offline else ""
        raise SpecError(
            job,
            f"{field}.hub",
            source.hub,
            f"cannot load the tokenizer: {said}"
            f"{str(error).splitlines()[0] if str(error) else type(error).__name__}",
        ) from None


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
        try:
            shards = sorted(
                set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
            )
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
        files += [folder / name for name in shards]
    from safetensors import SafetensorError, safe_open

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


# ---------------------------------------------------------------------------------------------
# The prepared checkpoint.


def _hash_folder(folder: Path, digest) -> None:
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)


def _hash_source(source: ModelSource, digest) -> None:
    digest.update(source.describe().encode() if source.hub or source.config is None else b"inline")
    if source.config is not None:
        digest.update(json.dumps(source.config, sort_keys=True).encode())
    elif source.hub is None:
        _hash_folder(Path(pretrained_name(source)), digest)


def model_key(spec: JobSpec) -> str:
    digest = hashlib.sha256(b"quantbench-model-v1")
    _hash_source(spec.model, digest)
    digest.update(b"|tokenizer|")
    if spec.tokenizer is not None:
        _hash_source(spec.tokenizer, digest)
    digest.update(f"|seed={spec.seed}".encode())
    return digest.hexdigest()[:20]


def cached_model(key: str) -> Path | None:
    folder = cache_root() / "models" / key
    return folder if (folder / MARKER).is_file() else None


def cached_info(folder: Path) -> dict:
    """What a cache entry holds, as written beside it when it was made."""
    return {**json.loads((folder / MARKER).read_text()), "cached": True, "folder": str(folder)}


def quiet_libraries() -> None:
    """Loading reports, progress bars and deprecation notices are not for our output: what matters
    goes into the results."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings(
        "ignore", message=".*inputs will be cast from.*"
    )  # said once in the settings
    warnings.filterwarnings("ignore", category=UserWarning, module="torch.ao.quantization")


def prepare_model(spec: JobSpec) -> tuple[Path, dict]:
    """The job's FP32 checkpoint and tokenizer in the cache; (folder, its description). Cached by
    content."""
    key = model_key(spec)
    folder = cached_model(key)
    if folder is not None:
        return folder, cached_info(folder)

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    # The missing head is reported in the run's output and the results; not as a loader's table.
    quiet_libraries()
    started = time.perf_counter()
    torch.manual_seed(spec.seed)
    if spec.model.config is not None:
        model = AutoModelForSequenceClassification.from_config(read_config(spec.model, spec.file))
        newly_initialised = ["all weights (inline architecture)"]
    else:
        model, loading = AutoModelForSequenceClassification.from_pretrained(
            pretrained_name(spec.model),
            revision=spec.model.revision,
            dtype=torch.float32,
            output_loading_info=True,
        )
        newly_initialised = sorted(loading.get("missing_keys", []))
    tokenizer_source = spec.tokenizer or spec.model
    tokenizer = AutoTokenizer.from_pretrained(
        pretrained_name(tokenizer_source), revision=tokenizer_source.revision
    )
    info = {
        "key": key,
        "source": spec.model.describe(),
        "tokenizer": tokenizer_source.describe(),
        "seed": spec.seed,
        "newly_initialised": newly_initialised,
        "parameters": sum(p.numel() for p in model.parameters()),
        "label_names": label_names(model.config),
    }
    save_folder(key, info, lambda tmp: (model.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))
    info["prepare_s"] = round(time.perf_counter() - started, 3)
    return cache_root() / "models" / key, {**info, "cached": False}


def save_folder(key: str, info: dict, write) -> Path:
    """Write a cache entry through a temporary folder and a rename: a crash leaves no half entry."""
    final = cache_root() / "models" / key
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=final.parent))
    try:
        tmp.chmod(0o777 & ~results.current_umask())  # mkdtemp's 0700 would hide it from other users
        write(tmp)
        if not (tmp / MARKER).exists():
            (tmp / MARKER).write_text(json.dumps(info, indent=2))
        if final.exists():  # another run finished the same entry first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


# ---------------------------------------------------------------------------------------------
# Moving a prepared model to nodes that do not share this machine's disk.


def archive_folder(folder: Path) -> bytes:
    """The folder as an uncompressed tar (weights do not compress): sent once through Ray's object
    store."""
    import io
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path in sorted(p for p in folder.iterdir() if p.is_file()):
            tar.add(path, arcname=path.name)
    return buffer.getvalue()


def unpack_archive(key: str, archive: bytes) -> Path:
    import io
    import tarfile

    existing = cached_model(key)
    if existing is not None:
        return existing
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r") as tar:
        info = json.load(tar.extractfile(MARKER))
    return save_folder(key, info, lambda tmp: extract_flat(archive, tmp))


def extract_flat(archive: bytes, folder: Path) -> None:
    """The plain files of a flat tar (what archive_folder makes) into folder, and nothing else: a
    link, a device, a folder or a name with a path in it is refused. By hand rather than with
    extractall(filter="data"), which Python 3.11.0-3.11.3 do not have."""
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(archive), mode="r") as tar:
        for member in tar:
            if (
                not member.isfile()
                or member.name in ("", ".", "..")
                or Path(member.name).name != member.name
            ):
                raise ValueError(
                    f"model archive: refusing {member.name!r}: only plain files at its top level"
                )
            with tar.extractfile(member) as source, open(Path(folder) / member.name, "xb") as out:
                shutil.copyfileobj(source, out)
