"""Progress on long work: each phase's start and end, and how far it is, with the time it took.

Two sides. Where the work runs (a variant's process, a fine-tune's, a study step's, `report`'s), a
phase is opened with `phase(name, total, unit)` and advanced as it goes; it sends an event at its
start and its end, and between them at most one every SEND_EVERY_S. Where the user looks, a
Display turns events into a progress bar when its stream is a terminal, and into plain lines
otherwise (a log, `ray job submit`): at most one line every PLAIN_EVERY_S for each piece of work,
besides each phase's start and end, so that a log is not flooded; and nothing of a phase that ends
within QUIET_S, so that a quick variant is one line, as before.

How a variant's events reach `quantbench run`: the variant runs in a process forked under a Ray
worker, whose output goes to Ray's log files, and the embedded cluster forwards none of it
(log_to_driver is off and it has no log monitor). So the driver names a file in FILE_VARIABLE,
which the cluster's processes inherit; the work appends one JSON line per event to it, and the
driver reads the new lines while it waits for results (Relay). Where the variable is unset or
its folder is not on this node's disk (a node of a cluster joined by address), events are said as
plain lines on stderr: the Ray worker's log.

Sending an event is a clock reading and, rarely, one short write: the timed passes advance their
phase between passes, after a pass's clock has stopped and before the next one starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

FILE_VARIABLE = "QUANTBENCH_PROGRESS_FILE"
SEND_EVERY_S = 1.0  # from the work to the display: a bar moves about once a second
PLAIN_EVERY_S = 10.0  # plain lines: at most one per piece of work this often, besides start/end
# A phase shorter than this says nothing (the variant's own line says it ended); one that lasts
# says its start once it has run this long, then its counts and its end. The variable sets it
# (0: every phase, as tests want).
QUIET_VARIABLE, QUIET_S = "QUANTBENCH_PROGRESS_QUIET_S", 5.0
BAR_WIDTH = 24


@dataclass
class Event:
    """One step of a phase: its start, an update, or its end (ok or not)."""

    who: str  # the piece of work: "demo fp16-cpu", "fine-tune demo", "report"
    phase: str  # "load", "timed passes", ...
    state: str  # "start", "update", "end" or "failed"
    done: int | None = None
    total: int | None = None
    unit: str = ""
    elapsed_s: float = 0.0


def describe(event: Event) -> str:
    """The event as a plain line: "[demo fp16-cpu] timed passes 40/100 passes, 12.3 s"."""
    head = f"[{event.who}] {event.phase}"
    if event.state == "start":
        return f"{head}: started" + (f", {event.total} {event.unit}" if event.total else "")
    count = _count(event)
    if event.state == "end":
        return f"{head}: done" + (f", {count}" if count else "") + f" in {event.elapsed_s:.1f} s"
    if event.state == "failed":
        return f"{head}: failed after {event.elapsed_s:.1f} s" + (f" at {count}" if count else "")
    return (
        f"{head} {count}, {event.elapsed_s:.1f} s" if count else f"{head}, {event.elapsed_s:.1f} s"
    )


def _count(event: Event) -> str:
    if event.done is None:
        return ""
    if event.total:
        return f"{event.done}/{max(event.total, event.done)} {event.unit}".rstrip()
    return f"{event.done} {event.unit}".rstrip()


def bar(event: Event) -> str:
    """The event as one terminal line: "[demo fp16-cpu] timed passes [#####.....] 40/100 12 s"."""
    if event.state in ("end", "failed") or not event.total or event.done is None:
        return describe(event)
    filled = round(BAR_WIDTH * min(event.done, event.total) / event.total)
    marks = "#" * filled + "." * (BAR_WIDTH - filled)
    return f"[{event.who}] {event.phase} [{marks}] {_count(event)} {event.elapsed_s:.0f} s"


class Display:
    """Events shown on a stream: a bar redrawn in place on a terminal, else rate-limited lines;
    of a phase that ends within quiet_s, nothing is kept."""

    def __init__(
        self, stream=None, terminal: bool | None = None, clock=time.monotonic, quiet_s=None
    ):
        self.given = stream  # None: whatever sys.stderr is when a line is written
        self.terminal = _is_terminal(self.stream) if terminal is None else terminal
        self.clock = clock
        self.quiet_s = _quiet_s() if quiet_s is None else quiet_s
        self.last_line: dict[str, float] = {}  # who -> when its last plain update was written
        self.waiting: dict[tuple[str, str], tuple[float, Event]] = {}  # starts not said yet
        self.drawn = False  # a bar is on the terminal's current line

    def show(self, event: Event) -> None:
        if self.terminal:
            self._draw(event)
            return
        self.tick()
        key, now = (event.who, event.phase), self.clock()
        if event.state == "start":
            self.waiting[key] = (now, event)
            return
        quick = event.elapsed_s < self.quiet_s
        if event.state == "update":
            if quick or now - self.last_line.get(event.who, -1e9) < PLAIN_EVERY_S:
                return
            self._say_start(key)
        elif self.waiting.pop(key, None) and quick and event.state == "end":
            return  # a quick phase ended before its start was said: nothing to say
        self.last_line[event.who] = now
        self._write(describe(event) + "\n")

    def tick(self) -> None:
        """Says the starts of phases still running quiet_s after they began."""
        now = self.clock()
        for key, (since, _) in list(self.waiting.items()):
            if now - since >= self.quiet_s:
                self._say_start(key)

    def _say_start(self, key: tuple[str, str]) -> None:
        if key in self.waiting:
            self._write(describe(self.waiting.pop(key)[1]) + "\n")

    def _draw(self, event: Event) -> None:
        # A phase that failed or took a while is kept as a line; the rest is redrawn over.
        kept = event.state == "failed" or (event.state == "end" and event.elapsed_s >= self.quiet_s)
        if event.state == "end" and not kept:
            self.clear()
            return
        self._write("\r\x1b[K" + bar(event) + ("\n" if kept else ""))
        self.drawn = not kept

    def clear(self) -> None:
        """Before other output on the same terminal: the bar's line is emptied."""
        if self.drawn:
            self._write("\r\x1b[K")
            self.drawn = False

    @property
    def stream(self):
        return self.given if self.given is not None else sys.stderr

    def _write(self, text: str) -> None:
        # What was said on stdout first: in a log that holds both streams, lines keep their order.
        try:
            if self.stream is not sys.stdout:
                sys.stdout.flush()
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # a closed or broken stream: the line is lost, not the work
            pass


def _quiet_s() -> float:
    try:
        return max(0.0, float(os.environ.get(QUIET_VARIABLE, QUIET_S)))
    except ValueError:  # a malformed setting: the default, never a failed run
        return QUIET_S


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or stream-less object: no terminal
        return False


def saying_between(say: Callable[[str], None], display: Display) -> Callable[[str], None]:
    """say, first clearing a bar the display has drawn, so a line never lands behind a bar."""

    def say_clearly(text: str) -> None:
        display.clear()
        say(text)
        sys.stdout.flush()  # before the next progress line on stderr, in a log that holds both

    return say_clearly


# ---------------------------------------------------------------------------------------------
# The work's side.


@dataclass
class Reporter:
    """Where a piece of work's events go; `send` is called for each one that is due."""

    who: str
    send: Callable[[Event], None]
    clock: Callable[[], float] = time.monotonic
    every_s: float = SEND_EVERY_S


@dataclass
class Phase:
    """An open phase: advance it as it goes; an update is sent only when one is due."""

    reporter: Reporter
    name: str
    total: int | None
    unit: str
    started: float
    done: int = 0
    next_due: float = 0.0

    def advance(self, by: int = 1) -> None:
        self.set(self.done + by)

    def set(self, done: int, total: int | None = None) -> None:
        self.done = done
        self.total = total if total is not None else self.total
        now = self.reporter.clock()
        if now >= self.next_due:
            self.next_due = now + self.reporter.every_s
            self._send("update", now)

    def _send(self, state: str, now: float) -> None:
        done = self.done if (self.total or self.done) else None
        event = Event(
            self.reporter.who, self.name, state, done, self.total, self.unit, now - self.started
        )
        self.reporter.send(event)


# The reporter of the work this process runs: one piece at a time (a variant's process, a
# fine-tune's, `report`'s), with its phases deep in the call tree (evaluate, a task's worker).
# Passing it through every task's interface would widen them for what is only output.
_reporter: Reporter | None = None


def start(who: str, send: Callable[[Event], None] | None = None) -> Reporter:
    """The piece of work this process runs from now on, and where its events go (by default: the
    driver's file where it is on this disk, else plain lines on stderr)."""
    global _reporter
    _reporter = Reporter(who, send or default_sink())
    return _reporter


@contextlib.contextmanager
def phase(name: str, total: int | None = None, unit: str = "") -> Iterator[Phase]:
    """A phase of the current work: its start and its end (or failure) are sent, with the time."""
    reporter = _reporter or Reporter("quantbench", lambda event: None)
    now = reporter.clock()
    step = Phase(reporter, name, total, unit, now, next_due=now + reporter.every_s)
    step._send("start", now)
    try:
        yield step
    except BaseException:
        step._send("failed", reporter.clock())
        raise
    step._send("end", reporter.clock())


def default_sink() -> Callable[[Event], None]:
    """Append to the driver's file when it names one on this disk; else plain lines on stderr."""
    path = os.environ.get(FILE_VARIABLE)
    if path and Path(path).parent.is_dir():
        return lambda event: _append(path, event)
    return Display(sys.stderr, terminal=False).show


def _append(path: str, event: Event) -> None:
    # One write of one short line with O_APPEND: lines of processes writing at once never mix.
    line = (json.dumps(asdict(event)) + "\n").encode()
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(descriptor, line)
        finally:
            os.close(descriptor)
    except OSError:  # a full disk, a folder removed: the line is lost, never the variant
        pass


# ---------------------------------------------------------------------------------------------
# The driver's side.


class Relay:
    """The driver's reading of the work's events from the file it named: `forward` shows the lines
    added since the last call."""

    def __init__(self, path: Path, display: Display):
        self.path = path
        self.display = display
        self.offset = 0

    def forward(self) -> None:
        try:
            with open(self.path, "rb") as file:
                file.seek(self.offset)
                new = file.read()
        except FileNotFoundError:  # nothing sent yet
            return
        complete = new[: new.rfind(b"\n") + 1]  # a line still being written waits for the next call
        self.offset += len(complete)
        for line in complete.splitlines():
            try:
                self.display.show(Event(**json.loads(line)))
            except (ValueError, TypeError):  # not ours: never stop a run for a progress line
                continue
        if not self.display.terminal:
            self.display.tick()  # a phase that has run quiet_s says its start, news or not


# The relay of the run this process drives, while one is open: the dispatcher forwards its events
# each time it wakes to look for results (about once a second).
_relay: Relay | None = None


@contextlib.contextmanager
def relayed(say: Callable[[str], None]) -> Iterator[Callable[[str], None]]:
    """For a run: a file whose name the cluster's processes inherit (so set before the cluster
    starts), read while the driver waits. Yields say, made to clear a bar before it speaks."""
    global _relay
    display = Display()
    saved = os.environ.get(FILE_VARIABLE)
    with tempfile.TemporaryDirectory(prefix="quantbench-progress-") as folder:
        os.environ[FILE_VARIABLE] = str(Path(folder) / "events.jsonl")
        _relay = Relay(Path(os.environ[FILE_VARIABLE]), display)
        try:
            yield saying_between(say, display)
        finally:
            _relay.forward()
            display.clear()
            _relay = None
            if saved is None:
                os.environ.pop(FILE_VARIABLE, None)
            else:
                os.environ[FILE_VARIABLE] = saved


def forward() -> None:
    """The events sent since the last call, shown (nothing when no run is relayed here)."""
    if _relay is not None:
        _relay.forward()
