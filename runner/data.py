"""Datasets: read labelled texts from csv, tsv, jsonl, parquet or one-file-per-label folders, or
plain text files of one document per line, and sample.

A registry maps each format to a small reader returning (text, label) rows with labels as strings,
so labels are compared by name everywhere after this point; a task that reads text alone gets
the label "" (and a `lines` dataset's file keys, which it ignores). Sampling is seeded and returns
the row indices too: the evaluation sample and a training split drawn from the rest never overlap.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from runner.fields import SpecError, label_name
from runner.job import DatasetSpec, SampleSpec


@dataclass(frozen=True)
class Example:
    text: str
    label: str  # the dataset's label value, as a string
    where: str = field(
        default="", compare=False
    )  # "line 52 of train.csv": for errors about this row
    lines: int = field(
        default=1, compare=False
    )  # physical lines of a CSV row: a quoted cell may span several


def _column(header: list[str], wanted: str | int, job: Path, field: str, source: Path) -> int:
    if isinstance(wanted, int):
        if not 0 <= wanted < len(header):
            raise SpecError(
                job,
                field,
                wanted,
                f"{source.name} has {len(header)} columns (0 to {len(header) - 1})",
            )
        return wanted
    if wanted not in header:
        raise SpecError(
            job, field, wanted, f"columns in {source.name}: {', '.join(map(str, header))}"
        )
    return header.index(wanted)


def _read_delimited(delimiter: str, quoting: int):
    def read(spec: DatasetSpec, job: Path) -> list[Example]:
        csv.field_size_limit(sys.maxsize)
        with spec.path.open(encoding="utf-8-sig", newline="") as handle:
            rows = _rows_with_lines(csv.reader(handle, delimiter=delimiter, quoting=quoting))
        if not rows:
            raise SpecError(job, f"{spec.field}.path", str(spec.path), "the file has no rows")
        header = rows.pop(0)[0] if spec.header else [str(i) for i in range(len(rows[0][0]))]
        text_at = _column(header, spec.text_column, job, f"{spec.field}.text_column", spec.path)
        label_at = (
            text_at  # text alone: the label is not read
            if spec.label_column is None
            else _column(header, spec.label_column, job, f"{spec.field}.label_column", spec.path)
        )
        examples = []
        for row, first, last in rows:
            where = (
                f"line {first} of {spec.path.name}"
                if first == last
                else f"lines {first}-{last} of {spec.path.name}"
            )
            if max(text_at, label_at) >= len(row):
                raise SpecError(
                    job,
                    f"{spec.field}.path",
                    f"{where}: {row!r}",
                    f"every row needs {len(header)} columns",
                )
            label = "" if spec.label_column is None else label_name(row[label_at])
            examples.append(Example(row[text_at], label, where, last - first + 1))
        return examples

    return read


def _rows_with_lines(reader) -> list[tuple[list[str], int, int]]:
    """(row, its first line, its last line) for each row that is not blank. A quoted cell may hold
    line breaks, so a row's line is where the reader was, not its index."""
    rows, last = [], 0
    for row in reader:
        first, last = last + 1, reader.line_num
        if row:
            rows.append((row, first, last))
    return rows


def _records_to_examples(
    records, spec: DatasetSpec, job: Path, unit: str = "record"
) -> list[Example]:
    """records: (number, record) pairs; unit names what the number counts, for errors ("line 3 of
    a.jsonl")."""
    examples = []
    for number, record in records:
        where = f"{unit} {number} of {spec.path.name}"
        if not isinstance(record, dict):
            raise SpecError(
                job,
                f"{spec.field}.path",
                f"{where}: {record!r}",
                "each record must be a JSON object with the text and label fields",
            )
        for name, key in (
            (f"{spec.field}.text_column", spec.text_column),
            (f"{spec.field}.label_column", spec.label_column),
        ):
            if key is not None and key not in record:
                raise SpecError(
                    job, name, key, f"{where} has fields: {', '.join(map(str, record))}"
                )
        text, label = record[spec.text_column], record.get(spec.label_column, "")
        if not isinstance(text, str):  # null would be evaluated as the word "None"
            raise SpecError(
                job, f"{spec.field}.text_column", f"{where}: {text!r}", "expected a text (a string)"
            )
        if isinstance(label, (bool, list, dict)):
            raise SpecError(
                job,
                f"{spec.field}.label_column",
                f"{where}: {label!r}",
                "expected a label: a string or a number",
            )
        examples.append(Example(text, label_name(label), where))
    return examples


def _read_jsonl(spec: DatasetSpec, job: Path) -> list[Example]:
    records = []
    for number, line in enumerate(file_lines(spec.path), start=1):
        if line.strip():
            try:
                records.append((number, json.loads(line)))
            except json.JSONDecodeError as error:
                raise SpecError(
                    job,
                    f"{spec.field}.path",
                    f"line {number} of {spec.path.name}",
                    f"not JSON: {error.msg}",
                ) from None
    return _records_to_examples(records, spec, job, unit="line")


def _read_parquet(spec: DatasetSpec, job: Path) -> list[Example]:
    return _records_to_examples(enumerate(pq.read_table(spec.path).to_pylist(), start=1), spec, job)


def file_lines(path: Path) -> list[str]:
    """The file's lines, split at \\n and \\r\\n only: str.splitlines also splits at form feeds,
    \\x1c-\\x1e, \\x85 and U+2028/2029, which are text inside a line (and inside a JSON string)."""
    text = path.read_bytes().decode("utf-8")
    return [line.removesuffix("\r") for line in text.split("\n")]


def _lines_of(path: Path, label: str) -> list[Example]:
    """One text per line of the file (blank lines skipped), each with the label."""
    return [
        Example(line.strip(), label, f"line {number} of {path.name}")
        for number, line in enumerate(file_lines(path), start=1)
        if line.strip()
    ]


def _read_lines(spec: DatasetSpec, job: Path) -> list[Example]:
    return [example for label, path in spec.files.items() for example in _lines_of(path, label)]


def _read_text(spec: DatasetSpec, job: Path) -> list[Example]:
    """A plain text file, one document per line (blank lines skipped), without labels."""
    return _lines_of(spec.path, "")


READERS = {
    "csv": _read_delimited(",", csv.QUOTE_MINIMAL),
    # TSV files in the wild hold bare quotes inside texts: quoting is off, a tab is the only
    # separator.
    "tsv": _read_delimited("\t", csv.QUOTE_NONE),
    "jsonl": _read_jsonl,
    "parquet": _read_parquet,
    "lines": _read_lines,
    "text": _read_text,
}


def read_examples(spec: DatasetSpec, job: Path) -> list[Example]:
    source = spec.path or ", ".join(map(str, spec.files.values()))
    try:
        examples = READERS[spec.format](spec, job)
    except SpecError:
        raise
    except (UnicodeDecodeError, csv.Error, ValueError, TypeError, AttributeError, OSError) as error:
        raise SpecError(
            job,
            f"{spec.field}.path",
            str(source),
            f"cannot read it as {spec.format}: {type(error).__name__}: {error}",
        ) from None
    if not examples:
        raise SpecError(
            job,
            f"{spec.field}.path",
            str(source),
            f"the dataset has no rows (read as {spec.format}; blank lines are skipped)",
        )
    unlabelled = [e for e in examples if not e.label]
    if unlabelled and spec.label_column is not None and spec.format != "lines":
        raise SpecError(
            job,
            f"{spec.field}.label_column",
            spec.label_column,
            f"{len(unlabelled)} row(s) have an empty label, first {unlabelled[0].where}; "
            "give every row a label or remove the row",
        )
    return examples


def sample_indices(total: int, sample: SampleSpec) -> list[int]:
    """The row indices of the evaluation sample: seeded, sorted, the same on every machine."""
    if sample.n is None and sample.fraction is None:
        return list(range(total))
    size = sample.n if sample.n is not None else max(1, round(sample.fraction * total))
    size = min(size, total)
    return sorted(random.Random(sample.seed).sample(range(total), size))


def fingerprint(examples: list[Example]) -> str:
    """A short content hash of texts and labels: two results are comparable only on the same
    sample."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(example.text.encode())
        digest.update(b"\x1f")
        digest.update(example.label.encode())
        digest.update(b"\x1e")
    return digest.hexdigest()[:16]
