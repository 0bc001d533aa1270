"""`quantbench collect`'s text table fitted to a terminal, what it shows (--variants, --metrics),
and how its columns name the machine they ran on.

The inputs are the results the repository ships (results/reference/): a 2-core CPU's demo, whose
CUDA variants were skipped, and an H200's jobs; and copies of them as another machine's run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO

from runner import measure
from runner.cli import main

SHIPPED = REPO / "results" / "reference"
CPU, GPU = SHIPPED / "cpu-2core-amd-epyc", SHIPPED / "nvidia-h200"


def collect(capsys, *args) -> tuple[int, str, str]:
    code = main(["collect", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def as_json(capsys, *folders) -> list[dict]:
    code, out, _ = collect(capsys, *folders, "--format", "json")
    assert code == 0
    return json.loads(out)


def blocks(text: str) -> list[tuple[list[str], list[str]]]:
    """Each block of the text table: its column names and its row labels."""
    lines, found = text.splitlines(), []
    for i, line in enumerate(lines):
        if not line.startswith("metric "):
            continue
        rule = next(j for j in range(i, len(lines)) if lines[j].startswith("----"))
        label_width = len(lines[rule].split(" ")[0])
        names = " ".join(lines[i:rule]).split()[1:]  # a long name's @host sits on a line below
        end = next((j for j in range(rule, len(lines)) if not lines[j].strip()), len(lines))
        labels = [row[:label_width].strip() for row in lines[rule + 1 : end]]
        found.append((names, [label for label in labels if label]))  # "": a wrapped cell
    return found


@pytest.mark.parametrize("width", [80, 200])
def test_the_table_fits_the_width_with_every_variant_and_every_metric_in_each_block(width, capsys):
    tables = as_json(capsys, CPU, GPU)
    code, out, _ = collect(capsys, CPU, GPU, "--width", width)
    assert code == 0
    too_long = [line for line in out.splitlines() if len(line) > width]
    assert not too_long, too_long
    starts = [out.index(f"{table['job']} (baseline: ") for table in tables] + [len(out)]
    for table, start, end in zip(tables, starts, starts[1:]):
        ok = [key for key, v in table["variants"].items() if v["status"] == "ok"]
        machines = {table["variants"][key]["hardware"] for key in ok}
        # One machine is said once above the table; several get their row.
        metrics = ["hardware"] * (len(machines) > 1) + list(table["variants"][ok[0]]["metrics"])
        found = blocks(out[start:end])
        shown = {name for names, _ in found for name in names if name != "Δ"}
        assert shown == set(ok), table["job"]
        assert all(labels == metrics for _, labels in found), table["job"]
        if len(machines) == 1:
            assert f"hardware: {machines.pop()}" in out[start:end]
    cut = [line for line in out.splitlines() if "blocks to fit" in line]
    assert cut and all(line.endswith("the whole table: --format markdown|csv") for line in cut)


def test_the_terminals_width_decides_without_width(capsys, monkeypatch):
    outs = {}
    for columns in (80, 120, 200):
        monkeypatch.setenv("COLUMNS", str(columns))
        code, outs[columns], _ = collect(capsys, CPU, GPU)
        assert code == 0
        assert max(map(len, outs[columns].splitlines())) <= columns
    assert len(set(outs.values())) == 3
    assert len(blocks(outs[80])) > len(blocks(outs[120])) > len(blocks(outs[200]))


def test_skipped_variants_are_listed_under_the_table_not_shown_as_columns(capsys):
    code, out, _ = collect(capsys, CPU / "demo", "--width", 120)
    assert code == 0
    names = {name for block, _ in blocks(out) for name in block}
    assert "fp16-cuda" not in names and "bnb-nf4-cpu" in names
    last_block = out.rindex("compile (s)")
    listed = out.index("  fp16-cuda: skipped: no node in the cluster can run cuda variants")
    assert listed > last_block
    assert "cut into 3 blocks to fit 120 columns; the whole table: --format markdown|csv" in out


def test_a_table_that_fits_is_one_block_without_the_pointer_to_markdown(capsys):
    code, out, _ = collect(capsys, CPU / "demo", "--width", 400)
    assert code == 0
    assert len(blocks(out)) == 1 and "--format markdown" not in out


def test_variants_and_metrics_choose_what_is_shown(capsys):
    code, out, _ = collect(
        capsys, CPU, "--variants", "int8-dynamic-cpu", "--metrics", "accuracy,latency med"
    )
    assert code == 0
    # Both jobs with that variant, each in one block with its baseline.
    assert "demo (baseline: " in out and "demo-sensitivity (baseline: " in out
    for names, labels in blocks(out):
        assert names == ["fp32-cpu", "int8-dynamic-cpu", "Δ"]
        assert labels == ["accuracy", "latency median (ms)"]
    assert "\nhardware: AMD EPYC x2 threads @ vm\n" in out  # one machine: said once, above
    # The other formats show the same choice.
    code, out, _ = collect(capsys, CPU / "demo", "--metrics", "macro-f1", "--format", "json")
    assert list(json.loads(out)[0]["variants"]["fp32-cpu"]["metrics"]) == ["macro-F1"]


@pytest.mark.parametrize(
    "option, value, said",
    [
        ("--variants", "int9-cpu", "--variants: found 'int9-cpu'; allowed: fp32-cpu, fp16-cpu"),
        ("--metrics", "speed", "--metrics: found 'speed'; allowed: size (MiB); accuracy"),
        ("--metrics", "latency", "--metrics: 'latency' starts 5 rows; allowed: latency mean (ms)"),
    ],
)
def test_an_unknown_choice_exits_2_naming_what_is_allowed(option, value, said, capsys):
    code, out, err = collect(capsys, CPU / "demo", option, value)
    assert code == 2 and not out
    assert err.startswith(f"quantbench collect: {said}"), err


def test_a_width_too_narrow_for_any_column_is_refused(capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["collect", str(CPU), "--width", "12"])
    assert stopped.value.code == 2
    assert "expected a number of columns, 40 or more; found '12'" in capsys.readouterr().err


def test_a_negative_kl_within_rounding_prints_as_0(capsys):
    # The H200's fp16 Qwen2.5-0.5B: mean KL against FP32 measured as -8.81e-09 nats per token.
    folder = GPU / "llama-0.5b-inline"
    kl = as_json(capsys, folder)[0]["variants"]["fp16-cuda"]["metrics"]["KL vs FP32 (nats/token)"]
    assert -1e-8 < kl < 0  # the JSON keeps the number as measured
    code, out, _ = collect(capsys, folder, "--metrics", "KL", "--width", 400)
    row = next(line for line in out.splitlines() if line.startswith("KL vs FP32"))
    assert row.split()[4:6] == ["0", "0"] and "e-09" not in row, row  # fp32-cuda's, fp16-cuda's


# ------------------------------------------------------------------------------------------------
# The machine a column ran on


def test_the_hardware_label_names_the_cpus_kernel_isa_or_the_gpus_compute_capability():
    cpu = {"model": "AMD EPYC", "logical_cpus": 2}
    new = {"cpu": cpu, "torch_threads": 2, "cpu_capability": "AVX512"}
    assert measure.hardware_label(new, "cpu") == "AMD EPYC (AVX512) x2 threads"
    old = {"cpu": cpu, "torch_threads": 2}  # a result from before the key: labelled as then
    assert measure.hardware_label(old, "cpu") == "AMD EPYC x2 threads"
    gpu = {**new, "gpu": {"name": "NVIDIA H200", "compute_capability": "9.0"}}
    assert measure.hardware_label(gpu, "cuda") == "NVIDIA H200 (cc 9.0)"
    assert measure.hardware_label(gpu, "cpu") == "AMD EPYC (AVX512) x2 threads"


def copy_as_run_on(source: Path, folder: Path, host: str, machine: str | None = None) -> None:
    """The job's results as if run on another machine: its ok results name that machine."""
    for file in source.glob("*.json"):
        result = json.loads(file.read_text())
        if result["environment"]:
            result["environment"].update(host=host, machine=machine)
        (folder / source.name).mkdir(parents=True, exist_ok=True)
        (folder / source.name / file.name).write_text(json.dumps(result))


def test_the_columns_of_one_folder_are_named_alike_whatever_their_status(tmp_path, capsys):
    copy_as_run_on(CPU / "demo", tmp_path / "laptop-run", "laptop")
    variants = as_json(capsys, CPU, tmp_path / "laptop-run")[0]["variants"]
    # Each variant twice: the "laptop" folder's first (its name sorts first), bare; the shipped
    # folder's, ok or skipped, all named by the machine its results ran on.
    assert len(variants) == 18
    named = [key for key in variants if "@" in key]
    assert len(named) == 9 and all(key.endswith("@vm") for key in named), named
    statuses = {variants[key]["status"] for key in named}
    assert statuses == {"ok", "skipped"}


def test_the_machines_label_names_its_columns_in_place_of_the_host(tmp_path, capsys, monkeypatch):
    copy_as_run_on(CPU / "demo", tmp_path / "run", "vm", machine="epyc-avx2")
    variants = as_json(capsys, CPU, tmp_path / "run")[0]["variants"]
    assert "int8-dynamic-cpu@vm" in variants  # the shipped folder: its host, as before
    ours = variants["fp32-cpu"]  # "epyc-avx2" sorts before "vm": the bare name is ours
    assert ours["hardware"] == "AMD EPYC x2 threads @ epyc-avx2"
    assert "fp16-cuda" in variants and "fp16-cuda@vm" in variants
