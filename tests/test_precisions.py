"""Every registered precision on the CPU: it loads a tiny saved BERT, runs it, quantizes what its
family says it does, and reads back the weights its layers really compute with."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers

from runner import analysis, precisions
from runner.precisions.worker import REFERENCE, quantized_model

torch.set_num_threads(1)

# CUDA-only precisions (torchao-float8-dynamic) are left out: these tests run on the CPU.
CPU_PRECISIONS = [name for name, p in precisions.PRECISIONS.items() if "cpu" in p.devices]
# How far layer(x) may be from F.linear(x, read-back weight, bias), relative to its norm: the
# dynamic int8 kinds also quantize the activations; bnb 4-bit multiplies in bf16 on CPUs with
# AVX512-BF16 (and exactly elsewhere); torchao's weight-only kinds multiply the weights they
# dequantize, in float32.
RELATIVE_TOLERANCE = {
    "int8-dynamic": 0.03,
    "torchao-int8-dynamic": 0.03,
    "torchao-int8-weight": 1e-4,
    "torchao-int4-weight": 1e-4,
    # Static INT8 rounds the activations at a scale fixed from the calibration rows, and clamps
    # what lies beyond their range; the int4 methods multiply the weights they read back (AWQ's
    # input pre-scale included).
    "int8-static": 0.05,
    "smoothquant-int8": 0.05,
    "awq-int4": 1e-4,
    "gptq-int4": 1e-4,
    "bnb-int8": 0.03,
    "bnb-nf4": 0.01,
    "bnb-fp4": 0.01,
}
# The model's layers take 64 or 128 inputs: torchao's default int4 group (128) does not fit all.
SETTINGS = precisions.default_settings(torchao_int4_group_size=64)


def _save_tiny_bert(folder, hidden: int):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
        num_labels=3,
    )
    BertForSequenceClassification(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_bert_64(tmp_path_factory):
    # in_features a multiple of bnb's 4-bit block (64): bnb's own CPU kernels read it right on any
    # CPU, so the layer's output can be checked against the weights read back.
    return _save_tiny_bert(tmp_path_factory.mktemp("tiny-bert-64"), 64)


def _load(precision: str, folder):
    spec = precisions.PRECISIONS[precision]
    if spec.family in ("bitsandbytes", "torchao"):
        pytest.importorskip(spec.family)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao deprecation notice
        model_class = transformers.AutoModelForSequenceClassification
        config = precisions.config_for(spec, SETTINGS)
        family = precisions.worker_of(spec)
        calibration = _calibration_rows() if spec.calibrated else None
        model = quantized_model(
            spec, config, family, model_class, str(folder), "cpu", calibration=calibration
        ).model
    return model


def spec_of(precision: str):
    return precisions.PRECISIONS[precision]


def _layer_inputs(model, batch: dict) -> dict:
    """Each linear layer's input on one forward of the batch."""
    seen, handles = {}, []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            hook = lambda m, args, name=name: seen.setdefault(name, args[0].detach().clone())  # noqa: E731
            handles.append(module.register_forward_pre_hook(hook))
    with torch.inference_mode():
        model(**batch)
    for handle in handles:
        handle.remove()
    return seen


def _calibration_rows() -> list[dict]:
    """Rows of the tiny BERT's vocabulary, of several lengths, one per batch: what a calibrated
    precision observes."""
    generator = torch.Generator().manual_seed(3)
    rows = [torch.randint(0, 100, (1, length), generator=generator) for length in (5, 9, 16, 7)]
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids)} for ids in rows]


def _config(precision: str):
    return precisions.config_for(precisions.PRECISIONS[precision], SETTINGS)


def _batch():
    generator = torch.Generator().manual_seed(1)
    return {
        "input_ids": torch.randint(0, 100, (2, 8), generator=generator),
        "attention_mask": torch.ones(2, 8, dtype=torch.long),
    }


def _input_dtype(layer) -> torch.dtype:
    weight = getattr(layer, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dtype in (torch.float16, torch.bfloat16):
        return weight.dtype
    return torch.float32


@pytest.mark.parametrize("precision", CPU_PRECISIONS)
def test_precision_runs_quantizes_and_reads_back(tiny_bert_64, precision):
    model = _load(precision, tiny_bert_64)
    with torch.inference_mode():
        logits = model(**_batch()).logits
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()

    # Read after a forward, as the worker does: bnb may have repacked its layers by now.
    family = precisions.worker_of(precision)
    weights = analysis.dequantized_linear_weights(model, family)
    assert len(weights) == 14  # 6 per encoder layer, pooler, classifier
    assert sum(family.linear_layer_kinds(model).values()) == 14
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(2))
    # A static activation scale clamps what lies beyond the calibration rows' range: a calibrated
    # layer is checked on what it meets on such a row.
    seen = _layer_inputs(model, _calibration_rows()[1]) if spec_of(precision).calibrated else {}
    for name, weight in weights.items():
        layer = model.get_submodule(name)
        if family.leaves_unquantized(model, name):
            continue
        assert family.is_quantized(_config(precision), layer), (precision, name, type(layer))
        inputs = seen.get(name, x[:, : weight.shape[1]]).to(_input_dtype(layer))
        with torch.inference_mode():
            out = layer(inputs).float()
        bias = layer.bias() if callable(getattr(layer, "bias", None)) else layer.bias
        bias = None if bias is None else bias.float()
        expected = torch.nn.functional.linear(inputs.float(), weight, bias)
        if precision in RELATIVE_TOLERANCE:
            error = (out - expected).norm() / expected.norm()
            assert error < RELATIVE_TOLERANCE[precision], (precision, name, float(error))
        else:
            # A cast computes in its own dtype: the same product, rounded as the layer rounds it.
            dtype = _input_dtype(layer)
            assert torch.allclose(out, expected.to(dtype).float(), rtol=1e-2, atol=1e-3), name


@pytest.mark.parametrize("precision", CPU_PRECISIONS)
def test_grid_of_every_precision(tiny_bert_64, precision):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_64)
    weight = analysis.dequantized_linear_weights(model, REFERENCE)[
        "bert.encoder.layer.0.output.dense"
    ]
    grid = analysis.quantization_grid(precision, weight, SETTINGS)
    if precisions.PRECISIONS[precision].family == "casts":
        assert grid is None
    else:
        assert grid["precision"] == precision and grid["values"]
        # The group holding the largest |w| reaches it (int8's codes end at 127 / 127.5); symmetric
        # int4's codes -8..7 times max|w| / 7.5 reach 7 / 7.5 of it one way and 8 / 7.5 the other.
        int4 = ("torchao-int4-weight", "awq-int4", "gptq-int4")
        reach = 8 / 7.5 if precision in int4 else 1.0
        extent = max(abs(v) for v in grid["values"])
        assert extent == pytest.approx(reach * weight.abs().max().item(), rel=1e-2)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_bnb_4bit_reads_like_its_portable_kernel_on_a_32_wide_model(tmp_path, quant_type):
    """in_features 32: no 4-bit tile or block fills a row. On CPUs with AVX512-BF16 bnb would
    crash repacking these layers and its CPU kernel would misread them; the family loads them
    unpacked and reads them as bnb's portable kernel computes."""
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    model = _load(f"bnb-{quant_type}", _save_tiny_bert(tmp_path, 32))
    family = precisions.worker_of(f"bnb-{quant_type}")
    for name, weight in analysis.dequantized_linear_weights(model, family).items():
        state = model.get_submodule(name).weight.quant_state
        data = model.get_submodule(name).weight.data.view(torch.uint8).reshape(-1)
        by_bnb = _dequantize_4bit_compute(
            data, state.absmax.float(), state.code, state.blocksize, state.shape, state.dtype
        )
        assert torch.equal(weight, by_bnb.float()), name
    with torch.inference_mode():  # the layers bnb cannot repack run unpacked
        assert torch.isfinite(model(**_batch()).logits).all()


def test_settings_are_every_familys_side_by_side():
    names = list(precisions.default_settings())
    assert names == [
        "llm_int8_threshold",
        "bnb_4bit_compute_dtype",
        "bnb_4bit_use_double_quant",
        "dynamic_modules",
        "quantized_engine",
        "torchao_int4_group_size",
        "smoothquant_alpha",
    ]
    # A shared setting (the int4 methods' group size) is listed once, where its family declares it.
    declared = [key for family in precisions.FAMILIES.values() for key in family.defaults()]
    assert names == list(dict.fromkeys(declared))
    assert list(precisions.PRECISIONS) == [
        "fp32", "fp16", "bf16", "int8-dynamic", "torchao-int8-dynamic", "torchao-int8-weight",
        "torchao-int4-weight", "torchao-float8-dynamic", "int8-static", "smoothquant-int8",
        "awq-int4", "gptq-int4", "bnb-int8", "bnb-nf4", "bnb-fp4",
    ]  # fmt: skip
