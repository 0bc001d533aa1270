"""What calibrating costs: each calibrated precision's calibrate and quantize steps on a job's
model, timed, with the peak RSS of each step against the FP32 model's size.

    python benchmarks/calibration.py JOB.yaml [--rows N] [--tokens T] [--out FILE.md]

The rows are the job's calibration texts (its `calibration:` block) joined end to end (repeated
where they hold fewer than N x T tokens) and cut into N rows of exactly T tokens: the worst case
of `samples: N, max_length: T` (real rows are often shorter; a job's own rows and times are in its
results, `settings.calibration` and `metrics.calibrate_s`). Each precision runs in a fresh
process, so each peak is its own. Run it alone: timings on a shared machine measure the sharing.
"""

import argparse
import json
import subprocess
import sys

# One precision, in a child process: argv = job, precision, rows, tokens.
MEASURE = """
import json, sys, time
import torch, transformers
from runner import evaluate, machine, models
from runner.plan import plan_job
from runner.precisions import PRECISIONS, config_for, worker_of
from runner.precisions.worker import quantized_model
from runner.work import Work

job, name, rows, tokens = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
plan = plan_job(job)
folder, info = models.prepare_model(plan.spec)
work = Work(model_dir=str(folder), **plan.worker_inputs())
ids = [i for row in work.task.worker().calibration_rows(work) for i in row]
while len(ids) < rows * tokens:  # short rows repeat: the cost is the token count's, not the text's
    ids += ids
batches = evaluate.row_batches([ids[r * tokens:(r + 1) * tokens] for r in range(rows)], "cpu")
model_class = getattr(transformers, work.task.model_class)
precision = PRECISIONS[name]
memory = machine.MemoryPhases("cpu")
quantized = quantized_model(precision, config_for(precision, work.settings), worker_of(precision),
    model_class, folder, "cpu", calibration=batches, phase=memory.phase)
fp32_mib = sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 2**20
print(json.dumps({"precision": name, "rows": rows, "tokens": rows * tokens,
    "calibrate_s": round(quantized.calibrate_s, 1), "quantize_s": round(quantized.quantize_s, 1),
    "phases": memory.phases, "fp32_mib": round(fp32_mib), "threads": torch.get_num_threads()}))
"""

CALIBRATED = ("int8-static", "smoothquant-int8", "awq-int4", "gptq-int4")


def measure(job: str, precision: str, rows: int, tokens: int) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, job, precision, str(rows), str(tokens)],
        capture_output=True,
        text=True,
    )
    if done.returncode:
        raise SystemExit(f"{precision}: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(job: str, measured: list[dict]) -> str:
    first = measured[0]
    lines = [
        f"{job}: {first['rows']} rows x {first['tokens'] // first['rows']} tokens "
        f"({first['tokens']:,} tokens), FP32 weights {first['fp32_mib']} MiB, "
        f"{first['threads']} threads",
        "",
        "| precision | calibrate (s) | quantize (s) | peak RSS calibrate (MiB) "
        "| peak RSS quantize (MiB) | quantize peak / FP32 size |",
        "|---|---|---|---|---|---|",
    ]
    for m in measured:
        calibrate = m["phases"]["calibrate"]["peak_rss_mib"]
        quantize = m["phases"]["quantize"]["peak_rss_mib"]
        lines.append(
            f"| {m['precision']} | {m['calibrate_s']} | {m['quantize_s']} | {calibrate:,.0f} "
            f"| {quantize:,.0f} | {quantize / m['fp32_mib']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("job")
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--precisions", nargs="+", default=list(CALIBRATED))
    parser.add_argument("--out")
    args = parser.parse_args()
    measured = [measure(args.job, p, args.rows, args.tokens) for p in args.precisions]
    text = table(args.job, measured)
    if args.out:
        with open(args.out, "w") as out:
            out.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
