"""The fine-tune on a node: train the model on a training split before anything is quantized.

What is trained, and on what, is the task's: its worker (runner/tasks/<name>/worker.py) makes the
model, the rows and the collator; this module only trains and saves.

Runs where the dispatcher places it (a GPU node when the cluster has one), with the transformers
Trainer (accelerate underneath) rather than a hand-written loop. The result is a saved FP32
checkpoint in the model cache, keyed by a content hash of the base model, the training data and the
settings, so a second run reuses it. The cache entry is written through a temporary folder and a
rename: a fine-tune that fails halfway leaves nothing behind.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from runner import measure, model_cache, models, progress
from runner.job import FinetuneSpec
from runner.work import FinetuneWork


def run_finetune(work: FinetuneWork) -> dict:
    """Train and save into the cache (or find it there). Returns what was done, for the results
    and the run's output, with the folder's archive where the driver may not share this disk."""
    existing = model_cache.cached_model(work.key)
    info = model_cache.cached_info(existing) if existing is not None else trained(work)
    if work.send_back:
        info["archive"] = model_cache.archive_folder(Path(info["folder"]))
    return info


def trained(work: FinetuneWork) -> dict:
    """Train the model and save it into the cache."""
    models.quiet_libraries()
    progress.start(f"fine-tune {work.job}")
    started = time.perf_counter()
    torch.set_num_threads(measure.available_cpus())  # Ray's one thread per call would halve it
    set_seed(work.finetune.seed)
    tokenizer = AutoTokenizer.from_pretrained(work.model_dir)
    own = work.task.worker()
    depends_on = work.task.training_settings(work.task_config)  # part of its cache key
    model = own.finetune_model(work.model_dir, work.label_names)
    rows = own.training_rows(tokenizer, work)
    outcome = train(model, rows, own.data_collator(tokenizer), work.finetune)
    model.eval()
    info = {
        "key": work.key,
        "base": work.base_key,
        "label_names": work.label_names,
        "train_rows": len(work.texts),
        "settings": {k: v for k, v in asdict(work.finetune).items() if k != "train"},
        "max_length": work.max_length,
        **({"task_settings": depends_on} if depends_on else {}),
        "trained_on": own.describe_training(work),
        "train_loss": round(float(outcome.training_loss), 6),
        "train_s": round(time.perf_counter() - started, 2),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "torch_threads": torch.get_num_threads(),
        "newly_initialised": [],
    }
    folder = model_cache.save_folder(
        work.key, info, lambda tmp: (model.save_pretrained(tmp), tokenizer.save_pretrained(tmp))
    )
    return {**info, "cached": False, "folder": str(folder)}


def train(model, train_set: list[dict], collator, s: FinetuneSpec):
    """The transformers Trainer over the rows, batched by the collator, with the job's settings;
    its TrainOutput."""
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
        with progress.phase("training", steps, "steps") as step:
            trainer.add_callback(CountSteps(step))
            outcome = trainer.train()
        if use_cache is not None:
            model.config.use_cache = use_cache
        return outcome


class CountSteps(TrainerCallback):
    """The Trainer's optimizer steps counted in a progress phase (its own bar is off: it would go
    to the Ray worker's log, one line per redraw)."""

    def __init__(self, step: progress.Phase):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        self.step.set(state.global_step, state.max_steps or None)
