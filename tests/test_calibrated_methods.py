"""int8-static, smoothquant-int8 and awq-int4 on a tiny Llama with activation outliers,
calibrated on rt-polarity sentences (one row each, of different lengths): each method against a
property checked by hand, against torchao's own recipe where that runs, and end to end through
quantized_model."""

from __future__ import annotations

import copy
import weakref

import pytest
import torch
from lm_models import build_tiny_llama, rt_sentences

from runner import analysis
from runner.precisions.calibrated import FAMILY

pytest.importorskip("torchao")

from torchao.quantization import IntxWeightOnlyConfig, PerGroup, quantize_  # noqa: E402

from runner.precisions.calibrated import awq, int8_static, observe  # noqa: E402
from runner.precisions.calibrated.worker import WORKER  # noqa: E402
from runner.precisions.worker import quantized_model  # noqa: E402

GROUP = 32  # divides the tiny Llama's 64 and 128 inputs
OUTLIER_CHANNELS = 4  # input channels whose RMSNorm weight is x20, as real LLMs' outliers
CALIBRATION_ROWS = 24
MAX_LENGTH = 48
DOWN = "model.layers.1.mlp.down_proj"
GATE = "model.layers.0.mlp.gate_proj"


def config_of(name: str):
    precision = FAMILY.precision(name)
    if name == "awq-int4":
        return precision, precision.config(torchao_int4_group_size=GROUP)
    return precision, precision.config()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A random 2-layer Llama, 64 wide, whose norms give 4 input channels outliers."""
    from transformers import LlamaForCausalLM

    folder = tmp_path_factory.mktemp("outlier-llama")
    # transformers' own initialisation scale (0.02): a trained model's weights, not the tests'
    # wider one for reading context.
    build_tiny_llama(
        folder, hidden=64, intermediate=128, heads=(4, 2), positions=128, initializer_range=0.02
    )
    model = LlamaForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[:OUTLIER_CHANNELS] *= 20
            layer.post_attention_layernorm.weight[:OUTLIER_CHANNELS] *= 20
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def fp32(llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()


def rows(llama_dir, sentences: list[str]) -> list[dict]:
    """One model input per sentence, [1, L], L as the sentence is long (BOS first)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    return [
        dict(tokenizer(text, truncation=True, max_length=MAX_LENGTH, return_tensors="pt"))
        for text in sentences
    ]


@pytest.fixture(scope="module")
def calibration(llama_dir):
    found = rows(llama_dir, rt_sentences()[:CALIBRATION_ROWS])
    assert len({row["input_ids"].shape[1] for row in found}) > 5, "rows of different lengths"
    return found


@pytest.fixture(scope="module")
def evaluation(llama_dir):
    return rows(llama_dir, rt_sentences()[1000:1008])  # rows calibration never sees


def layer_inputs(model, name: str, batches: list[dict]) -> torch.Tensor:
    """Every input row the named layer receives over the batches, [tokens, in], by hand."""
    seen = []
    handle = model.get_submodule(name).register_forward_pre_hook(
        lambda module, args: seen.append(args[0].reshape(-1, args[0].shape[-1]).clone())
    )
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    handle.remove()
    return torch.cat(seen)


def quantized(fp32, name: str, batches, keep=frozenset()):
    precision, config = config_of(name)
    model, observed = WORKER.calibrate(copy.deepcopy(fp32), precision, config, batches, keep)
    return WORKER.quantize(model, precision, config, keep, observed)


@pytest.fixture(scope="module")
def models(fp32, calibration):
    return {
        name: quantized(fp32, name, calibration)[0]
        for name in ("int8-static", "smoothquant-int8", "awq-int4")
    }


def mean_output_sqnr(fp32, model, batches) -> float:
    errors = analysis.layer_output_errors(fp32, model, batches)
    return sum(e["output_sqnr_db"] for e in errors.values()) / len(errors)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm())


# --------------------------------------------------------------------------------------------------
# int8-static
# --------------------------------------------------------------------------------------------------


def test_int8_static_scale_is_the_calibration_rows_max_over_127_5(fp32, calibration, models):
    inputs = layer_inputs(fp32, DOWN, calibration)
    weight = models["int8-static"].get_submodule(DOWN).weight
    assert float(weight.act_quant_scale) == pytest.approx(float(inputs.abs().max()) / 127.5)
    assert weight.act_quant_scale.shape == (1, 1, 1)
    assert weight.act_pre_scale is None


def test_int8_static_layer_runs_2d_3d_and_generation_inputs(fp32, evaluation, models):
    layer = models["int8-static"].get_submodule(DOWN)
    tokens = layer_inputs(fp32, DOWN, evaluation)[:10]
    as_2d, as_3d = layer(tokens), layer(tokens.reshape(2, 5, -1))
    one = layer(tokens[:1].reshape(1, 1, -1))
    assert as_2d.shape == (10, 64) and one.shape == (1, 1, 64)
    assert torch.equal(as_3d.reshape(10, -1), as_2d)
    assert torch.equal(one.reshape(1, -1), as_2d[:1])
    assert rel(as_2d, fp32.get_submodule(DOWN)(tokens)) < 0.1


# --------------------------------------------------------------------------------------------------
# smoothquant-int8
# --------------------------------------------------------------------------------------------------


def test_smoothed_weights_times_the_inverse_scales_equal_the_original(fp32, calibration, models):
    original = fp32.get_submodule(DOWN).weight.detach()
    absmax = layer_inputs(fp32, DOWN, calibration).abs().amax(dim=0)
    eps = torch.finfo(torch.float32).eps
    s = (absmax + eps).pow(0.5) / (original.abs().amax(dim=0) + eps).pow(0.5)
    weight = models["smoothquant-int8"].get_submodule(DOWN).weight
    assert torch.allclose(weight.act_pre_scale, 1 / s)
    # the int8 weight is W * s rounded per row: within half a step of it, and back in W's
    # space times 1 / s within half a step divided by s
    half_step = weight.scale.reshape(-1, 1) / 2
    assert ((weight.dequantize() - original * s).abs() <= half_step * 1.0001).all()
    back = weight.dequantize() * weight.act_pre_scale
    assert ((back - original).abs() <= half_step / s * 1.0001).all()
    # the smoothing moved the outliers: the smoothed activations' scale is far below int8-static's
    static = models["int8-static"].get_submodule(DOWN).weight.act_quant_scale
    assert float(weight.act_quant_scale) < float(static) / 2


def test_smoothquant_is_bit_identical_to_torchaos_smoothquantconfig(fp32, calibration):
    from torchao.prototype.smoothquant import SmoothQuantConfig

    # torchao's observer concatenates rows on the batch dimension: they must be equally long
    equal = [{k: v[:, :8] for k, v in row.items()} for row in calibration]
    ours, _ = quantized(fp32, "smoothquant-int8", equal)
    theirs = copy.deepcopy(fp32)
    for step in ("prepare", "convert"):
        config = SmoothQuantConfig(int8_static.torchao_static_config(), step=step, alpha=0.5)
        quantize_(theirs, config)
        with torch.no_grad():
            for row in equal if step == "prepare" else []:
                theirs(**row)
    for name, layer in theirs.named_modules():
        if isinstance(layer, torch.nn.Linear):
            mine = ours.get_submodule(name).weight
            assert torch.equal(mine.qdata, layer.weight.qdata), name
            assert torch.equal(mine.act_quant_scale, layer.weight.act_quant_scale), name
            assert torch.equal(mine.act_pre_scale, layer.weight.act_pre_scale), name


def test_smoothquant_beats_int8_static_in_output_error(fp32, evaluation, models):
    static = mean_output_sqnr(fp32, models["int8-static"], evaluation)
    smoothed = mean_output_sqnr(fp32, models["smoothquant-int8"], evaluation)
    assert smoothed > static + 3, (smoothed, static)


# --------------------------------------------------------------------------------------------------
# awq-int4
# --------------------------------------------------------------------------------------------------


def test_awq_scaled_layer_computes_the_same_function_before_quantizing(fp32, evaluation, models):
    original = fp32.get_submodule(GATE)
    layer = models["awq-int4"].get_submodule(GATE)
    tokens = layer_inputs(fp32, GATE, evaluation)
    scaled_weight = original.weight / layer.act_pre_scale[None, :]  # W * s, not quantized
    before_quantizing = torch.nn.functional.linear(tokens * layer.act_pre_scale, scaled_weight)
    assert not torch.allclose(layer.act_pre_scale, torch.ones(64)), "AWQ chose scales"
    assert torch.allclose(before_quantizing, original(tokens), atol=1e-5)


def test_awq_search_chooses_torchaos_scales_without_keeping_the_inputs(fp32, calibration):
    from torchao.prototype.awq.core import AWQObserver

    base = IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(GROUP))
    _, searched = WORKER.calibrate(copy.deepcopy(fp32), *config_of("awq-int4"), calibration)
    for name in (GATE, DOWN, "model.layers.0.self_attn.q_proj"):
        layer = fp32.get_submodule(name)
        observer = AWQObserver(layer.weight.detach(), None, base)
        for row in calibration:  # ragged rows: torchao concatenates them along the tokens
            observer(layer_inputs(fp32, name, [row])[None], None)
        ours = searched.scales[name]
        assert torch.allclose(ours, observer.calculate_qparams(), rtol=1e-4), name


def test_awq_beats_rtn_int4_in_output_error(fp32, evaluation, models):
    rtn = copy.deepcopy(fp32)
    quantize_(rtn, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(GROUP)))
    plain = mean_output_sqnr(fp32, rtn, evaluation)
    scaled = mean_output_sqnr(fp32, models["awq-int4"], evaluation)
    assert scaled > plain, (scaled, plain)


def test_awq_refuses_a_group_size_that_does_not_divide_a_layer_before_calibrating(fp32):
    precision = FAMILY.precision("awq-int4")
    with pytest.raises(ValueError, match="awq-int4: .* in_features 64, not a multiple of .* 128"):
        WORKER.calibrate(fp32, precision, precision.config(torchao_int4_group_size=128), [])


# --------------------------------------------------------------------------------------------------
# Memory: what is held while observing and converting
# --------------------------------------------------------------------------------------------------


def test_converting_frees_each_fp32_layer_as_it_is_replaced(fp32):
    model = copy.deepcopy(fp32)
    names = [name for name, _ in observe.linear_layers(model)]
    weights = {name: weakref.ref(layer.weight) for name, layer in observe.linear_layers(model)}
    alive = {}

    def replaced(name, layer):
        alive[name] = [n for n in names if weights[n]() is not None]
        return torch.nn.Identity()

    observe.quantize_layers(model, frozenset(), "test", replaced)
    for converted, name in enumerate(names):
        assert alive[name] == names[converted:], name  # the layers already replaced are gone


def test_observing_some_layers_stops_each_row_after_them_with_the_same_statistics(
    fp32, calibration
):
    every = observe.observe_inputs(fp32, calibration, gram=True)
    first = "model.layers.0.self_attn.q_proj"
    calls = []
    handle = fp32.get_submodule("lm_head").register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        some = observe.observe_inputs(fp32, calibration, gram=True, names=[first, GATE])
    finally:
        handle.remove()
    assert set(some) == {first, GATE}
    assert len(calls) == 1, "only the first row runs the whole model"
    for name in some:
        assert torch.equal(some[name].absmax, every[name].absmax), name
        assert torch.equal(some[name].abssum, every[name].abssum), name
        assert torch.equal(some[name].gram, every[name].gram), name
        assert some[name].tokens == every[name].tokens, name


def test_awq_holds_a_part_of_its_sums_at_a_time_and_finds_the_same_scales(
    fp32, calibration, monkeypatch
):
    precision, config = config_of("awq-int4")
    _, whole = WORKER.calibrate(copy.deepcopy(fp32), precision, config, calibration)
    held = []
    observe_inputs = awq.observe_inputs

    def observed(*args, **kwargs):
        stats = observe_inputs(*args, **kwargs)
        held.append(sum(layer.gram.nbytes for layer in stats.values()))
        return stats

    part_bytes = 128 * 128 * 4  # one down_proj's sum x^T x
    monkeypatch.setattr(awq, "observe_inputs", observed)
    monkeypatch.setattr(awq, "GRAM_PART_BYTES", part_bytes)
    _, parted = WORKER.calibrate(copy.deepcopy(fp32), precision, config, calibration)
    assert len(held) > 1 and max(held) <= part_bytes, held
    assert parted.ratios == whole.ratios
    assert whole.scales.keys() == parted.scales.keys()
    for name, scales in whole.scales.items():
        assert torch.equal(parted.scales[name], scales), name


# --------------------------------------------------------------------------------------------------
# What the rest of quantbench reads
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["int8-static", "smoothquant-int8", "awq-int4"])
def test_effective_weight_is_close_to_the_fp32_weight_not_the_scaled_one(fp32, models, name):
    layer = models[name].get_submodule(GATE)
    original = fp32.get_submodule(GATE).weight.detach()
    read = WORKER.layer_weight(GATE, layer)
    assert read.dtype == torch.float32 and read.shape == original.shape
    assert rel(read, original) < (0.02 if name.startswith(("int8", "smooth")) else 0.2)
    assert WORKER.is_quantized(config_of(name)[1], layer)
    if name != "int8-static":
        assert rel(layer.weight.dequantize().float(), original) > 2 * rel(read, original)


@pytest.mark.parametrize("name", ["int8-static", "smoothquant-int8", "awq-int4"])
def test_quantized_model_calibrates_then_keeps_a_layer_in_fp32(llama_dir, calibration, name):
    from transformers import AutoModelForCausalLM

    precision, config = config_of(name)
    done = quantized_model(
        precision, config, WORKER, AutoModelForCausalLM, llama_dir, "cpu",
        keep=frozenset({DOWN}), calibration=calibration,
    )  # fmt: skip
    kept = done.model.get_submodule(DOWN)
    assert type(kept) is torch.nn.Linear and type(kept.weight) is torch.nn.Parameter
    assert not WORKER.is_quantized(config, kept)
    assert WORKER.is_quantized(config, done.model.get_submodule(GATE))
    assert done.calibrate_s is not None and done.calibrate_s > 0
    recorded = done.recorded
    assert recorded["library"] == "torchao" and recorded["library_version"] == "0.18.0"
    assert recorded["kept_in_fp32"] == [DOWN]
    assert recorded["group_size"] == (GROUP if name == "awq-int4" else None)
    assert {"method", "config", "granularity"} <= set(recorded)
    # generation feeds each layer one token at a time, [1, 1, H]
    generated = done.model.generate(**calibration[0], max_new_tokens=3, do_sample=False)
    assert generated.shape[1] == calibration[0]["input_ids"].shape[1] + 3
