"""The sensitivity study in `quantbench report`: its figure, ranking table and recipe.

The variants' results are real (run_variant on the tiny BERT: FP32 and dynamic INT8); the mixed
variant is the INT8 result renamed, two layers kept in FP32, larger and slower, as a mixed model
would be. The study is synthetic but shaped as runner/study/ranking.py writes it: one group per
linear layer of the tiny BERT, with the INT8 result's own weight and output SQNR per layer, and
flips that fall as SQNR rises (with one pair swapped, so the correlation is not perfect).
"""

from __future__ import annotations

import copy
import html
import io
import math
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli, typed, variant_json
from matplotlib.image import imread
from scipy.stats import spearmanr
from test_collect_stats import make_task

from runner import collect
from runner.cli import main
from runner.results import study_path, write_json, write_result
from runner.study import report as report_study
from runner.tasks.classification import plots as classifier_plots

MIXED = "int8-dynamic-mixed-cpu"
SAMPLES = 40  # make_task's evaluation sample
FAILED_ERROR = "bnb-nf4 needs CUDA: no GPU on this host"


@pytest.fixture(scope="module")
def results(tiny_model) -> list[dict]:
    runs = [variant_json(make_task(tiny_model, p)) for p in ("fp32", "int8-dynamic")]
    assert [r["status"] for r in runs] == ["ok", "ok"], [r.get("error") for r in runs]
    return runs


def measure(flips: int, kept: int = 0, kl: float = 0.01) -> dict:
    agreement = 1 - flips / SAMPLES
    return {
        "kept": kept,
        "accuracy": 0.55 - flips / SAMPLES / 2,
        "accuracy_fp32": 0.55,
        "agreement": agreement,
        "mean_kl": kl,
        "flips": flips,
        "bootstrap_accuracy_delta": {"delta": -flips / SAMPLES / 2, "ci_low": -0.1, "ci_high": 0},
        "mcnemar": {"b": flips, "c": 0, "p_value": 0.5},
    }


def ranked(groups: list[tuple[str, float | None, float | None, int]]) -> list[dict]:
    """(group, weight SQNR, output SQNR, flips with only it quantized), most harmful first."""
    ordered = sorted(groups, key=lambda g: (-g[3], g[0]))
    return [
        {
            "rank": i + 1,
            "group": group,
            "layers": [group],
            "only": measure(flips, kl=flips / 1000),
            "all_but": measure(max(0, 10 - flips)),
            "weight_sqnr_db": weight,
            "output_sqnr_db": output,
        }
        for i, (group, weight, output, flips) in enumerate(ordered)
    ]


def make_study(job: str, layers: list[dict]) -> dict:
    """A study of int8-dynamic-cpu over the result's layers: the lower a layer's weight SQNR, the
    more flips, except the first two, swapped; the classifier has no output SQNR."""
    by_sqnr = sorted(layers, key=lambda row: row["sqnr_db"])
    flips = [12, 15, 7, 5, 4, 3, 3, 2, 1, 1, 0, 0, 0, 0][: len(by_sqnr)]
    groups = [
        (
            row["layer"],
            row["sqnr_db"],
            None if row["layer"] == "classifier" else row["output_sqnr_db"],
            n,
        )
        for row, n in zip(by_sqnr, flips)
    ]
    ranking = ranked(groups)
    kept = [entry["group"] for entry in ranking[:2]]
    return {
        "kind": "sensitivity-study",
        "schema_version": 1,
        "job": job,
        "status": "ok",
        "error": None,
        "spec_hash": "test",
        "sensitivity": {"precision": "int8-dynamic", "device": "cpu", "groups": "layer"},
        "variant": "int8-dynamic-cpu",
        "mixed_variant": MIXED,
        "samples": SAMPLES,
        "layers": len(layers),
        "full": measure(20, kl=0.05),
        "ranking": ranking,
        "recipe": {
            "kept": sorted(kept),
            "groups": kept,
            "result": measure(0, kept=2, kl=0.001),
            "met": True,
            "tolerance": {"min_agreement": 0.99, "max_accuracy_drop": None},
            "tried": [
                {"groups": 1, "kept": 1, "agreement": 0.95, "accuracy": 0.53, "mean_kl": 0.01},
                {"groups": 2, "kept": 2, "agreement": 1.0, "accuracy": 0.55, "mean_kl": 0.001},
            ],
        },
        "cost": {"measurements": 28, "tasks": 1, "pass_s": 0.1, "load_s": 0.2},
    }


def mixed_result(int8: dict, kept: list[str]) -> dict:
    mixed = copy.deepcopy(int8)
    mixed["variant"] = MIXED
    mixed["settings"] = {**mixed.get("settings", {}), "kept_in_fp32": kept}
    mixed["metrics"]["model_size_mib"] *= 1.5
    latency = mixed["metrics"]["latency_ms"]
    latency["median"] *= 1.2
    latency["median_ci95"] = [v * 1.2 for v in latency["median_ci95"]]
    return mixed


def as_job(result: dict, job: str) -> dict:
    moved = copy.deepcopy(result)
    moved["job"] = job
    return moved


@pytest.fixture(scope="module")
def studied(results, tmp_path_factory) -> dict:
    """Results of two jobs, tiny and other, each with a study, and a failed study of tiny; then
    `quantbench report` as a user runs it."""
    folder = tmp_path_factory.mktemp("results")
    study = make_study("tiny", results[1]["analysis"]["layers"])
    other = make_study("other", results[1]["analysis"]["layers"])
    other["ranking"][0]["group"] = "other.job.group"
    tiny_results = [*results, mixed_result(results[1], study["recipe"]["kept"])]
    for result in tiny_results + [as_job(r, "other") for r in results]:
        write_result(folder, typed([result])[0])
    write_json(study_path(folder, "tiny", "int8-dynamic-cpu"), study)
    write_json(study_path(folder, "other", "int8-dynamic-cpu"), other)
    failed = {
        "kind": "sensitivity-study",
        "schema_version": 1,
        "job": "tiny",
        "status": "failed",
        "error": FAILED_ERROR,
        "sensitivity": {"precision": "bnb-nf4", "device": "cpu", "groups": "layer"},
        "variant": "bnb-nf4-cpu",
        "mixed_variant": "bnb-nf4-mixed-cpu",
    }
    write_json(study_path(folder, "tiny", "bnb-nf4-cpu"), failed)
    return {"folder": folder, "study": study, "results": tiny_results}


@pytest.fixture(scope="module")
def page(studied) -> tuple[Path, dict[str, str]]:
    """(the HTML file, its text per job section) of `quantbench report`."""
    out = studied["folder"] / "paper" / "tiny.html"
    # main, not run_cli: run_cli needs capsys, which a module-scoped fixture cannot have.
    assert main(["report", str(studied["folder"]), "--out", str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    sections = {
        re.match(r"<h2>([^<]+)</h2>", part).group(1): part
        for part in re.split(r'<section id="[^"]+">', text)[1:]
    }
    return out, sections


def test_report_draws_the_study_figure_as_png_and_embeds_it(page):
    out, sections = page
    png = out.parent / "tiny_figures" / "tiny-sensitivity-int8-dynamic-cpu.png"
    assert png.exists() and imread(io.BytesIO(png.read_bytes()), format="png").shape[2] == 4
    assert (out.parent / "tiny_figures" / "other-sensitivity-int8-dynamic-cpu.png").exists()
    # The failed study draws nothing.
    assert not list(out.parent.glob("*_figures/*bnb-nf4*"))
    assert 'alt="tiny: sensitivity of int8-dynamic-cpu' in sections["tiny"]
    # The caption counts the groups the right panel leaves out.
    assert "1 group without output SQNR left out of the right panel." in sections["tiny"]
    assert "without weight SQNR" not in sections["tiny"]


def test_report_holds_the_ranking_table_top_ten_then_the_rest_counted(page, studied):
    _, sections = page
    ranking = studied["study"]["ranking"]
    tiny = sections["tiny"]
    first = ranking[0]
    assert first["only"]["flips"] == 15  # the study's most harmful group, by construction
    row = re.search(r'<table class="ranking">.*?<tbody><tr>(.*?)</tr>', tiny).group(1)
    assert row.startswith(f"<td>1</td><th>{first['group']}</th><td>1</td>")
    assert f"<td>{first['only']['agreement']:.4f}</td><td>15</td>" in row
    assert f"<td>{first['weight_sqnr_db']:.1f}</td>" in row
    table = re.search(r'<table class="ranking">.*?</table>', tiny).group(0)
    assert table.count("<tr>") == 1 + 10  # header and the top ten
    assert f"… and {len(ranking) - 10} more groups in sensitivity-int8-dynamic-cpu.json." in tiny


def test_report_states_the_recipe_and_compares_the_measured_mixed_variant(page, studied):
    _, sections = page
    study, tiny = studied["study"], sections["tiny"]
    kept = ", ".join(study["recipe"]["groups"])
    assert f"Kept in FP32: 2 groups (2 of {study['layers']} layers): {kept}." in tiny
    assert "Tolerance (agreement with FP32 ≥ 0.99): met." in tiny
    assert f"Predicted by the study for {MIXED}: agreement 1.0000, accuracy 0.5500" in tiny
    table = collect.build_tables(typed(studied["results"]))[0]
    mixed, full, fp32 = (table.results[k].metrics for k in (MIXED, "int8-dynamic-cpu", "fp32-cpu"))
    assert (
        f"Measured: {MIXED} accuracy {mixed.value('accuracy'):.4f}, median latency "
        f"{mixed.latency.median:.2f} ms, {mixed.model_size_mib:.1f} MiB; int8-dynamic-cpu "
        f"accuracy {full.value('accuracy'):.4f}, median latency {full.latency.median:.2f} ms, "
        f"{full.model_size_mib:.1f} MiB; fp32-cpu accuracy {fp32.value('accuracy'):.4f}"
    ) in tiny
    assert "kept other layers" not in tiny  # it ran the recipe's layers


def test_a_failed_study_is_one_notice_with_its_error(page):
    _, sections = page
    notice = (
        f"The sensitivity study of bnb-nf4-cpu failed: {FAILED_ERROR}. "
        "(sensitivity-bnb-nf4-cpu.json)"
    )
    assert f'<p class="failed">{notice}</p>' in sections["tiny"]
    assert "bnb-nf4-mixed-cpu" not in sections["tiny"]


def test_a_study_is_shown_in_its_own_job_only(page):
    _, sections = page
    assert set(sections) == {"other", "tiny"}
    assert "other.job.group" in sections["other"] and "other.job.group" not in sections["tiny"]
    assert "bnb-nf4-cpu failed" not in sections["other"]
    # Its mixed variant has no result in job other: said, not compared.
    said = html.escape(f"Measured: no ok result of {MIXED} in this job's results")
    assert said in sections["other"]
    assert sections["tiny"].count('">Sensitivity study: ') == 2


def test_report_command_counts_the_study_figure(studied, capsys, tmp_path):
    code, out, err = run_cli(capsys, "report", studied["folder"], "--out", tmp_path / "r.html")
    assert code == 0, err
    pngs = sorted(p.name for p in (tmp_path / "r_figures").glob("*sensitivity*.png"))
    assert pngs == [
        "other-sensitivity-int8-dynamic-cpu.png",
        "tiny-sensitivity-int8-dynamic-cpu.png",
    ]
    assert f"{len(list((tmp_path / 'r_figures').glob('*.png')))} figures also as PNG" in out


# ------------------------------------------------------------------------------------------------
# The figure and the correlation
# ------------------------------------------------------------------------------------------------


def test_spearman_matches_a_hand_computation_with_ties():
    # x ranks 1..5; y = 5 6 7 8 7 ranks 1 2 3.5 5 3.5 (the two 7s share ranks 3 and 4).
    # Deviations from the mean rank 3: x -2 -1 0 1 2, y -2 -1 .5 2 .5: Σxy = 8, Σx² = 10, Σy² = 9.5
    assert report_study.spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(
        8 / math.sqrt(95)
    )
    assert report_study.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1)
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 6, 40), rng.integers(0, 4, 40)  # many ties
    assert report_study.spearman(x, y) == pytest.approx(spearmanr(x, y).statistic)


def test_spearman_is_undefined_without_spread_or_points():
    assert report_study.spearman([1, 2, 3], [0, 0, 0]) is None
    assert report_study.spearman([1, 2], [2, 1]) is None
    with pytest.raises(ValueError, match="pairs"):
        report_study.spearman([1, 2, 3], [1, 2])


def small_study() -> dict:
    """Four groups: weight SQNR 10 20 30 40 dB, flips 5 5 1 0, so ρ is -4.5 / √22.5 by hand:
    x ranks 1 2 3 4, flips ranks 3.5 3.5 2 1; deviations x -1.5 -.5 .5 1.5, y 1 1 -.5 -1.5."""
    study = make_study("small", [])
    study["ranking"] = ranked(
        [
            ("bert.encoder.layer.0.attention.self.query", 10.0, None, 5),
            ("bert.encoder.layer.0.attention.self.key", 20.0, 25.0, 5),
            ("bert.encoder.layer.1.intermediate.dense", 30.0, 15.0, 1),
            ("classifier", 40.0, None, 0),
        ]
    )
    return study


def test_figure_panels_hold_the_groups_with_sqnr_and_their_correlation():
    figure = report_study.plot_sensitivity(small_study())
    weight, output = [ax for ax in figure.axes if ax.get_visible() and ax.get_xlabel()]
    assert weight.get_xlabel() == "weight SQNR (dB)" and output.get_xlabel() == "output SQNR (dB)"
    assert weight.get_title() == f"Spearman ρ = {-4.5 / math.sqrt(22.5):+.2f} (4 groups)"
    # Two groups have an output SQNR: too few for a correlation.
    assert output.get_title() == "Spearman ρ = undefined (2 groups)"
    points = sorted(tuple(map(float, xy)) for c in weight.collections for xy in c.get_offsets())
    assert points == [(10.0, 5.0), (20.0, 5.0), (30.0, 1.0), (40.0, 0.0)]
    assert output.get_shared_y_axes().joined(weight, output)
    labels = sorted(t.get_text() for t in weight.texts)
    assert labels == [
        "#1 …layer.0.attention.self.key",
        "#2 …layer.0.attention.self.query",
        "#3 …layer.1.intermediate.dense",
    ]
    assert weight.get_ylabel() == report_study.HARM_LABEL


def test_a_study_without_any_sqnr_draws_no_figure():
    study = small_study()
    for entry in study["ranking"]:
        entry["weight_sqnr_db"] = entry["output_sqnr_db"] = None
    assert report_study.plot_sensitivity(study) is None


def test_mixed_variant_is_a_labelled_point_of_accuracy_latency(studied):
    table = collect.build_tables(typed(studied["results"]))[0]
    figure = classifier_plots.plot_accuracy_latency(table)
    labels = {t.get_text().split("\n")[0]: t.xy for t in figure.axes[0].texts}
    mixed = table.results[MIXED].metrics
    assert labels[MIXED] == pytest.approx((mixed.latency.median, mixed.value("accuracy")))
    assert labels[MIXED] != labels["int8-dynamic-cpu"]
