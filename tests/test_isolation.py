"""Each CPU variant runs in a new process forked from a warm fork server: its result, its error or
its death comes back to the worker, and nothing of one run is left in the next."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from runner import isolation

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code: str, timeout: float = 300, env: dict | None = None):
    """`python -c code` in a process of its own, from the checkout: its server starts with it."""
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=env,
    )


_STATE = []


def remember_and_report(value):
    _STATE.append(value)
    return {"pid": os.getpid(), "state": list(_STATE)}


def fail(message):
    raise ValueError(message)


def test_each_call_runs_in_a_new_process_with_nothing_left_from_the_last():
    first = isolation.run_in_fresh_process(remember_and_report, "a")
    second = isolation.run_in_fresh_process(remember_and_report, "b")
    assert first["pid"] != second["pid"] and os.getpid() not in (first["pid"], second["pid"])
    assert first["state"] == ["a"] and second["state"] == [
        "b"
    ]  # a fresh copy of the server each time
    assert _STATE == []  # and nothing ran in this process


def test_an_error_in_the_process_comes_back_as_an_error():
    with pytest.raises(RuntimeError, match="ValueError: the variant broke"):
        isolation.run_in_fresh_process(fail, "the variant broke")


def test_a_process_that_dies_is_reported_with_its_exit_code():
    with pytest.raises(isolation.ProcessDied, match="exit code 7"):
        isolation.run_in_fresh_process(os._exit, 7)


def already_imported(name):
    return name in sys.modules


def test_the_server_imports_beforehand_what_its_first_call_names(tmp_path):
    # The server starts once per process, so a process of its own shows what its first call did.
    code = (
        "from runner import isolation; from tests.test_isolation import already_imported as seen; "
        "print(isolation.run_in_fresh_process(seen, 'colorsys', also_import=['colorsys']), "
        "isolation.run_in_fresh_process(seen, 'wave'))"
    )
    shown = run_python(code)
    assert shown.stdout.split() == ["True", "False"], shown.stderr[-2000:]


def test_the_parents_main_script_is_not_run_again_in_the_variants_process(tmp_path):
    # A Ray worker's main script is Ray's own: multiprocessing's fork server, used before, ran it
    # again
    # before each variant (0.4-0.5 s). A function of the main script is refused instead (test
    # below).
    runs = tmp_path / "pids-that-ran-the-script.txt"
    script = tmp_path / "main_script.py"
    script.write_text(f"""import os, sys
open({str(runs)!r}, "a").write(f"{{os.getpid()}}\\n")
if __name__ == "__main__":
    sys.path.insert(0, {REPO!r})
    from runner import isolation
    print(isolation.run_in_fresh_process(os.getpid), os.getpid())
""")
    shown = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300
    )
    child, parent = shown.stdout.split()
    assert child != parent, shown.stderr[-2000:]
    assert runs.read_text().split() == [parent]  # the child never ran it


def test_what_a_variants_process_runs_imports_no_ray():
    # The process unpickles the function it runs, importing its module: importing Ray there cost
    # 0.3-0.5 s before each variant (measured on 2 cores).
    from runner import worker
    from runner.finetune import train as finetune
    from runner.references import resolve
    from runner.work import FinetuneWork, VariantWork

    assert resolve(VariantWork.runs) is worker.run_variant_in_own_process
    assert resolve(FinetuneWork.runs) is finetune.run_finetune
    code = (
        "import sys; from runner import isolation; [__import__(m) for m in isolation.PRELOAD]; "
        "from runner.worker import run_variant_in_own_process; from runner.finetune.train import "
        "run_finetune; "
        "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))"
    )
    shown = run_python(code)
    assert shown.stdout.strip() == "[]", shown.stdout[-2000:] + shown.stderr[-2000:]


def server_pid() -> int:
    """The fork server this process came from: its parent (the supervisor of the call)'s parent."""
    with open(f"/proc/{os.getppid()}/stat") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[1])


def test_a_server_started_ahead_serves_the_processes_that_inherit_its_address(monkeypatch):
    # quantbench run starts one before its Ray cluster, so the imports run while Ray starts.
    monkeypatch.syspath_prepend(
        REPO
    )  # the server imports what its callers name: tests.test_isolation
    server = isolation.start_server()
    try:
        code = (
            "from runner import isolation; from tests.test_isolation import server_pid; "
            "print(isolation.run_in_fresh_process(server_pid))"
        )
        shown = run_python(code, env={**os.environ, isolation.ADDRESS_VARIABLE: server.describe()})
        assert shown.stdout.strip() == str(server.process.pid), shown.stderr[-2000:]
    finally:
        server.stop()
    assert server.process.poll() is not None


def test_the_variants_output_goes_where_its_caller_writes():
    # On a Ray worker that is the worker's log, not the terminal of whoever started the server.
    code = (
        "import os; from runner import isolation; "
        "isolation.run_in_fresh_process(print, 'said by the variant'); "
        "isolation.run_in_fresh_process(os.write, 2, b'warned by the variant')"
    )
    shown = run_python(code)
    assert shown.stdout == "said by the variant\n" and "warned by the variant" in shown.stderr, (
        shown.stderr[-2000:]
    )


def wait_on_a_fifo(fifo: str) -> None:
    with open(fifo, "w") as announce:
        announce.write(f"{os.getpid()}\n")
    with open(
        fifo
    ) as never_written:  # blocks until killed: nobody opens the fifo for writing again
        never_written.read()


def test_a_variants_process_is_killed_when_its_caller_goes_away(tmp_path, monkeypatch):
    # A Ray worker that is stopped (or dies) must not leave its variant running on the node, though
    # the server it came from (started by the driver) goes on.
    import select
    import signal

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    monkeypatch.syspath_prepend(REPO)
    server = isolation.start_server()
    code = (
        "from runner import isolation; from tests.test_isolation import wait_on_a_fifo; "
        f"isolation.run_in_fresh_process(wait_on_a_fifo, {str(fifo)!r})"
    )
    caller = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**os.environ, isolation.ADDRESS_VARIABLE: server.describe()},
    )
    try:
        with open(fifo) as announced:
            variant = int(announced.readline())
        ended = os.pidfd_open(variant)
        caller.send_signal(signal.SIGKILL)
        caller.wait()
        assert select.select([ended], [], [], 60)[0], f"the variant's process {variant} still runs"
        os.close(ended)
        assert server.process.poll() is None
    finally:
        caller.kill()
        server.stop()


def start_a_child_then_die(pid_file: str) -> None:
    child = os.fork()
    if child == 0:
        quiet = os.open(os.devnull, os.O_WRONLY)
        os.dup2(quiet, 1)  # not the test's pipes: their reader waits for every writer to close them
        os.dup2(quiet, 2)
        import time

        time.sleep(120)  # outlives its parent, holding every other descriptor it inherited
        os._exit(0)
    with open(pid_file, "w") as handle:
        handle.write(str(child))
    os._exit(5)


def test_a_death_is_reported_at_once_though_a_process_it_started_lives_on(tmp_path):
    # E.g. a data loader's worker: the caller must not wait for it to learn that the variant died.
    import select
    import signal

    pid_file = tmp_path / "child.pid"
    code = (
        "from runner import isolation; from tests.test_isolation import start_a_child_then_die as "
        "f; "
        f"isolation.run_in_fresh_process(f, {str(pid_file)!r})"
    )
    try:
        shown = run_python(code, timeout=60)
        assert "exit code 5" in shown.stderr, shown.stderr[-2000:]
        # And what it left behind was killed when the call ended.
        left = os.pidfd_open(int(pid_file.read_text()))
        assert select.select([left], [], [], 60)[0], "the process the call started still runs"
        os.close(left)
    finally:
        if pid_file.exists():
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


def openmp_threads_of_the_server() -> str | None:
    with open(f"/proc/{server_pid()}/environ", "rb") as environ:
        found = [v for v in environ.read().split(b"\0") if v.startswith(b"OMP_NUM_THREADS=")]
    return found[0].split(b"=", 1)[1].decode() if found else None


def test_the_server_imports_torch_with_one_openmp_thread():
    # Importing torch and transformers the way `quantbench run` does (from the checkout) started
    # OpenMP's pool: the server held 3 threads 12 s after it started, 1 with this setting
    # (measured).
    # Forking a threaded process copies one thread, so every variant would inherit a broken pool.
    # The variant's process sets its own thread count (the job's `threads`).
    assert isolation.run_in_fresh_process(openmp_threads_of_the_server) == "1"


def test_a_function_of_the_main_script_is_refused_with_a_reason():
    code = "from runner import isolation\ndef f():\n    pass\nisolation.run_in_fresh_process(f)"
    shown = run_python(code)
    assert "f is defined in the main script" in shown.stderr, shown.stderr[-2000:]


def test_a_process_killed_by_a_signal_is_reported_with_the_signal():
    with pytest.raises(isolation.ProcessDied, match=r"killed by signal 6 \(SIGABRT\)"):
        isolation.run_in_fresh_process(os.abort)


def test_the_servers_key_is_not_on_its_command_line_and_a_wrong_key_is_turned_away():
    from multiprocessing import AuthenticationError
    from multiprocessing.connection import Client

    server = isolation.start_server()
    try:
        with open(f"/proc/{server.process.pid}/cmdline", "rb") as cmdline:  # any user may read it
            assert server.key.hex().encode() not in cmdline.read()
        with pytest.raises(AuthenticationError):
            Client(server.address, "AF_UNIX", authkey=b"not the key")
        os.environ[isolation.ADDRESS_VARIABLE] = server.describe()
        assert isolation.run_in_fresh_process(server_pid) == server.process.pid  # it still serves
    finally:
        os.environ.pop(isolation.ADDRESS_VARIABLE, None)
        server.stop()
