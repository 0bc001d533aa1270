"""Models: the prepared FP32 checkpoint in the cache, and its way to nodes without this disk.

Every variant of a job quantizes the same saved FP32 checkpoint. `prepare_model` materialises it
once (a randomly initialised classification head or inline architecture gets its weights here, from
the job's seed) into a cache folder keyed by a content hash, so variants on any worker load
identical weights and a second run reuses the folder. A hub model is keyed by the commit its
revision resolves to. Nodes that do not share this machine's disk get the folder as a tar.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from runner import folders
from runner.job import JobSpec, ModelSource
from runner.model_checks import labels_in_config, model_config, pretrained_name, read_config
from runner.tasks import TASKS

MARKER = "quantbench-model.json"


def cache_root() -> Path:
    return Path(os.environ.get("QUANTBENCH_CACHE", Path.home() / ".cache" / "quantbench"))


def label_names(config) -> list[str]:
    """A loaded transformers config's label names in id order, as a prepared model records them."""
    return [config.id2label[i] for i in sorted(config.id2label)]


def model_label_names(source: ModelSource, job: Path, field: str = "model") -> list[str]:
    """The label names of a source's config as planning reads them (model_checks.model_config)."""
    return labels_in_config(model_config(source, job, field))


# ---------------------------------------------------------------------------------------------
# The prepared checkpoint.


def _hash_folder(folder: Path, digest) -> None:
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)


def hub_commit(source: ModelSource) -> str | None:
    """The commit a hub source's revision resolves to in the local Hugging Face cache, without the
    network: the snapshot folder is named by it. None for other sources, or a revision not cached.

    Validation reads a hub model's config and tokenizer first, which fills the cache (its
    refs/<revision> names the commit): a branch that moves on the hub then gives a new key."""
    if not source.hub:
        return None
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(source.hub, revision=source.revision, local_files_only=True)
    except (OSError, ValueError):  # not in the cache (LocalEntryNotFoundError), or no repo id
        return None
    return Path(folder).name


def _hash_source(source: ModelSource, digest) -> None:
    digest.update(source.describe().encode() if source.hub or source.config is None else b"inline")
    commit = hub_commit(source)
    if commit is not None:
        digest.update(f"|commit={commit}".encode())
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


class _DropMessages(logging.Filter):
    """Drops a logger's records whose message contains any of these texts."""

    def __init__(self, *texts: str):
        super().__init__()
        self.texts = texts

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in self.texts)


_TORCHAO_IMPORT_NOISE = _DropMessages("Failed to load")
_PYTREE_ENUM_NOTICE = _DropMessages("is an Enum subclass")


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
    # Importing torchao logs the CUDA extensions a CPU build cannot load, and a torch notice about
    # how it registers its enums; its configs work without either.
    # (A logger adds one filter object once: calling this again adds nothing.)
    logging.getLogger("torchao").addFilter(_TORCHAO_IMPORT_NOISE)
    logging.getLogger("torch.utils._pytree").addFilter(_PYTREE_ENUM_NOTICE)


def prepare_model(spec: JobSpec) -> tuple[Path, dict]:
    """The job's FP32 checkpoint and tokenizer in the cache; (folder, its description). Cached by
    content."""
    key, commit = model_key(spec), hub_commit(spec.model)
    folder = cached_model(key)
    if folder is not None:
        return folder, cached_info(folder)

    import torch
    import transformers
    from transformers import AutoTokenizer

    # The missing head is reported in the run's output and the results; not as a loader's table.
    quiet_libraries()
    started = time.perf_counter()
    torch.manual_seed(spec.seed)
    model_class = getattr(transformers, TASKS[spec.task].model_class)
    if spec.model.config is not None:
        model = model_class.from_config(read_config(spec.model, spec.file))
        newly_initialised = ["all weights (inline architecture)"]
    else:
        model, loading = model_class.from_pretrained(
            pretrained_name(spec.model),
            revision=commit or spec.model.revision,  # the weights the key names
            dtype=torch.float32,
            output_loading_info=True,
        )
        newly_initialised = sorted(loading.get("missing_keys", []))
    tokenizer_source = spec.tokenizer or spec.model
    tokenizer = AutoTokenizer.from_pretrained(
        pretrained_name(tokenizer_source),
        revision=hub_commit(tokenizer_source) or tokenizer_source.revision,
    )
    info = {
        "key": key,
        "source": spec.model.describe(),
        **({"commit": commit} if spec.model.hub else {}),
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
        tmp.chmod(0o777 & ~folders.current_umask())  # mkdtemp's 0700 would hide it from other users
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
