"""benchmarks/memory.py: the job it runs and the table it writes, on what a real SmolLM2 run wrote
(2026-12-07): each phase's peak against 1.5 x the FP32 size + 400 MiB."""

from __future__ import annotations

import json

from benchmarks.memory import memory_job, table


def _result(precision: str, size: float, phases: dict, peak: float) -> dict:
    return {
        "variant": f"{precision}-cpu",
        "precision": precision,
        "status": "ok",
        "metrics": {
            "model_size_mib": size,
            "peak_rss_mib": peak,
            "memory_phases": {name: {"peak_rss_mib": mib} for name, mib in phases.items()},
        },
    }


# Three of that run's results: FP32 meets the bound in every phase; int8-dynamic's own work does,
# its analysis does not; SmoothQuant's quantize does not.
RESULTS = [
    _result("fp32", 513.2361, {"load": 905, "evaluate": 1044, "analysis": 1147}, 1044.0),
    _result("int8-dynamic", 236.6, {"quantize": 937, "evaluate": 834, "analysis": 1186}, 937.0),
    _result("smoothquant-int8", 238.3, {"calibrate": 975, "quantize": 1632}, 1632.0),
]


def test_the_table_says_which_peaks_meet_the_bound(tmp_path):
    for result in RESULTS:
        (tmp_path / f"{result['variant']}.json").write_text(json.dumps(result))
    text, bound = table(tmp_path)
    assert round(bound, 1) == 1169.9  # 1.5 x 513.2 + 400
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines()[2:]}
    assert list(rows) == ["fp32-cpu", "int8-dynamic-cpu", "smoothquant-int8-cpu"]  # in order
    assert rows["fp32-cpu"].endswith("| 1044 | 1147 | yes, yes |")
    assert rows["int8-dynamic-cpu"].endswith("| 937 | 1186 | yes, no |")
    assert rows["smoothquant-int8-cpu"].endswith("| 1632 | 1632 | no, no |")


def test_the_job_cuts_the_models_job_to_one_batch_of_every_phase():
    job = memory_job("smollm2", ["fp32", "int8-dynamic", "gptq-int4"])
    assert job["variants"] == ["fp32-cpu", "int8-dynamic-cpu", "gptq-int4-cpu"]
    assert job["dataset"]["sample"]["n"] == job["evaluation"]["batch_size"] == 8
    assert "benchmarks" not in job and job["calibration"]["samples"] == 16
    assert "calibration" not in memory_job("gemma", ["fp32", "bf16"])


def test_fp32_always_runs_for_its_size_sets_the_bound():
    job = memory_job("gemma", ["int8-dynamic", "bnb-nf4"])
    assert job["variants"] == ["fp32-cpu", "int8-dynamic-cpu", "bnb-nf4-cpu"]
    assert job["baseline"] == "fp32-cpu"
    assert memory_job("gemma", ["bnb-nf4", "fp32"])["variants"] == ["fp32-cpu", "bnb-nf4-cpu"]
