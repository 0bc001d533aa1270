"""The cross-hardware view: one job run on two machines, one of them with a GPU, collected from the
two results folders as a user copies them side by side.

The laptop ran the job's CPU variants; the server ran fp32 on its CPU and fp32 and bnb-int8 on its
GPU. Results are the causal-LM results of tests/lm_results.py (perplexity follows from each
window's NLL: exp(mean NLL)), given their machine, device and latency, and written as a run writes
them, so that collect finds each one's results folder.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import typed
from lm_results import BASELINE_GREEDY, lm_result

from runner import collect, pivot
from runner.cli import main
from runner.results import write_result

GPU = {"name": "Test GPU", "compute_capability": "9.0"}


def ran(variant: str, host: str, nll: float, latency_ms: float, size_mib: float) -> dict:
    """One ok result of the job `tiny-lm`, every window at `nll` nats per token."""
    result = lm_result(variant, [nll] * 3, BASELINE_GREEDY, 100.0, size_mib, latency_ms)
    cpu = {"model": f"{host} cpu"}
    cuda = result["device"] == "cuda"
    result["environment"] = {"host": host, "cpu": cpu, "gpu": GPU if cuda else None}
    result["metrics"]["peak_cuda_mib"] = 300.0 if cuda else None
    result["metrics"]["throughput_sps"] = 8 * 1000.0 / latency_ms  # batches of 8 windows
    return result


LAPTOP = [
    ran("fp32-cpu", "a-laptop", 2.0, 10.0, 400.0),
    ran("int8-dynamic-cpu", "a-laptop", 2.05, 6.0, 100.0),
    ran("bnb-int8-cpu", "a-laptop", 2.1, 20.0, 120.0),
]
SERVER = [
    ran("fp32-cpu", "b-server", 2.0, 8.0, 400.0),
    ran("fp32-cuda", "b-server", 2.0, 2.0, 400.0),
    ran("bnb-int8-cuda", "b-server", 2.2, 4.0, 120.0),
]


def written(folder: Path, results: list[dict]) -> Path:
    for result in typed(results):
        write_result(folder, result)
    return folder


@pytest.fixture
def folders(tmp_path) -> list[Path]:
    return [written(tmp_path / "laptop", LAPTOP), written(tmp_path / "server", SERVER)]


def built(folders: list[Path]) -> pivot.Pivot | None:
    results, _, unusable = collect.gather(folders)
    assert not unusable
    (table,) = collect.build_tables(results)
    return pivot.build(table)


def cell(view: pivot.View, method: str, column: str) -> pivot.PivotCell:
    return view.cells[(method, column)]


def view_of(found: pivot.Pivot, label: str) -> pivot.View:
    return next(view for view in found.views if view.row.label == label)


def test_rows_are_methods_and_columns_are_machine_and_device(folders):
    found = built(folders)
    assert [p.label for p in found.places] == ["a-laptop cpu", "b-server cpu", "b-server cuda"]
    # Each column says what it ran on (runner/measure.py's label of the hardware) and where.
    hardware = [p.hardware for p in found.places]
    assert "a-laptop cpu" in hardware[0] and "b-server cpu" in hardware[1]
    assert hardware[2].startswith("Test GPU") and hardware[2].endswith("@ b-server")
    assert found.methods == ["fp32", "int8-dynamic", "bnb-int8"]
    # Every task's metrics around the causal LM's quality rows (runner/tasks/causal_lm).
    assert [view.row.label for view in found.views] == [
        "size (MiB)",
        "perplexity",
        "KL vs FP32 (nats/token)",
        "latency median (ms)",
        "throughput (samples/s)",
        "peak RSS (MiB)",
        "peak CUDA (MiB)",
    ]


def test_deltas_against_the_baseline_and_against_the_same_method_elsewhere(folders):
    latency = view_of(built(folders), "latency median (ms)")
    base = cell(latency, "fp32", "a-laptop cpu")
    assert (base.value, base.is_baseline, base.against_first) == (10.0, True, None)
    # The server's own fp32-cpu is its baseline: a machine's speed is not quantization's.
    own = cell(latency, "fp32", "b-server cpu")
    assert (own.is_baseline, own.against_baseline) == (True, None)
    assert own.against_first == pytest.approx(-0.2)  # against the laptop's fp32
    assert cell(latency, "fp32", "b-server cuda").against_baseline == pytest.approx(-0.75)
    assert cell(latency, "fp32", "b-server cuda").against_first == pytest.approx(-0.8)
    # bnb-int8: 20 ms on the laptop's CPU, 4 ms on the GPU.
    assert cell(latency, "bnb-int8", "a-laptop cpu").against_baseline == pytest.approx(1.0)
    assert cell(latency, "bnb-int8", "a-laptop cpu").against_first is None
    on_gpu = cell(latency, "bnb-int8", "b-server cuda")
    assert on_gpu.against_baseline == pytest.approx(-0.5)  # against the server's 8 ms
    assert on_gpu.against_first == pytest.approx(-0.8)
    assert ("bnb-int8", "b-server cpu") not in latency.cells  # it did not run there

    perplexity = view_of(built(folders), "perplexity")
    on_gpu = cell(perplexity, "bnb-int8", "b-server cuda")
    assert on_gpu.value == pytest.approx(math.exp(2.2))
    assert on_gpu.against_baseline == pytest.approx(math.exp(0.2) - 1)
    assert on_gpu.against_first == pytest.approx(math.exp(0.1) - 1)  # against the laptop's 2.1


def test_the_view_fits_a_narrow_terminal_in_blocks_of_places(folders, capsys):
    assert main(["collect", *map(str, folders), "--width", "80"]) == 0
    view = capsys.readouterr().out.split("tiny-lm across machines and devices")[1]
    assert max(len(line) for line in view.splitlines()) <= 80
    blocks = [line.split() for line in view.splitlines() if line.startswith("latency median")]
    assert len(blocks) > 1  # three places do not fit 80 columns side by side
    shown = " ".join(" ".join(block) for block in blocks)
    assert all(place in shown for place in ("a-laptop cpu", "b-server cpu", "b-server cuda"))


def test_collect_prints_the_view_after_the_table_and_names_each_implementation(folders, capsys):
    assert main(["collect", *map(str, folders), "--width", "200"]) == 0
    out = capsys.readouterr().out
    table, view = out.split(
        "tiny-lm across machines and devices (Δ base against fp32-cpu on the same machine)"
    )
    assert "fp32-cpu@b-server" in table  # collect's own table comes first, as before
    assert "  b-server cuda: Test GPU" in view
    latency = view[view.index("latency median (ms)") :].splitlines()
    assert latency[0].split() == [
        *("latency", "median", "(ms)", "a-laptop", "cpu", "Δ", "base"),
        *("b-server", "cpu", "Δ", "base", "Δ", "first"),
        *("b-server", "cuda", "Δ", "base", "Δ", "first"),
    ]
    assert latency[2].split() == [
        *("fp32", "10.00", "baseline"),
        *("8.00", "baseline", "-20.0%"),
        *("2.00", "-75.0%", "-80.0%"),
    ]
    assert latency[4].split() == ["bnb-int8", "20.00", "+100.0%", "–", "4.00", "-50.0%", "-80.0%"]
    # The two int8 methods name what runs them: different algorithms, never one "int8".
    assert "int8-dynamic: (cpu) torch.ao quantize_dynamic: int8 weights per tensor" in view
    assert "bnb-int8: (cpu, cuda) bitsandbytes LLM.int8()" in view


def test_json_gains_the_view_under_its_own_key(folders, capsys):
    assert main(["collect", *map(str, folders), "--format", "json"]) == 0
    (entry,) = json.loads(capsys.readouterr().out)
    before = ["job", "baseline", "notes", "variants", "significance_method", "verdict"]
    assert list(entry) == [*before, "cross_hardware"]  # the keys before it are unchanged
    view = entry["cross_hardware"]
    assert [c["column"] for c in view["columns"]] == [
        "a-laptop cpu",
        "b-server cpu",
        "b-server cuda",
    ]
    on_gpu = view["metrics"]["latency median (ms)"]["bnb-int8"]["b-server cuda"]
    assert on_gpu["value"] == 4.0
    assert on_gpu["delta_vs_first"] == pytest.approx(-0.8)
    assert "LLM.int8()" in view["methods"]["bnb-int8"]


def test_a_machine_is_named_by_its_run_label_as_in_collects_columns(tmp_path):
    labelled = [{**r, "environment": {**r["environment"], "machine": "my-laptop"}} for r in LAPTOP]
    found = built([written(tmp_path / "laptop", labelled), written(tmp_path / "server", SERVER)])
    # The baseline's place first: collect gives the bare column names to the name sorting first.
    assert [p.label for p in found.places] == ["b-server cpu", "my-laptop cpu", "b-server cuda"]
    # Two folders of one machine are told apart by their folders, as collect's columns are.
    again = [{**r, "environment": {**r["environment"], "host": "b-server"}} for r in LAPTOP]
    found = built([written(tmp_path / "tuesday", again), written(tmp_path / "server", SERVER)])
    assert {p.machine for p in found.places} == {"tuesday", "server"}


def test_no_view_for_a_job_on_one_machine_and_device(tmp_path, capsys):
    laptop = written(tmp_path / "laptop", LAPTOP)
    assert built([laptop]) is None
    assert main(["collect", str(laptop)]) == 0
    out = capsys.readouterr().out
    results, _, _ = collect.gather([laptop])
    assert out == collect.FORMATS["table"](collect.build_tables(results))  # the table alone
    assert main(["collect", str(laptop), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["cross_hardware"] is None


def test_the_report_shows_the_view_in_the_jobs_section(folders, tmp_path):
    from runner import report

    results, _, _ = collect.gather(folders)
    page = report.write_report(results, tmp_path / "two.html").path.read_text(encoding="utf-8")
    section = page[page.index("Across machines and devices</h3>") :]
    assert "<th>latency median (ms)</th><th>a-laptop cpu</th><th>Δ base</th>" in section
    assert "<th>bnb-int8</th><td>20.00</td><td>+100.0%</td>" in section
    assert "bnb-int8: (cpu, cuda) bitsandbytes LLM.int8()" in section

    laptop, _, _ = collect.gather(folders[:1])
    alone = report.write_report(laptop, tmp_path / "one.html").path.read_text(encoding="utf-8")
    assert "Across machines and devices" not in alone
