"""Advisory locks (fcntl.flock): one run writes a job's results folder, and one variant on a machine
runs its clock at a time, across every quantbench run there.

The kernel drops a flock when its holder dies, however it dies, so a killed run never leaves a lock
held; the file may stay, and the next run takes it. A lock file says who holds it (pid, host,
command, since when), so whoever is refused can say whom it waits for.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import pwd
import socket
import sys
import time
from pathlib import Path

from runner import folders, measure, progress

# The job folder's lock: a dot file, which collect and report never read (they read *.json).
RESULTS_LOCK = ".quantbench.lock"
# One file for the machine, in a place every user and every Ray worker of this machine sees. Not
# under XDG_RUNTIME_DIR: that folder is per user, and two users' runs share the cores too.
TIMING_LOCK = "/tmp/quantbench-timing.lock"
TIMING_LOCK_VARIABLE = "QUANTBENCH_TIMING_LOCK"  # another path, for tests
# How long a variant waits for another run's clock. A bound, because any local user can hold the
# file: after it the variant times anyway, with a warning, rather than stall the sweep.
TIMING_LOCK_TIMEOUT_S = 900.0
# How often a bounded wait asks again (flock has no timeout); 4 wake-ups a second cost a timed
# neighbour nothing measurable (a process waking 250 times a second did not, see evaluate.py).
POLL_S = 0.25


class LockHeld(Exception):
    """The lock is held by someone else; `holder` says who, as the lock file says it."""

    def __init__(self, path: Path, holder: str):
        super().__init__(f"{path} is locked by {holder}")
        self.path, self.holder = path, holder


def holder_record(what: str) -> str:
    return json.dumps(
        {"pid": os.getpid(), "host": socket.gethostname(), "command": what, "since": measure.now()}
    )


def describe_holder(text: str) -> str:
    """The lock file's record as words; a file just created may not have it yet."""
    try:
        record = json.loads(text)
        return (
            f"pid {record['pid']} on {record['host']} ({record['command']}), "
            f"holding it since {record['since']}"
        )
    except (ValueError, TypeError, KeyError):
        return "a process that has not said who it is yet (it may have just started)"


def read_holder(fd: int) -> str:
    try:
        return describe_holder(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
    except OSError:
        return describe_holder("")


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as error:
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
        raise


def flock_within(fd: int, timeout_s: float, on_wait=None) -> float | None:
    """Seconds waited for the lock on fd, or None when timeout_s passed first. on_wait(holder) is
    called once, when it has to wait. timeout_s inf: block in the kernel until it is free."""
    if _try_flock(fd):
        return 0.0
    started = time.monotonic()
    if on_wait:
        on_wait(read_holder(fd))
    if timeout_s == float("inf"):
        fcntl.flock(fd, fcntl.LOCK_EX)
        return time.monotonic() - started
    while time.monotonic() - started < timeout_s:
        time.sleep(min(POLL_S, max(0.0, timeout_s - (time.monotonic() - started))))
        if _try_flock(fd):
            return time.monotonic() - started
    return None


def write_holder(fd: int, what: str) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, holder_record(what).encode(), 0)


class ResultsLocked(folders.ResultsConflict):
    """Another run writes this job's results folder, or its lock cannot be made (cli: exit 2)."""


def lock_job_folder(
    folder: Path, command: str, wait_s: float | None, say
) -> tuple[int, Path | None]:
    """(the lock's fd, the outermost folder this call made, if any). wait_s None: refuse at once
    when held.

    The holder removes the file as it lets go, so a waiter may end up locking a file no longer at
    the path: it checks that what it locked is still there, and tries again if not."""
    created = folders.outermost_missing(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path, deadline, told = folder / RESULTS_LOCK, time.monotonic() + (wait_s or 0.0), []

    def waiting(holder: str) -> None:
        if not told:
            told.append(holder)
            until = "until it ends" if wait_s == float("inf") else f"up to {wait_s:g} s"
            say(
                f"waiting for {folder}: another run is writing it: {holder}; waiting {until} "
                "(--wait-for-lock)"
            )

    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        except OSError:  # a refused run leaves no folder behind
            folders.remove_if_empty(folder, created)
            raise
        waited = flock_within(
            fd, max(0.0, deadline - time.monotonic()), waiting if wait_s else None
        )
        if waited is None:
            holder = read_holder(fd)
            os.close(fd)
            folders.remove_if_empty(folder, created)
            raise ResultsLocked(_refusal(folder, holder, wait_s))
        if _same_file(fd, path):
            try:
                write_holder(fd, command)
            except OSError:  # a full disk: no 0-byte lock, no empty folder left
                unlock_job_folder(folder, fd, created)
                raise
            return fd, created
        os.close(fd)


def _refusal(folder: Path, holder: str, wait_s: float | None) -> str:
    waited = (
        f"is still being written by another run after {wait_s:g} s"
        if wait_s
        else "is being written by another run"
    )
    return (
        f"{folder} {waited}: {holder}. Let that run finish (or stop it), wait for it with "
        "--wait-for-lock [SECONDS], or write these results elsewhere with --results NEW_FOLDER"
    )


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False))
    except FileNotFoundError:
        return False


def unlock_job_folder(folder: Path, fd: int, created: Path | None) -> None:
    """Removes the lock file while holding it (a waiter then sees it gone and takes a new one)."""
    with contextlib.suppress(OSError):
        (folder / RESULTS_LOCK).unlink()
    os.close(fd)
    folders.remove_if_empty(folder, created)


@contextlib.contextmanager
def job_folders_locked(results_dir: Path, jobs: list[str], command: str, wait_s: float | None, say):
    """Every job's folder under results_dir locked for the block, in name order (two runs that share
    jobs and both wait can never hold one each and wait for the other's)."""
    held = []
    try:
        for job in sorted(set(jobs)):
            folder = Path(results_dir) / job
            try:
                held.append((folder, *lock_job_folder(folder, command, wait_s, say)))
            except OSError as error:
                raise ResultsLocked(
                    f"cannot lock {folder / RESULTS_LOCK}: {error.strerror}; "
                    "check that the results folder is a folder you can write, "
                    "or name another with --results NEW_FOLDER"
                ) from None
            for path in folders.remove_stale_temporaries(
                folder
            ):  # no live run writes it: we hold the lock
                say(
                    f"removed {path}: part of a result left by a run that was killed while "
                    "writing it"
                )
        yield
    finally:
        for folder, fd, created in reversed(held):
            unlock_job_folder(folder, fd, created)


def timing_lock_path() -> str:
    return os.environ.get(TIMING_LOCK_VARIABLE) or TIMING_LOCK


def _open_shared(path: str) -> tuple[int, bool]:
    """(fd, writable) of the machine's lock file, made on first use. A file of another user's in
    /tmp cannot be opened with O_CREAT (protected_regular), so it is opened first and made only if
    missing; never through a link someone else put there."""
    flags = os.O_NOFOLLOW | os.O_CLOEXEC
    while True:
        try:
            return os.open(path, os.O_RDWR | flags), True
        except PermissionError:  # made read-only for others: flock needs no more than reading
            return os.open(path, os.O_RDONLY | flags), False
        except FileNotFoundError:
            pass
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | flags, 0o666)
        except FileExistsError:  # another run made it first
            continue
        os.fchmod(fd, 0o666)  # every user's runs take it and say who holds it, whatever the umask
        return fd, True


def timing_lock_holder() -> str | None:
    """Who holds the machine's timing lock now, in words (None: nobody, or no lock file yet).

    It looks without waiting: a shared lock tried and let go at once (a variant that tries in that
    instant waits one poll, POLL_S). The pid, host and command are what the lock file says (any
    local user can write it); the user is the pid's owner where that pid runs here."""
    path = timing_lock_path()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace")
        return describe_holder(text) + _owner_of(text)
    else:
        return None
    finally:
        os.close(fd)  # lets go of the shared lock too


def _owner_of(text: str) -> str:
    """The lock file's pid's owner (", user NAME") where it runs on this host; else ""."""
    try:
        record = json.loads(text)
        if record["host"] != socket.gethostname():
            return ""
        uid = os.stat(f"/proc/{int(record['pid'])}").st_uid
    except (ValueError, TypeError, KeyError, OSError):
        return ""
    try:
        return f", user {pwd.getpwuid(uid).pw_name}"
    except KeyError:
        return f", uid {uid}"


def timing_lock_notice(timeout_s: float = TIMING_LOCK_TIMEOUT_S) -> str | None:
    """What `run` says as it starts when another run holds the machine's timing lock: whom each
    variant's timed passes will wait for, and how long at most."""
    holder = timing_lock_holder()
    if holder is None:
        return None
    return (
        f"note: the machine's timing lock {timing_lock_path()} is held by {holder}: each variant "
        f"on this machine waits for it before its warm-up, at most {timeout_s:g} s, then times "
        "anyway with a warning; `run` says when a variant waits"
    )


class TimingLock:
    """What became of the wait: seconds waited, and a warning when the clock ran unserialized."""

    def __init__(self, path: str):
        self.path, self.waited_s, self.warning = path, 0.0, None


def _say_on_stderr(text: str) -> None:
    print(
        f"quantbench: {text}", file=sys.stderr, flush=True
    )  # a Ray worker's log, or a test's pipe


@contextlib.contextmanager
def timing_lock(what: str, timeout_s: float = TIMING_LOCK_TIMEOUT_S, say=_say_on_stderr):
    """The machine's timing lock for the block: no other quantbench run's clock runs meanwhile.
    what: who holds it, in words (the job and the variant). Never raises for the lock's sake."""
    lock = TimingLock(timing_lock_path())
    try:
        fd, writable = _open_shared(lock.path)
    except OSError as error:
        lock.warning = (
            f"timed without the machine's timing lock: cannot open {lock.path} ({error.strerror}): "
            "another quantbench run on this machine may have timed at the same time"
        )
        yield lock
        return

    shown = contextlib.ExitStack()  # the wait as a progress phase, which `run` shows

    def waiting(holder: str) -> None:
        say(
            f"{what}: waiting for the machine's timing lock {lock.path}, held by {holder}: the "
            "clock starts "
            f"when that run's timed passes end (waits at most {timeout_s:g} s)"
        )
        shown.enter_context(
            progress.phase(
                f"waiting for the timing lock (at most {timeout_s:g} s), held by {holder}"
            )
        )

    try:
        with shown:
            waited = flock_within(fd, timeout_s, waiting)
        lock.waited_s = timeout_s if waited is None else waited
        if waited is None:
            lock.warning = (
                f"timed beside another run: the machine's timing lock {lock.path} was still held "
                "after "
                f"{timeout_s:g} s, by {read_holder(fd)}; latencies may be too high"
            )
        elif writable:
            write_holder(fd, what)
        yield lock
    finally:
        if writable and lock.warning is None:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)  # nobody holds it now
        os.close(fd)  # lets go of it
