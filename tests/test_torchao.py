"""torchao's precisions on the CPU: each runs through run_variant with its layers quantized, its
int8 layers carry the error an independent per-row quantization predicts, its int4 group size is a
setting checked against the model, and float8 is refused where it cannot run."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from conftest import check_refused, rt_job, variant_json
from test_worker import TEXTS, make_task

from runner import analysis, precisions

pytest.importorskip("torchao")

CPU_PRECISIONS = ["torchao-int8-dynamic", "torchao-int8-weight", "torchao-int4-weight"]
TENSOR_CLASS = {
    "torchao-int8-dynamic": "Int8Tensor",
    "torchao-int8-weight": "Int8Tensor",
    "torchao-int4-weight": "IntxUnpackedToInt8Tensor",
}
# The tiny model's layers take 32 or 64 inputs: torchao's default int4 group (128) fits none.
SMALL_GROUPS = precisions.default_settings(torchao_int4_group_size=32)
QUERY = "bert.encoder.layer.0.attention.self.query"


def skip_without_kernel(precision: str) -> None:
    """Skips, saying why, where torchao's CPU kernel for this precision cannot run here."""
    from torchao.quantization import quantize_

    from runner.precisions.torchao.worker import torchao_config

    config = precisions.config_for(precisions.PRECISIONS[precision], SMALL_GROUPS)
    layer = torch.nn.Linear(64, 8)
    try:
        quantize_(layer, torchao_config(config, "cpu"))
        layer(torch.randn(2, 64))
    except (ImportError, NotImplementedError, RuntimeError) as error:
        pytest.skip(f"{precision}: torchao's CPU kernel cannot run here: {error}")


def torchao_task(model_dir, precision: str, settings=SMALL_GROUPS):
    return dataclasses.replace(make_task(model_dir, precision), settings=settings)


@pytest.fixture(scope="module")
def results(tiny_model):
    found = {}
    for precision in CPU_PRECISIONS:
        skip_without_kernel(precision)
        found[precision] = variant_json(torchao_task(tiny_model, precision))
    return found


@pytest.mark.parametrize("precision", CPU_PRECISIONS)
def test_each_cpu_precision_runs_with_every_layer_quantized(results, precision):
    result = results[precision]
    assert result["status"] == "ok", (result["error"], result.get("traceback"))
    census = result["settings"]["linear_layers"]
    # 6 per encoder layer, the pooler and the classifier head: quantize_ converts every nn.Linear.
    kind = f"torch.nn.modules.linear.Linear[torchao.quantization.{TENSOR_CLASS[precision]}]"
    assert census == {kind: 14}
    assert len(result["predictions"]["predicted"]) == len(TEXTS)
    assert result["metrics"]["latency_ms"]["n"] == 6
    recorded = result["settings"]
    assert recorded["method"] == "torchao.quantization.quantize_"
    assert recorded["torchao_version"] == "0.18.0"
    assert recorded["torchao_config_fields"]["_type"] == recorded["torchao_config"]
    if precision != "torchao-int4-weight":  # its grid: the test below
        assert "error" not in result["analysis"], result["analysis"]


def test_int4_weight_analysis_draws_the_grid_of_the_jobs_group_size(results):
    analysed = results["torchao-int4-weight"]["analysis"]
    assert "error" not in analysed, analysed
    assert {grid["block_size"] for grid in analysed["grids"].values()} == {32}


def test_recorded_settings_say_config_granularity_and_group(results):
    int8 = results["torchao-int8-dynamic"]["settings"]
    assert int8["torchao_config"] == "Int8DynamicActivationInt8WeightConfig"
    assert (int8["granularity"], int8["group_size"]) == ("per row", None)
    int4 = results["torchao-int4-weight"]["settings"]
    assert int4["torchao_config"] == "IntxWeightOnlyConfig"
    assert (int4["granularity"], int4["group_size"]) == ("per group of 32", 32)
    group = int4["torchao_config_fields"]["_data"]["granularity"]
    assert group == {"_type": "PerGroup", "_version": 1, "_data": {"group_size": 32}}


def _int8_per_row_sqnr_db(weight: torch.Tensor) -> float:
    """Per-row symmetric int8 of an FP32 weight, computed here in float64: scale = max|row| / 127.5
    (the int8 range's half-width), codes rounded to even and clamped to -128..127."""
    w = weight.to(torch.float64)
    scale = w.abs().amax(dim=1, keepdim=True) / 127.5
    quantized = torch.clamp(torch.round(w / scale), -128, 127) * scale
    return 10 * math.log10(float((w**2).sum()) / float(((w - quantized) ** 2).sum()))


def test_int8_layer_sqnr_matches_an_independent_per_row_quantization(results, tiny_model):
    from transformers import AutoModelForSequenceClassification

    reference = AutoModelForSequenceClassification.from_pretrained(tiny_model)
    expected = _int8_per_row_sqnr_db(reference.get_submodule(QUERY).weight.detach())
    rows = {row["layer"]: row for row in results["torchao-int8-dynamic"]["analysis"]["layers"]}
    # Other conventions land far outside 0.01 dB on this layer: max|row| / 127 (bnb's) about 0.2 dB
    # higher, one scale per tensor (torch.ao's int8-dynamic) about 4 dB lower.
    assert rows[QUERY]["sqnr_db"] == pytest.approx(expected, abs=0.01)


def test_int4_group_size_setting_sets_the_grid_groups():
    weight = torch.randn(16, 128, generator=torch.Generator().manual_seed(0))
    for group_size in (32, 64, 128):
        settings = precisions.default_settings(torchao_int4_group_size=group_size)
        grid = analysis.quantization_grid("torchao-int4-weight", weight, settings)
        assert (grid["granularity"], grid["block_size"]) == ("group", group_size)
        assert grid["n_groups"] == 16 * 128 // group_size
        groups = weight.to(torch.float64).reshape(16, -1, group_size)
        # torchao's symmetric int4: one scale max|group| / 7.5 per group, codes -8..7.
        assert grid["scale_max"] == pytest.approx(float(groups.abs().amax()) / 7.5, rel=1e-6)
        assert grid["codes"] == list(range(-8, 8))


def test_a_group_size_that_does_not_divide_a_layer_fails_naming_it(tiny_model):
    skip_without_kernel("torchao-int4-weight")
    result = variant_json(
        torchao_task(tiny_model, "torchao-int4-weight", precisions.default_settings())
    )
    assert result["status"] == "failed"
    assert f"layer '{QUERY}' has in_features 32" in result["error"], result["error"]
    assert "torchao_int4_group_size 128" in result["error"]
    assert "group sizes that divide it: 32" in result["error"]


def test_int8_grid_is_torchaos_own_row_scales():
    weight = torch.randn(8, 64, generator=torch.Generator().manual_seed(3))
    grid = analysis.quantization_grid("torchao-int8-weight", weight)
    assert (grid["granularity"], grid["n_groups"]) == ("row", 8)
    assert grid["scale_max"] == pytest.approx(float(weight.abs().amax()) / 127.5, rel=1e-6)


def test_float8_grid_spans_the_layer_at_one_scale():
    weight = torch.randn(8, 64, generator=torch.Generator().manual_seed(4))
    grid = analysis.quantization_grid("torchao-float8-dynamic", weight)
    assert (grid["granularity"], grid["n_groups"]) == ("tensor", 1)
    assert max(grid["values"]) == pytest.approx(float(weight.abs().amax()))
    assert len(grid["codes"]) == 253  # e4m3's 254 finite codes, +0 and -0 one value


def test_float8_on_an_older_gpu_fails_naming_it_and_what_it_needs(monkeypatch, tiny_model):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A10")
    float8 = precisions.PRECISIONS["torchao-float8-dynamic"]
    config = precisions.config_for(float8, precisions.default_settings())
    with pytest.raises(RuntimeError) as error:
        precisions.worker_of(float8).load(float8, config, None, str(tiny_model), "cuda")
    assert "NVIDIA A10 has 8.6" in str(error.value)
    assert "compute capability 8.9 or newer" in str(error.value)


def test_validation_refuses_float8_on_the_cpu_saying_why(capsys, tmp_path, tiny_model):
    check_refused(
        capsys,
        tmp_path,
        rt_job(tiny_model, variants="[fp32-cpu, torchao-float8-dynamic-cpu]"),
        "variants[1]",
        "torchao-float8-dynamic-cpu",
        "runs on cuda only",
        "compute capability 8.9 or newer",
    )


def test_validation_refuses_an_int4_group_size_torchao_lacks(capsys, tmp_path, tiny_model):
    check_refused(
        capsys,
        tmp_path,
        rt_job(tiny_model, "settings: {torchao_int4_group_size: 48}"),
        "settings.torchao_int4_group_size",
        "48",
        "allowed: 32, 64, 128, 256",
    )
