"""Dispatch: Ray places each variant on a node that can run it, one fresh process per variant.

Placement is by what a node is (runner/cluster.py gives nodes their resources): a variant asks for
its device's resource and the node's one `quantbench_slot`, which every variant holds while it
runs, so timed variants on one node never overlap. A variant that no node can run ends `skipped`
after a bounded wait; one whose process dies ends `failed`; either way the others go on. On a
worker, a CPU variant is forked from the fork server (runner/isolation.py); a CUDA variant runs in
its fresh worker. The fine-tune stage is one such work, on a GPU worker when the cluster has one.
"""

from __future__ import annotations

import functools
import os
import re
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from runner import isolation, measure, model_cache, progress
from runner.cluster import (
    Cluster,
    alive_nodes,
    check_head,
    fork_server_imports,
    forwarded_options,
    local_gpu_count,
    server_preload,
)
from runner.job import Variant
from runner.placement import can_run, requirements, why_no_node
from runner.references import call, resolve
from runner.schema import Result
from runner.work import FinetuneWork, ReferenceWork, StudyWork, VariantWork, Work, base_result


def ray_options(device: str) -> dict:
    """How a variant or fine-tune asks Ray for a node of its kind (CPU and GPU by count, the rest by
    resources)."""
    needs = requirements(device)
    return {
        "resources": {k: v for k, v in needs.items() if k not in ("CPU", "GPU")},
        "num_gpus": needs.get("GPU", 0),
        "num_cpus": needs["CPU"],
    }


def default_placement_timeout(cluster: Cluster, placement_timeout_s: float | None) -> float:
    """An embedded cluster never grows; a real one may be adding the node (an autoscaler): wait a
    little."""
    if placement_timeout_s is not None:
        return placement_timeout_s
    return 0.0 if cluster.embedded else 30.0


def wait_for_capable_node(device: str, timeout_s: float) -> str | None:
    """None when some node can run the device's variants; else why none can, after waiting
    timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = alive_nodes()
        if can_run(nodes, device):
            return None
        if time.monotonic() >= deadline:
            break
        time.sleep(1.0)  # an autoscaler may be adding the node; poll the cluster state
    return why_no_node(device, nodes, timeout_s)


def _on_node(work: Work, archive: list, also_import: list[str]):
    """Runs on a worker node: the work's model here, then the work in a process of its own (the
    function its class names), so memory peaks and CUDA state never leak: on the CPU one forked
    from this machine's warm fork server, on CUDA this worker itself, which is fresh (max_calls=1).
    Returns what the work returned and where it ran."""
    work.model_dir = _model_on_this_node(work.model_dir, archive)
    outcome = _in_a_process_of_its_own(work.device, work.runs, work, also_import)
    node = {
        "node_id": ray.get_runtime_context().get_node_id(),
        "node_ip": ray.util.get_node_ip_address(),
        "worker_pid": os.getpid(),
    }
    return outcome, node


def _in_a_process_of_its_own(device: str, runs: str, work: Work, also_import: list[str]):
    """The function `runs` names, of work, on this worker in a process of its own. On the CPU:
    forked from the fork server that `quantbench run` started beside its embedded cluster, else
    from this worker's own, which later CPU calls on this worker find warm; the forked process
    resolves the function (its imports are the server's, done before it forked). On CUDA: this
    worker itself, which is fresh (max_calls=1), since a CUDA context cannot cross a fork."""
    if device != "cpu":
        return resolve(runs)(work)
    return isolation.run_in_fresh_process(
        call, runs, work, also_import=server_preload(also_import, _node_has_gpu())
    )


@functools.cache
def _node_has_gpu() -> bool:  # asked once per worker: it may run nvidia-smi
    return local_gpu_count() > 0


def _remote_per_device(function: Callable) -> dict:
    """A CPU worker is kept for the next call (with its fork server, if it started one); a CUDA
    worker is fresh each time."""
    return {
        "cpu": ray.remote(max_calls=0, max_retries=0)(function),
        "cuda": ray.remote(max_calls=1, max_retries=0)(function),
    }


_remote_on_node = _remote_per_device(_on_node)


def _submit_one(work: Work, archive: list, also_import: list[str]):
    """Hands one piece of work to Ray, asking for a node of its device; its ref."""
    remote = _remote_on_node[work.device].options(**ray_options(work.device), **forwarded_options())
    return remote.remote(work, archive, also_import)


def cpu_needs(variants: Iterable[Variant]) -> tuple[list[str], bool]:
    """What the CPU variants among these ask of a node's fork server: their precisions, and
    whether any is compiled (fork_server_imports' arguments)."""
    cpu = [v for v in variants if v.device == "cpu"]
    return [v.precision for v in cpu], any(v.compiled for v in cpu)


def warm_cpu_nodes(cluster: Cluster, precisions: list[str], compiled: bool = False) -> list:
    """On a joined cluster, every CPU worker node starts its fork server now, importing what these
    CPU precisions need, rather than at its first piece of work; the warm-ups' refs.

    Why: a node's first call starts its Ray worker and fork server (torch, transformers and the
    precisions' libraries), and a joined cluster has no server started beside it. Nodes that wait
    for their first variant to do that sit idle while another node computes the job's FP32
    reference: on 3 loopback workers (benchmarks/cluster.py) two of them started their first
    variant 29 s after the first. A warm-up holds the node's slot like a variant and leaves an
    idle worker with a warm server, which the node's next call reuses."""
    if cluster.embedded or not precisions:
        return []
    also_import = fork_server_imports(precisions, compiled)
    return [
        _warm_up.options(
            **ray_options("cpu"),
            **forwarded_options(),
            scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False),
        ).remote(also_import)
        for node in alive_nodes()
        if can_run([node], "cpu")
    ]


@ray.remote(max_calls=0, max_retries=0)
def _warm_up(also_import: list[str]) -> dict:
    """Runs on a CPU worker node: this worker's fork server started and ready (a call forked from
    it waits for its imports). Says which worker it was and whether its server was already warm."""
    was_warm = isolation._own_server is not None
    isolation.run_in_fresh_process(
        os.getpid, also_import=server_preload(also_import, _node_has_gpu())
    )
    return {"worker_pid": os.getpid(), "was_warm": was_warm}


def shipped_model(cluster: Cluster, model_dir: Path | None) -> list:
    """How the prepared model reaches the nodes: [] where they share this machine's disk (an
    embedded cluster), else its folder's archive in Ray's object store, put once for every call."""
    if cluster.embedded or model_dir is None:
        return []
    return [ray.put(model_cache.archive_folder(Path(model_dir)))]


def _model_on_this_node(model_dir: str, archive: list) -> str:
    """The prepared model's folder here: the driver's cache when shared, else unpacked from the
    archive."""
    key = Path(model_dir).name
    if model_cache.cached_model(key) is not None:
        return str(model_cache.cached_model(key))
    if not archive:
        raise FileNotFoundError(f"prepared model {model_dir} is not on this node and none was sent")
    return str(model_cache.unpack_archive(key, ray.get(archive[0])))


# How often the driver looks at the cluster's nodes while variants wait in Ray's queue: a node may
# leave (its raylet killed) with variants queued for it, and Ray would keep them queued forever.
NODE_CHECK_S = 5.0


def run_variants(
    items: list[VariantWork],
    cluster: Cluster,
    on_result: Callable[[Result], None],
    placement_timeout_s: float | None = None,
    model_dir: Path | None = None,
    say: Callable[[str], None] = print,
) -> list[Result]:
    """Run every variant where it can run; call on_result as each result arrives; return them all.

    A device no node can run, at the start or later (its node died), gets placement_timeout_s for a
    node to come: its variants wait in Ray's queue meanwhile, while the others run, then end
    `skipped`. the driver waits until a result, the deadline or the next look at the nodes."""
    placement_timeout_s = default_placement_timeout(cluster, placement_timeout_s)
    results = []

    def finish(work: VariantWork, result: Result) -> None:
        if result.ended_at is None:  # a base_result: skipped, or failed before it ended
            result.ended_at = measure.now()
        results.append(result)
        on_result(result)

    pending = _submit(items, cluster, model_dir, placement_timeout_s, finish)
    deadlines = {}
    while pending:
        check_head()  # before asking it for the nodes: a dead head would not answer for 60 s
        _check_placement(pending, deadlines, placement_timeout_s, say, finish)
        if not pending:
            break
        next_look = min([NODE_CHECK_S, *(d - time.monotonic() for d in deadlines.values())])
        done = _wait_for_one(list(pending), max(0.0, next_look))
        if done:
            work = pending.pop(done[0])
            finish(work, _result_of(done[0], work))
    return results


def _submit(
    items: list[VariantWork],
    cluster: Cluster,
    model_dir: Path | None,
    placement_timeout_s: float,
    finish: Callable,
) -> dict:
    """Hand every task to Ray; {its ref: task}. Without a wait for nodes, a task no node can run
    ends `skipped` at once."""
    archive = shipped_model(cluster, model_dir)
    also_import = fork_server_imports(*cpu_needs(t.variant for t in items))
    pending = {}
    nodes = alive_nodes()
    for work in items:
        device = work.variant.device
        if placement_timeout_s <= 0 and not can_run(nodes, device):
            finish(
                work, base_result(work, "skipped", why_no_node(device, nodes, placement_timeout_s))
            )
            continue
        pending[_submit_one(work, archive, also_import)] = work
    return pending


def _result_of(ref, work: VariantWork) -> Result:
    try:
        result, node = ray.get(ref)
    except Exception as error:  # the worker process or its node died, or it could not start
        return base_result(work, "failed", failure_text(error))
    result.environment["ray"] = node
    return result


def _check_placement(
    pending: dict, deadlines: dict, timeout_s: float, say: Callable[[str], None], finish: Callable
) -> None:
    """Start, end or act on each pending device's wait for a node: past its deadline, its variants
    are cancelled and end `skipped`, saying why."""
    nodes = alive_nodes()
    now = time.monotonic()
    for device in dict.fromkeys(work.variant.device for work in pending.values()):
        if can_run(nodes, device):
            deadlines.pop(
                device, None
            )  # a node came (or came back): its variants stay queued or run
            continue
        if device not in deadlines and timeout_s > 0:
            deadlines[device] = now + timeout_s
            say(
                f"waiting up to {timeout_s:g} s for a node that can run {device} variants; the "
                "others run meanwhile"
            )
        if now >= deadlines.get(device, now):
            deadlines.pop(device, None)
            for ref, work in [(r, t) for r, t in pending.items() if t.variant.device == device]:
                ray.cancel(ref, force=True)
                del pending[ref]
                finish(work, base_result(work, "skipped", why_no_node(device, nodes, timeout_s)))


# ray.wait returns for no signal (ray.get looks for one every second,
# get_check_signal_interval_milliseconds):
# the driver waits in slices of this many seconds, so that Ctrl-C and SIGTERM reach its handlers
# (runner/interrupt.py) within one.
SIGNAL_CHECK_S = 1.0


def _wait_for_one(refs: list, timeout_s: float | None) -> list:
    """The refs of ray.wait(refs, num_returns=1, timeout=timeout_s), waited for a slice at a
    time."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        left = SIGNAL_CHECK_S if deadline is None else max(0.0, deadline - time.monotonic())
        done, _ = ray.wait(refs, num_returns=1, timeout=min(SIGNAL_CHECK_S, left))
        progress.forward()  # what the running work said since the last slice
        if done or (deadline is not None and left <= SIGNAL_CHECK_S):
            return done


# Said of a failure that Ray's memory monitor caused: the variant may not be the one that used the
# memory, and rerunning it may succeed.
MEMORY_MONITOR = (
    "Ray's memory monitor killed the worker: memory pressure on the node, not necessarily this "
    "variant"
)


def failure_text(error: Exception) -> str:
    """Why a piece of work failed, whole: what the task raised (a RayTaskError wraps it), else
    Ray's own message on one line (a dead worker or node), led by who killed it where Ray's memory
    monitor did."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, isolation.RaisedInProcess):  # it names the error's type already
        return str(cause)
    if isinstance(cause, BaseException) and not _by_memory_monitor(error):
        return f"{type(cause).__name__}: {cause}"
    lines = [
        line.strip()
        for line in re.sub(r"\x1b\[[0-9;]*m", "", str(error)).splitlines()
        if line.strip()
    ]
    text = f"{type(error).__name__}: {' '.join(lines)}"
    return f"{MEMORY_MONITOR}. {text}" if _by_memory_monitor(error) else text


def _by_memory_monitor(error: Exception) -> bool:
    """Whether the raylet's memory monitor killed the worker: Ray raises OutOfMemoryError, or a
    worker-died error that says so."""
    if isinstance(error, ray.exceptions.OutOfMemoryError) or isinstance(
        getattr(error, "cause", None), ray.exceptions.OutOfMemoryError
    ):
        return True
    return "memory monitor" in str(error) or "running low on memory" in str(error)


# ---------------------------------------------------------------------------------------------
# The fine-tune stage: one call, on a GPU worker when the cluster has one.


def finetune(
    work: FinetuneWork,
    cluster: Cluster,
    placement_timeout_s: float | None = None,
    precisions: list[str] = (),
) -> dict:
    """Fine-tune on a GPU worker if there is one, else a CPU worker; the model lands in this
    machine's cache.

    precisions: the job's CPU precisions, whose imports a fork server started now then preloads."""
    placement_timeout_s = default_placement_timeout(cluster, placement_timeout_s)
    device = "cuda" if wait_for_capable_node("cuda", 0.0) is None else "cpu"
    reason = wait_for_capable_node(device, placement_timeout_s)
    if reason:
        raise RuntimeError(f"cannot fine-tune: {reason}")
    # Like a CPU variant, a CPU fine-tune is forked from the fork server: the variants that follow
    # find it warm (one import of torch and transformers per run, not two).
    work.device, work.send_back = device, not cluster.embedded
    archive = shipped_model(cluster, Path(work.model_dir))
    ref = _submit_one(work, archive, fork_server_imports(precisions))
    _wait_for_one([ref], None)  # in slices: Ctrl-C is heard, and the training's progress shown
    try:
        info, node = ray.get(ref)
    except ray.exceptions.RayError as error:
        raise RuntimeError(failure_text(error)) from None
    info["node_ip"], info["worker_pid"] = node["node_ip"], node["worker_pid"]
    if "archive" in info:
        model_cache.unpack_archive(work.key, info.pop("archive"))
    info["folder"] = str(model_cache.cached_model(work.key))
    return info


# ---------------------------------------------------------------------------------------------
# A job's FP32 reference on one device (runner/fp32_reference.py): one call, like a variant.


def run_reference(
    work: ReferenceWork,
    cluster: Cluster,
    model_dir: Path,
    placement_timeout_s: float | None = None,
) -> dict:
    """The reference task where its device runs; what it returned. Raises RuntimeError when no
    node can run the device or the task fails, saying why."""
    reason = wait_for_capable_node(
        work.device, default_placement_timeout(cluster, placement_timeout_s)
    )
    if reason:
        raise RuntimeError(reason)
    also_import = fork_server_imports(["fp32"] if work.device == "cpu" else [])
    ref = _submit_one(work, shipped_model(cluster, model_dir), also_import)
    _wait_for_one([ref], None)  # in slices, so that Ctrl-C is heard
    try:
        return ray.get(ref)[0]
    except Exception as error:  # the task raised, or its process or node died
        raise RuntimeError(failure_text(error)) from None


# ---------------------------------------------------------------------------------------------
# A sensitivity study's steps: calls like variants (the node's slot held, so they never overlap a
# timed variant), each in a process of its own.


class NoCapableNode(RuntimeError):
    """No node of the cluster runs the study's device: the study is skipped, as its variant is."""


def run_study_steps(
    steps: list[StudyWork],
    cluster: Cluster,
    model_dir: Path,
    placement_timeout_s: float | None = None,
    on_done: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Every step at once, where its device runs; their outcomes, in order. on_done(outcome) is
    called as each returns. Raises NoCapableNode when no node can run the device, RuntimeError
    when a step fails, saying why."""
    device = steps[0].study.device
    reason = wait_for_capable_node(device, default_placement_timeout(cluster, placement_timeout_s))
    if reason:
        raise NoCapableNode(f"cannot run the sensitivity study: {reason}")
    archive = shipped_model(cluster, model_dir)
    also_import = fork_server_imports([steps[0].study.precision] if device == "cpu" else [])
    refs = [_submit_one(step, archive, also_import) for step in steps]
    outcomes, waiting = {}, list(refs)
    while waiting:
        for ref in _wait_for_one(waiting, None):  # in slices, so that Ctrl-C is heard
            waiting.remove(ref)
            try:
                outcomes[refs.index(ref)] = ray.get(ref)[0]
            except Exception as error:  # the step raised, or its process or node died
                raise RuntimeError(f"a sensitivity step failed: {failure_text(error)}") from None
            if on_done is not None:
                on_done(outcomes[refs.index(ref)])
    return [outcomes[index] for index in range(len(refs))]
