"""Datasets: read labelled texts from csv, tsv, jsonl, parquet or one-file-per-label folders, and sample.

A registry maps each format to a small reader returning (text, label) rows with labels as strings, so
labels are compared by name everywhere after this point. Sampling is seeded and returns the row
indices too: the evaluation sample and a training split drawn from the rest never overlap.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

from runner.spec import DatasetSpec, SampleSpec, SpecError


@dataclass(frozen=True)
class Example:
    text: str
    label: str  # the dataset's label value, as a string
    where: str = field(default="", compare=False)  # "line 52 of train.csv": for errors about this row


def first_rows_with(examples: list[Example], labels: list[str]) -> str:
    """Where each of the labels first appears, for an error message: 'line 4 of a.csv: ""'."""
    firsts = {}
    for example in examples:
        if example.label in labels and example.label not in firsts:
            firsts[example.label] = example.where
    return "; ".join(f"{firsts[label]}: {label!r}" for label in labels[:5] if firsts.get(label))


def _column(header: list[str], wanted: str | int, job: Path, field: str, source: Path) -> int:
    if isinstance(wanted, int):
        if not 0 <= wanted < len(header):
            raise SpecError(job, field, wanted, f"{source.name} has {len(header)} columns (0 to {len(header) - 1})")
        return wanted
    if wanted not in header:
        raise SpecError(job, field, wanted, f"columns in {source.name}: {', '.join(map(str, header))}")
    return header.index(wanted)


def _read_delimited(delimiter: str, quoting: int):
    def read(spec: DatasetSpec, job: Path) -> list[Example]:
        csv.field_size_limit(sys.maxsize)
        with spec.path.open(encoding="utf-8-sig", newline="") as handle:
            rows = list(csv.reader(handle, delimiter=delimiter, quoting=quoting))
        rows = [row for row in rows if row]
        if not rows:
            raise SpecError(job, f"{spec.field}.path", str(spec.path), "the file has no rows")
        header = rows.pop(0) if spec.header else [str(i) for i in range(len(rows[0]))]
        text_at = _column(header, spec.text_column, job, f"{spec.field}.text_column", spec.path)
        label_at = _column(header, spec.label_column, job, f"{spec.field}.label_column", spec.path)
        examples = []
        for number, row in enumerate(rows, start=2 if spec.header else 1):
            if max(text_at, label_at) >= len(row):
                raise SpecError(job, f"{spec.field}.path", f"line {number} of {spec.path.name}: {row!r}",
                                f"every row needs {len(header)} columns")
            examples.append(Example(row[text_at], row[label_at].strip(), f"line {number} of {spec.path.name}"))
        return examples

    return read


def _records_to_examples(records, spec: DatasetSpec, job: Path) -> list[Example]:
    examples = []
    for number, record in enumerate(records, start=1):
        for name, key in ((f"{spec.field}.text_column", spec.text_column), (f"{spec.field}.label_column", spec.label_column)):
            if key not in record:
                raise SpecError(job, name, key, f"record {number} of {spec.path.name} has fields: {', '.join(record)}")
        examples.append(Example(str(record[spec.text_column]), _label_text(record[spec.label_column]),
                                f"record {number} of {spec.path.name}"))
    return examples


def _label_text(value) -> str:
    # 1 and 1.0 name the same label; a float label column would otherwise read as "1.0".
    if value is None:
        return ""  # a missing label reads as an empty one
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def _read_jsonl(spec: DatasetSpec, job: Path) -> list[Example]:
    records = []
    for number, line in enumerate(spec.path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise SpecError(job, f"{spec.field}.path", f"line {number} of {spec.path.name}", f"not JSON: {error.msg}") from None
    return _records_to_examples(records, spec, job)


def _read_parquet(spec: DatasetSpec, job: Path) -> list[Example]:
    import pyarrow.parquet as pq

    return _records_to_examples(pq.read_table(spec.path).to_pylist(), spec, job)


def _read_lines(spec: DatasetSpec, job: Path) -> list[Example]:
    examples = []
    for label, path in spec.files.items():
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                examples.append(Example(line.strip(), label, f"line {number} of {path.name}"))
    return examples


READERS = {
    "csv": _read_delimited(",", csv.QUOTE_MINIMAL),
    # TSV files in the wild hold bare quotes inside texts: quoting is off, a tab is the only separator.
    "tsv": _read_delimited("\t", csv.QUOTE_NONE),
    "jsonl": _read_jsonl,
    "parquet": _read_parquet,
    "lines": _read_lines,
}


def read_examples(spec: DatasetSpec, job: Path) -> list[Example]:
    try:
        examples = READERS[spec.format](spec, job)
    except SpecError:
        raise
    except (UnicodeDecodeError, csv.Error, ValueError, TypeError, AttributeError, OSError) as error:
        source = spec.path or ", ".join(map(str, spec.files.values()))
        raise SpecError(job, f"{spec.field}.path", str(source),
                        f"cannot read it as {spec.format}: {type(error).__name__}: {error}") from None
    if not examples:
        raise SpecError(job, spec.field, spec.format, "the dataset has no rows")
    unlabelled = [e for e in examples if not e.label]
    if unlabelled:
        raise SpecError(job, f"{spec.field}.label_column", spec.label_column,
                        f"{len(unlabelled)} row(s) have an empty label, first {unlabelled[0].where}; "
                        "give every row a label or remove the row")
    return examples


def sample_indices(total: int, sample: SampleSpec) -> list[int]:
    """The row indices of the evaluation sample: seeded, sorted, the same on every machine."""
    if sample.n is None and sample.fraction is None:
        return list(range(total))
    size = sample.n if sample.n is not None else max(1, round(sample.fraction * total))
    size = min(size, total)
    return sorted(random.Random(sample.seed).sample(range(total), size))


def fingerprint(examples: list[Example]) -> str:
    """A short content hash of texts and labels: two results are comparable only on the same sample."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(example.text.encode())
        digest.update(b"\x1f")
        digest.update(example.label.encode())
        digest.update(b"\x1e")
    return digest.hexdigest()[:16]
