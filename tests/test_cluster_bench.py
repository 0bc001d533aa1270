"""benchmarks/cluster.py's arithmetic, on what a real 3-worker run wrote (2026-12-07, before the
CPU nodes were warmed up front): which node ran what, and wall time against own work / workers."""

from __future__ import annotations

import pytest

from benchmarks.cluster import groups_phase, per_node, spread_ratio, variants_phase

# Three of that run's results, as their files hold them (started_at, ended_at, wall_s, the Ray
# worker's pid), the driver's FP32-reference line printed at HANDED_OUT (time.time()).
HANDED_OUT = 1796651012.0  # 2026-12-07T13:43:32.000+00:00
RESULTS = [
    {
        "variant": "fp32-cpu",
        "wall_s": 16.5,
        "started_at": "2026-12-07T13:43:32.200+00:00",
        "ended_at": "2026-12-07T13:43:48.800+00:00",
        "environment": {"ray": {"worker_pid": 301}},
    },
    {
        "variant": "fp16-cpu",
        "wall_s": 19.9,
        "started_at": "2026-12-07T13:44:01.100+00:00",
        "ended_at": "2026-12-07T13:44:21.000+00:00",
        "environment": {"ray": {"worker_pid": 101}},
    },
    {
        "variant": "bf16-cpu",
        "wall_s": 18.6,
        "started_at": "2026-12-07T13:44:01.100+00:00",
        "ended_at": "2026-12-07T13:44:19.700+00:00",
        "environment": {"ray": {"worker_pid": 201}},
    },
]
# The watcher's {pid: (node, first seen, last seen)}: Ray workers, and the study's share processes.
SEEN = {
    101: ("worker-1", HANDED_OUT, HANDED_OUT + 50),
    201: ("worker-2", HANDED_OUT, HANDED_OUT + 50),
    301: ("worker-3", HANDED_OUT - 5, HANDED_OUT + 50),
    7001: ("worker-3", HANDED_OUT + 100.2, HANDED_OUT + 129.5),
    7002: ("worker-2", HANDED_OUT + 100.2, HANDED_OUT + 127.4),
    7003: ("worker-1", HANDED_OUT + 100.2, HANDED_OUT + 124.0),
}


def test_the_variants_phase_runs_from_the_hand_out_to_the_last_end_on_the_nodes_that_ran_them():
    phase = variants_phase(RESULTS, HANDED_OUT, SEEN)

    assert phase["wall_s"] == pytest.approx(49.0)  # fp16-cpu ended last, 49.0 s after
    assert [p["node"] for p in phase["pieces"]] == ["worker-3", "worker-1", "worker-2"]
    # Two nodes sat idle 29 s before their first variant: the ratio says so.
    ratio = spread_ratio(phase["wall_s"], [p["own_s"] for p in phase["pieces"]], workers=3)
    assert ratio == pytest.approx(49.0 / ((16.5 + 19.9 + 18.6) / 3))
    assert ratio > 2.6


def test_the_study_shares_are_placed_by_their_pids_and_the_probe_and_recipe_left_out():
    steps = [
        {"wall_s": 3.1, "pid": 6000},  # the probe
        {"wall_s": 29.5, "pid": 7001},
        {"wall_s": 27.3, "pid": 7002},
        {"wall_s": 23.8, "pid": 7003},
        {"wall_s": 4.0, "pid": 7100},  # the recipe
    ]
    phase = groups_phase(steps, SEEN, HANDED_OUT + 100.0)

    assert per_node(phase["pieces"]) == {
        "worker-3": {"count": 1, "own_s": 29.5},
        "worker-2": {"count": 1, "own_s": 27.3},
        "worker-1": {"count": 1, "own_s": 23.8},
    }
    assert phase["wall_s"] == pytest.approx(29.5)
    assert spread_ratio(phase["wall_s"], [29.5, 27.3, 23.8], 3) == pytest.approx(1.098, abs=1e-3)


def test_a_piece_no_node_was_seen_running_is_said_as_such():
    phase = groups_phase([{"wall_s": 1, "pid": 1}, {"wall_s": 2, "pid": 99}, {}], SEEN, HANDED_OUT)

    assert phase["pieces"][0]["node"] == "?"
