"""A cluster address that does not answer is reported in seconds, as the other cluster errors are
(exit 2).

Ray itself retries such an address for minutes (`quantbench run --address 127.0.0.1:PORT` with
nothing there was still running after 10 minutes, printing only Ray's "Failed to get cluster ID from
GCS server"), so cluster.connect() checks the address on TCP before it calls ray.init.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, rt_job, write_job

from runner import cluster

QUANTBENCH = Path(sys.executable).with_name("quantbench")


@contextlib.contextmanager
def port_nobody_listens_on():
    """A port bound here and never listened on: connections to it are refused, and no one else can
    take it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@contextlib.contextmanager
def listening_port():
    """A port that answers as a gRPC server does (a Ray head's GCS or Ray Client port): an HTTP/2
    SETTINGS frame sent at once, unasked (tests/test_faults_cluster.py tries a real GCS)."""
    from test_faults_cluster import HTTP2_SETTINGS, peer_that_says

    with peer_that_says(HTTP2_SETTINGS) as port:
        yield port


def run_quantbench(*args: str, env: dict, timeout_s: float) -> tuple[int, str, float]:
    """The installed command, as a user runs it, in its own process group; killed (group and all) at
    the timeout."""
    started = time.monotonic()
    process = subprocess.Popen(
        [str(QUANTBENCH), *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # our own child's group, by its id
        out, _ = process.communicate()
        pytest.fail(f"quantbench {' '.join(args)} still ran after {timeout_s:g} s:\n{out[-3000:]}")
    return process.returncode, out, time.monotonic() - started


def user_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH_"))}
    env.update(RAY_USAGE_STATS_ENABLED="0", **extra)
    return env


def test_run_against_an_address_where_nothing_listens_exits_2_in_seconds(tmp_path, tiny_model):
    job = write_job(tmp_path / "jobs", rt_job(tiny_model, n=8))
    results = tmp_path / "results"
    with port_nobody_listens_on() as port:
        address = f"127.0.0.1:{port}"
        code, out, seconds = run_quantbench(
            "run",
            str(job),
            "--results",
            str(results),
            "--address",
            address,
            env=user_env(),
            timeout_s=90,
        )

    assert code == 2, out
    assert seconds < 30, f"it took {seconds:.0f} s\n{out}"
    assert "quantbench: cannot reach the Ray cluster" in out, out
    assert f"{address} (given by --address)" in out, out
    assert "connection refused" in out, out
    assert f"ray start --head --port={port}" in out, out
    assert "Traceback" not in out, out
    assert not list(results.rglob("*.json")), "nothing may be written"


def test_an_address_from_RAY_ADDRESS_is_named_as_such(monkeypatch):
    with port_nobody_listens_on() as port:
        monkeypatch.setenv("RAY_ADDRESS", f"ray://127.0.0.1:{port}")
        started = time.monotonic()
        with pytest.raises(ConnectionError) as raised:
            cluster.connect(None)
    message = str(raised.value)
    assert time.monotonic() - started < 10
    assert f"ray://127.0.0.1:{port} (from RAY_ADDRESS)" in message, message
    assert "connection refused" in message and f"--ray-client-server-port={port}" in message, (
        message
    )


@pytest.mark.parametrize("form", ["127.0.0.1:{port}", "localhost:{port}", "ray://127.0.0.1:{port}"])
def test_an_address_that_answers_passes_the_check(form):
    with listening_port() as port:
        assert cluster.check_address(form.format(port=port), "--address") is True  # raises nothing


@pytest.mark.parametrize("address", ["auto", "local", "ray://auto", "anyscale://my-cluster"])
def test_what_ray_resolves_itself_is_left_to_ray(address, monkeypatch):
    def connect(*args, **kwargs):
        raise AssertionError(f"{address} was checked: {args}")

    monkeypatch.setattr(socket, "create_connection", connect)
    assert (
        cluster.check_address(address, "--address") is False
    )  # so a failure is not said to have answered


@pytest.mark.parametrize(
    "error, says",
    [
        (socket.gaierror(-2, "Name or service not known"), "unknown host 'head.example'"),
        (TimeoutError("timed out"), "no answer within"),
        (OSError(101, "Network is unreachable"), "Network is unreachable"),
    ],
)
def test_each_way_of_not_answering_is_said(error, says, monkeypatch):
    def connect(*args, **kwargs):
        raise error

    monkeypatch.setattr(socket, "create_connection", connect)
    with pytest.raises(ConnectionError) as raised:
        cluster.check_address("head.example:6379", "--address")
    message = str(raised.value)
    assert message.startswith("head.example:6379 (given by --address): ") and says in message, (
        message
    )
    assert "ray start --head --port=6379" in message, message


def test_a_dashboard_address_is_refused_saying_which_addresses_run_takes(tmp_path, tiny_model):
    # The form `ray job submit --address` takes: a user easily gives it to quantbench run too.
    job = write_job(tmp_path / "jobs", rt_job(tiny_model, n=8))
    code, out, _ = run_quantbench(
        "run",
        str(job),
        "--results",
        str(tmp_path / "results"),
        "--address",
        "http://127.0.0.1:8265",
        env=user_env(),
        timeout_s=90,
    )
    assert code == 2, out
    assert (
        "http://127.0.0.1:8265 (given by --address) is a web address" in out
        and "ray://HOST:PORT" in out
    ), out
    assert "Traceback" not in out, out


@pytest.mark.parametrize("value", ["nan", "inf", "-5", "abc"])
def test_a_placement_timeout_that_is_not_a_finite_wait_is_refused(
    tmp_path, tiny_model, capsys, value
):
    from runner.cli import main

    job = write_job(tmp_path / "jobs", rt_job(tiny_model, n=8))
    with pytest.raises(SystemExit) as exit_:
        main(["run", str(job), "--placement-timeout", value])
    assert exit_.value.code == 2 and "--placement-timeout" in capsys.readouterr().err
