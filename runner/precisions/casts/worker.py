"""fp32, fp16, bf16 on the worker: the checkpoint loaded straight into the cast's dtype. Every
layer keeps its nn.Linear (or GPT-2 Conv1D), read as FamilyWorker reads it; no grid."""

from __future__ import annotations

import torch

from runner.precisions import Precision
from runner.precisions.casts import Cast
from runner.precisions.worker import FamilyWorker, check_keep, load_as


class CastsWorker(FamilyWorker):
    # The cast is made while loading: a copy of an FP32 model would not be one.
    quantizes_while_loading = True

    def load(
        self, precision: Precision, config: Cast, model_class, model_dir, device, keep=frozenset()
    ):
        if keep and config.dtype != "float32":
            raise ValueError(
                f"{precision.name} cannot keep layers in FP32 (asked: {sorted(keep)}): a cast "
                "loads every weight straight into its dtype; keep is allowed for fp32 and the "
                "quantized precisions"
            )
        model, recorded = load_as(config.dtype, model_class, model_dir, device)
        check_keep(model, keep, precision.name)
        return model, recorded

    def is_quantized(self, config: Cast, module) -> bool:
        """A cast layer is 'quantized' when its weight is held in the precision's dtype."""
        return module.weight.dtype == getattr(torch, config.dtype)


WORKER = CastsWorker()
