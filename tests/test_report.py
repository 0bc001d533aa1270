"""quantbench report: one self-contained HTML file with the table, the plots and the verdict, PNGs
beside it.

The results are real: run_variant on the tiny BERT for FP32, dynamic INT8 and bitsandbytes NF4 (each
with the worker's per-layer analysis) and a CUDA variant that fails on this machine. A headless
Chromium opens the file, offline, and reports whether every image decoded.
"""

from __future__ import annotations

import base64
import copy
import html
import io
import json
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from conftest import REPO, typed, variant_json
from matplotlib import rc_context
from matplotlib.collections import PathCollection
from matplotlib.image import imread
from matplotlib.text import Text
from test_collect_stats import make_task

from runner import collect, report
from runner.cli import main
from runner.report_figures import Box, place_labels
from runner.results import write_result
from runner.tasks.classification.plots import plot_accuracy_latency

CHROMIUM = Path("/usr/bin/chromium")
SHIPPED = REPO / "results" / "reference"
IMG = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)" alt="([^"]*)">')


@pytest.fixture(scope="module")
def results(tiny_model) -> list[dict]:
    runs = [
        variant_json(
            make_task(tiny_model, p, d, tolerances={"max_accuracy_drop": 0.05, "max_size_mib": 1e3})
        )
        for p, d in (("fp32", "cpu"), ("int8-dynamic", "cpu"), ("bnb-nf4", "cpu"), ("fp16", "cuda"))
    ]
    assert [r["status"] for r in runs] == ["ok", "ok", "ok", "failed"], [
        r.get("error") for r in runs
    ]
    return runs


@pytest.fixture(scope="module")
def rendered(results, tmp_path_factory) -> tuple[Path, str]:
    """The report as a user makes it: results written to a folder, then `quantbench report`."""
    folder = tmp_path_factory.mktemp("results")
    for result in results:
        write_result(folder, typed([result])[0])
    out = folder / "paper" / "tiny.html"
    assert main(["report", str(folder), "--out", str(out)]) == 0
    return out, out.read_text(encoding="utf-8")


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_report_embeds_every_figure_and_writes_the_same_pngs_beside_it(rendered):
    out, page = rendered
    pngs = sorted((out.parent / "tiny_figures").glob("*.png"))
    names = {p.stem for p in pngs}
    assert names == {
        "tiny-accuracy-latency",
        "tiny-sqnr-by-depth",
        "tiny-output-vs-weight-sqnr",
        "tiny-output-sqnr-by-depth",
        "tiny-output-sqnr-vs-outliers",
        "tiny-reliability",
        "tiny-confusion",
        "tiny-histograms-int8-dynamic-cpu",
        "tiny-histograms-bnb-nf4-cpu",
    }
    embedded = [base64.b64decode(data) for data, _ in IMG.findall(page)]
    assert len(embedded) == page.count("<img") == len(pngs)
    assert sorted(embedded) == sorted(p.read_bytes() for p in pngs)
    assert all(min(png_size(data)) > 200 for data in embedded)
    for data in (
        embedded
    ):  # decodes to the end: a browser would show a cut-short PNG half drawn, not broken
        assert imread(io.BytesIO(data), format="png").shape[2] == 4


def test_report_opens_offline(rendered):
    _, page = rendered
    # Nothing to fetch: no links, no external scripts or styles, no URLs at all outside the data
    # URIs.
    without_data = IMG.sub("", page)
    assert not re.search(r"(https?:|//[a-z0-9]|<link|<script|@import|url\()", without_data, re.I)


def test_report_holds_the_table_the_verdict_and_the_details(rendered, results):
    _, page = rendered
    table = collect.build_tables(typed(results))[0]
    header, rows, _ = collect.table_rows(table)
    assert '<table class="metrics">' in page
    assert "".join(f"<th>{html.escape(h)}</th>" for h in header) in page
    for label in (
        "accuracy",
        "flip rate",
        "KL vs baseline (nats)",
        "ECE",
        "McNemar p",
        "latency median (ms)",
    ):
        assert f"<th>{html.escape(label)}</th>" in page
    # The tiny BERT predicts one class: the verdict cannot judge it, and says why.
    assert html.escape(collect.verdict_lines(table)[-1]) in page and table.best is None
    assert "<b>fp32-cpu</b>: cannot judge: predicts" in page
    assert "<b>fp16-cuda</b>: no verdict (failed)" in page
    # Each quantized variant's layer types, weight and output SQNR side by side.
    assert page.count("<th>output SQNR mean (dB)</th>") == 2  # int8-dynamic and bnb-nf4
    summary = results[1]["analysis"]["summary"]["by_layer_type"][0]
    assert f"<td>{summary['mean_output_sqnr_db']:.1f}</td>" in page
    # Per-class scores of every ok variant, and the SQNR picture's caption explains the unit.
    assert page.count("<th>precision</th><th>recall</th><th>F1</th>") == 3
    assert "10·log10(Σw² / Σ(w − w_q)²)" in page


def test_sqnr_plot_draws_every_changed_layer_of_each_precision(results):
    table = collect.build_tables(typed(results))[0]
    figure = report.plot_sqnr_by_depth(table)
    panels = [ax for ax in figure.axes if ax.get_visible() and ax.get_title()]
    # FP32 is unchanged (no SQNR) and the CUDA variant failed: one panel per quantized precision.
    assert [ax.get_title().split(" ")[0] for ax in panels] == ["int8-dynamic-cpu", "bnb-nf4-cpu"]
    for ax, key in zip(panels, ["int8-dynamic-cpu", "bnb-nf4-cpu"]):
        drawn = sorted(float(y) for c in ax.collections for _, y in c.get_offsets())
        expected = sorted(row["sqnr_db"] for row in table.results[key].analysis["layers"])
        assert drawn == pytest.approx(expected)
    means = {
        ax.get_title().split(" ")[0]: float(ax.get_title().split("mean ")[1].split(" dB")[0])
        for ax in panels
    }
    assert (
        means["int8-dynamic-cpu"] > means["bnb-nf4-cpu"]
    )  # 8 bits keep more of the weights than 4


def test_output_sqnr_plot_draws_each_layer_type_along_the_stack(results):
    table = collect.build_tables(typed(results))[0]
    figure = report.plot_output_sqnr_by_depth(table)
    panels = [ax for ax in figure.axes if ax.get_visible() and ax.get_title()]
    assert [ax.get_title().split(" ")[0] for ax in panels] == ["int8-dynamic-cpu", "bnb-nf4-cpu"]
    rows = table.results["int8-dynamic-cpu"].analysis["layers"]
    lines = {line.get_label(): line for line in panels[0].get_lines()}
    query = sorted((r["depth"], r["output_sqnr_db"]) for r in rows if r["layer_type"] == "query")
    assert list(zip(lines["query"].get_xdata(), lines["query"].get_ydata())) == query
    lowest = min(r["output_sqnr_db"] for r in rows)
    assert panels[0].get_title() == f"int8-dynamic-cpu (lowest {lowest:.1f} dB)"


@pytest.fixture(scope="module")
def planted_results(tmp_path_factory) -> list[dict]:
    """FP32 and int8-dynamic of a tiny BERT with one planted input outlier column."""
    from conftest import build_tiny_bert
    from test_analysis import PLANTED, _plant_input_outlier
    from transformers import AutoModelForSequenceClassification

    folder = build_tiny_bert(tmp_path_factory.mktemp("planted"), ["negative", "positive"])
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    _plant_input_outlier(model)
    model.save_pretrained(folder)
    runs = [variant_json(make_task(folder, p, "cpu")) for p in ("fp32", "int8-dynamic")]
    assert [r["status"] for r in runs] == ["ok", "ok"], [r.get("error") for r in runs]
    assert report.worst_layers(runs[1]["analysis"])[0]["layer"] == PLANTED
    return runs


def test_a_planted_outlier_column_is_the_worst_layer_named_in_figure_and_table(
    planted_results, tmp_path
):
    from test_analysis import PLANTED, PLANTED_COLUMN

    table = collect.build_tables(typed(planted_results))[0]
    figure = report.plot_output_sqnr_against_outliers(table)
    ratio_ax, rounding_ax = [ax for ax in figure.axes if ax.get_visible() and ax.get_title()]
    rows = table.results["int8-dynamic-cpu"].analysis["layers"]
    planted = next(r for r in rows if r["layer"] == PLANTED)
    for ax, field in ((ratio_ax, "input_outlier_ratio"), (rounding_ax, "input_rounding_sqnr_db")):
        drawn = sorted(tuple(map(float, xy)) for c in ax.collections for xy in c.get_offsets())
        assert drawn == sorted((r[field], r["output_sqnr_db"]) for r in rows)
        labels = [t.get_text() for t in ax.texts]
        assert labels[0] == "output 1" and len(labels) == report.WORST_LAYERS
    # The planted layer's input sticks out most, its rounding alone costs most, and its output
    # suffers most: both panels rank it as the input explains it.
    assert planted["output_sqnr_db"] == min(r["output_sqnr_db"] for r in rows)
    assert planted["input_outlier_ratio"] == max(r["input_outlier_ratio"] for r in rows)
    assert planted["input_rounding_sqnr_db"] == min(r["input_rounding_sqnr_db"] for r in rows)
    assert float(ratio_ax.get_title().split("ρ ")[1].rstrip(")")) < 0
    assert float(rounding_ax.get_title().split("ρ ")[1].rstrip(")")) > 0
    page = report.write_report(typed(planted_results), tmp_path / "p.html").path.read_text()
    worst = page.split('<table class="worst-layers">', 1)[1].split("</table>", 1)[0]
    first = worst.split("<tbody>", 1)[1].split("</tr>", 1)[0]
    assert f"<th>{PLANTED}</th>" in first
    assert f"<td>{planted['input_outlier_ratio']:.1f}</td><td>1</td><td>{PLANTED_COLUMN}, " in first
    assert (
        f"<td>{planted['output_sqnr_db']:.1f}</td><td>{planted['input_rounding_sqnr_db']:.1f}</td>"
        in first
    )


def test_results_without_input_outliers_draw_the_rest(results, tmp_path):
    old = copy.deepcopy(results)
    for result in old:  # as written before the layers' inputs were described
        for row in (result.get("analysis") or {}).get("layers") or []:
            for key in ("input_absmax", "input_outlier_ratio", "input_outlier_columns"):
                row.pop(key)
            row.pop("input_top_columns"), row.pop("input_rounding_sqnr_db")
    rendered = report.write_report(typed(old), tmp_path / "old.html")
    page = rendered.path.read_text(encoding="utf-8")
    assert "no per-layer input outliers in these results" in page
    assert "tiny-output-sqnr-by-depth" in {p.stem for p in rendered.figures}
    assert "tiny-output-sqnr-vs-outliers" not in {p.stem for p in rendered.figures}
    assert page.count('<table class="worst-layers">') == 2  # the columns read "–"


def test_histogram_plot_draws_the_grid_of_the_precision(results):
    table = collect.build_tables(typed(results))[0]
    nf4 = report.plot_weight_histograms(table, "bnb-nf4-cpu")
    query = next(ax for ax in nf4.axes if ax.get_title().startswith("query"))
    grid = table.results["bnb-nf4-cpu"].analysis["grids"]["query"]
    hist = table.results["bnb-nf4-cpu"].analysis["histograms"]["by_layer_type"]["query"]
    inside = [v for v in grid["values"] if hist["min"] <= v <= hist["max"]]
    ticks = sorted(float(segment[0][0]) for c in query.collections for segment in c.get_segments())
    assert ticks == pytest.approx(sorted(inside)) and len(grid["values"]) == 16
    # FP32 has no grid: its histograms are drawn plain.
    fp32 = report.plot_weight_histograms(table, "fp32-cpu")
    assert not any(
        c.get_segments() for ax in fp32.axes for c in ax.collections if hasattr(c, "get_segments")
    )


def test_results_without_analysis_still_make_a_report(results, tmp_path):
    old = copy.deepcopy(results)
    for result in old:  # as written before the per-layer analysis existed
        result.pop("analysis", None)
    rendered = report.write_report(typed(old), tmp_path / "old.html")
    page = rendered.path.read_text(encoding="utf-8")
    assert "no per-layer weight analysis in these results" in page
    assert "no weight histograms in these results" in page
    assert {p.stem for p in rendered.figures} == {
        "tiny-accuracy-latency",
        "tiny-reliability",
        "tiny-confusion",
    }
    assert page.count("<img") == 3


def test_report_command_without_results_exits_2(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no result files" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_contents_lists_every_job_and_part_and_each_link_lands_on_it(rendered):
    _, page = rendered
    contents = page.split('<nav class="contents">', 1)[1].split("</nav>", 1)[0]
    links = re.findall(r'<a href="#([^"]+)">', contents)
    ids = re.findall(r' id="([^"]+)"', page)
    assert len(ids) == len(set(ids)) and set(links) <= set(ids)
    # The job, then each part of its section, in the order the page shows them.
    section = page.split('<section id="tiny">', 1)[1]
    headings = re.findall(r'<h3 id="([^"]+)">', section)
    assert links == ["tiny", "tiny-table", "tiny-verdict", *headings[1:]]
    assert links[-1] == "tiny-details" and "tiny-sqnr-by-depth" in links


def test_the_table_scrolls_in_its_own_box_with_its_first_column_fixed(rendered):
    _, page = rendered
    assert '<div class="scroll" id="tiny-table"><table class="metrics">' in page
    css = re.search(r"<style>(.*?)</style>", page, re.S).group(1)
    assert re.search(r"table\.metrics th:first-child \{[^}]*position: sticky; left: 0", css)
    assert re.search(r"\.scroll \{[^}]*overflow: auto", css)


def test_the_job_of_the_folder_named_first_comes_first(tmp_path):
    # Two jobs in two folders; by name, bench-bert-base would always come first.
    shipped = SHIPPED / "nvidia-h200"
    shutil.copytree(shipped / "benchmark-bert-base-cuda", tmp_path / "a" / "bench-bert-base")
    shutil.copytree(shipped / "llama-0.5b-inline", tmp_path / "b" / "llama-0.5b-inline")
    by_name = ["bench-bert-base", "llama-0.5b-inline"]
    for folders, jobs in (("ab", by_name), ("ba", by_name[::-1])):
        out = tmp_path / f"{folders}.html"
        assert main(["report", *(str(tmp_path / f) for f in folders), "--out", str(out)]) == 0
        assert re.findall(r'<section id="[^"]+"><h2>([^<]+)</h2>', out.read_text()) == jobs


def overlapping(boxes: list[Box]) -> list[tuple[int, int]]:
    return [
        (i, j)
        for i, a in enumerate(boxes)
        for j, b in enumerate(boxes)
        if i < j and a.overlap(b) > 0
    ]


def test_labels_of_points_that_coincide_do_not_overlap():
    # fp16-cuda and bf16-cuda ran at the same latency and accuracy: one point, three labels.
    anchors = [(300.0, 200.0)] * 3 + [(310.0, 205.0)]
    sizes = [(90.0, 24.0), (90.0, 24.0), (120.0, 24.0), (90.0, 24.0)]
    bounds = Box(0, 0, 800, 500)
    places = place_labels(anchors, sizes, [15.0, 15.0, 25.0, 10.0], bounds)
    boxes = [
        Box(x + dx, y + dy, x + dx + w, y + dy + h)
        for (x, y), (w, h), ((dx, dy), _) in zip(anchors, sizes, places)
    ]
    assert overlapping(boxes) == []
    assert all(box.outside(bounds) == 0 for box in boxes)
    # Each stays near its point: within a few label heights.
    assert all(abs(box.x0 - 300) < 250 and abs(box.y0 - 200) < 150 for box in boxes)


def shipped_table(*folders: Path) -> collect.JobTable:
    results, _, _ = collect.gather(list(folders))
    (table,) = collect.build_tables(results)
    return table


def drawn_labels(figure) -> list[Box]:
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    texts = [t for t in figure.axes[0].texts if "MiB" in t.get_text()]
    # The text's own box: an Annotation's would take in the line to its point.
    extents = [Text.get_window_extent(t, renderer) for t in texts]
    return [Box(e.x0, e.y0, e.x1, e.y1) for e in extents]


def test_accuracy_latency_labels_do_not_overlap_on_the_shipped_gpu_results():
    table = shipped_table(SHIPPED / "nvidia-h200" / "benchmark-bert-base-cuda")
    points = {k: table.results[k].metrics.latency.median for k in ("fp16-cuda", "bf16-cuda")}
    assert abs(points["fp16-cuda"] - points["bf16-cuda"]) < 1  # ms: the two points touch
    with rc_context({"text.parse_math": False}):
        boxes = drawn_labels(plot_accuracy_latency(table))
    assert len(boxes) == 5 and overlapping(boxes) == []


def test_each_machine_has_its_marker_and_a_legend_entry(tmp_path):
    # The demo from two machines that name themselves alike ("AMD EPYC x2 threads @ vm"): the
    # results folder tells them apart, as in the table's column keys.
    shutil.copytree(SHIPPED / "cpu-2core-amd-epyc" / "demo", tmp_path / "avx512" / "demo")
    table = shipped_table(SHIPPED / "cpu-2core-amd-epyc" / "demo", tmp_path / "avx512" / "demo")
    with rc_context({"text.parse_math": False}):
        figure = plot_accuracy_latency(table)
        one = plot_accuracy_latency(shipped_table(SHIPPED / "cpu-2core-amd-epyc" / "demo"))
    (legend,) = figure.legends
    # In the table's column order, which sorts a variant's columns by their folders' names.
    assert [t.get_text() for t in legend.get_texts()] == [
        "AMD EPYC x2 threads @ vm (avx512)",
        "AMD EPYC x2 threads @ vm (cpu-2core-amd-epyc)",
    ]
    points = [c for c in figure.axes[0].collections if isinstance(c, PathCollection)]
    shapes = {len(c.get_paths()[0].vertices) for c in points if len(c.get_offsets())}
    assert len(shapes) == 2  # a circle and a square
    assert len(drawn_labels(figure)) == 12 and overlapping(drawn_labels(figure)) == []
    assert [t.get_text() for t in one.legends[0].get_texts()] == ["AMD EPYC x2 threads @ vm"]


# ------------------------------------------------------------------------------------------------
# In a real browser
# ------------------------------------------------------------------------------------------------

# Runs on the load event, when every image has loaded or failed: records what the page holds into
# the DOM,
# which --dump-dom then prints.
CHECK = """<script>
window.addEventListener('load', () => {
  const images = Array.from(document.images);
  const found = {
    images: images.length,
    broken: images.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt),
    external: performance.getEntriesByType('resource').map(e => e.name)
      .concat(Array.from(document.querySelectorAll('[src], [href]'),
                         e => e.getAttribute('src') || e.getAttribute('href')))
      .filter(url => !url.startsWith('data:') && !url.startsWith('#')),
    metric_tables: document.querySelectorAll('table.metrics').length,
    metric_rows: document.querySelectorAll('table.metrics tbody tr').length,
    links: document.querySelectorAll('nav.contents a').length,
    unresolved: Array.from(document.querySelectorAll('a[href^="#"]'), a => a.hash.slice(1))
      .filter(id => !document.getElementById(id)),
    first_column: getComputedStyle(document.querySelector('table.metrics tbody th')).position,
  };
  const pre = document.createElement('pre');
  pre.id = 'qb-check';
  pre.textContent = JSON.stringify(found);
  document.body.appendChild(pre);
});
</script>"""


def browser_check(page: str, folder: Path) -> dict:
    folder.mkdir(exist_ok=True)
    checked = folder / "checked.html"
    checked.write_text(page.replace("</body>", CHECK + "</body>"), encoding="utf-8")
    profile = folder / "profile"
    done = subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--dump-dom",
            checked.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    found = re.search(r'<pre id="qb-check">(.*?)</pre>', done.stdout, re.S)
    assert found, f"chromium printed no check (exit {done.returncode}): {done.stderr[-2000:]}"
    return json.loads(html.unescape(found.group(1)))


@pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="needs Debian's chromium at /usr/bin/chromium (apt-get install -y chromium)",
)
def test_chromium_loads_every_image_and_the_table(rendered, results, tmp_path):
    out, page = rendered
    found = browser_check(page, tmp_path)
    header, rows, _ = collect.table_rows(collect.build_tables(typed(results))[0])
    figures = len(list((out.parent / "tiny_figures").glob("*.png")))
    assert figures == 9  # the names are checked in the test above
    assert found == {
        "images": figures,
        "broken": [],
        "external": [],
        "metric_tables": 1,
        "metric_rows": len(rows),
        "links": page.split("</nav>")[0].count("<a href="),
        "unresolved": [],
        "first_column": "sticky",
    }

    # The check does see broken images: data that is no PNG, and a file that is not there (which
    # would also
    # be a load from outside the page).
    (garbage, garbage_alt), (missing, missing_alt) = IMG.findall(page)[1:3]
    broken = page.replace(garbage, base64.b64encode(b"not a png").decode(), 1).replace(
        f"data:image/png;base64,{missing}", "missing.png", 1
    )
    found = browser_check(broken, tmp_path / "broken")
    assert found["broken"] == [html.unescape(garbage_alt), html.unescape(missing_alt)]
    assert [Path(url).name for url in found["external"]] == ["missing.png"]
