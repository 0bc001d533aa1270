"""Measuring a model that differs from a base model in a few linear layers, cheaply.

A study measures hundreds of models that are each a base model (the FP32 one, or the fully
quantized one) with a few linear layers taken from the other. Two savings, both exact:

- **Swapping, not copying**: the measured model is the base with those layers' modules swapped in
  from the other model for one pass, then swapped back. Nothing is copied or quantized again; each
  layer is quantized once per step, in the fully quantized model. (Every precision quantizes a
  layer from its own weights, or, calibrated, in the fully quantized model the study already takes
  kept layers from: runner/study/steps.py.)
- **Replaying the blocks before the first swapped layer**: the model's repeated blocks (decoder or
  encoder layers) before the first one holding a swapped layer compute what they computed in the
  base's pass, so their recorded outputs are handed on instead. A layer in the last block costs a
  pass of one block and the head.

The base's blocks are recorded in one pass (record_blocks); a measurement then replays them
(swapped_and_replayed). Outputs are the same to the last bit as a pass of the whole model: the
blocks after the replayed ones get the very tensors they got in the base's pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from runner.layers import block_of

# A recording larger than this share of the memory available when it starts is dropped: the step
# then measures whole passes, as slow as before but never out of memory.
RECORD_MEMORY_SHARE = 0.25


@dataclass
class Recording:
    """A base model's pass: each block's outputs, call by call, and the first block each linear
    layer ran after (0: before any block; len(blocks): after every block, as an LM head)."""

    blocks: list[str]  # module names, in the order the pass ran them
    outputs: list[list[Any]] = field(default_factory=list)  # [block][call]
    starts: dict[str, int] = field(default_factory=dict)  # linear layer -> blocks run before it
    dropped: str | None = None  # why the outputs were not kept (then nothing is replayed)

    def start(self, layers) -> int:
        """How many leading blocks a model with these layers swapped can replay."""
        if self.dropped or not layers:
            return 0
        return min(self.starts.get(name, 0) for name in layers)


def model_blocks(model, layers) -> list[str]:
    """The module names of the repeated blocks that hold the layers, in index order: the children
    0..n-1 of one ModuleList (model.layers.0, ...). [] where they are not so."""
    names = sorted({b for b in map(block_of, layers) if b}, key=lambda n: int(n.rsplit(".", 1)[1]))
    parents = {name.rsplit(".", 1)[0] for name in names}
    if len(parents) != 1:
        return []
    parent = model.get_submodule(parents.pop())
    if not isinstance(parent, torch.nn.ModuleList) or len(names) != len(parent):
        return []
    return names


def record_blocks(
    model, layers, run: Callable[[Any], Any], memory_bytes: int
) -> tuple[Recording, Any]:
    """(the recording, what run(model) returned): one pass, keeping each block's outputs and when
    each of the layers first ran. The outputs are dropped (Recording.dropped says why) past
    RECORD_MEMORY_SHARE of memory_bytes."""
    recording = Recording(model_blocks(model, layers))
    recording.outputs = [[] for _ in recording.blocks]
    done, kept = [0], [0]
    budget = RECORD_MEMORY_SHARE * memory_bytes

    def block_ran(index):
        def hook(module, args, output):
            done[0] = max(done[0], index + 1)
            if recording.dropped is None:
                kept[0] += _bytes(output)
                if kept[0] > budget:
                    recording.dropped = f"block outputs over {budget / 2**20:.0f} MiB"
                    recording.outputs = []
                else:
                    recording.outputs[index].append(output)

        return hook

    def layer_ran(name):
        def hook(module, args, output):
            recording.starts.setdefault(name, done[0])

        return hook

    handles = [
        model.get_submodule(name).register_forward_hook(block_ran(i))
        for i, name in enumerate(recording.blocks)
    ]
    handles += [model.get_submodule(n).register_forward_hook(layer_ran(n)) for n in layers]
    try:
        result = run(model)
    finally:
        for handle in handles:
            handle.remove()
    return recording, result


def _bytes(output) -> int:
    if isinstance(output, torch.Tensor):
        return output.numel() * output.element_size()
    if isinstance(output, (tuple, list)):
        return sum(_bytes(item) for item in output)
    return 0


class Replay(torch.nn.Module):
    """Stands in for a block: returns what the block returned in the base's pass, call by call."""

    def __init__(self, outputs: list):
        super().__init__()
        self.outputs, self.calls = outputs, 0

    def forward(self, *args, **kwargs):
        if self.calls >= len(self.outputs):
            raise RuntimeError(
                f"a replayed block was called {self.calls + 1} times; the base's pass called it "
                f"{len(self.outputs)} times: the measurement does not make the base's passes"
            )
        self.calls += 1
        return self.outputs[self.calls - 1]


def _check_replayed(model, blocks: list[str], recording: Recording) -> None:
    for index, name in enumerate(blocks):
        calls, recorded = model.get_submodule(name).calls, len(recording.outputs[index])
        if calls and calls != recorded:  # 0: no pass was made
            raise RuntimeError(
                f"block {name} was replayed {calls} times; the base's pass ran it {recorded} "
                "times: the measurement does not make the base's passes"
            )


@contextmanager
def swapped_and_replayed(
    base, donor, layers, recording: Recording, start: int | None = None
) -> Iterator[Any]:
    """base with the layers' modules taken from donor, and its blocks before the first of them
    (or its first `start` blocks) replayed from recording (the base's); put back as they were on
    leaving."""
    if recording.dropped:
        start = 0
    elif start is None:
        start = recording.start(layers)
    originals = {name: base.get_submodule(name) for name in layers}
    blocks = {name: base.get_submodule(name) for name in recording.blocks[:start]}
    try:
        for name in layers:
            base.set_submodule(name, donor.get_submodule(name))
        for index, name in enumerate(recording.blocks[:start]):
            base.set_submodule(name, Replay(recording.outputs[index]))
        yield base
        _check_replayed(base, recording.blocks[:start], recording)
    finally:
        for name, module in {**originals, **blocks}.items():
            base.set_submodule(name, module)
