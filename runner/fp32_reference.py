"""The FP32 reference on the driver: computed once per job and device, before the variants, kept
beside the results and handed to every variant of that device.

A causal LM's variants all compare against the same FP32 top-k log-probabilities and greedy tokens
(runner/tasks/causal_lm/reference.py computes and checks them, on a node). Rather than each variant
loading the FP32 model and computing them again, one task per device runs first, like a variant
(on a node of that device, with the variants' threads), and the driver writes what it returns to
DIR/<job>/fp32-reference-<device>.npz. The task is handed the file already there (a run resumed,
or a folder copied from another machine): it keeps it when its header is what this run would
write, and says why not otherwise. Then each variant gets the file's bytes with its work. A
reference task that fails costs nothing but time: its variants compute their own, as before.

A classifier needs none: its variants' probabilities are compared with FP32's in `collect`, from
the FP32 variant's own result.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

from runner import dispatch
from runner.cluster import Cluster
from runner.folders import current_umask
from runner.job import Variant
from runner.precisions import family_of
from runner.work import ReferenceWork, VariantWork

PREFIX = "fp32-reference-"  # .npz: collect and report read *.json only


def reference_path(results_dir: Path, job: str, device: str) -> Path:
    return Path(results_dir) / job / f"{PREFIX}{device}.npz"


def wanted(work: VariantWork) -> bool:
    """Whether the variant compares against FP32's top-k: a causal LM with perplexity.kl_top_k."""
    settings = getattr(work.task_config, "perplexity", None)
    return bool(getattr(settings, "kl_top_k", 0))


def hand_out(
    items: list[VariantWork],
    results_dir: Path,
    cluster: Cluster,
    model_dir: Path,
    say: Callable[[str], None],
    placement_timeout_s: float | None = None,
) -> None:
    """Each device's reference computed (or the stored one kept) and set on its items."""
    devices = sorted({work.variant.device for work in items if wanted(work)})
    for device in devices:
        some = next(work for work in items if work.variant.device == device)
        path = reference_path(results_dir, some.job, device)
        data = reference_for(some, path, cluster, model_dir, say, placement_timeout_s)
        for work in items:
            if work.variant.device == device:
                work.reference = data


def reference_for(work, path, cluster, model_dir, say, placement_timeout_s) -> bytes | None:
    """The file's bytes for work's job and device, computed where they are not already there and
    right; None when the task failed (the variants then compute their own)."""
    stored = path.read_bytes() if path.is_file() else None
    task = reference_work(work, stored)
    try:
        outcome = dispatch.run_reference(task, cluster, model_dir, placement_timeout_s)
    except RuntimeError as error:
        say(
            f"note: {work.job}: no FP32 reference on {work.variant.device}, each variant "
            f"computes its own: {error}"
        )
        return None
    device = work.variant.device
    if outcome["data"] is None:
        say(f"{work.job}: FP32 reference on {device}: kept {path}")
        return stored
    write_bytes(path, outcome["data"])
    size = f"{len(outcome['data']) / 1024:.0f} KiB"
    if outcome["unused"]:
        say(f"note: {work.job}: {path} was not used: {outcome['unused']}; computed again ({size})")
    else:
        say(f"{work.job}: FP32 reference on {device}: computed, {size} in {path}")
    return outcome["data"]


def reference_work(work: VariantWork, stored: bytes | None) -> ReferenceWork:
    """The variant's inputs, as the FP32 variant of its device would have them."""
    shared = {f.name: getattr(work, f.name) for f in fields(VariantWork) if f.init}
    fp32 = Variant("fp32", work.variant.device)
    shared.update(variant=fp32, family=family_of("fp32"), repeat=0, reference=None)
    return ReferenceWork(**shared, stored=stored)


def write_bytes(path: Path, data: bytes) -> None:
    """Through a temporary file in the same folder and a rename, as results are written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(handle, 0o666 & ~current_umask())
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
