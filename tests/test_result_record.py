"""The Result record: the typed form of a result file gives back exactly the dict it was read from.

The results are the ones the repository ships (results/reference/), a base_result of a variant that
never ran, and hand-made dicts with keys absent, extra or null.
"""

from __future__ import annotations

import json

import pytest
from conftest import REPO, labelled

from runner import measure
from runner.job import EvaluationSpec, Variant
from runner.precisions import default_settings, family_of
from runner.results import (
    is_study_file,
    load_result,
    load_study,
    read_json_result,
    walk,
    write_result,
)
from runner.schema import Latency, Result
from runner.work import VariantWork, base_result

REFERENCE = sorted((REPO / "results" / "reference").rglob("*.json"))
SHIPPED = [path for path in REFERENCE if not is_study_file(path)]
STUDIES = [path for path in REFERENCE if is_study_file(path)]


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_a_shipped_study_reads_as_a_study_and_names_its_results(path):
    study = load_study(path)
    assert study["status"] == "ok" and study["ranking"] and study["recipe"]["kept"]
    for variant in (study["variant"], study["mixed_variant"]):
        assert load_result(path.parent / f"{variant}.json").status == "ok"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_a_shipped_result_comes_back_byte_for_byte(path):
    data = json.loads(path.read_text())
    result = load_result(path)
    assert json.dumps(result.to_json(), indent=1) == json.dumps(data, indent=1)
    assert result.metrics.to_json() == data["metrics"]
    if data["status"] == "ok":
        assert result.metrics.latency.median == data["metrics"]["latency_ms"]["median"]
        # A classifier's predictions have labels; a causal LM's, windows.
        assert getattr(result.predictions, "labels", None) == data["predictions"].get("labels")
        assert getattr(result.predictions, "windows", None) == data["predictions"].get("windows")
    assert result.status == data["status"] and result.host == data["environment"].get("host")


def test_a_base_result_and_its_later_fields_in_the_order_a_worker_writes_them():
    task = VariantWork(
        job="tiny",
        variant=Variant("fp32", "cpu"),
        family=family_of("fp32"),
        model_dir="unused",
        texts=["a"],
        **labelled(["x"], ["x", "y"]),
        evaluation=EvaluationSpec(),
        settings=default_settings(),
        max_length=8,
        spec_hash="h",
    )
    base = base_result(task, "skipped", "no node").to_json()
    result = Result.from_json(base)
    assert list(result.to_json()) == list(base) and result.to_json() == base
    result.wall_s, result.traceback = 1.5, "trace"
    assert list(result.to_json()) == [*base, "traceback", "wall_s"]


def test_absent_null_and_unknown_keys_stay_as_they_were():
    data = {
        "schema_version": 1,
        "job": "j",
        "variant": "fp32-cpu",
        "status": "ok",
        "device": "cpu",
        "repeats": {"n": 3},
        "metrics": {"accuracy": 0.5, "latency_ms": None, "custom": [1]},
        "warnings": None,
    }
    result = read_json_result(data)
    assert json.dumps(result.to_json()) == json.dumps(data)
    assert result.extra == {"repeats": {"n": 3}} and result.metrics.extra == {"custom": [1]}
    assert result.metrics.latency.median is None and result.precision == ""
    assert "analysis" not in result.to_json()


def test_latency_from_values_is_the_measured_statistics():
    seconds = [0.010, 0.012, 0.011, 0.030, 0.009]
    latency = Latency.from_values(seconds)
    assert latency.to_json() == measure.latency_stats(seconds)
    assert latency.median == 11.0 and latency.n == 5


def test_written_and_walked_results_are_the_same_either_way(tmp_path):
    data = json.loads(SHIPPED[0].read_text())
    write_result(tmp_path / "a", load_result(SHIPPED[0]))
    write_result(tmp_path / "b", Result.from_json(data))
    a = (tmp_path / "a" / data["job"] / f"{data['variant']}.json").read_bytes()
    assert a == (tmp_path / "b" / data["job"] / f"{data['variant']}.json").read_bytes()
    (tmp_path / "a" / data["job"] / "x.json").write_text("[]")
    found = walk([tmp_path / "a"])
    assert [r.to_json() for r in found.results] == [data]
    assert [why for _, why in found.unusable] == [
        "not a result: a JSON list, where a result is one JSON object"
    ]
    written = tmp_path / "a" / data["job"] / f"{data['variant']}.json"
    assert found.results[0].file == written and load_result(written).file == written
