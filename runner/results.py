"""Results as files: one JSON per variant under DIR/<job>/<variant>.json, written atomically.

The folder is the record. A folder that holds results of a different job spec is refused unless the
user resumes (which reruns what does not match) or names a new folder; `--resume` skips variants
whose result for the same spec is already there and ok.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from runner.folders import ResultsConflict, write_json
from runner.schema import Result, UnusableFile, check_study, read_result
from runner.tasks import DEFAULT_TASK, TASKS


def result_path(results_dir: Path, job: str, variant_id: str) -> Path:
    return Path(results_dir) / job / f"{variant_id}.json"


def write_result(results_dir: Path, result: Result) -> Path:
    """Through a temporary file in the same folder and a rename: a reader never sees half a
    result."""
    return write_json(result_path(results_dir, result.job, result.variant), result.to_json())


# ---------------------------------------------------------------------------------------------
# A sensitivity study's file, beside the variants' results: DIR/<job>/sensitivity-<variant>.json.

STUDY_PREFIX = "sensitivity-"  # no variant id starts so: precisions do not
STUDY_KIND = "sensitivity-study"


def study_path(results_dir: Path, job: str, variant_id: str) -> Path:
    """variant_id: the fully quantized variant the study takes apart, e.g. int8-dynamic-cpu."""
    return Path(results_dir) / job / f"{STUDY_PREFIX}{variant_id}.json"


def is_study_file(file: Path) -> bool:
    return file.name.startswith(STUDY_PREFIX)


def load_study(path: Path) -> dict:
    """The study in the file; raises UnusableFile saying why it is none."""
    try:
        study = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UnusableFile(f"not a readable sensitivity study ({error})") from None
    if not isinstance(study, dict) or study.get("kind") != STUDY_KIND:
        raise UnusableFile(f"named {STUDY_PREFIX}*.json but not a sensitivity study")
    check_study(study)
    return study


@dataclass
class StudyFile:
    """A sensitivity study as read, and the file it was read from."""

    file: Path
    study: dict


def load_result(path: Path) -> Result:
    """The result in the file, checked against the schema of its job's task; raises UnusableFile
    saying why it is none."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as error:
        raise UnusableFile(f"cannot be read ({error.strerror or error})") from None
    except UnicodeDecodeError as error:
        raise UnusableFile(
            f"not UTF-8 text (byte {error.object[error.start]:#04x} at offset {error.start})"
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        if error.pos >= len(text.rstrip()):
            raise UnusableFile(
                f"truncated JSON (it ends at line {error.lineno} before the value is complete; "
                "a copy or a write cut short)"
            ) from None
        raise UnusableFile(
            f"not JSON ({error.msg} at line {error.lineno}, column {error.colno})"
        ) from None
    except RecursionError:
        raise UnusableFile("not a result (JSON nested too deep to read)") from None
    return read_json_result(data, Path(path))


def read_json_result(data, file: Path | None = None) -> Result:
    """A result's JSON as its typed record, checked against the schema of its job's task (a
    result without one is a classifier's; a task this quantbench does not know is checked for
    what every result has). Raises UnusableFile saying what is wrong."""
    spec = data.get("spec") if isinstance(data, dict) else None
    name = spec.get("task", DEFAULT_TASK) if isinstance(spec, dict) else DEFAULT_TASK
    return read_result(data, TASKS.get(name) if isinstance(name, str) else None, file)


@dataclass
class Found:
    """What a walk over results folders found."""

    results: list[Result]  # in a stable order: by folder given, then by path
    unusable: list[tuple[Path, str]]  # the *.json files that hold no result, and why
    skipped_folders: list[Path]  # folders named `skip` below the folders given, left out
    studies: list[StudyFile] = field(default_factory=list)  # the sensitivity studies


def walk(paths: list[Path], skip: str | None = None) -> Found:
    """Every result file under the given folders (or the files themselves). A folder named `skip`
    below a folder given is left out, and named, unless it (or one inside it) is given itself."""
    found = Found([], [], [])
    given = {Path(p).resolve() for p in paths}
    for root in map(Path, paths):
        for file in [root] if root.is_file() else sorted(root.rglob("*.json")):
            parts = file.relative_to(root).parts[:-1] if file != root else ()
            if skip in parts:
                folder = root.joinpath(*parts[: parts.index(skip) + 1])
                if folder not in found.skipped_folders and folder.resolve() not in given:
                    found.skipped_folders.append(folder)  # given as well: collected from there
                continue
            try:
                if is_study_file(file):
                    found.studies.append(StudyFile(file, load_study(file)))
                else:
                    found.results.append(load_result(file))
            except UnusableFile as why:
                found.unusable.append((file, str(why)))
    return found


def existing_results(
    results_dir: Path, job: str, skipped: list[tuple[Path, str]] | None = None
) -> dict[str, Result]:
    folder = Path(results_dir) / job
    if not folder.is_dir():
        return {}
    found = walk([folder])
    if skipped is not None:
        skipped.extend(found.unusable)
    return {result.variant: result for result in found.results}


def plan_folder(
    results_dir: Path,
    job: str,
    spec_hash: str,
    variant_ids: list[str],
    resume: bool,
    skipped: list[tuple[Path, str]] | None = None,
) -> tuple[dict[str, Result], dict[str, str]]:
    """(the existing results to keep, the existing results the run will replace: variant -> why)
    with
    --resume; raises when the folder holds another spec's results. Files that hold no result go into
    `skipped` as (file, why)."""
    existing = existing_results(results_dir, job, skipped)
    if not resume:
        different = sorted(v for v, r in existing.items() if r.spec_hash != spec_hash)
        if different:
            raise ResultsConflict(
                f"{Path(results_dir) / job} holds results of a different job spec "
                f"({', '.join(different)}); "
                "use --resume to keep what matches and rerun the rest (it replaces the others), "
                "or --results NEW_FOLDER"
            )
        return {}, {}
    stranded = sorted(
        v for v, r in existing.items() if v not in variant_ids and r.spec_hash != spec_hash
    )
    if stranded:
        raise ResultsConflict(
            f"{Path(results_dir) / job} holds results of a different job spec for variants this "
            "job no longer runs "
            f"({', '.join(stranded)}): --resume would leave them beside the new ones; use "
            "--results NEW_FOLDER"
        )
    kept, replaced = {}, {}
    for v, r in existing.items():
        if v not in variant_ids:
            continue
        if r.spec_hash != spec_hash:
            replaced[v] = "its result is of a different job spec"
        elif r.status != "ok":
            replaced[v] = f"its result is {r.status}"
        else:
            kept[v] = r
    return kept, replaced
