"""evaluation.compile: a variant through torch.compile (inductor) beside the same variant eager.

The compiled variant must predict what the eager one predicts, report its compile time apart from
latency (metrics.compile_s, its own memory phase), and never time a pass that compiles. The job file
asks for it with evaluation.compile (false, true, both) or with a variant id ending in -compiled.
Inductor on the CPU writes and builds C++: without a C++ compiler the tests that compile are
skipped.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from datetime import datetime

import numpy as np
import pytest
from conftest import build_tiny_bert, check_refused, rt_job, typed, variant_json, write_job
from test_worker import make_task

from runner import isolation
from runner.cli import main
from runner.cluster import fork_server_imports
from runner.job import Variant
from runner.results import write_result
from runner.spec import load_job
from runner.worker import COMPILE, shared_inductor_cache

needs_compiler = pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None,
    reason="torch.compile's inductor backend builds C++ on the CPU: no C++ compiler (g++) here",
)

# Probabilities of the compiled model against the eager one, absolute. Inductor fuses and reorders
# float32 sums, so each is float32's rounding of the same function in another order. Measured on
# this model against a float64 copy of it: eager is off by up to 8.6e-6, compiled by up to 1.9e-5
# (its large weights make logits near 13); they differ by up to 1.1e-5. 1e-4 is five times the
# larger rounding error, and far below what a wrong kernel, a swapped sample or a dropped padding
# mask would move: the six sentences' probabilities range from 0.14 to 0.99998.
PROBABILITY_TOLERANCE = 1e-4


def compiled_task(model_dir, precision="fp32", compiled=True, job="tiny", **evaluation):
    task = make_task(model_dir, precision, timed_passes=20, **evaluation)
    task.spec_as_run = {"name": job, "baseline": "fp32-cpu"}
    return dataclasses.replace(task, job=job, variant=Variant(precision, "cpu", compiled))


@pytest.fixture(scope="module")
def varied_model(tmp_path_factory):
    """A tiny BERT whose predictions on test_worker's six sentences are mixed (4 positive, one at
    0.45): agreement on labels means something."""
    return build_tiny_bert(
        tmp_path_factory.mktemp("varied-bert"),
        ["negative", "positive"],
        hidden=64,
        seed=2,
        initializer_range=1.0,
    )


@pytest.fixture(scope="module")
def eager_and_compiled(varied_model):
    """fp32 on the CPU, eager then compiled, as `compile: both` runs them."""
    return {
        compiled: variant_json(compiled_task(varied_model, compiled=compiled))
        for compiled in (False, True)
    }


@needs_compiler
def test_compiled_predicts_what_eager_predicts(eager_and_compiled):
    eager, compiled = eager_and_compiled[False], eager_and_compiled[True]
    for result in (eager, compiled):
        assert result["status"] == "ok", (result["error"], result.get("traceback"))
    assert (compiled["variant"], compiled["precision"], compiled["device"]) == (
        "fp32-cpu-compiled",
        "fp32",
        "cpu",
    )
    labels = eager["predictions"]["predicted"]
    assert len(set(labels)) == 2, labels  # the model tells the sentences apart
    assert compiled["predictions"]["predicted"] == labels
    eager_p = np.array(eager["predictions"]["probabilities"])
    compiled_p = np.array(compiled["predictions"]["probabilities"])
    np.testing.assert_allclose(compiled_p, eager_p, rtol=0, atol=PROBABILITY_TOLERANCE)
    assert compiled["metrics"]["accuracy"] == eager["metrics"]["accuracy"]


@needs_compiler
def test_compile_time_is_reported_apart_and_never_timed(eager_and_compiled):
    result = eager_and_compiled[True]
    metrics = result["metrics"]
    compile_s = metrics["compile_s"]
    latency = metrics["latency_ms"]
    # Compiling a BERT takes seconds even from inductor's disk cache; a timed pass of this model
    # takes about a millisecond. A pass that compiled would be as long as compile_s.
    assert compile_s > 0.2, compile_s
    assert latency["max"] / 1000 < compile_s / 10, (latency["max"], compile_s)
    started = datetime.fromisoformat(result["started_at"])
    clock = datetime.fromisoformat(latency["clock_started_at"])
    assert (clock - started).total_seconds() >= compile_s
    # The six sentences batch into shapes of different lengths: the first pass compiled one graph
    # for every length, so warm-up's other lengths compiled nothing, nor did the timed passes.
    record = metrics["compilation"]
    assert record["dynamic_length"] is True, record
    assert record["graphs_first_pass"] == 1 and record["graphs_warm_up"] == 0, record
    assert record["graphs_timed"] == 0 and record["recompile_limit_hits"] == 0, record
    assert record["graph_breaks"] == 0, record  # BERT in float32 compiles whole
    phases = list(metrics["memory_phases"])
    assert phases.index("quantize") < phases.index("compile") < phases.index("evaluate"), phases
    assert result["settings"]["compile"] == {
        "mode": "default",
        "backend": "inductor",
        "dynamic": None,
    }
    assert result["settings"]["compile"] == COMPILE


@needs_compiler
def test_fixed_shape_latency_compiles_on_the_fixed_batch(varied_model, eager_and_compiled):
    """latency_mode fixed: compiled on the timed shape; the untimed pass over the sample may
    recompile, and still nothing compiles while the clock runs."""
    task = compiled_task(varied_model, latency_mode="fixed", fixed_shape=(2, 16))
    result = variant_json(task)
    assert result["status"] == "ok", (result["error"], result.get("traceback"))
    record = result["metrics"]["compilation"]
    assert record["graphs_first_pass"] >= 1 and record["graphs_timed"] == 0, record
    eager = eager_and_compiled[False]["predictions"]
    assert result["predictions"]["predicted"] == eager["predicted"]


@pytest.fixture
def own_fork_server():
    """The fork server this test process starts, stopped after the test: a later test counts
    the processes a run leaves behind (test_faults_cluster.py)."""
    yield
    server, isolation._own_server = isolation._own_server, None
    if server is not None:
        server.stop()


@needs_compiler
@pytest.mark.usefixtures("own_fork_server")
def test_compiled_variants_on_a_node_share_one_inductor_cache(varied_model, tmp_path, monkeypatch):
    """Each variant runs in a process of its own, as on a node of a sweep: the second compile of
    the same graphs reads what the first wrote into the node's cache, under quantbench's cache,
    and is shorter; neither compile counts in latency."""
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path / "cache"))
    first, second = (
        isolation.run_in_fresh_process(variant_json, compiled_task(varied_model, job=job))
        for job in ("tiny", "tiny-again")
    )
    for result in (first, second):
        assert result["status"] == "ok", (result["error"], result.get("traceback"))
        latency, compile_s = result["metrics"]["latency_ms"], result["metrics"]["compile_s"]
        assert latency["max"] / 1000 < compile_s / 10, (latency["max"], compile_s)
        started = datetime.fromisoformat(result["started_at"])
        clock = datetime.fromisoformat(latency["clock_started_at"])
        assert (clock - started).total_seconds() >= compile_s
    cold, warm = first["metrics"]["compilation"], second["metrics"]["compilation"]
    shared = tmp_path / "cache" / "inductor"
    assert cold["cache_dir"] == warm["cache_dir"] == str(shared.resolve())
    assert (shared / "fxgraph").is_dir()
    assert cold["fx_graph_cache_hits"] == 0 and cold["fx_graph_cache_misses"] >= 1, cold
    assert warm["fx_graph_cache_hits"] == cold["fx_graph_cache_misses"], (cold, warm)
    assert warm["fx_graph_cache_misses"] == 0, warm
    assert second["metrics"]["compile_s"] < first["metrics"]["compile_s"]


def inductor_was_imported() -> bool:
    """Run in a process forked from a fork server: whether inductor was imported before it ran."""
    return "torch._inductor.compile_fx" in sys.modules


@pytest.mark.usefixtures("own_fork_server")
@pytest.mark.parametrize("compiled", [True, False])
def test_a_job_with_compiled_variants_has_its_fork_server_import_inductor(compiled, monkeypatch):
    """A compiled variant's process finds inductor imported by the server it was forked from, not
    paying the import itself (1.3-2.9 s on 2 cores); an eager job's server leaves it out, since
    every forked process's RSS would carry it."""
    monkeypatch.delenv(isolation.ADDRESS_VARIABLE, raising=False)
    also_import = fork_server_imports(["fp32", "int8-dynamic"], compiled)
    assert ("torch._inductor.compile_fx" in also_import) == compiled, also_import
    isolation._own_server = isolation.start_server(also_import)
    assert isolation.run_in_fresh_process(inductor_was_imported) == compiled


def test_a_cache_folder_the_user_names_is_the_one_used(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert shared_inductor_cache() == tmp_path / "mine"
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    assert shared_inductor_cache() == tmp_path / "cache" / "inductor"


@needs_compiler
def test_an_eager_result_says_nothing_of_compiling(eager_and_compiled):
    eager = eager_and_compiled[False]
    assert eager["variant"] == "fp32-cpu"
    assert "compile_s" not in eager["metrics"] and "compilation" not in eager["metrics"]
    assert "compile" not in eager["settings"] and "compile" not in eager["metrics"]["memory_phases"]


@needs_compiler
def test_the_table_has_both_columns_and_a_compile_row(eager_and_compiled, tmp_path, capsys):
    for result in eager_and_compiled.values():
        write_result(tmp_path, typed([result])[0])
    assert main(["collect", str(tmp_path), "--format", "json"]) == 0
    table = json.loads(capsys.readouterr().out)
    text = json.dumps(table)
    assert "fp32-cpu-compiled" in text and "compile (s)" in text
    assert main(["collect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = {line.split("  ")[0].strip(): line for line in out.splitlines()}
    assert list(rows).index("compile (s)") == list(rows).index("quantize (s)") + 1, out
    compiled_s = f"{eager_and_compiled[True]['metrics']['compile_s']:.2f}"
    assert compiled_s in rows["compile (s)"], rows["compile (s)"]


@needs_compiler
def test_a_compile_failure_fails_the_variant_not_the_run(varied_model):
    import torch._inductor.config as inductor

    # No C++ compiler, and no cached build to fall back on. (The config's own patch: monkeypatch
    # deletes force_disable_caches, an alias, when it undoes.)
    with inductor.patch({"cpp.cxx": (None, "no-such-c++"), "force_disable_caches": True}):
        result = variant_json(compiled_task(varied_model))
    assert result["status"] == "failed"
    assert result["error"].startswith("CompileFailed: torch.compile (inductor, mode default)")
    assert "fp32-cpu-compiled" in result["error"] and "no-such-c++" in result["error"]


# ---------------------------------------------------------------------------------------------
# The job file.


def _ids(tmp_path, tiny_model, extra="", variants="[fp32-cpu, int8-dynamic-cpu]"):
    text = rt_job(tiny_model, variants=variants)
    if extra:
        text = text.replace("timed_passes: 8}", f"timed_passes: 8, {extra}}}")
    spec = load_job(write_job(tmp_path / "jobs", text))
    return spec, [v.id for v in spec.variants]


def test_compile_both_runs_every_variant_eager_and_compiled(tmp_path, tiny_model):
    spec, ids = _ids(tmp_path, tiny_model, "compile: both")
    assert ids == ["fp32-cpu", "fp32-cpu-compiled", "int8-dynamic-cpu", "int8-dynamic-cpu-compiled"]
    assert [(v.precision, v.device, v.compiled) for v in spec.variants][3] == (
        "int8-dynamic",
        "cpu",
        True,
    )
    assert spec.baseline == "fp32-cpu"  # eager FP32 stays the default baseline


def test_compile_true_compiles_every_variant(tmp_path, tiny_model):
    spec, ids = _ids(tmp_path, tiny_model, "compile: true")
    assert ids == ["fp32-cpu-compiled", "int8-dynamic-cpu-compiled"]
    assert spec.baseline == "fp32-cpu-compiled"


def test_compile_applies_to_a_grid_of_precisions_and_devices(tmp_path, tiny_model):
    text = rt_job(tiny_model).replace(
        "variants: [fp32-cpu, int8-dynamic-cpu]", "precisions: [fp32, fp16]\ndevices: [cpu]"
    )
    text = text.replace("timed_passes: 8}", "timed_passes: 8, compile: both}")
    ids = [v.id for v in load_job(write_job(tmp_path / "jobs", text)).variants]
    assert ids == ["fp32-cpu", "fp32-cpu-compiled", "fp16-cpu", "fp16-cpu-compiled"]


def test_without_compile_nothing_is_compiled(tmp_path, tiny_model):
    spec, ids = _ids(tmp_path, tiny_model)
    assert ids == ["fp32-cpu", "int8-dynamic-cpu"]
    assert spec.evaluation.compile is False and not any(v.compiled for v in spec.variants)
    assert "compile" not in spec.raw["evaluation"]  # what the spec hash is computed from


def test_a_variant_may_be_named_compiled_and_be_the_baseline(tmp_path, tiny_model):
    text = rt_job(
        tiny_model,
        "baseline: fp32-cpu-compiled",
        variants="[fp32-cpu, fp32-cpu-compiled, int8-dynamic-cpu-compiled]",
    )
    spec = load_job(write_job(tmp_path / "jobs", text))
    assert [(v.id, v.compiled) for v in spec.variants] == [
        ("fp32-cpu", False),
        ("fp32-cpu-compiled", True),
        ("int8-dynamic-cpu-compiled", True),
    ]
    assert spec.baseline == "fp32-cpu-compiled"


@pytest.mark.parametrize("value", ["maybe", "1", '"true"', "[both]"])
def test_a_bad_compile_value_is_refused_with_the_allowed_ones(capsys, tmp_path, tiny_model, value):
    text = rt_job(tiny_model).replace("timed_passes: 8}", f"timed_passes: 8, compile: {value}}}")
    check_refused(capsys, tmp_path, text, "evaluation.compile", "allowed: false", "true", "both")


def test_a_compiled_id_beside_compile_both_is_refused(capsys, tmp_path, tiny_model):
    text = rt_job(tiny_model, variants="[fp32-cpu, int8-dynamic-cpu-compiled]")
    text = text.replace("timed_passes: 8}", "timed_passes: 8, compile: both}")
    check_refused(
        capsys,
        tmp_path,
        text,
        "variants[1]",
        "int8-dynamic-cpu-compiled",
        "evaluation.compile: both already compiles every variant",
        "name int8-dynamic-cpu here",
    )


def test_a_compiled_variant_is_still_checked_against_its_device(capsys, tmp_path, tiny_model):
    check_refused(
        capsys,
        tmp_path,
        rt_job(tiny_model, variants="[fp32-cpu, int8-dynamic-cuda-compiled]"),
        "variants[1]",
        "int8-dynamic-cuda",
        "runs on cpu only",
    )


def test_a_compiled_variant_named_twice_is_refused(capsys, tmp_path, tiny_model):
    check_refused(
        capsys,
        tmp_path,
        rt_job(tiny_model, variants="[fp32-cpu-compiled, fp32-cpu-compiled]"),
        "variants[1]",
        "fp32-cpu-compiled",
        "each variant may appear once",
    )


@pytest.fixture(scope="module")
def int8_eager_and_compiled(varied_model):
    """torch.ao's int8-dynamic, eager then compiled."""
    return [
        variant_json(compiled_task(varied_model, "int8-dynamic", compiled=compiled))
        for compiled in (False, True)
    ]


@needs_compiler
def test_a_model_that_compiles_only_in_part_runs_and_says_so(int8_eager_and_compiled):
    """torch.ao's int8-dynamic Linear holds its weights in a ScriptObject that dynamo cannot trace:
    the graph breaks at every layer, and what it cannot compile runs eager."""
    eager, result = int8_eager_and_compiled
    assert result["status"] == "ok", (result["error"], result.get("traceback"))
    record = result["metrics"]["compilation"]
    assert record["graph_breaks"] > 0 and record["graphs_timed"] == 0, record
    assert result["predictions"]["predicted"] == eager["predictions"]["predicted"]
    partly = [w for w in result["warnings"] if "only partly compiled" in w]
    assert bool(partly) == (record["recompile_limit_hits"] > 0), result["warnings"]


@needs_compiler
def test_the_report_draws_a_compiled_twins_weights_once(int8_eager_and_compiled):
    """Compiling changes no weight: the SQNR panels and grid histograms are the eager variant's."""
    from runner import collect, report

    table = collect.build_tables(typed(int8_eager_and_compiled))[0]
    assert table.columns == ["int8-dynamic-cpu", "int8-dynamic-cpu-compiled"]
    figure = report.plot_sqnr_by_depth(table)
    panels = [ax.get_title().split(" ")[0] for ax in figure.axes if ax.get_title()]
    assert panels == ["int8-dynamic-cpu"]
    alone = collect.build_tables(typed(int8_eager_and_compiled[1:]))[
        0
    ]  # without its twin it is drawn
    assert report._own_weights(alone) == ["int8-dynamic-cpu-compiled"]


def test_asking_for_compiled_variants_keeps_the_results_comparable(tmp_path, tiny_model):
    """evaluation.compile only adds variants, as the variants list does: a job switched from
    eager to `both` has the same spec hash, so --resume keeps its eager results. Another
    evaluation setting still tells two specs apart."""
    from runner.plan import plan_job

    eager = rt_job(tiny_model)
    both = eager.replace("timed_passes: 8}", "timed_passes: 8, compile: both}")
    other = eager.replace("timed_passes: 8}", "timed_passes: 9}")
    hashes = {
        name: plan_job(write_job(tmp_path / name, text)).spec_hash
        for name, text in (("eager", eager), ("both", both), ("other", other))
    }
    assert hashes["eager"] == hashes["both"] != hashes["other"]
