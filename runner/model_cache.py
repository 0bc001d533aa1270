"""The model cache: the prepared FP32 checkpoints every variant of a job quantizes, keyed by a
content hash, and their way to nodes that do not share this machine's disk (a tar through Ray's
object store).

A hub model is keyed by the commit its revision resolves to, a local folder by its files, an
inline architecture by its config, all with the job's seed. Plain files, no torch: the driver and
`quantbench validate` key models here; runner/models.py prepares them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

from huggingface_hub import snapshot_download

from runner import folders
from runner.folders import cache_root
from runner.job import JobSpec, ModelSource
from runner.model_checks import pretrained_name
from runner.model_files import checked_sha256, hash_file

MARKER = "quantbench-model.json"


# ---------------------------------------------------------------------------------------------
# The prepared checkpoint.


# The files of a model folder that from_pretrained reads (its top level only): the configs and
# the shards' indexes, the weights, the tokenizer's files. A folder's key hashes these and the
# shards an index names; an unrelated file beside them (a 4 GiB archive, a notes file) is not read
# by the model and not hashed.
LOADED_FILES = (
    "*.json",
    "model.safetensors",
    "model-*.safetensors",
    "pytorch_model.bin",
    "pytorch_model-*.bin",
    "*.model",  # sentencepiece
    "*.tiktoken",
    "vocab.txt",
    "merges.txt",
    "*.jinja",  # a chat template
)


def loaded_files(folder: Path) -> list[Path]:
    """The files of a model folder its model and tokenizer are loaded from, sorted by name."""
    names = {p.name for pattern in LOADED_FILES for p in folder.glob(pattern) if p.is_file()}
    for index in folder.glob("*.index.json"):  # the shards it names, whatever their names
        try:
            shards = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values()
        except (OSError, ValueError, AttributeError):  # validation names a broken index
            continue
        names.update(s for s in shards if isinstance(s, str) and Path(s).name == s)
    return [folder / name for name in sorted(names) if (folder / name).is_file()]


def _hash_folder(folder: Path, digest) -> None:
    for path in loaded_files(folder):
        digest.update(path.name.encode())
        hash_file(path, digest)


def hub_commit(source: ModelSource) -> str | None:
    """The commit a hub source's revision resolves to in the local Hugging Face cache, without the
    network: the snapshot folder is named by it. None for other sources, or a revision not cached.

    Validation reads a hub model's config and tokenizer first, which fills the cache (its
    refs/<revision> names the commit): a branch that moves on the hub then gives a new key."""
    if not source.hub:
        return None
    try:
        folder = snapshot_download(source.hub, revision=source.revision, local_files_only=True)
    except (OSError, ValueError):  # not in the cache (LocalEntryNotFoundError), or no repo id
        return None
    return Path(folder).name


def _hash_source(source: ModelSource, digest, job: Path) -> None:
    files = source.gguf or source.archive
    if files is not None:  # keyed by the file's content, wherever it lies
        kind = "gguf" if source.gguf else "archive"
        digest.update(f"{kind}|sha256={checked_sha256(files, job, f'model.{kind}')}".encode())
        return
    digest.update(source.describe().encode() if source.hub or source.config is None else b"inline")
    commit = hub_commit(source)
    if commit is not None:
        digest.update(f"|commit={commit}".encode())
    if source.config is not None:
        digest.update(json.dumps(source.config, sort_keys=True).encode())
    elif source.hub is None:
        _hash_folder(Path(pretrained_name(source, job)), digest)


def model_key(spec: JobSpec) -> str:
    digest = hashlib.sha256(b"quantbench-model-v1")
    _hash_source(spec.model, digest, spec.file)
    digest.update(b"|tokenizer|")
    if spec.tokenizer is not None:
        _hash_source(spec.tokenizer, digest, spec.file)
    digest.update(f"|seed={spec.seed}".encode())
    return digest.hexdigest()[:20]


def cached_model(key: str) -> Path | None:
    folder = cache_root() / "models" / key
    return folder if (folder / MARKER).is_file() else None


def cached_info(folder: Path) -> dict:
    """What a cache entry holds, as written beside it when it was made."""
    return {**json.loads((folder / MARKER).read_text()), "cached": True, "folder": str(folder)}


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

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path in sorted(p for p in folder.iterdir() if p.is_file()):
            tar.add(path, arcname=path.name)
    return buffer.getvalue()


def unpack_archive(key: str, archive: bytes) -> Path:

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
