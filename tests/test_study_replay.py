"""A study measures each mixed model by swapping layers between the FP32 model and the fully
quantized one and replaying the blocks before the first swapped layer (runner/study/replay.py):
its measurements must be the ones a freshly quantized copy gives, to the last bit, and cheaper."""

from __future__ import annotations

import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import write_job
from test_causal_lm import lm_job
from test_study import _step as bert_step

from runner import models
from runner.job import SensitivitySpec
from runner.plan import plan_job
from runner.precisions import family_of
from runner.study import replay, steps
from runner.work import StudyWork


@pytest.fixture(scope="module")
def hard_bert(tmp_path_factory):
    from conftest import build_hard_bert

    return build_hard_bert(tmp_path_factory.mktemp("hard-bert"))


def lm_step(tmp_path, model, precision="int8-dynamic") -> StudyWork:
    plan = plan_job(write_job(tmp_path, lm_job(model)))
    model_dir, _ = models.prepare_model(plan.spec)
    return StudyWork(
        kind="probe",
        study=SensitivitySpec(precision, "cpu", "layer"),
        family=family_of(precision),
        model_dir=str(model_dir),
        **plan.worker_inputs(),
    )


def loaded_for(probe: StudyWork) -> steps.Loaded:
    found = steps.run_step(probe)
    return steps.load(replace(probe, kind="groups", layers=tuple(found["layers"])))


def copied_outputs(loaded: steps.Loaded, keep: frozenset[str]):
    """What the study measured before: a copy of the FP32 model quantized all but keep."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return loaded.view.outputs(steps.quantized_copy(loaded, keep))


def keep_sets(layers: tuple[str, ...]) -> list[frozenset[str]]:
    """only and all_but of the first, a middle and the last layer, and a recipe-like prefix."""
    every = frozenset(layers)
    picks = [layers[0], layers[len(layers) // 2], layers[-1]]
    sets = [every - {name} for name in picks] + [frozenset({name}) for name in picks]
    return [*sets, frozenset(layers[1::3])]


def same_outputs(a, b) -> bool:
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    fields = ("nll", "greedy_ids", "top_ids", "top_log_probs")
    return all(
        np.array_equal(np.asarray(getattr(x, f)), np.asarray(getattr(y, f)))
        for x, y in zip(a, b, strict=True)
        for f in fields
    )


def test_a_classifier_measured_by_swapping_equals_a_quantized_copy_bit_for_bit(hard_bert):
    loaded = loaded_for(
        replace(
            bert_step(hard_bert, "int8-dynamic"),
            study=SensitivitySpec("int8-dynamic", "cpu", "layer"),
        )
    )
    assert loaded.recordings["fp32"].blocks  # BERT's encoder layers are replayed
    for keep in keep_sets(loaded.layers):
        assert same_outputs(steps.measured_outputs(loaded, keep), copied_outputs(loaded, keep))


@pytest.mark.parametrize("precision", ["int8-dynamic", "torchao-int8-weight"])
def test_a_causal_lm_measured_by_swapping_equals_a_quantized_copy_bit_for_bit(
    tmp_path, llama, precision
):
    loaded = loaded_for(lm_step(tmp_path, llama, precision))
    for keep in keep_sets(loaded.layers):
        assert same_outputs(steps.measured_outputs(loaded, keep), copied_outputs(loaded, keep))


def test_a_layer_in_the_last_block_runs_no_earlier_block(tmp_path, llama):
    loaded = loaded_for(lm_step(tmp_path, llama))
    blocks = loaded.recordings["fp32"].blocks
    ran = []
    first = loaded.fp32.get_submodule(blocks[0])
    handle = first.register_forward_hook(lambda *args: ran.append(1))
    try:
        last_down = next(n for n in reversed(loaded.layers) if n.endswith("down_proj"))
        steps.measured_outputs(loaded, frozenset(loaded.layers) - {last_down})  # only it
        assert ran == []
        steps.measured_outputs(loaded, frozenset(loaded.layers) - {loaded.layers[0]})
        assert ran  # a layer of the first block runs every block
    finally:
        handle.remove()
    # Put back: the FP32 model holds its own blocks and layers again.
    assert loaded.fp32.get_submodule(blocks[0]) is first
    assert type(loaded.fp32.get_submodule(last_down)) is torch.nn.Linear


def test_a_recording_over_its_memory_share_is_dropped_and_measurements_stay_exact(tmp_path, llama):
    loaded = loaded_for(lm_step(tmp_path, llama))
    for which, model in (("fp32", loaded.fp32), ("full", loaded.full)):
        loaded.recordings[which], _ = replay.record_blocks(
            model, loaded.layers, loaded.view.outputs, memory_bytes=1024
        )
        assert "over" in loaded.recordings[which].dropped
    for keep in keep_sets(loaded.layers)[:2]:
        assert same_outputs(steps.measured_outputs(loaded, keep), copied_outputs(loaded, keep))
