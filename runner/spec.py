"""The job spec: a YAML file read into the plain dataclasses of runner/job.py, every mistake named
by file and field.

This module checks the shape of the file and that the files it names exist; `plan.py` checks it
against their contents (the dataset's columns and labels, the model's config, tokenizer and
weights). The precision families read their `settings:` keys and the job's task its own fields,
with the same Reader (runner/fields.py).
"""

from __future__ import annotations

import errno
import math
import os
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from runner.fields import Reader, SpecError, label_name, no_such
from runner.job import (
    COMPILED_SUFFIX,
    GROUPINGS,
    CalibrationSpec,
    DatasetSpec,
    EvaluationSpec,
    FileRef,
    FileSource,
    FinetuneSpec,
    JobSpec,
    ModelSource,
    SampleSpec,
    SensitivitySpec,
    Variant,
)
from runner.precisions import DEVICES, PRECISIONS, default_settings, family_of, read_settings
from runner.tasks import DEFAULT_TASK, TASKS, Task, tolerances

# text: a plain text file, one document per line, no labels (a causal LM's data).
DATASET_FORMATS = ("csv", "tsv", "jsonl", "parquet", "lines", "text")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
RESERVED_NAMES = ("reference",)  # collect.SKIPPED_FOLDER


# Job files are small; these bounds keep a hostile one from taking minutes or gigabytes to read. A
# 1.1 KB file of nested aliases ("billion laughs") expands to millions of nodes, and a deeply nested
# one
# overflows the reader's recursion.
MAX_JOB_BYTES = 1 << 20
MAX_YAML_NODES = 100_000  # counted with every alias expanded; a real job has a few hundred
MAX_YAML_DEPTH = 64


class _Refused(yaml.MarkedYAMLError):
    """YAML that is well formed but not taken: `allowed` says what is."""

    def __init__(self, problem: str, mark, allowed: str):
        super().__init__(problem=problem, problem_mark=mark)
        self.allowed = allowed


class _BoundedLoader(yaml.SafeLoader):
    """safe_load with the bounds above, refusing a key given twice in one mapping (the later one
    would silently win: a repeated key of a label mapping remaps a class)."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth, self._nodes, self._sizes = 0, 0, {}

    def compose_node(self, parent, index):
        alias = self.check_event(yaml.AliasEvent)
        mark = self.peek_event().start_mark
        self._depth += 1
        if self._depth > MAX_YAML_DEPTH:
            raise _Refused(
                f"nesting deeper than {MAX_YAML_DEPTH} levels",
                mark,
                "a job file nests a few levels",
            )
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if not alias:
            children = (
                node.value
                if isinstance(node, yaml.SequenceNode)
                else [n for pair in node.value for n in pair]
                if isinstance(node, yaml.MappingNode)
                else []
            )
            self._sizes[id(node)] = 1 + sum(self._sizes.get(id(child), 1) for child in children)
        self._nodes += self._sizes.get(id(node), 1) if alias else 1
        if self._nodes > MAX_YAML_NODES:
            raise _Refused(
                f"more than {MAX_YAML_NODES:,} values once its aliases (*name) are expanded",
                mark,
                "a job file holds a few hundred; use fewer or no aliases",
            )
        return node

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:
                    continue  # an unhashable key: the constructor says so itself
                if first is not key_node:
                    raise _Refused(
                        f"the key {key!r} a second time "
                        f"(first at line {first.start_mark.line + 1})",
                        key_node.start_mark,
                        "each key may appear once in a mapping",
                    )
        return super().construct_mapping(node, deep=deep)


def read_yaml(file: Path, shown: Path) -> Any:
    """The file's YAML, bounded in size, values and nesting. Raises SpecError."""
    size = file.stat().st_size
    if size > MAX_JOB_BYTES:
        raise SpecError(
            shown, "", f"{size:,} bytes", f"a job file may hold at most {MAX_JOB_BYTES:,} bytes"
        )
    try:
        return yaml.load(file.read_text(encoding="utf-8"), Loader=_BoundedLoader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SpecError(
            shown,
            where,
            getattr(error, "problem", None) or str(error),
            getattr(error, "allowed", "the file must be valid YAML"),
        ) from None
    except UnicodeDecodeError as error:
        raise SpecError(shown, "", str(error), "the file must be UTF-8 text") from None


def check_finite(shown: Path, value: Any, where: str = "") -> None:
    """NaN or infinity anywhere in a job: .inf in min_time_s never ends, .nan runs every variant and
    then no result can be written (JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise SpecError(
            shown, where, value, "expected a finite number (.nan and .inf are not allowed)"
        )
    items = (
        value.items()
        if isinstance(value, dict)
        else enumerate(value)
        if isinstance(value, list)
        else ()
    )
    for key, item in items:
        if isinstance(key, float):
            check_finite(shown, key, where)
        check_finite(
            shown,
            item,
            f"{where}[{key}]"
            if isinstance(value, list)
            else f"{where}.{key}"
            if where
            else str(key),
        )


def load_job(path: str | Path) -> JobSpec:
    """Read and shape-check one job file. Raises SpecError."""
    file = Path(path).resolve()
    shown = Path(path)
    if file.is_dir():
        raise SpecError(shown, "", str(path), "this is a folder; name a job file (YAML) in it")
    if not file.is_file():
        raise SpecError(shown, "", str(path), no_such("no such job file"))
    raw = read_yaml(file, shown)
    check_finite(shown, raw)
    return _parse(file, shown, raw)


TOP_FIELDS = (
    "name",
    "task",
    "model",
    "tokenizer",
    "dataset",
    "finetune",
    "calibration",
    "evaluation",
    "settings",
    "variants",
    "precisions",
    "devices",
    "baseline",
    "seed",
    "tolerances",
    "sensitivity",
)


def _parse(file: Path, shown: Path, raw: Any) -> JobSpec:
    top = Reader(shown, raw, "")
    top.check_keys(TOP_FIELDS + tuple(f for t in TASKS.values() for f in t.job_fields))
    task = TASKS[_task(top)]
    name = _name(shown, top)
    seed = top.get("seed", int, 0)
    model, tokenizer = _model_and_tokenizer(file, shown, top)
    dataset = _dataset(file, shown, top.sub("dataset", required=True), task)
    finetune_reader = top.sub("finetune")
    finetune = (
        None if finetune_reader is None else _finetune(file, shown, finetune_reader, dataset, task)
    )
    evaluation = _evaluation(top.sub("evaluation") or Reader(shown, {}, "evaluation"))
    settings = _settings(top.sub("settings") or Reader(shown, {}, "settings"))
    variants, left_out = _variants(shown, top, evaluation.compile)
    sensitivity = _sensitivity(shown, top.sub("sensitivity"))
    calibration = _calibration(file, shown, top.sub("calibration"), dataset, task)
    _check_calibration(shown, calibration, variants, sensitivity)
    return JobSpec(
        file=file,
        name=name,
        model=model,
        tokenizer=tokenizer,
        dataset=dataset,
        evaluation=evaluation,
        settings=settings,
        variants=tuple(variants),
        baseline=_baseline(shown, top, variants),
        seed=seed,
        finetune=finetune,
        calibration=calibration,
        tolerances=_tolerances(top.sub("tolerances")),
        task=task.name,
        task_config=task.read_config(top),
        sensitivity=sensitivity,
        left_out=tuple(left_out),
        raw=raw,
    )


def _name(shown: Path, top: Reader) -> str:
    name = top.get("name", str, required=True)
    # fullmatch: a pattern's $ also matches before a final newline ("pwn\n" made a folder named so).
    if not NAME_PATTERN.fullmatch(name):
        raise SpecError(
            shown,
            "name",
            name,
            "use letters, digits, '.', '_' and '-', starting with a letter or "
            "digit (it names the results folder)",
        )
    if name in RESERVED_NAMES:
        raise SpecError(
            shown,
            "name",
            name,
            f"{name!r} is taken: collect and report skip folders of this name "
            "(they hold the repository's reference results); choose another",
        )
    return name


def _model_and_tokenizer(
    file: Path, shown: Path, top: Reader
) -> tuple[ModelSource, ModelSource | None]:
    model = _model_source(file, shown, top.sub("model", required=True), allow_config=True)
    tokenizer_reader = top.sub("tokenizer")
    tokenizer = (
        None
        if tokenizer_reader is None
        else _model_source(file, shown, tokenizer_reader, allow_config=False)
    )
    if model.config is not None and tokenizer is None:
        raise SpecError(
            shown,
            "tokenizer",
            None,
            "an inline model config has no tokenizer files: name one with tokenizer.hub, .path or "
            ".package",
        )
    return model, tokenizer


def _baseline(shown: Path, top: Reader, variants: list[Variant]) -> str:
    ids = [v.id for v in variants]
    # Default: the FP32 reference, on the CPU where the job has it (the published study's baseline),
    # eager where the job runs it eager.
    preferred = ("fp32-cpu", "fp32-cuda", "fp32-cpu-compiled", "fp32-cuda-compiled")
    default = next((i for i in preferred if i in ids), ids[0])
    baseline = top.get("baseline", str, default)
    if baseline not in ids:
        raise SpecError(
            shown,
            "baseline",
            baseline,
            f"the baseline must be one of the job's variants: {', '.join(ids)}",
        )
    return baseline


def _sensitivity(shown: Path, reader: Reader | None) -> SensitivitySpec | None:
    """sensitivity: {precision, device, groups}: a precision that quantizes linear layers one by one
    (not a cast), on a device it runs on."""
    if reader is None:
        return None
    reader.check_keys(tuple(f.name for f in fields(SensitivitySpec)))
    precision = reader.get("precision", str, required=True)
    device = reader.get("device", str, "cpu")
    where = reader.field("precision")
    _check_variant(shown, where, reader.field("device"), precision, device)
    if not family_of(precision).quantizes_layers:
        studied = [p.name for p in PRECISIONS.values() if family_of(p).quantizes_layers]
        raise SpecError(
            shown,
            where,
            precision,
            "a cast changes every layer at once and keeps none in FP32; the study takes a "
            f"precision that quantizes linear layers: {', '.join(studied)}",
        )
    groups = reader.get("groups", str, "layer")
    if groups not in GROUPINGS:
        raise SpecError(shown, reader.field("groups"), groups, f"allowed: {', '.join(GROUPINGS)}")
    return SensitivitySpec(precision, device, groups)


def _task(top: Reader) -> str:
    name = top.get("task", str, DEFAULT_TASK)
    if name not in TASKS:
        raise SpecError(top.file, "task", name, f"allowed: {', '.join(TASKS)}")
    for other in TASKS.values():
        for key in other.job_fields:
            if key in top.data and key not in TASKS[name].job_fields:
                raise SpecError(
                    top.file,
                    key,
                    top.data[key],
                    f"only a job of task: {other.name} takes this field; this job's task is {name}",
                )
    return name


def _resolve(file: Path, value: str) -> Path:
    path = Path(value).expanduser()
    if path.is_absolute():
        return path
    try:
        return (file.parent / path).resolve()
    except (RuntimeError, OSError):  # a symlink loop: the caller's check says what it is
        return Path(os.path.abspath(file.parent / path))


MODEL_KINDS = ("hub", "path", "package", "gguf", "archive", "config")
TOKENIZER_KINDS = ("hub", "path", "package")


def _model_source(file: Path, shown: Path, reader: Reader, allow_config: bool) -> ModelSource:
    kinds = MODEL_KINDS if allow_config else TOKENIZER_KINDS
    reader.check_keys(kinds + ("revision",))
    given = [k for k in kinds if reader.data.get(k) is not None]
    if len(given) != 1:
        raise SpecError(
            shown, reader.where, reader.data, f"give exactly one of: {', '.join(kinds)}"
        )
    kind = given[0]
    if kind == "config":
        config = reader.get("config", dict)
        if not isinstance(config.get("model_type"), str):
            raise SpecError(
                shown,
                reader.field("config.model_type"),
                config.get("model_type"),
                "an inline config needs model_type (e.g. bert) and that architecture's fields",
            )
        return ModelSource(config=config)
    if kind in ("gguf", "archive"):
        return ModelSource(**{kind: _file_source(file, shown, reader, kind)})
    value = reader.get(kind, str)
    if kind == "path":
        path = _resolve(file, value)
        if not path.is_dir():
            raise SpecError(shown, reader.field("path"), value, not_a_folder(path))
        return ModelSource(path=path)
    if kind == "package":
        return ModelSource(package=value)
    return ModelSource(hub=value, revision=reader.get("revision", str))


def not_a_folder(path: Path) -> str:
    """Why a model's path is not a folder it can read, said as the system found it."""
    try:
        path.stat()
    except OSError as error:
        if error.errno == errno.ELOOP:
            return f"a symlink loop ({path}: {error.strerror}); point it at the model's folder"
        if error.errno == errno.ENOENT and path.is_symlink():
            return f"a symlink to nothing ({path} -> {os.readlink(path)})"
        if error.errno != errno.ENOENT:
            return f"cannot read it ({path}: {error.strerror})"
        return no_such(f"no such folder ({path})")
    return f"a file, not a folder ({path}): name the folder that holds the model's config.json"


FILE_FORMS = (
    "a file (a path, {path: ...} or {package: pkg/sub/file}), or {chunks: [files...]} for a file "
    "split in chunks; a mapping may add sha256: the file's"
)


def _file_source(file: Path, shown: Path, reader: Reader, key: str) -> FileSource:
    """gguf: / archive: a file, whole or in chunks: `x.gguf`, `{package: pkg/x.gguf}`,
    `{path: x.gguf}` or `{chunks: [...]}`, each mapping with an optional sha256. Whether the
    files are there is checked by plan.py."""
    value = reader.data[key]
    if not (isinstance(value, dict) and ({"chunks", "path", "sha256"} & set(value))):
        return FileSource((_file_ref(file, shown, value, reader.field(key)),))
    inner = reader.sub(key)
    inner.check_keys(("chunks", "path", "package", "sha256"))
    if "chunks" in value:
        chunks = inner.get("chunks", list)
        if not chunks:
            raise inner.error("chunks", chunks, "one file or more, joined in this order")
        refs = tuple(
            _file_ref(file, shown, c, inner.field(f"chunks[{i}]")) for i, c in enumerate(chunks)
        )
    else:
        whole = {k: v for k, v in value.items() if k != "sha256"}
        if len(whole) != 1:
            raise SpecError(shown, reader.field(key), value, f"expected {FILE_FORMS}")
        one = whole.get("path", whole)  # {path: x} reads as the string x
        refs = (_file_ref(file, shown, one, reader.field(key)),)
    return FileSource(refs, _sha256(inner))


def _sha256(reader: Reader) -> str | None:
    found = reader.data.get("sha256")
    if isinstance(found, int) and not isinstance(found, bool):  # all digits: YAML read a number
        raise reader.error(
            "sha256", found, "64 hexadecimal digits in quotes: YAML reads digits alone as a number"
        )
    sha256 = reader.get("sha256", str)
    if sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
        raise reader.error("sha256", sha256, "64 hexadecimal digits (sha256sum's output)")
    return sha256.lower() if sha256 else None


def _file_ref(file: Path, shown: Path, value, where: str) -> FileRef:
    if isinstance(value, str) and value:
        path = _resolve(file, value)
        if not path.is_file():
            raise SpecError(shown, where, value, no_such(f"no such file ({path})"))
        return FileRef(path=path)
    if isinstance(value, dict) and set(value) == {"package"} and isinstance(value["package"], str):
        return FileRef(package=value["package"])
    raise SpecError(shown, where, value, f"expected {FILE_FORMS}")


SOURCE_FIELDS = ("format", "path", "files", "header", "text_column", "label_column")


def _finetune(
    file: Path, shown: Path, reader: Reader, dataset: DatasetSpec, task: Task
) -> FinetuneSpec:
    reader.check_keys(
        (
            "train",
            "epochs",
            "learning_rate",
            "batch_size",
            "max_samples",
            "seed",
            "weight_decay",
            "warmup_ratio",
        )
    )
    train_reader = reader.sub("train")
    train = (
        None
        if train_reader is None
        else _dataset(file, shown, train_reader, task, SOURCE_FIELDS, like=dataset)
    )
    values = {}
    for key, low, high in (
        ("epochs", 0, 1000),
        ("learning_rate", 0, 1),
        ("weight_decay", -1e-12, 1),
        ("warmup_ratio", -1e-12, 1),
    ):
        value = reader.get(key, float, getattr(FinetuneSpec, key))
        if not low < value <= high:
            span = f"({low:g}, {high:g}]" if low >= 0 else f"[0, {high:g}]"
            raise SpecError(shown, reader.field(key), value, f"expected a number in {span}")
        values[key] = value
    return FinetuneSpec(
        train=train,
        batch_size=reader.positive_int("batch_size", 32),
        max_samples=reader.positive_int("max_samples", None),
        seed=reader.get("seed", int, 0),
        **values,
    )


def _calibration(
    file: Path, shown: Path, reader: Reader | None, dataset: DatasetSpec, task: Task
) -> CalibrationSpec | None:
    """calibration: {dataset, samples, max_length, seed, allow_overlap}; its dataset takes the
    dataset's source fields and is read for its texts alone (a classifier calibrates without
    labels)."""
    if reader is None:
        return None
    reader.check_keys(tuple(f.name for f in fields(CalibrationSpec)))
    source = reader.sub("dataset")
    texts = None
    if source is not None:
        texts = _dataset(file, shown, source, task, SOURCE_FIELDS, like=dataset, texts_only=True)
    default = CalibrationSpec()
    return CalibrationSpec(
        dataset=texts,
        samples=reader.positive_int("samples", default.samples),
        max_length=reader.positive_int("max_length", None),
        seed=reader.get("seed", int, default.seed),
        allow_overlap=reader.get("allow_overlap", bool, default.allow_overlap),
    )


def _check_calibration(
    shown: Path,
    calibration: CalibrationSpec | None,
    variants: list[Variant],
    sensitivity: SensitivitySpec | None,
) -> None:
    """A calibrated precision needs a calibration block; a block no precision reads is refused."""
    asked = [v.precision for v in variants] + ([sensitivity.precision] if sensitivity else [])
    calibrated = sorted({p for p in asked if PRECISIONS[p].calibrated})
    if calibrated and calibration is None:
        raise SpecError(
            shown,
            "calibration",
            None,
            f"{', '.join(calibrated)} calibrate on data: add a calibration: block (samples, "
            "max_length, seed; dataset: default the job's rows outside the evaluation sample)",
        )
    if calibration is not None and not calibrated:
        names = [p.name for p in PRECISIONS.values() if p.calibrated]
        raise SpecError(
            shown,
            "calibration",
            "a calibration block",
            f"no precision of this job calibrates; the ones that do: {', '.join(names)}",
        )


def _dataset(
    file: Path,
    shown: Path,
    reader: Reader,
    task: Task,
    allowed: tuple[str, ...] | None = None,
    like: DatasetSpec | None = None,
    texts_only: bool = False,
) -> DatasetSpec:
    """A dataset's fields; the job's own dataset also its task's (a classifier's label map). A
    training file `like` the job's dataset (of its format) takes the dataset's header and columns
    unless it names its own: it is usually the other split of the same data. A task that reads
    text alone takes no label column and no other task's label fields. texts_only: the texts are
    read, any labels ignored (a calibration set)."""
    task_keys = tuple(dict.fromkeys(key for t in TASKS.values() for key in t.dataset_fields))
    reader.check_keys(allowed or SOURCE_FIELDS + task_keys + ("sample", "max_length"))
    labelled = task.labelled and not texts_only
    if not task.labelled:
        _no_labels(shown, reader)
    _only_its_task(reader, task)
    fmt, path_value = _dataset_format(shown, reader)
    if fmt == "text" and labelled:
        raise SpecError(
            shown,
            reader.field("format"),
            fmt,
            "a text file has no labels, and this job's task scores labels: use csv, tsv, jsonl, "
            "parquet or lines",
        )
    path, files = _dataset_files(file, shown, reader, fmt, path_value)
    like = like if like is not None and like.format == fmt else None
    header, text_column, label_column = _dataset_columns(reader, fmt, like)
    if not labelled or fmt == "text":
        label_column = None
    task_fields = task.read_dataset_fields(reader) if allowed is None else None
    sample = _sample(shown, reader)
    return DatasetSpec(
        format=fmt,
        path=path,
        files=files,
        header=header,
        text_column=text_column,
        label_column=label_column,
        sample=sample,
        max_length=reader.positive_int("max_length", 128),
        field=reader.where,
        task_fields=task_fields,
    )


def _no_labels(shown: Path, reader: Reader) -> None:
    """A task that reads text alone takes no label fields (the label column, a labelled task's
    own fields of `dataset:`): say so rather than ignore them."""
    label_fields = [key for t in TASKS.values() if t.labelled for key in t.dataset_fields]
    for key in ("label_column", *dict.fromkeys(label_fields)):
        if key in reader.data:
            raise SpecError(
                shown,
                reader.field(key),
                reader.data[key],
                "this job's task reads text alone (no labels): leave the field out",
            )


def _only_its_task(reader: Reader, task: Task) -> None:
    """Another task's own field of `dataset:` in this job: say whose it is."""
    for other in TASKS.values():
        for key in other.dataset_fields:
            if key in reader.data and key not in task.dataset_fields:
                raise reader.error(
                    key,
                    reader.data[key],
                    f"only a job of task: {other.name} takes this field; this job's task is "
                    f"{task.name}",
                )


def _dataset_format(shown: Path, reader: Reader) -> tuple[str, str | None]:
    """(format, path as written): the format given, or else taken from the path's suffix."""
    fmt = reader.get("format", str)
    path_value = reader.get("path", str)
    inferred = fmt is None and bool(path_value)
    if inferred:
        fmt = Path(path_value).suffix.lstrip(".").lower()  # data.csv -> csv
    if fmt not in DATASET_FORMATS:
        said = (
            f"; no format was given, so it was taken from the suffix of {path_value}: name one"
            if inferred
            else ""
        )
        raise SpecError(
            shown, reader.field("format"), fmt, f"allowed: {', '.join(DATASET_FORMATS)}{said}"
        )
    return fmt, path_value


def _dataset_files(
    file: Path, shown: Path, reader: Reader, fmt: str, path_value: str | None
) -> tuple[Path | None, dict[str, Path] | None]:
    """(path, files): the one data file, or for format lines one file per label; each exists."""
    if fmt != "lines":
        if path_value is None:
            raise SpecError(shown, reader.field("path"), None, "this field is required")
        path = _resolve(file, path_value)
        if not path.is_file():
            raise SpecError(
                shown, reader.field("path"), path_value, no_such(f"no such file ({path})")
            )
        return path, None
    files_raw = reader.get("files", dict, required=True)
    files = {}
    for label, name in files_raw.items():
        if not isinstance(name, str):
            raise SpecError(shown, reader.field(f"files.{label}"), name, "expected a file name")
        files[label_name(label)] = (
            _resolve(file, name) if path_value is None else _resolve(file, path_value) / name
        )
    for label, value in files.items():
        if not value.is_file():
            raise SpecError(
                shown, reader.field(f"files.{label}"), str(value), no_such("no such file")
            )
    return None, files


def _dataset_columns(
    reader: Reader, fmt: str, like: DatasetSpec | None
) -> tuple[bool, str | int, str | int]:
    """(header, text_column, label_column): a headerless csv/tsv names columns by index, and a
    training file `like` the dataset with the same header takes its columns."""
    header = reader.get("header", bool, like.header if like else True)
    column_kinds = (str, int) if fmt in ("csv", "tsv") and not header else (str,)
    named = header or fmt not in ("csv", "tsv")
    same = like is not None and like.header == header
    text_column = reader.get(
        "text_column", column_kinds, like.text_column if same else "text" if named else 0
    )
    label_column = reader.get(
        "label_column", column_kinds, like.label_column if same else "label" if named else 1
    )
    return header, text_column, label_column


def _sample(shown: Path, reader: Reader) -> SampleSpec:
    sample_reader = reader.sub("sample") or Reader(shown, {}, reader.field("sample"))
    sample_reader.check_keys(("n", "fraction", "seed"))
    n = sample_reader.positive_int("n", None)
    fraction = sample_reader.get("fraction", float)
    if n is not None and fraction is not None:
        raise SpecError(
            shown, sample_reader.where, sample_reader.data, "give n or fraction, not both"
        )
    if fraction is not None and not 0 < fraction <= 1:
        raise SpecError(
            shown, sample_reader.field("fraction"), fraction, "expected a fraction in (0, 1]"
        )
    return SampleSpec(n=n, fraction=fraction, seed=sample_reader.get("seed", int, 0))


def _tolerances(reader: Reader | None) -> dict[str, float]:
    """What a deployment may give up, against the baseline (every task's tolerances may be
    stated; collect judges a variant by those of its job's task)."""
    if reader is None:
        return {}
    known = tolerances()
    reader.check_keys(tuple(known))
    values = {}
    for key, tolerance in known.items():
        value = reader.get(key, float)
        if value is not None:
            if value < 0 or (tolerance.at_most is not None and value > tolerance.at_most):
                raise SpecError(
                    reader.file,
                    reader.field(key),
                    value,
                    f"expected {tolerance.means}, >= 0"
                    + (f" and <= {tolerance.at_most:g}" if tolerance.at_most is not None else ""),
                )
            values[key] = value
    return values


BATCH_ORDERS = ("sample", "length")


EVALUATION_FIELDS = (
    "batch_size",
    "warmup_passes",
    "timed_passes",
    "min_time_s",
    "threads",
    "weight_analysis",
    "batch_order",
    "latency_mode",
    "fixed_shape",
    "repeats",
    "compile",
)

COMPILE_CHOICES = "false (every variant eager), true (every variant compiled) or both"


def _evaluation(reader: Reader) -> EvaluationSpec:
    reader.check_keys(EVALUATION_FIELDS)
    order = reader.get("batch_order", str, "sample")
    if order not in BATCH_ORDERS:
        raise SpecError(
            reader.file, reader.field("batch_order"), order, "allowed: " + ", ".join(BATCH_ORDERS)
        )
    mode, shape = _latency_mode(reader)
    min_time = reader.get("min_time_s", float, 0.0)
    if min_time < 0:
        raise SpecError(reader.file, reader.field("min_time_s"), min_time, "expected a number >= 0")
    return EvaluationSpec(
        batch_size=reader.positive_int("batch_size", 1),
        warmup_passes=reader.positive_int("warmup_passes", 5, minimum=0),
        timed_passes=reader.positive_int("timed_passes", 50),
        min_time_s=min_time,
        threads=reader.positive_int("threads", None),
        weight_analysis=reader.get("weight_analysis", bool, True),
        batch_order=order,
        latency_mode=mode,
        fixed_shape=shape,
        repeats=reader.positive_int("repeats", 1),
        compile=_compile(reader),
    )


def _compile(reader: Reader) -> bool | str:
    """evaluation.compile: false, true or both (YAML's booleans, or the word both)."""
    value = reader.data.get("compile")
    if value is None:
        return False
    if value is True or value is False or value == "both":
        return value
    raise SpecError(reader.file, reader.field("compile"), value, f"allowed: {COMPILE_CHOICES}")


def _latency_mode(reader: Reader) -> tuple[str, tuple[int, int] | None]:
    """latency_mode, and fixed_shape: given with mode fixed, and only then."""
    mode = reader.get("latency_mode", str, "dataset")
    if mode not in ("dataset", "fixed"):
        raise SpecError(reader.file, reader.field("latency_mode"), mode, "allowed: dataset, fixed")
    shape = reader.get("fixed_shape", list)
    if mode == "fixed" or shape is not None:
        if (
            mode != "fixed"
            or shape is None
            or len(shape) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in shape)
        ):
            raise SpecError(
                reader.file,
                reader.field("fixed_shape"),
                shape,
                "latency_mode: fixed takes fixed_shape: [batch size, sequence length], and only "
                "it does",
            )
    return mode, tuple(shape) if shape else None


def _settings(reader: Reader) -> dict:
    """Every precision family's keys of settings:, read and checked by the family."""
    reader.check_keys(tuple(default_settings()))
    return read_settings(reader)


def _variants(
    shown: Path, top: Reader, compile_choice: bool | str = False
) -> tuple[list[Variant], list[tuple[str, str]]]:
    """The variants asked for, each once; evaluation.compile makes them compiled (true) or adds a
    compiled twin after each (both). A pair of precisions x devices that cannot run is left out,
    with why (the user listed the precisions and the devices, not that pair); a listed variant
    that cannot run is refused."""
    variants, seen, left_out = [], set(), []
    for where, device_where, precision, device, compiled, in_product in _variant_pairs(shown, top):
        if in_product and _known(precision, device) and not _runs_on(precision, device):
            left_out.append((f"{precision}-{device}", _only_on(precision)))
            continue
        _check_variant(shown, where, device_where, precision, device)
        if compiled and compile_choice is not False:
            raise SpecError(
                shown,
                where,
                f"{precision}-{device}{COMPILED_SUFFIX}",
                f"evaluation.compile: {str(compile_choice).lower()} already compiles every "
                f"variant: name {precision}-{device} here, or drop evaluation.compile to choose "
                "per variant",
            )
        for variant in _with_compile(Variant(precision, device, compiled), compile_choice):
            if variant.id in seen:
                raise SpecError(shown, where, variant.id, "each variant may appear once")
            seen.add(variant.id)
            variants.append(variant)
    if not variants and left_out:
        pairs = "; ".join(f"{pair}: {why}" for pair, why in left_out)
        raise SpecError(
            shown, "devices", top.get("devices", list), f"no pair of them can run ({pairs})"
        )
    if not variants:
        raise SpecError(shown, "variants", [], "the job has no variant to run")
    return variants, left_out


def _known(precision: Any, device: Any) -> bool:
    return isinstance(precision, str) and precision in PRECISIONS and device in DEVICES


def _runs_on(precision: str, device: str) -> bool:
    return device in PRECISIONS[precision].devices


def _only_on(precision: str) -> str:
    spec = PRECISIONS[precision]
    return f"{precision} runs on {', '.join(spec.devices)} only ({spec.how})"


def _check_variant(shown: Path, where: str, device_where: str, precision, device) -> None:
    """A known device, a known precision, and one that runs on that device."""
    if device not in DEVICES:
        raise SpecError(
            shown, device_where, device, f"unknown device; allowed: {', '.join(DEVICES)}"
        )
    if precision not in PRECISIONS:
        raise SpecError(
            shown, where, precision, f"unknown precision; allowed: {', '.join(PRECISIONS)}"
        )
    if not _runs_on(precision, device):
        raise SpecError(shown, where, f"{precision}-{device}", _only_on(precision))


def _with_compile(variant: Variant, compile_choice: bool | str) -> list[Variant]:
    """The variant as evaluation.compile asks for it: as named, compiled, or eager then compiled."""
    compiled = Variant(variant.precision, variant.device, compiled=True)
    if compile_choice == "both":
        return [variant, compiled]
    return [compiled] if compile_choice is True else [variant]


def _variant_pairs(shown: Path, top: Reader) -> list[tuple[str, str, Any, Any, bool, bool]]:
    """(where the precision is, where the device is, precision, device, whether the id ends in
    -compiled, whether it comes of a product) for each variant asked for, as variants: [...] or
    as precisions: [...] x devices: [...]."""
    listed = top.get("variants", list)
    precisions = top.get("precisions", list)
    devices = top.get("devices", list)
    if listed is not None and (precisions is not None or devices is not None):
        raise SpecError(
            shown, "variants", listed, "give either variants or precisions x devices, not both"
        )
    if listed is None:
        if not precisions or not devices:
            raise SpecError(
                shown,
                "precisions" if not precisions else "devices",
                precisions if not precisions else devices,
                "give variants: [fp32-cpu, …] or both precisions: […] and devices: […]",
            )
        return [
            (f"precisions[{i}]", f"devices[{j}]", p, d, False, True)
            for i, p in enumerate(precisions)
            for j, d in enumerate(devices)
        ]
    pairs = []
    for i, item in enumerate(listed):
        if not isinstance(item, str):
            raise SpecError(
                shown,
                f"variants[{i}]",
                item,
                "expected '<precision>-<device>', e.g. fp16-cuda, or with -compiled after it",
            )
        compiled = item.endswith(COMPILED_SUFFIX)
        precision, _, device = item.removesuffix(COMPILED_SUFFIX).rpartition("-")
        pairs.append((f"variants[{i}]", f"variants[{i}]", precision, device, compiled, False))
    return pairs
