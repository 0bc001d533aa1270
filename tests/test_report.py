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
import struct
import subprocess
from pathlib import Path

import pytest
from conftest import typed, variant_json
from matplotlib.image import imread
from test_collect_stats import make_task

from runner import collect, report
from runner.cli import main
from runner.results import write_result

CHROMIUM = Path("/usr/bin/chromium")
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
    assert figures == 7  # the names are checked in the test above
    assert found == {
        "images": figures,
        "broken": [],
        "external": [],
        "metric_tables": 1,
        "metric_rows": len(rows),
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
