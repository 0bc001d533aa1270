"""quantbench's lm-eval path against lm-eval's own command line, on the same model and task.

    python benchmarks/lm_eval_speed.py JOB.yaml [--rounds N] [--threads T] [--out FILE.md]

The job's FP32 model (prepared into quantbench's model cache, as a run prepares it) and each task
of its `benchmarks:` block, with the job's limit and batch size, are run two ways, each in a fresh
process, taking turns round after round: quantbench's path (the model loaded, then
`runner/tasks/causal_lm/benchmarks.run_benchmarks`, HFLM over the built model, as a variant runs
it) and `lm_eval --model hf --model_args pretrained=<the same folder>` with the same task YAML,
limit, batch size and `--log_samples`. Both are timed from the process's start to its end, and
both report the task's score, which must agree. lm-eval #3207 reports its Python integration
slower than its CLI; this measures whether quantbench's is. Run it alone: timings on a shared
machine measure the sharing.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

# quantbench's path, in a child process: argv = model folder, task YAML, limit, batch, threads.
QUANTBENCH = """
import json, sys, time
started = time.perf_counter()
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from runner.tasks.causal_lm.benchmarks import BenchmarkSettings, BenchmarkTask, run_benchmarks
folder, yaml_path, limit, batch, threads = sys.argv[1:6]
torch.set_num_threads(int(threads))
imported = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
tokenizer = AutoTokenizer.from_pretrained(folder)
loaded = time.perf_counter()
task = BenchmarkTask(spec=yaml_path, yaml_path=yaml_path, limit=int(limit))
found, items, warnings = run_benchmarks(BenchmarkSettings((task,)), model, tokenizer, int(batch))
((name, record),) = found["tasks"].items()
score = record["metrics"][record["primary"]]["value"]
print(json.dumps({"imports_s": imported - started, "load_s": loaded - imported,
    "evaluate_s": time.perf_counter() - loaded, "score": score, "task": name}))
"""


# The job's FP32 model folder (prepared once into quantbench's cache, as a run prepares it), its
# benchmark tasks and batch size; in a child process, where `gguf` is the package, not
# benchmarks/gguf.py beside this script.
PREPARE = """
import json, sys
from dataclasses import asdict
from runner.models import prepare_model
from runner.plan import plan_job
plan = plan_job(sys.argv[1])
folder, _ = prepare_model(plan.spec)
settings = plan.spec.task_config.benchmarks
print(json.dumps({"folder": str(folder), "tasks": [asdict(t) for t in settings.tasks] if settings
    else None, "batch": settings and settings.batch_size or plan.spec.evaluation.batch_size}))
"""


def prepare(job: Path) -> tuple[Path, list, int]:
    done = subprocess.run([sys.executable, "-c", PREPARE, str(job)], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{job}: {done.stderr.strip()[-2000:]}")
    found = json.loads(done.stdout.strip().splitlines()[-1])
    if not found["tasks"]:
        raise SystemExit(f"{job}: the job has no benchmarks: block")
    tasks = [SimpleNamespace(**task) for task in found["tasks"]]
    return Path(found["folder"]), tasks, found["batch"]


def environment(threads: int) -> dict:
    return {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def run_quantbench(folder: Path, task, batch: int, threads: int) -> dict:
    argv = [sys.executable, "-c", QUANTBENCH, str(folder), task.yaml_path, str(task.limit)]
    clock = time.perf_counter()
    done = subprocess.run(
        [*argv, str(batch), str(threads)], capture_output=True, text=True, env=environment(threads)
    )
    wall = time.perf_counter() - clock
    if done.returncode:
        raise SystemExit(f"quantbench's path: {done.stderr.strip()[-2000:]}")
    return {"wall_s": wall, **json.loads(done.stdout.strip().splitlines()[-1])}


def run_cli(folder: Path, task, batch: int, threads: int) -> dict:
    """lm-eval's CLI from the YAML's folder: its relative data paths resolve against the cwd."""
    with tempfile.TemporaryDirectory() as out:
        argv = ["lm_eval", "--model", "hf", "--model_args", f"pretrained={folder},dtype=float32"]
        argv += ["--tasks", task.yaml_path, "--limit", str(task.limit), "--device", "cpu"]
        argv += ["--batch_size", str(batch), "--log_samples", "--output_path", out]
        clock = time.perf_counter()
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            cwd=Path(task.yaml_path).parent,
            env=environment(threads),
        )
        wall = time.perf_counter() - clock
        if done.returncode:
            raise SystemExit(f"lm-eval's CLI: {done.stderr.strip()[-2000:]}")
        (written,) = Path(out).rglob("results_*.json")
        ((name, scores),) = json.loads(written.read_text())["results"].items()
    return {"wall_s": wall, "task": name, "score": scores["acc,none"]}


def measure(folder: Path, task, batch: int, threads: int, rounds: int) -> dict:
    """Rounds of both paths, the order alternating so that neither always runs first."""
    runs = {"quantbench": [], "cli": []}
    for index in range(rounds):
        order = ("quantbench", "cli") if index % 2 == 0 else ("cli", "quantbench")
        for path in order:
            run = run_quantbench if path == "quantbench" else run_cli
            runs[path].append(run(folder, task, batch, threads))
            print(f"{task.spec} round {index + 1} {path}: {runs[path][-1]}", file=sys.stderr)
    return runs


def table(job: Path, results: dict, batch: int, threads: int, rounds: int) -> str:
    lines = [
        f"# lm-eval: quantbench's path against lm-eval's CLI, {job}",
        "",
        f"FP32 model, batch {batch}, {threads} thread(s), {rounds} rounds taking turns; wall time "
        "per process (start to exit), median over rounds.",
        "",
        "| task | limit | quantbench (s) | of which evaluate (s) | CLI (s) | quantbench / CLI "
        "| score quantbench | score CLI |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (_, limit), runs in results.items():
        name = runs["quantbench"][0]["task"]
        ours = statistics.median(r["wall_s"] for r in runs["quantbench"])
        evaluate = statistics.median(r["evaluate_s"] for r in runs["quantbench"])
        cli = statistics.median(r["wall_s"] for r in runs["cli"])
        score, theirs = runs["quantbench"][0]["score"], runs["cli"][0]["score"]
        lines.append(
            f"| {name} | {limit} | {ours:.1f} | {evaluate:.1f} | {cli:.1f} | {ours / cli:.2f} "
            f"| {score:.4f} | {theirs:.4f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("job", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    folder, tasks, batch = prepare(args.job)
    results = {
        (task.spec, task.limit): measure(folder, task, batch, args.threads, args.rounds)
        for task in tasks
    }
    text = table(args.job, results, batch, args.threads, args.rounds)
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
