"""The fine-tune stage of `quantbench run`, on the driver: what the job's fine-tune trains on, keyed
as its cache entry; the cached model when there is one, else one training call on a node
(runner/finetune/train.py runs it); and a word when the loss stayed near guessing.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from runner import dispatch, model_cache
from runner.job import FinetuneSpec
from runner.plan import JobPlan
from runner.work import FinetuneWork


def fine_tuned_model(
    plan: JobPlan,
    base_dir: Path,
    base_info: dict,
    cluster,
    say,
    placement_timeout_s: float | None = None,
) -> tuple[Path, dict]:
    """The job's fine-tuned FP32 model: from the cache, or trained now on a node of the cluster."""
    spec = plan.spec
    work = finetune_work(plan, base_dir, base_info)
    chance = plan.task.chance_loss(work)
    trained_on = plan.task.worker().describe_training(work)
    cached = model_cache.cached_model(work.key)
    if cached is not None:
        info = model_cache.cached_info(cached)
        say(
            f"fine-tune: reusing the cached fine-tuned model {cached} (trained on "
            f"{trained_on}, train loss "
            f"{info['train_loss']}){chance_note(info['train_loss'], chance)}"
        )
        return cached, fine_tuned_info(info, base_info)
    say(
        f"fine-tune: training on {trained_on} ({spec.finetune.epochs:g} "
        f"epoch(s), batch {spec.finetune.batch_size}, learning rate "
        f"{spec.finetune.learning_rate:g}) ..."
    )
    info = dispatch.finetune(
        work,
        cluster,
        placement_timeout_s,
        precisions=[v.precision for v in spec.variants if v.device == "cpu"],
    )
    say(
        f"fine-tune: done in {info['train_s']:.1f} s on {info['device']} ({info.get('node_ip')}), "
        f"train loss {info['train_loss']}; cached as "
        f"{info['folder']}{chance_note(info['train_loss'], chance)}"
    )
    return Path(info["folder"]), fine_tuned_info(info, base_info)


def fine_tuned_info(info: dict, base_info: dict) -> dict:
    """A fine-tuned model's description for its results; a hub base model's commit stays in it."""
    commit = {"commit": base_info["commit"]} if "commit" in base_info else {}
    return {**info, "source": f"fine-tuned {base_info['source']}", **commit}


def finetune_work(plan: JobPlan, base_dir: Path, base_info: dict) -> FinetuneWork:
    """What the job's fine-tune trains on, keyed as its cache entry."""
    spec = plan.spec
    texts = [e.text for e in plan.train_examples]
    # A task whose answers are not labels (a causal LM) trains on text alone: no labels.
    labels, label_names = plan.task.training_labels(plan.targets.config, plan.train_examples)
    work = FinetuneWork(
        **{**plan.worker_inputs(), "texts": texts},
        model_dir=str(base_dir),
        key="",
        base_key=base_info["key"],
        labels=labels,
        label_names=label_names,
        finetune=spec.finetune,
    )
    work.key = finetune_key(
        base_info["key"],
        texts,
        labels,
        label_names,
        spec.finetune,
        spec.dataset.max_length,
        training_settings(work),
    )
    return work


def chance_note(train_loss: float | None, chance: tuple[float, str]) -> str:
    """A word when the training loss stayed near what guessing gives (for cross-entropy, ln of the
    number of answers: chance is that loss and how it is written): the model then learned
    little, and every variant's metrics will say so."""
    loss, written = chance
    if train_loss is None or not loss or train_loss < 0.95 * loss:
        return ""
    return (
        f"; note: the loss stayed near {written} = {loss:.3f}, what guessing gives: the model "
        "learned little (more rows or epochs, or another learning rate, may help)"
    )


def training_settings(work: FinetuneWork) -> dict:
    """The part of the work's configuration the training depends on ({} for most tasks)."""
    return work.task.training_settings(work.task_config)


def finetune_key(
    base_key: str,
    texts: list[str],
    labels: list[str],
    label_names: list[str],
    settings: FinetuneSpec,
    max_length: int,
    task_settings: dict | None = None,
) -> str:
    """task_settings: training_settings(), hashed only when there are some (a classification
    model's key is what it always was)."""
    digest = hashlib.sha256(b"quantbench-finetune-v1")
    digest.update(base_key.encode())
    for text, label in zip(texts, labels):
        digest.update(text.encode() + b"\x1f" + label.encode() + b"\x1e")
    settings_without_source = {k: v for k, v in asdict(settings).items() if k != "train"}
    digest.update(
        json.dumps([label_names, settings_without_source, max_length], sort_keys=True).encode()
    )
    if task_settings:
        digest.update(json.dumps(task_settings, sort_keys=True).encode())
    return digest.hexdigest()[:20]
