"""run_variant without Ray: every precision on the CPU, measured sizes, labels matched by name."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SMSA, labelled, smsa_job, variant_json

from runner import data
from runner.job import EvaluationSpec, Variant
from runner.plan import plan_job
from runner.precisions import default_settings, family_of
from runner.work import VariantWork

TEXTS = [
    "a gorgeous , witty , seductive movie .",
    "the plot is nothing but boilerplate clichés",
    "effective but too-tepid biopic",
    "it's a mess",
    "one of the best films of the year",
    "dull and lifeless",
]


def make_task(
    model_dir,
    precision="fp32",
    device="cpu",
    gold=None,
    labels=("negative", "positive"),
    **evaluation,
):
    gold = gold or ["positive", "negative", "positive", "negative", "positive", "negative"]
    settings = dict(batch_size=2, warmup_passes=1, timed_passes=5)
    settings.update(evaluation)
    return VariantWork(
        job="tiny",
        variant=Variant(precision, device),
        family=family_of(precision),
        model_dir=str(model_dir),
        texts=TEXTS,
        **labelled(gold, list(labels)),
        evaluation=EvaluationSpec(**settings),
        settings=default_settings(),
        max_length=32,
        spec_hash="test",
    )


@pytest.fixture(scope="module")
def all_precisions(tiny_model):
    return {
        p: variant_json(make_task(tiny_model, p))
        for p in ["fp32", "fp16", "bf16", "int8-dynamic", "bnb-int8", "bnb-nf4", "bnb-fp4"]
    }


def test_every_cpu_precision_runs_and_reports_the_contract(all_precisions):
    for precision, result in all_precisions.items():
        assert result["status"] == "ok", (precision, result["error"], result.get("traceback"))
        metrics = result["metrics"]
        for name in (
            "model_size_mib",
            "accuracy",
            "macro_f1",
            "avg_confidence",
            "latency_ms",
            "throughput_sps",
            "peak_rss_mib",
            "peak_cuda_mib",
            "load_s",
            "quantize_s",
        ):
            assert name in metrics, (precision, name)
        assert set(metrics["latency_ms"]) >= {
            "mean",
            "median",
            "std",
            "p90",
            "p99",
            "min",
            "max",
            "n",
        }
        assert (
            metrics["latency_ms"]["n"] == 6
        )  # 3 batches of 2, at least 5 timed passes: two whole passes
        assert (
            metrics["latency_ms"]["min"]
            <= metrics["latency_ms"]["median"]
            <= metrics["latency_ms"]["max"]
        )
        assert 0.0 <= metrics["accuracy"] <= 1.0 and 0.5 <= metrics["avg_confidence"] <= 1.0
        assert metrics["peak_cuda_mib"] is None and metrics["peak_rss_mib"] > 50
        assert len(result["predictions"]["predicted"]) == len(TEXTS)
        assert result["environment"]["torch_threads"] == result["settings"]["threads"]
        assert result["environment"]["versions"]["torch"]


def test_sizes_follow_the_bits(all_precisions):
    size = {p: r["metrics"]["model_size_mib"] for p, r in all_precisions.items()}
    # torch.save adds a few kB of pickle per tensor: on a model this small that is a visible share.
    assert 0.45 < size["fp16"] / size["fp32"] < 0.65
    assert size["bf16"] == pytest.approx(size["fp16"], rel=0.01)
    # The tiny model is mostly embeddings, which only the casts shrink; its linear layers do shrink.
    assert size["int8-dynamic"] < size["fp32"] and size["bnb-int8"] < size["fp32"]
    assert size["bnb-nf4"] < size["bnb-int8"]


def test_settings_that_change_results_are_recorded(all_precisions):
    assert all_precisions["int8-dynamic"]["settings"]["quantized_engine"]
    assert (
        "torch.ao.nn.quantized.dynamic.modules.linear.Linear"
        in all_precisions["int8-dynamic"]["settings"]["linear_layers"]
    )
    assert all_precisions["bnb-int8"]["settings"]["llm_int8_threshold"] == 6.0
    assert all_precisions["bnb-nf4"]["settings"]["bnb_4bit_quant_type"] == "nf4"
    assert all_precisions["bnb-fp4"]["settings"]["bnb_4bit_compute_dtype"] == "float32"
    assert all_precisions["fp16"]["settings"]["dtype"] == "float16"


def test_quantized_predictions_stay_close_to_fp32(all_precisions):
    base = np.array(all_precisions["fp32"]["predictions"]["probabilities"])
    for precision in ("fp16", "bf16", "int8-dynamic", "bnb-int8"):
        probs = np.array(all_precisions[precision]["predictions"]["probabilities"])
        assert np.abs(probs - base).max() < 0.05, precision


def test_cuda_variant_without_a_gpu_fails_with_a_clear_error(tiny_model):
    result = variant_json(make_task(tiny_model, "fp16", "cuda"))
    assert result["status"] == "failed"
    assert "no CUDA device" in result["error"]
    assert result["environment"]["host"]


def test_a_broken_model_folder_is_a_failed_result_not_an_exception(tmp_path):
    result = variant_json(make_task(tmp_path))
    assert result["status"] == "failed" and result["error"] and result["ended_at"]


def test_accuracy_is_computed_by_label_name(tiny_model_3, tmp_path):
    """The published mistake: the model orders LABEL_0=positive, LABEL_1=neutral,
    LABEL_2=negative."""
    job = tmp_path / "smsa.yaml"
    job.write_text(
        smsa_job(
            tiny_model_3,
            "{positive: LABEL_0, neutral: LABEL_1, negative: LABEL_2}",
            name="smsa",
            n=30,
            seed=3,
        )
    )
    plan = plan_job(job)
    gold = [plan.targets.config.label_map[e.label] for e in plan.examples]
    assert gold.count("LABEL_0") == sum(e.label == "positive" for e in plan.examples)
    task = VariantWork(
        job="smsa",
        variant=Variant("fp32", "cpu"),
        family=family_of("fp32"),
        model_dir=str(tiny_model_3),
        texts=[e.text for e in plan.examples],
        **labelled(gold, plan.targets.config.names),
        evaluation=EvaluationSpec(batch_size=8, warmup_passes=0, timed_passes=1),
        settings=default_settings(),
        max_length=64,
        spec_hash="x",
    )
    result = variant_json(task)
    predicted = result["predictions"]["predicted"]
    expected = sum(p == g for p, g in zip(predicted, gold)) / len(gold)
    assert result["metrics"]["accuracy"] == pytest.approx(expected)


def test_smsa_tsv_keeps_bare_quotes_and_every_row(tmp_path):
    from runner.job import DatasetSpec, SampleSpec

    spec = DatasetSpec(
        format="tsv",
        path=SMSA / "test_preprocess.tsv",
        files=None,
        header=False,
        text_column=0,
        label_column=1,
        sample=SampleSpec(),
        max_length=128,
    )
    rows = data.read_examples(spec, tmp_path / "job.yaml")
    assert len(rows) == 500
    assert {r.label for r in rows} == {"positive", "neutral", "negative"}
    assert sum(r.label == "positive" for r in rows) == 208
    assert any('"' in r.text for r in rows) or all("\t" not in r.text for r in rows)


def test_weight_analysis_ranks_precisions_by_their_bits(all_precisions):
    sqnr = {
        p: r["analysis"]["summary"]["overall"]["mean_sqnr_db"]
        for p, r in all_precisions.items()
        if p != "fp32"
    }
    assert all_precisions["fp32"]["analysis"]["summary"]["overall"]["n_identical"] == 14
    assert sqnr["fp16"] > sqnr["bf16"] > sqnr["bnb-int8"] > sqnr["bnb-nf4"] > 10
    assert sqnr["int8-dynamic"] > sqnr["bnb-nf4"]
    layers = {row["layer"]: row for row in all_precisions["bnb-int8"]["analysis"]["layers"]}
    assert layers["bert.encoder.layer.1.attention.self.query"]["layer_type"] == "query"
    assert layers["bert.encoder.layer.1.attention.self.query"]["depth"] == 1
    assert "outlier_columns" in all_precisions["bnb-int8"]["analysis"]
    # Every quantized layer's output error, given the FP32 input; a dynamic precision's output
    # also loses its activations' rounding, so it is no better than its weight's.
    int8_rows = all_precisions["int8-dynamic"]["analysis"]["layers"]
    measured = [r for r in int8_rows if not r["identical"]]
    assert measured and all(r["output_sqnr_db"] is not None for r in measured)
    assert all(r["output_sqnr_db"] is None for r in int8_rows if r["identical"])
    overall = all_precisions["int8-dynamic"]["analysis"]["summary"]["overall"]
    assert overall["mean_output_sqnr_db"] < overall["mean_sqnr_db"]
    fp16 = all_precisions["fp16"]["analysis"]["summary"]["overall"]["mean_output_sqnr_db"]
    assert fp16 > overall["mean_output_sqnr_db"] + 10
    assert all_precisions["bnb-nf4"]["analysis"]["grids"]["query"]["precision"] == "bnb-nf4"
    # The analysis phase is measured apart and never counted in the variant's peak memory.
    phases = all_precisions["int8-dynamic"]["metrics"]["memory_phases"]
    assert set(phases) == {"load", "quantize", "evaluate", "analysis"}


def test_length_order_batches_short_sentences_together_and_reports_in_sample_order(tiny_model):
    from transformers import AutoTokenizer

    from runner import evaluate

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    order = evaluate.batch_order(tokenizer, TEXTS, 32, "length")
    lengths = [len(tokenizer(TEXTS[i])["input_ids"]) for i in order]
    assert (
        sorted(order) == list(range(len(TEXTS)))
        and lengths == sorted(lengths)
        and order != sorted(order)
    )
    by_sample = variant_json(make_task(tiny_model, batch_size=3))
    by_length = variant_json(make_task(tiny_model, batch_size=3, batch_order="length"))
    assert by_sample["status"] == by_length["status"] == "ok", by_length["error"]
    # The same sentences, batched differently: each prediction is still reported on its own row.
    np.testing.assert_allclose(
        by_length["predictions"]["probabilities"],
        by_sample["predictions"]["probabilities"],
        atol=1e-5,
    )
    assert by_length["predictions"]["predicted"] == by_sample["predictions"]["predicted"]
    assert (
        by_length["settings"]["batch_order"] == "length"
        and by_sample["settings"]["batch_order"] == "sample"
    )
