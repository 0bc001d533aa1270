"""After its timed passes a causal-LM variant compares itself with the FP32 checkpoint twice (the
weight analysis, then the KL): it loads that checkpoint once for both, and frees it before
generation."""

from __future__ import annotations

import pytest
import transformers
from conftest import write_job
from lm_models import build_tiny_gpt2
from test_causal_lm import lm_job

from runner import models
from runner.job import Variant
from runner.plan import plan_job
from runner.sweep import variant_work
from runner.worker import run_variant

pytestmark = pytest.mark.usefixtures("private_timing_lock")


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return build_tiny_gpt2(tmp_path_factory.mktemp("gpt2"))


def test_the_analysis_and_the_kl_read_one_fp32_load(tmp_path, gpt2, monkeypatch):
    plan = plan_job(write_job(tmp_path, lm_job(gpt2, variants="[fp16-cpu]")))
    model_dir, info = models.prepare_model(plan.spec)
    (work,) = variant_work(plan, model_dir, info, set(), [Variant("fp16", "cpu")])
    loads = []
    load = transformers.AutoModelForCausalLM.from_pretrained

    def counted(folder, *args, **kwargs):
        loads.append(str(kwargs.get("dtype")))
        return load(folder, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", counted)
    result = run_variant(work)
    assert result.status == "ok", result.error
    # The variant in FP16, then the FP32 reference once: the analysis and the KL both read it.
    assert loads == ["torch.float16", "torch.float32"]
    metrics = result.to_json()["metrics"]
    assert result.analysis["layers"] and metrics["kl_vs_fp32"] > 0
    assert {"analysis", "kl", "kv_cache"} <= set(metrics["memory_phases"])
