"""A run that could not write its results stops before anything runs, saying which folder and
who."""

from __future__ import annotations

import errno
import os
import pwd
import shutil
import tempfile
from pathlib import Path

import pytest

from runner import cli
from runner.folders import ResultsUnwritable, check_writable
from tests.conftest import rt_job, write_job


def test_a_results_folder_that_is_a_file_stops_the_run_before_ray(
    capsys, tmp_path, tiny_model, ray_temp_dir
):
    job = write_job(tmp_path / "jobs", rt_job(tiny_model, variants="[fp32-cpu]"))
    results = tmp_path / "results"
    results.write_text("not a folder")

    code = cli.main(["run", str(job), "--results", str(results), "--ray-temp-dir", ray_temp_dir])

    out = capsys.readouterr()
    assert code == 2
    assert f"results folder {results / 'tiny-rt'}: {results} is a file, not a folder" in out.err
    assert "--results" in out.err
    assert "cluster:" not in out.out  # no Ray, no variant
    assert results.read_text() == "not a folder"


@pytest.mark.skipif(os.geteuid() != 0, reason="becomes another user (nobody), which needs root")
def test_another_users_folder_is_refused_naming_the_user_and_the_check_leaves_nothing():
    """As nobody, a root-owned 0755 folder: the check says who cannot do what, and the folders it
    tried to make are gone again."""
    folder = Path(tempfile.mkdtemp(prefix="qb-results-"))
    try:
        folder.chmod(0o755)
        nobody = pwd.getpwnam("nobody")
        read, write = os.pipe()
        child = os.fork()
        if child == 0:  # the child becomes nobody and sends back what the check said
            os.close(read)
            message = b"no refusal"
            try:
                os.setgid(nobody.pw_gid)
                os.setuid(nobody.pw_uid)
                check_writable(folder / "deeper", ["job"])
            except ResultsUnwritable as error:
                message = str(error).encode()
            finally:
                os.write(write, message)
                os._exit(0)
        os.close(write)
        with os.fdopen(read, "rb") as said:
            message = said.read().decode()
        os.waitpid(child, 0)
        assert message.startswith(
            f"results folder {folder / 'deeper' / 'job'}: user nobody (uid {nobody.pw_uid})"
        )
        assert "cannot create it (Permission denied)" in message
        assert list(folder.iterdir()) == []
    finally:
        shutil.rmtree(folder)


def test_a_writable_folder_passes_and_the_check_leaves_nothing_behind(tmp_path):
    (tmp_path / "results" / "a").mkdir(parents=True)
    check_writable(tmp_path / "results", ["a", "b"])
    assert [p.name for p in (tmp_path / "results").iterdir()] == [
        "a"
    ]  # b was made, probed, removed
    assert not any((tmp_path / "results").rglob("*.write-check-*"))


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_is_refused_as_full_and_the_check_leaves_nothing(tmp_path, monkeypatch):
    # A full tmpfs still makes an empty file: the check writes a byte, which it refuses.
    monkeypatch.setattr(os, "write", no_space)
    with pytest.raises(ResultsUnwritable) as refused:
        check_writable(tmp_path / "results", ["job"])
    monkeypatch.undo()
    assert str(refused.value) == (
        f"results folder {tmp_path / 'results' / 'job'}: the disk is full (No space left on "
        "device); free space there, or choose another folder with --results"
    )
    assert list(tmp_path.iterdir()) == []


def test_a_disk_that_fills_before_the_lock_leaves_no_folder_and_no_lock(
    capsys, tmp_path, tiny_model, monkeypatch
):
    from runner import locks

    job = write_job(tmp_path / "jobs", rt_job(tiny_model, variants="[fp32-cpu]"))
    results = tmp_path / "results"
    monkeypatch.setattr(locks, "write_holder", no_space)  # the lock file is made, its text is not
    code = cli.main(["run", str(job), "--results", str(results)])
    out = capsys.readouterr()
    assert code == 2, out.err
    assert "No space left on device" in out.err and "Traceback" not in out.err
    assert not results.exists(), list(results.rglob("*"))
