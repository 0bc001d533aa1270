"""quantbench report on a causal-LM job: its table, the perplexity-vs-decode-speed plot and the
per-window NLL histogram, and none of a classifier's plots; a classification job beside it keeps
its own. The results are hand-made (tests/lm_results.py)."""

from __future__ import annotations

import html
import math
import re

import numpy as np
import pytest
from conftest import typed
from lm_results import three_variants
from matplotlib.image import imread
from test_collect_lm import classification_result

from runner import collect
from runner.cli import main
from runner.results import write_result
from runner.tasks.causal_lm import plots as report_causal_lm

pytestmark = pytest.mark.usefixtures("causal_lm_task")

CLASSIFIER_HEADINGS = ["Accuracy vs latency", "Reliability diagrams", "Confusion matrices"]
LM_HEADINGS = ["Perplexity vs decode speed", "Per-window NLL change against the baseline"]


def sections(page: str) -> dict[str, str]:
    """Each job's section of the page, by the job's name."""
    found = {}
    for part in re.split(r'<section id="[^"]+">', page)[1:]:
        job = part.split("<h2>", 1)[1].split("</h2>", 1)[0]
        found[html.unescape(job)] = part.split("</section>", 1)[0]
    return found


@pytest.fixture
def rendered(tmp_path) -> tuple[str, list]:
    folder = tmp_path / "results"
    classifier = [
        classification_result("fp32-cpu", ["negative", "positive", "negative", "positive"]),
        classification_result("int8-dynamic-cpu", ["negative", "positive", "positive", "positive"]),
    ]
    for result in three_variants() + classifier:
        write_result(folder, typed([result])[0])
    out = tmp_path / "report.html"
    assert main(["report", str(folder), "--out", str(out)]) == 0
    figures = sorted((tmp_path / "report_figures").glob("*.png"))
    return out.read_text(encoding="utf-8"), figures


def test_a_causal_lm_section_has_its_table_and_plots_and_no_classifier_plots(rendered):
    page, figures = rendered
    lm, classifier = sections(page)["tiny-lm"], sections(page)["tiny-cls"]
    for label in ("perplexity", "greedy agreement with baseline", "KL vs FP32 (nats/token)"):
        assert f"<th>{html.escape(label)}</th>" in lm
    for heading in LM_HEADINGS:
        assert f'">{heading}</h3>' in lm and f'">{heading}</h3>' not in classifier
    for heading in CLASSIFIER_HEADINGS:
        assert f'">{heading}</h3>' in classifier and f'">{heading}</h3>' not in lm
    names = [f.name for f in figures]
    assert "tiny-lm-perplexity-decode.png" in names and "tiny-lm-nll-delta.png" in names
    assert not [n for n in names if n.startswith("tiny-lm-") and "reliability" in n]
    for figure in figures:
        assert imread(figure).shape[0] > 100  # a real picture, decoded


def test_without_tolerances_the_hint_names_the_tasks_own(rendered):
    page, _ = rendered
    lm, classifier = sections(page)["tiny-lm"], sections(page)["tiny-cls"]
    assert "max_perplexity_increase" in lm and "max_accuracy_drop" not in lm
    assert "max_accuracy_drop, min_agreement, max_latency_ms" in classifier
    assert "max_perplexity_increase" not in classifier


def test_perplexity_decode_plot_puts_each_variant_at_its_speed_and_perplexity():
    tolerances = {"max_perplexity_increase": 0.05}
    (table,) = collect.build_tables(typed(three_variants(tolerances)))
    figure = report_causal_lm.plot_perplexity_decode(table)
    ax = figure.axes[0]
    drawn = sorted(
        tuple(point) for c in ax.collections for point in c.get_offsets() if len(c.get_offsets())
    )
    expected = sorted([(100.0, math.exp(2.0)), (180.0, math.exp(2.2)), (250.0, math.exp(2.025))])
    np.testing.assert_allclose(drawn, expected)
    (limit,) = ax.get_lines()
    assert limit.get_ydata()[0] == pytest.approx(math.exp(2.0) * 1.05)


def test_nll_histogram_holds_every_window_of_each_variant():
    (table,) = collect.build_tables(typed(three_variants()))
    figure = report_causal_lm.plot_nll_delta(table)
    titles = [ax.get_title() for ax in figure.axes if ax.get_visible()]
    assert titles == [
        "int8-dynamic-cpu\nmean +0.0667, 33% of windows worse",
        "bnb-nf4-cpu\nmean +0.2333, 100% of windows worse",
    ]
    counts = [sum(p.get_height() for p in ax.patches) for ax in figure.axes if ax.get_visible()]
    assert counts == [3, 3]


def test_a_log_axis_reads_in_plain_numbers():
    # The report draws with text.parse_math off (names are drawn as written), which printed
    # matplotlib's own log tick labels as raw formulas ($\mathdefault{10^{2}}$).
    from matplotlib import rc_context
    from matplotlib.figure import Figure

    from runner.report_figures import log_scale

    with rc_context({"text.parse_math": False}):
        figure = Figure()
        ax = figure.subplots()
        ax.scatter([17.8, 150.0, 497.0], [1, 2, 3])
        log_scale(ax, "x")
        figure.canvas.draw()
        shown = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    assert shown and not any("$" in text for text in shown), shown
    assert {"20", "50", "100", "200", "500"} <= set(shown)
