"""Peak resident memory of each CPU precision on a real LM, phase by phase, against the bound of
issue 35: peak RSS <= 1.5 x the FP32 model's size + 400 MiB, for the whole process.

    python benchmarks/memory.py [--model smollm2|gemma] [--precisions P ...] [--machine NAME]

--precisions picks the precisions to run; FP32 always runs too, since its size sets the bound.

Runs a one-batch job of the model (jobs/demo-lm.yaml's SmolLM2-135M or jobs/gemma3-270m.yaml's
Gemma-3-270M, both from their GGUF packages) with every CPU precision, the calibrated ones too:
8 sentences, one batch, KL top-32 from the job's stored FP32 reference, the weight analysis,
8 generated tokens, one warm-up and one timed pass, no lm-eval benchmarks. Memory needs no quiet
machine: the timings of this run mean nothing and are not shown. It writes a dated Markdown file
into benchmarks/results/ with each variant's peak per phase (`metrics.memory_phases`, the
high-water mark reset as each phase starts) and whether the largest of them meets the bound.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from runner.precisions import PRECISIONS as PRECISION_DECLARATIONS

ROOT = Path(__file__).resolve().parent.parent
MODELS = {"smollm2": "jobs/demo-lm.yaml", "gemma": "jobs/gemma3-270m.yaml"}
PRECISIONS = [
    "fp32", "fp16", "bf16", "int8-dynamic", "bnb-int8", "bnb-nf4", "torchao-int8-dynamic",
    "torchao-int8-weight", "torchao-int4-weight", "int8-static", "smoothquant-int8", "awq-int4",
    "gptq-int4",
]  # fmt: skip
PHASES = ["load", "calibrate", "quantize", "evaluate", "analysis", "kl", "kv_cache"]


def memory_job(model: str, precisions: list[str]) -> dict:
    """The model's job, cut to one batch of the phases that hold memory."""
    job = yaml.safe_load((ROOT / MODELS[model]).read_text())
    job["name"] = f"memory-{model}"
    job["dataset"]["path"] = str((ROOT / "jobs" / job["dataset"]["path"]).resolve())
    job["dataset"]["sample"] = {"n": 8, "seed": 0}
    job["perplexity"]["kl_top_k"] = 32
    job["generation"] = {"prompt_length": 16, "new_tokens": 8, "batch_sizes": [1]}
    job["generation"] |= {"warmup_runs": 1, "timed_runs": 1}
    job.pop("benchmarks", None)
    job["evaluation"] |= {"warmup_passes": 1, "timed_passes": 1}
    if any(PRECISION_DECLARATIONS[p].calibrated for p in precisions):
        job["calibration"] = {"samples": 16, "seed": 0}
    # FP32 always runs: the baseline, and its size sets the bound.
    job["variants"] = [f"{p}-cpu" for p in ["fp32", *(p for p in precisions if p != "fp32")]]
    return job


def table(results: Path) -> tuple[str, float]:
    """The Markdown table of every result's phase peaks, and the bound."""
    loaded = [json.loads(f.read_text()) for f in results.glob("*-cpu.json")]
    loaded.sort(
        key=lambda r: PRECISIONS.index(r["precision"]) if r["precision"] in PRECISIONS else 99
    )
    fp32 = next(r for r in loaded if r["precision"] == "fp32")
    bound = 1.5 * fp32["metrics"]["model_size_mib"] + 400
    head = "| variant | size (MiB) | " + " | ".join(PHASES)
    head += " | peak_rss_mib | whole process | meets: peak_rss_mib, whole |"
    rows = [head, "|" + "---|" * (len(PHASES) + 5)]
    for result in loaded:
        metrics = result.get("metrics") or {}
        phases = metrics.get("memory_phases") or {}
        peaks = [phases.get(p, {}).get("peak_rss_mib") for p in PHASES]
        whole = max((p for p in peaks if p is not None), default=None)
        if result["status"] != "ok":
            error = (result.get("error") or "")[:80]
            rows.append(f"| {result['variant']} | - | {result['status']}: {error} |")
            continue
        cells = ["-" if p is None else f"{p:.0f}" for p in peaks]
        measured = metrics["peak_rss_mib"]  # load, quantize, evaluate: the variant's own work
        meets = ", ".join("yes" if peak <= bound else "no" for peak in (measured, whole))
        size = metrics.get("model_size_mib")
        rows.append(
            f"| {result['variant']} | {size:.1f} | "
            + " | ".join(cells)
            + f" | {measured:.0f} | {whole:.0f} | {meets} |"
        )
    return "\n".join(rows), bound


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    parser.add_argument("--precisions", nargs="+", default=PRECISIONS)
    parser.add_argument("--machine", default=os.environ.get("QUANTBENCH_MACHINE", "this-machine"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--results", type=Path, help="keep the run's results here (default: none)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="quantbench-memory-") as scratch:
        folder = str(args.results or scratch)
        Path(folder).mkdir(parents=True, exist_ok=True)
        job_file = Path(folder) / "job.yaml"
        job_file.write_text(yaml.safe_dump(memory_job(args.model, args.precisions)))
        command = [sys.executable, "-m", "runner.cli", "run", str(job_file)]
        command += ["--results", folder, "--machine", args.machine]
        if subprocess.run(command, cwd=ROOT, check=False).returncode not in (0, 1):
            return 2  # the run itself failed (it said why); exit 1: a variant failed, shown
        text, bound = table(Path(folder) / f"memory-{args.model}")
    stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H%M")
    out = args.out / f"{stamp}-memory-{args.model}-{args.machine}.md"
    out.write_text(
        f"# Peak RSS by phase: {args.model}, {args.machine}\n\n"
        f"`python benchmarks/memory.py --model {args.model}`; bound 1.5 x FP32 size + 400 MiB "
        f"= {bound:.0f} MiB. Peaks in MiB.\n\n{text}\n"
    )
    print(text, f"\nbound {bound:.0f} MiB; written to {out}", sep="\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
