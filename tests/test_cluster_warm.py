"""On a cluster of `ray start` nodes, each CPU worker node starts its fork server before the job's
FP32 reference and variants (runner/dispatch.py, warm_cpu_nodes), so no node waits for its first
variant to import torch while the others work; the node's next call finds that server warm.

The cluster is tests/test_cluster.py's: a head, a CPU worker and a "GPU" worker on loopback, each
with its own temp folder, stopped by pid (never `ray stop`).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
import ray
from test_cluster import LocalCluster

from runner import cluster as ray_cluster
from runner import dispatch


@pytest.fixture
def loopback_cluster():
    root = Path(tempfile.mkdtemp(prefix="qb-", dir="/tmp"))  # short: Ray's socket paths
    local = LocalCluster(root)
    try:
        local.start("head", "--num-cpus=0", "--num-gpus=0")
        local.wait_for_head()
        local.start_cpu_worker()
        local.start_gpu_worker()
        local.wait_for_nodes({"head": True, "cpu": True, "gpu": True})
        yield local
    finally:
        local.stop_all()
        shutil.rmtree(root, ignore_errors=True)


def test_each_cpu_node_is_warmed_once_and_its_next_call_reuses_the_warm_worker(loopback_cluster):
    with loopback_cluster.driver():
        joined = ray_cluster.connect(loopback_cluster.address)
        try:
            first = ray.get(dispatch.warm_cpu_nodes(joined, ["int8-dynamic", "bnb-int8"]))
            again = ray.get(dispatch.warm_cpu_nodes(joined, ["int8-dynamic", "bnb-int8"]))
        finally:
            ray_cluster.shutdown()

    assert len(first) == 1, first  # the CPU worker: not the GPU worker, nor the head
    assert first[0]["was_warm"] is False
    assert again == [{"worker_pid": first[0]["worker_pid"], "was_warm": True}]


def test_an_embedded_cluster_is_not_warmed_its_fork_server_starts_with_it():
    embedded = ray_cluster.Cluster(address="local", embedded=True, nodes=[])

    assert dispatch.warm_cpu_nodes(embedded, ["int8-dynamic"]) == []
