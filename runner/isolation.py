"""Isolation: a CPU variant runs in a process of its own, forked from a server that imported once.

Importing torch and transformers takes 5-10 s on a small machine. A fresh interpreter per variant pays
that every time, and it was most of what a sweep spent outside the variants' work. Here a fork server
(multiprocessing's `forkserver`: a single-threaded process started by the worker) imports them once,
and every variant runs in a new process forked from it: fresh memory peaks, fresh thread pools,
nothing left over from the variant before. The worker only waits on a pipe meanwhile.

A CPU fine-tune comes here too, so the variants after it find the server warm. CUDA work does not: a
CUDA context cannot cross a fork, so it runs in a fresh worker.
"""

from __future__ import annotations

import multiprocessing
import sys
from contextlib import contextmanager
from typing import Any, Callable

# What the server imports before it forks: the heavy, model-independent part of a variant's imports.
PRELOAD = ["torch", "runner.worker", "runner.finetune", "runner.analysis", "transformers.modeling_utils",
           "transformers.models.auto.modeling_auto", "transformers.models.auto.tokenization_auto"]

_context = None


class ProcessDied(RuntimeError):
    """The variant's process ended (killed, crashed, out of memory) before it returned a result."""


def _server(also_import: list[str]):
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD + list(also_import))
    return _context


def run_in_fresh_process(function: Callable[..., Any], *args, also_import: list[str] = ()) -> Any:
    """function(*args) in a new process forked from the warm server; its result or its error.

    also_import: modules the server imports beside PRELOAD when this call starts it (the first call).
    """
    context = _server(also_import)
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(send, function, args), daemon=True)
    with _main_script_not_rerun(function):
        process.start()
    send.close()  # only the child holds the sending end: its death reads as EOF here
    try:
        ok, value = receive.recv()  # blocks; no polling beside the timed passes
    except EOFError:
        process.join()
        raise ProcessDied(f"the variant's process (pid {process.pid}) ended with exit code {process.exitcode} "
                          "before it returned a result (killed, crashed or out of memory)") from None
    finally:
        receive.close()
    process.join()
    if not ok:
        raise RuntimeError(value)
    return value


@contextmanager
def _main_script_not_rerun(function: Callable[..., Any]):
    """multiprocessing runs the parent's main script again in every new process, in case the function
    to run was defined there. A Ray worker's main script is Ray's own worker script: running it again
    imports Ray, 0.4-0.5 s before each variant starts (measured on 2 cores), for nothing, since the
    functions run here live in modules. So the script is hidden while the process starts."""
    main = sys.modules["__main__"]
    if getattr(function, "__module__", None) == "__main__":
        yield
        return
    file = main.__dict__.pop("__file__", None)
    spec, main.__spec__ = getattr(main, "__spec__", None), None  # multiprocessing reads it: None, not absent
    try:
        yield
    finally:
        main.__spec__ = spec
        if file is not None:
            main.__file__ = file


def _die_with_parent() -> None:
    """Linux: this process is killed when the fork server ends (its worker was stopped), never orphaned."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _child(send, function, args) -> None:
    _die_with_parent()
    try:
        outcome = (True, function(*args))
    except BaseException as error:  # reported to the worker, which fails the variant with it
        outcome = (False, f"{type(error).__name__}: {error}")
    send.send(outcome)
    send.close()
