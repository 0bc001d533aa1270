"""What a variant holds after loading and quantizing: its own weights, never the checkpoint's pages.

A variant's peak memory must stay near the model's size (issue 35), so loading reads the
safetensors file instead of mapping it (a mapped file stays resident while any tensor views it),
and the families that convert each linear layer alone convert a part of the layers at a time,
handing back what each part freed. Neither may change a single weight or output.
"""

from __future__ import annotations

import gc
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from lm_models import build_tied_llama

from runner import precisions
from runner.precisions import worker as family_protocol
from runner.precisions.worker import quantized_model

SETTINGS = precisions.default_settings(torchao_int4_group_size=32)
LAYERS_ALONE = [
    "int8-dynamic",
    "torchao-int8-dynamic",
    "torchao-int8-weight",
    "torchao-int4-weight",
]


@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory) -> Path:
    return build_tied_llama(tmp_path_factory.mktemp("tied-llama"))


def _quantized(precision: str, folder: Path, keep=frozenset()):
    spec = precisions.PRECISIONS[precision]
    if spec.family == "torchao":
        pytest.importorskip("torchao")
    config = precisions.config_for(spec, SETTINGS)
    family = precisions.worker_of(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notice
        return quantized_model(
            spec, config, family, transformers.AutoModelForCausalLM, str(folder), "cpu", keep
        ).model


def _quantized_at_once(precision: str, folder: Path, keep=frozenset()):
    """The family's quantize over the whole loaded model in one call, as quantbench did before."""
    spec = precisions.PRECISIONS[precision]
    config = precisions.config_for(spec, SETTINGS)
    family = precisions.worker_of(spec)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return family.quantize(model, spec, config, keep)[0]


def _logits(model) -> torch.Tensor:
    ids = torch.arange(3, 40).reshape(1, -1)
    with torch.inference_mode():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("precision", LAYERS_ALONE)
def test_quantizing_a_layer_at_a_time_changes_no_output(tied_llama, precision, monkeypatch):
    monkeypatch.setattr(family_protocol, "PART_BYTES", 1)  # every layer a part of its own
    keep = frozenset({"model.layers.1.mlp.down_proj"})
    in_parts = _quantized(precision, tied_llama, keep)
    at_once = _quantized_at_once(precision, tied_llama, keep)
    assert torch.equal(_logits(in_parts), _logits(at_once))
    kept = dict(in_parts.named_modules())["model.layers.1.mlp.down_proj"]
    assert type(kept) is torch.nn.Linear and type(kept.weight) is torch.nn.Parameter
    family = precisions.worker_of(precisions.PRECISIONS[precision])
    config = precisions.config_for(precisions.PRECISIONS[precision], SETTINGS)
    quantized = [m for m in in_parts.modules() if family.is_quantized(config, m)]
    assert len(quantized) == 2 * 7 + 1 - 1  # 2 blocks of 7 layers and the output layer, less one


def test_parts_cut_the_layers_in_order_by_their_weights_bytes(tied_llama, monkeypatch):
    model = transformers.AutoModelForCausalLM.from_pretrained(tied_llama).eval()
    names = family_protocol.linear_names(model)
    monkeypatch.setattr(family_protocol, "PART_BYTES", 3 * 32 * 32 * 4)  # three 32x32 FP32 weights
    parts = family_protocol._parts(model, names)
    assert [name for part in parts for name in part] == names
    assert parts[0] == names[:3]  # q, k, v; o would make four
    # A layer larger than a part (the output layer: vocabulary x 32) is a part of its own.
    assert ["lm_head"] in parts


def _mapped_files() -> str:
    gc.collect()  # earlier tests' models, mapped as from_pretrained maps by default
    return Path("/proc/self/maps").read_text()


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8-dynamic", "bnb-int8"])
def test_a_loaded_variant_keeps_no_mapping_of_its_checkpoint(tied_llama, precision):
    if precision.startswith("bnb"):
        pytest.importorskip("bitsandbytes")
    checkpoint = str(tied_llama / "model.safetensors")
    model = _quantized(precision, tied_llama)
    assert checkpoint not in _mapped_files()
    if precision in ("fp32", "int8-dynamic"):  # the weights are the file's all the same
        assert torch.equal(_logits(model), _logits(_quantized_at_once(precision, tied_llama)))
