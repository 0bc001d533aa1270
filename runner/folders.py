"""The results folder as the file system sees it: who may write it, a file written whole or not at
all, and what a killed run leaves behind.

Plain file-system work, no result is read here (runner/results.py reads them), so the locks
(runner/locks.py) and the model cache use it too.
"""

from __future__ import annotations

import errno
import json
import os
import pwd
import re
import tempfile
from pathlib import Path


class ResultsError(Exception):
    """A results folder the run must not or cannot write: said before anything runs (exit 2)."""


class ResultsConflict(ResultsError):
    pass


class ResultsUnwritable(ResultsError):
    pass


def write_json(path: Path, value: dict) -> Path:
    """value as JSON at path, through a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(handle, 0o666 & ~current_umask())  # mkstemp's 0600 would hide it from other users
        with os.fdopen(handle, "w") as out:
            json.dump(value, out, indent=1, allow_nan=False, default=str)
            out.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# write_result's temporary files: mkstemp's prefix, 8 random characters, its suffix.
TEMPORARY = re.compile(r"\..+-[a-z0-9_]{8}\.tmp")


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Removes the temporary files of results that a killed run was writing; the caller holds the
    folder's lock, so no live run is writing them. Returns what it removed."""
    stale = [
        p
        for p in sorted(Path(folder).glob(".*.tmp"))
        if TEMPORARY.fullmatch(p.name) and p.is_file()
    ]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def cache_root() -> Path:
    """Where prepared models and the files they are made from are kept (QUANTBENCH_CACHE)."""
    return Path(os.environ.get("QUANTBENCH_CACHE", Path.home() / ".cache" / "quantbench"))


def current_umask() -> int:
    """The process's umask: the permissions an ordinary open() would have left out."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_writable(results_dir: Path, jobs: list[str]) -> None:
    """Before anything runs: this user can make each job's results folder and write a file in it.
    The folders the check made are removed again, so a run refused later leaves nothing behind."""
    for job in jobs:
        folder = Path(results_dir) / job
        made = outermost_missing(folder)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            write_probe(folder)
        except (NotADirectoryError, FileExistsError):
            file = next(p for p in (folder, *folder.parents) if p.exists() and not p.is_dir())
            raise ResultsUnwritable(
                f"results folder {folder}: {file} is a file, not a folder; move it away, or "
                "choose another folder with --results"
            ) from None
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ResultsUnwritable(
                    f"results folder {folder}: the disk is full ({error.strerror}); free space "
                    "there, or choose another folder with --results"
                ) from None
            raise ResultsUnwritable(
                f"results folder {folder}: user {_user()} cannot "
                f"{'create' if made else 'write in'} it "
                f"({error.strerror}); give this user write access to it, or choose another folder "
                "with "
                "--results"
            ) from None
        finally:
            remove_if_empty(folder, made)


def write_probe(folder: Path) -> None:
    """Write one byte to a new file in folder, then remove it: a full disk still makes an empty
    file, and refuses the byte."""
    handle, probe = tempfile.mkstemp(prefix=".write-check-", dir=folder)
    try:
        os.write(handle, b"-")
    finally:
        os.close(handle)
        os.unlink(probe)


def outermost_missing(folder: Path) -> Path | None:
    """The outermost of folder and its parents that does not exist yet: what mkdir(parents=True)
    makes."""
    return next((f for f in reversed([folder, *folder.parents]) if not f.exists()), None)


def remove_if_empty(folder: Path, created: Path | None) -> None:
    """The folders made from created down to folder, where nothing was put in them: a check or a run
    refused or stopped before it wrote leaves nothing behind."""
    if created is None:
        return
    for made in [folder, *folder.parents]:
        try:
            made.rmdir()
        except FileNotFoundError:  # never made: mkdir stopped part way down
            pass
        except OSError:  # not empty: it holds results (or another job's folder)
            return
        if made == created:
            return


def _user() -> str:
    uid = os.geteuid()
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"
