"""A causal-LM job's `benchmarks:` block: lm-evaluation-harness tasks every variant runs on the
model it built, after its timed passes (docs/benchmarks.md).

Three parts, in the order a job meets them: reading the block (torch- and lm-eval-free, as the job
is read), checking every task before any variant (`quantbench validate` and `run`: each task is
loaded with no model, which reads its data), and the run in the variant's own process (HFLM over
the variant's model, lm-eval's `evaluate` one task at a time) with the per-task and per-item
records the result keeps. lm-eval is imported only inside the functions that need it: a plain job
never imports it (2 s, and its 14k task YAMLs).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import random
import re
import threading
import time
import urllib.parse
from dataclasses import dataclass, replace
from pathlib import Path

from runner import folders, progress
from runner.fields import Reader, SpecError

# Asked of the hub before a job names an lm-eval task by name; a slower answer counts as none.
HUB_PROBE_S = 1.0
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
# A task's field that names data files or a data folder, relative to its YAML's folder.
DATA_FILES, DATA_DIR = "data_files", "data_dir"
# HFLM says this once per request it cuts from the left; quantbench counts them instead.
TRUNCATION_MESSAGE = "exceeds model's maximum length"


@dataclass(frozen=True)
class BenchmarkTask:
    """One entry of benchmarks.tasks."""

    spec: str  # as the job named it: an lm-eval task name or a path to a task YAML
    yaml_path: str | None  # the YAML, absolute; None for an lm-eval name
    limit: int | float | None = None  # the first N docs (a fraction below 1); None: all
    num_fewshot: int = 0
    name: str | None = None  # the task's own name, as validation found it


@dataclass(frozen=True)
class BenchmarkSettings:
    tasks: tuple[BenchmarkTask, ...]
    batch_size: int | None = None  # HFLM's; None: the job's evaluation.batch_size
    # Whether the hub is out of reach (decided once, at validation): lm-eval then runs offline.
    hub_offline: bool = True


# Reading the block, as the job is read.


def read_benchmarks(top: Reader) -> BenchmarkSettings | None:
    """`benchmarks:` from the job's top-level Reader; None where the job has none. Paths are
    resolved against the job file's folder."""
    reader = top.sub("benchmarks")
    if reader is None:
        return None
    reader.check_keys(("batch_size", "tasks"))
    batch_size = reader.positive_int("batch_size", None)
    entries = reader.get("tasks", list, required=True)
    if not entries:
        raise reader.error("tasks", entries, "a list of one or more tasks ({task: ...})")
    folder = Path(top.file).parent
    tasks = []
    for index, entry in enumerate(entries):
        tasks.append(read_task(Reader(top.file, entry, f"benchmarks.tasks[{index}]"), folder))
    names = [task.spec for task in tasks]
    for name in names:
        if names.count(name) > 1:
            raise reader.error("tasks", name, "each task once: this one is listed twice")
    return BenchmarkSettings(tuple(tasks), batch_size)


def read_task(reader: Reader, folder: Path) -> BenchmarkTask:
    reader.check_keys(("task", "limit", "num_fewshot"))
    spec = reader.get("task", str, required=True).strip()
    if not spec:
        raise reader.error("task", spec, "an lm-eval task name or the path of a task YAML")
    limit = reader.get("limit", (int, float))
    if limit is not None and not (limit >= 1 and float(limit).is_integer() or 0 < limit < 1):
        raise reader.error(
            "limit",
            reader.data["limit"],
            "a whole number of documents of 1 or more (the task's first N), or a fraction "
            "between 0 and 1; leave it out for every document",
        )
    if limit is not None and limit >= 1:
        limit = int(limit)
    num_fewshot = reader.positive_int("num_fewshot", 0, minimum=0)
    yaml_path = None
    if is_path(spec):
        yaml_path = str((folder / spec).resolve())
    return BenchmarkTask(spec, yaml_path, limit, num_fewshot)


def is_path(spec: str) -> bool:
    """A task YAML's path, not an lm-eval name (names have no '/' and no .yaml)."""
    return "/" in spec or spec.endswith((".yaml", ".yml"))


# Checking every task before any variant.


def check_benchmarks(settings: BenchmarkSettings, job: Path) -> tuple[BenchmarkSettings, list[str]]:
    """Every task loads (its YAML, its data) and takes its num_fewshot; the settings with the
    hub's reachability decided, and one plan note per task. Raises SpecError naming the job file,
    the entry's field, what was found and what is allowed."""
    offline = hub_is_offline()
    notes, named = [], []
    with lm_eval_environment(offline):
        by_name = any(t.yaml_path is None for t in settings.tasks)
        names = load_default_names() if by_name else frozenset()
        for index, entry in enumerate(settings.tasks):
            field = f"benchmarks.tasks[{index}]"
            if entry.yaml_path is None:
                check_name(entry, names, offline, job, field)
            task = load_task(entry, job, field)
            notes.append(task_note(entry, task, job, field))
            named.append(replace(entry, name=task.config.task))
    return replace(settings, tasks=tuple(named), hub_offline=offline), notes


def hub_is_offline() -> bool:
    """The hub is out of reach: the user said so (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE), or it
    does not answer within HUB_PROBE_S (never minutes of retries)."""
    if any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE") for v in OFFLINE_VARIABLES):
        return True
    endpoint = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    answered = []

    def probe() -> None:
        import socket

        with contextlib.suppress(OSError):
            socket.create_connection((endpoint.hostname, endpoint.port or 443), HUB_PROBE_S).close()
            answered.append(True)

    # A thread: a name lookup that hangs is not bound by the socket's timeout.
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(HUB_PROBE_S + 0.5)
    return not answered


@contextlib.contextmanager
def lm_eval_environment(offline: bool):
    """lm-eval's datasets cached in quantbench's cache, the hub left alone when it is out of
    reach (an immediate error instead of retries), restored afterwards. datasets and
    huggingface_hub read these variables as they are imported, so their copies are set too."""
    import datasets
    import datasets.config
    import huggingface_hub.constants

    variables = {"HF_DATASETS_CACHE": str(folders.cache_root() / "datasets")}
    if offline:
        variables.update(dict.fromkeys(OFFLINE_VARIABLES, "1"))
    copies = [(datasets.config, "HF_DATASETS_CACHE", Path(variables["HF_DATASETS_CACHE"]))]
    if offline:
        copies += [(huggingface_hub.constants, "HF_HUB_OFFLINE", True)]
        copies += [(datasets.config, name, True) for name in OFFLINE_VARIABLES]
    # Said on every load of a task with a custom_dataset, about lm-eval's own command line.
    quiet = MessageFilter("Custom kwargs can be passed to `--metadata`")
    logging.getLogger("lm_eval.api.task").addFilter(quiet)
    saved_variables = {name: os.environ.get(name) for name in variables}
    saved_copies = [(module, name, getattr(module, name)) for module, name, _ in copies]
    os.environ.update(variables)
    for module, name, value in copies:
        setattr(module, name, value)
    # datasets' bars on stderr: a first load draws them, a cached one not.
    bars = not datasets.utils.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if bars:
            datasets.enable_progress_bars()
        for name, value in saved_variables.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        for module, name, value in saved_copies:
            setattr(module, name, value)
        logging.getLogger("lm_eval.api.task").removeFilter(quiet)


@functools.cache
def load_default_names() -> frozenset[str]:
    """lm-eval's own task names (its index of ~14.7k YAMLs: seconds, so only for a job that names
    one, once per process)."""
    from lm_eval.tasks import TaskManager

    return frozenset(TaskManager().all_tasks)


def check_name(entry: BenchmarkTask, names: frozenset[str], offline: bool, job: Path, field: str):
    import lm_eval

    if entry.spec in names:
        return
    hub = " (the Hugging Face hub is unreachable from here)" if offline else ""
    raise SpecError(
        job,
        f"{field}.task",
        entry.spec,
        f"no lm-eval task of that name in lm-eval {lm_eval.__version__}{hub}; allowed: one of its "
        "task names (`lm_eval ls tasks`), or the path of a task YAML with local data files, "
        "relative to the job file",
    )


def load_task(entry: BenchmarkTask, job: Path, field: str):
    """The lm-eval task object, its data read (no model needed). A YAML is handed to lm-eval as
    a dict with its data paths resolved against its own folder; every failure names the job
    file, the entry and the YAML."""
    from lm_eval.tasks import TaskManager

    if entry.yaml_path is None:
        what, spec = entry.spec, entry.spec
        manager = TaskManager()
    else:
        what, spec = entry.yaml_path, task_config(entry, job, field)
        manager = TaskManager(include_defaults=False)
    try:
        loaded = manager.load([spec])
    except Exception as error:  # lm-eval's and datasets' own errors: say them with the file
        raise SpecError(job, f"{field}.task", entry.spec, load_failure(what, error)) from error
    tasks = loaded["tasks"]
    if len(tasks) != 1:
        raise SpecError(
            job,
            f"{field}.task",
            entry.spec,
            f"{what} is a group of {len(tasks)} tasks; allowed: one task per entry (list its "
            f"tasks one by one: {', '.join(sorted(tasks)[:8])})",
        )
    return next(iter(tasks.values()))


def load_failure(what: str, error: Exception) -> str:
    message = f"{type(error).__name__}: {error}".strip()
    if "OfflineModeIsEnabled" in message or "Couldn't reach" in message:
        return (
            f"lm-eval could not load {what}: its data are on the Hugging Face hub, which is "
            "unreachable from here; use a task YAML with local data files"
        )
    return f"lm-eval could not load {what}: {message}"


def task_config(entry: BenchmarkTask, job: Path, field: str) -> dict:
    """The task YAML as lm-eval reads it (its !function tags, includes), with the data paths of
    dataset_kwargs resolved against the YAML's own folder (lm-eval would take the current
    folder's) and checked to be there."""
    from lm_eval.tasks._yaml_loader import load_yaml

    path = Path(entry.yaml_path)
    if not path.is_file():
        raise SpecError(job, f"{field}.task", entry.spec, f"no file {path}: a task YAML")
    try:
        config = load_yaml(path)
    except Exception as error:  # YAML syntax, a !function whose module fails
        raise SpecError(job, f"{field}.task", entry.spec, load_failure(str(path), error)) from error
    kwargs = dict(config.get("dataset_kwargs") or {})
    for key, value in kwargs.items():
        if key in (DATA_FILES, DATA_DIR):
            kwargs[key] = resolve_data(value, path, job, f"{field}.task")
    if kwargs:
        config["dataset_kwargs"] = kwargs
    return config


def resolve_data(value, yaml_path: Path, job: Path, field: str):
    """data_files (a path, a list, or split -> path(s)) or data_dir, each path made absolute
    against the YAML's folder and checked to exist."""
    if isinstance(value, dict):
        return {split: resolve_data(v, yaml_path, job, field) for split, v in value.items()}
    if isinstance(value, list):
        return [resolve_data(v, yaml_path, job, field) for v in value]
    if not isinstance(value, str) or "://" in value:
        return value  # a URL or a shape lm-eval reads: its own errors are said
    resolved = (yaml_path.parent / value).resolve()
    if not any(c in value for c in "*?[") and not resolved.exists():
        raise SpecError(
            job,
            field,
            str(yaml_path),
            f"its data file {value} is not there: no file {resolved} (a path in a task YAML is "
            "relative to the YAML's own folder)",
        )
    return str(resolved)


def task_note(entry: BenchmarkTask, task, job: Path, field: str) -> str:
    """What runs, as the plan says it; refuses a num_fewshot beyond the task's few-shot pool."""
    docs = len(task.eval_docs)
    if entry.num_fewshot:
        pool = len(task.fewshot_docs() or [])
        if entry.num_fewshot >= pool:
            raise SpecError(
                job,
                f"{field}.num_fewshot",
                entry.num_fewshot,
                f"{entry.spec} has {pool} few-shot examples; allowed: 0 to {max(pool - 1, 0)}",
            )
    limit = "all" if entry.limit is None else entry.limit
    shots = f"{entry.num_fewshot}-shot"
    if entry.num_fewshot and not (task.has_training_docs() or task.has_validation_docs()):
        shots += " (the examples come from the scored split itself)"
    return f"benchmark {task.config.task} ({entry.spec}): {docs} docs, limit {limit}, {shots}"


# The run, in the variant's process.


def run_benchmarks(
    settings: BenchmarkSettings, model, tokenizer, batch_size: int
) -> tuple[dict, dict, list[str]]:
    """Every task on the variant's model, one at a time: (metrics.benchmarks,
    predictions.benchmarks, warnings). A task lm-eval fails keeps its error; the others run."""
    import lm_eval

    truncations = MessageFilter(TRUNCATION_MESSAGE)  # HFLM says it once per request
    logging.getLogger("lm_eval.models.huggingface").addFilter(truncations)
    tasks, items, warnings = {}, {}, []
    try:
        with lm_eval_environment(settings.hub_offline):
            lm = as_is(model, tokenizer, settings.batch_size or batch_size)
            for entry in settings.tasks:
                truncations.count = 0
                try:
                    if isinstance(lm, Exception):
                        raise lm
                    with progress.phase(f"benchmark {entry.spec}"):
                        name, record, per_item = run_task(lm, entry)
                except Exception as error:  # lm-eval's message is the record; the rest run
                    name = entry.name or entry.spec
                    record = {"source": entry.spec, "error": f"{type(error).__name__}: {error}"}
                    warnings.append(f"benchmark {entry.spec} failed: {record['error']}")
                else:
                    items[name] = per_item
                record.setdefault("truncated_requests", truncations.count)
                tasks[name] = record
    finally:
        logging.getLogger("lm_eval.models.huggingface").removeFilter(truncations)
    return {"lm_eval_version": lm_eval.__version__, "tasks": tasks}, items, warnings


def as_is(model, tokenizer, batch_size: int):
    """lm-eval's HFLM over the variant's model as it was built, or why it could not be made.

    HFLM re-ties a model's output layer to its embedding (lm_eval/models/huggingface.py:392):
    on a variant whose quantization untied them that would score the embedding's FP32 weights
    as the output layer (or fail, on torch.ao's quantized Linear, whose weight is a method), so
    the call is skipped."""
    from lm_eval.models.huggingface import HFLM

    model.tie_weights = lambda *args, **kwargs: None  # this instance only, removed below
    try:
        return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    except Exception as error:  # every task fails with it; the variant's other metrics stay
        return error
    finally:
        del model.tie_weights


class MessageFilter(logging.Filter):
    """Drops a logger's records that hold `text`, counting them."""

    def __init__(self, text: str):
        super().__init__()
        self.text, self.count = text, 0

    def filter(self, record: logging.LogRecord) -> bool:
        if self.text in record.getMessage():
            self.count += 1
            return False
        return True


def run_task(lm, entry: BenchmarkTask) -> tuple[str, dict, dict]:
    """One task, seeded as lm-eval's simple_evaluate seeds it (0 everywhere)."""
    import numpy as np
    import torch
    from lm_eval import evaluator

    clock = time.perf_counter()
    task = load_task(entry, Path(entry.yaml_path or entry.spec), "benchmarks")
    name = task.config.task
    task.set_config(key="num_fewshot", value=entry.num_fewshot)
    task.set_fewshot_seed(seed=0)
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    results = evaluator.evaluate(
        lm, {name: task}, limit=entry.limit, log_samples=True, verbosity="WARNING"
    )
    record = task_record(entry, task, results)
    record["seconds"] = round(time.perf_counter() - clock, 3)
    return name, record, item_record(task, results["samples"][name])


def task_record(entry: BenchmarkTask, task, results: dict) -> dict:
    """What the result keeps of one task (the contract in docs/benchmarks.md)."""
    import lm_eval.utils

    name = task.config.task
    samples = results["samples"][name]
    hashes = "".join(s["doc_hash"] + s["prompt_hash"] + s["target_hash"] for s in samples)
    config = results["configs"][name]
    return {
        "source": entry.spec,
        "config_sha256": config_sha256(config, entry.yaml_path),
        "task_hash": lm_eval.utils.hash_string(hashes),
        "version": results["versions"][name],
        "num_fewshot": results["n-shot"][name],
        "limit": entry.limit,
        "n_docs": dict(results["n-samples"][name]),
        "output_type": task.OUTPUT_TYPE,
        "metrics": task_metrics(results["results"][name], results["higher_is_better"][name]),
        "primary": task.config.metric_list[0]["metric"],
    }


def task_metrics(scores: dict, higher: dict) -> dict:
    """lm-eval's "acc,none" and "acc_stderr,none" as {"acc": {value, stderr, higher_is_better}};
    a filter other than none stays in the name ("exact_match,strict-match")."""
    metrics = {}
    for key, value in scores.items():
        metric, _, kept = key.partition(",")
        if metric.endswith("_stderr") or metric == "alias" or not kept:
            continue
        stderr = scores.get(f"{metric}_stderr,{kept}")
        named = metric if kept == "none" else key
        metrics[named] = {
            "value": number(value),
            "stderr": number(stderr),
            "higher_is_better": higher.get(metric),
        }
    return metrics


def number(value) -> float | None:
    """A float, or None for lm-eval's "N/A" and a NaN (JSON has none)."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def item_record(task, samples: list[dict]) -> dict:
    """Per evaluated document, in doc_id order: its gold choice and the predicted one (multiple
    choice; else None) and each metric's per-item value where it is a number."""
    samples = sorted(samples, key=lambda s: s["doc_id"])
    metric_names = [m["metric"] for m in task.config.metric_list]
    gold, pred = [], []
    for sample in samples:
        gold.append(gold_index(task, sample))
        pred.append(predicted_index(task, sample))
    items = {}
    for metric in metric_names:
        values = [number(s.get(metric)) for s in samples]
        if all(v is not None for v in values):
            items[metric] = values
    return {"doc_id": [s["doc_id"] for s in samples], "gold": gold, "pred": pred, "items": items}


def gold_index(task, sample: dict) -> int | None:
    """The gold choice's index: a string target is a choice's name (lm-eval maps it so)."""
    if task.OUTPUT_TYPE != "multiple_choice":
        return None
    target = sample["target"]
    if isinstance(target, str):
        choices = task.doc_to_choice(sample["doc"])
        return choices.index(target) if target in choices else None
    return int(target) if isinstance(target, int) else None


def predicted_index(task, sample: dict) -> int | None:
    """The choice of the largest log-likelihood (what acc scores)."""
    if task.OUTPUT_TYPE != "multiple_choice":
        return None
    lls = [response[0] for response in sample["filtered_resps"]]
    return max(range(len(lls)), key=lls.__getitem__)


def config_sha256(config: dict, yaml_path: str | None = None) -> str:
    """sha256 of the resolved task config as sorted JSON, each data file's path replaced by the
    file's own sha256 (a data folder's: its files'), so that the hash follows the data and not
    where the checkout lies. A `!function` lm-eval cannot show the source of is written as
    `<function name at 0x...>`, an address that differs in every process: the address is
    dropped, and the Python files beside the YAML (where `!function`s live) are hashed instead."""
    config = json.loads(re.sub(FUNCTION_ADDRESS, ">", json.dumps(config, default=str)))
    kwargs = config.get("dataset_kwargs") or {}
    for key in (DATA_FILES, DATA_DIR):
        if key in kwargs:
            kwargs[key] = content_hashes(kwargs[key])
    if yaml_path is not None:
        code = sorted(Path(yaml_path).parent.glob("*.py"))
        config["quantbench_function_files"] = {p.name: file_sha256(p) for p in code}
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


FUNCTION_ADDRESS = r" at 0x[0-9a-fA-F]+>"


def content_hashes(value):
    if isinstance(value, dict):
        return {key: content_hashes(v) for key, v in value.items()}
    if isinstance(value, list):
        return [content_hashes(v) for v in value]
    path = Path(str(value))
    if path.is_file():
        return file_sha256(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return {str(p.relative_to(path)): file_sha256(p) for p in files}
    return value


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def headline(benchmarks: dict | None) -> str:
    """Each task's primary score for the variant's line: "qb_smsa acc 0.412"."""
    parts = []
    for name, record in ((benchmarks or {}).get("tasks") or {}).items():
        if "error" in record:
            parts.append(f"{name} failed")
            continue
        primary = record.get("primary")
        value = (record.get("metrics", {}).get(primary) or {}).get("value")
        parts.append(f"{name} {primary} {value:.3f}" if value is not None else f"{name} -")
    return "  ".join(parts)
