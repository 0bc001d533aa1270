"""Faults a hostile user or an unlucky run brings to the cluster side of a run (issue 18, must-haves
1-3).

Real processes and real sockets: a loopback Ray cluster started here with `ray start` and temp
folders of its own (stopped by PID, never `ray stop`), a raylet killed with SIGKILL, connections
held open and never written to, a web server where a Ray head should be. Each test checks what is
kept, what is said, the exit code, and that no process it started is left running.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import psutil
import pytest

from runner import isolation

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def call_through(server: isolation.ForkServer, timeout_s: float) -> subprocess.CompletedProcess:
    """A caller in a process of its own, as a Ray worker is, using the server named in its
    environment."""
    code = (
        "import os; from runner import isolation; print(isolation.run_in_fresh_process(os.getpid))"
    )
    env = {**os.environ, isolation.ADDRESS_VARIABLE: server.describe(), "PYTHONPATH": REPO}
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=REPO,
        env=env,
    )


def held_connection(server: isolation.ForkServer) -> socket.socket:
    """A connection to the fork server that never sends a byte, as `nobody` made in the red-team
    run."""
    held = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    held.connect(server.address)
    return held


def test_a_connection_that_never_sends_stalls_no_other_call():
    server = isolation.start_server()
    try:
        assert (
            call_through(server, timeout_s=120).returncode == 0
        )  # the server has imported: calls are quick
        held = [held_connection(server) for _ in range(3)]
        started = time.monotonic()
        for _ in range(2):
            shown = call_through(server, timeout_s=60)
            assert shown.returncode == 0 and shown.stdout.strip().isdigit(), shown.stderr[-2000:]
        # A call is about 1 s here (the caller's interpreter start); before, each waited behind the
        # held ones forever.
        took = time.monotonic() - started
        assert took < 30, took
        supervisors = psutil.Process(
            server.process.pid
        ).children()  # one per held connection, each on its deadline
        assert len(supervisors) >= len(held), supervisors  # (and a finished call's, ending)
        for connection in held:
            connection.close()
    finally:
        server.stop()
    assert server.process.poll() is not None
    _, alive = psutil.wait_procs(supervisors, timeout=30)  # they die with the server
    assert not alive, alive
    print(f"two calls beside {len(held)} silent connections: {took:.1f} s")


def test_a_connection_that_never_sends_is_dropped_after_the_deadline(monkeypatch):
    monkeypatch.setattr(
        isolation, "AUTHENTICATION_DEADLINE_S", 1
    )  # the server takes it from its starter
    server = isolation.start_server()
    try:
        held = held_connection(server)
        held.settimeout(60)
        started = time.monotonic()
        received = b""
        while True:  # the challenge, then end of file when the supervisor gives up
            chunk = held.recv(4096)
            if not chunk:
                break
            received += chunk
        waited = time.monotonic() - started
        assert received, "the server sent no challenge"
        assert waited < 30, waited  # the server may still be importing when it accepts
        held.close()
    finally:
        server.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_another_users_process_is_turned_away_before_a_byte_is_read():
    import pwd

    nobody = pwd.getpwnam("nobody").pw_uid
    server = isolation.start_server()
    code = (
        f"import socket, os; os.setuid({nobody}); s = socket.socket(socket.AF_UNIX); "
        f"s.connect({server.address!r}); s.settimeout(20); print(repr(s.recv(100)))"
    )
    try:
        assert (
            call_through(server, timeout_s=120).returncode == 0
        )  # imported: it accepts at once from now on
        shown = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
        )
        # Closed at once, no challenge sent: it never reaches the key check or a supervisor.
        assert shown.returncode == 0 and shown.stdout.strip() == "b''", (
            shown.stdout + shown.stderr[-2000:]
        )
        assert call_through(server, timeout_s=60).returncode == 0  # it still serves its own user
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------
# The embedded cluster: loopback only, and a per-run token nobody else holds.

INTRUDER = """
import sys, ray
try:
    ray.init(address=sys.argv[1], log_to_driver=False)
except Exception as error:
    print("REFUSED", type(error).__name__, str(error)[:300].replace(chr(10), " "))
    sys.exit(3)
print("JOINED", ray.get(ray.remote(lambda: "ran work").remote(), timeout=60))
"""


def intrude(address: str, home, **auth: str) -> subprocess.CompletedProcess:
    """Another process on this machine joins the run's cluster: no token (an empty home, no ~/.ray),
    or a wrong one."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH_", "RAY_ADDRESS"))}
    env.update(HOME=str(home), RAY_USAGE_STATS_ENABLED="0", **auth)
    return subprocess.run(
        [sys.executable, "-c", INTRUDER, address],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def listening_sockets(processes: list[psutil.Process]) -> list[tuple[int, str, str, int]]:
    found = []
    for process in processes:
        try:
            found += [
                (process.pid, process.name(), c.laddr.ip, c.laddr.port)
                for c in process.net_connections("inet")
                if c.status == psutil.CONN_LISTEN
            ]
        except psutil.NoSuchProcess:
            pass
    return found


def is_loopback(ip: str) -> bool:
    import ipaddress

    address = ipaddress.ip_address(ip)
    return address.is_loopback or bool(
        getattr(address, "ipv4_mapped", None) and address.ipv4_mapped.is_loopback
    )


def files_holding(secret: bytes, folders: list) -> list:
    from pathlib import Path

    return [
        path
        for folder in folders
        for path in Path(folder).rglob("*")
        if path.is_file() and secret in path.read_bytes()
    ]


def test_the_embedded_cluster_listens_on_loopback_only_and_refuses_whoever_lacks_its_token(
    tmp_path, tiny_model, ray_temp_dir, capsys, monkeypatch
):
    from conftest import rt_job, write_job

    from runner import cluster, dispatch
    from runner.cli import main

    seen, real_run = {}, dispatch.run_variants
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)

    def run_variants(tasks, joined, *args, **kwargs):  # while the cluster is up
        address = cluster._embedded_head.address
        seen["processes"] = psutil.Process().children(recursive=True)
        started = time.monotonic()
        seen["no token"] = intrude(address, tmp_path)
        seen["wrong token"] = intrude(
            address, tmp_path, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64
        )
        seen["intruders_s"] = time.monotonic() - started
        seen["sockets"] = listening_sockets(seen["processes"] + [psutil.Process()])
        seen["address"] = address
        seen["auth"] = (
            os.environ.get("RAY_AUTH_MODE"),
            os.environ.get("RAY_AUTH_TOKEN"),
        )  # what Ray's processes got
        return real_run(tasks, joined, *args, **kwargs)

    monkeypatch.setattr(dispatch, "run_variants", run_variants)
    job = write_job(tmp_path / "jobs", rt_job(tiny_model, variants="[fp32-cpu]", n=8))
    results = tmp_path / "results"
    code = main(["run", str(job), "--results", str(results), "--ray-temp-dir", ray_temp_dir])
    out = capsys.readouterr()

    assert code == 0, out.out + out.err
    assert json.loads((results / "tiny-rt" / "fp32-cpu.json").read_text())["status"] == "ok"
    assert seen["address"].startswith("127.0.0.1:"), seen["address"]
    for who in ("no token", "wrong token"):
        shown = seen[who]
        assert (
            shown.returncode == 3 and "REFUSED" in shown.stdout and "JOINED" not in shown.stdout
        ), (who, shown.stdout, shown.stderr[-2000:])
    sockets = seen["sockets"]
    names = {name for _, name, _, _ in sockets}
    assert "gcs_server" in names and "raylet" in names, (
        sockets
    )  # the ones that were on every interface
    assert all(is_loopback(ip) for _, _, ip, _ in sockets), [
        s for s in sockets if not is_loopback(s[2])
    ]
    # The token: random, in no message, no result and nothing Ray wrote.
    mode, token = seen["auth"]
    assert mode == "token" and token and len(token) == 64, seen["auth"]
    token = token.encode()
    assert token not in (out.out + out.err).encode()
    assert files_holding(token, [results, tmp_path / "jobs", ray_temp_dir]) == []
    # The environment of this process is as it was; nothing of the cluster is left running.
    assert "RAY_AUTH_MODE" not in os.environ and "RAY_AUTH_TOKEN" not in os.environ
    _, alive = psutil.wait_procs(seen["processes"], timeout=30)
    assert not alive, alive
    print(
        f"intruders refused in {seen['intruders_s']:.1f} s: "
        f"{seen['no token'].stdout.strip()[:200]} | "
        f"{seen['wrong token'].stdout.strip()[:200]}"
    )


# ---------------------------------------------------------------------------------------------
# A loopback cluster of `ray start` processes, as tests/test_cluster.py starts one; nodes that die
# or can never take a variant.

from test_address import QUANTBENCH, run_quantbench  # noqa: E402
from test_cluster import CPU_RESOURCES, LocalCluster, _is_ours  # noqa: E402


class FaultCluster(LocalCluster):
    """Its worker nodes' variants obey QUANTBENCH_FAULT_INJECT and announce themselves in
    fault_dir."""

    def __init__(self, root, faults: str = ""):
        super().__init__(root)
        self.fault_dir = root / "faults"
        self.fault_dir.mkdir()
        self.faults = faults

    def _env(self, cache):
        env = super()._env(cache)
        env.update(QUANTBENCH_FAULT_INJECT=self.faults, QUANTBENCH_FAULT_DIR=str(self.fault_dir))
        return env

    def user_env(self) -> dict:
        """The shell of a user of this cluster: its address and token, none of this test's Ray
        variables."""
        env = {
            k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "QUANTBENCH_FAULT"))
        }
        env.update(self.auth, RAY_USAGE_STATS_ENABLED="0")
        return env


@pytest.fixture(scope="module")
def faulty():
    import shutil
    import tempfile
    from pathlib import Path

    root = Path(
        tempfile.mkdtemp(prefix="qbf-", dir="/tmp")
    )  # short: Ray's socket paths are length-limited
    local = FaultCluster(root, faults="fp32-cpu=hold")
    try:
        local.start("head", "--num-cpus=0", "--num-gpus=0")
        local.wait_for_head()
        yield local
    finally:
        left = local.stop_all()
        survivors = [
            p.pid for p in psutil.process_iter() if p.pid != os.getpid() and _is_ours(p, root)
        ]
        shutil.rmtree(root, ignore_errors=True)
        assert not survivors, (
            f"processes of this test's cluster survived: {survivors} (killed by PID: {left})"
        )


def results_in(folder) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in folder.glob("*.json")}


def test_a_worker_with_no_cpus_gets_the_placement_deadline_then_its_variants_are_skipped(
    faulty, tmp_path, tiny_model
):
    from conftest import rt_job, write_job

    # Ray can never place a task asking 1 CPU there; it has every quantbench resource.
    faulty.start("cpu", "--num-cpus=0", "--num-gpus=0", f"--resources={CPU_RESOURCES}")
    try:
        faulty.wait_for_nodes({"cpu": True})
        job = write_job(
            tmp_path / "jobs", rt_job(tiny_model, variants="[fp32-cpu, int8-dynamic-cpu]", n=8)
        )
        results = tmp_path / "results"
        code, out, seconds = run_quantbench(
            "run",
            str(job),
            "--results",
            str(results),
            "--address",
            faulty.address,
            "--placement-timeout",
            "3",
            env=faulty.user_env(),
            timeout_s=150,
        )
    finally:
        faulty.stop("cpu")
    assert code == 0, out  # skipped is not failed
    assert "waiting up to 3 s for a node that can run cpu variants" in out, out
    files = results_in(results / "tiny-rt")
    assert set(files) == {"fp32-cpu", "int8-dynamic-cpu"}, out
    for result in files.values():
        assert result["status"] == "skipped", result
        assert (
            "no node in the cluster can run cpu variants" in result["error"]
            and "CPU=1" in result["error"]
        )
        assert "CPU=0" in result["error"] and "waited 3 s" in result["error"], result["error"]
    assert "skipped" in out and "Traceback" not in out, out
    assert seconds < 90, f"{seconds:.0f} s\n{out}"


def test_a_node_killed_mid_variant_fails_that_variant_and_the_deadline_ends_the_others(
    faulty, tmp_path, tiny_model
):
    from conftest import rt_job, write_job

    faulty.start_cpu_worker()
    faulty.wait_for_nodes({"cpu": True})
    job = write_job(
        tmp_path / "jobs", rt_job(tiny_model, variants="[fp32-cpu, int8-dynamic-cpu]", n=8)
    )
    results = tmp_path / "results"
    run = subprocess.Popen(
        [
            str(QUANTBENCH),
            "run",
            str(job),
            "--results",
            str(results),
            "--address",
            faulty.address,
            "--placement-timeout",
            "5",
        ],
        env=faulty.user_env(),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        held = faulty.fault_dir / "fp32-cpu.pid"
        deadline = time.monotonic() + 180
        while not held.exists():  # the variant has begun on the CPU node, and holds its only slot
            assert run.poll() is None and time.monotonic() < deadline, run.communicate()[0][-3000:]
            time.sleep(0.2)
        node = psutil.Process(faulty.nodes["cpu"].pid)
        raylet = [p for p in node.children(recursive=True) if p.name() == "raylet"]
        assert len(raylet) == 1, node.children(recursive=True)
        killed_at = time.monotonic()
        raylet[0].kill()
        out, _ = run.communicate(timeout=150)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, 9)  # our own child's group
            run.communicate()
        faulty.stop("cpu")
    ended_s = time.monotonic() - killed_at
    assert run.returncode == 1, out  # a variant failed; the other was written
    files = results_in(results / "tiny-rt")
    assert set(files) == {"fp32-cpu", "int8-dynamic-cpu"}, out
    assert files["fp32-cpu"]["status"] == "failed" and files["fp32-cpu"]["error"], files["fp32-cpu"]
    skipped = files["int8-dynamic-cpu"]
    assert skipped["status"] == "skipped", skipped
    assert (
        "no node in the cluster can run cpu variants" in skipped["error"]
        and "waited 5 s" in skipped["error"]
    )
    assert "waiting up to 5 s for a node that can run cpu variants" in out, out
    assert "Traceback" not in out, out
    assert ended_s < 120, f"the run ended {ended_s:.0f} s after the kill\n{out}"
    assert (
        not psutil.pid_exists(int(held.read_text()))
        or psutil.Process(int(held.read_text())).status() == "zombie"
    )


# ---------------------------------------------------------------------------------------------
# --address to something that answers but is not a Ray head.

import contextlib  # noqa: E402
import threading  # noqa: E402

# What a gRPC server sends first: an empty SETTINGS frame.
HTTP2_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


@contextlib.contextmanager
def web_server():
    """A plain HTTP server on loopback, as the dashboard's port is: it answers only when asked."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()

        do_HEAD = do_GET

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@contextlib.contextmanager
def peer_that_says(first: bytes | None):
    """A loopback server that accepts, sends `first` (None: nothing, ever) and holds the connection
    open."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    held, stop = [], threading.Event()

    def serve():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                peer, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            held.append(peer)
            if first is not None:
                peer.sendall(first)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(10)
        for peer in held:
            peer.close()
        listener.close()


def user_shell() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH_"))}
    env.update(RAY_USAGE_STATS_ENABLED="0")
    return env


def test_a_web_server_at_the_address_is_told_apart_in_seconds(tmp_path, tiny_model):
    from conftest import rt_job, write_job

    job = write_job(tmp_path / "jobs", rt_job(tiny_model, n=8))
    results = tmp_path / "results"
    with web_server() as port:
        code, out, seconds = run_quantbench(
            "run",
            str(job),
            "--results",
            str(results),
            "--address",
            f"127.0.0.1:{port}",
            env=user_shell(),
            timeout_s=120,
        )
    assert code == 2, out
    assert f"127.0.0.1:{port} (given by --address) answers, but it is not a Ray head" in out, out
    assert "a web server answered ('HTTP/1.0 200 OK')" in out and "6379" in out and "8265" in out, (
        out
    )
    assert "Traceback" not in out and not results.exists(), out
    assert seconds < 40, (
        f"{seconds:.0f} s\n{out}"
    )  # the probe's share is about 3 s; the rest is Python's start


@pytest.mark.parametrize(
    "first, says",
    [(None, "then said nothing in 6 s"), (b"SSH-2.0-OpenSSH_9.6\r\n", "another protocol answered")],
)
def test_a_peer_that_is_silent_or_speaks_another_protocol_is_refused(first, says):
    from runner import cluster

    with peer_that_says(first) as port:
        started = time.monotonic()
        with pytest.raises(ConnectionError) as raised:
            cluster.check_address(f"127.0.0.1:{port}", "--address")
    assert says in str(raised.value) and "not a Ray head" in str(raised.value), raised.value
    assert time.monotonic() - started < 15


def test_a_real_gcs_passes_the_protocol_check_and_can_be_joined_after_it(faulty):
    import logging

    import ray

    from runner import cluster

    assert cluster.check_address(faulty.address, "--address") is True
    with faulty.driver():  # the probe left the GCS as it was: a driver joins it
        ray.init(address=faulty.address, logging_level=logging.WARNING, log_to_driver=False)
        try:
            assert any(node["Alive"] for node in ray.nodes())
        finally:
            ray.shutdown()


def test_an_address_joined_without_token_authentication_is_warned_about(monkeypatch, capsys):
    from runner import cluster

    monkeypatch.setattr(cluster.ray, "init", lambda **kwargs: None)  # a cluster that lets anyone in
    monkeypatch.setattr(cluster, "alive_nodes", lambda: [])
    with peer_that_says(HTTP2_SETTINGS) as port:
        monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
        warned = cluster.connect(f"127.0.0.1:{port}").warnings
        monkeypatch.setenv("RAY_AUTH_MODE", "token")
        quiet = cluster.connect(f"127.0.0.1:{port}").warnings
    assert (
        len(warned) == 1
        and "without token authentication" in warned[0]
        and "RAY_AUTH_MODE" in warned[0]
    ), warned
    assert quiet == []
