"""A variant's size is the published study's figure, the bytes of torch.save(state_dict), for every
CPU precision, tensor subclasses included (torchao's, bitsandbytes' Params4bit and Int8Params,
torch.ao's packed params); it is counted as torch writes it, never held in memory a second time."""

from __future__ import annotations

import hashlib
import io
import tracemalloc
import warnings

import pytest
import torch
from lm_models import build_tiny_llama
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from runner import machine, precisions
from runner.precisions.worker import quantized_model

CPU_PRECISIONS = [name for name, p in precisions.PRECISIONS.items() if "cpu" in p.devices]
SETTINGS = precisions.default_settings(torchao_int4_group_size=64)


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """The tiny Llama 256 wide (a few MiB: what pickling adds stays far below it), its output layer
    tied to its embedding as SmolLM2's is."""
    folder = build_tiny_llama(tmp_path_factory.mktemp("tied"), hidden=256, intermediate=512)
    config = LlamaConfig.from_pretrained(folder)
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def calibration_rows() -> list[dict]:
    generator = torch.Generator().manual_seed(3)
    rows = [torch.randint(0, 200, (1, length), generator=generator) for length in (5, 9, 16, 7)]
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids)} for ids in rows]


def quantized(folder, name: str):
    precision = precisions.PRECISIONS[name]
    if precision.family in ("bitsandbytes", "torchao"):
        pytest.importorskip(precision.family)
    config = precisions.config_for(precision, SETTINGS)
    family = precisions.worker_of(precision)
    calibration = calibration_rows() if precision.calibrated else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notice
        loaded = quantized_model(
            precision, config, family, AutoModelForCausalLM, folder, "cpu", calibration=calibration
        )
    return loaded.model


class HashingWriter(machine.ByteCounter):
    """ByteCounter that also hashes what it is given: the bytes themselves, not only their count."""

    def __init__(self):
        super().__init__()
        self.hash = hashlib.sha256()

    def write(self, data) -> int:
        self.hash.update(data)
        return super().write(data)


def in_memory(state: dict) -> bytes:
    """The file as the published study measured it: torch.save into a BytesIO."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def traced_peak(function) -> int:
    """The most Python-allocated memory held at once while function() ran, in bytes."""
    tracemalloc.start()
    try:
        function()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("name", CPU_PRECISIONS)
def test_the_size_is_the_saved_files_to_the_byte_without_holding_it(tied, name):
    model = quantized(tied, name)
    state = model.state_dict()
    saved = in_memory(state)
    assert machine.saved_bytes(state) == len(saved)
    assert machine.model_size_mib(model) == round(len(saved) / 2**20, 4)
    # What torch writes through the counter is the file itself, byte for byte.
    writer = HashingWriter()
    torch.save(state, writer)
    assert writer.hash.hexdigest() == hashlib.sha256(saved).hexdigest()
    # Counting holds a few pickled records at most; the in-memory file held the whole model.
    assert traced_peak(lambda: machine.saved_bytes(state)) < len(saved) / 10
    assert traced_peak(lambda: in_memory(state)) > len(saved)
