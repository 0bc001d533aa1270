"""runner.analysis against hand computations and against what the quantized layers really
compute."""

import copy
import json
import math
import warnings

import numpy as np
import pytest
import torch

from runner import analysis as A
from runner.layers import classify_layer
from runner.precisions import PRECISIONS, worker_of
from runner.precisions.bitsandbytes import FP4_CODE, NF4_CODE
from runner.precisions.worker import REFERENCE
from runner.tasks import statistics as E
from runner.tasks.classification import effects

torch.set_num_threads(1)


def _linear(weight, bias=None):
    weight = torch.as_tensor(weight, dtype=torch.float32)
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(torch.as_tensor(bias))
    return layer


def _json_ok(obj):
    # allow_nan=False rejects inf/nan; the default encoder rejects numpy scalars and tensors.
    json.dumps(obj, allow_nan=False)


# ------------------------------------------------------------------------------------------------
# Weight error metrics
# ------------------------------------------------------------------------------------------------


def test_layer_errors_match_hand_computation():
    w = [(k - 7.5) / 10 for k in range(16)]  # -0.75 .. 0.75
    wq = list(w)
    wq[0] += 0.2  # moves ~34 bins of the 256-bin histogram
    wq[5] -= 0.001  # stays inside its bin (width 1.5 / 256 = 0.00586)
    wq[15] += 0.1  # beyond the FP32 max: stays in the edge bin
    ref = torch.nn.Sequential(_linear(torch.tensor(w).reshape(4, 4)))
    var = torch.nn.Sequential(_linear(torch.tensor(wq).reshape(4, 4)))
    rows = A.layer_weight_errors(
        A.dequantized_linear_weights(ref, REFERENCE), A.dequantized_linear_weights(var, REFERENCE)
    )
    assert len(rows) == 1
    row = rows[0]

    # Independent computation in plain Python from the float32 values the layers hold.
    w32 = [float(np.float32(x)) for x in w]
    q32 = [float(np.float32(x)) for x in wq]
    signal = sum(x * x for x in w32)
    noise = sum((a - b) ** 2 for a, b in zip(w32, q32))
    assert signal == pytest.approx(3.4, rel=1e-6)
    assert noise == pytest.approx(0.04 + 0.01 + 1e-6, rel=1e-4)
    assert row["sqnr_db"] == pytest.approx(10 * math.log10(signal / noise), rel=1e-9)
    assert row["sqnr_db"] == pytest.approx(18.325, abs=1e-3)  # 10 log10(3.4 / 0.050001)
    assert row["rel_l2"] == pytest.approx(math.sqrt(noise / signal), rel=1e-9)
    dot = sum(a * b for a, b in zip(w32, q32))
    assert row["cosine"] == pytest.approx(
        dot / math.sqrt(signal * sum(b * b for b in q32)), rel=1e-12
    )
    assert row["max_abs_error"] == pytest.approx(0.2, rel=1e-6)
    assert row["changed_bucket_share"] == pytest.approx(1 / 16)
    assert row["n_weights"] == 16 and row["identical"] is False
    assert (row["layer"], row["layer_type"], row["depth"]) == ("0", "other", None)
    _json_ok(rows)


def test_identical_layer_has_null_sqnr_and_flag():
    layer = _linear(torch.randn(3, 5))
    weights = A.dequantized_linear_weights(torch.nn.ModuleDict({"classifier": layer}), REFERENCE)
    (row,) = A.layer_weight_errors(weights, {k: v.clone() for k, v in weights.items()})
    assert row["identical"] is True and row["sqnr_db"] is None
    assert (
        row["rel_l2"] == 0.0 and row["max_abs_error"] == 0.0 and row["changed_bucket_share"] == 0.0
    )
    assert row["cosine"] == pytest.approx(1.0)
    _json_ok(row)


def test_layer_errors_reject_mismatched_layers():
    a = {"x": torch.zeros(2, 2), "y": torch.zeros(2, 2)}
    with pytest.raises(ValueError, match="'y'"):
        A.layer_weight_errors(a, {"x": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="shape"):
        A.layer_weight_errors({"x": torch.zeros(2, 2)}, {"x": torch.zeros(2, 3)})


@pytest.mark.parametrize(
    "name, layer_type, depth",
    [
        ("bert.encoder.layer.3.attention.self.query", "query", 3),
        ("bert.encoder.layer.3.attention.self.key", "key", 3),
        ("bert.encoder.layer.11.attention.self.value", "value", 11),
        ("bert.encoder.layer.0.attention.output.dense", "attention_output", 0),
        ("bert.encoder.layer.0.intermediate.dense", "intermediate", 0),
        ("bert.encoder.layer.7.output.dense", "output", 7),
        ("bert.pooler.dense", "pooler", None),
        ("classifier", "classifier", None),
        ("classifier.out_proj", "classifier", None),
        ("cls.predictions.transform.dense", "other", None),
    ],
)
def test_classify_layer(name, layer_type, depth):
    assert classify_layer(name) == (layer_type, depth)


def test_summary_groups_and_weights():
    def row(layer_type, depth, n, sqnr, rel, cos, mx, share):
        return {
            "layer": "x",
            "layer_type": layer_type,
            "depth": depth,
            "n_weights": n,
            "identical": sqnr is None,
            "sqnr_db": sqnr,
            "rel_l2": rel,
            "cosine": cos,
            "max_abs_error": mx,
            "changed_bucket_share": share,
        }

    rows = [
        row("query", 0, 100, 40.0, 0.01, 0.99, 0.1, 0.5),
        row("query", 1, 300, 30.0, 0.03, 0.97, 0.3, 0.1),
        row("classifier", None, 10, None, 0.0, 1.0, 0.0, 0.0),
    ]
    summary = A.summarise_layer_errors(rows)
    _json_ok(summary)
    query = summary["by_layer_type"][0]
    assert query["layer_type"] == "query" and query["n_layers"] == 2 and query["n_weights"] == 400
    assert query["mean_sqnr_db"] == pytest.approx(35.0) and query["min_sqnr_db"] == 30.0
    assert query["mean_rel_l2"] == pytest.approx(0.02) and query["mean_cosine"] == pytest.approx(
        0.98
    )
    assert query["max_abs_error"] == 0.3
    assert query["changed_bucket_share"] == pytest.approx((0.5 * 100 + 0.1 * 300) / 400)
    classifier = summary["by_layer_type"][1]
    assert (
        classifier["n_identical"] == 1
        and classifier["mean_sqnr_db"] is None
        and classifier["min_sqnr_db"] is None
    )
    assert [d["depth"] for d in summary["by_depth"]] == [0, 1, None]
    assert summary["overall"]["min_sqnr_db"] == 30.0 and summary["overall"]["n_weights"] == 410
    # Rows written before the inputs were described have no outlier ratio: the groups say None.
    assert summary["overall"]["max_input_outlier_ratio"] is None
    assert summary["overall"]["mean_input_rounding_sqnr_db"] is None
    rows[0]["input_outlier_ratio"], rows[1]["input_outlier_ratio"] = 3.0, 250.0
    rows[0]["input_rounding_sqnr_db"], rows[1]["input_rounding_sqnr_db"] = 40.0, 10.0
    by_type = A.summarise_layer_errors(rows)["by_layer_type"]
    assert [g["max_input_outlier_ratio"] for g in by_type] == [250.0, None]
    assert [g["mean_input_rounding_sqnr_db"] for g in by_type] == [25.0, None]


# ------------------------------------------------------------------------------------------------
# Dequantization: torch float casts and dynamic quantization
# ------------------------------------------------------------------------------------------------


def _quantize_dynamic(model, spec, dtype):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao deprecation notice
        return torch.ao.quantization.quantize_dynamic(model, spec, dtype)


def test_float_cast_weights():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    ref = A.dequantized_linear_weights(model, REFERENCE)
    assert list(ref) == ["0", "2"]
    for dtype in (torch.float16, torch.bfloat16):
        cast = worker_of({torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype])
        got = A.dequantized_linear_weights(copy.deepcopy(model).to(dtype), cast)
        for name in ref:
            assert got[name].dtype == torch.float32
            assert torch.equal(got[name], ref[name].to(dtype).float())


def test_gpt2_conv1d_is_linear_like():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(4)
    model = torch.nn.ModuleDict({"c_fc": Conv1D(6, 4)})  # 4 inputs, 6 outputs, weight stored [4, 6]
    w = A.dequantized_linear_weights(model, REFERENCE)["c_fc"]
    x = torch.randn(3, 4)
    assert w.shape == (6, 4) and torch.allclose(
        model["c_fc"](x), torch.nn.functional.linear(x, w, model["c_fc"].bias)
    )

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c_fc = model["c_fc"]

        def forward(self, x):
            return self.c_fc(x)

    x[1, 2] = 7.0
    assert A.activation_outlier_columns(Wrap(), [{"x": x}]) == {"c_fc": [2]}


def test_int8_dynamic_per_tensor_matches_hand_quantization():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    ref = A.dequantized_linear_weights(model, REFERENCE)
    got = A.dequantized_linear_weights(
        _quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, torch.qint8),
        worker_of("int8-dynamic"),
    )
    assert list(got) == ["0", "2"]
    for name, w in ref.items():
        # Default dynamic qconfig: symmetric per-tensor qint8, scale = max|w| / 127.5.
        scale = w.abs().max().item() / 127.5
        by_round = torch.clamp(torch.round(w / scale), -128, 127) * scale
        assert torch.allclose(got[name], by_round, rtol=0, atol=1e-7)
        by_torch = torch.quantize_per_tensor(w, scale, 0, torch.qint8).dequantize()
        assert torch.allclose(got[name], by_torch, rtol=0, atol=1e-7)
        assert (got[name] - w).abs().max() <= scale / 2 + 1e-7
        # And it lies on the grid quantization_grid promises.
        grid = torch.tensor(A.quantization_grid("int8-dynamic", w)["values"])
        assert (got[name].reshape(-1, 1) - grid).abs().min(dim=1).values.max() < 1e-7


class _TwoLayers(torch.nn.Module):
    """Two linear layers called as model(**batch), as transformers models are."""

    def __init__(self):
        super().__init__()
        self.first, self.second = torch.nn.Linear(16, 8), torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.second(torch.relu(self.first(x)))


def _energies(pairs) -> tuple[float, float]:
    """(sum y^2, sum (y - y_q)^2) over (y, y_q) pairs, in float64."""
    signal = sum(float((y.double() ** 2).sum()) for y, _ in pairs)
    noise = sum(float(((y.double() - y_q.double()) ** 2).sum()) for y, y_q in pairs)
    return signal, noise


def _sqnr_db(pairs):
    signal, noise = _energies(pairs)
    return 10 * math.log10(signal / noise)


def test_output_errors_give_each_layer_the_fp32_layers_input():
    torch.manual_seed(3)
    model = _TwoLayers().eval()
    quantized = _quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, torch.qint8)
    batches = [{"x": torch.randn(5, 16)}, {"x": torch.randn(4, 16)}]
    got = A.layer_output_errors(model, quantized, batches, max_samples=7)
    # Only the first 7 samples count, batch by batch: int8-dynamic scales each batch's input.
    inputs = [batches[0]["x"], batches[1]["x"][:2]]
    with torch.no_grad():
        first = [(model.first(x), quantized.first(x)) for x in inputs]
        hidden = [torch.relu(model.first(x)) for x in inputs]  # the second layer's FP32 input
        second = [(model.second(h), quantized.second(h)) for h in hidden]
        # What the quantized model passes on instead: not the layer's own error.
        passed_on = [(model(x), quantized(x)) for x in inputs]
    assert got["first"]["output_sqnr_db"] == pytest.approx(_sqnr_db(first), abs=1e-6)
    assert got["second"]["output_sqnr_db"] == pytest.approx(_sqnr_db(second), abs=1e-6)
    assert abs(_sqnr_db(second) - _sqnr_db(passed_on)) > 0.1
    signal, noise = _energies(first)
    assert got["first"]["output_rel_l2"] == pytest.approx(math.sqrt(noise / signal), rel=1e-6)
    _json_ok(got)


def test_output_errors_of_an_unchanged_model_are_none():
    model = _TwoLayers().eval()
    got = A.layer_output_errors(model, copy.deepcopy(model), [{"x": torch.randn(3, 16)}])
    errors = {
        name: {k: row[k] for k in ("output_sqnr_db", "output_rel_l2")} for name, row in got.items()
    }
    assert errors == {name: {"output_sqnr_db": None, "output_rel_l2": 0.0} for name in got}
    assert set(got) == {"first", "second"}


def test_output_errors_describe_each_layers_fp32_input_columns():
    torch.manual_seed(5)
    model = _TwoLayers().eval()
    quantized = _quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, torch.qint8)
    x1, x2 = torch.randn(4, 16), torch.randn(3, 16)
    x1[2, 9], x2[0, 4] = 8.0, -7.0  # two columns at or above LLM.int8()'s threshold, 6
    got = A.layer_output_errors(model, quantized, [{"x": x1}, {"x": x2}])["first"]
    columns = torch.cat([x1, x2]).abs().amax(dim=0)  # each column's max |x| over every sample
    assert got["input_absmax"] == pytest.approx(8.0)
    assert got["input_outlier_ratio"] == pytest.approx(8.0 / float(columns.median()))
    assert got["input_outlier_columns"] == 2
    assert got["input_top_columns"] == [9, 4, int(torch.argsort(columns)[-3])]
    # The FP32 layer given its input rounded to int8 with one scale per call, max|x| / 127.
    pairs = []
    with torch.no_grad():
        for x in (x1, x2):
            scale = x.abs().max() / 127
            pairs.append((model.first(x), model.first(torch.round(x / scale) * scale)))
    assert got["input_rounding_sqnr_db"] == pytest.approx(_sqnr_db(pairs), abs=1e-6)
    _json_ok(got)


def test_int8_dynamic_per_channel_and_float16():
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(16, 6))
    w = A.dequantized_linear_weights(model, REFERENCE)["0"]
    spec = {torch.nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig}
    dynamic = worker_of("int8-dynamic")
    got = A.dequantized_linear_weights(
        _quantize_dynamic(copy.deepcopy(model), spec, torch.qint8), dynamic
    )["0"]
    scales = w.abs().amax(dim=1).double() / 127.5
    by_torch = torch.quantize_per_channel(
        w, scales, torch.zeros(6, dtype=torch.long), 0, torch.qint8
    ).dequantize()
    assert torch.allclose(got, by_torch, rtol=0, atol=1e-7)
    ratio = w.double() / scales[:, None]
    by_round = torch.clamp(torch.round(ratio), -128, 127) * scales[:, None]
    step = (got.double() - by_round).abs() / scales[:, None]
    # Only the largest |w| of a row sits on a tie (+-127.5), which torch's kernel may round either
    # way.
    tie = (ratio.abs() - 127.5).abs() < 1e-4
    assert step[~tie].max() < 1e-4 and step[tie].max() < 1 + 1e-4
    # Per-channel must beat per-tensor here, or the scales were not per row.
    per_tensor_model = _quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, torch.qint8)
    per_tensor = A.dequantized_linear_weights(per_tensor_model, dynamic)["0"]
    assert (got - w).pow(2).sum() < (per_tensor - w).pow(2).sum()

    fp16 = A.dequantized_linear_weights(
        _quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, torch.float16), dynamic
    )["0"]
    assert torch.equal(fp16, w.half().float())


# ------------------------------------------------------------------------------------------------
# bitsandbytes on CPU, on a tiny BERT saved and reloaded the way the worker does it
# ------------------------------------------------------------------------------------------------

LINEAR_NAMES = [
    f"bert.encoder.layer.{i}.{part}"
    for i in range(2)
    for part in (
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
    )
] + ["bert.pooler.dense", "classifier"]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=3,
    )
    path = tmp_path_factory.mktemp("tiny_bert")
    transformers.BertForSequenceClassification(config).save_pretrained(path)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path).eval()
    return path, model, A.dequantized_linear_weights(model, REFERENCE)


def _load_bnb(path, **kwargs):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb
    import transformers

    config = transformers.BitsAndBytesConfig(**kwargs)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        path, quantization_config=config, device_map="cpu"
    ).eval()
    # The portable 4-bit path (dequantize, then multiply in float32) on every CPU: on one with
    # AVX512-BF16 bnb would repack at the first forward and multiply in bf16, which
    # test_bnb_4bit_cpu_packed_layout checks on its own.
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def test_fp32_reference_names(tiny_bert):
    _, _, ref = tiny_bert
    assert list(ref) == LINEAR_NAMES


def test_bnb_int8_on_cpu(tiny_bert):
    path, fp32, ref = tiny_bert
    model = _load_bnb(path, load_in_8bit=True)
    import bitsandbytes as bnb

    got = A.dequantized_linear_weights(model, worker_of("bnb-int8"))
    assert list(got) == LINEAR_NAMES
    for name, w in got.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, bnb.nn.Linear8bitLt) and layer.weight.dtype == torch.int8
        # LLM.int8() by hand: row-wise absmax of the fp16-cast weight, codes round(w * (127 /
        # absmax))
        # (in that order: w * 127 / absmax rounds a rare tie the other way).
        w16 = ref[name].half().float()
        absmax = w16.abs().amax(dim=1, keepdim=True)
        assert torch.equal(layer.weight.SCB, absmax.squeeze(1))
        assert torch.allclose(
            w, torch.round(w16 * (127 / absmax)) * absmax / 127, rtol=0, atol=1e-7
        )

    rows = A.layer_weight_errors(ref, got)
    sqnr = [r["sqnr_db"] for r in rows]
    # Measured 44.4-46.0 dB; 8-bit rows of ~Gaussian weights should sit near 45 dB.
    assert all(40.0 < s < 50.0 for s in sqnr), sqnr
    assert all(r["cosine"] > 0.9999 for r in rows)

    # It is the weight the layer computes with: bnb's dequantizing CPU path (train mode) reproduces
    # F.linear.
    layer = model.get_submodule("bert.encoder.layer.0.intermediate.dense")
    x = torch.randn(4, 32)
    layer.train()
    with torch.no_grad():
        out = layer(x)
    layer.eval()
    expected = torch.nn.functional.linear(
        x, got["bert.encoder.layer.0.intermediate.dense"], layer.bias
    )
    assert torch.allclose(out.float(), expected, atol=1e-5)

    # The first forward moves codes and scales from the weight into layer.state; reading must not
    # change.
    batch = {
        "input_ids": torch.randint(0, 100, (2, 8)),
        "attention_mask": torch.ones(2, 8, dtype=torch.long),
    }
    with torch.no_grad():
        logits = model(**batch).logits
        ref_logits = fp32(**batch).logits
    assert model.classifier.weight.SCB is None and model.classifier.state.SCB is not None
    after = A.dequantized_linear_weights(model, worker_of("bnb-int8"))
    assert all(torch.equal(after[k], got[k]) for k in got)
    assert torch.allclose(logits, ref_logits, atol=2e-3)

    # Each quantized row lies on the bnb-int8 grid of its own absmax; the grid's scale is the
    # largest one.
    w = ref["bert.encoder.layer.0.output.dense"]
    grid = A.quantization_grid("bnb-int8", w)
    assert grid["granularity"] == "row" and grid["n_groups"] == 32 and len(grid["codes"]) == 255
    assert grid["scale"] == pytest.approx(w.abs().max().item(), rel=1e-3)
    top = int(w.abs().amax(dim=1).argmax())
    row = got["bert.encoder.layer.0.output.dense"][top]
    assert (row.double().reshape(-1, 1) - torch.tensor(grid["values"])).abs().min(
        dim=1
    ).values.max() < 1e-6


def _check_on_4bit_grid(code, ref_w, got_w):
    # Blocks of 64 run over the flattened weight; zero padding fills the classifier's last, partial
    # block.
    pad = (-ref_w.numel()) % 64
    flat = torch.nn.functional.pad(ref_w.reshape(-1), (0, pad)).reshape(-1, 64)
    q = torch.nn.functional.pad(got_w.reshape(-1), (0, pad)).reshape(-1, 64)
    absmax = flat.abs().amax(dim=1, keepdim=True)
    levels = torch.tensor(code)[None, None, :] * absmax[:, :, None]  # [blocks, 1, 16]
    assert (q[:, :, None] - levels).abs().min(dim=2).values.max() < 1e-6


@pytest.mark.parametrize(
    "quant_type, low, high, code",
    [
        ("nf4", 18.0, 23.0, NF4_CODE),
        ("fp4", 15.5, 21.0, FP4_CODE),
    ],  # measured 20.3-21.1 and 17.8-18.5
)
def test_bnb_4bit_on_cpu(tiny_bert, quant_type, low, high, code):
    path, _, ref = tiny_bert
    model = _load_bnb(path, load_in_4bit=True, bnb_4bit_quant_type=quant_type)
    import bitsandbytes as bnb

    assert list(code) == bnb.functional.get_4bit_type(quant_type, device="cpu").tolist()
    got = A.dequantized_linear_weights(model, worker_of(f"bnb-{quant_type}"))
    assert list(got) == LINEAR_NAMES
    assert all(isinstance(model.get_submodule(n), bnb.nn.Linear4bit) for n in got)
    for name in got:
        assert got[name].shape == ref[name].shape
        _check_on_4bit_grid(code, ref[name], got[name])
    sqnr = [r["sqnr_db"] for r in A.layer_weight_errors(ref, got)]
    assert all(low < s < high for s in sqnr), sqnr

    # bnb's CPU 4-bit matmul dequantizes and multiplies: the layer output must match exactly.
    layer = model.get_submodule("bert.encoder.layer.1.output.dense")
    x = torch.randn(3, 64)
    with torch.no_grad():
        out = layer(x)
    expected = torch.nn.functional.linear(x, got["bert.encoder.layer.1.output.dense"], layer.bias)
    assert torch.allclose(out, expected, atol=1e-6)

    grid = A.quantization_grid(f"bnb-{quant_type}", ref["bert.encoder.layer.1.output.dense"])
    assert grid["granularity"] == "block" and grid["block_size"] == 64 and grid["n_groups"] == 32
    assert grid["values"][-1] == pytest.approx(
        ref["bert.encoder.layer.1.output.dense"].abs().max().item()
    )
    _json_ok(grid)


def test_bnb_4bit_cpu_packed_layout(tiny_bert):
    """bnb repacks 4-bit weights (bf16 absmax) on CPUs with AVX512-BF16 at the first forward; decode
    that too."""
    path, _, ref = tiny_bert
    model = _load_bnb(
        path, load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True
    )
    import bitsandbytes as bnb

    # [32, 64]: the packing needs N % 32 == 0 and K % 64 == 0
    name = "bert.encoder.layer.0.output.dense"
    layer = model.get_submodule(name)
    plain = A.dequantized_linear_weights(model, worker_of("bnb-nf4"))[name]
    state = layer.weight.quant_state
    absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset

    packed, packed_state = bnb.functional._convert_weight_packed_for_cpu(
        layer.weight.data.clone(), copy.deepcopy(state)
    )
    layer.weight.data, layer.weight.quant_state = packed, packed_state
    got = A.dequantized_linear_weights(model, worker_of("bnb-nf4"))[name]
    assert packed_state.packing_format_for_cpu  # reading did not undo the packing
    # Same codes, but each block scaled by its absmax rounded to bf16.
    ratio = (
        (absmax.to(torch.bfloat16).float() / absmax.float())
        .repeat_interleave(64)
        .reshape(plain.shape)
    )
    assert torch.allclose(got, plain * ratio, rtol=0, atol=1e-7)
    assert not torch.equal(got, plain)
    assert A.layer_weight_errors({name: ref[name]}, {name: got})[0]["sqnr_db"] > 18.0


# ------------------------------------------------------------------------------------------------
# Histograms, grids, activation outliers
# ------------------------------------------------------------------------------------------------


def test_weight_histograms(tiny_bert):
    _, _, ref = tiny_bert
    hist = A.weight_histograms(ref, bins=16)
    _json_ok(hist)
    by_type = hist["by_layer_type"]
    encoder = ["query", "key", "value", "attention_output", "intermediate", "output"]
    assert list(by_type) == encoder + ["classifier", "pooler"]  # in LAYER_TYPES order
    query = by_type["query"]
    assert query["n_layers"] == 2 and query["n_weights"] == 2 * 32 * 32 == sum(query["counts"])
    assert len(query["edges"]) == 17 and len(query["counts"]) == 16
    both = torch.cat(
        [ref[f"bert.encoder.layer.{i}.attention.self.query"].reshape(-1) for i in range(2)]
    )
    assert query["edges"][0] == both.min().item() and query["edges"][-1] == pytest.approx(
        both.max().item()
    )
    assert query["counts"] == np.histogram(both.double().numpy(), bins=16)[0].tolist()


def test_quantization_grid_choices():
    w = torch.tensor([[0.5, -1.0], [0.25, 0.125]])
    assert A.quantization_grid("fp16", w) is None
    grid = A.quantization_grid("int8-dynamic", w)
    assert len(grid["values"]) == 256 and grid["scale"] == pytest.approx(1.0 / 127.5)
    assert grid["values"][0] == pytest.approx(-128 / 127.5)
    with pytest.raises(ValueError, match="int8-dynamic"):
        A.quantization_grid("int3", w)


@pytest.mark.parametrize("precision", [p for p in PRECISIONS if p not in ("fp32", "fp16", "bf16")])
def test_a_grid_taken_a_block_at_a_time_is_the_whole_weights(precision, monkeypatch):
    # Grids read an output layer's scales a block of rows at a time, so Gemma's 640 MiB output
    # layer is never copied whole into float64. Blocks of 1000 weights cut this 320 x 128 weight
    # into 40 blocks of 7 rows, and bnb's 64-weight blocks across chunk ends.
    w = torch.randn(320, 128, generator=torch.Generator().manual_seed(0)) * 0.05
    w[17, 5] = 2.5  # one outlier decides its row's, group's and block's scale
    w[40:48] = 0.0  # all-zero rows take each method's own zero-scale rule
    whole = A.quantization_grid(precision, w)
    monkeypatch.setattr(A, "ERROR_CHUNK", 1000)
    assert A.quantization_grid(precision, w) == whole


def test_grid_scales_are_the_whole_weights_by_hand(monkeypatch):
    monkeypatch.setattr(A, "ERROR_CHUNK", 1000)
    w = torch.randn(300, 192, generator=torch.Generator().manual_seed(1))  # 57600 weights
    w64 = w.to(torch.float64)
    int8 = A.quantization_grid("int8-dynamic", w)
    assert int8["scale"] == float(w64.abs().max() / 127.5)
    nf4 = A.quantization_grid("bnb-nf4", w)
    blocks = w64.reshape(-1, 64).abs().amax(dim=1)  # 900 whole blocks of bnb's flat weight
    assert nf4["n_groups"] == 900 and nf4["scale_median"] == float(blocks.median())
    llm_int8 = A.quantization_grid("bnb-int8", w)
    rows = w.to(torch.float16).to(torch.float64).abs().amax(dim=1)
    assert llm_int8["n_groups"] == 300 and llm_int8["scale_min"] == float(rows.min())


class _TwoLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.first = _linear(torch.eye(4) * 0.5, bias=torch.zeros(4))
        self.second = _linear(torch.ones(2, 4), bias=torch.zeros(2))
        self.dropout = torch.nn.Dropout(0.5)

    def forward(self, x):
        return self.second(self.dropout(self.first(x)))


PLANTED = "bert.encoder.layer.1.output.dense"  # its input: the intermediate activations
PLANTED_COLUMN = 5
PLANTED_SCALE = 100.0


def _plant_input_outlier(model) -> None:
    """Scale one intermediate unit's pre-activation by 100 and the weight column that reads it
    by 1/100: FP32 computes nearly the same function, but PLANTED's input holds one column 100
    times larger than its neighbours, as real LLMs' MLP inputs do."""
    intermediate = model.get_submodule(PLANTED.replace("output", "intermediate"))
    with torch.no_grad():
        intermediate.weight[PLANTED_COLUMN] *= PLANTED_SCALE
        intermediate.bias[PLANTED_COLUMN] *= PLANTED_SCALE
        model.get_submodule(PLANTED).weight[:, PLANTED_COLUMN] /= PLANTED_SCALE


def _int8_dynamic_output_errors(model, batches) -> dict[str, dict]:
    quantized = _quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, torch.qint8)
    return A.layer_output_errors(model, quantized, batches)


def test_a_planted_input_outlier_column_shows_and_lowers_int8_dynamic_output_sqnr(tiny_bert):
    _, model, _ = tiny_bert
    torch.manual_seed(6)
    batches = [
        {"input_ids": torch.randint(0, 100, (4, 16)), "attention_mask": torch.ones(4, 16).long()}
    ]
    plain = _int8_dynamic_output_errors(model, batches)
    planted_model = copy.deepcopy(model)
    _plant_input_outlier(planted_model)
    planted = _int8_dynamic_output_errors(planted_model, batches)
    before, after = plain[PLANTED], planted[PLANTED]
    assert after["input_top_columns"][0] == PLANTED_COLUMN
    assert after["input_outlier_ratio"] > 30 * before["input_outlier_ratio"]
    assert after["input_absmax"] > 30 * before["input_absmax"]
    assert (before["input_outlier_columns"], after["input_outlier_columns"]) == (0, 1)
    # One step of the per-tensor activation grid now spans most of the other columns' range.
    assert after["output_sqnr_db"] < before["output_sqnr_db"] - 10
    # And the input's rounding alone, with FP32 weights, makes that error: the outlier is why.
    assert after["input_rounding_sqnr_db"] < before["input_rounding_sqnr_db"] - 10
    assert after["input_rounding_sqnr_db"] == pytest.approx(after["output_sqnr_db"], abs=3)
    # The layer that writes the planted unit is untouched on its input side.
    writer = PLANTED.replace("output", "intermediate")
    assert planted[writer]["input_outlier_ratio"] == pytest.approx(
        plain[writer]["input_outlier_ratio"]
    )
    _json_ok(planted)


def test_activation_outlier_columns():
    model = _TwoLinear().train()
    x1 = torch.zeros(2, 3, 4)
    x1[1, 2, 3] = -10.0  # outlier for `first`; halved to 5 for `second`
    x2 = torch.zeros(1, 3, 4)
    x2[0, 0, 1] = 6.0  # exactly the threshold: counts, as bnb's >= does
    x2[0, 1, 2] = 14.0  # 7 after `first`: an outlier in both
    cols = A.activation_outlier_columns(model, [{"x": x1}, {"x": x2}], threshold=6.0)
    assert cols == {"first": [1, 2, 3], "second": [2]}
    _json_ok(cols)
    assert model.training  # mode restored
    assert not model.first._forward_pre_hooks and not model.second._forward_pre_hooks


def test_activation_outliers_on_bert(tiny_bert):
    _, model, _ = tiny_bert
    batch = {
        "input_ids": torch.randint(0, 100, (2, 8)),
        "attention_mask": torch.ones(2, 8, dtype=torch.long),
    }
    low = A.activation_outlier_columns(model, [batch], threshold=0.0)
    assert list(low) == LINEAR_NAMES
    # Every column of every input hits |x| >= 0; with an unreachable threshold none do.
    assert all(cols == list(range(model.get_submodule(n).in_features)) for n, cols in low.items())
    assert all(
        cols == [] for cols in A.activation_outlier_columns(model, [batch], threshold=1e6).values()
    )


# ------------------------------------------------------------------------------------------------
# Prediction-level effects
# ------------------------------------------------------------------------------------------------


def test_macro_f1_matches_sklearn():
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(3)
    gold = rng.integers(0, 4, 50)  # class 4 appears in neither, class 3 only in gold
    pred = np.where(rng.random(50) < 0.6, gold, rng.integers(0, 3, 50))
    assert E.macro_f1(gold, pred, 5) == pytest.approx(f1_score(gold, pred, average="macro"))
    # Hand case: class 0 tp 1, gold 2, predicted 2 -> F1 1/2; class 1 F1 0; class 2 only predicted
    # -> F1 0.
    assert E.macro_f1([0, 0, 1], [0, 2, 0], 3) == pytest.approx((0.5 + 0 + 0) / 3)
    assert E.macro_f1([0, 0, 1], [0, 0, 1], 5) == 1.0  # classes 2-4 absent from both: left out


def test_prediction_effects_hand_case():
    labels = ["neg", "neu", "pos"]
    gold = np.array([0, 0, 1, 2, 2])
    base = np.array(
        [[0.9, 0.05, 0.05], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]]
    )
    var = np.array(
        [[0.8, 0.1, 0.1], [0.3, 0.6, 0.1], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8], [0.5, 0.2, 0.3]]
    )
    # base predicts 0,0,1,2,2 (all right); variant predicts 0,1,1,2,0.
    out = effects.prediction_effects(gold, base, var, labels, n_bins=5)
    _json_ok(out)
    assert out["accuracy_baseline"] == 1.0 and out["accuracy_variant"] == pytest.approx(0.6)
    assert out["agreement"] == pytest.approx(0.6) and out["flip_rate"] == pytest.approx(0.4)
    assert out["flips"] == [
        {"from": "neg", "to": "neu", "count": 1},
        {"from": "pos", "to": "neg", "count": 1},
    ]
    assert out["correct_to_wrong"] == 2 and out["wrong_to_correct"] == 0
    kl = [sum(p * math.log(p / q) for p, q in zip(b, v)) for b, v in zip(base, var)]
    assert out["mean_kl_baseline_variant"] == pytest.approx(sum(kl) / 5)
    cm = out["confusion_matrix"]
    assert cm["rows"] == "gold" and cm["cols"] == "predicted" and cm["labels"] == labels
    # gold neg predicted neu sits in row 0, column 1; gold pos predicted neg in row 2, column 0.
    assert cm["matrix"] == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]
    per_class = {c["label"]: c for c in out["per_class"]}
    assert per_class["neg"] == {
        "label": "neg",
        "precision": 0.5,
        "recall": 0.5,
        "f1": 0.5,
        "support": 2,
    }
    assert per_class["neu"]["precision"] == 0.5 and per_class["neu"]["recall"] == 1.0
    assert per_class["pos"]["precision"] == 1.0 and per_class["pos"]["recall"] == 0.5
    assert out["macro_f1_variant"] == pytest.approx((0.5 + 2 / 3 + 2 / 3) / 3)
    assert out["mean_confidence_baseline"] == pytest.approx((0.9 + 0.6 + 0.7 + 0.8 + 0.4) / 5)
    assert out["mean_confidence_change"] == pytest.approx((0.8 + 0.6 + 0.7 + 0.8 + 0.5) / 5 - 0.68)


def test_prediction_effects_confusion_orientation():
    gold = np.zeros(4, dtype=int)
    probs = np.tile([0.1, 0.9], (4, 1))  # always predicts class 1
    cm = effects.prediction_effects(gold, probs, probs, ["a", "b"])["confusion_matrix"]["matrix"]
    assert cm == [[0, 4], [0, 0]]


def test_expected_calibration_error():
    # Confidence 0.8 on every sample and 8 of 10 right: perfectly calibrated.
    gold = np.array([0] * 8 + [1] * 2)
    probs = np.tile([0.8, 0.2], (10, 1))
    cal = effects.prediction_effects(gold, probs, probs, ["a", "b"], n_bins=10)[
        "calibration_variant"
    ]
    assert cal["ece"] == pytest.approx(0.0, abs=1e-12)
    filled = [b for b in cal["bins"] if b["count"]]
    assert (
        len(filled) == 1
        and filled[0]["lo"] == pytest.approx(0.7)
        and filled[0]["hi"] == pytest.approx(0.8)
    )
    assert filled[0]["accuracy"] == pytest.approx(0.8) and filled[0][
        "mean_confidence"
    ] == pytest.approx(0.8)
    assert all(
        b["accuracy"] is None and b["mean_confidence"] is None
        for b in cal["bins"]
        if not b["count"]
    )

    # Half the samples at 0.9 and all wrong, half at 0.6 and all right: ECE = 0.5 * 0.9 + 0.5 * 0.4.
    gold = np.array([1, 1, 0, 0])
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    out = effects.prediction_effects(gold, probs, probs, ["a", "b"], n_bins=5)
    assert out["calibration_variant"]["ece"] == pytest.approx(0.65)
    assert [b["count"] for b in out["calibration_variant"]["bins"]] == [0, 0, 2, 0, 2]


def test_prediction_effects_rejects_bad_shapes():
    with pytest.raises(ValueError, match="label name"):
        effects.prediction_effects([0, 1], np.eye(2), np.eye(2), ["a", "b", "c"])
    with pytest.raises(ValueError, match="same length"):
        effects.prediction_effects([0, 1, 1], np.eye(2), np.eye(2), ["a", "b"])


# ------------------------------------------------------------------------------------------------
# Significance
# ------------------------------------------------------------------------------------------------


def test_bootstrap_identical_predictions_are_noise():
    rng = np.random.default_rng(0)
    gold, pred = rng.integers(0, 3, 100), rng.integers(0, 3, 100)
    for metric in ("accuracy", "macro_f1"):
        out = E.paired_bootstrap_delta(gold, pred, pred, metric=metric, n_resamples=500)
        _json_ok(out)
        assert (
            out["delta"] == 0.0
            and out["ci_low"] == 0.0
            and out["ci_high"] == 0.0
            and out["within_noise"]
        )


def test_bootstrap_ci_covers_true_delta_with_right_width():
    rng = np.random.default_rng(1)
    n = 400
    gold = rng.integers(0, 2, n)
    base_ok = rng.random(n) < 0.80
    var_ok = base_ok.copy()
    var_ok[np.flatnonzero(base_ok)[:40]] = False  # variant loses 40 samples: delta -0.10
    base, var = np.where(base_ok, gold, 1 - gold), np.where(var_ok, gold, 1 - gold)
    out = E.paired_bootstrap_delta(gold, base, var, n_resamples=2000, seed=0)
    assert out["delta"] == pytest.approx(-40 / n)
    assert out["ci_low"] < out["delta"] < out["ci_high"] < 0 and not out["within_noise"]
    # Normal approximation of the paired difference: half-width 1.96 * sd(d) / sqrt(n).
    d = var_ok.astype(float) - base_ok.astype(float)
    half = 1.96 * d.std() / math.sqrt(n)
    assert (out["ci_high"] - out["ci_low"]) / 2 == pytest.approx(half, rel=0.15)
    assert E.paired_bootstrap_delta(gold, base, var, n_resamples=2000, seed=0) == out  # seeded

    from sklearn.metrics import f1_score

    f1 = E.paired_bootstrap_delta(gold, base, var, metric="macro_f1", n_resamples=300)
    assert f1["delta"] == pytest.approx(
        f1_score(gold, var, average="macro") - f1_score(gold, base, average="macro")
    )
    assert f1["ci_low"] <= f1["delta"] <= f1["ci_high"]
    with pytest.raises(ValueError, match="metric"):
        E.paired_bootstrap_delta(gold, base, var, metric="auc")


def test_mcnemar_exact_known_p_values():
    # b = 1 (baseline right, variant wrong), c = 9: p = 2 * P(X <= 1), X ~ Bin(10, 1/2) = 2 * 11 /
    # 1024.
    gold = np.zeros(30, dtype=int)
    base = np.array([0] * 1 + [1] * 9 + [0] * 15 + [1] * 5)
    var = np.array([1] * 1 + [0] * 9 + [0] * 15 + [1] * 5)
    out = E.mcnemar_exact(gold, base, var)
    _json_ok(out)
    assert (out["b"], out["c"], out["n_discordant"]) == (1, 9, 10)
    assert out["p_value"] == pytest.approx(22 / 1024)
    assert out["within_noise"] is False
    # b = 2, c = 3: p = 1 (symmetric two-sided); identical predictions: no discordant pairs, p = 1.
    gold5 = np.zeros(5, dtype=int)
    assert E.mcnemar_exact(gold5, [0, 0, 1, 1, 1], [1, 1, 0, 0, 0])["p_value"] == pytest.approx(1.0)
    same = E.mcnemar_exact(gold, base, base)
    assert same["p_value"] == 1.0 and same["within_noise"] and same["n_discordant"] == 0
    # b = 0, c = 5: p = 2 / 32 = 0.0625, not significant at 0.05.
    assert E.mcnemar_exact(gold5, [1] * 5, [0] * 5)["p_value"] == pytest.approx(0.0625)
