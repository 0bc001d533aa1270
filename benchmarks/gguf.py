"""GGUF models at quantbench's scale: what converting each file costs, and what each variant of a
job on it costs against the model's size.

    python benchmarks/gguf.py JOB.yaml [JOB.yaml ...] [--results DIR] [--out FILE.md]

For each job, in a fresh process with an empty model cache: validation (which joins chunks and
reads the header) and the one-time conversion (dequantize to FP32, save), each timed, with the
process's peak RSS. With --results (a folder `quantbench run` wrote for those jobs): each variant's
wall time, peak RSS and size, and the RSS over the FP32 model's size. Writes Markdown (stdout, or
--out). Run it alone: timings on a shared machine measure the sharing.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# One conversion, in a child process so that its peak RSS is its own.
CONVERT = """
import json, resource, sys, time
from runner.models import prepare_model
from runner.plan import plan_job
started = time.perf_counter()
plan = plan_job(sys.argv[1])
validated = time.perf_counter()
folder, info = prepare_model(plan.spec)
done = time.perf_counter()
size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
print(json.dumps({
    "validate_s": round(validated - started, 1),
    "convert_s": round(done - validated, 1),
    "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    "parameters": info["parameters"],
    "fp32_file_mib": round(size / 2**20),
    "types": info["gguf"]["types"],
}))
"""


def convert(job: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix="qb-gguf-bench-") as cache:
        env = {**os.environ, "QUANTBENCH_CACHE": cache}
        out = subprocess.run(
            [sys.executable, "-c", CONVERT, str(job)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
    return json.loads(out.stdout.strip().splitlines()[-1])


def variant_rows(results: Path, job: str) -> list[str]:
    rows = []
    for path in sorted((results / job).glob("*.json")):
        result = json.loads(path.read_text())
        metrics = result.get("metrics") or {}
        if result.get("status") != "ok":
            continue
        fp32 = (result.get("model") or {}).get("parameters", 0) * 4 / 2**20
        rss = metrics.get("peak_rss_mib")
        rows.append(
            f"| {result['variant']} | {result.get('wall_s', 0):.0f} | {rss:,.0f} | "
            f"{metrics.get('model_size_mib', 0):,.0f} | {rss / fp32:.2f} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("jobs", nargs="+", type=Path)
    parser.add_argument("--results", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    lines = ["| job | validate (s) | convert (s) | peak RSS (MiB) | parameters | FP32 (MiB) |"]
    lines.append("|---|---|---|---|---|---|")
    for job in args.jobs:
        found = convert(job)
        lines.append(
            f"| {job.stem} | {found['validate_s']} | {found['convert_s']} | "
            f"{found['peak_rss_mib']:,} | {found['parameters']:,} | {found['fp32_file_mib']:,} |"
        )
    if args.results:
        for job in args.jobs:
            name = job.stem
            lines += ["", f"{name}: variants (wall s, peak RSS MiB, size MiB, RSS / FP32 size)", ""]
            lines += [
                "| variant | wall (s) | peak RSS | size | RSS / FP32 |",
                "|---|---|---|---|---|",
            ]
            lines += variant_rows(args.results, name)
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
