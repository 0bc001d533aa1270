"""The FP32 checkpoint as a variant's weight analysis reads it: one linear layer's weight at a time.

The analysis compares a variant with FP32 after its timed passes. A second, whole FP32 model for
that held the variant and all of FP32 at once. Here the FP32 model is built with its linear
layers' weights left out (on PyTorch's meta device: a shape, no memory), and each is read from the
checkpoint's safetensors file only while that layer runs or is compared, then dropped: the
analysis holds the variant, FP32's other tensors (embeddings, norms, a weight two layers share)
and one FP32 linear layer. The values are the file's, as from_pretrained reads them.

Runs on a node, in the variant's process: torch is imported here.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import accelerate
import torch
import transformers
from safetensors import safe_open
from transformers.pytorch_utils import Conv1D

from runner.precisions.worker import REFERENCE

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"  # a checkpoint in shards: each tensor's file


def tensor_files(model_dir) -> dict[str, Path] | None:
    """Each tensor's name in the checkpoint and the safetensors file holding it; None for a
    checkpoint in another format (the caller loads the whole model instead)."""
    folder = Path(model_dir)
    if (folder / INDEX_FILE).is_file():
        weight_map = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    if (folder / SINGLE_FILE).is_file():
        with safe_open(folder / SINGLE_FILE, framework="pt") as opened:
            return dict.fromkeys(opened.keys(), folder / SINGLE_FILE)
    return None


def read_tensor(files: dict[str, Path], name: str) -> torch.Tensor:
    """One tensor in FP32, read alone with pread into memory of its own: a mapped file's pages
    would stay resident while it is open, and none of the file's other tensors are read."""
    with safe_open(files[name], framework="pt", backend="pread") as opened:
        tensor = opened.get_tensor(name)
    return tensor.to(torch.float32) if tensor.is_floating_point() else tensor


class StreamedFp32:
    """The FP32 model whose linear layers (but a weight shared with another module: a tied output
    layer) are read from the checkpoint one at a time: as each runs (a hook before its forward
    loads it and drops the one before) and in `weights`. `model` runs like the FP32 model."""

    def __init__(self, model, files: dict[str, Path], streamed: dict[str, torch.nn.Module]):
        self.model = model
        self.files = files
        self.streamed = streamed  # module name: a linear layer whose weight is read when needed
        self.loaded: str | None = None
        for name, module in streamed.items():
            module.register_forward_pre_hook(lambda _module, _args, name=name: self.load(name))

    def load(self, name: str) -> None:
        """The layer's FP32 weight in place, the layer loaded before dropped."""
        if self.loaded == name:
            return
        self.release()
        weight = read_tensor(self.files, f"{name}.weight")
        self.streamed[name].weight = torch.nn.Parameter(weight, requires_grad=False)
        self.loaded = name

    def release(self) -> None:
        if self.loaded is not None:
            module = self.streamed[self.loaded]
            module.weight = torch.nn.Parameter(module.weight.to("meta"), requires_grad=False)
            self.loaded = None

    def weights(self) -> Mapping[str, torch.Tensor]:
        """Every linear layer's float32 [out, in] weight as the FP32 reference reads it
        (analysis.dequantized_linear_weights with REFERENCE), each read when asked for."""
        return LayerWeights(self)


class LayerWeights(Mapping):
    """layer name: its FP32 weight, read from the checkpoint at each lookup and held by no one
    but the caller: iterating over all of them holds one at a time."""

    def __init__(self, streamed: StreamedFp32):
        self.streamed = streamed
        self.modules = {
            name: module
            for name, module in streamed.model.named_modules()
            if isinstance(module, REFERENCE.linear_classes() + (Conv1D,))
        }

    def __getitem__(self, name: str) -> torch.Tensor:
        module = self.modules[name]
        if name in self.streamed.streamed:
            self.streamed.load(name)
        weight = REFERENCE.layer_weight(name, module)
        self.streamed.release()
        return weight

    def __iter__(self) -> Iterator[str]:
        return iter(self.modules)

    def __len__(self) -> int:
        return len(self.modules)


def streamed_fp32(model_class, model_dir, variant=None) -> StreamedFp32 | None:
    """The FP32 model of model_dir with its linear layers read as they are needed; None where the
    checkpoint is no safetensors file or names a tensor otherwise than the model does (the caller
    loads the whole model instead). variant: the quantized model beside it, whose tensors that are
    still the checkpoint's FP32 values (an embedding no precision quantizes) the FP32 model shares
    instead of reading a copy (Gemma-3-270M's embedding: 640 MiB)."""
    files = tensor_files(model_dir)
    if files is None:
        return None
    config = transformers.AutoConfig.from_pretrained(model_dir)
    # Parameters on the meta device, buffers (rotary frequencies, masks) computed as usual.
    with accelerate.init_empty_weights(include_buffers=False):
        model = model_class.from_config(config, dtype=torch.float32)
    model.tie_weights()  # as from_pretrained does: a tied output layer shares the embedding
    streamed = _streamed_layers(model)
    holders = _parameter_holders(model)
    held = dict(variant.named_parameters(remove_duplicate=False)) if variant is not None else {}
    for names_and_holders in holders.values():
        names = [name for name, _, _ in names_and_holders]
        found = [name for name in names if name in files]
        if not found:
            return None  # a tensor the file names differently: from_pretrained knows its rules
        if any(name.removesuffix(".weight") in streamed for name in names):
            continue
        if held_unchanged(files, found[0], held.get(found[0])):
            parameter = held[found[0]]
        else:
            parameter = torch.nn.Parameter(read_tensor(files, found[0]), requires_grad=False)
        for _, module, attribute in names_and_holders:
            setattr(module, attribute, parameter)
    _load_stored_buffers(model, files)
    return StreamedFp32(model.eval(), files, streamed)


# How much of a stored tensor held_unchanged reads at a time.
COMPARED_BYTES = 32 * 2**20


def held_unchanged(files: dict[str, Path], name: str, held: torch.Tensor | None) -> bool:
    """Whether held (the variant's tensor of that name) is a plain FP32 CPU tensor equal, value for
    value, to the checkpoint's: compared a slice of rows at a time, read with pread, so the stored
    tensor is never whole beside it (a mapped file keeps every page it read resident)."""
    if held is None or held.dtype != torch.float32 or held.device.type != "cpu" or held.dim() == 0:
        return False
    if type(held) not in (torch.Tensor, torch.nn.Parameter):
        return False  # a tensor subclass: a quantized weight, whatever its dtype says
    with safe_open(files[name], framework="pt", backend="pread") as opened:
        stored = opened.get_slice(name)
        if list(stored.get_shape()) != list(held.shape):
            return False
        rows = max(1, COMPARED_BYTES // max(1, held[0].numel() * 4))
        for start in range(0, held.shape[0], rows):
            end = min(start + rows, held.shape[0])  # pread's slices stop at the last row
            if not torch.equal(stored[start:end].to(torch.float32), held[start:end]):
                return False
    return True


def _streamed_layers(model) -> dict[str, torch.nn.Module]:
    """The linear layers whose weight no other module shares: those read one at a time."""
    uses: dict[int, int] = {}
    for module in model.modules():
        for parameter in module._parameters.values():
            if parameter is not None:
                uses[id(parameter)] = uses.get(id(parameter), 0) + 1
    linear = REFERENCE.linear_classes() + (Conv1D,)
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, linear) and uses[id(module.weight)] == 1
    }


def _parameter_holders(model) -> dict[int, list[tuple[str, torch.nn.Module, str]]]:
    """Each parameter (by identity) and every (full name, module, attribute) that holds it: a
    tied weight has two."""
    holders: dict[int, list] = {}
    for module_name, module in model.named_modules():
        for attribute, parameter in module._parameters.items():
            if parameter is not None:
                name = f"{module_name}.{attribute}" if module_name else attribute
                holders.setdefault(id(parameter), []).append((name, module, attribute))
    return holders


def _load_stored_buffers(model, files: dict[str, Path]) -> None:
    """Buffers the checkpoint stores (persistent ones) take its values, as from_pretrained's do."""
    for module_name, module in model.named_modules():
        for attribute in list(module._buffers):
            name = f"{module_name}.{attribute}" if module_name else attribute
            if name in files and module._buffers[attribute] is not None:
                module._buffers[attribute] = read_tensor(files, name).to(
                    module._buffers[attribute].dtype
                )
