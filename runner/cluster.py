"""The cluster: joining the one at --address, or starting the embedded one on this machine.

An address is checked before Ray is asked to join it (check_address): Ray retries an address where
nothing answers, or where a web server answers, for minutes. The embedded cluster is one node on
loopback that only holders of a per-run token can join, started without the parts of Ray it never
needs, with the fork server beside it. Nodes that run variants carry custom resources
(`quantbench_cpu` for CPU workers, `quantbench_cuda` for GPU workers) and exactly one
`quantbench_slot`; the embedded node gets the same ones, so runner/dispatch.py places variants on
it as on any cluster. GPU detection (local_gpu_count) never imports torch.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import ray
import ray._private.ray_constants as ray_constants
from ray._common.utils import get_ray_address_file
from ray._private import services
from ray._private.node import Node
from ray._private.parameter import RayParams
from ray._raylet import AuthenticationTokenLoader, Config

from runner import isolation, measure
from runner.interrupt import HeadLost
from runner.placement import DEVICE_RESOURCE, SLOT
from runner.precisions import family_of


@dataclass
class Cluster:
    address: str  # "local" for an embedded cluster
    embedded: bool
    nodes: list[dict]
    warnings: list[str] = field(default_factory=list)  # for the user, said once connected

    def describe(self) -> str:
        kinds = []
        for node in self.nodes:
            res = node["Resources"]
            roles = [d for d, r in DEVICE_RESOURCE.items() if res.get(r)]
            kinds.append(f"{node['NodeManagerAddress']} ({'+'.join(roles) or 'no variants'})")
        return (
            f"{'embedded local cluster' if self.embedded else self.address}: {len(self.nodes)} "
            "node(s): " + ", ".join(kinds)
        )


def local_gpu_count(proc: Path | str = "/proc/driver/nvidia/gpus") -> int:
    """GPUs the NVIDIA driver shows here, honouring CUDA_VISIBLE_DEVICES, without importing
    torch."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return 0
    try:
        found = len(os.listdir(proc))
    except OSError:
        found = nvidia_smi_gpu_count()  # sandboxed kernels (gVisor) may have no /proc/driver/nvidia
    return min(found, len(visible.split(","))) if visible else found


def nvidia_smi_gpu_count() -> int:
    """GPUs `nvidia-smi -L` lists; 0 where there is no nvidia-smi or it fails."""
    if not shutil.which("nvidia-smi"):
        return 0
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return 0
    return (
        sum(line.startswith("GPU ") for line in listed.stdout.splitlines())
        if listed.returncode == 0
        else 0
    )


# The embedded cluster's own housekeeping, made rarer. Idle, Ray's processes take about 9% of a core
# (measured on 2 cores), and with as many timed threads as cores it takes their time: a plain int8
# loop
# timed beside an idle cluster took 14.0-16.5 ms against 12.1-13.3 ms alone. These settings halve
# the load. No metrics are exported, no idle workers
# are prestarted, and reports to the head come every few seconds instead of 10 times a second.
# Workers start one at a time: else the first task's lease starts two, and the idle one wakes 100
# times a second to check for signals while the variant times (a MiniLM int8 variant was preempted
# 386 times a second with it, 268 without; a plain loop alone, 29). Variants run one at a time here.
EMBEDDED_RAY_CONFIG = {
    "enable_metrics_collection": False,
    "event_stats": False,
    "metrics_report_interval_ms": 600_000,
    "task_events_report_interval_ms": 10_000,
    "raylet_report_resources_period_milliseconds": 1_000,
    "gcs_pull_resource_loads_period_milliseconds": 10_000,
    "memory_monitor_refresh_ms": 1_000,
    "debug_dump_period_milliseconds": 600_000,
    "raylet_check_gc_period_milliseconds": 600_000,
    "free_objects_period_milliseconds": 10_000,
    "kill_idle_workers_interval_ms": 10_000,
    "prestart_worker_first_driver": False,
    "enable_worker_prestart": False,
    "worker_maximum_startup_concurrency": 1,
    # Ray starts its workers at niceness 15, so that its own processes come first. A timed variant
    # must not yield to them (a CUDA variant runs in its worker), and a plain script runs at 0.
    "worker_niceness": 0,
}


# The embedded head and its fork server, when this process started them; shutdown() stops them.
_embedded_head = None
_fork_server = None


# How ray.init is asked to join: quietly, with no worker output forwarded.
QUIET = dict(logging_level=logging.WARNING, log_to_driver=False, configure_logging=True)


def connect(
    address: str | None = None,
    temp_dir: str | None = None,
    cpu_precisions: list[str] | None = None,
    compiled: bool = False,
) -> Cluster:
    """Join the cluster at address (else RAY_ADDRESS), or start an embedded one on this machine.

    cpu_precisions: where CPU work will run on an embedded cluster, its fork server is started first
    and imports torch and transformers (and these precisions' libraries) while Ray starts: on 2
    cores Ray's start leaves about one core idle for 4-5 s. compiled: some CPU variant is compiled
    (the server imports inductor too).
    """
    given_by = "--address" if address else "RAY_ADDRESS"
    address = address or os.environ.get("RAY_ADDRESS")
    if address == "local":  # Ray's word for a cluster on this machine: ours, with its resources
        address = None  # and token
    if address == "auto":  # checked like any address, once resolved as Ray would
        address, given_by = resolve_auto(given_by)
    global _head_address
    if address:
        warnings = join(address, given_by)
        _head_address = address if _tcp_target(address) and "://" not in address else None
    else:
        start_embedded(temp_dir, cpu_precisions, compiled)
        warnings = []
        _head_address = _embedded_head.address
    return Cluster(
        address=address or "local", embedded=not address, nodes=alive_nodes(), warnings=warnings
    )


def resolve_auto(given_by: str) -> tuple[str, str]:
    """(the address, where it came from) that ray.init would take for `auto`: RAY_ADDRESS when it
    names one, else the latest `ray start` session's (Ray's temp folder, ray_current_cluster),
    else a GCS process running here. Raises ConnectionError when there is none.

    Why: ray.init retries the address of a session that has ended for minutes, with only its C++
    warnings; resolved here, that address gets check_address's answer in seconds."""
    environment = os.environ.get("RAY_ADDRESS", "")
    if environment not in ("", "auto"):
        return environment, f"{given_by} auto, which takes RAY_ADDRESS"
    latest_file = get_ray_address_file(None)
    latest = services.find_bootstrap_address(None)
    if latest:
        return latest, f"{given_by} auto, as the latest Ray session in {latest_file}"
    running = sorted(services.find_gcs_addresses())
    if running:
        return running[0], f"{given_by} auto, as a Ray GCS process running on this machine"
    raise ConnectionError(
        f"auto (given by {given_by}) finds no Ray cluster on this machine: no {latest_file} "
        "(written by `ray start --head`) and no running Ray GCS process. Start a head with "
        "`ray start --head`, give the head's address HOST:PORT, or leave --address out for the "
        "embedded cluster"
    )


# The head's GCS address (HOST:PORT) while this process is joined to it; None where it is unknown
# (a Ray Client address, where the client server answers for the head).
_head_address: str | None = None
HEAD_CHECK_TIMEOUT_S = 5.0


def check_head() -> None:
    """Raise HeadLost when the head's GCS port no longer accepts a connection.

    Why: when the head dies, Ray's driver retries it for 60 s (gcs_rpc_server_reconnect_timeout_s),
    then ends the process from C++ with one log line: no Python code runs after it, so the run could
    not say what finished or how to resume. A refused connection is seen at the next look."""
    target = _tcp_target(_head_address) if _head_address else None
    if target is None:
        return
    host, port, _ = target
    try:
        socket.create_connection((host, port), timeout=HEAD_CHECK_TIMEOUT_S).close()
    except OSError as error:
        raise HeadLost(
            f"the Ray cluster's head at {_head_address} stopped answering "
            f"({error.strerror or error}): the head or its machine has stopped"
        ) from None


def forwarded_options() -> dict:
    """Ray options that give a joined cluster's workers the machine label this run was given
    (--machine, or QUANTBENCH_MACHINE where quantbench runs); an embedded cluster's workers
    inherit it, and a node's own label stays where the run sets none."""
    machine = os.environ.get(measure.MACHINE_VARIABLE)
    if _embedded_head is not None or not machine:
        return {}
    return {"runtime_env": {"env_vars": {measure.MACHINE_VARIABLE: machine}}}


def join(address: str, given_by: str) -> list[str]:
    """ray.init at an address that answers; the warnings for the user."""
    # A check of seconds: ray.init retries a silent address for minutes.
    answers = check_address(address, given_by)
    try:
        ray.init(address=address, **QUIET)
    except ConnectionError as error:
        if not answers:
            raise
        # It answered, yet Ray did not let us in; Ray's own words don't say why.
        raise ConnectionError(
            f"{error}. {address} answers, but Ray could not join it: check that this shell's "
            "RAY_AUTH_TOKEN is "
            "the cluster's (when it uses token authentication, RAY_AUTH_MODE=token), that the "
            "cluster runs "
            f"Ray {ray.__version__} as this machine does, and that {address} is the head's "
            + (
                "Ray Client port (10001 by default)"
                if address.startswith("ray://")
                else "GCS port (6379 by default)"
            )
            + "; a Ray Client server needs a few seconds after the head starts"
        ) from None
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
        return []
    return [unauthenticated_warning(address)]


def start_embedded(
    temp_dir: str | None, cpu_precisions: list[str] | None, compiled: bool = False
) -> None:
    """The embedded head (and first, where CPU work will run, its fork server), joined."""
    global _embedded_head, _fork_server
    gpus = local_gpu_count()  # it may run nvidia-smi: once
    if cpu_precisions is not None:
        _fork_server = isolation.start_server(
            server_preload(fork_server_imports(cpu_precisions, compiled), gpus > 0)
        )
        os.environ[isolation.ADDRESS_VARIABLE] = _fork_server.describe()  # Ray's processes inherit
    try:
        _embedded_head = start_embedded_head(temp_dir, gpus)
        ray.init(address=_embedded_head.address, **QUIET)
    except BaseException:  # nothing of this cluster may outlive the failure
        shutdown()
        raise


def fork_server_imports(cpu_precisions: list[str], compiled: bool = False) -> list[str]:
    """What these CPU precisions' families import beyond the fork server's own preload: their
    libraries and their workers (Family.preload), and inductor where a CPU variant is compiled."""
    modules = {module for p in cpu_precisions for module in family_of(p).preload}
    return sorted(modules) + (isolation.COMPILE_PRELOAD if compiled else [])


def server_preload(also_import: list[str], node_has_gpu: bool) -> list[str]:
    # bitsandbytes may set CUDA up as it is imported, and CUDA state must not cross a fork: the
    # server imports it only on a node without a GPU (there, 2-5 s saved per bnb variant).
    return [] if node_has_gpu else also_import


def unauthenticated_warning(address: str) -> str:
    return (
        f"{address} is joined without token authentication (RAY_AUTH_MODE is not `token` in this "
        "shell): "
        "if the cluster has none either, anyone who can reach its ports can run code on its "
        "machines. "
        "Start every node, and this run, with RAY_AUTH_MODE=token and the cluster's RAY_AUTH_TOKEN "
        "(README.md, Clusters and containers)"
    )


# How long a cluster address has to accept a TCP connection before ray.init is tried.
ADDRESS_CHECK_TIMEOUT_S = 5.0


def check_address(address: str, given_by: str, timeout_s: float = ADDRESS_CHECK_TIMEOUT_S) -> bool:
    """Raise ConnectionError, saying what to check, when the address does not accept a TCP
    connection or what answers is not a gRPC server (what_answers); True when it is, False for an
    address left to Ray.

    given_by: where the address came from, "--address" or "RAY_ADDRESS".

    Why: ray.init retries an address where nothing answers for minutes (Ray 2.60 with a GCS address:
    still retrying after 10 minutes, its only output "Failed to get cluster ID from GCS server";
    with ray://, "ray client connection timeout" after 30 s), and one where a web server answers
    (the dashboard's 8265) for as long. ConnectionError is how every cluster
    error reaches the user (cli: "cannot reach the Ray cluster", exit 2). HOST:PORT is a GCS
    address, ray://HOST:PORT a Ray Client server; what Ray resolves itself (local, other
    schemes) is left to it.
    """
    source = f"given by {given_by}" if given_by.startswith("--") else f"from {given_by}"
    target = checked_tcp_target(address, source)
    if target is None:
        return False
    host, port, client = target
    connected, what = try_connection(host, port, timeout_s)
    if connected and what is None:
        return True
    if connected:
        raise ConnectionError(
            f"{address} ({source}) answers, but it is not a Ray head: {what}. quantbench run "
            "takes the head's GCS "
            "address HOST:PORT (port 6379 by default) or its Ray Client address ray://HOST:PORT "
            "(port 10001 by "
            "default); the dashboard's port (8265 by default) is for `ray job submit`"
        )
    raise ConnectionError(f"{address} ({source}): {what}. Check {what_to_check(port, client)}.")


def checked_tcp_target(address: str, source: str) -> tuple[str, int, bool] | None:
    """_tcp_target, refusing what is no cluster address; None for an address left to Ray."""
    if address.startswith(("http://", "https://")):
        # ray.init's own error blames RAY_ADDRESS, in a traceback.
        raise ConnectionError(
            f"{address} ({source}) is a web address, like the dashboard's that `ray job submit` "
            "takes; quantbench run takes the head's GCS address HOST:PORT (port 6379 by default) "
            "or its Ray Client address ray://HOST:PORT (port 10001 by default)"
        )
    target = _tcp_target(address)
    if target is None:
        if address in ("auto", "local") or "://" in address:
            return None
        # ray.init would end in a traceback about the address, blaming RAY_ADDRESS even for
        # --address.
        raise ConnectionError(
            f"{address!r} ({source}) is not a cluster address; quantbench run takes the head's "
            "GCS address HOST:PORT (port 6379 by default), its Ray Client address "
            "ray://HOST:PORT (port 10001 by default), or auto"
        )
    port = target[1]
    if not 0 < port < 65536:  # the socket module says OverflowError; Ray, "connection refused"
        raise ConnectionError(
            f"{address} ({source}): {port} is not a TCP port; a port is 1 to 65535"
        )
    return target


def try_connection(host: str, port: int, timeout_s: float) -> tuple[bool, str | None]:
    """(True, None) when a gRPC server answers; (True, what answered) for another; (False, why
    the connection failed)."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as connection:
            return True, None if _uses_tls() else what_answers(connection, host)
    except socket.gaierror as error:
        return False, f"unknown host {host!r} ({error.strerror})"
    except TimeoutError:
        return False, (
            f"no answer within {timeout_s:g} s (a wrong host, a firewall, or the machine is down)"
        )
    except ConnectionRefusedError:
        return False, f"connection refused: nothing listens on port {port} there"
    except OSError as error:
        return False, error.strerror or str(error)


def what_to_check(port: int, client: bool) -> str:
    if client:
        return (
            f"that the head runs a Ray Client server on port {port} (`ray start --head "
            f"--ray-client-server-port={port}`; Ray's default is 10001), and that this port is "
            "open or "
            "tunnelled from this machine"
        )
    return (
        "that the cluster's head is running on that machine (`ray start --head "
        f"--port={port}` starts "
        "one), and that this is its GCS port (6379 by default) and open from this machine"
    )


# A gRPC server (a GCS, a Ray Client server) sends its HTTP/2 SETTINGS frame as soon as it accepts,
# unasked (a Ray 2.60 GCS: within 1 ms); a web server says nothing until it is asked.
PROTOCOL_CHECK_S = 3.0


def what_answers(connection: socket.socket, host: str) -> str | None:
    """None when the peer speaks HTTP/2 first, as a Ray head's gRPC ports do; else what answered.

    Nothing is sent to a peer that speaks first, so a real GCS sees a connection opened and closed;
    a silent one is asked for the headers of `/` over HTTP/1.0, which disturbs no web server."""
    connection.settimeout(PROTOCOL_CHECK_S)
    first = _first_bytes(connection)
    if first is None:
        try:
            connection.sendall(f"HEAD / HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        except OSError:
            return "it closed the connection without a word"
        first = _first_bytes(connection)
    if first is None:
        return (
            f"it accepted the connection, then said nothing in {2 * PROTOCOL_CHECK_S:g} s, "
            "even when asked over HTTP"
        )
    if (
        len(first) >= 9 and first[3] == 0x04 and first[5:9] == b"\0\0\0\0"
    ):  # an HTTP/2 SETTINGS frame
        return None
    if not first:
        return "it closed the connection without a word"
    if first.startswith(b"HTTP/"):
        status = first.split(b"\r\n", 1)[0].decode("latin-1")
        return f"a web server answered ({status!r}), such as the Ray dashboard"
    return f"a server of another protocol answered (its first bytes: {first[:24]!r})"


def _first_bytes(connection: socket.socket) -> bytes | None:
    """What the peer sends first (b"" when it closes), None when it sends nothing in time."""
    try:
        return connection.recv(256)
    except TimeoutError:
        return None
    except OSError:
        return b""


def _uses_tls() -> bool:
    # A TLS head (RAY_USE_TLS) waits for this side's TLS greeting: only the TCP check applies.
    return os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true")


def _tcp_target(address: str) -> tuple[str, int, bool] | None:
    """(host, port, is a Ray Client address) for HOST:PORT and ray://HOST:PORT; None for anything
    else."""
    client = "://" in address
    if client:
        scheme, _, address = address.partition("://")
        if scheme != "ray":
            return None
    host, colon, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host  # [::1]:6379
    if not colon or not host or not port.isdigit():
        return None  # auto, local, or a form Ray itself reports
    return host, int(port), client


@dataclass
class EmbeddedHead:
    """The embedded cluster's one node, and the environment it was started in, restored when it
    stops."""

    node: object  # ray._private.node.Node
    saved_environment: dict

    @property
    def address(self) -> str:
        return self.node.gcs_address

    def shutdown(self) -> None:
        try:
            self.node.kill_all_processes(check_alive=False, allow_graceful=True, wait=True)
        finally:
            _restore_environment(self.saved_environment)


def start_embedded_head(temp_dir: str | None, gpus: int) -> EmbeddedHead:
    """A one-node cluster on this machine, on loopback only, that only holders of a per-run token
    can join.

    ray.init() would also start the autoscaler's monitor and a log monitor: an embedded cluster
    never grows, and worker output is not forwarded (log_to_driver is off). Without them a sweep
    starts and stops about 2 s sooner on 2 cores (start 4.0-4.6 s against 4.7-5.6 s, stop 0.3-0.6 s
    against 1.5-1.6 s) and two Python processes fewer poll beside the timed variants. Ray's own
    test helper (cluster_utils) would also write the address to /tmp/ray for any later ray.init().
    Every port (the GCS, the raylet, the agents, each worker) listens on the node's IP, 127.0.0.1.
    """

    resources = {SLOT: 1, DEVICE_RESOURCE["cpu"]: 1}
    if gpus:
        resources[DEVICE_RESOURCE["cuda"]] = 1
    saved = _loopback_and_token_environment()
    params = RayParams(
        num_cpus=measure.available_cpus(),
        num_gpus=gpus,
        resources=resources,
        include_dashboard=False,
        no_monitor=True,
        include_log_monitor=False,
        temp_dir=temp_dir,
        _system_config=EMBEDDED_RAY_CONFIG,
        node_ip_address=LOOPBACK,
        min_worker_port=0,
        max_worker_port=0,
        dashboard_agent_listen_port=_free_loopback_port(),  # Ray's 52365 may be another run's
        # Only samples and results travel through the store here: the model is read from this disk.
        object_store_memory=512 * 2**20,
    )
    try:
        return EmbeddedHead(
            Node(params, head=True, shutdown_at_exit=True, spawn_reaper=True), saved
        )
    except BaseException:
        _restore_environment(saved)
        raise


LOOPBACK = "127.0.0.1"
# Set while an embedded cluster runs: its processes inherit them, and this one reads them anew.
_EMBEDDED_VARIABLES = (
    "RAY_AUTH_MODE",
    "RAY_AUTH_TOKEN",
    "RAY_AUTH_TOKEN_PATH",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER",
)


def _loopback_and_token_environment() -> dict:
    """Token authentication with a new random token, and 127.0.0.1 left as it is; what was there
    before.

    Ray 2.60 replaces a loopback address with the machine's routable IP unless it is told that this
    is no multi-machine cluster (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, read at import: set here
    too)."""
    saved = {name: os.environ.get(name) for name in _EMBEDDED_VARIABLES}
    saved["enable_cluster"] = ray_constants.ENABLE_RAY_CLUSTER
    os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
    os.environ.update(
        RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=new_token(), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0"
    )
    ray_constants.ENABLE_RAY_CLUSTER = False
    _reload_ray_authentication()
    return saved


def _restore_environment(saved: dict) -> None:
    for name in _EMBEDDED_VARIABLES:
        if saved.get(name) is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved[name]
    ray_constants.ENABLE_RAY_CLUSTER = saved["enable_cluster"]
    _reload_ray_authentication()


def _reload_ray_authentication() -> None:
    """Ray reads the mode and caches the token once per process: both are read again from the
    environment."""

    Config.initialize("")  # before the token is dropped, as Ray's own test helper does
    AuthenticationTokenLoader.instance().reset_cache()


def new_token() -> str:
    return secrets.token_hex(32)


def _free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


def shutdown(head_lost: bool = False) -> None:
    """Leave the cluster and stop what this process started. head_lost: Ray's disconnect would wait
    for the dead head, so only the embedded cluster's own processes are stopped."""
    global _embedded_head, _fork_server, _head_address
    _head_address = None
    if not head_lost:
        ray.shutdown()
    if _embedded_head is not None:
        _embedded_head.shutdown()
        _embedded_head = None
    if _fork_server is not None:
        _fork_server.stop()
        os.environ.pop(isolation.ADDRESS_VARIABLE, None)
        _fork_server = None


def alive_nodes() -> list[dict]:
    return [node for node in ray.nodes() if node.get("Alive")]
