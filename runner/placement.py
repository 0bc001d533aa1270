"""Placement: what a node must have to run a device's work, as Ray resources.

Nodes that run variants carry custom resources (`quantbench_cpu` for CPU workers, `quantbench_cuda`
for GPU workers) and exactly one `quantbench_slot`, which every variant holds while it runs, so
timed variants on one node never overlap (runner/cluster.py gives nodes their resources;
runner/dispatch.py asks for them). Plain functions of Ray's node records: `quantbench validate`
says where each variant would run without importing Ray.
"""

from __future__ import annotations

SLOT = "quantbench_slot"
DEVICE_RESOURCE = {"cpu": "quantbench_cpu", "cuda": "quantbench_cuda"}


def requirements(device: str) -> dict:
    """What a node needs to run the device's variants: exactly what ray_options asks Ray for, so a
    node Ray can never place a variant on (a worker started with --num-cpus=0) is not counted."""
    needs = {SLOT: 1, DEVICE_RESOURCE[device]: 1, "CPU": 1}
    if device == "cuda":
        needs["GPU"] = 1
    return needs


def _fits(node: dict, needs: dict) -> bool:
    return all(node["Resources"].get(name, 0) >= amount for name, amount in needs.items())


def where_it_runs(device: str) -> str:
    worker = {"cpu": "a CPU worker node", "cuda": "a GPU worker node"}[device]
    return (
        f"{worker} (Ray resources "
        + ", ".join(f"{k}={v}" for k, v in requirements(device).items())
        + ")"
    )


def can_run(nodes: list[dict], device: str) -> bool:
    return capable_nodes(nodes, device) > 0


def capable_nodes(nodes: list[dict], device: str) -> int:
    """How many of the nodes can run the device's variants."""
    return sum(_fits(node, requirements(device)) for node in nodes)


def why_no_node(device: str, nodes: list[dict], waited_s: float) -> str:
    needs = requirements(device)
    have = "; ".join(_node_resources(node, needs) for node in nodes)
    return (
        f"no node in the cluster can run {device} variants (needs "
        f"{', '.join(f'{k}={v}' for k, v in needs.items())}); "
        f"waited {waited_s:g} s; nodes: {have or 'none'}"
    )


def _node_resources(node: dict, needs: dict) -> str:
    """A node's share of what the variants need (0 where it has none) and its quantbench
    resources."""
    have = node["Resources"]
    names = sorted(set(needs) | {name for name in have if name.startswith("quantbench")})
    return f"{node['NodeManagerAddress']}: " + ", ".join(
        f"{name}={have.get(name, 0):g}" for name in names
    )
