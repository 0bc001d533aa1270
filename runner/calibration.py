"""The calibration set: the rows a calibrated precision observes before it quantizes.

The plan draws them once per job (`calibration_set`), seeded, from the job's `calibration:` block:
from its own dataset, or from the job's dataset outside the evaluation sample and a fine-tune's
training rows. A set that shares texts with the evaluation sample would let the method fit what it
is judged on: it is refused unless the job allows the overlap. Every worker gets the same texts;
the task's worker tokenizes them (TaskWorker.calibration_batches). Plain Python: no torch.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from runner import data
from runner.fields import SpecError
from runner.job import DEFAULT_CALIBRATION_TOKENS, JobSpec, SampleSpec


@dataclass(frozen=True)
class CalibrationSet:
    """The calibration rows' texts, how many tokens of each a worker keeps, and what a result
    records of them (`record`: source, rows, seed, sha256 of the texts, overlap)."""

    texts: tuple[str, ...]
    max_length: int
    record: dict = field(default_factory=dict)


def texts_sha256(texts) -> str:
    """A hash of the row texts in order: two results calibrated on the same rows share it."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode())
        digest.update(b"\x1e")
    return digest.hexdigest()


def calibration_set(
    spec: JobSpec,
    shown: Path,
    rows: list[data.Example],
    sample_rows: list[int],
    train: list[data.Example] | None,
    positions: int | None = None,
) -> CalibrationSet | None:
    """The job's calibration rows; None for a job without a calibration block. positions: the
    model's position table (its longest input), which a default max_length does not pass.
    Raises SpecError for more rows than there are, and for rows that are in the evaluation sample
    (unless allow_overlap)."""
    calibration = spec.calibration
    if calibration is None:
        return None
    evaluated = {rows[i].text for i in sample_rows}
    pool, source, where = _pool(spec, shown, rows, sample_rows, evaluated, train)
    pool = [e for e in pool if e.text.strip()]
    if calibration.samples > len(pool):
        raise SpecError(
            shown,
            "calibration.samples",
            calibration.samples,
            f"at most {len(pool)}: the rows with a text in {source}",
        )
    drawn = SampleSpec(n=calibration.samples, seed=calibration.seed)
    chosen = data.sample_indices(len(pool), drawn)
    texts = tuple(pool[i].text for i in chosen)
    overlap = sum(text in evaluated for text in texts)
    if overlap and not calibration.allow_overlap:
        raise SpecError(
            shown,
            where,
            f"{overlap} of its {len(texts)} rows are in the evaluation sample",
            "a calibration set must not share rows with the evaluation sample; give other rows, "
            "or set calibration.allow_overlap: true to measure on rows it calibrated on",
        )
    max_length = calibration.max_length or min(DEFAULT_CALIBRATION_TOKENS, positions or 1 << 30)
    record = {
        "source": source,
        "rows": len(texts),
        "max_length": max_length,
        "seed": calibration.seed,
        "texts_sha256": texts_sha256(texts),
        "overlap_with_sample": overlap,
    }
    return CalibrationSet(texts, max_length, record)


def _pool(
    spec: JobSpec,
    shown: Path,
    rows: list[data.Example],
    sample_rows: list[int],
    evaluated: set[str],
    train: list[data.Example] | None,
) -> tuple[list[data.Example], str, str]:
    """The rows to draw from, where they come from (in words), and the field an overlap names.
    evaluated: the evaluation sample's texts."""
    calibration = spec.calibration
    if calibration.dataset is not None:
        source = f"{calibration.dataset.format}:{calibration.dataset.path or 'files'}"
        return data.read_examples(calibration.dataset, shown), source, "calibration.dataset"
    trained = {e.text for e in train or []}
    held_out = set(sample_rows)
    pool = [
        e
        for i, e in enumerate(rows)
        if i not in held_out and e.text not in evaluated and e.text not in trained
    ]
    source = "the job's dataset, outside the evaluation sample" + (
        " and the fine-tune's rows" if train else ""
    )
    return pool, source, "calibration.samples"
