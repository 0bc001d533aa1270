"""The benchmark's fairness device: two process trees taking turns on the CPU, never running at
once."""

from __future__ import annotations

import json
import subprocess
import sys

import psutil

from benchmarks.turns import take_turns

# Records the monotonic clock every half millisecond, computing in between, until its deadline or
# SIGTERM, then writes what it recorded. With CHILD set it first starts a copy of itself a little
# later, as a Ray cluster starts its processes: a process that appears while turns are being taken.
WRITER = r"""
import json, os, signal, subprocess, sys, time
out, seconds, child = sys.argv[1], float(sys.argv[2]), len(sys.argv) > 3
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
stamps, deadline, started = [], time.monotonic() + seconds, None
try:
    while time.monotonic() < deadline:
        stamps.append(time.monotonic())
        end = time.perf_counter() + 0.0005
        while time.perf_counter() < end:
            pass
        if child and started is None and time.monotonic() > deadline - seconds + 0.3:
            left = str(deadline - time.monotonic())
            started = subprocess.Popen([sys.executable, "-c", sys.argv[4], out + ".child", left])
    if started:
        started.wait()
finally:
    open(out, "w").write(json.dumps(stamps))
"""


def test_two_process_trees_take_turns_and_never_run_at_once(tmp_path):
    first = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path / "first"), "2.5", "child", WRITER]
    )
    second = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path / "second"), "60"])
    try:
        turns = take_turns(first, second, window_s=0.2)
        assert (
            psutil.Process(second.pid).status() != psutil.STATUS_STOPPED
        )  # nothing is left stopped
    finally:
        second.terminate()
        second.wait()

    stamps = [
        (t, "first")
        for name in ("first", "first.child")
        for t in json.loads((tmp_path / name).read_text())
    ]
    stamps += [(t, "second") for t in json.loads((tmp_path / "second").read_text())]
    assert len(json.loads((tmp_path / "first.child").read_text())) > 100  # it ran, in first's turns
    sides = [side for _, side in sorted(stamps)]
    blocks = 1 + sum(a != b for a, b in zip(sides, sides[1:]))
    # About 2.5 s of turns of 0.1-0.3 s: at most 25 turns, plus second alone afterwards. Running at
    # once, the three processes' stamps would interleave thousands of times.
    assert 6 <= blocks <= 27, blocks
    assert turns.first_s > 0.5 and turns.second_s > 0.5, turns


# Records the clock for a while, stops itself (SIGSTOP) as the plain loop does when it is ready to
# time, then records on until its deadline or SIGTERM.
STOPS_ITSELF = r"""
import json, os, signal, sys, time
out, seconds = sys.argv[1], float(sys.argv[2])
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
stamps, deadline, stopped = [], time.monotonic() + seconds, False
try:
    while time.monotonic() < deadline:
        stamps.append(time.monotonic())
        if not stopped and len(stamps) > 1 and stamps[-1] - stamps[0] > 0.3:
            stopped = True
            stamps.append("stopped")
            os.kill(os.getpid(), signal.SIGSTOP)
        end = time.perf_counter() + 0.0005
        while time.perf_counter() < end:
            pass
finally:
    open(out, "w").write(json.dumps(stamps))
"""


def test_a_head_start_lets_both_start_up_and_turns_begin_after_it(tmp_path):
    """A match lets both sides start up at once: the plain loop stops itself when ready to time, and
    quantbench runs on alone until the head start ends; only then do the turns begin."""
    first = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path / "first"), "2.5"])
    second = subprocess.Popen([sys.executable, "-c", STOPS_ITSELF, str(tmp_path / "second"), "60"])
    try:
        turns = take_turns(first, second, window_s=0.2, head_start_s=1.5)
    finally:
        second.terminate()
        second.wait()

    first_stamps = json.loads((tmp_path / "first").read_text())
    second_stamps = json.loads((tmp_path / "second").read_text())
    stop = second_stamps.index("stopped")
    # Before it stopped itself, second ran at the same time as first: their stamps interleave finely
    # (in turns of 0.1-0.3 s they would alternate a few times at most; a loaded machine's scheduler
    # still switches them dozens of times: 48 beside a full test suite and a demo run).
    merged = sorted(
        [(t, "first") for t in first_stamps] + [(t, "second") for t in second_stamps[:stop]]
    )
    sides = [side for t, side in merged if second_stamps[0] <= t <= second_stamps[stop - 1]]
    assert sum(a != b for a, b in zip(sides, sides[1:])) > 12
    # It stayed stopped until the turns began, 1.5 s after first started.
    resumed_s = second_stamps[stop + 1] - first_stamps[0]
    assert resumed_s >= 1.0, resumed_s
    assert turns.second_began_unix is not None and turns.second_s > 0.2, turns
