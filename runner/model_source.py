"""A model source read with transformers: an inline architecture's or a hub model's config, a hub
tokenizer, and the check only transformers can make (that the task's Auto class has a class for an
inline model type). A local folder's files are read without it (runner/model_checks.py).

`quantbench validate` imports transformers here; its lazy module loads the Auto classes, and torch
with them, only where a job needs them (an inline or hub model), as `transformers.X` is first read.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from pathlib import Path

import transformers
from huggingface_hub.errors import StrictDataclassFieldValidationError

from runner import model_checks
from runner.fields import SpecError
from runner.gguf_files import read_gguf
from runner.job import JobSpec, ModelSource
from runner.precisions import precision_of
from runner.precisions.torchao import INT4_GROUP_SIZES


def read_config(source: ModelSource, job: Path, field: str = "model"):
    """The model's transformers config (config.json only: no weights are read)."""
    if source.config is not None:
        config = dict(source.config)
        model_type = config.pop("model_type")
        if (
            model_type not in transformers.CONFIG_MAPPING
        ):  # transformers' own message lists every type it knows (12 KB)
            close = difflib.get_close_matches(
                str(model_type), list(transformers.CONFIG_MAPPING.keys()), n=3
            )
            raise SpecError(
                job,
                f"{field}.config.model_type",
                model_type,
                "not a model type transformers knows"
                + (f"; did you mean {', '.join(close)}?" if close else ""),
            )
        try:
            built = transformers.AutoConfig.for_model(model_type, **config)
        except StrictDataclassFieldValidationError as error:
            raise refused_value(error, source, job, field) from None
        except (ValueError, TypeError) as error:
            raise SpecError(
                job, f"{field}.config", source.config, f"not a valid {model_type} config: {error}"
            ) from None
        model_checks.check_heads(built, job, field)
        return built
    model_checks.check_source(source, job, field)
    try:
        name = model_checks.pretrained_name(source)
        return transformers.AutoConfig.from_pretrained(name, revision=source.revision)
    except (OSError, ValueError) as error:
        raise SpecError(
            job, field, source.describe(), f"cannot read the model's config: {error}"
        ) from None


def refused_value(
    error: StrictDataclassFieldValidationError, source: ModelSource, job: Path, field: str
) -> SpecError:
    """One field of an inline config that transformers' typed config refuses, named in one
    paragraph. Its message is 'Validation error for field NAME:' then the cause on a line."""
    first, *cause = str(error).splitlines()
    name = first.split("'")[1] if first.count("'") >= 2 else "?"
    reason = " ".join(line.strip() for line in cause) or first
    # YAML reads 100 as an integer: a float field wants 100.0.
    hint = (
        "; write a float field with a decimal point (100.0)" if "expected float" in reason else ""
    )
    return SpecError(
        job,
        f"{field}.config.{name}",
        source.config.get(name),
        f"transformers refuses it ({reason}){hint}",
    )


def model_config(source: ModelSource, job: Path, field: str = "model") -> dict:
    """The model's config as a dict. A local model's is its config.json, read without importing
    transformers (and torch): planning stays quick."""
    if source.gguf is not None:
        return gguf_config(source, job, field)
    folder = model_checks.local_folder(source, job, field)
    if folder is None:
        return read_config(source, job, field).to_dict()  # inline configs, the hub
    if not (folder / "config.json").is_file():
        below = sorted(str(c.parent.relative_to(folder)) for c in folder.glob("*/config.json"))
        hint = (
            f"; a folder below holds one: {', '.join(below)}"
            if below
            else "; name the folder that save_pretrained wrote"
        )
        raise SpecError(job, field, str(folder), f"the folder has no config.json{hint}")
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise SpecError(
            job, field, source.describe(), f"cannot read the model's config: {error}"
        ) from None
    if not isinstance(config, dict):
        raise SpecError(
            job,
            field,
            f"{folder / 'config.json'}: a JSON {type(config).__name__}",
            "a model's config.json is one JSON object of the model's settings",
        )
    return config


def gguf_config(source: ModelSource, job: Path, field: str) -> dict:
    """A GGUF's config as transformers reads it, with the causal-LM architecture transformers
    builds from it: a GGUF holds a causal LM."""
    config = dict(read_gguf(source, job, field).config)
    names = transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if config.get("model_type") in names:
        config["architectures"] = [names[config["model_type"]]]
    return config


def check_gguf_tokenizer(spec: JobSpec, job: Path) -> None:
    """A job's own tokenizer for a GGUF model must have the file's vocabulary: another gives ids
    the embedding rows do not mean."""
    if spec.model.gguf is None or spec.tokenizer is None:
        return
    gguf = read_gguf(spec.model, job)
    size = model_checks.tokenizer_size(spec.tokenizer, job, "tokenizer")
    if size is not None and size != gguf.vocabulary:
        raise SpecError(
            job,
            "tokenizer",
            f"{spec.tokenizer.describe()}: {size:,} tokens",
            f"the GGUF model's tokenizer has {gguf.vocabulary:,} tokens "
            f"({spec.model.describe()}): name a tokenizer of the same vocabulary, or leave "
            "tokenizer: out to use the file's own",
        )


def check_tokenizer_files(source: ModelSource, job: Path, field: str) -> None:
    """A local folder must hold a tokenizer's vocabulary. Without one, transformers builds a
    tokenizer of a handful of special tokens, every word becomes [UNK], and every variant runs 'ok'
    on nonsense."""
    if source.hub:
        check_hub_tokenizer(source, job, field)
    folder = model_checks.local_folder(source, job, field)
    vocabulary = model_checks.VOCABULARY_FILES
    if folder is not None and not any((folder / name).is_file() for name in vocabulary):
        hint = (
            "save the tokenizer beside the model (tokenizer.save_pretrained) or name one with "
            "tokenizer:"
            if field == "model"
            else "name a folder that holds one"
        )
        raise SpecError(
            job,
            field,
            str(folder),
            f"the folder has no tokenizer vocabulary (none of {', '.join(vocabulary)}); {hint}",
        )


def check_hub_tokenizer(source: ModelSource, job: Path, field: str) -> None:
    """A hub tokenizer is loaded now, as a hub model's config is: offline and not in the cache, it
    would fail only at model preparation, after Ray started (blaming the model). Online, this fills
    the cache that preparation then reads."""
    try:
        transformers.AutoTokenizer.from_pretrained(source.hub, revision=source.revision)
    except (OSError, ValueError) as error:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        said = "HF_HUB_OFFLINE is set and it is not in the Hugging Face cache; " if offline else ""
        raise SpecError(
            job,
            f"{field}.hub",
            source.hub,
            f"cannot load the tokenizer: {said}"
            f"{str(error).splitlines()[0] if str(error) else type(error).__name__}",
        ) from None


def check_model_class(task, source: ModelSource, config: dict, job: Path) -> None:
    """An inline config's model type has a class of the task's transformers Auto class (a task
    that says what to say otherwise: Task.no_model_class)."""
    if source.config is None or task.no_model_class is None:
        return
    model_type = config.get("model_type")
    auto = getattr(transformers, task.model_class)
    if (
        model_type not in transformers.CONFIG_MAPPING
        or transformers.CONFIG_MAPPING[model_type] not in auto._model_mapping
    ):
        raise SpecError(job, "model.config.model_type", model_type, task.no_model_class)


GROUP_SETTING = "torchao_int4_group_size"


def check_int4_group_size(task, spec: JobSpec, job: Path) -> None:
    """Every nn.Linear an int4 precision of the job quantizes (torchao-int4-weight, awq-int4,
    gptq-int4: they share the group size) has in_features a whole number of groups, as the worker
    checks after the cluster started. The model is built on torch's meta device from its config:
    no weights are read or allocated. A model that cannot be built so is left to the worker."""
    int4 = sorted(
        {name for name in quantizing_precisions(spec) if GROUP_SETTING in precision_fields(name)}
    )
    if not int4 or spec.model.gguf is not None or spec.model.archive is not None:
        return
    group_size = spec.settings[GROUP_SETTING]
    widths = linear_in_features(task, spec.model, job)
    wrong = [(name, width) for name, width in widths.items() if width % group_size]
    if not wrong:
        return
    name, width = wrong[0]
    verb = "quantizes" if len(int4) == 1 else "quantize"
    fits = [g for g in INT4_GROUP_SIZES if all(w % g == 0 for w in widths.values())]
    raise SpecError(
        job,
        f"settings.{GROUP_SETTING}",
        group_size,
        f"{', '.join(int4)} {verb} layer {name!r}, whose in_features {width} is not a multiple "
        f"of it ({len(wrong)} of the model's {len(widths)} linear layers are not); "
        + (
            f"group sizes that divide every layer: {', '.join(map(str, fits))}"
            if fits
            else f"no allowed group size ({', '.join(map(str, INT4_GROUP_SIZES))}) divides them all"
        ),
    )


def quantizing_precisions(spec: JobSpec) -> list[str]:
    """The precisions the job's variants and its study quantize with."""
    names = [variant.precision for variant in spec.variants]
    return names + ([spec.sensitivity.precision] if spec.sensitivity is not None else [])


def precision_fields(name: str) -> set[str]:
    return {f.name for f in dataclasses.fields(precision_of(name).config)}


def linear_in_features(task, source: ModelSource, job: Path) -> dict[str, int]:
    """Each nn.Linear's in_features, by module name, of the model built on the meta device."""
    import torch  # only for a job with an int4 variant

    config = read_config(source, job)
    try:
        with torch.device("meta"):
            model = getattr(transformers, task.model_class).from_config(config)
    except Exception:  # the worker's load says what is wrong, with the weights
        return {}
    return {
        name: module.in_features
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    }
