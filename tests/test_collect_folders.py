"""Which results `quantbench collect` and `quantbench report` read, and a --baseline that names no
variant.

A user runs into results/ (`quantbench run`'s default), where the repository also ships its own
reference results under results/reference/. The user's results here are real (run_variant on the
tiny BERT, written with write_result as a run writes them); the reference folder is a copy of the
one the repository ships, plus the same tiny job as measured on the reference machine (host "vm"),
which is what merged into the user's table before: columns fp32-cpu and fp32-cpu@vm.
"""

from __future__ import annotations

import copy
import json
import shutil
import socket
from pathlib import Path

import pytest
from conftest import REPO, typed, variant_json
from test_collect_stats import make_task

from runner.cli import main
from runner.results import write_result

SHIPPED = REPO / "results" / "reference"


@pytest.fixture(scope="module")
def runs(tiny_model) -> list[dict]:
    results = [variant_json(make_task(tiny_model, p)) for p in ("fp32", "int8-dynamic")]
    assert [r["status"] for r in results] == ["ok", "ok"], [r.get("error") for r in results]
    return results


@pytest.fixture
def results_dir(runs, tmp_path) -> Path:
    """results/ after the user's run: their results in results/tiny/, the shipped ones in
    results/reference/."""
    folder = tmp_path / "results"
    for result in runs:
        write_result(folder, typed([result])[0])
    assert list(SHIPPED.rglob("*.json")), f"the repository ships reference results under {SHIPPED}"
    shutil.copytree(SHIPPED, folder / "reference")
    on_vm = copy.deepcopy(runs[0])
    on_vm["environment"] = {**on_vm["environment"], "host": "another-machine"}
    write_result(folder / "reference" / "cpu-2core-amd-epyc", typed([on_vm])[0])
    return folder


def collected(capsys, *args: str) -> tuple[int, list[dict], str]:
    code = main(["collect", *args, "--format", "json"])
    out, err = capsys.readouterr()
    return code, json.loads(out) if out else [], err


def test_collect_of_the_results_folder_shows_only_the_users_runs(results_dir, capsys):
    code, payload, err = collected(capsys, str(results_dir))
    assert code == 0
    assert [table["job"] for table in payload] == ["tiny"]
    assert set(payload[0]["variants"]) == {
        "fp32-cpu",
        "int8-dynamic-cpu",
    }  # no fp32-cpu@another-machine
    assert payload[0]["baseline"] == "fp32-cpu" and payload[0]["notes"] == []
    # One line says what was skipped and how to include it.
    reference = results_dir / "reference"
    lines = [line for line in err.splitlines() if "skipped" in line]
    assert len(lines) == 1
    assert f"skipped {reference} " in lines[0] and lines[0].endswith(
        f"quantbench collect {reference}"
    )


def test_collecting_the_reference_folder_by_its_path_includes_it(results_dir, capsys):
    machine = results_dir / "reference" / "cpu-2core-amd-epyc"
    code, payload, err = collected(capsys, str(machine))
    assert code == 0 and "skipped" not in err
    jobs = sorted(p.name for p in (SHIPPED / "cpu-2core-amd-epyc").iterdir() if p.is_dir())
    assert "demo" in jobs and [table["job"] for table in payload] == sorted([*jobs, "tiny"])
    shipped = {p.stem for p in (SHIPPED / "cpu-2core-amd-epyc" / "demo").glob("*.json")}
    assert set(payload[0]["variants"]) == shipped and "fp32-cpu" in shipped
    tiny = next(table for table in payload if table["job"] == "tiny")
    assert set(tiny["variants"]) == {"fp32-cpu"}

    # The whole reference folder, and results/ with it: each result once, nothing reported skipped.
    code, payload, err = collected(capsys, str(results_dir / "reference"))
    assert code == 0 and "skipped" not in err
    assert {"demo", "tiny"} <= {table["job"] for table in payload}
    code, payload, err = collected(capsys, str(results_dir), str(results_dir / "reference"))
    assert code == 0 and "skipped" not in err
    tiny = next(table for table in payload if table["job"] == "tiny")
    # The two hosts' fp32-cpu: the one whose host sorts second is named by its host.
    second = max(socket.gethostname(), "another-machine")
    assert set(tiny["variants"]) == {"fp32-cpu", "int8-dynamic-cpu", f"fp32-cpu@{second}"}


def test_report_of_the_results_folder_shows_only_the_users_runs(results_dir, capsys):
    out = results_dir / "report.html"
    assert main(["report", str(results_dir), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert (
        f"skipped {results_dir / 'reference'} " in err
        and f"quantbench report {results_dir / 'reference'}" in err
    )
    page = out.read_text(encoding="utf-8")
    assert (
        "<h2>tiny</h2>" in page
        and "<h2>demo</h2>" not in page
        and "fp32-cpu@another-machine" not in page
    )
    assert "<p>2 results," in page


def test_a_baseline_that_names_no_variant_exits_2_and_lists_the_variants(results_dir, capsys):
    code, payload, err = collected(capsys, str(results_dir), "--baseline", "nope")
    assert code == 2 and payload == []
    assert "--baseline: found 'nope'; allowed: fp32-cpu, int8-dynamic-cpu" in err

    out = results_dir / "nope.html"
    assert main(["report", str(results_dir), "--out", str(out), "--baseline", "nope"]) == 2
    assert (
        "--baseline: found 'nope'; allowed: fp32-cpu, int8-dynamic-cpu" in capsys.readouterr().err
    )
    assert not out.exists()

    # Several jobs: the variants of each.
    code, _, err = collected(
        capsys, str(results_dir / "reference" / "cpu-2core-amd-epyc"), "--baseline", "fp32"
    )
    assert (
        code == 2
        and "found 'fp32'; allowed: for demo: fp32-cpu, " in err
        and "; for tiny: fp32-cpu" in err
    )

    # A variant that exists is taken.
    code, payload, _ = collected(capsys, str(results_dir), "--baseline", "int8-dynamic-cpu")
    assert code == 0 and payload[0]["baseline"] == "int8-dynamic-cpu"
    assert set(payload[0]["variants"]["fp32-cpu"]["deltas"]) >= {
        "size (MiB)",
        "latency median (ms)",
    }
