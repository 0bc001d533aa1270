"""The sensitivity study on a tiny BERT with one layer made hard to quantize, and the keep seam of
every CPU precision family (runner/study/ranking.py, runner.precisions.worker.quantized_model)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from conftest import HARD, HARD_BERT_LABELS, build_hard_bert, build_tiny_bert, hard_bert_sentences

from runner import precisions
from runner.evaluate import tokenize_batches
from runner.precisions.worker import quantized_model
from runner.study import ranking as S
from runner.study import steps
from runner.tasks.classification.worker import label_study, probabilities

torch.set_num_threads(1)

LABELS = HARD_BERT_LABELS
SETTINGS = precisions.default_settings(torchao_int4_group_size=32)


def _auto_model():
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification


def _config(precision: str):
    return precisions.config_for(precisions.PRECISIONS[precision], SETTINGS)


def _load_quantized(precision: str, folder, keep) -> tuple:
    """(model, recorded settings): the checkpoint loaded and quantized as the precision does."""
    spec = precisions.PRECISIONS[precision]
    family = precisions.worker_of(spec)
    calibration = _calibration_rows() if spec.calibrated else None
    loaded = quantized_model(
        spec, _config(precision), family, _auto_model(), str(folder), "cpu", keep, calibration
    )
    return loaded.model, loaded.recorded


def _calibration_rows() -> list[dict]:
    """A few rows of token ids every test model's vocabulary holds, one per batch."""
    generator = torch.Generator().manual_seed(3)
    rows = [torch.randint(5, 100, (1, length), generator=generator) for length in (6, 11, 8)]
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids)} for ids in rows]


@pytest.fixture(scope="module")
def hard_bert(tmp_path_factory):
    """(model folder, batches, gold): a tiny BERT whose HARD layer int8-dynamic ruins."""
    from transformers import AutoTokenizer

    folder = build_hard_bert(tmp_path_factory.mktemp("hard-bert"))
    texts, gold = hard_bert_sentences()
    batches = tokenize_batches(AutoTokenizer.from_pretrained(folder), texts, 16, 32, "cpu")
    return folder, batches, np.array(gold)


def _study(hard_bert, precision: str = "int8-dynamic") -> tuple[S.Study, dict]:
    folder, batches, gold = hard_bert
    reference = _auto_model().from_pretrained(folder).eval()

    def evaluate(keep):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao's deprecation notice
            model = _load_quantized(precision, folder, keep)[0]
        return probabilities(model, batches)

    layers = tuple(steps.linear_layers(reference))
    study = label_study(evaluate, probabilities(reference, batches), gold, LABELS, layers)
    return study, steps.study_groups(reference, "layer")


@pytest.fixture(scope="module")
def layer_study(hard_bert):
    study, groups = _study(hard_bert)
    full = S.measure(study, frozenset())
    return study, groups, full, S.run_study(study, groups)


def test_fully_quantized_model_flips_predictions(layer_study, hard_bert):
    _, _, full, _ = layer_study
    samples = len(hard_bert[2])
    assert full["kept"] == 0 and full["flips"] >= 10, full
    assert full["agreement"] < 0.9 and full["mean_kl"] > 0
    assert full["flips"] == round((1 - full["agreement"]) * samples)
    assert full["mcnemar"]["n_discordant"] <= full["flips"]
    assert full["bootstrap_accuracy_delta"]["n"] == samples


def test_study_ranks_the_outlier_layer_first(layer_study):
    study, groups, _, ranking = layer_study
    assert len(ranking) == len(groups) == 14  # 6 per encoder layer, pooler, classifier
    first = ranking[0]
    assert (first["rank"], first["group"], first["layers"]) == (1, HARD, [HARD])
    others = [entry["only"]["agreement"] for entry in ranking[1:]]
    assert first["only"]["agreement"] < min(others) - 0.1, (first["only"], others)
    assert first["only"]["kept"] == len(study.layers) - 1 and first["all_but"]["kept"] == 1
    keys = [S.ranking_key(entry) for entry in ranking]
    assert keys == sorted(keys)


def test_recipe_keeps_the_outlier_layer(layer_study):
    study, _, full, ranking = layer_study
    found = S.recipe(ranking, full, lambda keep: S.measure(study, keep))
    assert found["groups"][0] == HARD and HARD in found["kept"]
    assert found["met"] and found["result"]["agreement"] >= 0.99
    assert found["result"]["agreement"] > full["agreement"]
    assert found["tolerance"] == {"min_agreement": 0.99, "max_accuracy_drop": None}
    # Doubling from one group: the first prefix tried is the most harmful group alone.
    assert found["tried"][0]["groups"] == 1
    assert min(t["groups"] for t in found["tried"] if t["agreement"] >= 0.99) == len(
        found["groups"]
    )

    loose = S.recipe(ranking, full, lambda keep: S.measure(study, keep), S.Tolerance(0.95))
    assert loose["kept"] == [HARD] and loose["met"]


def test_mixed_model_agrees_more_than_fully_quantized(layer_study):
    study, _, full, ranking = layer_study
    mixed = S.measure(study, frozenset({HARD}))
    assert mixed["agreement"] > full["agreement"] + 0.2
    assert mixed["mean_kl"] < full["mean_kl"] / 10
    assert mixed == ranking[0]["all_but"]


@pytest.mark.parametrize("needed", [1, 2, 3, 37, 64, 98, 99])
def test_recipe_finds_the_shortest_prefix_in_about_2_log2_measurements(needed):
    """100 groups; keeping the first `needed` of them meets the tolerance, fewer do not."""
    bad = {"agreement": 0.5, "accuracy": 0.5, "accuracy_fp32": 0.5, "mean_kl": 1.0}
    good = {**bad, "agreement": 1.0}
    ranking = [{"group": f"g{i}", "layers": [f"l{i}"]} for i in range(100)]
    measured = []

    def measure_keep(keep):
        measured.append(len(keep))
        return good if len(keep) >= needed else bad

    found = S.recipe(ranking, bad, measure_keep)
    assert found["met"] and len(found["groups"]) == needed, found["groups"]
    assert found["groups"] == [f"g{i}" for i in range(needed)]
    assert len(measured) == len(set(measured)) <= 2 * 7 + 1  # each prefix at most once
    assert [t["groups"] for t in found["tried"]] == measured


def test_recipe_keeps_nothing_when_quantized_model_meets_tolerance():
    calls = []
    full = {"agreement": 1.0, "accuracy": 0.5, "accuracy_fp32": 0.5, "mean_kl": 0.0}
    ranking = [{"group": "g", "layers": ["a"]}]
    found = S.recipe(ranking, full, calls.append)
    assert found["kept"] == [] and found["met"] and calls == []


def test_recipe_reports_unmet_tolerance():
    bad = {"agreement": 0.5, "accuracy": 0.2, "accuracy_fp32": 0.6, "mean_kl": 1.0}
    ranking = [{"group": "g", "layers": ["a"]}, {"group": "h", "layers": ["b", "c"]}]
    found = S.recipe(ranking, bad, lambda keep: dict(bad), S.Tolerance(None, 0.1))
    assert found["kept"] == ["a"] and found["groups"] == ["g"]  # every group but one, at most
    assert not found["met"] and len(found["tried"]) == 1


def test_a_tolerance_met_only_by_keeping_every_group_is_not_met():
    """Every group kept is the FP32 model: it would meet any tolerance, and says nothing."""
    bad = {"agreement": 0.5, "accuracy": 0.2, "accuracy_fp32": 0.6, "mean_kl": 1.0}
    fp32 = {"agreement": 1.0, "accuracy": 0.6, "accuracy_fp32": 0.6, "mean_kl": 0.0}
    ranking = [{"group": "g", "layers": ["a"]}, {"group": "h", "layers": ["b"]}]
    found = S.recipe(ranking, bad, lambda keep: fp32 if keep == {"a", "b"} else bad)
    assert not found["met"] and found["kept"] == ["a"], found


def test_tolerance_checks():
    assert S.Tolerance().met_by({"agreement": 0.99, "accuracy": 0.1, "accuracy_fp32": 0.9})
    drop = S.Tolerance(min_agreement=None, max_accuracy_drop=0.05)
    assert drop.met_by({"agreement": 0.0, "accuracy": 0.86, "accuracy_fp32": 0.9})
    assert not drop.met_by({"agreement": 1.0, "accuracy": 0.8, "accuracy_fp32": 0.9})
    with pytest.raises(ValueError, match="min_agreement must be between 0 and 1"):
        S.Tolerance(min_agreement=99)
    with pytest.raises(ValueError, match="both are None"):
        S.Tolerance(None, None)


def test_groups_by_type_and_depth(hard_bert):
    model = _auto_model().from_pretrained(hard_bert[0])
    by_type = steps.study_groups(model, "type")
    assert by_type["output"] == [
        "bert.encoder.layer.0.output.dense",
        "bert.encoder.layer.1.output.dense",
    ]
    assert by_type["classifier"] == ["classifier"] and by_type["pooler"] == ["bert.pooler.dense"]
    assert len(by_type) == 8  # query key value attention_output intermediate output pooler head
    by_depth = steps.study_groups(model, "depth")
    assert list(by_depth) == ["depth 0", "depth 1", "pooler", "classifier"]
    assert len(by_depth["depth 1"]) == 6 and HARD in by_depth["depth 1"]
    assert sum(map(len, by_depth.values())) == 14
    with pytest.raises(ValueError, match="allowed: layer, type, depth"):
        steps.study_groups(model, "block")


def test_measure_refuses_unknown_layers(layer_study):
    study = layer_study[0]
    with pytest.raises(ValueError, match="not among the study's 14 layers"):
        S.measure(study, frozenset({"bert.encoder"}))


# --------------------------------------------------------------------------------------------------
# The keep seam of each family
# --------------------------------------------------------------------------------------------------

KEPT = "bert.encoder.layer.1.output.dense"
LOOK_ALIKE = "bert.encoder.layer.11.output.dense"  # a skip name matched by prefix would catch it
SEAM_PRECISIONS = [
    "int8-dynamic",
    "bnb-int8",
    "bnb-nf4",
    "torchao-int8-dynamic",
    "torchao-int8-weight",
    "torchao-int4-weight",
    "int8-static",
    "smoothquant-int8",
    "awq-int4",
    "gptq-int4",
]


@pytest.fixture(scope="module")
def deep_bert(tmp_path_factory):
    return build_tiny_bert(tmp_path_factory.mktemp("deep-bert"), LABELS, layers=12)


def _load(precision: str, folder, keep):
    family = precisions.PRECISIONS[precision].family
    if family in ("bitsandbytes", "torchao"):
        pytest.importorskip(family)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _load_quantized(precision, folder, keep)


def _is_quantized(precision: str, module) -> bool:
    return precisions.worker_of(precision).is_quantized(_config(precision), module)


@pytest.mark.parametrize("precision", SEAM_PRECISIONS)
def test_kept_layer_stays_float_and_others_are_quantized(deep_bert, precision):
    model, recorded = _load(precision, deep_bert, {KEPT})
    kept = model.get_submodule(KEPT)
    assert type(kept) is torch.nn.Linear and type(kept.weight) is torch.nn.Parameter
    assert kept.weight.dtype == torch.float32 and not _is_quantized(precision, kept)
    assert recorded["kept_in_fp32"] == [KEPT]
    quantized = [
        name
        for name in steps.linear_layers(_auto_model().from_pretrained(deep_bert))
        if name != KEPT and not precisions.worker_of(precision).leaves_unquantized(model, name)
    ]
    assert LOOK_ALIKE in quantized and len(quantized) >= 12 * 6 - 1
    for name in quantized:
        assert _is_quantized(precision, model.get_submodule(name)), name
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([[2, 10, 11, 3]])).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("precision", ["int8-dynamic", "bnb-int8", "torchao-int8-weight"])
def test_keep_empty_quantizes_every_layer(deep_bert, precision):
    model, recorded = _load(precision, deep_bert, frozenset())
    assert "kept_in_fp32" not in recorded
    layer = model.get_submodule(KEPT)
    assert _is_quantized(precision, layer)


def test_bnb_keep_leaves_the_default_skips(deep_bert):
    pytest.importorskip("bitsandbytes")
    plain, _ = _load("bnb-int8", deep_bert, frozenset())
    mixed, _ = _load("bnb-int8", deep_bert, {KEPT})
    defaults = set(plain.hf_quantizer.modules_to_not_convert)
    assert defaults and defaults <= set(mixed.hf_quantizer.modules_to_not_convert)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_casts_refuse_keep(deep_bert, precision):
    with pytest.raises(ValueError, match=f"{precision} cannot keep layers in FP32"):
        _load(precision, deep_bert, {KEPT})


def test_keep_names_an_unknown_layer(deep_bert):
    with pytest.raises(ValueError, match=r"cannot keep \['bert.encoder'\] in FP32: not linear"):
        _load("int8-dynamic", deep_bert, {"bert.encoder"})
