"""Results as files: one JSON per variant under DIR/<job>/<variant>.json, written atomically.

The folder is the record. A folder that holds results of a different job spec is refused unless the
user resumes (which reruns what does not match) or names a new folder; `--resume` skips variants whose
result for the same spec is already there and ok.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path


class ResultsConflict(Exception):
    pass


def result_path(results_dir: Path, job: str, variant_id: str) -> Path:
    return Path(results_dir) / job / f"{variant_id}.json"


def write_result(results_dir: Path, result: dict) -> Path:
    """Through a temporary file in the same folder and a rename: a reader never sees half a result."""
    path = result_path(results_dir, result["job"], result["variant"])
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(handle, 0o666 & ~current_umask())  # mkstemp's 0600 would hide it from other users
        with os.fdopen(handle, "w") as out:
            json.dump(result, out, indent=1, allow_nan=False, default=str)
            out.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# write_result's temporary files: mkstemp's prefix, 8 random characters, its suffix.
TEMPORARY = re.compile(r"\..+-[a-z0-9_]{8}\.tmp")


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Removes the temporary files of results that a killed run was writing; the caller holds the
    folder's lock, so no live run is writing them. Returns what it removed."""
    stale = [p for p in sorted(Path(folder).glob(".*.tmp")) if TEMPORARY.fullmatch(p.name) and p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def current_umask() -> int:
    """The process's umask: the permissions an ordinary open() would have left out."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def read_result(path: Path) -> dict | None:
    try:
        result = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    required = ("schema_version", "job", "variant", "status", "device")
    return result if isinstance(result, dict) and all(key in result for key in required) else None


def find_results(paths: list[Path]) -> list[dict]:
    """Every result file under the given folders (or the files themselves), in a stable order."""
    found = []
    for root in map(Path, paths):
        files = [root] if root.is_file() else sorted(root.rglob("*.json"))
        for file in files:
            result = read_result(file)
            if result is not None:
                result["_file"] = str(file)
                found.append(result)
    return found


def existing_results(results_dir: Path, job: str) -> dict[str, dict]:
    folder = Path(results_dir) / job
    if not folder.is_dir():
        return {}
    return {r["variant"]: r for r in find_results([folder])}


def plan_folder(results_dir: Path, job: str, spec_hash: str, variant_ids: list[str],
                resume: bool) -> tuple[dict[str, dict], dict[str, str]]:
    """(the existing results to keep, the existing results the run will replace: variant -> why) with
    --resume; raises when the folder holds another spec's results."""
    existing = existing_results(results_dir, job)
    if not resume:
        different = sorted(v for v, r in existing.items() if r.get("spec_hash") != spec_hash)
        if different:
            raise ResultsConflict(
                f"{Path(results_dir) / job} holds results of a different job spec ({', '.join(different)}); "
                "use --resume to keep what matches and rerun the rest (it replaces the others), "
                "or --results NEW_FOLDER")
        return {}, {}
    stranded = sorted(v for v, r in existing.items() if v not in variant_ids and r.get("spec_hash") != spec_hash)
    if stranded:
        raise ResultsConflict(
            f"{Path(results_dir) / job} holds results of a different job spec for variants this job no longer runs "
            f"({', '.join(stranded)}): --resume would leave them beside the new ones; use --results NEW_FOLDER")
    kept, replaced = {}, {}
    for v, r in existing.items():
        if v not in variant_ids:
            continue
        if r.get("spec_hash") != spec_hash:
            replaced[v] = "its result is of a different job spec"
        elif r.get("status") != "ok":
            replaced[v] = f"its result is {r.get('status')}"
        else:
            kept[v] = r
    return kept, replaced
