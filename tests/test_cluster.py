"""A real multi-node Ray cluster on this machine, started the way a user adds machines: `ray start`.

A head (no resources for variants), a CPU worker node and a "GPU" worker node (Ray is told it has
one GPU; this machine has none), each its own `ray start --block` process with its own temp folder
and its own QUANTBENCH_CACHE, so the prepared model can only reach the workers through Ray's object
store. The job runs through the CLI against the cluster's address, 127.0.0.1:PORT, with the
cluster's own token (RAY_AUTH_MODE=token, as docs/clusters.md sets a cluster up).

The test stops exactly the processes it started (the `ray start` processes and what they spawned),
never `ray stop` and never by name: other Ray clusters on this machine must survive.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import ray
from conftest import rt_job, write_job

from runner.cli import main

RAY = Path(sys.executable).with_name("ray")
CPU_RESOURCES = '{"quantbench_slot": 1, "quantbench_cpu": 1}'
GPU_RESOURCES = '{"quantbench_slot": 1, "quantbench_cuda": 1}'
MARKER = "QB_TEST_CLUSTER"  # in every node's environment: how this test finds its processes
NODE_START_S = 90  # a node on this small machine is up in seconds; the deadline is for a loaded one


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when pytest dies, so a crashed run leaves no cluster
    behind."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class LocalCluster:
    """`ray start --block` processes on this machine, each node with its own temp folder under
    root."""

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: dict[str, subprocess.Popen] = {}
        self.caches = {"cpu": root / "cache-cpu", "gpu": root / "cache-gpu"}
        # The cluster's own token, as docs/clusters.md sets one up: never the user's
        # ~/.ray/auth_token.
        self.auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}

    def _env(self, cache: Path | None) -> dict:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("QUANTBENCH_", "RAY_ADDRESS", "RAY_AUTH_"))
        }
        env.update(self.auth)
        env.update(
            {MARKER: str(self.root)},
            RAY_USAGE_STATS_ENABLED="0",
            RAY_worker_niceness="0",  # as README.md
            RAY_worker_maximum_startup_concurrency="1",
            RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
        )  # SIGTERM stops a node now, not after a 30 s drain
        if cache is not None:
            env["QUANTBENCH_CACHE"] = str(cache)
        # The cluster's own timing lock: another run timing on this machine must not hold it up.
        env["QUANTBENCH_TIMING_LOCK"] = str(self.root / "timing.lock")
        return env

    def start(self, name: str, *args: str) -> None:
        temp = self.root / name
        # Every port a node would otherwise take by default is picked free here: another Ray cluster
        # on this
        # machine may hold the defaults (8265, 10001, 52365, worker ports 10002-19999).
        # (Ray 2.60 replaces a loopback --node-ip-address with this machine's routable IP: the nodes
        # register
        # under that address, and the GCS is still reached at 127.0.0.1.)
        common = [
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--temp-dir={temp}",
            "--disable-usage-stats",
            f"--dashboard-agent-listen-port={free_port()}",
            "--min-worker-port=0",
            "--max-worker-port=0",
            "--object-store-memory=100000000",
        ]
        head = (
            [
                "--head",
                f"--port={self.port}",
                "--include-dashboard=false",
                f"--dashboard-port={free_port()}",
                f"--ray-client-server-port={free_port()}",
            ]
            if name == "head"
            else [f"--address={self.address}"]
        )
        log = open(self.root / f"{name}.log", "wb")
        self.nodes[name] = subprocess.Popen(
            [str(RAY), "start", *head, *common, *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self._env(self.caches.get(name)),
            preexec_fn=_die_with_parent,
        )
        log.close()

    def start_cpu_worker(self) -> None:
        self.start("cpu", "--num-cpus=1", "--num-gpus=0", f"--resources={CPU_RESOURCES}")

    def start_gpu_worker(self) -> None:
        self.start("gpu", "--num-cpus=1", "--num-gpus=1", f"--resources={GPU_RESOURCES}")

    def running(self, name: str) -> bool:
        return name in self.nodes and self.nodes[name].poll() is None

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")[-3000:]

    def wait_for_head(self, timeout_s: float = NODE_START_S) -> None:
        """Until the head's GCS accepts connections: worker nodes can join from then on."""
        deadline = time.monotonic() + timeout_s
        while not _accepts_connections(self.port):
            self._check_alive({"head": True})
            assert time.monotonic() < deadline, (
                f"the head did not open {self.address}:\n{self.log('head')}"
            )
            time.sleep(0.2)

    def wait_for_nodes(
        self, want: dict[str, bool], timeout_s: float = NODE_START_S
    ) -> dict[str, str]:
        """Poll the cluster until each role in want is (True) or is not (False) an alive node; role
        -> node id."""
        deadline = time.monotonic() + timeout_s
        self.wait_for_head(timeout_s)
        with self.driver():
            ray.init(address=self.address, logging_level=logging.WARNING, log_to_driver=False)
            try:
                while True:
                    found = {role_of(node): node["NodeID"] for node in ray.nodes() if node["Alive"]}
                    if all((role in found) == present for role, present in want.items()):
                        return found
                    self._check_alive(want)
                    assert time.monotonic() < deadline, (
                        f"cluster never reached {want}; alive: {found}"
                    )
                    time.sleep(0.2)
            finally:
                ray.shutdown()

    @contextlib.contextmanager
    def driver(self):
        """This process as a driver of the cluster: its token in the environment, as a user exports
        it.

        An explicit address never turns token auth on by itself (Ray 2.60), and Ray caches the token
        it loaded first in the process (an embedded cluster's ~/.ray/auth_token): both are reset
        around the use.
        """
        from ray._private.authentication_test_utils import reset_auth_token_state

        before = {name: os.environ.get(name) for name in (*self.auth, "RAY_AUTH_TOKEN_PATH")}
        os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
        os.environ.update(self.auth)
        reset_auth_token_state()
        try:
            yield
        finally:
            for name, value in before.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
            reset_auth_token_state()

    def _check_alive(self, want: dict[str, bool]) -> None:
        for role, present in want.items():
            if present:
                assert self.running(role), (
                    f"`ray start` for the {role} node exited:\n{self.log(role)}"
                )

    def stop(self, name: str) -> None:
        """SIGTERM the node's `ray start`, which stops what it spawned; SIGKILL if it does not exit
        in time."""
        process = self.nodes.pop(name)
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)

    def stop_all(self) -> list[str]:
        """Stop every node this cluster started, then kill by PID what of ours outlives them; say
        what that was."""
        ours = self.processes()
        for name in [n for n in self.nodes if n != "head"] + ["head"] * ("head" in self.nodes):
            self.stop(name)
        # A worker whose raylet is gone exits by itself, a moment later; give it that moment, then
        # kill it.
        ours = list({p.pid: p for p in ours + self.processes()}.values())
        _, alive = psutil.wait_procs(ours, timeout=5)
        left = []
        for process in alive:
            try:  # a psutil.Process checks the start time too: a reused PID is never killed
                left.append(f"{process.pid} {process.name()}")
                process.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)
        return left

    def processes(self) -> list[psutil.Process]:
        """Every process of this cluster: what the `ray start` processes spawned, and anything with
        our marker.

        Ray renames most of its processes (`ray::IDLE`, `ray::DashboardAgent`), so the command line
        does not always name the temp folder; the environment they inherit from `ray start` does.
        """
        found = {}
        for process in self.nodes.values():
            if process.poll() is not None:  # exited and reaped: its PID may be someone else's now
                continue
            try:
                parent = psutil.Process(process.pid)
                found.update({p.pid: p for p in [parent, *parent.children(recursive=True)]})
            except psutil.NoSuchProcess:
                pass
        for process in psutil.process_iter():
            if process.pid != os.getpid() and _is_ours(process, self.root):
                found.setdefault(process.pid, process)
        return list(found.values())


def _is_ours(process: psutil.Process, root: Path) -> bool:
    """Named in its command line, marked in its environment, or writing a log under our temp folder
    (Ray's agents, `ray::DashboardAgent`, overwrite both their command line and their
    environment)."""
    try:
        return (
            str(root) in " ".join(process.cmdline())
            or process.environ().get(MARKER) == str(root)
            or any(f.path.startswith(f"{root}/") for f in process.open_files())
        )
    except psutil.Error:  # gone, or another user's
        return False


def role_of(node: dict) -> str:
    resources = node["Resources"]
    if resources.get("quantbench_cuda"):
        return "gpu"
    return "cpu" if resources.get("quantbench_cpu") else "head"


def _accepts_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def cluster():
    """One cluster for the module (starting nodes is the slow part): a head, a CPU worker and a GPU
    worker."""
    root = Path(
        tempfile.mkdtemp(prefix="qb-", dir="/tmp")
    )  # short: Ray's socket paths are length-limited
    local = LocalCluster(root)
    try:
        local.start("head", "--num-cpus=0", "--num-gpus=0")
        local.wait_for_head()
        local.start_cpu_worker()
        local.start_gpu_worker()
        yield local
    finally:
        left = local.stop_all()
        if left:
            print(
                f"killed by PID, still running after their `ray start` exited: {left}",
                file=sys.stderr,
            )
        # (not this process: the in-process driver keeps Ray's log files in the head's folder open)
        survivors = [
            p.pid for p in psutil.process_iter() if p.pid != os.getpid() and _is_ours(p, root)
        ]
        shutil.rmtree(root, ignore_errors=True)
        assert not survivors, f"processes of this test's cluster survived: {survivors}"


def run_cli(cluster: LocalCluster, capsys, *args) -> tuple[int, str, float]:
    started = time.monotonic()
    with cluster.driver():
        code = main(list(map(str, args)))
    out = capsys.readouterr()
    return code, out.out + out.err, time.monotonic() - started


def results_of(folder: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in folder.glob("*.json")}


def test_a_job_runs_on_the_nodes_that_fit_and_the_model_travels_through_the_object_store(
    cluster, capsys, tmp_path, tiny_model, private_cache
):
    if not cluster.running("gpu"):  # another test stopped it
        cluster.start_gpu_worker()
    nodes = cluster.wait_for_nodes({"head": True, "cpu": True, "gpu": True})
    assert not any(cache.exists() for cache in cluster.caches.values())
    job = write_job(
        tmp_path / "jobs",
        rt_job(tiny_model, variants="[fp32-cpu, int8-dynamic-cpu, fp16-cuda]", n=16),
    )
    results = tmp_path / "results"

    code, out, _ = run_cli(
        cluster, capsys, "run", job, "--results", results, "--address", cluster.address
    )

    # The CUDA variant was placed on the GPU-labelled node, found no device there and failed; the
    # others ran.
    assert code == 1, out
    files = results_of(results / "tiny-rt")
    assert set(files) == {"fp32-cpu", "int8-dynamic-cpu", "fp16-cuda"}, out
    for variant in ("fp32-cpu", "int8-dynamic-cpu"):
        assert files[variant]["status"] == "ok", files[variant]["error"]
        assert files[variant]["environment"]["ray"]["node_id"] == nodes["cpu"]
        # The niceness the run started with (the nodes set RAY_worker_niceness=0), not Ray's 15
        # more: the suite may itself run under nice.
        assert files[variant]["environment"]["niceness"] == os.nice(0)
    cuda = files["fp16-cuda"]
    assert cuda["status"] == "failed" and "no CUDA device" in cuda["error"], cuda["error"]
    assert cuda["environment"]["ray"]["node_id"] == nodes["gpu"]
    assert "3 node(s)" in out

    # The workers' caches are not the driver's: the prepared model reached each node as an archive.
    key = files["fp32-cpu"]["model"]["key"]
    assert (private_cache / "models" / key).is_dir()
    for role in ("cpu", "gpu"):
        assert (cluster.caches[role] / "models" / key / "model.safetensors").is_file(), role
        assert (cluster.caches[role] / "models" / key / "quantbench-model.json").is_file(), role
    # Each node kept its own temp folder: Ray takes --temp-dir per node, not only on the head.
    for role in ("head", "cpu", "gpu"):
        assert list((cluster.root / role).glob("session_*")), role


def test_a_variant_no_node_can_run_is_skipped_after_the_placement_timeout(
    cluster, capsys, tmp_path, tiny_model
):
    if cluster.running("gpu"):
        cluster.stop("gpu")
    cluster.wait_for_nodes({"cpu": True, "gpu": False})
    job = write_job(tmp_path / "jobs", rt_job(tiny_model, variants="[fp16-cuda, fp32-cpu]", n=8))
    results = tmp_path / "results"

    code, out, seconds = run_cli(
        cluster,
        capsys,
        "run",
        job,
        "--results",
        results,
        "--address",
        cluster.address,
        "--placement-timeout",
        "20",
    )

    assert code == 0, out  # skipped is not failed
    assert (
        "waiting up to 20 s for a node that can run cuda variants; the others run meanwhile" in out
    )
    files = results_of(results / "tiny-rt")
    result = files["fp16-cuda"]
    assert result["status"] == "skipped"
    assert (
        "no node in the cluster can run cuda variants" in result["error"]
        and "waited 20 s" in result["error"]
    )
    # The CPU variant ran during the wait, not after it.
    assert (
        files["fp32-cpu"]["status"] == "ok" and files["fp32-cpu"]["ended_at"] < result["ended_at"]
    )
    # It waited the placement timeout (how much longer depends on the machine's load: no bound).
    assert seconds >= 20, f"the run took {seconds:.0f} s\n{out}"


def test_a_wrong_token_is_refused_with_what_to_check(cluster, capsys, tmp_path, tiny_model):
    from ray._private.authentication_test_utils import reset_auth_token_state

    cluster.wait_for_nodes({"cpu": True})
    job = write_job(tmp_path / "jobs", rt_job(tiny_model, n=8))
    results = tmp_path / "results"
    with cluster.driver():
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)  # not the cluster's
        reset_auth_token_state()
        code = main(["run", str(job), "--results", str(results), "--address", cluster.address])
    err = capsys.readouterr().err
    assert code == 2, err
    assert (
        "cannot reach the Ray cluster" in err
        and f"{cluster.address} answers" in err
        and "RAY_AUTH_TOKEN" in err
    )
    assert not results.exists()
