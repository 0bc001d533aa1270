"""What every precision family shares: the Precision record and loading a saved checkpoint."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Precision:
    name: str
    family: str  # the module in runner/precisions/ that knows this precision
    devices: tuple[str, ...]
    how: str
    # (model_class, model_dir, device, settings) -> (model, recorded settings): model_class is the
    # task's transformers Auto class; weights arrive at their final dtype
    load: Callable[..., tuple[Any, dict]]
    # (model, settings) -> (model, recorded settings); None where loading already quantized
    quantize: Callable[..., tuple[Any, dict]] | None = None
    # What load imports beyond torch and transformers: the fork server can import it once.
    imports: tuple[str, ...] = ()


def load_as(dtype_name: str, model_class, model_dir, device):
    """The checkpoint loaded straight into dtype_name (a cast variant never holds an FP32 copy it
    drops), on the device, in eval mode; and what to record of it."""
    import torch

    model = model_class.from_pretrained(model_dir, dtype=getattr(torch, dtype_name))
    return model.to(device).eval(), {"dtype": dtype_name}


def as_cpu_float(t):
    """A weight as float32 on the CPU: what every family's read-back weights are."""
    import torch

    return t.detach().to(device="cpu", dtype=torch.float32)
