"""How close a run on several nodes comes to the ideal: wall time against (own work) / workers.

    python benchmarks/cluster.py [JOB.yaml] [--workers 3] [--machine NAME] [--out DIR]

Starts a loopback Ray cluster on this machine the way docs/clusters.md adds machines (`ray start`):
a head that runs nothing and WORKERS CPU worker nodes, each with its own temp folder, model cache
and timing lock, as separate machines would have. It runs the job against that cluster with
`quantbench run --address`, stops exactly the processes it started (never `ray stop`), and writes
a dated Markdown file into benchmarks/results/ with two ratios:

- variants: the time from the driver handing out the variants to the last one's end, over the sum
  of the variants' own work (each result's `wall_s`) / workers;
- the sensitivity study's group steps: the time from the driver handing out the shares to the last
  share's end, over the sum of the shares' own work / workers, with the node each share ran on.

A ratio of 1.0 means no node was ever idle and dispatch cost nothing; the target is <= 1.15.
Which node a study step ran on is not in the study file (it names the host, the same for every
node here), so a watcher samples the process tree under each node's `ray start` every
WATCH_S seconds and finds the steps' pids there.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
RAY = Path(sys.executable).with_name("ray")
CPU_RESOURCES = '{"quantbench_slot": 1, "quantbench_cpu": 1}'
NODE_START_S = 120
WATCH_S = 0.25  # how often the process trees are sampled: a step's start and end to within this
TARGET = 1.15
# The driver's line just before it hands out a job's variants (its FP32 reference, computed or
# kept), and the study's just before its group steps (runner/fp32_reference.py, runner/study/).
VARIANTS_LINE = "FP32 reference on"
GROUPS_LINE = "measurements in"
MIXED = "-mixed-cpu"  # the study's recipe as a variant: <precision>-mixed-<device>


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when this script dies, so no node outlives it."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


# ---------------------------------------------------------------------------------------------
# The arithmetic: plain functions of the numbers the results hold (tests/test_cluster_bench.py).


def spread_ratio(wall_s: float, own_s: list[float], workers: int) -> float:
    """Wall time over the ideal, (sum of the pieces' own work) / workers: 1.0 when no node was
    ever idle and handing out the work cost nothing."""
    ideal = sum(own_s) / workers
    return wall_s / ideal if ideal > 0 else float("inf")


def seconds_since(start: float, iso: str) -> float:
    """Seconds from start (time.time()) to an ISO 8601 moment, as results write them."""
    return datetime.datetime.fromisoformat(iso).timestamp() - start


def per_node(pieces: list[dict]) -> dict[str, dict]:
    """{node: {"count": pieces run there, "own_s": their own work}} in first-seen order."""
    nodes: dict[str, dict] = {}
    for piece in pieces:
        node = nodes.setdefault(piece["node"], {"count": 0, "own_s": 0.0})
        node["count"] += 1
        node["own_s"] += piece["own_s"]
    return nodes


def variants_phase(results: list[dict], handed_out_at: float, seen: dict[int, tuple]) -> dict:
    """The variants' pieces (node, own work, start and end from handed_out_at) and the phase's
    wall time. seen: {pid: (node, ...)}, where each result's Ray worker pid is looked up."""
    pieces = [
        {
            "name": r["variant"],
            "node": seen.get(r["environment"]["ray"]["worker_pid"], ("?",))[0],
            "own_s": r["wall_s"],
            "start_s": seconds_since(handed_out_at, r["started_at"]),
            "end_s": seconds_since(handed_out_at, r["ended_at"]),
        }
        for r in results
    ]
    return {"pieces": pieces, "wall_s": max(p["end_s"] for p in pieces)}


def groups_phase(steps: list[dict], seen: dict[int, tuple], handed_out_at: float) -> dict:
    """The study's group steps (the steps between the probe and the recipe): each one's node and
    span as the watcher saw its pid, and the phase's wall time from handed_out_at."""
    pieces = []
    for step in steps[1:-1]:
        node, first, last = seen.get(step["pid"], ("?", handed_out_at, handed_out_at))
        pieces.append(
            {
                "name": f"share {len(pieces) + 1}",
                "node": node,
                "own_s": step["wall_s"],
                "start_s": first - handed_out_at,
                "end_s": last - handed_out_at,
            }
        )
    return {"pieces": pieces, "wall_s": max(p["end_s"] for p in pieces)}


# ---------------------------------------------------------------------------------------------
# The cluster: `ray start --block` processes, each node its own temp folder, cache and timing lock.


@dataclass
class LoopbackCluster:
    root: Path
    port: int = field(default_factory=free_port)
    token: str = field(default_factory=lambda: secrets.token_hex(32))
    nodes: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def environment(self, name: str | None) -> dict:
        """This machine's environment with the cluster's token; a node's own cache and timing lock
        (separate machines have theirs: one lock would make the nodes wait for one another)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token, RAY_USAGE_STATS_ENABLED="0")
        env.update(RAY_worker_niceness="0", RAY_worker_maximum_startup_concurrency="1")
        env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"  # SIGTERM stops a node now
        if name is not None:
            env["QUANTBENCH_CACHE"] = str(self.root / name / "cache")
            env["QUANTBENCH_TIMING_LOCK"] = str(self.root / name / "timing.lock")
        return env

    def start(self, name: str, *args: str) -> None:
        (self.root / name).mkdir()
        common = [
            *("--block", "--node-ip-address=127.0.0.1", f"--temp-dir={self.root / name / 'ray'}"),
            *("--disable-usage-stats", f"--dashboard-agent-listen-port={free_port()}"),
            *("--min-worker-port=0", "--max-worker-port=0", "--object-store-memory=200000000"),
        ]
        if name == "head":
            where = ["--head", f"--port={self.port}", "--include-dashboard=false"]
            where += [f"--dashboard-port={free_port()}", f"--ray-client-server-port={free_port()}"]
        else:
            where = [f"--address={self.address}"]
        with open(self.root / f"{name}.log", "wb") as log:
            self.nodes[name] = subprocess.Popen(
                [str(RAY), "start", *where, *common, *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.environment(name),
                preexec_fn=_die_with_parent,
            )

    def start_all(self, workers: int) -> list[str]:
        """The head (no variants), then the CPU workers, each with one CPU for Ray; their names."""
        self.start("head", "--num-cpus=0", "--num-gpus=0")
        self.wait_for_head()
        names = [f"worker-{n}" for n in range(1, workers + 1)]
        for name in names:
            self.start(name, "--num-cpus=1", "--num-gpus=0", f"--resources={CPU_RESOURCES}")
        return names

    def wait_for_head(self) -> None:
        deadline = time.monotonic() + NODE_START_S
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                pass
            if self.nodes["head"].poll() is not None or time.monotonic() > deadline:
                log = (self.root / "head.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"the head did not start on {self.address}:\n{log}")
            time.sleep(0.2)

    def stop_all(self) -> list[str]:
        """SIGTERM every `ray start` (workers first), then kill by pid what of theirs outlives them;
        what that was."""
        ours = self.processes()
        for name in [n for n in self.nodes if n != "head"] + ["head"]:
            process = self.nodes[name]
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        _, alive = psutil.wait_procs(ours, timeout=5)
        left = []
        for process in alive:
            try:  # a psutil.Process checks the start time too: a reused pid is never killed
                left.append(f"{process.pid} {process.name()}")
                process.kill()
            except psutil.NoSuchProcess:
                pass
        return left

    def processes(self) -> list[psutil.Process]:
        """What the `ray start` processes spawned, and anything that writes under our folder."""
        found = {}
        for process in self.nodes.values():
            found.update({p.pid: p for p in tree(process.pid)})
        for process in psutil.process_iter():
            try:
                if any(f.path.startswith(f"{self.root}/") for f in process.open_files()):
                    found.setdefault(process.pid, process)
            except psutil.Error:
                pass
        found.pop(os.getpid(), None)
        return list(found.values())


def tree(pid: int) -> list[psutil.Process]:
    """A process and its descendants; [] when it is gone."""
    try:
        parent = psutil.Process(pid)
        return [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


class Watcher(threading.Thread):
    """Samples each worker node's process tree: {pid: (node, first seen, last seen)}."""

    def __init__(self, cluster: LoopbackCluster, names: list[str]):
        super().__init__(daemon=True)
        self.cluster, self.names = cluster, names
        self.seen: dict[int, tuple[str, float, float]] = {}
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(WATCH_S):
            now = time.time()
            for name in self.names:
                for process in tree(self.cluster.nodes[name].pid):
                    node, first, _ = self.seen.get(process.pid, (name, now, now))
                    self.seen[process.pid] = (node, first, now)


# ---------------------------------------------------------------------------------------------
# The run: `quantbench run --address` against the cluster, each line of its output timed.


def run_job(cluster: LoopbackCluster, job: Path, results: Path, log: Path) -> dict:
    """The driver's exit code, its output, and when (time.time()) it printed each marker line."""
    command = [sys.executable, "-m", "runner.cli", "run", str(job)]
    command += ["--address", cluster.address, "--results", str(results)]
    env = cluster.environment(None)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    marks: dict[str, float] = {"started": time.time()}
    with (
        subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT
        ) as driver,
        open(log, "w") as out,
    ):
        for line in driver.stdout:
            now = time.time()
            print(line, end="", flush=True)
            out.write(line)
            for mark in (VARIANTS_LINE, GROUPS_LINE):
                if mark in line:
                    marks.setdefault(mark, now)
    return {"code": driver.returncode, "marks": marks, "output": log.read_text()}


# ---------------------------------------------------------------------------------------------
# What the run wrote, as ratios and a Markdown file.


def read_run(results: Path, job: str) -> tuple[list[dict], dict | None]:
    """The job's variant results (the study's mixed variant left out: it runs alone, after the
    study) and its study file, if any."""
    folder = results / job
    variants, study = [], None
    for path in sorted(folder.glob("*.json")):
        record = json.loads(path.read_text())
        if path.name.startswith("sensitivity-"):
            study = record
        elif "wall_s" in record and not record.get("variant", "").endswith(MIXED):
            variants.append(record)
    return variants, study


def phase_lines(title: str, phase: dict, workers: int) -> list[str]:
    """A phase's ratio, then each piece: where it ran, its own work, its span."""
    own = [p["own_s"] for p in phase["pieces"]]
    ratio = spread_ratio(phase["wall_s"], own, workers)
    lines = [
        f"### {title}: wall / ideal = {ratio:.3f} ({'meets' if ratio <= TARGET else 'misses'} "
        f"<= {TARGET})",
        "",
        f"{len(own)} pieces, own work {sum(own):.1f} s, ideal {sum(own) / workers:.1f} s "
        f"(/ {workers} workers), wall {phase['wall_s']:.1f} s from the driver handing them out.",
        "",
        "| node | pieces | own work s |",
        "|---|---|---|",
    ]
    for node, share in per_node(phase["pieces"]).items():
        lines.append(f"| {node} | {share['count']} | {share['own_s']:.1f} |")
    lines += ["", "| piece | node | own work s | started s | ended s |", "|---|---|---|---|---|"]
    for p in sorted(phase["pieces"], key=lambda p: p["start_s"]):
        lines.append(
            f"| {p['name']} | {p['node']} | {p['own_s']:.1f} | {p['start_s']:.1f} | "
            f"{p['end_s']:.1f} |"
        )
    return [*lines, ""]


def report(args, job: str, run: dict, seen: dict, results: Path, workers: int) -> str:
    """The Markdown file's text: what ran where, and the two ratios."""
    variants, study = read_run(results, job)
    lines = [
        f"# {job} on {workers} loopback CPU workers, {args.machine}",
        "",
        f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}, `python benchmarks/cluster.py "
        f"{args.job} --workers {workers}`; each worker node `--num-cpus=1` with its own temp "
        "folder, model cache and timing lock; driver exit code "
        f"{run['code']}. Its summary: `{summary_line(run['output'])}`",
        "",
    ]
    marks = run["marks"]
    if VARIANTS_LINE in marks:
        lines += [
            f"The driver handed out the variants {marks[VARIANTS_LINE] - marks['started']:.1f} s "
            "after it started (its imports, joining, the model, the FP32 reference on one node).",
            "",
        ]
    if VARIANTS_LINE in marks and variants:
        phase = variants_phase(variants, run["marks"][VARIANTS_LINE], seen)
        lines += phase_lines("Variants", phase, workers)
    if GROUPS_LINE in run["marks"] and study is not None:
        phase = groups_phase(study["steps"], seen, run["marks"][GROUPS_LINE])
        lines += phase_lines("Sensitivity study, group steps", phase, workers)
    return "\n".join(lines)


def summary_line(output: str) -> str:
    found = [line.strip() for line in output.splitlines() if line.strip().startswith("wall ")]
    return found[-1] if found else "(no summary line)"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("job", nargs="?", default="jobs/cluster-bench.yaml")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--machine", default=socket.gethostname(), help="named in the file")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="qbc-", dir="/tmp"))  # short: Ray's socket paths
    cluster = LoopbackCluster(root)
    try:
        names = cluster.start_all(args.workers)
        watcher = Watcher(cluster, names)
        watcher.start()
        run = run_job(cluster, Path(args.job).resolve(), root / "results", root / "driver.log")
        watcher.stopping.set()
        watcher.join()
    finally:
        left = cluster.stop_all()
        if left:
            print(f"killed by pid, left after their `ray start` exited: {left}", file=sys.stderr)
    job = job_name(Path(args.job))
    text = report(args, job, run, watcher.seen, root / "results", args.workers)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H%M")
    out = args.out / f"{stamp}-cluster-{args.workers}-workers-{args.machine}.md"
    out.write_text(text)
    print(f"\n{text}\nwritten: {out}")
    return run["code"]


def job_name(job: Path) -> str:
    for line in job.read_text().splitlines():
        if line.startswith("name:"):
            return line.split(":", 1)[1].strip()
    raise ValueError(f"{job}: no `name:` line")


if __name__ == "__main__":
    sys.exit(main())
