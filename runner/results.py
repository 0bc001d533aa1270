"""Results as files: one JSON per variant under DIR/<job>/<variant>.json, written atomically.

The folder is the record. A folder that holds results of a different job spec is refused unless the
user resumes (which reruns what does not match) or names a new folder; `--resume` skips variants
whose result for the same spec is already there and ok.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Self


class ResultsError(Exception):
    """A results folder the run must not or cannot write: said before anything runs (exit 2)."""


class ResultsConflict(ResultsError):
    pass


class ResultsUnwritable(ResultsError):
    pass


def result_path(results_dir: Path, job: str, variant_id: str) -> Path:
    return Path(results_dir) / job / f"{variant_id}.json"


def write_result(results_dir: Path, result: Result | dict) -> Path:
    """Through a temporary file in the same folder and a rename: a reader never sees half a
    result."""
    if isinstance(result, Result):
        result = result.to_json()
    return write_json(result_path(results_dir, result["job"], result["variant"]), result)


def write_json(path: Path, value: dict) -> Path:
    """value as JSON at path, through a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(handle, 0o666 & ~current_umask())  # mkstemp's 0600 would hide it from other users
        with os.fdopen(handle, "w") as out:
            json.dump(value, out, indent=1, allow_nan=False, default=str)
            out.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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
    """The study in the file, naming its file (FILE_KEY); raises UnusableFile saying why it is
    none."""
    try:
        study = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UnusableFile(f"not a readable sensitivity study ({error})") from None
    if not isinstance(study, dict) or study.get("kind") != STUDY_KIND:
        raise UnusableFile(f"named {STUDY_PREFIX}*.json but not a sensitivity study")
    return {**study, FILE_KEY: str(path)}


# write_result's temporary files: mkstemp's prefix, 8 random characters, its suffix.
TEMPORARY = re.compile(r"\..+-[a-z0-9_]{8}\.tmp")


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Removes the temporary files of results that a killed run was writing; the caller holds the
    folder's lock, so no live run is writing them. Returns what it removed."""
    stale = [
        p
        for p in sorted(Path(folder).glob(".*.tmp"))
        if TEMPORARY.fullmatch(p.name) and p.is_file()
    ]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def current_umask() -> int:
    """The process's umask: the permissions an ordinary open() would have left out."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------------------------------------
# The shape of a result, as far as collect and report read it: a hand-edited or foreign file that
# breaks it is skipped and named, instead of crashing the table halfway. A dict is a mapping whose
# listed keys are checked when present ("!" required; "*" every other key); a list [shape] is a list
# of such items; Maybe allows null; types are types (a number is never true or false).


@dataclass(frozen=True)
class Maybe:
    shape: Any


ANY = object()
NUM = (int, float)
_LATENCY = {
    "median_ci95": Maybe([NUM]),
    **{name: Maybe(NUM) for name in ("mean", "median", "std", "p90", "p99")},
}
_METRICS = {
    name: Maybe(NUM)
    for name in (
        "model_size_mib",
        "accuracy",
        "avg_confidence",
        "macro_f1",
        "perplexity",
        "bits_per_byte",
        "mean_nll",
        "kl_vs_fp32",
        "time_to_first_token_ms",
        "decode_tokens_per_s",
        "throughput_sps",
        "peak_rss_mib",
        "peak_cuda_mib",
        "load_s",
        "quantize_s",
        "compile_s",
    )
}
_ANALYSIS = {
    "layers": Maybe([{"!layer_type": str, "!depth": Maybe(int), "!sqnr_db": Maybe(NUM)}]),
    "summary": Maybe(
        {
            "by_depth": Maybe([{"!depth": Maybe(int), "mean_sqnr_db": Maybe(NUM)}]),
            "overall": Maybe({"mean_sqnr_db": Maybe(NUM)}),
        }
    ),
    "histograms": Maybe(
        {
            "by_layer_type": Maybe(
                {
                    "*": {
                        "!edges": [NUM],
                        "!counts": [NUM],
                        "!n_layers": int,
                        "!n_weights": int,
                        "!min": NUM,
                        "!max": NUM,
                    }
                }
            )
        }
    ),
    "grids": Maybe({"*": Maybe({"!values": [NUM], "!granularity": str})}),
    "outlier_columns": Maybe({"*": [ANY]}),
}
RESULT_SHAPE = {
    "job": str,
    "variant": str,
    "status": str,
    "device": str,
    "precision": str,
    "spec_hash": Maybe(str),
    "warnings": Maybe([ANY]),
    "!metrics": {**_METRICS, "latency_ms": Maybe(_LATENCY)},
    "environment": {"host": str, "cpu": {"model": ANY}, "gpu": Maybe({"!name": str})},
    "spec": Maybe({"baseline": Maybe(str), "tolerances": Maybe({"*": Maybe(NUM)})}),
    "sample": Maybe({"fingerprint": ANY}),
    "predictions": Maybe(
        {
            "labels": Maybe([str]),
            "gold": Maybe([str]),
            "predicted": Maybe([str]),
            "probabilities": Maybe([[NUM]]),
            "windows": Maybe(
                {"!document": [int], "!tokens": [int], "!nll": [NUM], "kl": Maybe([NUM])}
            ),
            "greedy": Maybe([[int]]),
        }
    ),
    "analysis": Maybe(_ANALYSIS),
}
REQUIRED = ("schema_version", "job", "variant", "status", "device")


def _json_kind(value: Any) -> str:
    kinds = {dict: "object", list: "list", str: "string", bool: "true or false", type(None): "null"}
    return kinds.get(type(value), "number")


def shape_error(value: Any, shape: Any, where: str = "") -> str | None:
    """What in `value` breaks `shape` ("metrics.accuracy: expected a number, found a JSON string"),
    or None."""
    if shape is ANY or (isinstance(shape, Maybe) and value is None):
        return None
    if isinstance(shape, Maybe):
        return shape_error(value, shape.shape, where)
    if isinstance(shape, list):
        if not isinstance(value, list):
            return f"{where}: expected a list, found a JSON {_json_kind(value)}"
        return next(
            (
                e
                for i, item in enumerate(value)
                if (e := shape_error(item, shape[0], f"{where}[{i}]"))
            ),
            None,
        )
    if isinstance(shape, dict):
        if not isinstance(value, dict):
            return f"{where}: expected an object, found a JSON {_json_kind(value)}"
        inside = f"{where}." if where else ""
        missing = [k[1:] for k in shape if k.startswith("!") and k[1:] not in value]
        if missing:
            return f"{inside}{missing[0]}: missing"
        for key, item in value.items():
            sub = shape.get(key, shape.get("!" + key, shape.get("*")))
            if sub is not None and (error := shape_error(item, sub, f"{inside}{key}")):
                return error
        return None
    kinds = shape if isinstance(shape, tuple) else (shape,)
    if isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds):
        return None
    wanted = "a number" if kinds == NUM else "an integer" if kinds == (int,) else "a string"
    return f"{where}: expected {wanted}, found a JSON {_json_kind(value)}"


def lengths_error(result: dict) -> str | None:
    """What the shape cannot say: lists that must be as long as each other, or of a given length."""
    interval = ((result.get("metrics") or {}).get("latency_ms") or {}).get("median_ci95")
    if interval is not None and len(interval) != 2:
        return f"metrics.latency_ms.median_ci95: {len(interval)} values where an interval has 2"
    preds = result.get("predictions") or {}
    gold, predicted, labels = (
        preds.get("gold") or [],
        preds.get("predicted") or [],
        preds.get("labels") or [],
    )
    if preds.get("predicted") is not None and len(gold) != len(predicted):
        return f"predictions: {len(gold)} gold labels but {len(predicted)} predicted"
    ragged = [
        i for i, row in enumerate(preds.get("probabilities") or []) if len(row) != len(labels)
    ]
    if ragged:
        return (
            f"predictions.probabilities[{ragged[0]}]: {len(labels)} values expected, one per label"
        )
    windows_error = windows_lengths_error(preds)
    if windows_error:
        return windows_error
    by_type = ((result.get("analysis") or {}).get("histograms") or {}).get("by_layer_type") or {}
    uneven = [
        name for name, hist in by_type.items() if len(hist["edges"]) != len(hist["counts"]) + 1
    ]
    if uneven:
        return f"analysis.histograms.by_layer_type.{uneven[0]}: expected one edge more than counts"
    return None


def windows_lengths_error(preds: dict) -> str | None:
    """A causal LM's per-window lists: one entry per window, one greedy token per scored one."""
    windows = preds.get("windows")
    if windows is None:
        return None
    count = len(windows["nll"])
    for key in ("document", "tokens", "kl"):
        if windows.get(key) is not None and len(windows[key]) != count:
            return f"predictions.windows.{key}: {len(windows[key])} values for {count} windows"
    greedy = preds.get("greedy")
    if greedy is not None:
        if len(greedy) != count:
            return f"predictions.greedy: {len(greedy)} windows where windows.nll has {count}"
        for i, (ids, tokens) in enumerate(zip(greedy, windows["tokens"])):
            if len(ids) != tokens:
                return f"predictions.greedy[{i}]: {len(ids)} tokens for {tokens} scored"
    return None


# The version of the result format this code writes.
SCHEMA_VERSION = 1

# The schema versions this code reads: every SCHEMA_VERSION so far. A result of a newer one
# may
# mean other things by the same fields.
READABLE_SCHEMA_VERSIONS = (1,)


class UnusableFile(ValueError):
    """A *.json file that is not a result this code can read; str() says why, for the user."""


def load_result(path: Path) -> dict:
    """The result in the file; raises UnusableFile saying why it is none."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as error:
        raise UnusableFile(f"cannot be read ({error.strerror or error})") from None
    except UnicodeDecodeError as error:
        raise UnusableFile(
            f"not UTF-8 text (byte {error.object[error.start]:#04x} at offset {error.start})"
        ) from None
    try:
        result = json.loads(text)
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
    if not isinstance(result, dict):
        raise UnusableFile(
            f"not a result: a JSON {_json_kind(result)}, where a result is one JSON object"
        )
    missing = [key for key in REQUIRED if key not in result]
    if missing:
        raise UnusableFile(f"not a result: it has no {', '.join(missing)}")
    if result["schema_version"] not in READABLE_SCHEMA_VERSIONS or isinstance(
        result["schema_version"], bool
    ):
        raise UnusableFile(
            f"schema_version {result['schema_version']!r}: this quantbench reads schema_version "
            + ", ".join(map(str, READABLE_SCHEMA_VERSIONS))
            + " (a newer quantbench wrote it?)"
        )
    problem = shape_error(result, RESULT_SHAPE) or lengths_error(result)
    if problem:
        raise UnusableFile(f"a malformed result: {problem}")
    return result


# ---------------------------------------------------------------------------------------------
# A result as a typed record. The JSON is the record of truth: from_json(d).to_json() == d, keys in
# the same order, absent keys absent, keys this code has no name for kept as they are.


def _json_fields(cls) -> list:
    return [f for f in fields(cls) if f.metadata.get("json", True)]


def _default(f):
    return f.default_factory() if callable(f.default_factory) else f.default


def _bookkeeping(**kwargs):
    """A field that is not a JSON key."""
    return field(**kwargs, metadata={"json": False}, repr=False, compare=False)


@dataclass
class Record:
    """A JSON object as a dataclass: its named keys as fields (NESTED ones as records of their own),
    every other key in `extra`, and the keys' order as read."""

    extra: dict[str, Any] = _bookkeeping(default_factory=dict)
    key_order: tuple[str, ...] | None = _bookkeeping(default=None)  # None: not read from JSON

    NESTED: ClassVar[dict[str, type[Record]]] = {}
    ALWAYS: ClassVar[tuple[str, ...]] = ()  # the keys a record made here writes even when default

    @classmethod
    def from_json(cls, data: dict) -> Self:
        named = {f.name for f in _json_fields(cls)}
        values = {
            key: cls.NESTED[key].from_json(value)
            if key in cls.NESTED and value is not None
            else value
            for key, value in data.items()
            if key in named
        }
        extra = {key: value for key, value in data.items() if key not in named}
        return cls(**values, extra=extra, key_order=tuple(data))

    def keys(self) -> list[str]:
        """The JSON's keys: as read, then the fields set since (or, made here, ALWAYS and the fields
        that hold more than their default), then extra keys added since."""
        keys = list(self.ALWAYS if self.key_order is None else self.key_order)
        keys += [
            f.name
            for f in _json_fields(self)
            if f.name not in keys and getattr(self, f.name) != _default(f)
        ]
        return keys + [key for key in self.extra if key not in keys]

    def __getitem__(self, key: str) -> Any:
        """The JSON value of one key, for code written against result dicts."""
        if key not in self.keys():
            raise KeyError(key)
        value = self.extra[key] if key in self.extra else getattr(self, key)
        return value.to_json() if isinstance(value, Record) else value

    def to_json(self) -> dict:
        return {key: self[key] for key in self.keys()}


@dataclass
class Latency(Record):
    """metrics.latency_ms: the distribution of per-pass latencies (measure.latency_stats) and how
    the clock ran."""

    mean: float | None = None
    median: float | None = None
    std: float | None = None
    p90: float | None = None
    p99: float | None = None
    min: float | None = None
    max: float | None = None
    n: int | None = None
    cv: float | None = None
    median_ci95: list[float] | None = None
    repeat_cv: float | None = None
    repeat_n: int | None = None
    preemptions_per_s: float | None = None
    clock_started_at: str | None = None
    clock_s: float | None = None
    timing_lock_wait_s: float | None = None

    @classmethod
    def from_values(cls, seconds: list[float]) -> Latency:
        """The statistics of per-pass latencies given in seconds."""
        from runner.measure import latency_stats

        return cls.from_json(latency_stats(seconds))


@dataclass
class Metrics(Record):
    """A result's metrics: what the variant measured (empty when it did not run)."""

    model_size_mib: float | None = None
    accuracy: float | None = None
    macro_f1: float | None = None
    avg_confidence: float | None = None
    latency_ms: Latency | None = None
    throughput_sps: float | None = None
    peak_rss_mib: float | None = None
    peak_cuda_mib: float | None = None
    memory_phases: dict | None = None
    memory_phases_reset: bool | None = None
    load_s: float | None = None
    quantize_s: float | None = None
    compile_s: float | None = None  # a compiled variant's first pass, which compiles it
    # A compiled variant's graphs compiled in its first pass, in warm-up and while the clock ran
    # (0 where warm-up met every shape), graph breaks and cache hits (runner/worker.py).
    compilation: dict | None = None
    # Causal LMs (runner/tasks/causal_lm.py): token-weighted over the evaluation documents.
    perplexity: float | None = None
    bits_per_byte: float | None = None
    mean_nll: float | None = None  # nats per scored token
    scored_tokens: int | None = None
    # Mean KL(FP32 || variant) per scored token, nats, over FP32's top-k tokens and one bin for the
    # rest of the vocabulary (a lower bound of the full KL).
    kl_vs_fp32: float | None = None
    # Greedy generation with the KV cache, at the first of the job's batch sizes; `generation`
    # holds every batch size (runner/tasks/generation.py).
    time_to_first_token_ms: float | None = None
    decode_tokens_per_s: float | None = None
    generation: dict | None = None

    NESTED: ClassVar[dict[str, type[Record]]] = {"latency_ms": Latency}

    @property
    def latency(self) -> Latency:
        """latency_ms, or a latency with nothing measured."""
        return self.latency_ms or Latency()


@dataclass
class Predictions(Record):
    """Per-sample predictions, in sample order, with the label names of the model's classes."""

    labels: list[str] | None = None
    gold: list[str] | None = None
    predicted: list[str] | None = None
    confidence: list[float] | None = None
    probabilities: list[list[float]] | None = None
    # Causal LMs: one entry per rolling window, in window order. windows: {"document": [int],
    # "tokens": [int] scored, "nll": [float] summed nats, "kl": [float] summed KL(FP32 || variant)
    # nats}; greedy: per window, the most probable next token at each scored position.
    windows: dict | None = None
    greedy: list[list[int]] | None = None


FILE_KEY = "_file"  # find_results' dicts name the file they were read from under this key


@dataclass
class Result(Record):
    """One variant's result file. Read files with read_results (or from_json after load_result's
    checks); write with write_result. traceback, analysis, predictions and wall_s appear in a file
    only when present."""

    schema_version: int | None = None
    job: str = ""
    variant: str = ""
    precision: str = ""
    device: str = ""
    status: str = ""
    error: str | None = None
    warnings: list[str] = field(default_factory=list)
    metrics: Metrics = field(default_factory=Metrics)
    settings: dict = field(default_factory=dict)
    environment: dict = field(default_factory=dict)
    spec_hash: str | None = None
    spec: dict | None = None
    sample: dict | None = None
    model: dict | None = None
    repeat: int | None = None
    started_at: str | None = None
    ended_at: str | None = None
    analysis: dict | None = None
    predictions: Predictions | None = None
    traceback: str | None = None
    wall_s: float | None = None
    file: Path | None = _bookkeeping(default=None)  # the file it was read from

    NESTED: ClassVar[dict[str, type[Record]]] = {"metrics": Metrics, "predictions": Predictions}
    ALWAYS: ClassVar[tuple[str, ...]] = (
        *("schema_version", "job", "variant", "precision", "device", "status", "error"),
        *("warnings", "metrics", "settings", "environment", "spec_hash", "spec", "sample"),
        *("model", "repeat", "started_at", "ended_at"),
    )

    @classmethod
    def from_json(cls, data: dict, file: Path | None = None) -> Result:
        """The record of a result dict (a FILE_KEY in it names its file)."""
        if FILE_KEY in data:
            data = dict(data)
            file = Path(data.pop(FILE_KEY))
        result = super().from_json(data)
        result.file = file
        return result

    @classmethod
    def load(cls, path: Path) -> Result:
        """The result in the file; raises UnusableFile saying why it is none."""
        return cls.from_json(load_result(path), Path(path))

    def as_dict(self) -> dict:
        """The JSON, with FILE_KEY naming its file: the dict form find_results has always given."""
        return {**self.to_json(), **({FILE_KEY: str(self.file)} if self.file else {})}

    @property
    def host(self) -> str | None:
        return self.environment.get("host")

    @property
    def fingerprint(self) -> str | None:
        """The evaluation sample's fingerprint: results on the same sample can be paired."""
        return (self.sample or {}).get("fingerprint")

    @property
    def job_spec(self) -> dict:
        """The job spec as run ({} when the result holds none)."""
        return self.spec if isinstance(self.spec, dict) else {}

    @property
    def baseline(self) -> str | None:
        """The baseline the job spec names."""
        return self.job_spec.get("baseline")

    @property
    def tolerances(self) -> dict:
        return self.job_spec.get("tolerances") or {}


def as_result(result: Result | dict) -> Result:
    """A result dict as its record; a record as it is."""
    return result if isinstance(result, Result) else Result.from_json(result)


def read_result(path: Path) -> dict | None:
    try:
        return load_result(path)
    except UnusableFile:
        return None


@dataclass
class Found:
    """What a walk over results folders found."""

    results: list[Result]  # in a stable order: by folder given, then by path
    unusable: list[tuple[Path, str]]  # the *.json files that hold no result, and why
    skipped_folders: list[Path]  # folders named `skip` below the folders given, left out
    studies: list[dict] = field(default_factory=list)  # the sensitivity studies (load_study)


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
                    found.studies.append(load_study(file))
                else:
                    found.results.append(Result.load(file))
            except UnusableFile as why:
                found.unusable.append((file, str(why)))
    return found


def find_results(paths: list[Path], skipped: list[tuple[Path, str]] | None = None) -> list[dict]:
    """Every result under the given folders (or the files themselves) as a dict naming its file
    (FILE_KEY), in a stable order; each file that holds none goes into `skipped` as (file, why)."""
    found = walk(paths)
    if skipped is not None:
        skipped.extend(found.unusable)
    return [result.as_dict() for result in found.results]


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
) -> tuple[dict[str, dict], dict[str, str]]:
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
            kept[v] = r.as_dict()  # the sweep's results are dicts
    return kept, replaced


def check_writable(results_dir: Path, jobs: list[str]) -> None:
    """Before anything runs: this user can make each job's results folder and write a file in it.
    The folders the check made are removed again, so a run refused later leaves nothing behind."""
    for job in jobs:
        folder = Path(results_dir) / job
        made = outermost_missing(folder)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            handle, probe = tempfile.mkstemp(prefix=".write-check-", dir=folder)
            os.close(handle)
            os.unlink(probe)
        except (NotADirectoryError, FileExistsError):
            file = next(p for p in (folder, *folder.parents) if p.exists() and not p.is_dir())
            raise ResultsUnwritable(
                f"results folder {folder}: {file} is a file, not a folder; move it away, or "
                "choose another folder with --results"
            ) from None
        except OSError as error:
            raise ResultsUnwritable(
                f"results folder {folder}: user {_user()} cannot "
                f"{'create' if made else 'write in'} it "
                f"({error.strerror}); give this user write access to it, or choose another folder "
                "with "
                "--results"
            ) from None
        finally:
            remove_if_empty(folder, made)


def outermost_missing(folder: Path) -> Path | None:
    """The outermost of folder and its parents that does not exist yet: what mkdir(parents=True)
    makes."""
    return next((f for f in reversed([folder, *folder.parents]) if not f.exists()), None)


def remove_if_empty(folder: Path, created: Path | None) -> None:
    """The folders made from created down to folder, where nothing was put in them: a check or a run
    refused or stopped before it wrote leaves nothing behind."""
    if created is None:
        return
    for made in [folder, *folder.parents]:
        try:
            made.rmdir()
        except FileNotFoundError:  # never made: mkdir stopped part way down
            pass
        except OSError:  # not empty: it holds results (or another job's folder)
            return
        if made == created:
            return


def _user() -> str:
    uid = os.geteuid()
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"
