"""The benchmark's causal-LM mode end to end: a one-variant `quantbench run` of a tiny Llama and
the plain `model.generate` loop taking turns, and the report's table of their TTFT and decode
ratios."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def table_row(report: str, precision: str) -> dict[str, str]:
    """The fidelity table's row of the precision, by its header's column names."""
    rows = [line for line in report.splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in rows[0].strip("|").split("|")]
    (row,) = [line for line in rows if line.startswith(f"| {precision} |")]
    return dict(zip(header, (cell.strip() for cell in row.strip("|").split("|")), strict=True))


PINNED = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1073741824"


def test_the_causal_lm_mode_reports_ttft_and_decode_ratios(tmp_path, llama):
    out = tmp_path / "report.md"
    command = [sys.executable, str(REPO / "benchmarks" / "run.py"), "--model-dir", str(llama)]
    command += ["--precisions", "fp32", "--matches", "1", "--generations", "120"]
    command += ["--int4-group-size", "32", "--out", str(out)]
    command += ["--glibc-tunables", PINNED]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    report = out.read_text()
    assert "causal LM" in report and "1 match per precision" in report
    row = table_row(report, "fp32")
    for side in ("TTFT", "decode"):
        unit = "(ms)" if side == "TTFT" else "(tok/s)"
        ours, plain = float(row[f"{side} quantbench {unit}"]), float(row[f"{side} plain {unit}"])
        assert ours > 0 and plain > 0
        # Each ratio is quantbench's figure over the plain loop's; one match, so the median is it.
        ratio = float(row[f"{side} median ratio"])
        assert abs(ratio - ours / plain) < 0.01, (side, row)
        assert row[f"{side} target 0.90–1.10"] == ("ok" if 0.9 <= ratio <= 1.1 else "MISSED")
    assert int(row["plain generations compared"]) >= 3
    # Both sides ran with the allocator pinned, and each counted its page faults a step.
    assert f"glibc's allocator, both sides: `GLIBC_TUNABLES={PINNED}`" in report
    ours, plain = row["minor page faults a step, quantbench / plain"].split(" / ")
    assert int(ours.replace(",", "")) >= 0 and int(plain.replace(",", "")) >= 0
