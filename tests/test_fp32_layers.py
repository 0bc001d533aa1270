"""The weight analysis reads the FP32 checkpoint one linear layer at a time, never as a second whole
model beside the variant, and every figure it reports is the one a whole FP32 model gives."""

from __future__ import annotations

import pytest
import torch
from conftest import write_job
from lm_models import build_tied_llama, build_tiny_gpt2, load
from test_causal_lm import lm_job
from transformers import AutoModelForCausalLM

from runner import analysis, fp32_layers, models
from runner import worker as variant_worker
from runner.job import Variant
from runner.plan import plan_job
from runner.precisions.worker import REFERENCE
from runner.sweep import variant_work

pytestmark = pytest.mark.usefixtures("private_timing_lock")


@pytest.fixture(scope="module", params=["tied-llama", "gpt2"])
def lm(request, tmp_path_factory):
    """A tied Llama (nn.Linear, its output layer the embedding, as SmolLM2's and Gemma's) and a
    GPT-2 (Conv1D layers)."""
    folder = tmp_path_factory.mktemp(request.param)
    return build_tied_llama(folder) if request.param == "tied-llama" else build_tiny_gpt2(folder)


def test_a_forward_holds_one_fp32_linear_layer_at_a_time(lm):
    streamed = fp32_layers.streamed_fp32(AutoModelForCausalLM, lm)
    whole, _ = load(lm)
    held = []
    for module in streamed.model.modules():
        module.register_forward_hook(lambda *_: held.append(materialized(streamed)))
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.inference_mode():
        logits = streamed.model(input_ids=ids).logits
        expected = whole(input_ids=ids).logits
    assert torch.equal(logits, expected)
    assert max(held) == 1 and len(streamed.streamed) > 1


def materialized(streamed) -> int:
    """Streamed layers holding their FP32 weight now (a tied output layer is not streamed)."""
    return sum(1 for m in streamed.streamed.values() if not m.weight.is_meta)


def test_the_layer_weights_are_the_whole_models(lm):
    streamed = fp32_layers.streamed_fp32(AutoModelForCausalLM, lm)
    whole, _ = load(lm)
    expected = analysis.dequantized_linear_weights(whole, REFERENCE)
    weights = streamed.weights()
    assert list(weights) == list(expected)
    for name in expected:
        assert torch.equal(weights[name], expected[name])
        assert materialized(streamed) == 0  # each read leaves nothing behind


def test_a_variants_analysis_loads_no_whole_fp32_model_and_reports_the_same(
    tmp_path, lm, monkeypatch
):
    plan = plan_job(write_job(tmp_path, lm_job(lm, variants="[int8-dynamic-cpu]")))
    model_dir, info = models.prepare_model(plan.spec)
    (work,) = variant_work(plan, model_dir, info, set(), [Variant("int8-dynamic", "cpu")])
    loads = []
    whole_model = variant_worker.Fp32Reference.model

    def counted(self, device="cpu"):
        loads.append(device)
        return whole_model(self, device)

    monkeypatch.setattr(variant_worker.Fp32Reference, "model", counted)
    streamed = variant_worker.run_variant(work).to_json()
    assert streamed["status"] == "ok", streamed["error"]
    # The KL (no stored reference in this test) loads FP32 whole once; the analysis never does.
    assert loads == ["cpu"]
    monkeypatch.setattr(fp32_layers, "streamed_fp32", lambda *_: None)
    whole = variant_worker.run_variant(work).to_json()
    for outcome in (streamed, whole):
        del outcome["analysis"]["analysis_s"]
    assert streamed["analysis"] == whole["analysis"]
    assert streamed["metrics"]["kl_vs_fp32"] == whole["metrics"]["kl_vs_fp32"]


def test_the_fp32_model_shares_the_tensors_a_variant_holds_unchanged(tmp_path):
    folder = build_tied_llama(tmp_path)
    variant, _ = load(folder)
    variant = torch.ao.quantization.quantize_dynamic(variant, {torch.nn.Linear}, torch.qint8)
    with torch.no_grad():
        variant.model.norm.weight.mul_(2)  # as SmoothQuant folds its scales into a norm
    streamed = fp32_layers.streamed_fp32(AutoModelForCausalLM, folder, variant)
    whole, _ = load(folder)
    # The embedding no precision here quantizes: one tensor, also the FP32 output layer's weight.
    embedding = streamed.model.get_input_embeddings().weight
    assert embedding.data_ptr() == variant.get_input_embeddings().weight.data_ptr()
    assert streamed.model.lm_head.weight is embedding
    # The changed norm is read from the checkpoint: FP32's own values.
    assert streamed.model.model.norm.weight.data_ptr() != variant.model.norm.weight.data_ptr()
    assert torch.equal(streamed.model.model.norm.weight, whole.model.norm.weight)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.inference_mode():
        assert torch.equal(streamed.model(input_ids=ids).logits, whole(input_ids=ids).logits)
