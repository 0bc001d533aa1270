"""Models: the prepared FP32 checkpoint, made once into the model cache, and the quiet libraries
every process that loads one wants.

Every variant of a job quantizes the same saved FP32 checkpoint. `prepare_model` materialises it
once (a randomly initialised classification head or inline architecture gets its weights here, from
the job's seed) into a cache folder keyed by a content hash (runner/model_cache.py), so variants on
any worker load identical weights and a second run reuses the folder. torch and transformers are
imported here.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
import warnings
from pathlib import Path

import torch
import transformers
from transformers.utils import logging as hf_logging

from runner.fields import SpecError
from runner.gguf_files import GgufFile, read_gguf
from runner.job import JobSpec, ModelSource
from runner.model_cache import (
    cache_root,
    cached_info,
    cached_model,
    hub_commit,
    model_key,
    save_folder,
)
from runner.model_checks import labels_in_config, pretrained_name
from runner.model_source import model_config, read_config
from runner.tasks import TASKS


def label_names(config) -> list[str]:
    """A loaded transformers config's label names in id order, as a prepared model records them."""
    return [config.id2label[i] for i in sorted(config.id2label)]


def model_label_names(source: ModelSource, job: Path, field: str = "model") -> list[str]:
    """The label names of a source's config as planning reads them (model_source.model_config)."""
    return labels_in_config(model_config(source, job, field))


class _DropMessages(logging.Filter):
    """Drops a logger's records whose message contains any of these texts."""

    def __init__(self, *texts: str):
        super().__init__()
        self.texts = texts

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in self.texts)


_TORCHAO_IMPORT_NOISE = _DropMessages("Failed to load")
_PYTREE_ENUM_NOTICE = _DropMessages("is an Enum subclass")


def quiet_libraries() -> None:
    """Loading reports, progress bars and deprecation notices are not for our output: what matters
    goes into the results."""
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings(
        "ignore", message=".*inputs will be cast from.*"
    )  # said once in the settings
    warnings.filterwarnings("ignore", category=UserWarning, module="torch.ao.quantization")
    # Importing torchao logs the CUDA extensions a CPU build cannot load, and a torch notice about
    # how it registers its enums; its configs work without either.
    # (A logger adds one filter object once: calling this again adds nothing.)
    logging.getLogger("torchao").addFilter(_TORCHAO_IMPORT_NOISE)
    logging.getLogger("torch.utils._pytree").addFilter(_PYTREE_ENUM_NOTICE)


def prepare_model(spec: JobSpec, say=lambda line: None) -> tuple[Path, dict]:
    """The job's FP32 checkpoint and tokenizer in the cache; (folder, its description). Cached by
    content."""
    key, commit = model_key(spec), hub_commit(spec.model)
    folder = cached_model(key)
    if folder is not None:
        return folder, named_by(spec, cached_info(folder))

    # The missing head is reported in the run's output and the results; not as a loader's table.
    quiet_libraries()
    started = time.perf_counter()
    torch.manual_seed(spec.seed)
    model_class = getattr(transformers, TASKS[spec.task].model_class)
    gguf = read_gguf(spec.model, spec.file) if spec.model.gguf is not None else None
    if gguf is not None:
        say(f"model: dequantizing {spec.model.describe()} to FP32, once (then cached)")
        model, newly_initialised = dequantized_gguf(gguf, model_class), []
    elif spec.model.config is not None:
        model = model_class.from_config(read_config(spec.model, spec.file))
        newly_initialised = ["all weights (inline architecture)"]
    else:
        model, loading = model_class.from_pretrained(
            pretrained_name(spec.model, spec.file),
            revision=commit or spec.model.revision,  # the weights the key names
            dtype=torch.float32,
            output_loading_info=True,
        )
        newly_initialised = sorted(loading.get("missing_keys", []))
    refusal = TASKS[spec.task].refuse_model(model)
    if refusal is not None:  # before the cache: a refused model is never a variant's
        raise SpecError(spec.file, "model", spec.model.describe(), refusal)
    tokenizer = load_tokenizer(spec, gguf)
    info = {
        "key": key,
        "source": spec.model.describe(),
        **({"commit": commit} if spec.model.hub else {}),
        **({"gguf": gguf.record()} if gguf else {}),
        "tokenizer": (spec.tokenizer or spec.model).describe(),
        "seed": spec.seed,
        "newly_initialised": newly_initialised,
        "parameters": sum(p.numel() for p in model.parameters()),
        "label_names": label_names(model.config),
    }
    save_folder(key, info, lambda tmp: (model.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))
    info["prepare_s"] = round(time.perf_counter() - started, 3)
    return cache_root() / "models" / key, {**info, "cached": False}


def named_by(spec: JobSpec, info: dict) -> dict:
    """A cache entry's description with the model and tokenizer as this job names them: an entry
    keyed by content may have been made by a job that named the same file another way (a copy
    elsewhere, its chunks)."""
    named = {**info, "source": spec.model.describe()}
    named["tokenizer"] = (spec.tokenizer or spec.model).describe()
    if spec.model.gguf is not None and "gguf" in info:
        named["gguf"] = {**info["gguf"], "file": spec.model.gguf.describe()}
    return named


def dequantized_gguf(gguf: GgufFile, model_class):
    """The GGUF's weights dequantized to FP32, in a plain model: transformers marks a model loaded
    from a GGUF as quantized and refuses to save it, so its weights move into one built from the
    same config without the mark."""
    # transformers draws a progress bar of its own for the tensors (plain tqdm, on stderr, which
    # its logging switch does not reach); run's own line says what is happening.
    with contextlib.redirect_stderr(io.StringIO()):
        loaded = model_class.from_pretrained(
            str(gguf.path.parent), gguf_file=gguf.path.name, dtype=torch.float32
        )
    config = loaded.config
    del config.quantization_config
    model = model_class.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    return model


def load_tokenizer(spec: JobSpec, gguf: GgufFile | None):
    """The job's tokenizer, else the model's own (a GGUF's from the file)."""
    if spec.tokenizer is None and gguf is not None:
        return transformers.AutoTokenizer.from_pretrained(
            str(gguf.path.parent), gguf_file=gguf.path.name
        )
    source = spec.tokenizer or spec.model
    return transformers.AutoTokenizer.from_pretrained(
        pretrained_name(source, spec.file), revision=hub_commit(source) or source.revision
    )
