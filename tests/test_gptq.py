"""gptq-int4 (Intel Neural Compressor's GPTQ, computed with torchao's CPU int4 layer) on a tiny
random Llama, calibrated on real rt-polarity sentences, one row each, of their own lengths."""

from __future__ import annotations

import copy

import pytest
import torch
from lm_models import build_tiny_llama, rt_sentences

from runner.precisions.calibrated import FAMILY, GptqInt4, gptq
from runner.precisions.torchao import FAMILY as TORCHAO_FAMILY
from runner.precisions.torchao import Int4Weight
from runner.precisions.torchao.worker import WORKER as TORCHAO_WORKER
from runner.precisions.worker import FamilyWorker, quantized_model

GROUP_SIZE = 32  # divides hidden 128 and intermediate 256
KEPT = "model.layers.0.mlp.down_proj"


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(folder of a saved random 2-layer Llama 128 wide and its tokenizer, 24 calibration rows)."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("gptq-llama")
    build_tiny_llama(
        folder, hidden=128, intermediate=256, heads=(4, 2), positions=128, initializer_range=0.02
    )
    tokenizer = AutoTokenizer.from_pretrained(folder)
    rows = [tokenizer(text, return_tensors="pt") for text in rt_sentences()[:24]]
    batches = [{k: v[:, :64] for k, v in row.items()} for row in rows]
    assert len({b["input_ids"].shape[1] for b in batches}) > 5, "rows of different lengths"
    assert all(b["input_ids"][0, 0] == tokenizer.bos_token_id for b in batches)
    return folder, batches


def load(folder):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def gptq_int4(model, batches, keep=frozenset()):
    config = GptqInt4(torchao_int4_group_size=GROUP_SIZE)
    model, observed = gptq.calibrate(model, config, batches, keep)
    return gptq.quantize(model, config, keep, observed)


def layer_inputs(model, batches) -> dict[str, torch.Tensor]:
    """Every linear layer's inputs over the calibration rows, [tokens, in]."""
    seen: dict[str, list] = {}

    def keep_input(name):
        return lambda _, args: seen.setdefault(name, []).append(args[0].flatten(0, -2))

    hooks = [
        module.register_forward_pre_hook(keep_input(name))
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    ]
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    for hook in hooks:
        hook.remove()
    return {name: torch.cat(xs) for name, xs in seen.items()}


def output_errors(reference, quantized, inputs) -> dict[str, float]:
    """Each layer's ||x W_q^T - x W^T||^2 / ||x W^T||^2 on the FP32 layer's inputs."""
    layers = dict(quantized.named_modules())
    errors = {}
    with torch.no_grad():
        for name, x in inputs.items():
            expected = reference.get_submodule(name)(x)
            errors[name] = float((layers[name](x) - expected).pow(2).sum() / expected.pow(2).sum())
    return errors


def test_gptq_moves_each_layers_output_less_than_round_to_nearest(llama):
    folder, batches = llama
    reference = load(folder)
    inputs = layer_inputs(reference, batches)
    rtn, _ = TORCHAO_WORKER.quantize(
        load(folder), TORCHAO_FAMILY.precision("torchao-int4-weight"), Int4Weight(GROUP_SIZE)
    )
    gptq_model, recorded = gptq_int4(load(folder), batches)

    rtn_errors = output_errors(reference, rtn, inputs)
    gptq_errors = output_errors(reference, gptq_model, inputs)
    better = [name for name in gptq_errors if gptq_errors[name] < rtn_errors[name]]
    assert len(gptq_errors) == 15  # 7 per block and lm_head, all quantized
    assert len(better) >= 14, {n: (rtn_errors[n], gptq_errors[n]) for n in gptq_errors}
    assert "lm_head" in better  # quantized by INC's GPTQ step outside INC's blocks
    assert recorded["gptq_outside_blocks"] == ["lm_head"]


def test_every_layer_is_torchaos_int4_linear_under_its_name_but_the_kept_one(llama):
    folder, batches = llama
    fp32 = load(folder)
    model, recorded = gptq_int4(copy.deepcopy(fp32), batches, keep=frozenset({KEPT}))

    kept = model.get_submodule(KEPT)
    assert type(kept) is torch.nn.Linear and type(kept.weight) is torch.nn.Parameter
    assert torch.equal(kept.weight, fp32.get_submodule(KEPT).weight)
    assert not gptq.is_quantized(kept) and gptq.effective_weight(kept) is None
    quantized = [n for n, m in model.named_modules() if gptq.is_quantized(m)]
    assert len(quantized) == 14 and KEPT not in quantized
    assert all(type(model.get_submodule(n)) is torch.nn.Linear for n in quantized)
    assert recorded["library"] == "neural-compressor-pt" and recorded["library_version"] == "3.10"
    assert recorded["group_size"] == GROUP_SIZE
    assert recorded["config"]["group_size"] == GROUP_SIZE and recorded["config"]["use_sym"]
    assert recorded["config"]["bits"] == 4 and recorded["config"]["act_order"] is False


def test_the_repacked_layer_computes_what_incs_layer_computes(llama):
    folder, batches = llama
    config = GptqInt4(torchao_int4_group_size=GROUP_SIZE)
    model, observed = gptq.calibrate(load(folder), config, batches, frozenset())
    model = gptq.inc_convert(model, observed)
    inc_layer = model.get_submodule("model.layers.1.mlp.down_proj")
    repacked = gptq.torchao_layer(inc_layer)

    inc_weight = inc_layer.recover().float()  # codes times float16 scales, rounded to float16
    weight = gptq.effective_weight(repacked)
    scale = inc_layer.unpack()["scales"].float().repeat_interleave(GROUP_SIZE, dim=1)
    assert torch.all((weight - inc_weight).abs() <= scale * 2**-7)
    x = torch.randn(2, 5, inc_layer.in_features)  # 3-D, as the per-layer output error feeds it
    with torch.no_grad():
        expected = inc_layer(x)
        got = repacked(x)
    assert torch.allclose(got, expected, rtol=1e-3, atol=1e-3 * float(expected.abs().max()))
    codes = repacked.weight.qdata
    assert int(codes.min()) >= -8 and int(codes.max()) <= 7


def test_the_output_layer_is_rounded_a_block_of_rows_at_a_time_to_the_same_codes(
    llama, monkeypatch
):
    folder, batches = llama
    whole, _ = gptq_int4(load(folder), batches)
    rows_given = []
    fasterquant = gptq.IncGptqLayer.fasterquant

    def rounding(step, weight, **kwargs):
        rows_given.append(weight.shape[0])
        return fasterquant(step, weight, **kwargs)

    monkeypatch.setattr(gptq.IncGptqLayer, "fasterquant", rounding)
    monkeypatch.setattr(gptq, "ROW_BLOCK_BYTES", 100 * 128 * 4)  # 100 rows of 128 inputs
    in_blocks, recorded = gptq_int4(load(folder), batches)
    assert recorded["gptq_outside_blocks"] == ["lm_head"]
    vocabulary = whole.get_submodule("lm_head").out_features
    blocks = [100] * (vocabulary // 100) + ([vocabulary % 100] if vocabulary % 100 else [])
    assert len(blocks) > 1 and rows_given[-len(blocks) :] == blocks  # INC's blocks come first
    for name, module in whole.named_modules():
        if gptq.is_quantized(module):
            ours = in_blocks.get_submodule(name).weight
            assert torch.equal(ours.qdata, module.weight.qdata), name
            assert torch.equal(ours.scale, module.weight.scale), name


def test_the_grid_is_torchao_int4_weights(llama):
    folder, _ = llama
    weight = load(folder).get_submodule("model.layers.0.mlp.up_proj").weight.detach()
    precision = FAMILY.precision("gptq-int4")
    config = GptqInt4(torchao_int4_group_size=GROUP_SIZE)
    grid = gptq.grid(precision, config, weight)
    rtn_grid = TORCHAO_WORKER.grid(
        TORCHAO_FAMILY.precision("torchao-int4-weight"), Int4Weight(GROUP_SIZE), weight
    )
    assert grid["codes"] == list(range(-8, 8)) == rtn_grid["codes"]
    assert grid["n_groups"] == rtn_grid["n_groups"] == 256 * 128 // GROUP_SIZE
    for key in ("scale_min", "scale_median", "scale_max"):
        assert grid[key] == pytest.approx(rtn_grid[key], rel=1e-6)


def test_a_group_size_that_does_not_divide_a_layer_is_refused_naming_it(llama):
    folder, batches = llama
    refused = r"gptq-int4: layer 'model.layers.0.self_attn.q_proj' has in_features 128"
    with pytest.raises(ValueError, match=refused):
        gptq.calibrate(load(folder), GptqInt4(torchao_int4_group_size=256), batches, frozenset())


def test_incs_failure_on_a_layer_names_the_layer(llama):
    folder, batches = llama
    model = load(folder)
    with torch.no_grad():  # NaN queries make o_proj's inputs NaN: no Cholesky of their Hessian
        model.model.layers[1].self_attn.q_proj.weight[0, 0] = float("nan")
    with pytest.raises(RuntimeError, match=r"failed at layer 'model.layers.1.self_attn.o_proj'"):
        gptq_int4(model, batches)


class GptqWorker(FamilyWorker):
    """The calibrated family's worker, for gptq-int4 only (runner/precisions/calibrated/worker.py
    dispatches to gptq the same way)."""

    def calibrate(self, model, precision, config, batches, keep=frozenset()):
        return gptq.calibrate(model, config, batches, keep)

    def quantize(self, model, precision, config, keep=frozenset(), calibration=None):
        return gptq.quantize(model, config, keep, calibration)


def test_quantized_model_calibrates_then_quantizes(llama):
    from transformers import LlamaForCausalLM

    folder, batches = llama
    precision = FAMILY.precision("gptq-int4")
    config = GptqInt4(torchao_int4_group_size=GROUP_SIZE)
    made = quantized_model(
        precision, config, GptqWorker(), LlamaForCausalLM, folder, "cpu", calibration=batches
    )
    assert made.calibrate_s is not None and made.calibrate_s > 0 and made.quantize_s > 0
    assert made.recorded["method"].startswith("GPTQ")
    assert sum(gptq.is_quantized(m) for m in made.model.modules()) == 15
    with torch.no_grad():
        logits = made.model(**batches[0]).logits
    assert torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="needs calibration batches"):
        quantized_model(precision, config, GptqWorker(), LlamaForCausalLM, folder, "cpu")
