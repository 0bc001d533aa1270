"""What the calibrated methods see of the FP32 model: every linear layer's input over the
calibration rows, gathered by forward pre-hooks into running statistics of fixed size.

torchao's own observers keep every calibration input (about 39 GB for SmolLM2-135M at 128 rows
of 512 tokens); these keep, per layer, a few vectors of in_features numbers and, for AWQ, one
[in_features, in_features] matrix, whatever the number of rows.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from runner import machine
from runner.precisions.worker import PART_BYTES  # the calibration-free families' parts too


@dataclass
class InputStats:
    """One linear layer's inputs over every calibration token.

    absmax: max |x_j| of each input channel j. abssum: sum of |x_j| (float64, for the mean).
    tokens: how many tokens (input rows) were seen. gram: sum of x^T x, [in, in], where asked
    for: the squared output error of any weight change D over every token seen is
    sum((D @ gram) * D), without keeping the tokens."""

    absmax: torch.Tensor
    abssum: torch.Tensor
    tokens: int = 0
    gram: torch.Tensor | None = None

    def mean_abs(self) -> torch.Tensor:
        """mean |x_j| of each input channel: what AWQ's search scales by."""
        return (self.abssum / max(self.tokens, 1)).to(self.absmax.dtype)

    def add(self, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1]).float()
        self.absmax = torch.maximum(self.absmax, rows.abs().amax(dim=0))
        self.abssum += rows.abs().sum(dim=0, dtype=torch.float64)
        self.tokens += rows.shape[0]
        if self.gram is not None:
            self.gram.addmm_(rows.T, rows)


def linear_layers(model) -> list[tuple[str, torch.nn.Linear]]:
    """(name, layer) of every nn.Linear of the model, in order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def observe_inputs(
    model, batches: list[dict], gram: bool = False, names: list[str] | None = None
) -> dict[str, InputStats]:
    """Every linear layer's InputStats over the calibration batches (model inputs of one row
    each, on the model's device), the model run once on each. gram: also sum x^T x (AWQ).
    names: only these layers (default: every linear layer). The first row runs the whole
    model; each later row stops once every observed layer has seen it as often as the first
    row's forward called it: the layers after them would add nothing."""
    layers = dict(linear_layers(model))
    stats: dict[str, InputStats] = {}
    calls = _RowCalls()
    handles = []
    for name in layers if names is None else names:
        layer = layers[name]
        device = layer.weight.device
        stats[name] = InputStats(
            absmax=torch.zeros(layer.in_features, device=device),
            abssum=torch.zeros(layer.in_features, device=device, dtype=torch.float64),
            gram=torch.zeros(layer.in_features, layer.in_features, device=device) if gram else None,
        )
        handles.append(layer.register_forward_pre_hook(_adder(name, stats[name], calls)))
    try:
        with torch.no_grad():  # not inference_mode: the statistics are used outside it
            for batch in batches:
                calls.start_row()
                try:
                    model(**batch)
                except _RowSeen:
                    pass
                calls.needed = calls.needed or Counter(calls.seen)
    finally:
        for handle in handles:
            handle.remove()
    return stats


class _RowSeen(Exception):
    """Raised by the hook that completes a row's observations: the rest of the model is not run."""


class _RowCalls:
    """How often each observed layer has been called in this row's forward, and how often the
    first row's whole forward called it (None until the first row is done)."""

    def __init__(self):
        self.seen: Counter = Counter()
        self.needed: Counter | None = None

    def start_row(self) -> None:
        self.seen = Counter()


def _adder(name: str, layer_stats: InputStats, calls: _RowCalls):
    def hook(module, args):
        layer_stats.add(args[0])
        calls.seen[name] += 1
        if calls.seen == calls.needed:
            raise _RowSeen

    return hook


def replace_layer(model, name: str, layer: torch.nn.Module) -> None:
    """Puts layer in the model under the module name of the one it replaces."""
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, layer)


def quantize_layers(model, keep: frozenset[str], method: str, make_layer) -> None:
    """Every linear layer but those in keep replaced by make_layer(name, layer), in order. Each
    FP32 layer is dropped as it is replaced, and what a part of about PART_BYTES of weights freed
    (the library's temporaries too) is handed back before the next: the peak is the model and
    one part, where holding every replaced layer to the end held a second model's worth. A layer
    its library cannot quantize fails the variant naming the layer, its shape and the library's
    message."""
    converted = 0
    for name in [name for name, _ in linear_layers(model) if name not in keep]:
        layer = model.get_submodule(name)  # the only reference kept: freed once replaced
        converted += layer.weight.nbytes
        try:
            replace_layer(model, name, make_layer(name, layer))
        except Exception as error:
            raise RuntimeError(
                f"{method}: torchao failed at layer {name!r} ({layer.in_features} inputs, "
                f"{layer.out_features} outputs): {type(error).__name__}: {error}"
            ) from error
        del layer
        if converted >= PART_BYTES:
            machine.release_freed_memory()
            converted = 0
    machine.release_freed_memory()
