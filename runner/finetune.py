"""Fine-tuning: train the model on a training split before anything is quantized, once, cached.

What is trained is the task's (runner/tasks): a classification task gives the encoder a new head
and trains both on labelled rows; a causal LM trains every weight at next-token prediction on
blocks of text (runner/tasks/lm_training.py). Each Task says how its rows are made and batched.

Runs where the dispatcher places it (a GPU node when the cluster has one), with the transformers
Trainer (accelerate underneath) rather than a hand-written loop. The result is a saved FP32
checkpoint in the model cache, keyed by a content hash of the base model, the training data and the
settings, so a second run reuses it. The cache entry is written through a temporary folder and a
rename: a fine-tune that fails halfway leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

from runner import measure, models
from runner.spec import FinetuneSpec
from runner.tasks import Task


@dataclass
class FinetuneTask:
    key: str  # the cache key of the fine-tuned model
    model_dir: str  # the prepared base checkpoint it trains
    base_key: str
    texts: list[str]
    labels: list[str]  # each text's answer (a classifier's label name); [] for a causal LM
    label_names: list[str]  # the fine-tuned head's id2label, in id order
    settings: FinetuneSpec
    max_length: int
    task: Task  # the job's task: its worker makes the model, the rows and the collator
    task_config: Any = None  # the task's configuration from its plan (a causal LM's context)


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


def training_settings(task: FinetuneTask) -> dict:
    """The part of the task's configuration the training depends on ({} for most tasks)."""
    return task.task.training_settings(task.task_config)


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


def run_finetune(task: FinetuneTask) -> dict:
    """Train and save into the cache. Returns what was done, for the results and the run's
    output."""
    existing = models.cached_model(task.key)
    if existing is not None:
        return models.cached_info(existing)

    import torch
    from transformers import AutoTokenizer, set_seed

    models.quiet_libraries()
    started = time.perf_counter()
    torch.set_num_threads(
        measure.available_cpus()
    )  # Ray's one thread per task would halve the speed
    set_seed(task.settings.seed)
    tokenizer = AutoTokenizer.from_pretrained(task.model_dir)
    own = task.task.worker()
    model = own.finetune_model(task.model_dir, task.label_names)
    rows = own.training_rows(tokenizer, task)
    outcome = train(model, rows, own.data_collator(tokenizer), task.settings)
    model.eval()
    info = {
        "key": task.key,
        "base": task.base_key,
        "label_names": task.label_names,
        "train_rows": len(task.texts),
        "settings": {k: v for k, v in asdict(task.settings).items() if k != "train"},
        "max_length": task.max_length,
        **({"task_settings": training_settings(task)} if training_settings(task) else {}),
        "trained_on": own.describe_training(task),
        "train_loss": round(float(outcome.training_loss), 6),
        "train_s": round(time.perf_counter() - started, 2),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "torch_threads": torch.get_num_threads(),
        "newly_initialised": [],
    }
    folder = models.save_folder(
        task.key, info, lambda tmp: (model.save_pretrained(tmp), tokenizer.save_pretrained(tmp))
    )
    return {**info, "cached": False, "folder": str(folder)}


def train(model, train_set: list[dict], collator, s: FinetuneSpec):
    """The transformers Trainer over the rows, batched by the collator, with the job's settings;
    its TrainOutput."""
    import torch
    from transformers import Trainer, TrainingArguments

    steps = math.ceil(math.ceil(len(train_set) / s.batch_size) * s.epochs)
    with tempfile.TemporaryDirectory(prefix="quantbench-finetune-") as scratch:
        arguments = TrainingArguments(
            output_dir=scratch,
            num_train_epochs=s.epochs,
            learning_rate=s.learning_rate,
            per_device_train_batch_size=s.batch_size,
            weight_decay=s.weight_decay,
            warmup_steps=round(s.warmup_ratio * steps),
            seed=s.seed,
            data_seed=s.seed,
            save_strategy="no",
            report_to=[],
            logging_strategy="no",
            disable_tqdm=True,
            dataloader_num_workers=0,
            train_sampling_strategy="group_by_length",  # less padding: faster steps on a CPU
            use_cpu=not torch.cuda.is_available(),
        )
        # The Trainer sets config.use_cache to its argument's False; the saved model keeps the
        # base's, or generating with it from transformers would recompute every step.
        use_cache = getattr(model.config, "use_cache", None)
        trainer = Trainer(
            model=model,
            args=arguments,
            train_dataset=train_set,
            data_collator=collator,
        )
        outcome = trainer.train()
        if use_cache is not None:
            model.config.use_cache = use_cache
        return outcome
