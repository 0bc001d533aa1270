"""FP32's side of a causal LM's KL, computed once per job and device and read by every variant.

What every variant of a causal-LM job compares against is the same: FP32's top-k log-probabilities,
the mass on the rest, the target's log-probability and the greedy token at each scored position
(perplexity.window_losses with top_k). One task per job and device computes it before the variants
(runner/fp32_reference.py is the driver's side), in the variant's way: the same windows, batch
size, device and threads, so that every figure a variant reports is the one it computed itself,
to the last digit. The file (docs/results.md, "The FP32 reference") is one .npz: the arrays below,
in FP32 (FP16 log-probabilities would move the KL's last digits), and a JSON header saying what
they were computed from. A header that differs from the one this run would write means another
model, sample, setting or machine: the file is not used, and the reference is computed again.

Runs on a node, in a process of its own: torch is imported here.
"""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM

from runner import measure, models, progress
from runner.tasks.causal_lm import perplexity

FORMAT = 1  # the header's "format": raised when the arrays change
# Per scored position (in window order, windows joined) and per window.
POSITION_ARRAYS = ("greedy_ids", "top_ids", "top_log_probs", "rest_log_prob", "target_log_probs")
WINDOW_ARRAYS = ("document", "tokens", "nll")


class Unusable(Exception):
    """A stored reference that must not be used; the message says why, for the run's note."""


def header(work, windows: list[perplexity.Window]) -> dict:
    """What the reference depends on: the model, the windows (the sample as tokenized and cut),
    the settings that shape it and the machine that computes it."""
    digest = hashlib.sha256()
    for window in windows:
        digest.update(json.dumps([window.document, window.input_ids, window.targets]).encode())
    return {
        "format": FORMAT,
        "model": work.model_info.get("key") or work.model_dir,
        "windows": digest.hexdigest()[:16],
        "window_count": len(windows),
        "kl_top_k": work.task_config.perplexity.kl_top_k,
        "batch_size": work.evaluation.batch_size,
        "threads": work.evaluation.threads or measure.available_cpus(),
        "device": work.variant.device,
        "device_kind": device_kind(work.variant.device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def device_kind(device: str) -> str:
    """The GPU's name; on the CPU its model and the kernels' instruction set (AVX512, AVX2, ...),
    which round differently."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{measure.cpu_info()['model']} ({torch.backends.cpu.get_cpu_capability()})"


def computed(work, windows, padding: int) -> list[perplexity.WindowLoss]:
    """FP32's window losses with its top-k, on the variant's device, a batch at a time."""
    device, size = work.variant.device, work.evaluation.batch_size
    fp32 = AutoModelForCausalLM.from_pretrained(work.model_dir, dtype=torch.float32)
    fp32 = fp32.to(device).eval()
    top_k = work.task_config.perplexity.kl_top_k
    losses = []
    with progress.phase("KL: FP32 top-k", len(windows), "windows") as step:
        for start in range(0, len(windows), size):
            part = windows[start : start + size]
            losses += perplexity.window_losses(fp32, part, device, size, padding, top_k)
            step.advance(len(part))
    return losses


def packed(head: dict, losses: list[perplexity.WindowLoss]) -> bytes:
    """The file's bytes: every array, and the header as a JSON string."""
    arrays = {
        "header": np.frombuffer(json.dumps(head, sort_keys=True).encode(), dtype=np.uint8),
        "document": np.array([loss.document for loss in losses], dtype=np.int32),
        "tokens": np.array([loss.tokens for loss in losses], dtype=np.int32),
        "nll": np.array([loss.nll for loss in losses], dtype=np.float64),
        "greedy_ids": np.concatenate([loss.greedy_ids for loss in losses]).astype(np.int32),
        "top_ids": np.concatenate([loss.top_ids for loss in losses]).astype(np.int32),
    }
    for name in ("top_log_probs", "rest_log_prob", "target_log_probs"):
        arrays[name] = np.concatenate([getattr(loss, name) for loss in losses])  # float32
    out = io.BytesIO()
    np.savez_compressed(out, **arrays)
    return out.getvalue()


def unpacked(data: bytes, expected: dict) -> list[perplexity.WindowLoss]:
    """The window losses a stored reference holds; Unusable when it cannot be read whole or was
    computed from something else than `expected` says."""
    try:
        with np.load(io.BytesIO(data)) as stored:
            arrays = {name: stored[name] for name in stored.files}
        head = json.loads(arrays.pop("header").tobytes())
    except Exception as error:  # a truncated or foreign file: zipfile, numpy or JSON says why
        raise Unusable(f"it cannot be read whole ({type(error).__name__}: {error})") from None
    differs = [key for key in sorted(set(head) | set(expected)) if head.get(key) != expected[key]]
    if differs:
        found = ", ".join(f"{k} {head.get(k)!r}, this run {expected.get(k)!r}" for k in differs)
        raise Unusable(f"it was computed for another spec, model or machine: {found}")
    return losses_of(arrays)


def losses_of(arrays: dict) -> list[perplexity.WindowLoss]:
    """The arrays cut back into window losses; Unusable when their lengths disagree."""
    missing = [name for name in POSITION_ARRAYS + WINDOW_ARRAYS if name not in arrays]
    tokens = arrays.get("tokens", np.zeros(0, dtype=np.int32))
    positions = int(tokens.sum())
    short = [name for name in POSITION_ARRAYS if name in arrays and len(arrays[name]) != positions]
    if missing or short:
        raise Unusable(f"it lacks arrays or positions (missing {missing}, wrong length {short})")
    ends = np.cumsum(tokens)
    losses = []
    for index, end in enumerate(ends):
        at = slice(int(end - tokens[index]), int(end))
        losses.append(
            perplexity.WindowLoss(
                document=int(arrays["document"][index]),
                nll=float(arrays["nll"][index]),
                tokens=int(tokens[index]),
                greedy_ids=arrays["greedy_ids"][at].astype(np.int64).tolist(),
                top_ids=arrays["top_ids"][at].astype(np.int64),
                top_log_probs=arrays["top_log_probs"][at],
                rest_log_prob=arrays["rest_log_prob"][at],
                target_log_probs=arrays["target_log_probs"][at],
            )
        )
    return losses


def stored_losses(work, windows) -> list[perplexity.WindowLoss] | None:
    """The reference the driver handed this variant (work.reference), if it was computed from what
    this variant reads; None: the variant computes its own, as without a stored reference."""
    if not getattr(work, "reference", None):
        return None
    try:
        return unpacked(work.reference, header(work, windows))
    except Unusable:  # the task that made it checked it; a variant never fails for it
        return None


def run_reference(work) -> dict:
    """The reference task (work: work.ReferenceWork): {"data": the file's bytes, or None when the
    stored file (work.stored) holds this run's reference; "unused": why the stored file was not
    used, or None}."""
    from runner.tasks.causal_lm.worker import WORKER, batch_windows  # beside the variants' code

    models.quiet_libraries()
    torch.set_num_threads(work.evaluation.threads or measure.available_cpus())
    batches, _, _ = WORKER.batches(work)
    windows, padding = batch_windows(batches), batches[0].padding
    expected, unused = header(work, windows), None
    if work.stored is not None:
        try:
            unpacked(work.stored, expected)
            return {"data": None, "unused": None}
        except Unusable as why:
            unused = str(why)
    return {"data": packed(expected, computed(work, windows, padding)), "unused": unused}
