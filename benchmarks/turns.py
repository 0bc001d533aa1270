"""Two processes taking turns on the CPU, so that a comparison of their timings is fair on a
drifting machine.

A small VM's speed wanders by 10-30% over seconds. Two programs timed one after the other compare
the machine's speed at two moments as much as the programs. Here both run at once, but never at the
same time: each process and all its descendants (a `quantbench run` with its Ray cluster and variant
process, say) is stopped (SIGSTOP) while the other runs, and continued (SIGCONT) for its own turn.
Turns alternate every half to one and a half `window_s`, at random so that nothing periodic lines up
with them, so whatever the machine does over longer than a few turns touches both sides alike; while
one side runs the other does nothing at all, so neither slows the other.

A forward pass that a turn's end cuts in two counts the other side's whole turn: with turns much
longer than a pass, few passes do, and as many on both sides, so a median barely moves.
"""

from __future__ import annotations

import random
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

import psutil

POLL_S = 0.05  # how often a head start asks begin_when


def process_tree(pid: int) -> list[psutil.Process]:
    """The process and all its descendants; empty once it has gone."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _signal_all(processes: list[psutil.Process], signum: int) -> None:
    for process in processes:
        try:
            process.send_signal(signum)
        except psutil.NoSuchProcess:  # it ended meanwhile: nothing to stop or continue
            pass


def stop_tree(pid: int) -> None:
    """Stops the process and its descendants, including any started while it stops them."""
    stopped: set[int] = set()
    while new := [p for p in process_tree(pid) if p.pid not in stopped]:
        _signal_all(new, signal.SIGSTOP)
        stopped.update(p.pid for p in new)


def continue_tree(pid: int) -> None:
    _signal_all(process_tree(pid), signal.SIGCONT)


@dataclass
class Turns:
    first_s: float = 0.0  # seconds of turns each side had
    second_s: float = 0.0
    second_began_unix: float | None = (
        None  # when second's first turn began (Unix time); None if it had none
    )


def take_turns(
    first: subprocess.Popen,
    second: subprocess.Popen,
    window_s: float,
    seed: int = 0,
    head_start_s: float = 0.0,
    begin_when: Callable[[], bool] | None = None,
) -> Turns:
    """Runs the two process trees in turns, first's turn first, until first exits; then lets second
    run alone. Whatever happens, nothing is left stopped.

    With head_start_s the turns begin that much later. Until then both run at once: they start up,
    and a start-up whose time nobody compares need not be spread over turns. Second is to stop
    itself (SIGSTOP) meanwhile, when it is ready to be timed; when the turns begin it is stopped in
    any case (if it stops itself later, in a turn of its own, that turn is lost to both).

    With begin_when the head start lasts until it returns True instead (asked every POLL_S): the
    causal-LM matches begin their turns when quantbench's variant starts generating."""
    rng = random.Random(seed)
    turns = Turns()

    def wait_for_first(
        seconds: float,
    ) -> None:  # a turn, or the head start, ends early when first exits
        try:
            first.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            pass

    try:
        if begin_when is None:
            wait_for_first(head_start_s)
        while begin_when is not None and not begin_when() and first.poll() is None:
            wait_for_first(POLL_S)
        running, waiting = first, second
        while first.poll() is None:
            stop_tree(waiting.pid)  # before the other goes on: never both at once
            continue_tree(running.pid)
            started = time.perf_counter()
            if running is second and turns.second_began_unix is None:
                turns.second_began_unix = time.time()
            wait_for_first(rng.uniform(0.5, 1.5) * window_s)
            if running is first:
                turns.first_s += time.perf_counter() - started
            else:
                turns.second_s += time.perf_counter() - started
            running, waiting = waiting, running
    finally:
        continue_tree(first.pid)
        continue_tree(second.pid)
    return turns


def plain_output(plain: subprocess.Popen, done) -> str:
    """What the plain loop printed, once it has ended: `done` (a path) is touched so that it ends
    with its pass, and it is continued while it waits stopped (quantbench was done first)."""
    done.touch()
    while True:
        try:
            return plain.communicate(timeout=5)[0]
        except subprocess.TimeoutExpired:
            continue_tree(plain.pid)


def check_exits(folder, sides: dict) -> None:
    """Exits naming the command and the tail of its log where a side failed; sides: log file
    name -> its process."""
    for name, process in sides.items():
        if process.returncode != 0:
            raise SystemExit(
                f"{process.args} failed (exit {process.returncode}):\n"
                + (folder / name).read_text()[-3000:]
            )
