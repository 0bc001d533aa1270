"""Faults a hostile user or an unlucky run brings to the cluster side of a run (issue 18, must-haves 1-3).

Real processes and real sockets: a loopback Ray cluster started here with `ray start` and temp folders
of its own (stopped by PID, never `ray stop`), a raylet killed with SIGKILL, connections held open and
never written to, a web server where a Ray head should be. Each test checks what is kept, what is said,
the exit code, and that no process it started is left running.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import psutil
import pytest

from runner import isolation

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def call_through(server: isolation.ForkServer, timeout_s: float) -> subprocess.CompletedProcess:
    """A caller in a process of its own, as a Ray worker is, using the server named in its environment."""
    code = "import os; from runner import isolation; print(isolation.run_in_fresh_process(os.getpid))"
    env = {**os.environ, isolation.ADDRESS_VARIABLE: server.describe(), "PYTHONPATH": REPO}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout_s,
                          cwd=REPO, env=env)


def held_connection(server: isolation.ForkServer) -> socket.socket:
    """A connection to the fork server that never sends a byte, as `nobody` made in the red-team run."""
    held = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    held.connect(server.address)
    return held


def test_a_connection_that_never_sends_stalls_no_other_call():
    server = isolation.start_server()
    try:
        assert call_through(server, timeout_s=120).returncode == 0  # the server has imported: calls are quick
        held = [held_connection(server) for _ in range(3)]
        started = time.monotonic()
        for _ in range(2):
            shown = call_through(server, timeout_s=60)
            assert shown.returncode == 0 and shown.stdout.strip().isdigit(), shown.stderr[-2000:]
        # A call is about 1 s here (the caller's interpreter start); before, each waited behind the held ones forever.
        assert time.monotonic() - started < 30
        for connection in held:
            connection.close()
    finally:
        server.stop()
    assert server.process.poll() is not None


def test_a_connection_that_never_sends_is_dropped_after_the_deadline(monkeypatch):
    monkeypatch.setattr(isolation, "AUTHENTICATION_DEADLINE_S", 1)  # the server takes it from its starter
    server = isolation.start_server()
    try:
        held = held_connection(server)
        held.settimeout(60)
        started = time.monotonic()
        received = b""
        while True:  # the challenge, then end of file when the supervisor gives up
            chunk = held.recv(4096)
            if not chunk:
                break
            received += chunk
        waited = time.monotonic() - started
        assert received, "the server sent no challenge"
        assert waited < 30, waited  # the server may still be importing when it accepts
        held.close()
    finally:
        server.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_another_users_process_is_turned_away_before_a_byte_is_read():
    import pwd

    nobody = pwd.getpwnam("nobody").pw_uid
    server = isolation.start_server()
    code = (f"import socket, os; os.setuid({nobody}); s = socket.socket(socket.AF_UNIX); "
            f"s.connect({server.address!r}); s.settimeout(20); print(repr(s.recv(100)))")
    try:
        assert call_through(server, timeout_s=120).returncode == 0  # imported: it accepts at once from now on
        shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        # Closed at once, no challenge sent: it never reaches the key check or a supervisor.
        assert shown.returncode == 0 and shown.stdout.strip() == "b''", shown.stdout + shown.stderr[-2000:]
        assert call_through(server, timeout_s=60).returncode == 0  # it still serves its own user
    finally:
        server.stop()
