"""Stopping `quantbench run` with SIGINT (Ctrl-C) or SIGTERM: the first signal raises Interrupted
where the driver is, so the sweep's `finally` blocks run (the embedded cluster and the fork server
are stopped, a result being written loses its temporary file, the results folder is unlocked), and
the command line says what is kept and how to resume, with exit code 128 + the signal (130, 143).
"""

from __future__ import annotations

import contextlib
import signal

SIGNALS = (signal.SIGINT, signal.SIGTERM)

_active = False  # handled() is in force
_stopping = False  # the first signal came: the cleanup it started must not be cut short


received: int | None = None  # the signal that stopped the run


class Interrupted(KeyboardInterrupt):
    """A KeyboardInterrupt: `except Exception` around a variant's work lets it by, and Ray's waits,
    which look for signals, turn only a KeyboardInterrupt into theirs (anything else raised in
    their signal check became a SystemError). Ray raises a KeyboardInterrupt of its own for it, so
    `received` keeps the signal."""


class HeadLost(Exception):
    """The cluster's head stopped answering while variants ran (runner/cluster.py check_head): the
    run stops as a signal stops it, saying what is kept and how to resume, with exit code 1."""


def exit_code() -> int:
    """128 + the signal, as a shell reports a process that a signal ended: 130 SIGINT, 143
    SIGTERM."""
    return 128 + (received or signal.SIGINT)


def signal_name() -> str:
    return signal.Signals(received or signal.SIGINT).name


def _on_signal(signum, frame) -> None:
    global _stopping, received
    if _stopping:  # a second Ctrl-C while the cluster stops: the stop goes on
        return
    _stopping, received = True, signum
    raise Interrupted(signal.Signals(signum).name)


def install() -> None:
    """(Again) this module's handlers, where handled() is in force: ray.init sets a SIGTERM handler
    of its own (sys.exit(15)), so the sweep calls this once Ray is up."""
    if _active:
        for signum in SIGNALS:
            signal.signal(signum, _on_signal)


@contextlib.contextmanager
def handled():
    """SIGINT and SIGTERM raise Interrupted in the block; the handlers before it come back after."""
    global _active, _stopping, received
    previous = {signum: signal.getsignal(signum) for signum in SIGNALS}
    _active, _stopping, received = True, False, None
    try:
        install()
        yield
    finally:
        _active = False
        for signum, handler in previous.items():
            signal.signal(signum, handler)
