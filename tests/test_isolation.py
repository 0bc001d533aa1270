"""Each CPU variant runs in a new process forked from a warm fork server: its result, its error or its
death comes back to the worker, and nothing of one run is left in the next."""

from __future__ import annotations

import os

import pytest

from runner import isolation

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
    assert first["state"] == ["a"] and second["state"] == ["b"]  # a fresh copy of the server each time
    assert _STATE == []  # and nothing ran in this process


def test_an_error_in_the_process_comes_back_as_an_error():
    with pytest.raises(RuntimeError, match="ValueError: the variant broke"):
        isolation.run_in_fresh_process(fail, "the variant broke")


def test_a_process_that_dies_is_reported_with_its_exit_code():
    with pytest.raises(isolation.ProcessDied, match="exit code 7"):
        isolation.run_in_fresh_process(os._exit, 7)


def already_imported(name):
    import sys

    return name in sys.modules


def test_the_server_imports_beforehand_what_its_first_call_names(tmp_path):
    # The server starts once per process, so a process of its own shows what its first call did.
    import subprocess
    import sys

    code = ("from runner import isolation; from tests.test_isolation import already_imported as seen; "
            "print(isolation.run_in_fresh_process(seen, 'colorsys', also_import=['colorsys']), "
            "isolation.run_in_fresh_process(seen, 'wave'))")
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                           cwd=os.path.dirname(os.path.dirname(__file__)))
    assert shown.stdout.split() == ["True", "False"], shown.stderr[-2000:]


def test_the_parents_main_script_is_not_run_again_in_the_variants_process(tmp_path):
    # A Ray worker's main script is Ray's own; running it again before each variant cost 0.4-0.5 s.
    import subprocess
    import sys

    runs = tmp_path / "pids-that-ran-the-script.txt"
    script = tmp_path / "main_script.py"
    script.write_text(f"""import os, sys
open({str(runs)!r}, "a").write(f"{{os.getpid()}}\\n")
if __name__ == "__main__":
    sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r})
    from runner import isolation
    print(isolation.run_in_fresh_process(os.getpid), os.getpid())
""")
    shown = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    child, parent = shown.stdout.split()
    assert child != parent, shown.stderr[-2000:]
    assert runs.read_text().split() == [parent]  # the child never ran it


def test_what_a_variants_process_runs_imports_no_ray():
    # The process unpickles the function it runs, importing its module: importing Ray there cost
    # 0.3-0.5 s before each variant (measured on 2 cores).
    import subprocess
    import sys

    from runner import dispatch, finetune, worker

    assert dispatch.run_variant_in_own_process is worker.run_variant_in_own_process
    assert dispatch.run_finetune is finetune.run_finetune
    code = ("import sys; from runner import isolation; [__import__(m) for m in isolation.PRELOAD]; "
            "from runner.worker import run_variant_in_own_process; from runner.finetune import run_finetune; "
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                           cwd=os.path.dirname(os.path.dirname(__file__)))
    assert shown.stdout.strip() == "[]", shown.stdout[-2000:] + shown.stderr[-2000:]
