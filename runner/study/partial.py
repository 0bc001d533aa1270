"""A study's finished steps, kept as they come back, so that `run --resume` goes on from them.

DIR/<job>/sensitivity-<variant>.partial.jsonl beside the study's file: the first line is the
probe with what the study is of (the spec's hash, the `sensitivity:` block, the schema), each
further line one group step's groups. A line is written whole and flushed as its step returns; a
line cut short by a kill is skipped when read. The file goes once the study's file is written.
Not a *.json file, so `collect` and `report` never read it.
"""

from __future__ import annotations

import json
from pathlib import Path

from runner import results


def partial_path(results_dir: Path, job: str, variant_id: str) -> Path:
    return results.study_path(results_dir, job, variant_id).with_suffix(".partial.jsonl")


def start(path: Path, header: dict, probe: dict) -> None:
    """A new file holding the probe (a study run afresh forgets an earlier one's steps)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as file:
        file.write(json.dumps({**header, "probe": probe}) + "\n")


def add(path: Path, groups: list[dict]) -> None:
    with path.open("a", encoding="utf-8") as file:
        file.write(json.dumps({"groups": groups}) + "\n")
        file.flush()


def read(path: Path, header: dict) -> tuple[dict, list[dict]] | str:
    """(the probe, the groups measured) of a study of this header, or why the file holds none."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
        first = json.loads(lines[0]) if lines else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return f"not readable ({error})"
    different = [key for key, value in header.items() if first.get(key) != value]
    if different:
        return f"a study of another {different[0].replace('_', ' ')}"
    probe = first.get("probe")
    if not isinstance(probe, dict) or not isinstance(probe.get("groups"), dict):
        return "its probe is missing"
    return probe, [group for line in lines[1:] for group in _groups(line, probe["groups"])]


def _groups(line: str, groups: dict) -> list[dict]:
    """The line's measured groups, each a group of the probe with its layers; [] for a line cut
    short or holding anything else."""
    try:
        found = json.loads(line).get("groups")
    except (json.JSONDecodeError, AttributeError):
        return []
    if not isinstance(found, list):
        return []
    return [
        entry
        for entry in found
        if isinstance(entry, dict)
        and groups.get(entry.get("group")) == entry.get("layers")
        and all(isinstance(entry.get(key), dict) for key in ("only", "all_but"))
    ]
