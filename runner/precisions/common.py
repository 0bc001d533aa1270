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
    # (model_class, model_dir, device, settings, keep=frozenset()) -> (model, recorded settings):
    # model_class is the task's transformers Auto class; weights arrive at their final dtype. keep:
    # module names of linear layers to leave in FP32 (a sensitivity study's mixed model).
    load: Callable[..., tuple[Any, dict]]
    # (model, settings, keep=frozenset()) -> (model, recorded settings); None where loading
    # already quantized
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


def linear_names(model) -> list[str]:
    """The module names of the model's nn.Linear layers (bnb's layers subclass it), in order."""
    import torch

    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def check_keep(model, keep: frozenset[str], precision: str) -> None:
    """Every name to keep in FP32 must be a linear layer of the model. Raises ValueError."""
    linears = linear_names(model)
    unknown = sorted(set(keep) - set(linears))
    if unknown:
        shown = ", ".join(linears[:4]) + (", ..." if len(linears) > 4 else "")
        raise ValueError(
            f"{precision}: cannot keep {unknown} in FP32: not linear layers of the model; "
            f"its {len(linears)} linear layers are named like {shown}"
        )
